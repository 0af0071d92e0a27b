"""The paper's Tables 1 and 2 (and the patient recognition rate) from a sweep folder.

  python -m jattn.tables sweeps/paper

A sweep folder holds one training run per row and fold, `SWEEP/<name>/fold<k>/`, each finished run
with its `results.json`, and usually the manifest `SWEEP/sweep.json` written by
experiments/sweep.py (row order and expected folds). The folder names the row; where its runs'
config.name differs (a config run into a folder of another name), the row shows it, and all folds
of a row must be runs of one config. Every cell is the mean and sample standard deviation over the
folds that finished and have the figure; a cell short of folds says so (`(3/5)`: e.g. a fold
without test images at that magnification), one with none shows `—`. Each row that reproduces a
row of the paper is followed by the paper's published figure, but only for runs of the paper's
setting (`_setting`); a row of another setting is labelled with what differs (`ours_100X (100X)`,
`demo_ours (from scratch, 64x64, 6 epochs, width 1/16, classifier 64)`) and shown without the
paper's figures. A figure the tables read must be a fraction in [0, 1] or null (undefined): NaN
or infinity in a results.json is refused by name. When the sweep holds binary runs
with clinical metrics, Tables 4-5 give sensitivity, specificity, balanced accuracy, F1 and ROC-AUC
at image and patient level; when it holds subtype runs (config.task='subtype'), Table 6 gives their
balanced accuracy, macro F1 and per-subtype F1. Results written before these figures existed are
read as they are (their cells in the new tables are missing).
Writes SWEEP/tables.md, SWEEP/tables.csv and SWEEP/tables.png.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import fractions
import io
import json
import os
import re

import numpy as np

from jattn import files
from jattn.data.breakhis import MAGNIFICATIONS, SUBTYPE_CODES
from jattn.errors import UserError, exit_on_user_error

RESULTS_SCHEMA = "jattn.results/1"  # as written by jattn.train
MANIFEST = "sweep.json"

# Wu et al., ISBI 2019, Table 1: image-level accuracy (%), mean ± std over 5 folds, per
# magnification; rows "VGG19", "VGG19 + C", "VGG19 + S" and "Ours".
PAPER_TABLE1: dict[str, dict[str, tuple[float, float]]] = {
    "VGG19": {"40X": (89.1, 3.4), "100X": (90.3, 3.9), "200X": (90.6, 2.8), "400X": (87.4, 2.4)},
    "VGG19 + C": {"40X": (91.1, 2.6), "100X": (91.5, 3.5), "200X": (92.0, 2.2),
                  "400X": (88.6, 2.3)},
    "VGG19 + S": {"40X": (89.9, 3.0), "100X": (91.7, 2.5), "200X": (92.2, 1.9),
                  "400X": (89.2, 2.5)},
    "Ours": {"40X": (91.4, 3.0), "100X": (92.2, 2.9), "200X": (93.4, 2.3), "400X": (90.0, 2.2)},
}
# Wu et al., ISBI 2019, Table 2: patient-level accuracy (%), majority vote, same rows.
PAPER_TABLE2: dict[str, dict[str, tuple[float, float]]] = {
    "VGG19": {"40X": (95.7, 3.9), "100X": (96.4, 3.6), "200X": (96.4, 2.5), "400X": (92.9, 3.6)},
    "VGG19 + C": {"40X": (97.1, 3.0), "100X": (98.6, 2.0), "200X": (98.6, 2.0),
                  "400X": (95.7, 3.0)},
    "VGG19 + S": {"40X": (97.9, 3.2), "100X": (98.6, 2.0), "200X": (97.9, 3.2),
                  "400X": (94.3, 4.8)},
    "Ours": {"40X": (97.9, 3.2), "100X": (99.3, 1.6), "200X": (98.6, 2.0), "400X": (96.4, 2.5)},
}


ALL = "all"  # the column over every tested magnification together (jattn.evaluate.ALL)


@dataclasses.dataclass(frozen=True)
class Table:
  key: str  # the field of results.json (a dotted name for the figures found at `path`)
  title: str
  paper: dict[str, dict[str, tuple[float, float]]] | None  # the paper's figures, if it has them
  path: tuple[str, ...] = ()  # where the figure is in results.json, "{col}" the column; () = key
  columns: tuple[str, ...] = MAGNIFICATIONS
  section: str = "paper"  # tables of one section are shown together ('paper' always)
  metric: str = ""  # the row's metric, for sections that put several tables in one

  def keys(self, column: str) -> tuple[str, ...]:
    """Where the figure of one column is in results.json."""
    return tuple(column if part == "{col}" else part for part in self.path or (self.key, "{col}"))

  def raw(self, results: dict, column: str):
    """What results.json holds where the figure of one column goes; None where it has nothing."""
    node = results
    for part in self.keys(column):
      if not isinstance(node, dict):
        return None
      node = node.get(part)
    return node

  def value(self, results: dict, column: str) -> float | None:
    """The figure in [0, 1] of one run at one column; None where the run has none."""
    node = self.raw(results, column)
    return float(node) if _is_number(node) else None


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


CLINICAL_METRICS = {"sensitivity": "sensitivity", "specificity": "specificity",
                    "balanced_accuracy": "balanced accuracy", "f1": "F1",
                    "roc_auc": "ROC-AUC"}  # jattn.metrics.BINARY_METRICS, as the rows read
SECTION_TITLES = {
    "clinical_image": "Table 4. Binary runs, image level (%): sensitivity (malignant recall), "
                      "specificity, balanced accuracy, F1 of malignant, ROC-AUC of P(malignant)",
    "clinical_patient": "Table 5. Binary runs, patient level (%): the patient's majority vote, "
                        "and ROC-AUC of the mean P(malignant) of its images",
    "subtype": "Table 6. Subtype runs (8 classes), image level (%): balanced accuracy (mean "
               "recall), macro F1 and F1 per subtype",
}
TABLES = (
    Table("image_accuracy", "Table 1. Image-level accuracy (%)", PAPER_TABLE1),
    Table("patient_accuracy", "Table 2. Patient-level accuracy (%): majority vote of a test "
          "patient's images", PAPER_TABLE2),
    Table("patient_recognition_rate", "Table 3. Patient recognition rate (%) of Spanhol et al. "
          "(2016): mean over test patients of the fraction of their images classified correctly; "
          "not reported by the paper", None),
    *(Table(f"clinical.{level}.{metric}", SECTION_TITLES[f"clinical_{level}"], None,
            ("clinical", level, "{col}", metric, "value"), (*MAGNIFICATIONS, ALL),
            f"clinical_{level}", label)
      for level in ("image", "patient") for metric, label in CLINICAL_METRICS.items()),
    *(Table(f"multiclass.{m}", SECTION_TITLES["subtype"], None,
            ("multiclass", "{col}", "image", m), (*MAGNIFICATIONS, ALL), "subtype", label)
      for m, label in (("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro F1"))),
    *(Table(f"per_class.{code}.f1", SECTION_TITLES["subtype"], None,
            ("per_class", "{col}", code, "f1"), (*MAGNIFICATIONS, ALL), "subtype", f"F1 {code}")
      for code in SUBTYPE_CODES),
)
_REQUIRED = ("schema", "name", "paper_row", "fold", "finished")
_REQUIRED_FINISHED = tuple(t.key for t in TABLES if t.section == "paper")


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A sweep folder: its rows in order, the expected folds and each finished run's results."""

  sweep_dir: str
  names: list[str]  # one table row per config name, in order
  folds: list[int]  # the folds every row should have
  paper_rows: dict[str, str]  # name -> the paper's row it reproduces ('' for none)
  results: dict[tuple[str, int], dict]  # (name, fold) -> results.json, finished runs only
  unfinished: list[tuple[str, int]]  # expected runs without finished results, in order
  settings: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> '' (the paper's
  # setting, `_setting`) or what differs, e.g. 'subtype', '100X', '100X, from scratch, 6 epochs'
  config_names: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> the config.name
  # of its runs, where that differs from the row's name (its folder)

  def label(self, name: str) -> str:
    """The row's name as the tables show it, with its config's name and setting if they differ."""
    details = [f"config {self.config_names[name]}"] if name in self.config_names else []
    details += [self.settings[name]] if self.settings.get(name) else []
    return f"{name} ({'; '.join(details)})" if details else name

  def sections(self) -> list[str]:
    """The sections of tables that some finished run has figures for, in TABLES order."""
    have = {t.section for t in TABLES for r in self.results.values()
            if t.section == "paper" or any(t.value(r, c) is not None for c in t.columns)}
    return list(dict.fromkeys(t.section for t in TABLES if t.section in have))


@dataclasses.dataclass(frozen=True)
class Cell:
  """One table cell: a config's figure at one magnification over the finished folds, in percent."""

  table: str
  name: str
  paper_row: str
  magnification: str
  values: tuple[float, ...]  # percent, one per finished fold, in fold order
  n_expected: int
  paper_mean: float | None = None
  paper_std: float | None = None

  @property
  def n_folds(self) -> int:
    return len(self.values)

  @property
  def mean(self) -> float | None:
    return float(np.mean(self.values)) if self.values else None

  @property
  def std(self) -> float | None:
    """Sample standard deviation (ddof=1); None below two folds."""
    return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else None

  def text(self) -> str:
    if not self.values:
      return "—"
    out = f"{self.mean:.1f}" if self.std is None else f"{self.mean:.1f} ± {self.std:.1f}"
    return out if self.n_folds == self.n_expected else f"{out} ({self.n_folds}/{self.n_expected})"


def collect(sweep_dir: str) -> Sweep:
  """Reads every run of a sweep folder; rows and folds from sweep.json, else from the folders."""
  if not os.path.isdir(sweep_dir):
    raise UserError(f"{sweep_dir}: no such folder; give the folder a sweep wrote "
                    f"(SWEEP/<name>/fold<k>/results.json)")
  manifest_path = os.path.join(sweep_dir, MANIFEST)
  if os.path.exists(manifest_path):
    names, folds, runs = _read_manifest(manifest_path)
  else:
    names, folds, runs = _scan_folders(sweep_dir)
  if not runs:
    raise UserError(f"{sweep_dir}: no runs found; expected SWEEP/<name>/fold<k>/results.json "
                    f"or a {MANIFEST}")

  results, unfinished, paper_rows, settings, config_names = {}, [], {}, {}, {}
  for name, fold, workdir in runs:
    path = os.path.join(sweep_dir, workdir, "results.json")
    r = _read_results(path) if os.path.exists(path) else None
    if r is None or r["finished"] is not True:
      unfinished.append((name, fold))
      continue
    if r["fold"] != fold:
      raise UserError(f"{path}: holds name {r['name']!r} fold {r['fold']}, but the sweep expects "
                      f"fold {fold} there; move it to its own folder")
    if config_names.setdefault(name, r["name"]) != r["name"]:
      raise UserError(f"{path}: a run of config {r['name']!r}, but other folds of {name!r} are "
                      f"runs of {config_names[name]!r}; give each config its own folder")
    setting = _setting(r)
    if settings.setdefault(name, setting) != setting:
      raise UserError(f"{path}: a run of {setting or 'the paper setting'}, but other folds of "
                      f"{name!r} are of {settings[name] or 'the paper setting'}; give each "
                      f"setting its own folder (config.name)")
    r = {**r, "paper_row": r["paper_row"] if not setting else ""}  # no paper figure to compare
    if paper_rows.setdefault(name, r["paper_row"]) != r["paper_row"]:
      raise UserError(f"{path}: paper_row {r['paper_row']!r}, but other folds of {name!r} say "
                      f"{paper_rows[name]!r}; rerun them with the same config")
    results[(name, fold)] = r
  return Sweep(sweep_dir=sweep_dir, names=names, folds=folds,
               paper_rows={n: paper_rows.get(n, "") for n in names}, results=results,
               unfinished=unfinished, settings={n: settings.get(n, "") for n in names},
               config_names={n: c for n, c in config_names.items() if c != n})


# The paper's setting (section 3; configs/default.py holds the same values) for the config fields
# that change what a figure means. A run that differs is labelled, and no paper figure is shown
# beside it. Results without a config (written before it was recorded) count as the paper's.
PAPER_SETTING = {"image_size": 224, "num_epochs": 130, "model.width": 1.0,
                 "model.classifier_width": 4096}


def _setting(results: dict) -> str:
  """'' for the paper's setting (binary task, all four magnifications, ImageNet weights, 224x224,
  130 epochs, VGG19's widths), else what differs, e.g. '100X' or 'from scratch, 64x64, 6 epochs'."""
  task = results.get("task", "binary")
  selected = results.get("magnifications", {}).get("selected", list(MAGNIFICATIONS))
  parts = ([task] if task != "binary" else []) + (
      [",".join(selected)] if list(selected) != list(MAGNIFICATIONS) else [])
  config = results.get("config") if isinstance(results.get("config"), dict) else {}
  model = config.get("model") if isinstance(config.get("model"), dict) else {}
  differs = ["from scratch"] if config.get("pretrained", "given") == "" else []
  value = {"image_size": config.get("image_size"), "num_epochs": config.get("num_epochs"),
           "model.width": model.get("width"),
           "model.classifier_width": model.get("classifier_width")}
  shown = {"image_size": lambda v: f"{v}x{v}",
           "num_epochs": lambda v: f"{v} epoch{'' if v == 1 else 's'}",
           "model.width": lambda v: f"width {fractions.Fraction(v).limit_denominator(1000)}",
           "model.classifier_width": lambda v: f"classifier {v}"}
  differs += [shown[key](value[key]) for key, paper in PAPER_SETTING.items()
              if value[key] is not None and value[key] != paper]
  return ", ".join(([" ".join(parts)] if parts else []) + differs)


def _read_manifest(path: str) -> tuple[list[str], list[int], list[tuple[str, int, str]]]:
  try:
    with open(path) as f:
      manifest = json.load(f)
    names, folds = list(manifest["names"]), [int(k) for k in manifest["folds"]]
    runs = [(r["name"], int(r["fold"]), r["workdir"]) for r in manifest.get("runs", ())] or [
        (n, k, os.path.join(n, f"fold{k}")) for n in names for k in folds]
  except json.JSONDecodeError as e:
    raise UserError(f"{path}: not valid JSON ({e}); fix it or delete it") from None
  except KeyError as e:
    raise UserError(f"{path}: missing key {e}; fix it or delete it") from None
  except (TypeError, ValueError) as e:
    raise UserError(f"{path}: malformed ({e}); fix it or delete it") from None
  return names, folds, [r for r in runs if r[0] in names and r[1] in folds]


def _scan_folders(sweep_dir: str) -> tuple[list[str], list[int], list[tuple[str, int, str]]]:
  runs = []
  for name in sorted(os.listdir(sweep_dir)):
    if not os.path.isdir(os.path.join(sweep_dir, name)):
      continue
    for sub in os.listdir(os.path.join(sweep_dir, name)):
      match = re.fullmatch(r"fold(\d+)", sub)
      if match and os.path.isdir(os.path.join(sweep_dir, name, sub)):
        runs.append((name, int(match.group(1)), os.path.join(name, sub)))
  names = list(dict.fromkeys(name for name, _, _ in runs))
  folds = sorted({fold for _, fold, _ in runs})
  return names, folds, [(n, k, os.path.join(n, f"fold{k}")) for n in names for k in folds]


def _read_results(path: str) -> dict:
  """One run's results.json, checked for the fields the tables need."""
  try:
    with open(path) as f:
      r = json.load(f)
  except json.JSONDecodeError as e:
    raise UserError(f"{path}: not valid JSON ({e}); delete it to rerun that run") from None
  if not isinstance(r, dict):
    raise UserError(f"{path}: expected a JSON object; delete it to rerun that run")
  missing = [k for k in _REQUIRED if k not in r]
  if not missing and r["finished"] is True:
    missing = [k for k in _REQUIRED_FINISHED if k not in r]
  if missing:
    raise UserError(f"{path}: missing key {missing[0]!r}; not a finished jattn run's results, "
                    f"delete it to rerun that run")
  if r["schema"] != RESULTS_SCHEMA:
    raise UserError(f"{path}: schema {r['schema']!r}, expected {RESULTS_SCHEMA!r}")
  if r["finished"] is True:
    for key in _REQUIRED_FINISHED:
      values = r[key]
      bad = (not isinstance(values, dict) or
             [m for m, v in values.items() if not isinstance(v, (int, float)) or not 0 <= v <= 1])
      if bad:
        raise UserError(f"{path}: {key} must map magnifications to fractions in [0, 1]; "
                        f"got {values!r}")
    for table in TABLES:  # the further tables' figures: a fraction, or null where undefined
      for column in table.columns:
        value = table.raw(r, column)
        if value is not None and not (_is_number(value) and 0 <= value <= 1):
          where = ".".join(table.keys(column))
          raise UserError(f"{path}: {where} is {json.dumps(value)[:60]}, not a fraction in [0, 1] "
                          f"or null (undefined); delete results.json to evaluate that run again "
                          f"from its last checkpoint")
  return r


def aggregate(sweep: Sweep) -> list[Cell]:
  """Every cell of every table shown: per table, config (in row order) and column."""
  cells = []
  sections = sweep.sections()
  for table in TABLES:
    if table.section not in sections:
      continue
    for name in sweep.names:
      paper_row = sweep.paper_rows[name]
      for col in table.columns:
        figures = [table.value(sweep.results[(name, k)], col) for k in sweep.folds
                   if (name, k) in sweep.results]
        values = tuple(100.0 * v for v in figures if v is not None)
        paper = (table.paper or {}).get(paper_row, {}).get(col, (None, None))
        cells.append(Cell(table.key, name, paper_row, col, values, len(sweep.folds), *paper))
  return cells


def format_markdown(sweep: Sweep, cells: list[Cell]) -> str:
  """The tables as Markdown: Tables 1-3 one row per config and one column per magnification;
  each further section (clinical, subtype) one row per config and metric."""
  by_key = {(c.table, c.name, c.magnification): c for c in cells}
  n = len(sweep.folds)
  lines = [f"# Results of {sweep.sweep_dir}", "",
           f"{n} folds expected per config (folds {', '.join(map(str, sweep.folds))}). "
           f"`(n/{n})`: only n folds finished (or had test images at that magnification), the "
           f"figure is over those; `—`: no fold has the figure; "
           f"a figure without ± comes from one fold. Rows in italics, `paper: <row>`, are the "
           f"figures published by Wu et al., ISBI 2019 (Tables 1 and 2), for the row of the paper "
           f"that the config above them reproduces.", ""]
  label = {name: sweep.label(name) for name in sweep.names}
  for section in sweep.sections():
    tables = [t for t in TABLES if t.section == section]
    columns = tables[0].columns
    if section == "paper":
      for table in tables:
        lines += [f"**{table.title}.** Mean ± sample standard deviation (ddof = 1) over the "
                  f"finished folds.", "", "| Method | " + " | ".join(columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for name in sweep.names:
          lines.append(f"| {label[name]} | " + " | ".join(
              by_key[(table.key, name, m)].text() for m in columns) + " |")
          paper = (table.paper or {}).get(sweep.paper_rows[name])
          if paper:
            lines.append(f"| *paper: {sweep.paper_rows[name]}* | " + " | ".join(
                f"*{paper[m][0]:.1f} ± {paper[m][1]:.1f}*" for m in columns) + " |")
        lines.append("")
      continue
    lines += [f"**{SECTION_TITLES[section]}.** Mean ± sample standard deviation (ddof = 1) over "
              f"the finished folds; `{ALL}`: every tested magnification together.", "",
              "| Method | Metric | " + " | ".join(columns) + " |",
              "|---|---|" + "---|" * len(columns)]
    for name in sweep.names:
      rows = [(t, [by_key[(t.key, name, c)] for c in columns]) for t in tables]
      if not any(c.n_folds for _, row in rows for c in row):
        continue  # runs of another task
      for table, row in rows:
        lines.append(f"| {label[name]} | {table.metric} | " + " | ".join(
            c.text() for c in row) + " |")
    lines.append("")
  if sweep.unfinished:
    lines.append("Unfinished runs, counted as missing: " + ", ".join(
        f"{name} fold {fold}" for name, fold in sweep.unfinished) + ".")
  else:
    lines.append(f"All {len(sweep.names) * n} runs finished.")
  return "\n".join(lines) + "\n"


CSV_FIELDS = ("table", "name", "paper_row", "magnification", "mean", "std", "n_folds", "n_expected",
              "paper_mean", "paper_std")


def format_csv(cells: list[Cell]) -> str:
  """Long format, one line per cell; an absent figure is an empty field."""
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(CSV_FIELDS)
  blank = lambda x: "" if x is None else repr(x)
  for c in cells:
    writer.writerow([c.table, c.name, c.paper_row, c.magnification, blank(c.mean), blank(c.std),
                     c.n_folds, c.n_expected, blank(c.paper_mean), blank(c.paper_std)])
  return out.getvalue()


def plot(sweep: Sweep, cells: list[Cell], path: str) -> None:
  """Ours (filled, ± sample std) beside the paper (open), per config and magnification, as PNG."""
  from matplotlib.figure import Figure  # no pyplot: no global backend, Agg when saving

  by_key = {(c.table, c.name, c.magnification): c for c in cells}
  fig = Figure(figsize=(13, 4.8), layout="constrained")
  axes = fig.subplots(1, 2, sharey=True)
  colours = [f"C{i % 10}" for i in range(len(sweep.names))]
  width = 0.8 / max(len(sweep.names), 1)
  for ax, table in zip(axes, TABLES[:2], strict=True):
    for i, name in enumerate(sweep.names):
      offset = (i - (len(sweep.names) - 1) / 2) * width
      ours = [by_key[(table.key, name, m)] for m in MAGNIFICATIONS]
      x = [j + offset - width / 5 for j, c in enumerate(ours) if c.n_folds]
      ax.errorbar(x, [c.mean for c in ours if c.n_folds],
                  yerr=[c.std or 0.0 for c in ours if c.n_folds], fmt="o", color=colours[i],
                  capsize=3, label=name)
      for j, c in enumerate(ours):
        if c.n_folds and c.n_folds < c.n_expected:
          ax.annotate(f"{c.n_folds}/{c.n_expected}", (j + offset - width / 5, c.mean),
                      textcoords="offset points", xytext=(0, -14), ha="center", fontsize=7)
      paper = [c for c in ours if c.paper_mean is not None]
      if paper:
        ax.errorbar([MAGNIFICATIONS.index(c.magnification) + offset + width / 5 for c in paper],
                    [c.paper_mean for c in paper], yerr=[c.paper_std for c in paper], fmt="s",
                    mfc="none", color=colours[i], capsize=3,
                    label=f"paper: {sweep.paper_rows[name]}")
    ax.set_xticks(range(len(MAGNIFICATIONS)), MAGNIFICATIONS)
    ax.set_title(table.title.split(":")[0], fontsize=10)
    ax.grid(axis="y", alpha=0.3)
  axes[0].set_ylabel("accuracy (%)")
  fig.suptitle(f"{sweep.sweep_dir}: filled, this sweep (mean ± sample std over the finished "
               f"folds, n/N where folds are missing); open, the paper (Wu et al., ISBI 2019)",
               fontsize=9)
  fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=8)
  with files.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=120)


def write_tables(sweep_dir: str) -> str:
  """Writes tables.md, tables.csv and tables.png into the sweep folder; returns the Markdown."""
  sweep = collect(sweep_dir)
  cells = aggregate(sweep)
  markdown = format_markdown(sweep, cells)
  files.atomic_write_text(os.path.join(sweep_dir, "tables.md"), markdown)
  files.atomic_write_text(os.path.join(sweep_dir, "tables.csv"), format_csv(cells))
  plot(sweep, cells, os.path.join(sweep_dir, "tables.png"))
  return markdown


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m jattn.tables",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("sweep_dir", metavar="SWEEP_DIR", help="the folder a sweep wrote")
  args = parser.parse_args(argv)
  with exit_on_user_error("jattn.tables"):
    print(write_tables(args.sweep_dir))
    print(f"wrote tables.md, tables.csv and tables.png in {args.sweep_dir}")


if __name__ == "__main__":
  main()
