"""Calibration figures and temperature scaling against independent computations: a NumPy
transcription written here, scikit-learn, netcal, SciPy, and hand computations."""

from __future__ import annotations

import csv
import json
import os
import re

import numpy as np
import pytest
import scipy.optimize
import scipy.special
from PIL import Image
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from jattn import main
from jattn.cli import validate_external as external_cli
from jattn.core import config_lib
from jattn.core.errors import UserError
from jattn.data import load_fold
from jattn.evaluation import calibration, compare, evaluate, metrics, report, tables
from jattn.inference import predict, runs
from jattn.training import compat, holdout
from tests.conftest import data_config
from tests.runs import DEMO, breakhis_fold, tiny_overrides
from tests.test_hostile import one_line_error


def _transcribed_ece(confidence, outcome, bins=15):
  """Guo et al.'s ECE with bins (lo, hi] (the first also 0), written out bin by bin."""
  edges = np.linspace(0, 1, bins + 1)
  total = 0.0
  for m in range(bins):
    inside = (confidence > edges[m]) & (confidence <= edges[m + 1])
    if m == 0:
      inside |= confidence == 0
    if inside.any():
      total += inside.sum() / len(confidence) * abs(outcome[inside].mean()
                                                    - confidence[inside].mean())
  return total


def _transcribed_equal_mass_ece(confidence, outcome, bins=15):
  order = sorted(range(len(confidence)), key=lambda i: confidence[i])
  n, total, start = len(order), 0.0, 0
  for m in range(bins):  # parts of size ceil or floor of n / bins, the larger ones first
    size = n // bins + (1 if m < n % bins else 0)
    part = order[start:start + size]
    start += size
    if part:
      total += len(part) / n * abs(np.mean(outcome[part]) - np.mean(confidence[part]))
  return total


def _random_probs(n, k, seed, scale=2.0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0, scale, (n, k))
  probs = scipy.special.softmax(logits, axis=1)
  labels = np.array([rng.choice(k, p=p) for p in probs])
  return logits, probs, labels


def test_binary_ece_brier_nll_and_bins_equal_transcription_sklearn_and_netcal():
  """Guards against the wrong bin edges, a top-label ECE where P(positive) is meant, a Brier or
  NLL off by the factor or the clipping, and reliability bins that disagree with scikit-learn's
  calibration_curve."""
  netcal_metrics = pytest.importorskip("netcal.metrics")
  _, probs, labels = _random_probs(300, 2, seed=0)
  probs[:5, 1] = [0.2, 0.4, 1 / 3, 0.0, 1.0]  # on bin edges and the ends
  probs[:5, 0] = 1 - probs[:5, 1]
  p = probs[:, 1]
  y = labels.astype(float)
  assert calibration.ece(probs, labels, positive=1) == pytest.approx(
      _transcribed_ece(p, y), abs=1e-12)
  # netcal bins [lo, hi) (NumPy's histogram): compared where no confidence is on an edge.
  assert calibration.ece(probs[5:], labels[5:], positive=1) == pytest.approx(
      netcal_metrics.ECE(bins=15).measure(p[5:], labels[5:]), abs=1e-9)
  assert calibration.ece(probs, labels, positive=1, equal_mass=True) == pytest.approx(
      _transcribed_equal_mass_ece(p, y), abs=1e-12)
  assert calibration.brier(probs, labels) == pytest.approx(skm.brier_score_loss(labels, p),
                                                           abs=1e-12)
  assert calibration.nll(probs, labels) == pytest.approx(skm.log_loss(labels, probs), abs=1e-12)
  bins = calibration.reliability(p, y, calibration.equal_width_bins(p), 15)
  full = [b for b in bins if b["count"]]
  true, predicted = calibration_curve(labels, p, n_bins=15, strategy="uniform")
  np.testing.assert_allclose([b["accuracy"] for b in full], true, atol=1e-12)
  np.testing.assert_allclose([b["confidence"] for b in full], predicted, atol=1e-12)
  assert sum(b["count"] for b in bins) == 300


