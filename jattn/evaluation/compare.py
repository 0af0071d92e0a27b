"""Can one row beat another? Paired differences over folds x seeds, and our cells against the
published figures.

  jattn tables SWEEP --compare ours:vgg19 [--compare A:B ...]

Two sets of runs (two rows of a sweep, or `DIR/ROW`, a row of another sweep folder of the same
data source) pair up run by run: the same fold and the same seed. Per stratum (column) and level
(image, group) the comparison gives the mean paired difference (first − second, percentage
points), its 95% interval and the fraction of pairs in which the first row is higher. Sets whose
finished runs are not the same folds and seeds are refused by name.

The interval is the corrected resampled t of Nadeau and Bengio (2003, "Inference for the
generalization error"): the folds' training sets overlap, so their differences are correlated and
the naive t interval is too narrow. Over the J folds, with d_j the fold's difference (the mean
over its seeds: a fold's seeds share its training and test images, they are not further
resamples of the data) and s² their sample variance (ddof = 1), the interval is
mean ± t(0.975, J − 1) · sqrt((1/J + n_test/n_train) · s²), n_test/n_train the ratio of test to
training images of the folds (results.json's `data`, mean over the runs). A bootstrap over folds
would resample 5 values and ignore the same overlap. The same interval, over a row's per-fold
means, is the one within which the tables look for the published figure.

`--metric` chooses the figure compared: `accuracy` (image and group accuracy, Tables 1 and 2;
the default), or `ece` or `brier` (the calibration block's, Tables 7 and 8), for which lower is
better, so that a win is a pair in which the first row's figure is lower.

Without `--compare`, each row is compared with the baseline row of its setting: the row that
reproduces the data source's published baseline (`published.BASELINE`; BreakHis: the paper's VGG19).
Writes SWEEP/compare.md and SWEEP/compare.csv (`jattn.evaluation.tables` calls `compute` and
`write`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from collections.abc import Iterable

import numpy as np
import scipy.stats

from jattn.core import files
from jattn.core.errors import UserError
from jattn.evaluation import tables

LEVEL = 0.95  # of every interval
METRICS = ("accuracy", "ece", "brier")  # what --metric compares; ece and brier: lower is better


def test_over_train(runs: Iterable[dict]) -> float | None:
  """The mean ratio of test to training images over the runs that record both (results.json's
  `data`); None if none does (results written before jattn recorded them)."""
  ratios = []
  for r in runs:
    data = r.get("data") if isinstance(r.get("data"), dict) else {}
    n_train, n_test = data.get("num_train_images"), data.get("num_test_images")
    if tables._is_number(n_train) and tables._is_number(n_test) and n_train > 0:
      ratios.append(n_test / n_train)
  return float(np.mean(ratios)) if ratios else None


MIN_FOLDS = 3  # an interval over fewer folds (t with one degree of freedom) is not given
IDENTICAL = 1e-9  # per-fold values closer than this (points) are equal: float noise of 100 * a


def no_interval(values, ratio: float | None) -> str | None:
  """Why the per-fold `values` get no interval (None when they get one): fewer than `MIN_FOLDS`
  folds, per-fold values all equal (zero variance: a zero-width interval claims a certainty the
  folds cannot give), or runs that do not record their numbers of images."""
  values = np.asarray(values, np.float64)
  if len(values) < MIN_FOLDS:
    return f"{len(values)} fold{'s' if len(values) != 1 else ''}"
  if np.ptp(values) <= IDENTICAL:
    return "identical per-fold values"
  if ratio is None:
    return "image counts not recorded"
  return None


def corrected_interval(values, ratio: float | None, level: float = LEVEL
                       ) -> tuple[float, float | None, float | None]:
  """The mean of J per-fold values and its interval by Nadeau and Bengio's corrected resampled t,
  mean ± t((1 + level)/2, J − 1) · sqrt((1/J + ratio) · s²); no interval (low and high None)
  where `no_interval` gives a reason."""
  values = np.asarray(values, np.float64)
  mean = float(values.mean())
  if no_interval(values, ratio) is not None:
    return mean, None, None
  half = float(scipy.stats.t.ppf((1 + level) / 2, len(values) - 1)) * math.sqrt(
      (1 / len(values) + ratio) * float(np.var(values, ddof=1)))
  return mean, mean - half, mean + half


@dataclasses.dataclass(frozen=True)
class RunSet:
  """A set of runs to compare: a row of a sweep, by (fold, seed)."""

  label: str
  runs: dict[tuple[int, int], dict]
  layout: tables.Layout


def of_row(sweep: tables.Sweep, name: str, label: str | None = None) -> RunSet:
  return RunSet(label or name, sweep.runs_of(name), sweep.layout)


@dataclasses.dataclass(frozen=True)
class Difference:
  """One comparison at one level and column: the paired differences and what they say."""

  first: str
  second: str
  level: str  # 'image', or the group unit ('patient')
  column: str
  pairs: tuple[tuple[int, int, float], ...]  # (fold, seed, first − second in percentage points)
  ratio: float | None  # test/training images of the folds
  lower_is_better: bool = False  # a win is a lower figure (ECE, Brier)

  @property
  def per_fold(self) -> tuple[float, ...]:
    """Each fold's difference, the mean over its seeds, in fold order."""
    folds = sorted({k for k, _, _ in self.pairs})
    return tuple(float(np.mean([d for k, _, d in self.pairs if k == fold])) for fold in folds)

  @property
  def wins(self) -> int:
    return sum((d < 0) if self.lower_is_better else (d > 0) for _, _, d in self.pairs)

  @property
  def ties(self) -> int:
    return sum(d == 0 for _, _, d in self.pairs)

  def interval(self) -> tuple[float | None, float | None, float | None]:
    return corrected_interval(self.per_fold, self.ratio) if self.pairs else (None, None, None)

  def text(self) -> str:
    mean, low, high = self.interval()
    if mean is None:
      return "—"
    if low is None:
      out = f"{mean:+.1f} (no interval: {no_interval(self.per_fold, self.ratio)})"
    else:
      out = f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]"
    if low is not None and (low > 0 or high < 0):
      out = f"**{out}**"
    ties = f", ties {self.ties}" if self.ties else ""
    return f"{out}, wins {self.wins}/{len(self.pairs)}{ties}"


