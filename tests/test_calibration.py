"""Calibration figures and temperature scaling against independent computations: a NumPy
transcription written here, scikit-learn, netcal, SciPy, and hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import scipy.special
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from jattn.evaluation import calibration, metrics


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