def test_top_label_and_classwise_ece_of_several_classes():
  """Guards against a classwise ECE that is the top-label one, and a multiclass Brier that is not
  scikit-learn's (half the summed squared error)."""
  netcal_metrics = pytest.importorskip("netcal.metrics")
  _, probs, labels = _random_probs(400, 4, seed=1)
  top, correct = probs.max(1), (probs.argmax(1) == labels).astype(float)
  assert calibration.ece(probs, labels) == pytest.approx(_transcribed_ece(top, correct),
                                                         abs=1e-12)
  assert calibration.ece(probs, labels) == pytest.approx(
      netcal_metrics.ECE(bins=15).measure(probs, labels), abs=1e-9)
  classwise = np.mean([_transcribed_ece(probs[:, c], (labels == c).astype(float))
                       for c in range(4)])
  assert calibration.classwise_ece(probs, labels) == pytest.approx(classwise, abs=1e-12)
  assert calibration.classwise_ece(probs, labels) != pytest.approx(calibration.ece(probs, labels))
  assert calibration.brier(probs, labels) == pytest.approx(
      skm.brier_score_loss(labels, probs, labels=[0, 1, 2, 3], scale_by_half=True), abs=1e-12)
  assert calibration.nll(probs, labels) == pytest.approx(skm.log_loss(labels, probs), abs=1e-12)
  assert set(calibration.figures(probs, labels)) == set(calibration.FIGURES)


def test_aurc_equals_a_hand_computation_with_ties():
  """Guards against ties split in input order (the risk-coverage curve cannot tell tied items
  apart) and against the risk of the wrong end of the curve."""
  # Top-label confidences 0.9, 0.8, 0.8, 0.7, 0.6 with errors 0, 1, 0, 1, 0 (top class 1 for
  # all, labels chosen to be wrong where the error is 1).
  probs = np.array([[0.1, 0.9], [0.2, 0.8], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6]])
  labels = np.array([1, 0, 1, 0, 1])
  # Coverage 1/5: risk 0. The tied block (0.8) accepted together: 1 error of 3, for both its
  # items. Then 2/4 and 2/5. AURC = (0 + 1/3 + 1/3 + 1/2 + 2/5) / 5.
  assert calibration.aurc(probs, labels) == pytest.approx((0 + 1 / 3 + 1 / 3 + 1 / 2 + 2 / 5) / 5)
  # Listing the tied items the other way round changes nothing.
  assert calibration.aurc(probs[[0, 2, 1, 3, 4]], labels[[0, 2, 1, 3, 4]]) == pytest.approx(
      calibration.aurc(probs, labels))


def test_weighted_figures_equal_those_of_the_resampled_data_set():
  """Guards against the bootstrap's fast path drifting from the figures of the resampled groups
  (repeated groups are weights)."""
  _, probs, labels = _random_probs(60, 3, seed=2)
  probs = np.round(probs, 1)  # ties for AURC
  probs /= probs.sum(1, keepdims=True)
  groups = np.repeat(np.arange(12), 5)
  weights = metrics.stratified_weights(np.zeros(12), 5, seed=3)
  fast = calibration.WeightedCalibration(probs, labels, groups, 12)(weights)
  for b, w in enumerate(weights):
    repeated = np.repeat(np.arange(60), w[groups].astype(int))
    for name in ("ece", "classwise_ece", "brier", "nll", "aurc"):
      reference = getattr(calibration, name)(probs[repeated], labels[repeated])
      assert fast[name][b] == pytest.approx(reference, abs=1e-12), name
  ones = calibration.WeightedCalibration(probs, labels, groups, 12)(np.ones(12))
  assert ones["ece_equal_mass"][0] == pytest.approx(
      calibration.ece(probs, labels, equal_mass=True), abs=1e-12)


