"""The sweep tables on hand-made results.json files: figures, missing folds, layout and files."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from jattn.cli import tables as tables_cli
from jattn.core.errors import UserError
from jattn.data.breakhis import published
from jattn.evaluation import report, tables

MAGS = ("40X", "100X", "200X", "400X")
KEYS = ("image_accuracy", "patient_accuracy", "patient_recognition_rate")


def _results(name, fold, paper_row, rng, finished=True):
  """A results.json as jattn.training.train writes it, with random fractions."""
  return {"schema": "jattn.results/1", "name": name, "paper_row": paper_row, "fold": fold,
          "finished": finished,
          **{key: {m: float(rng.uniform(0.8, 1.0)) for m in MAGS} for key in KEYS},
          "num_images": dict.fromkeys(MAGS, 600), "num_patients": dict.fromkeys(MAGS, 25)}


def _write(sweep, name, fold, results):
  os.makedirs(sweep / name / f"fold{fold}", exist_ok=True)
  if results is not None:
    (sweep / name / f"fold{fold}" / "results.json").write_text(json.dumps(results))


def _manifest(sweep, names, folds):
  runs = [{"name": n, "fold": k, "workdir": f"{n}/fold{k}"} for n in names for k in folds]
  (sweep / "sweep.json").write_text(json.dumps({"names": names, "folds": folds, "runs": runs}))


def _cells(sweep_dir):
  return {(c.table, c.name, c.column): c
          for c in tables.aggregate(tables.collect(str(sweep_dir)))}


def _table_rows(markdown, number):
  """The header and body lines of Table `number` in the Markdown."""
  lines = markdown.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(f"**Table {number}."))
  body = []
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    body.append(line)
  return body[0], body[2:]


def _cols(line):
  return [c.strip() for c in line.strip("|").split("|")]


@pytest.fixture
def full_sweep(tmp_path):
  """Two paper rows and one extra config, five folds each, all finished; manifest order."""
  rng = np.random.default_rng(0)
  names = {"vgg19_c": "VGG19 + C", "ours": "Ours", "extra": ""}
  runs = {}
  for name, row in names.items():
    for fold in range(1, 6):
      runs[(name, fold)] = _results(name, fold, row, rng)
      _write(tmp_path, name, fold, runs[(name, fold)])
  _manifest(tmp_path, list(names), [1, 2, 3, 4, 5])
  return tmp_path, runs


def test_means_and_sample_stds(full_sweep):
  sweep, runs = full_sweep
  cells = _cells(sweep)
  assert len(cells) == len(KEYS) * 3 * len(MAGS)
  for (key, name, mag), cell in cells.items():
    values = 100 * np.array([runs[(name, k)][key][mag] for k in range(1, 6)])
    assert cell.mean == pytest.approx(values.mean(), abs=1e-12)
    assert cell.std == pytest.approx(np.sqrt(np.sum((values - values.mean()) ** 2) / 4), abs=1e-12)
    assert (cell.n_folds, cell.n_expected) == (5, 5)
    assert cell.text() == f"{values.mean():.1f} ± {values.std(ddof=1):.1f}"


def test_missing_and_unfinished_folds_are_shown_not_averaged(tmp_path):
  rng = np.random.default_rng(1)
  runs = {k: _results("vgg19", k, "VGG19", rng) for k in (1, 2, 3, 4)}
  runs[4]["finished"] = False  # stopped before the end
  for k, r in runs.items():
    _write(tmp_path, "vgg19", k, r)
  _write(tmp_path, "vgg19", 5, None)  # started, no results.json yet
  _write(tmp_path, "ours", 2, _results("ours", 2, "Ours", rng))
  del runs[1]["patient_accuracy"]["400X"]  # no 400X images in that fold's test set
  _write(tmp_path, "vgg19", 1, runs[1])
  _manifest(tmp_path, ["vgg19", "vgg19_s", "ours"], [1, 2, 3, 4, 5])

  sweep = tables.collect(str(tmp_path))
  assert sweep.unfinished == [("vgg19", 4), ("vgg19", 5), ("vgg19_s", 1), ("vgg19_s", 2),
                              ("vgg19_s", 3), ("vgg19_s", 4), ("vgg19_s", 5), ("ours", 1),
                              ("ours", 3), ("ours", 4), ("ours", 5)]
  cells = _cells(tmp_path)
  three = cells[("image_accuracy", "vgg19", "40X")]
  values = 100 * np.array([runs[k]["image_accuracy"]["40X"] for k in (1, 2, 3)])
  assert (three.n_folds, three.n_expected) == (3, 5)
  assert three.mean == pytest.approx(values.mean()) and three.std == pytest.approx(
      values.std(ddof=1))
  assert three.text() == f"{values.mean():.1f} ± {values.std(ddof=1):.1f} (3/5)"
  assert cells[("patient_accuracy", "vgg19", "400X")].n_folds == 2
  assert cells[("patient_accuracy", "vgg19", "100X")].n_folds == 3
  none = cells[("image_accuracy", "vgg19_s", "200X")]
  assert (none.n_folds, none.mean, none.std, none.text()) == (0, None, None, "—")
  one = cells[("image_accuracy", "ours", "100X")]
  assert one.std is None and one.text() == f"{one.mean:.1f} (1/5)" and "±" not in one.text()

  markdown = report.write(str(tmp_path))[0]
  _, rows = _table_rows(markdown, 1)
  assert _cols(rows[0])[1] == three.text()
  assert _cols(next(r for r in rows if _cols(r)[0] == "vgg19_s"))[1:] == ["—"] * 4
  assert "Unfinished runs, counted as missing: vgg19 fold 4, vgg19 fold 5, vgg19_s fold 1" in (
      markdown)


def test_without_manifest_rows_are_sorted_and_folds_are_the_union(tmp_path):
  rng = np.random.default_rng(2)
  _write(tmp_path, "zeta", 1, _results("zeta", 1, "", rng))
  _write(tmp_path, "zeta", 2, _results("zeta", 2, "", rng))
  _write(tmp_path, "alpha", 3, _results("alpha", 3, "VGG19", rng))
  _write(tmp_path, "alpha", 1, _results("alpha", 1, "VGG19", rng))
  (tmp_path / "notes.txt").write_text("not a run")
  sweep = tables.collect(str(tmp_path))
  assert (sweep.names, sweep.folds) == (["alpha", "zeta"], [1, 2, 3])
  assert sweep.unfinished == [("alpha", 2), ("zeta", 3)]
  assert sweep.paper_rows == {"alpha": "VGG19", "zeta": ""}
  assert _cells(tmp_path)[("image_accuracy", "alpha", "40X")].text().endswith("(2/3)")


def test_paper_figures_beside_the_matching_rows_in_the_papers_layout(full_sweep):
  sweep, _ = full_sweep
  markdown = report.write(str(sweep))[0]
  cells = _cells(sweep)
  for number, key, paper in ((1, "image_accuracy", published.TABLE1),
                             (2, "patient_accuracy", published.TABLE2),
                             (3, "patient_recognition_rate", None)):
    header, rows = _table_rows(markdown, number)
    assert _cols(header) == ["Method", "40X", "100X", "200X", "400X"]
    labels = [_cols(r)[0] for r in rows]
    if paper is None:  # the paper has no recognition rate: our rows only
      assert labels == ["vgg19_c", "ours", "extra"]
    else:  # each paper row right under the config that reproduces it; none for 'extra'
      assert labels == ["vgg19_c", "*paper: VGG19 + C*", "ours", "*paper: Ours*", "extra"]
      for label, row in (("*paper: VGG19 + C*", "VGG19 + C"), ("*paper: Ours*", "Ours")):
        line = _cols(rows[labels.index(label)])
        assert line[1:] == [f"*{paper[row][m][0]:.1f} ± {paper[row][m][1]:.1f}*" for m in MAGS]
    for name in ("vgg19_c", "ours", "extra"):
      assert _cols(rows[labels.index(name)])[1:] == [cells[(key, name, m)].text() for m in MAGS]
  # Spot checks against the paper's text: Table 1 "Ours" at 200X, Table 2 "VGG19 + C" at 400X.
  assert "*93.4 ± 2.3*" in markdown and "*95.7 ± 3.0*" in markdown
  assert "sample standard deviation (ddof = 1)" in markdown
  assert "All 15 runs finished." in markdown


def test_csv_round_trips_and_png_is_written(full_sweep):
  sweep, _ = full_sweep
  report.write(str(sweep))[0]
  with open(sweep / "tables.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert tuple(rows[0]) == ("table", "name", "paper_row", "magnification", "mean", "std",
                            "n_folds", "n_expected", "paper_mean", "paper_std")
  cells = tables.aggregate(tables.collect(str(sweep)))
  assert len(rows) == len(cells)
  number = lambda s: None if s == "" else float(s)
  for row, cell in zip(rows, cells, strict=True):
    assert (row["table"], row["name"], row["paper_row"], row["magnification"]) == (
        cell.table, cell.name, cell.paper_row, cell.column)
    assert (number(row["mean"]), number(row["std"])) == (cell.mean, cell.std)  # exact
    assert (int(row["n_folds"]), int(row["n_expected"])) == (5, 5)
    assert (number(row["paper_mean"]), number(row["paper_std"])) == (cell.paper_mean,
                                                                     cell.paper_std)
  ours_200 = next(r for r in rows if (r["table"], r["name"], r["magnification"]) == (
      "patient_accuracy", "ours", "200X"))
  assert (ours_200["paper_mean"], ours_200["paper_std"]) == ("98.6", "2.0")
  assert {r["paper_mean"] for r in rows if r["name"] == "extra"} == {""}
  with open(sweep / "tables.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(sweep / "tables.png") > 10_000
  assert not [p for p in os.listdir(sweep) if p.endswith(".tmp")]  # written atomically


def test_cli_prints_the_tables(full_sweep, capsys):
  sweep, _ = full_sweep
  tables_cli.main([str(sweep)])
  out = capsys.readouterr().out
  assert out.startswith(f"# Results of {sweep}") and "| *paper: Ours* |" in out
  assert (sweep / "tables.md").read_text() in out


@pytest.mark.parametrize("manifest", [True, False])
def test_a_sweep_still_running_counts_the_finished_runs(full_sweep, capsys, manifest):
  """Guards against the tables failing, or counting a run, while a sweep is still running (on
  the cluster: runs with checkpoints but no results.json, submitit's folder beside the runs)."""
  sweep, runs = full_sweep
  running = sweep / "ours" / "fold3"
  (running / "results.json").unlink()
  (running / "checkpoints" / "12").mkdir(parents=True)
  (running / "config.json").write_text("{}")
  (running / "metrics.jsonl").write_text('{"step": 4, "loss": 0.7}\n{"step": 8, "lo')
  (sweep / "submitit" / "123_4").mkdir(parents=True)
  (sweep / "submitit" / "123_4" / "123_4_0_log.out").write_text("")
  (running / "submitit").symlink_to("../../submitit/123_4")
  (sweep / "extra" / "fold5" / "results.json").unlink()  # submitted, not started
  if not manifest:
    (sweep / "sweep.json").unlink()
  tables_cli.main([str(sweep)])
  out = capsys.readouterr().out
  unfinished = next(line for line in out.splitlines() if line.startswith("Unfinished runs"))
  assert sorted(unfinished.split(": ")[1].rstrip(".").split(", ")) == ["extra fold 5",
                                                                        "ours fold 3"]
  cells = _cells(sweep)
  cell = cells[("patient_accuracy", "ours", "200X")]
  values = 100 * np.array([runs[("ours", k)]["patient_accuracy"]["200X"] for k in (1, 2, 4, 5)])
  assert (cell.n_folds, cell.n_expected) == (4, 5) and cell.mean == pytest.approx(values.mean())
  assert cell.text().endswith("(4/5)") and cell.text() in out
  assert cells[("image_accuracy", "vgg19_c", "40X")].n_folds == 5


@pytest.mark.parametrize(("change", "message"), [
    (lambda r: r.pop("image_accuracy"), r"fold2/results.json: missing key 'image_accuracy'"),
    (lambda r: r.pop("finished"), r"fold2/results.json: missing key 'finished'"),
    (lambda r: r["patient_accuracy"].update({"40X": 97.5}),
     r"fold2/results.json: patient_accuracy must map magnifications to fractions in \[0, 1\]"),
    (lambda r: r.update(schema="other/2"), r"fold2/results.json: schema 'other/2'"),
    (lambda r: r.update(fold=3), r"fold2/results.json: holds name 'ours' fold 3"),
])
def test_malformed_results_give_a_one_line_error(tmp_path, capsys, change, message):
  rng = np.random.default_rng(3)
  for fold in (1, 2):
    results = _results("ours", fold, "Ours", rng)
    if fold == 2:
      change(results)
    _write(tmp_path, "ours", fold, results)
  with pytest.raises(UserError, match=message):
    tables.collect(str(tmp_path))
  with pytest.raises(SystemExit) as exit_info:
    tables_cli.main([str(tmp_path)])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("jattn tables: error: ") and err.count("\n") == 1
  assert not (tmp_path / "tables.md").exists()


def test_unreadable_inputs_give_a_one_line_error(tmp_path):
  with pytest.raises(UserError, match=r"nowhere: no such folder"):
    tables.collect(str(tmp_path / "nowhere"))
  with pytest.raises(UserError, match=r"no runs found"):
    tables.collect(str(tmp_path))
  _write(tmp_path, "ours", 1, None)
  (tmp_path / "ours" / "fold1" / "results.json").write_text('{"schema": ')
  with pytest.raises(UserError, match=r"fold1/results.json is not valid JSON"):
    tables.collect(str(tmp_path))
  (tmp_path / "sweep.json").write_text(json.dumps({"folds": [1]}))
  with pytest.raises(UserError, match=r"sweep.json: missing key 'names'"):
    tables.collect(str(tmp_path))


def test_clinical_tables_mean_and_std_over_folds_and_old_results_read(tmp_path):
  """Guards against the clinical columns averaging the wrong figure, counting a fold that lacks
  it, or results written before these figures existed being refused."""
  rng = np.random.default_rng(4)
  values = {}
  for fold in (1, 2, 3):
    r = _results("ours", fold, "Ours", rng)
    if fold != 3:  # fold 3: a results.json from before the clinical metrics
      values[fold] = {m: float(rng.uniform(0.5, 1)) for m in (*MAGS, "all")}
      r["clinical"] = {level: {m: {name: {"value": v, "ci95": [v - 0.1, v]}
                                   for name in ("sensitivity", "specificity", "balanced_accuracy",
                                                "f1", "roc_auc")}
                               for m, v in values[fold].items()} for level in ("image", "patient")}
      if fold == 1:
        del r["clinical"]["image"]["400X"]  # no 400X test images in that fold
      r["clinical"]["patient"]["all"]["roc_auc"]["value"] = None  # undefined there
    _write(tmp_path, "ours", fold, r)
  cells = _cells(tmp_path)
  both = 100 * np.array([values[1]["40X"], values[2]["40X"]])
  auc = cells[("clinical.image.roc_auc", "ours", "40X")]
  assert (auc.n_folds, auc.n_expected) == (2, 3)
  assert auc.text() == f"{both.mean():.1f} ± {both.std(ddof=1):.1f} (2/3)"
  assert cells[("clinical.image.f1", "ours", "400X")].n_folds == 1
  assert cells[("clinical.patient.roc_auc", "ours", "all")].n_folds == 0
  assert cells[("clinical.patient.sensitivity", "ours", "all")].n_folds == 2
  assert ("multiclass.macro_f1", "ours", "40X") not in cells  # no subtype run, no subtype table
  markdown = report.write(str(tmp_path))[0]
  assert "| Method | Metric | 40X | 100X | 200X | 400X | all |" in markdown
  assert f"| ours | ROC-AUC | {auc.text()} |" in markdown
  assert "Table 6." not in markdown and "| *paper: Ours* |" in markdown