def _levels(layout: tables.Layout, metric: str = "accuracy") -> list[tuple[str, tables.Table]]:
  """The levels compared: image and group accuracy (Tables 1 and 2), or the calibration figure
  `metric` (`ece`, `brier`) at both levels."""
  if metric == "accuracy":
    image, group = layout.tables()[:2]
  else:
    by_key = {t.key: t for t in layout.tables()}
    image, group = (by_key[f"calibration.{level}.{metric}"] for level in ("image", layout.unit))
  return [("image", image), (layout.unit, group)]


def _runs_text(runs) -> str:
  by_seed: dict[int, list[int]] = {}
  for fold, seed in sorted(runs, key=lambda r: (r[1], r[0])):
    by_seed.setdefault(seed, []).append(fold)
  return ", ".join(f"fold{'s' if len(f) > 1 else ''} {', '.join(map(str, f))} (seed {s})"
                   for s, f in by_seed.items())


def mismatch(a: RunSet, b: RunSet) -> str | None:
  """What keeps two sets of runs from pairing up (runs of one without the other's fold and seed),
  or None."""
  if not a.runs or not b.runs:
    return " and ".join(f"{x.label} has no finished run" for x in (a, b) if not x.runs)
  parts = [f"{y.label} has no finished run of {_runs_text(set(x.runs) - set(y.runs))}, which "
           f"{x.label} has" for x, y in ((a, b), (b, a)) if set(x.runs) - set(y.runs)]
  return "; ".join(parts) or None


