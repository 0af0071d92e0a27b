"""The paper's Tables 1 and 2 (and the group recognition rate) from a sweep folder.

  jattn tables sweeps/paper [--compare ours:vgg19]

A sweep folder holds one training run per row, fold and seed, `SWEEP/<name>/fold<k>/` (seed 0) or
`SWEEP/<name>/seed<s>/fold<k>/`, each finished run with its `results.json`, and usually the manifest
`SWEEP/sweep.json` written by experiments/sweep.py (row order, expected folds, seeds and runs). The
folder names the row; where its runs' config.name differs (a config run into a folder of another
name), the row shows it, and all folds of a row must be runs of one config. Every cell is the mean
and sample standard deviation over the folds that finished and have the figure; a cell short of
folds says so (`(3/5)`: e.g. a fold without test images in that stratum), one with none shows `—`.
With several seeds a fold's figure is the mean over its seeds, and each cell adds the seed-to-seed
spread (the mean over folds of the standard deviation over a fold's seeds) and the runs behind it
(`(seeds 0.8; 15/15)`); with one seed the tables are as before seeds. The columns are the strata the
results report (BreakHis: the magnifications), the group level is the results' group unit (BreakHis:
the patient), so nothing here knows a data set. Where the runs' data source has published figures
(BreakHis: Wu et al., ISBI 2019), each row that reproduces a published row is followed by it, but
only for runs of the published setting (the source's `setting`); a row of another setting is
labelled with what differs (`ours_100X (100X)`, `demo_ours (from scratch, 64x64, 6 epochs, width
1/16, classifier 64)`) and shown without them. A figure the tables read must be a fraction in [0, 1]
or null (undefined): NaN or infinity in a results.json is refused by name. When the sweep holds
binary runs with clinical metrics, Tables 4-5 give sensitivity, specificity, balanced accuracy, F1
and ROC-AUC at image and group level; when it holds runs of more than two classes (BreakHis' subtype
task), Table 6 gives their balanced accuracy, macro F1 and per-class F1; when it holds runs with a
calibration block, Tables 7 and 8 give their ECE and Brier score at image and group level.
Results written before these figures existed are read as they are (their cells in the new tables
are missing); results of schema 1 are read as schema 2 (`jattn.evaluation.results.read`). Writes
SWEEP/tables.md, SWEEP/tables.csv and SWEEP/tables.png, and the paired comparisons of
jattn.evaluation.compare (`--compare FIRST:SECOND`, else each row against its setting's baseline
row; `--metric`), SWEEP/compare.md and SWEEP/compare.csv.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
from types import ModuleType

import numpy as np
from matplotlib.figure import Figure

from jattn.core import files
from jattn.core.errors import UserError
from jattn.data import sources
from jattn.evaluation import results
from jattn.evaluation.evaluate import ALL  # the column over every tested stratum together
from jattn.evaluation.metrics import BINARY_METRICS

MANIFEST = "sweep.json"


@dataclasses.dataclass(frozen=True)
class Table:
  key: str  # the table's name in tables.csv (BreakHis: 'patient_accuracy', 'clinical.image.f1')
  title: str
  paper: dict[str, dict[str, tuple[float, float]]] | None  # the published figures, if any
  path: tuple[str, ...]  # where the figure is in results.json (schema 2), "{col}" the column
  columns: tuple[str, ...]
  section: str = "paper"  # tables of one section are shown together ('paper' always)
  metric: str = ""  # the row's metric, for sections that put several tables in one

  def keys(self, column: str) -> tuple[str, ...]:
    """Where the figure of one column is in results.json."""
    return tuple(column if part == "{col}" else part for part in self.path)

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
                    "roc_auc": "ROC-AUC"}  # BINARY_METRICS, as the rows read
assert tuple(CLINICAL_METRICS) == BINARY_METRICS
CALIBRATION_METRICS = {"ece": "ECE", "brier": "Brier"}  # of results.json's calibration block


@dataclasses.dataclass(frozen=True)
class Layout:
  """What the tables of a sweep show, from its runs' results: the columns (strata), the group
  unit, the positive label of binary runs, the classes of runs of more classes, and the source's
  published figures."""

  columns: tuple[str, ...]  # per-stratum keys, in report order
  stratum: str  # what a column is, e.g. 'magnification' ('stratum' with several axes)
  unit: str = "group"
  positive: str = "positive"
  class_kind: str = "class"
  classes: tuple[str, ...] = ()  # of the runs with more than two classes
  published: ModuleType | None = None

  def tables(self) -> tuple[Table, ...]:
    unit, pos, kind, cols = self.unit, self.positive, self.class_kind, self.columns
    paper = self.published.FIGURES if self.published is not None else {}
    titles = {
        "clinical_image": f"Table 4. Binary runs, image level (%): sensitivity ({pos} recall), "
                          f"specificity, balanced accuracy, F1 of {pos}, ROC-AUC of P({pos})",
        "clinical_group": f"Table 5. Binary runs, {unit} level (%): the {unit}'s majority vote, "
                          f"and ROC-AUC of the mean P({pos}) of its images",
        "multiclass": f"Table 6. {kind.capitalize()} runs ({len(self.classes)} classes), image "
                      f"level (%): balanced accuracy (mean recall), macro F1 and F1 per {kind}",
        "calibration_image": "Table 7. Calibration, image level (x 100, lower is better): "
                             "expected calibration error (equal-width bins) and Brier score",
        "calibration_group": f"Table 8. Calibration, {unit} level (x 100, lower is better): "
                             f"of the mean probabilities of a {unit}'s images",
    }
    return (
        Table("image_accuracy", "Table 1. Image-level accuracy (%)",
              paper.get("image_accuracy"), ("image_accuracy", "{col}"), cols),
        Table(f"{unit}_accuracy", f"Table 2. {unit.capitalize()}-level accuracy (%): majority "
              f"vote of a test {unit}'s images", paper.get("group_accuracy"),
              ("group_accuracy", "{col}"), cols),
        Table(f"{unit}_recognition_rate", f"Table 3. {unit.capitalize()} recognition rate (%) of "
              f"Spanhol et al. (2016): mean over test {unit}s of the fraction of their images "
              f"classified correctly" + ("; not reported by the paper" if paper else ""), None,
              ("group_recognition_rate", "{col}"), cols),
        *(Table(f"clinical.{unit if level == 'group' else level}.{metric}",
                titles[f"clinical_{level}"], None, ("clinical", level, "{col}", metric, "value"),
                (*cols, ALL), f"clinical_{level}", label)
          for level in ("image", "group") for metric, label in CLINICAL_METRICS.items()),
        *(Table(f"multiclass.{m}", titles["multiclass"], None,
                ("multiclass", "{col}", "image", m), (*cols, ALL), "multiclass", label)
          for m, label in (("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro F1"))),
        *(Table(f"per_class.{c}.f1", titles["multiclass"], None, ("per_class", "{col}", c, "f1"),
                (*cols, ALL), "multiclass", f"F1 {c}")
          for c in self.classes),
        *(Table(f"calibration.{unit if level == 'group' else level}.{metric}",
                titles[f"calibration_{level}"], None,
                ("calibration", level, "{col}", metric, "value"), (*cols, ALL),
                f"calibration_{level}", label)
          for level in ("image", "group") for metric, label in CALIBRATION_METRICS.items()),
    )


def layout(found: list[dict], source: str = "breakhis") -> Layout:
  """The tables' layout for the finished runs' results `found` (schema 2); with none, the
  columns of the source the sweep is of."""
  src = sources.get(found[0].get("source", source) if found else source)
  if found:
    strata = found[0].get("strata", {})
    if len(strata) == 1:
      ((name, axis),) = strata.items()
      columns, stratum = tuple(axis["values"]), name
    else:
      columns = tuple(f"{name}={v}" for name, axis in strata.items() for v in axis["values"])
      stratum = "stratum"
  else:
    ((stratum, values),) = src.STRATA.items()
    columns = tuple(values)
  binary = next((r["binary"] for r in found if r.get("binary") and len(r["classes"]) == 2), None)
  multi = next((r for r in found if len(r.get("classes", ())) > 2), None)
  return Layout(columns=columns, stratum=stratum,
                unit=found[0].get("group_unit", "group") if found else src.GROUP_UNIT,
                positive=binary["positive"] if binary else "positive",
                class_kind=multi.get("class_kind", "class") if multi else "class",
                classes=tuple(multi["classes"]) if multi else (),
                published=getattr(src, "published", None))


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A sweep folder: its rows in order, the expected folds and seeds and each finished run's
  results."""

  sweep_dir: str
  names: list[str]  # one table row per config name, in order
  folds: list[int]  # the folds every row should have
  paper_rows: dict[str, str]  # name -> the paper's row it reproduces ('' for none)
  results: dict[tuple[str, int, int], dict]  # (name, fold, seed) -> results.json, finished runs
  unfinished: list[tuple]  # expected runs without finished results, in order: (name, fold), or
  # (name, fold, seed) where a row has several seeds
  settings: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> '' (the paper's
  # setting, the source's `setting`) or what differs, e.g. 'subtype', '100X',
  # '100X, from scratch, 6 epochs'
  config_names: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> the config.name
  # of its runs, where that differs from the row's name (its folder)
  layout: Layout = None  # what the tables show (`layout`)
  seeds: list[int] = dataclasses.field(default_factory=lambda: [0])  # every seed of the sweep
  expected: dict[str, list[tuple[int, int]]] = dataclasses.field(default_factory=dict)
  # name -> its expected runs' (fold, seed)
  reproduces: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> the paper row
  # its runs record, whatever their setting (`paper_rows` keeps it for the paper's setting only)

  @property
  def several_seeds(self) -> bool:
    """Whether some row has runs of more than one seed (the tables then show both spreads)."""
    return any(len({s for _, s in runs}) > 1 for runs in self.expected.values())

  def runs_of(self, name: str) -> dict[tuple[int, int], dict]:
    """The finished runs of one row: (fold, seed) -> results."""
    return {(k, s): r for (n, k, s), r in self.results.items() if n == name}

  def label(self, name: str) -> str:
    """The row's name as the tables show it, with its config's name and setting if they differ."""
    details = [f"config {self.config_names[name]}"] if name in self.config_names else []
    details += [self.settings[name]] if self.settings.get(name) else []
    return f"{name} ({'; '.join(details)})" if details else name

  @property
  def tables(self) -> tuple[Table, ...]:
    return self.layout.tables()

  def sections(self) -> list[str]:
    """The sections of tables that some finished run has figures for, in table order."""
    have = {t.section for t in self.tables for r in self.results.values()
            if t.section == "paper" or any(t.value(r, c) is not None for c in t.columns)}
    return list(dict.fromkeys(t.section for t in self.tables if t.section in have))


@dataclasses.dataclass(frozen=True)
class Cell:
  """One table cell: a config's figure in one column (a stratum, or all) over the finished folds,
  in percent."""

  table: str
  name: str
  paper_row: str
  column: str
  values: tuple[float, ...]  # percent, one per finished fold, in fold order (its mean over seeds)
  n_expected: int
  paper_mean: float | None = None
  paper_std: float | None = None
  seed_values: tuple[tuple[float, ...], ...] = ()  # percent, per finished fold, one per seed
  n_runs_expected: int = 0  # folds x seeds expected; 0: the sweep has one seed per row

  @property
  def n_folds(self) -> int:
    return len(self.values)

  @property
  def n_runs(self) -> int:
    return sum(len(v) for v in self.seed_values)

  @property
  def seed_spread(self) -> float | None:
    """The seed-to-seed spread: the mean over folds of the sample standard deviation (ddof=1)
    over a fold's seeds; None where no fold has two."""
    stds = [float(np.std(v, ddof=1)) for v in self.seed_values if len(v) > 1]
    return float(np.mean(stds)) if stds else None

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
    if self.n_runs_expected:  # several seeds: both spreads and the runs behind the cell
      spread = "" if self.seed_spread is None else f"seeds {self.seed_spread:.1f}; "
      return f"{out} ({spread}{self.n_runs}/{self.n_runs_expected})"
    return out if self.n_folds == self.n_expected else f"{out} ({self.n_folds}/{self.n_expected})"


def collect(sweep_dir: str) -> Sweep:
  """Reads every run of a sweep folder; rows, folds and seeds from sweep.json, else from the
  folders (`<name>/fold<k>` seed 0, `<name>/seed<s>/fold<k>` seed s)."""
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

  read, expected = {}, {}
  for run in runs:
    path = os.path.join(sweep_dir, run.workdir, "results.json")
    read[(run.name, run.fold, run.seed)] = (path, run, _read_results(path)
                                             if os.path.exists(path) else None)
    expected.setdefault(run.name, []).append((run.fold, run.seed))
  several = any(len({s for _, s in e}) > 1 for e in expected.values())
  found = [r for _, _, r in read.values() if r is not None and r["finished"] is True]
  shape = layout(found)
  results, unfinished, paper_rows, settings, config_names, reproduces = {}, [], {}, {}, {}, {}
  for (name, fold, seed), (path, run, r) in read.items():
    if r is None or r["finished"] is not True:
      unfinished.append((name, fold, seed) if several else (name, fold))
      continue
    _check_figures(path, r, shape)
    if r["fold"] != fold:
      raise UserError(f"{path}: holds name {r['name']!r} fold {r['fold']}, but the sweep expects "
                      f"fold {fold} there; move it to its own folder")
    recorded = r["config"].get("seed") if isinstance(r.get("config"), dict) else None
    if run.seed_known and _is_number(recorded) and recorded != seed:
      raise UserError(f"{path}: a run of seed {recorded}, but the sweep expects seed {seed} "
                      f"there; move it to its own folder")
    if config_names.setdefault(name, r["name"]) != r["name"]:
      raise UserError(f"{path}: a run of config {r['name']!r}, but other folds of {name!r} are "
                      f"runs of {config_names[name]!r}; give each config its own folder")
    setting = shape.published.setting(r) if shape.published is not None else ""
    if settings.setdefault(name, setting) != setting:
      raise UserError(f"{path}: a run of {setting or 'the paper setting'}, but other folds of "
                      f"{name!r} are of {settings[name] or 'the paper setting'}; give each "
                      f"setting its own folder (config.name)")
    reproduces.setdefault(name, r["paper_row"])
    r = {**r, "paper_row": r["paper_row"] if not setting else ""}  # no paper figure to compare
    if paper_rows.setdefault(name, r["paper_row"]) != r["paper_row"]:
      raise UserError(f"{path}: paper_row {r['paper_row']!r}, but other folds of {name!r} say "
                      f"{paper_rows[name]!r}; rerun them with the same config")
    results[(name, fold, seed)] = r
  return Sweep(sweep_dir=sweep_dir, names=names, folds=folds,
               paper_rows={n: paper_rows.get(n, "") for n in names}, results=results,
               unfinished=unfinished, settings={n: settings.get(n, "") for n in names},
               config_names={n: c for n, c in config_names.items() if c != n}, layout=shape,
               seeds=sorted({seed for _, _, seed in read}),
               expected={n: expected.get(n, []) for n in names},
               reproduces={n: reproduces.get(n, "") for n in names})


@dataclasses.dataclass(frozen=True)
class _Run:
  """An expected run of a sweep: its row, fold, seed and work dir (relative to the sweep)."""

  name: str
  fold: int
  seed: int
  workdir: str
  seed_known: bool = True  # False: the seed is assumed (a folder fold<k>, an older manifest)


def workdir(name: str, fold: int, seed: int = 0) -> str:
  """Where a sweep puts a run: `<name>/fold<k>` for seed 0 (as before seeds), else
  `<name>/seed<s>/fold<k>`."""
  return os.path.join(name, f"fold{fold}") if seed == 0 else os.path.join(
      name, f"seed{seed}", f"fold{fold}")


def _read_manifest(path: str) -> tuple[list[str], list[int], list[_Run]]:
  """Rows, folds and expected runs of sweep.json; a manifest without seeds (written before
  them) is of seed 0."""
  manifest = files.read_json(path, "fix it or delete it")
  try:
    names, folds = list(manifest["names"]), [int(k) for k in manifest["folds"]]
    seeds = [int(s) for s in manifest.get("seeds", [0])]
    runs = [_Run(r["name"], int(r["fold"]), int(r.get("seed", 0)), r["workdir"], "seed" in r)
            for r in manifest.get("runs", ())] or [
        _Run(n, k, s, workdir(n, k, s), "seeds" in manifest)
        for n in names for s in seeds for k in folds]
  except KeyError as e:
    raise UserError(f"{path}: missing key {e}; fix it or delete it") from None
  except (TypeError, ValueError, AttributeError) as e:
    raise UserError(f"{path}: malformed ({e}); fix it or delete it") from None
  return names, folds, [r for r in runs if r.name in names and r.fold in folds]


def _scan_folders(sweep_dir: str) -> tuple[list[str], list[int], list[_Run]]:
  """Rows, folds and seeds from the folders: every row is expected at every fold and seed."""
  found = []
  for name in sorted(os.listdir(sweep_dir)):
    if not os.path.isdir(os.path.join(sweep_dir, name)):
      continue
    for sub in os.listdir(os.path.join(sweep_dir, name)):
      match = re.fullmatch(r"fold(\d+)", sub)
      if match and os.path.isdir(os.path.join(sweep_dir, name, sub)):
        found.append((name, int(match.group(1)), 0))
      match = re.fullmatch(r"seed(\d+)", sub)
      if match and os.path.isdir(os.path.join(sweep_dir, name, sub)):
        for inner in os.listdir(os.path.join(sweep_dir, name, sub)):
          fold = re.fullmatch(r"fold(\d+)", inner)
          if fold and os.path.isdir(os.path.join(sweep_dir, name, sub, inner)):
            found.append((name, int(fold.group(1)), int(match.group(1))))
  names = list(dict.fromkeys(name for name, _, _ in found))
  folds = sorted({fold for _, fold, _ in found})
  seeds = sorted({seed for _, _, seed in found})
  return names, folds, [_Run(n, k, s, workdir(n, k, s), s != 0)
                        for n in names for s in seeds for k in folds]


def _read_results(path: str) -> dict:
  """One run's results.json (as schema 2), checked for the fields every table needs."""
  r = results.read(path)
  if r["finished"] is not True:
    return r
  strata = r.get("strata", {})
  what = f"{next(iter(strata))}s" if len(strata) == 1 else "strata"
  unit = r.get("group_unit", "group")
  required = {"image_accuracy": "image_accuracy"}
  if r.get("group_figures", {}).get("reported", True):
    required.update(group_accuracy=f"{unit}_accuracy",
                    group_recognition_rate=f"{unit}_recognition_rate")
  for key, shown in required.items():
    if key not in r:
      raise UserError(f"{path}: missing key {shown!r}; not a finished jattn run's results, "
                      f"delete it to rerun that run")
    values = r[key]
    bad = (not isinstance(values, dict) or
           [m for m, v in values.items() if not _is_number(v) or not 0 <= v <= 1])
    if bad:
      raise UserError(f"{path}: {shown} must map {what} to fractions in [0, 1]; got {values!r}")
  return r


def _check_figures(path: str, r: dict, shape: Layout) -> None:
  """Every figure the tables read of one run: a fraction, or null where undefined."""
  for table in shape.tables():
    for column in table.columns:
      value = table.raw(r, column)
      if value is not None and not (_is_number(value) and 0 <= value <= 1):
        raise UserError(f"{path}: the figure {table.key} ({column}) is "
                        f"{json.dumps(value)[:60]}, not a fraction in [0, 1] or null (undefined); "
                        f"delete results.json to evaluate that run again from its last "
                        f"checkpoint")


def aggregate(sweep: Sweep) -> list[Cell]:
  """Every cell of every table shown: per table, config (in row order) and column; a fold's
  figure is the mean over its finished seeds."""
  cells = []
  sections = sweep.sections()
  several = sweep.several_seeds
  for table in sweep.tables:
    if table.section not in sections:
      continue
    for name in sweep.names:
      paper_row = sweep.paper_rows[name]
      for col in table.columns:
        per_fold = []
        for k in sweep.folds:
          figures = [table.value(sweep.results[(name, k, s)], col) for s in sweep.seeds
                     if (name, k, s) in sweep.results]
          if values := tuple(100.0 * v for v in figures if v is not None):
            per_fold.append(values)
        paper = (table.paper or {}).get(paper_row, {}).get(col, (None, None))
        cells.append(Cell(table.key, name, paper_row, col,
                          tuple(v[0] if len(v) == 1 else float(np.mean(v)) for v in per_fold),
                          len(sweep.folds), *paper, seed_values=tuple(per_fold),
                          n_runs_expected=len(sweep.expected[name]) if several else 0))
  return cells


def format_markdown(sweep: Sweep, cells: list[Cell]) -> str:
  """The tables as Markdown: Tables 1-3 one row per config and one column per stratum;
  each further section (clinical, subtype) one row per config and metric."""
  by_key = {(c.table, c.name, c.column): c for c in cells}
  n = len(sweep.folds)
  shape = sweep.layout
  published = (f" Rows in italics, `paper: <row>`, are {shape.published.DESCRIPTION}, for the row "
               f"of the paper that the config above them reproduces."
               if shape.published is not None else "")
  several = sweep.several_seeds
  folds = f"{n} folds expected per config (folds {', '.join(map(str, sweep.folds))})"
  if several:
    over = ("Mean over folds of each fold's mean over its seeds ± the sample standard deviation "
            "(ddof = 1) of those means over folds; seed-to-seed spread and runs in brackets")
    intro = (f"{folds}, seeds {', '.join(map(str, sweep.seeds))}. A cell `m ± d (seeds s; r/R)`: "
             f"m the mean over folds of each fold's mean over its seeds, d the sample standard "
             f"deviation (ddof = 1) over folds of those per-fold means (fold to fold), s the "
             f"seed-to-seed spread (the mean over folds of the sample standard deviation over a "
             f"fold's seeds), r/R the runs behind the cell out of those expected (a run is "
             f"missing when unfinished or without test images at that {shape.stratum}); `—`: no "
             f"run has the figure; a figure without ± comes from one fold, one without `seeds` "
             f"from one seed per fold.")
  else:
    over = "Mean ± sample standard deviation (ddof = 1) over the finished folds"
    intro = (f"{folds}. `(n/{n})`: only n folds finished (or had test images at that "
             f"{shape.stratum}), the figure is over those; `—`: no fold has the figure; "
             f"a figure without ± comes from one fold.")
  lines = [f"# Results of {sweep.sweep_dir}", "", intro + published, ""]
  label = {name: sweep.label(name) for name in sweep.names}
  for section in sweep.sections():
    tables = [t for t in sweep.tables if t.section == section]
    columns = tables[0].columns
    if section == "paper":
      for table in tables:
        lines += [f"**{table.title}.** {over}.", "", "| Method | " + " | ".join(columns) + " |",
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
    lines += [f"**{tables[0].title}.** {over}; `{ALL}`: every tested {shape.stratum} together.",
              "",
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
        f"{run[0]} fold {run[1]}" + (f" seed {run[2]}" if several else "")
        for run in sweep.unfinished) + ".")
  else:
    total = sum(map(len, sweep.expected.values())) if several else len(sweep.names) * n
    lines.append(f"All {total} runs finished.")
  return "\n".join(lines) + "\n"


def csv_fields(shape: Layout, several_seeds: bool = False) -> tuple[str, ...]:
  """The header of tables.csv: the column field is named as the columns are (BreakHis:
  'magnification'); with several seeds, the seed-to-seed spread and the runs follow."""
  return ("table", "name", "paper_row", shape.stratum, "mean", "std", "n_folds", "n_expected",
          "paper_mean", "paper_std") + (
              ("seed_spread", "n_runs", "n_runs_expected") if several_seeds else ())


def format_csv(cells: list[Cell], shape: Layout) -> str:
  """Long format, one line per cell; an absent figure is an empty field. `mean` and `std` are
  over folds, of each fold's mean over its seeds."""
  several = any(c.n_runs_expected for c in cells)
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(csv_fields(shape, several))
  blank = lambda x: "" if x is None else repr(x)
  for c in cells:
    writer.writerow([c.table, c.name, c.paper_row, c.column, blank(c.mean), blank(c.std),
                     c.n_folds, c.n_expected, blank(c.paper_mean), blank(c.paper_std)] + (
                         [blank(c.seed_spread), c.n_runs, c.n_runs_expected] if several else []))
  return out.getvalue()


def plot(sweep: Sweep, cells: list[Cell], path: str) -> None:
  """Ours (filled, ± sample std) beside the published figures (open), per config and stratum, of
  Tables 1 and 2, as PNG."""
  by_key = {(c.table, c.name, c.column): c for c in cells}
  columns = sweep.layout.columns
  fig = Figure(figsize=(13, 4.8), layout="constrained")
  axes = fig.subplots(1, 2, sharey=True)
  colours = [f"C{i % 10}" for i in range(len(sweep.names))]
  width = 0.8 / max(len(sweep.names), 1)
  for ax, table in zip(axes, sweep.tables[:2], strict=True):
    for i, name in enumerate(sweep.names):
      offset = (i - (len(sweep.names) - 1) / 2) * width
      ours = [by_key[(table.key, name, m)] for m in columns]
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
        ax.errorbar([columns.index(c.column) + offset + width / 5 for c in paper],
                    [c.paper_mean for c in paper], yerr=[c.paper_std for c in paper], fmt="s",
                    mfc="none", color=colours[i], capsize=3,
                    label=f"paper: {sweep.paper_rows[name]}")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_title(table.title.split(":")[0], fontsize=10)
    ax.grid(axis="y", alpha=0.3)
  axes[0].set_ylabel("accuracy (%)")
  published = sweep.layout.published
  over = "the per-fold seed means" if sweep.several_seeds else "the finished folds"
  fig.suptitle(f"{sweep.sweep_dir}: filled, this sweep (mean ± sample std over {over}, n/N "
               f"where folds are missing)"
               + (f"; open, the paper ({published.PAPER})" if published is not None else ""),
               fontsize=9)
  fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=8)
  with files.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=120)
