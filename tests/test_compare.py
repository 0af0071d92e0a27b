"""Tables over folds x seeds and paired comparisons, on hand-made results.json files whose figures
are known: each mean, spread, difference and interval against a computation written here."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil

import numpy as np
import pytest
import scipy.stats

from jattn.cli import tables as tables_cli
from jattn.data.breakhis import published
from jattn.evaluation import compare, report, tables

MAGS = ("40X", "100X", "200X", "400X")
FOLDS = (1, 2, 3, 4, 5)
SEEDS = (0, 1, 2)
LEVELS = {"image": "image_accuracy", "patient": "group_accuracy"}


def _results(name, fold, seed, paper_row, figures, n_train, n_test):
  """A finished schema-2 results.json of BreakHis with the given fractions {key: {mag: value}}."""
  return {"schema": "jattn.results/2", "name": name, "paper_row": paper_row, "fold": fold,
          "finished": True, "source": "breakhis", "classes": ["benign", "malignant"],
          "class_kind": "class", "group_unit": "patient",
          "binary": {"names": ["benign", "malignant"], "positive": "malignant", "of": [0, 1]},
          "strata": {"magnification": {"values": list(MAGS), "selected": list(MAGS)}},
          **figures, "data": {"num_train_images": n_train, "num_test_images": n_test},
          "config": {"seed": seed}}


def _figures(rng, shift=0.0):
  """Accuracies on a grid of 1/200 (so that pairs can tie), around 0.9 + shift."""
  return {key: {m: float(np.clip(np.round((0.9 + shift + rng.normal(0, 0.03)) * 200) / 200, 0, 1))
                for m in MAGS}
          for key in ("image_accuracy", "group_accuracy", "group_recognition_rate")}


def _write_sweep(sweep, rows, seeds=SEEDS, folds=FOLDS, manifest=True, skip=(), seed_of=None):
  """rows: {name: (paper_row, shift)}; every row x fold x seed run, except those in `skip`
  ((name, fold, seed): no results.json). Returns {(name, fold, seed): results}."""
  rng = np.random.default_rng(0)
  runs, entries = {}, []
  for name, (paper_row, shift) in rows.items():
    for seed in seeds:
      for fold in folds:
        workdir = tables.workdir(name, fold, seed)
        entries.append({"name": name, "fold": fold, "seed": seed, "workdir": workdir})
        os.makedirs(sweep / workdir, exist_ok=True)
        if (name, fold, seed) in skip:
          continue
        r = _results(name, fold, (seed_of or {}).get((name, fold, seed), seed), paper_row,
                     _figures(rng, shift), 5000 + 37 * fold, 2100 + 11 * fold)
        runs[(name, fold, seed)] = r
        (sweep / workdir / "results.json").write_text(json.dumps(r))
  if manifest:
    (sweep / "sweep.json").write_text(json.dumps(
        {"names": list(rows), "folds": list(folds), "seeds": list(seeds), "runs": entries}))
  return runs


def _value(r, key, mag):
  return 100 * r[key][mag]


ROWS = {"vgg19": ("VGG19", 0.0), "ours": ("Ours", 0.01), "extra": ("", -0.02)}


def test_cells_over_folds_and_seeds(tmp_path):
  """Each cell: the mean over folds of each fold's seed mean, the fold-to-fold standard deviation
  of those means, the seed-to-seed spread (mean within-fold std over seeds) and the runs."""
  runs = _write_sweep(tmp_path, ROWS, skip={("ours", 2, 1), ("ours", 2, 2), ("extra", 4, 0)})
  del runs[("vgg19", 3, 1)]["group_accuracy"]["400X"]  # no 400X test images in that run
  (tmp_path / "vgg19" / "seed1" / "fold3" / "results.json").write_text(
      json.dumps(runs[("vgg19", 3, 1)]))
  sweep = tables.collect(str(tmp_path))
  assert sweep.several_seeds and sweep.seeds == [0, 1, 2]
  assert sweep.unfinished == [("ours", 2, 1), ("ours", 2, 2), ("extra", 4, 0)]
  cells = {(c.table, c.name, c.column): c for c in tables.aggregate(sweep)}
  checked = 0
  for name in ROWS:
    for key, shown in (("image_accuracy", "image_accuracy"),
                       ("group_accuracy", "patient_accuracy")):
      for mag in MAGS:
        per_fold, stds, n = [], [], 0
        for k in FOLDS:
          v = [_value(runs[(name, k, s)], key, mag) for s in SEEDS if (name, k, s) in runs
               and mag in runs[(name, k, s)][key]]
          n += len(v)
          if v:
            per_fold.append(sum(v) / len(v))
          if len(v) > 1:
            stds.append(np.sqrt(sum((x - np.mean(v)) ** 2 for x in v) / (len(v) - 1)))
        mean = sum(per_fold) / len(per_fold)
        std = np.sqrt(sum((x - mean) ** 2 for x in per_fold) / (len(per_fold) - 1))
        cell = cells[(shown, name, mag)]
        assert cell.mean == pytest.approx(mean, abs=1e-9)
        assert cell.std == pytest.approx(std, abs=1e-9)
        assert cell.seed_spread == pytest.approx(np.mean(stds), abs=1e-9)
        assert (cell.n_runs, cell.n_runs_expected) == (n, 15)
        assert cell.text() == f"{mean:.1f} ± {std:.1f} (seeds {np.mean(stds):.1f}; {n}/15)"
        checked += 1
  assert checked == 3 * 2 * 4
  assert cells[("patient_accuracy", "vgg19", "400X")].n_runs == 14
  assert cells[("image_accuracy", "ours", "40X")].n_runs == 13

  markdown = report.write(str(tmp_path))[0]
  assert "5 folds expected per config (folds 1, 2, 3, 4, 5), seeds 0, 1, 2." in markdown
  assert "s the seed-to-seed spread (the mean over folds of the sample standard deviation" in (
      markdown)
  assert f"| ours | {cells[('image_accuracy', 'ours', '40X')].text()} |" in markdown
  assert "Unfinished runs, counted as missing: ours fold 2 seed 1, ours fold 2 seed 2, extra " \
         "fold 4 seed 0." in markdown
  with open(tmp_path / "tables.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  row = next(r for r in rows if (r["table"], r["name"], r["magnification"]) == (
      "image_accuracy", "ours", "40X"))
  cell = cells[("image_accuracy", "ours", "40X")]
  assert (float(row["mean"]), float(row["std"]), float(row["seed_spread"])) == (
      cell.mean, cell.std, cell.seed_spread)
  assert (row["n_runs"], row["n_runs_expected"], row["n_folds"]) == ("13", "15", "5")

  # Without sweep.json the seeds come from the folders: the same cells.
  (tmp_path / "sweep.json").unlink()
  again = tables.collect(str(tmp_path))
  assert (again.names, again.folds, again.seeds) == (sorted(ROWS), list(FOLDS), [0, 1, 2])
  assert {(c.table, c.name, c.column): c.text() for c in tables.aggregate(again)} == {
      k: c.text() for k, c in cells.items()}


def _nadeau_bengio(a_runs, b_runs, key, mag):
  """The corrected resampled t interval, written out: per-fold means over seeds of the paired
  differences, variance (1/J + n_test/n_train) s^2, t with J - 1 degrees of freedom."""
  diffs = {}
  for (k, s), r in a_runs.items():
    diffs.setdefault(k, []).append(100 * r[key][mag] - 100 * b_runs[(k, s)][key][mag])
  d = np.array([np.mean(diffs[k]) for k in sorted(diffs)])
  ratios = [r["data"]["num_test_images"] / r["data"]["num_train_images"]
            for r in (*a_runs.values(), *b_runs.values())]
  j, rho = len(d), np.mean(ratios)
  s2 = np.sum((d - d.mean()) ** 2) / (j - 1)
  half = scipy.stats.t.ppf(0.975, j - 1) * np.sqrt((1 / j + rho) * s2)
  every = [x for v in diffs.values() for x in v]
  return d.mean(), d.mean() - half, d.mean() + half, sum(x > 0 for x in every), \
      sum(x == 0 for x in every), len(every)


def test_paired_differences_and_their_corrected_interval(tmp_path, capsys):
  runs = _write_sweep(tmp_path / "sweep", ROWS)
  sweep_dir = tmp_path / "sweep"
  of = lambda name: {(k, s): r for (n, k, s), r in runs.items() if n == name}
  tables_cli.main([str(sweep_dir)])  # the default pairs: each row against the paper's VGG19 row
  printed = capsys.readouterr().out
  md = (sweep_dir / "compare.md").read_text()
  assert md in printed and "Table C1. ours − vgg19" in md and "Table C2. extra − vgg19" in md
  assert "Nadeau and Bengio (2003)" in md
  with open(sweep_dir / "compare.csv", newline="") as f:
    found = {(r["first"], r["second"], r["level"], r["magnification"]): r
             for r in csv.DictReader(f) if r["kind"] == "difference"}
  assert len(found) == 2 * 2 * 4
  ties = 0
  for first in ("ours", "extra"):
    for level, key in LEVELS.items():
      for mag in MAGS:
        mean, low, high, wins, tie, n = _nadeau_bengio(of(first), of("vgg19"), key, mag)
        row = found[(first, "vgg19", level, mag)]
        assert float(row["mean"]) == pytest.approx(mean, abs=1e-9)
        assert float(row["low"]) == pytest.approx(low, abs=1e-9)
        assert float(row["high"]) == pytest.approx(high, abs=1e-9)
        assert (int(row["wins"]), int(row["ties"]), int(row["n_pairs"])) == (wins, tie, n)
        assert n == 15 and row["n_folds"] == "5"
        text = f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]"
        text = f"**{text}**" if low > 0 or high < 0 else text
        assert f"{text}, wins {wins}/15" in md
        ties += tie
  assert ties > 0  # the figures on a grid do tie: they count as neither win nor loss

  # Asked for by name, and a row of another sweep folder, give the same figures.
  other = tmp_path / "other"
  shutil.copytree(sweep_dir / "vgg19", other / "base")
  tables_cli.main([str(sweep_dir), "--compare", f"ours:{other}/base", "--compare", "ours:extra"])
  with open(sweep_dir / "compare.csv", newline="") as f:
    again = [r for r in csv.DictReader(f) if r["kind"] == "difference"]
  assert {r["second"] for r in again} == {f"{other}/base", "extra"}
  for r in again:
    if r["second"] != "extra":
      want = found[("ours", "vgg19", r["level"], r["magnification"])]
      assert (r["mean"], r["low"], r["high"], r["wins"]) == (
          want["mean"], want["low"], want["high"], want["wins"])
    else:
      mean, low, high, *_ = _nadeau_bengio(of("ours"), of("extra"), LEVELS[r["level"]],
                                           r["magnification"])
      assert float(r["low"]) == pytest.approx(low, abs=1e-9)


def test_published_figures_are_marked_inside_or_outside_our_interval(tmp_path):
  """Ours sits well above the paper at 40X and on it at 200X: the marks must say so, against
  the corrected t interval of the mean over folds (of the per-fold seed means)."""
  runs = _write_sweep(tmp_path, {"vgg19": ("VGG19", 0.0), "ours": ("Ours", 0.0)})
  for (name, k, s), r in runs.items():
    if name == "ours":
      r["image_accuracy"]["40X"] = 0.99 - 0.002 * k  # far above the paper's 91.4
      r["image_accuracy"]["200X"] = 0.934 + 0.01 * (k - 3) + 0.001 * s  # around its 93.4
      (tmp_path / tables.workdir(name, k, s) / "results.json").write_text(json.dumps(r))
  report.write(str(tmp_path))[0]
  with open(tmp_path / "compare.csv", newline="") as f:
    marks = {(r["first"], r["level"], r["magnification"]): r for r in csv.DictReader(f)
             if r["kind"] == "paper"}
  assert {name for name, _, _ in marks} == {"vgg19", "ours"}
  seen = set()
  for (name, level, mag), row in marks.items():
    key, paper = LEVELS[level], published.FIGURES[LEVELS[level]]
    row_runs = {(k, s): r for (n, k, s), r in runs.items() if n == name}
    per_fold = np.array([np.mean([100 * row_runs[(k, s)][key][mag] for s in SEEDS])
                         for k in FOLDS])
    rho = np.mean([r["data"]["num_test_images"] / r["data"]["num_train_images"]
                   for r in row_runs.values()])
    half = scipy.stats.t.ppf(0.975, 4) * np.sqrt((1 / 5 + rho) * per_fold.var(ddof=1))
    low, high = per_fold.mean() - half, per_fold.mean() + half
    figure = paper[row["second"]][mag][0]
    assert row["second"] == ("Ours" if name == "ours" else "VGG19")
    assert float(row["paper_mean"]) == figure
    assert float(row["low"]) == pytest.approx(low) and float(row["high"]) == pytest.approx(high)
    assert row["inside"] == ("true" if low <= figure <= high else "false")
    seen.add(row["inside"])
  assert marks[("ours", "image", "40X")]["inside"] == "false"
  assert marks[("ours", "image", "200X")]["inside"] == "true"
  assert seen == {"true", "false"}
  md = (tmp_path / "compare.md").read_text()
  line = next(x for x in md.splitlines() if x.startswith("| ours |"))
  assert "**outside**" in line.split("|")[2] and "inside" in line.split("|")[4]


@pytest.mark.parametrize(("skip", "seeds", "message"), [
    ({("ours", 3, 1)}, SEEDS, r"ours has no finished run of fold 3 \(seed 1\), which vgg19 has"),
    ({("vgg19", k, 2) for k in (1, 2)} | {("ours", 5, 0)}, SEEDS,
     r"vgg19 has no finished run of folds 1, 2 \(seed 2\), which ours has; ours has no finished "
     r"run of fold 5 \(seed 0\), which vgg19 has"),
])
def test_runs_that_do_not_pair_up_are_one_line(tmp_path, capsys, skip, seeds, message):
  _write_sweep(tmp_path, {"vgg19": ("VGG19", 0.0), "ours": ("Ours", 0.0)}, seeds=seeds, skip=skip)
  with pytest.raises(SystemExit) as e:
    tables_cli.main([str(tmp_path), "--compare", "ours:vgg19"])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count("\n") == 1, err
  assert err.startswith("jattn tables: error: --compare ours:vgg19: the runs do not pair up")
  assert re.search(message, err), err
  assert not (tmp_path / "tables.md").exists() and not (tmp_path / "compare.md").exists()
  tables_cli.main([str(tmp_path)])  # the default pair is left out, and says why
  assert "Not compared: ours − vgg19: " in (tmp_path / "compare.md").read_text()


@pytest.mark.parametrize(("spec", "message"), [
    ("ours", r"--compare 'ours': give two rows as FIRST:SECOND"),
    ("ours:ours", r"compares ours with itself"),
    ("ours:vgg", r"no row 'vgg' in .*; its rows are vgg19, ours"),
])
def test_a_bad_compare_spec_is_one_line(tmp_path, capsys, spec, message):
  _write_sweep(tmp_path, {"vgg19": ("VGG19", 0.0), "ours": ("Ours", 0.0)}, seeds=(0,),
               folds=(1, 2))
  with pytest.raises(SystemExit) as e:
    tables_cli.main([str(tmp_path), "--compare", spec])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count("\n") == 1 and re.search(message, err)


def test_a_run_of_another_seed_in_a_seed_folder_is_refused(tmp_path):
  _write_sweep(tmp_path, {"ours": ("Ours", 0.0)}, seeds=(0, 1), folds=(1, 2),
               seed_of={("ours", 2, 1): 0})
  with pytest.raises(tables.UserError, match=r"seed1/fold2/results.json: a run of seed 0, but "
                                             r"the sweep expects seed 1 there"):
    tables.collect(str(tmp_path))


def test_corrected_interval_is_wider_than_the_naive_t_interval():
  """Nadeau and Bengio's correction against the textbook t interval (ratio 0): same centre,
  half-width scaled by sqrt((1/J + ratio) / (1/J))."""
  values = [1.0, 3.0, 2.0, 5.0, 4.0]
  naive = scipy.stats.t.interval(0.95, 4, loc=np.mean(values), scale=scipy.stats.sem(values))
  assert compare.corrected_interval(values, 0.0)[1:] == pytest.approx(naive)
  mean, low, high = compare.corrected_interval(values, 3 / 7)
  assert mean == 3.0 and (high - mean) == pytest.approx(
      (naive[1] - 3.0) * np.sqrt((1 / 5 + 3 / 7) / (1 / 5)))
  assert compare.corrected_interval([2.0], 0.4) == (2.0, None, None)
  assert compare.corrected_interval(values, None) == (3.0, None, None)


def _constant_shift_sweep(sweep, folds, shift):
  """Two rows whose every figure differs by exactly `shift` (a fraction) on every fold and seed."""
  runs = _write_sweep(sweep, {"vgg19": ("VGG19", 0.0), "ours": ("Ours", 0.0)}, seeds=(0,),
                      folds=folds)
  for (name, k, s), r in runs.items():
    if name == "ours":
      base = runs[("vgg19", k, s)]
      for key in ("image_accuracy", "group_accuracy", "group_recognition_rate"):
        r[key] = {m: base[key][m] + shift for m in MAGS}
      (sweep / tables.workdir(name, k, s) / "results.json").write_text(json.dumps(r))
  return runs


@pytest.mark.parametrize("folds,reason", [((1, 2), "2 folds"),
                                          ((1, 2, 3), "identical per-fold values")])
def test_no_interval_is_claimed_from_two_folds_or_identical_differences(tmp_path, folds, reason):
  """-4 points on every fold: at 2 folds (t with 1 degree of freedom) or with zero variance of
  the differences the cell says why no interval is given, and is never bold; the CSV leaves low
  and high empty."""
  _constant_shift_sweep(tmp_path, folds, -0.04)
  tables_cli.main([str(tmp_path)])
  md = (tmp_path / "compare.md").read_text()
  rows = [line for line in md.splitlines() if line.startswith(("| image |", "| patient |"))]
  assert len(rows) == 2
  n = len(folds)
  for line in rows:
    cells = [c.strip() for c in line.strip("|").split("|")][1:]
    assert cells == [f"-4.0 (no interval: {reason}), wins 0/{n}"] * 4
    assert "**" not in line and "[" not in line
  with open(tmp_path / "compare.csv", newline="") as f:
    diffs = [r for r in csv.DictReader(f) if r["kind"] == "difference"]
  assert len(diffs) == 8
  assert all(float(r["mean"]) == pytest.approx(-4.0) and r["low"] == r["high"] == ""
             for r in diffs)


def test_three_folds_of_different_differences_get_their_interval():
  """The boundary: 3 folds whose differences differ get the corrected t interval (by hand)."""
  d = compare.Difference("a", "b", "image", "40X", ((1, 0, -4.0), (2, 0, -3.0), (3, 0, -5.0)),
                         0.5)
  half = scipy.stats.t.ppf(0.975, 2) * np.sqrt((1 / 3 + 0.5) * 1.0)  # s^2 of -4, -3, -5 is 1
  assert d.text() == f"**-4.0 [{-4 - half:+.1f}, {-4 + half:+.1f}]**, wins 0/3"
  assert compare.no_interval([1.0, 2.0], 0.5) == "2 folds"
  assert compare.no_interval([1.0, 2.0, 3.0], None) == "image counts not recorded"


def test_a_folds_difference_is_the_mean_over_its_seeds():
  """Three folds of two seeds each: the interval is over the per-fold means (3, 0, 1), by hand,
  not over the first seed's or every pair's; wins count the pairs above zero. Two folds give a
  mean and no interval."""
  pairs = ((1, 0, 2.0), (1, 1, 4.0), (2, 0, -1.0), (2, 1, 1.0), (3, 0, 0.0), (3, 1, 2.0))
  d = compare.Difference("a", "b", "image", "40X", pairs, 0.25)
  assert d.per_fold == (3.0, 0.0, 1.0)
  var = ((3 - 4 / 3) ** 2 + (0 - 4 / 3) ** 2 + (1 - 4 / 3) ** 2) / 2
  half = 4.302652729911275 * np.sqrt((1 / 3 + 0.25) * var)  # t(0.975, 2 df)
  assert d.interval() == pytest.approx((4 / 3, 4 / 3 - half, 4 / 3 + half))
  assert (d.wins, d.ties) == (4, 1)
  two = compare.Difference("a", "b", "image", "40X", pairs[:4], 0.25)
  assert two.per_fold == (3.0, 0.0) and two.interval()[0] == pytest.approx(1.5)
  assert two.interval()[1:] == (None, None)