def differences(a: RunSet, b: RunSet, metric: str = "accuracy") -> list[Difference]:
  """Per level and column, the paired differences a − b of `metric` (runs that pair up, see
  `mismatch`)."""
  ratio = test_over_train([*a.runs.values(), *b.runs.values()])
  out = []
  for level, table in _levels(a.layout, metric):
    for column in a.layout.columns:
      pairs = []
      for key in sorted(a.runs):
        x, y = table.value(a.runs[key], column), table.value(b.runs[key], column)
        if x is not None and y is not None:
          pairs.append((*key, 100.0 * x - 100.0 * y))
      out.append(Difference(a.label, b.label, level, column, tuple(pairs), ratio,
                            metric != "accuracy"))
  return out


@dataclasses.dataclass(frozen=True)
class Mark:
  """One of our cells against the published figure: whether it lies inside our interval."""

  name: str
  paper_row: str
  level: str
  column: str
  values: tuple[float, ...]  # percent, per finished fold (its mean over seeds)
  ratio: float | None
  paper_mean: float

  def interval(self) -> tuple[float | None, float | None, float | None]:
    return corrected_interval(self.values, self.ratio) if self.values else (None, None, None)

  @property
  def inside(self) -> bool | None:
    _, low, high = self.interval()
    return None if low is None else bool(low <= self.paper_mean <= high)

  def text(self) -> str:
    mean, low, high = self.interval()
    if mean is None:
      return "—"
    if low is None:
      return f"{mean:.1f} (no interval: {no_interval(self.values, self.ratio)})"
    return f"{mean:.1f} [{low:.1f}, {high:.1f}] {'inside' if self.inside else '**outside**'}"


def marks(sweep: tables.Sweep) -> list[Mark]:
  """Every cell of Tables 1 and 2 beside which the tables show a published figure."""
  cells = {(c.table, c.name, c.column): c for c in tables.aggregate(sweep)}
  out = []
  for level, table in _levels(sweep.layout):
    for name in sweep.names:
      paper = (table.paper or {}).get(sweep.paper_rows[name])
      if not paper:
        continue
      ratio = test_over_train(sweep.runs_of(name).values())
      for column in sweep.layout.columns:
        if column in paper:
          out.append(Mark(name, sweep.paper_rows[name], level, column,
                          cells[(table.key, name, column)].values, ratio, paper[column][0]))
  return out


def default_pairs(sweep: tables.Sweep) -> tuple[list[tuple[RunSet, RunSet]], list[str]]:
  """Each row against the row of its setting that reproduces the source's published baseline,
  and the pairs left out (runs that do not pair up), one line each."""
  baseline = getattr(sweep.layout.published, "BASELINE", None)
  pairs, skipped = [], []
  if baseline is None:
    return pairs, skipped
  for name in sweep.names:
    if sweep.reproduces[name] == baseline:
      continue
    base = next((b for b in sweep.names if sweep.reproduces[b] == baseline
                 and sweep.settings[b] == sweep.settings[name]), None)
    if base is None:
      continue
    a, b = of_row(sweep, name), of_row(sweep, base)
    why = mismatch(a, b)
    if why:
      skipped.append(f"{name} − {base}: {why}")
    else:
      pairs.append((a, b))
  return pairs, skipped


def _run_set(sweep: tables.Sweep, side: str, spec: str) -> RunSet:
  if side in sweep.names:
    return of_row(sweep, side)
  folder, name = os.path.split(side.rstrip("/"))
  if not folder:
    raise UserError(f"--compare {spec}: no row {side!r} in {sweep.sweep_dir}; its rows are "
                    f"{', '.join(sweep.names)} (or give DIR/ROW, a row of another sweep folder)")
  other = tables.collect(folder)
  if name not in other.names:
    raise UserError(f"--compare {spec}: no row {name!r} in {folder}; its rows are "
                    f"{', '.join(other.names)}")
  if (other.layout.columns, other.layout.unit) != (sweep.layout.columns, sweep.layout.unit):
    raise UserError(f"--compare {spec}: {folder}'s runs report {', '.join(other.layout.columns)} "
                    f"by {other.layout.unit}, those of {sweep.sweep_dir} "
                    f"{', '.join(sweep.layout.columns)} by {sweep.layout.unit}; compare runs of "
                    f"one data source")
  return RunSet(side, other.runs_of(name), sweep.layout)


