"""Beyond the paper's protocol on real runs: a partial data set, magnification-specific and
8-class subtype runs, clinical metrics in results.json, and one-line errors for bad input."""

from __future__ import annotations

import csv
import json
import logging
import os

import numpy as np
import pytest
from conftest import image_file, small_tree

from jattn import main
from jattn.data import breakhis, load_fold
from jattn.data.breakhis import folds as folds_lib
from jattn.data.breakhis import scan
from jattn.data.breakhis.describe import describe
from jattn.evaluation import report, tables
from tests.runs import tiny_overrides

SUBTYPE = {"task": "subtype", "model.num_classes": 8}
THREE = ("40X", "100X", "200X")


@pytest.fixture(scope="module")
def partial_tree(tmp_path_factory):
  """(data_dir, prepared_dir, fold-2 test patients) of a 16-patient tree without any 400X image
  and without the 200X images of the patients that fold 2 (generated, seed 0) tests on."""
  folder = tmp_path_factory.mktemp("partial")
  data_dir = small_tree(folder / "data", junk=False, odd_sizes=0, folds_csv=False, mkfold=False)
  records = scan.scan(data_dir).records
  test = {r.patient_id for r in records
          if folds_lib.generate_folds(records, 0).splits[2][r.file_name] == "test"}
  for r in records:
    if r.magnification == "400X" or (r.magnification == "200X" and r.patient_id in test):
      os.remove(image_file(data_dir, r.path))
  return data_dir, str(folder / "prepared"), test


def _main(args, data_dir, prepared_dir, **kw):
  main.main(args + [f"--config.{o}" for o in tiny_overrides(data_dir, prepared_dir, **kw)])


def _one_line_error(capsys, args, data_dir, prepared_dir, **kw) -> str:
  with pytest.raises(SystemExit) as exit_info:
    _main(args, data_dir, prepared_dir, **kw)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("jattn train: error: ")
  return err[0].removeprefix("jattn train: error: ")


def test_partial_tree_subtype_run_reports_the_absent_magnification(partial_tree, tmp_path, capsys,
                                                                    caplog):
  """Guards against a fold's missing magnification stopping the other folds or its own run,
  against it appearing in the results, against a magnification-specific run using other
  magnifications' images, and against the 8-class results or the tables' marking going wrong."""
  data_dir, prepared_dir, test_patients = partial_tree
  # Fold 1 loads, whatever fold 2 lacks (before this change, any fold's problem stopped all).
  assert len(load_fold(_data_config(data_dir, prepared_dir, fold=1)).test_indices) > 0
  workdir = str(tmp_path / "sub" / "fold2")
  with caplog.at_level(logging.WARNING, logger="jattn.data.pipeline"):
    _main(["--workdir", workdir], data_dir, prepared_dir, fold=2, num_epochs=1,
          magnifications=",".join(THREE), bootstrap_resamples=20, name="sub", **SUBTYPE)
  assert "has no test images at 200X: that magnification is absent from its results" in (
      caplog.text)
  assert "absent (no test images in this fold): 200X" in capsys.readouterr().out
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["classes"] == list(breakhis.SUBTYPE_CODES)
  assert results["class_kind"] == "subtype" and results["binary"]["of"]["MC"] == "malignant"
  strata = results["strata"]["magnification"]
  assert (strata["selected"], strata["absent"]) == (list(THREE), ["200X"])
  for key in ("image_accuracy", "group_accuracy", "confusion_matrix", "per_class"):
    assert set(results[key]) - {"all"} == {"40X", "100X"}, key
  for mag in ("40X", "100X", "all"):
    assert np.array(results["confusion_matrix"][mag]).shape == (8, 8)
    assert list(results["per_class"][mag]) == list(breakhis.SUBTYPE_CODES)
  assert np.sum(results["confusion_matrix"]["all"]) == results["data"]["num_test_images"]
  assert {p["label"] for p in results["per_group"]["40X"]} == {
      pid.split("-")[0] for pid in test_patients}
  # Only the selected magnifications' images, as many as describe counts for fold 2.
  d = describe(data_dir, check_images=False)["folds"]["2"]
  for group, key in (("train", "num_train_images"), ("test", "num_test_images")):
    assert results["data"][key] == sum(d[group][m]["images"]["total"] for m in THREE)
  with open(os.path.join(workdir, "predictions.csv")) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == results["data"]["num_test_images"]
  assert {r["magnification"] for r in rows} == {"40X", "100X"}
  assert {r["predicted_subtype"] for r in rows} <= set(breakhis.SUBTYPE_CODES)

  # A second fold (hand-made from the first) that has 200X: the tables mark 200X as 1 of 2 folds.
  other = {**results, "fold": 1}
  for key in ("image_accuracy", "group_accuracy", "group_recognition_rate"):
    other[key] = {**results[key], "200X": results[key]["100X"]}
  os.makedirs(tmp_path / "sub" / "fold1")
  (tmp_path / "sub" / "fold1" / "results.json").write_text(json.dumps(other))
  markdown = report.write(str(tmp_path))[0]
  cells = {(c.table, c.column): c for c in tables.aggregate(tables.collect(str(tmp_path)))}
  assert cells[("image_accuracy", "200X")].text().endswith("(1/2)")
  assert cells[("image_accuracy", "400X")].text() == "—"
  assert cells[("image_accuracy", "40X")].n_folds == 2
  # the tiny demo run's setting, after the task and magnifications (tests/runs.py, num_epochs=1)
  assert ("| sub (subtype 40X,100X,200X, from scratch, 32x32, 1 epoch, width 1/16, classifier 16) "
          "| F1 DC |") in markdown
  assert "Table 4." not in markdown  # no binary run: no clinical tables