def test_fitted_temperature_equals_scipy_minimiser_and_recovers_over_confidence():
  """Guards against a temperature that does not minimise the validation NLL, that multiplies
  instead of dividing, and against scaling that changes the top class or the ranking."""
  logits, probs, labels = _random_probs(20000, 3, seed=4, scale=1.5)
  found = calibration.fit_temperature(logits * 3, labels)

  def nll(t):  # the validation NLL of temperature t, written out here
    z = logits * 3 / t[0]
    return float(np.mean(scipy.special.logsumexp(z, axis=1) - z[np.arange(len(z)), labels]))

  reference = scipy.optimize.minimize(nll, x0=[1.0], method="L-BFGS-B", bounds=[(0.05, 20)],
                                      options={"ftol": 1e-15, "gtol": 1e-12}).x[0]
  assert found == pytest.approx(reference, abs=1e-4)
  assert found == pytest.approx(3.0, abs=0.15)
  assert calibration.fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.05)
  scaled = calibration.apply_temperature(scipy.special.softmax(logits * 3, axis=1), found)
  raw = scipy.special.softmax(logits * 3, axis=1)
  np.testing.assert_array_equal(scaled.argmax(1), raw.argmax(1))
  # Two classes: P(positive) keeps its order, so ROC-AUC is unchanged (with more classes one
  # class' probability may reorder across items).
  two_logits, two_probs, two_labels = _random_probs(2000, 2, seed=5)
  t = calibration.fit_temperature(two_logits * 3, two_labels)
  two_raw = scipy.special.softmax(two_logits * 3, axis=1)
  two_scaled = calibration.apply_temperature(two_raw, t)
  assert skm.roc_auc_score(two_labels, two_scaled[:, 1]) == pytest.approx(
      skm.roc_auc_score(two_labels, two_raw[:, 1]), abs=1e-12)
  np.testing.assert_array_equal(two_scaled.argmax(1), two_raw.argmax(1))
  # log p as logits: the same as scaling the logits themselves (softmax ignores a shift).
  np.testing.assert_allclose(scaled, scipy.special.softmax(logits * 3 / found, axis=1),
                             atol=1e-9)
  assert calibration.ece(scaled, labels) < calibration.ece(raw, labels) / 3


def test_evaluator_calibration_block_per_stratum_and_group_with_intervals():
  """Guards against group figures of the images instead of a patient's mean probability, figures
  of the wrong stratum's images, and intervals that miss their own estimate."""
  rng = np.random.default_rng(6)
  patients = np.repeat(np.arange(16), 8)
  labels = (np.arange(16) % 2)[patients]
  mags = np.tile([0, 1], 64)
  p = np.clip(0.5 + 0.3 * (2 * labels - 1) + rng.normal(0, 0.25, 128), 0.01, 0.99)
  probs = np.stack([1 - p, p], axis=1)
  d = breakhis_fold(labels, patients, mags, labels * 4)
  out = evaluate.evaluate(probs, d, d.test_indices, bootstrap_resamples=200, bootstrap_seed=1)
  block = out["calibration"]
  assert block["convention"] == "positive_class" and block["positive"] == "malignant"
  at_100 = mags == 1
  assert block["image"]["100X"]["ece"]["value"] == pytest.approx(
      _transcribed_ece(p[at_100], labels[at_100].astype(float)), abs=1e-12)
  assert block["image"]["all"]["brier"]["value"] == pytest.approx(
      skm.brier_score_loss(labels, p), abs=1e-12)
  sel = mags == 0
  g_p = np.array([p[sel & (patients == g)].mean() for g in range(16)])
  g_y = np.arange(16) % 2
  assert block["group"]["40X"]["brier"]["value"] == pytest.approx(
      skm.brier_score_loss(g_y, g_p), abs=1e-12)
  assert block["group"]["40X"]["nll"]["value"] == pytest.approx(
      skm.log_loss(g_y, np.stack([1 - g_p, g_p], 1)), abs=1e-12)
  for level in ("image", "group"):
    for figure in block[level]["all"].values():
      low, high = figure["ci95"]
      assert low <= figure["value"] <= high and low < high
  bins = block["reliability"]["all"]
  assert sum(b["count"] for b in bins) == 128 and len(bins) == 15


def _sweep_run(name, fold, ece, brier, accuracy):
  """A schema 2 results.json with a calibration block (ece, brier at every column)."""
  cols = ("40X", "100X", "200X", "400X")
  figure = lambda v: {"ece": {"value": v[0], "ci95": None}, "brier": {"value": v[1], "ci95": None}}
  return {"schema": "jattn.results/1", "name": name, "paper_row": "", "fold": fold,
          "finished": True, "image_accuracy": dict.fromkeys(cols, accuracy),
          "patient_accuracy": dict.fromkeys(cols, accuracy),
          "patient_recognition_rate": dict.fromkeys(cols, accuracy),
          "num_images": dict.fromkeys(cols, 600), "num_patients": dict.fromkeys(cols, 25),
          "data": {"num_train_images": 4000, "num_test_images": 1000},
          "calibration": {level: {c: figure((ece, brier)) for c in (*cols, "all")}
                          for level in ("image", "group")}}