def requested_pairs(sweep: tables.Sweep, specs: list[str]) -> list[tuple[RunSet, RunSet]]:
  """The pairs of `--compare FIRST:SECOND` options; a spec that names no row, or runs that do not
  pair up, is one line of error."""
  pairs = []
  for spec in specs:
    sides = spec.split(":")
    if len(sides) != 2 or not all(sides):
      raise UserError(f"--compare {spec!r}: give two rows as FIRST:SECOND, e.g. ours:vgg19")
    if sides[0] == sides[1]:
      raise UserError(f"--compare {spec}: compares {sides[0]} with itself; give two rows")
    a, b = (_run_set(sweep, side, spec) for side in sides)
    why = mismatch(a, b)
    if why:
      raise UserError(f"--compare {spec}: the runs do not pair up (same fold, same seed): {why}; "
                      f"compare sets of runs of the same folds and seeds")
    pairs.append((a, b))
  return pairs


@dataclasses.dataclass(frozen=True)
class Comparisons:
  """What compare.md and compare.csv hold."""

  sweep: tables.Sweep
  differences: list[list[Difference]]  # per pair
  marks: list[Mark]
  skipped: list[str]  # default pairs left out, and why
  requested: bool  # --compare given (else the default pairs)
  metric: str = "accuracy"  # the figure compared (METRICS)


def compute(sweep: tables.Sweep, specs: list[str] | None = None,
            metric: str = "accuracy") -> Comparisons:
  """The comparisons of `metric` (METRICS) asked for (`specs`, FIRST:SECOND), else the default
  ones; raises `UserError` before anything is written."""
  if metric not in METRICS:
    raise UserError(f"--metric {metric!r}: use one of {', '.join(METRICS)}")
  if specs:
    pairs, skipped = requested_pairs(sweep, specs), []
  else:
    pairs, skipped = default_pairs(sweep)
  return Comparisons(sweep, [differences(a, b, metric) for a, b in pairs], marks(sweep), skipped,
                     bool(specs), metric)