def _data_config(data_dir, prepared_dir, **kw):
  from conftest import data_config

  return data_config(data_dir, prepared_dir, **kw)


def test_magnification_specific_fold_holds_only_its_images(partial_tree):
  """Guards against a magnification-specific run training or testing on other magnifications."""
  data_dir, prepared_dir, _ = partial_tree
  d = describe(data_dir, check_images=False)["folds"]
  for fold in (1, 3):
    fold_data = load_fold(_data_config(data_dir, prepared_dir, fold=fold,
                                       magnifications=("100X",)))
    for group, indices in (("train", fold_data.train_indices), ("test", fold_data.test_indices)):
      assert set(fold_data.strata[0].index[indices].tolist()) == {1}  # 100X
      assert len(indices) == d[str(fold)][group]["100X"]["images"]["total"]


def test_bad_protocol_input_is_one_line(partial_tree, tmp_path, capsys):
  """Guards against tracebacks (or silent runs) for an unknown magnification or task, a
  magnification list selecting no image, a task the model head does not fit, and a subtype task
  whose fold lacks a subtype in training."""
  data_dir, prepared_dir, _ = partial_tree
  args = ["--workdir", str(tmp_path / "run")]
  assert _one_line_error(capsys, args, data_dir, prepared_dir, magnifications="50X") == (
      "--config.data.breakhis.magnifications=50X: unknown magnification '50X'; use some of "
      "40X,100X,200X,400X (e.g. --config.data.breakhis.magnifications=100X)")
  assert _one_line_error(capsys, args, data_dir, prepared_dir, task="tissue").startswith(
      "--config.data.breakhis.task='tissue' is not a task: use 'binary'")
  assert _one_line_error(capsys, args, data_dir, prepared_dir, task="subtype") == (
      "--config.model.num_classes=2 does not fit --config.data.breakhis.task=subtype (8 classes: "
      "A, F, PT, TA, "
      "DC, LC, MC, PC); set --config.model.num_classes=8")
  assert _one_line_error(capsys, args, data_dir, prepared_dir, magnifications="400X") == (
      f"--config.data.breakhis.magnifications=400X selects no images of {data_dir} (it has images "
      "at 40X, "
      f"100X, 200X); choose among those")
  # Fold 1 with every phyllodes tumour patient on the test side: no PT to train on.
  records = scan.scan(data_dir).records
  generated = folds_lib.generate_folds(records, 0)
  split = {n: "test" if n.startswith("SOB_B_PT") else g for n, g in generated.splits[1].items()}
  path = str(tmp_path / "Folds.csv")
  folds_lib.write_folds_csv(folds_lib.Folds(path, {**generated.splits, 1: split}), records, path)
  line = _one_line_error(capsys, ["--workdir", str(tmp_path / "run2")], data_dir, prepared_dir,
                         folds=path, **SUBTYPE)
  assert line.startswith(f"fold 1 of {path} has no training images of the subtype(s) PT; ")


def test_binary_run_writes_clinical_metrics_and_roc_curves(trained_run):
  """Guards against a binary run without clinical figures, intervals or ROC curves."""
  with open(os.path.join(trained_run, "results.json")) as f:
    results = json.load(f)
  assert results["classes"] == ["benign", "malignant"] and results["binary"]["positive"] == (
      "malignant")
  strata = results["strata"]["magnification"]
  assert (strata["selected"], strata["absent"]) == (list(breakhis.MAGNIFICATIONS), [])
  assert results["clinical"]["bootstrap"]["resamples"] == results["config"]["bootstrap_resamples"]
  for level in ("image", "group"):
    assert set(results["clinical"][level]) == {*breakhis.MAGNIFICATIONS, "all"}
    for figures in results["clinical"][level].values():
      for name in ("sensitivity", "specificity", "balanced_accuracy", "f1", "roc_auc"):
        low, high = figures[name]["ci95"]
        assert low <= figures[name]["value"] <= high
  with open(os.path.join(trained_run, "roc.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