def test_tables_show_ece_and_brier_and_compare_them_with_lower_better(tmp_path):
  """Guards against calibration columns that average the wrong figure, a --metric that still
  compares accuracy, and wins counted as higher where lower is better."""
  ece = {"a": [0.05, 0.04, 0.06], "b": [0.10, 0.12, 0.08]}
  for name in ece:
    for fold in (1, 2, 3):
      os.makedirs(tmp_path / name / f"fold{fold}")
      (tmp_path / name / f"fold{fold}" / "results.json").write_text(json.dumps(
          _sweep_run(name, fold, ece[name][fold - 1], 0.1 * fold, 0.9)))
  sweep = tables.collect(str(tmp_path))
  cells = {(c.table, c.name, c.column): c for c in tables.aggregate(sweep)}
  a = cells[("calibration.image.ece", "a", "40X")]
  assert a.mean == pytest.approx(100 * np.mean(ece["a"]))
  assert a.std == pytest.approx(100 * np.std(ece["a"], ddof=1))
  assert cells[("calibration.patient.brier", "b", "all")].mean == pytest.approx(20.0)
  comparison = compare.compute(sweep, ["a:b"], "ece")
  image = [d for d in comparison.differences[0] if d.level == "image"][0]
  assert [x for _, _, x in image.pairs] == pytest.approx(
      [100 * (x - y) for x, y in zip(ece["a"], ece["b"], strict=True)])
  assert image.wins == 3  # a's ECE is lower in every pair
  accuracy = compare.compute(sweep, ["a:b"])
  assert all(x == 0 for d in accuracy.differences[0] for _, _, x in d.pairs)
  with pytest.raises(UserError, match="--metric 'auc'"):
    compare.compute(sweep, ["a:b"], "auc")
  markdown = report.write(str(tmp_path), ["a:b"], "brier")[0]
  assert "Table 7. Calibration, image level" in markdown


def _check_split(d, fraction=0.2):
  rest_data, validation = holdout.split(d, fraction, seed=0)
  rest = rest_data.train_indices
  np.testing.assert_array_equal(np.sort(np.concatenate([rest, validation])), d.train_indices)
  group = lambda idx: set(d.groups[idx].tolist())
  assert group(validation) and not group(validation) & group(rest)
  assert not group(validation) & group(d.test_indices)
  np.testing.assert_array_equal(rest_data.test_indices, d.test_indices)
  # Stratified: every training class is in the split, in about the training share.
  for c in np.unique(d.targets[d.train_indices]):
    share = np.mean(d.targets[d.train_indices] == c)
    assert np.mean(d.targets[validation] == c) == pytest.approx(share, abs=0.2)
  # The rest's channel statistics, as NumPy computes them over its pixels.
  pixels = np.asarray(d.images[rest], np.float64).reshape(-1, 3)
  np.testing.assert_allclose(rest_data.mean, pixels.mean(0), rtol=1e-5)
  np.testing.assert_allclose(rest_data.std, pixels.std(0), rtol=1e-5)
  return validation


def test_validation_split_of_breakhis_folds_file_shares_no_patient(synthetic_tree, prepared_dir):
  """Guards against a validation split that takes images rather than patients (a patient's
  images at other magnifications left in training or in the test split)."""
  data_dir, summary = synthetic_tree
  d = load_fold(data_config(data_dir, prepared_dir, folds=summary["folds_csv"], fold=2))
  validation = _check_split(d)
  patients = len(np.unique(d.groups[d.train_indices]))
  assert len(np.unique(d.groups[validation])) == pytest.approx(patients / 5, abs=2)