def format_markdown(c: Comparisons) -> str:
  shape, sweep = c.sweep.layout, c.sweep
  lines = [f"# Paired comparisons in {sweep.sweep_dir}", "",
           f"Each comparison pairs the runs of two rows on the same fold and seed. Per "
           f"{shape.stratum} and level: the mean paired difference (first − second, percentage "
           f"points), its {LEVEL:.0%} interval, and `wins n/N`, the pairs in which the first row's "
           f"figure is higher (ties: equal). The interval is the corrected resampled t-test of "
           f"Nadeau and Bengio (2003), because the folds share training images, which correlates "
           f"their differences: each fold's difference is the mean over its seeds (which share "
           f"its training and test images), and over the J folds, mean ± t(0.975, J − 1) · "
           f"sqrt((1/J + n_test/n_train) · s²), s² the sample variance of the per-fold "
           f"differences and n_test/n_train the folds' ratio of test to training images "
           f"(results.json's `data`; `ratio` below). Bold: an interval that excludes 0. No "
           f"interval is given (and nothing is bold) below {MIN_FOLDS} folds, where the per-fold "
           f"differences are all equal (zero variance), or for runs that do not record their "
           f"numbers of images; the reason is said in the cell.", ""]
  if c.metric != "accuracy":
    lines += [f"Compared: {tables.CALIBRATION_METRICS[c.metric]} (x 100) of the calibration "
              f"block (image level, and the {shape.unit} level of a {shape.unit}'s mean "
              f"probabilities); lower is better, so `wins` counts the pairs in which the first "
              f"row's figure is lower.", ""]
  if not c.differences:
    lines += ["No comparison: " + ("none asked for" if c.requested else
                                    "no row has a baseline row of its setting to compare with"
                                    if not c.skipped else "no default pair has matching runs")
              + ". Ask with `--compare FIRST:SECOND`.", ""]
  for number, diffs in enumerate(c.differences, 1):
    first, second = diffs[0].first, diffs[0].second
    pairs = {(k, s) for d in diffs for k, s, _ in d.pairs}
    ratio = diffs[0].ratio
    lines += [f"**Table C{number}. {first} − {second} (percentage points).** "
              f"{len(pairs)} pairs (folds {', '.join(map(str, sorted({k for k, _ in pairs})))}; "
              f"seeds {', '.join(map(str, sorted({s for _, s in pairs})))}); ratio "
              + ("unknown" if ratio is None else f"{ratio:.3f}") + ".", "",
              "| Level | " + " | ".join(shape.columns) + " |",
              "|---|" + "---|" * len(shape.columns)]
    for level in dict.fromkeys(d.level for d in diffs):
      lines.append(f"| {level} | " + " | ".join(d.text() for d in diffs if d.level == level)
                   + " |")
    lines.append("")
  if c.skipped:
    lines += ["Not compared: " + "; ".join(c.skipped) + ".", ""]
  if c.marks:
    published = shape.published
    lines += [f"Our cells against {published.DESCRIPTION}: the mean over folds (of each fold's "
              f"mean over its seeds) and its {LEVEL:.0%} interval by the same corrected t "
              f"(n_test/n_train of the row's runs); `inside`/`outside`: whether the published "
              f"mean lies in it. The published figure has its own uncertainty (its ± is the "
              f"standard deviation over the paper's folds), which our interval does not include. "
              f"A cell without an interval says why (fewer than {MIN_FOLDS} folds, identical "
              f"per-fold values, or runs that do not record their numbers of images).", ""]
    for level, table in _levels(shape):
      rows = [m for m in c.marks if m.level == level]
      if not rows:
        continue
      lines += [f"**{table.title.split(':')[0]}, against {published.PAPER}.**", "",
                "| Method | " + " | ".join(shape.columns) + " |",
                "|---|" + "---|" * len(shape.columns)]
      for name in dict.fromkeys(m.name for m in rows):
        mine = {m.column: m for m in rows if m.name == name}
        lines.append(f"| {sweep.label(name)} | " + " | ".join(
            mine[col].text() if col in mine else "—" for col in shape.columns) + " |")
        paper = table.paper[sweep.paper_rows[name]]
        lines.append(f"| *paper: {sweep.paper_rows[name]}* | " + " | ".join(
            f"*{paper[col][0]:.1f} ± {paper[col][1]:.1f}*" if col in paper else "—"
            for col in shape.columns) + " |")
      lines.append("")
  return "\n".join(lines).rstrip("\n") + "\n"


def csv_fields(shape: tables.Layout) -> tuple[str, ...]:
  return ("kind", "first", "second", "level", shape.stratum, "n_pairs", "n_folds", "mean", "low",
          "high", "wins", "ties", "ratio", "paper_mean", "inside")


def format_csv(c: Comparisons) -> str:
  """One line per difference (kind `difference`: first − second; `difference:ece` or
  `difference:brier` with another metric) and per cell against the published figure (kind
  `paper`: first the row, second its published row, mean/low/high ours)."""
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(csv_fields(c.sweep.layout))
  blank = lambda x: "" if x is None else repr(x)
  kind = "difference" if c.metric == "accuracy" else f"difference:{c.metric}"
  for diffs in c.differences:
    for d in diffs:
      writer.writerow([kind, d.first, d.second, d.level, d.column, len(d.pairs),
                       len(d.per_fold), *map(blank, d.interval()), d.wins, d.ties, blank(d.ratio),
                       "", ""])
  for m in c.marks:
    writer.writerow(["paper", m.name, m.paper_row, m.level, m.column, "", len(m.values),
                     *map(blank, m.interval()), "", "", blank(m.ratio), repr(m.paper_mean),
                     "" if m.inside is None else str(m.inside).lower()])
  return out.getvalue()


def write(c: Comparisons) -> str:
  """Writes compare.md and compare.csv into the sweep folder; returns the Markdown."""
  markdown = format_markdown(c)
  files.atomic_write_text(os.path.join(c.sweep.sweep_dir, "compare.md"), markdown)
  files.atomic_write_text(os.path.join(c.sweep.sweep_dir, "compare.csv"), format_csv(c))
  return markdown