def test_validation_split_of_a_folder_source_shares_no_group(tmp_path):
  rng = np.random.default_rng(0)
  rows = []
  for c, name in enumerate(("a", "b")):
    for g in range(10):
      os.makedirs(tmp_path / name / f"{name}{g}")
      for i in range(3):
        pixels = np.clip(60 + 120 * c + rng.normal(0, 20, (8, 8, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / name / f"{name}{g}" / f"{i}.png")
        rows.append(f"{name}/{name}{g}/{i}.png,{name},{name}{g}")
  (tmp_path / "manifest.csv").write_text("path,label,patient\n" + "\n".join(rows) + "\n")
  config = data_config("unused", str(tmp_path / "prepared"), dataset="folder",
                       manifest=str(tmp_path / "manifest.csv"), group="patient", num_folds=4)
  d = load_fold(config)
  _check_split(d, 0.25)
  with pytest.raises(UserError, match="validation_fraction=0.05: fold 1 has 15 training"):
    holdout.split(d, 0.05, seed=0)


def _predictions(workdir):
  with open(os.path.join(workdir, "predictions.csv"), newline="") as f:
    return list(csv.DictReader(f))


def test_a_finished_run_has_its_calibration_block_and_reliability_png(trained_run):
  """Guards against a calibration block of other probabilities than predictions.csv's, and a
  run without its reliability diagram."""
  with open(os.path.join(trained_run, "results.json")) as f:
    r = json.load(f)
  rows = _predictions(trained_run)
  p = np.array([float(row["prob_malignant"]) for row in rows])
  y = np.array([row["label"] == "malignant" for row in rows], float)
  block = r["calibration"]
  assert block["temperature"] is None and "uncalibrated" not in block
  assert block["image"]["all"]["ece"]["value"] == pytest.approx(_transcribed_ece(p, y), abs=1e-5)
  assert block["image"]["all"]["brier"]["value"] == pytest.approx(
      skm.brier_score_loss(y, p), abs=1e-5)
  assert set(block["image"]) == set(block["reliability"]) == {*r["image_accuracy"], "all"}
  with open(os.path.join(trained_run, "reliability.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert not os.path.exists(os.path.join(trained_run, "temperature.json"))


def test_a_run_with_a_validation_split_fits_and_applies_its_temperature(
    synthetic_tree, prepared_dir, tmp_path, capsys):
  """Guards against a temperature fitted on anything but the validation split (or not at the
  NLL's minimum), test probabilities left unscaled, accuracy or ROC-AUC changed by it, and
  predict not applying it."""
  workdir = str(tmp_path / "run")
  main.main(["--config", DEMO, "--workdir", workdir] + [
      f"--config.{o}" for o in tiny_overrides(synthetic_tree[0], prepared_dir,
                                              validation_fraction=0.25, bootstrap_resamples=50)])
  with open(os.path.join(workdir, "results.json")) as f:
    r = json.load(f)
  t = r["calibration"]["temperature"]["value"]
  before, after = r["calibration"]["uncalibrated"]["image"]["all"], r["calibration"]["image"]["all"]
  assert (f"temperature {t:.3f}, fitted on the {r['calibration']['temperature']['split']['images']}"
          f" validation images: test image-level ECE {before['ece']['value']:.3f} -> "
          f"{after['ece']['value']:.3f}") in capsys.readouterr().out
  assert runs.temperature(workdir) == pytest.approx(t)
  config, state = runs.restore(workdir)
  d = load_fold(config)
  rest, validation = holdout.split(d, 0.25, config.seed)
  assert r["data"]["num_train_images"] == len(rest.train_indices) == (
      len(d.train_indices) - len(validation))
  assert r["calibration"]["temperature"]["split"]["images"] == len(validation)
  # The validation NLL's minimiser, by SciPy on log p of the model's validation probabilities.
  val_probs = runs.predict_probs(state, np.asarray(d.images[validation]))
  logits, labels = np.log(np.asarray(val_probs, np.float64)), d.targets[validation]

  def nll(x):
    z = logits / x[0]
    return float(np.mean(scipy.special.logsumexp(z, axis=1) - z[np.arange(len(z)), labels]))

  reference = scipy.optimize.minimize(nll, x0=[1.0], method="L-BFGS-B", bounds=[(0.02, 50)],
                                      options={"ftol": 1e-15, "gtol": 1e-12}).x[0]
  assert t == pytest.approx(reference, abs=1e-4)
  # Test probabilities: the raw ones scaled by T; argmax and ranking kept.
  rows = _predictions(workdir)
  names = {n: i for i, n in enumerate(d.file_names)}
  index = np.array([names[row["file_name"]] for row in rows])
  raw = np.asarray(runs.predict_probs(state, np.asarray(d.images[index])), np.float64)
  scaled = scipy.special.softmax(np.log(raw) / t, axis=1)
  np.testing.assert_allclose([float(row["prob_malignant"]) for row in rows], scaled[:, 1],
                             atol=2e-6)
  y = d.targets[index]
  assert r["image_accuracy"]["40X"] == pytest.approx(
      np.mean((raw.argmax(1) == y)[d.strata[0].index[index] == 0]))
  assert r["clinical"]["image"]["all"]["roc_auc"]["value"] == pytest.approx(
      skm.roc_auc_score(y, raw[:, 1]))
  assert r["calibration"]["uncalibrated"]["image"]["all"]["brier"]["value"] == pytest.approx(
      skm.brier_score_loss(y, raw[:, 1]), abs=1e-6)
  assert r["calibration"]["image"]["all"]["brier"]["value"] == pytest.approx(
      skm.brier_score_loss(y, scaled[:, 1]), abs=1e-6)
  # predict applies the run's temperature.
  Image.fromarray(np.asarray(d.images[index[0]])).save(tmp_path / "one.png")
  (row,) = predict.predict(workdir, [str(tmp_path / "one.png")])
  assert float(row["prob_malignant"]) == pytest.approx(scaled[0, 1], abs=2e-6)
  # The predictor slides go through, and external validation, apply it too.
  predictor = runs.Predictor(state, 16, "none", runs.temperature(workdir))
  np.testing.assert_allclose(predictor(np.asarray(d.images[index[:5]]))[:, 1], scaled[:5, 1],
                             atol=2e-6)
  external_cli.main(["--workdir", workdir, f"--config.data.dir={synthetic_tree[0]}",
                     f"--config.data.prepared_dir={prepared_dir}", "--name", "again"])
  with open(os.path.join(workdir, "external", "again", "results.json")) as f:
    assert json.load(f)["calibration"]["temperature"]["value"] == pytest.approx(t)
  external_rows = {row["file_name"]: row for row in _predictions(
      os.path.join(workdir, "external", "again"))}
  np.testing.assert_allclose(
      [float(external_rows[row["file_name"]]["prob_malignant"]) for row in rows],
      scaled[:, 1], atol=2e-6)


@pytest.mark.parametrize("fraction, pattern", [
    (0.7, r"--config.validation_fraction=0.7: the fraction of the training groups held out .* "
          r"from 0 \(none\) to 0.5"),
    (0.01, r"--config.validation_fraction=0.01: fold 1 has \d+ training patients, fewer than the "
           r"100 parts it is cut into"),
])
def test_a_bad_validation_fraction_is_one_line_and_writes_nothing(
    synthetic_tree, prepared_dir, tmp_path, capsys, fraction, pattern):
  workdir = tmp_path / "run"
  args = ["--config", DEMO, "--workdir", str(workdir)] + [
      f"--config.{o}" for o in tiny_overrides(synthetic_tree[0], prepared_dir,
                                              validation_fraction=fraction)]
  if fraction > 0.5:  # refused by the config check, before any data is read
    one_line_error(lambda: main.main(args), capsys, "jattn train", pattern)
  else:  # refused once the fold is loaded (data preparation may print its progress before)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
      main.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.count("jattn train: error:") == 1
    assert re.search(pattern, err.rstrip("\n").splitlines()[-1])
  assert not workdir.exists()


def test_an_old_runs_config_without_the_calibration_fields_resumes():
  """Guards against old runs being refused as another config once the fields exist."""
  now = json.loads(config_lib.load_config(DEMO).to_json())
  old = json.loads(json.dumps(now))
  del old["validation_fraction"], old["calibration"]
  assert compat.differing_fields(old, now) == []
  now["validation_fraction"] = 0.2
  assert compat.differing_fields(old, now) == ["validation_fraction"]


def test_subtype_figures_are_top_label_with_classwise_ece():
  """Guards against the positive-class convention applied to eight classes."""
  rng = np.random.default_rng(7)
  patients = np.repeat(np.arange(16), 4)
  subtypes = (np.arange(16) % 8)[patients]
  labels = (subtypes >= 4).astype(int)
  probs = scipy.special.softmax(rng.normal(0, 2, (64, 8)), axis=1)
  d = breakhis_fold(labels, patients, np.zeros(64, int), subtypes, task="subtype")
  block = evaluate.evaluate(probs, d, d.test_indices)["calibration"]
  assert block["convention"] == "top_label" and block["positive"] is None
  image = block["image"]["all"]
  top, correct = probs.max(1), (probs.argmax(1) == subtypes).astype(float)
  assert image["ece"]["value"] == pytest.approx(_transcribed_ece(top, correct), abs=1e-12)
  assert image["classwise_ece"]["value"] == pytest.approx(np.mean(
      [_transcribed_ece(probs[:, c], (subtypes == c).astype(float)) for c in range(8)]),
      abs=1e-12)
  assert image["nll"]["value"] == pytest.approx(skm.log_loss(subtypes, probs, labels=range(8)),
                                                abs=1e-12)
