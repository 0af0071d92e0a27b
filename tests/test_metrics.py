"""Clinical and per-class metrics on hand-made predictions, and the patient bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from jattn.evaluation import evaluate, metrics
from tests.runs import breakhis_fold


def _evaluate(*, probs, labels, subtypes, patients, magnifications, patient_ids=None,
              task="binary", tie_rule="benign", selected=None, bootstrap_resamples=0,
              bootstrap_seed=0):
  """The evaluator's figures for hand-made BreakHis-like predictions."""
  d = breakhis_fold(labels, patients, magnifications, subtypes, task, patient_ids, selected)
  return evaluate.evaluate(probs, d, d.test_indices, tie_rule=tie_rule,
                           bootstrap_resamples=bootstrap_resamples, bootstrap_seed=bootstrap_seed)


def test_binary_metrics_equal_hand_computed_values():
  """Guards against swapped classes (sensitivity vs specificity), F1 of the wrong class and an AUC
  computed from predictions instead of probabilities."""
  labels = np.array([1, 1, 1, 1, 0, 0, 0])
  scores = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.2, 0.1])
  predictions = (scores > 0.5).astype(int)
  # tp = 3, fn = 1, fp = 1, tn = 2
  out = metrics.binary_metrics(labels, scores, predictions)
  assert out["sensitivity"] == pytest.approx(3 / 4)
  assert out["specificity"] == pytest.approx(2 / 3)
  assert out["balanced_accuracy"] == pytest.approx((3 / 4 + 2 / 3) / 2)
  assert out["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
  # AUC: of the 4 x 3 (malignant, benign) pairs, the malignant score is higher in all but
  # (0.6, 0.7) and (0.3, 0.7): 10 / 12.
  assert out["roc_auc"] == pytest.approx(10 / 12)
  # Only one class: the figures of the absent class and the AUC are undefined, not 0.
  only = metrics.binary_metrics(labels[:4], scores[:4], predictions[:4])
  assert only == {"sensitivity": 0.75, "specificity": None, "balanced_accuracy": None,
                  "f1": pytest.approx(6 / 7), "roc_auc": None}


def test_vectorised_bootstrap_figures_equal_scikit_learn_with_weights():
  """Guards against the bootstrap's fast path drifting from scikit-learn's figures (ties in the
  scores included), and against weights not meaning repeated patients."""
  rng = np.random.default_rng(0)
  patients = np.repeat(np.arange(12), 5)
  labels = (np.arange(12) % 2)[patients]
  scores = np.round(rng.uniform(size=60) * 0.6 + 0.3 * labels, 1)  # many ties
  predictions = (scores > 0.5).astype(int)
  weights = metrics.stratified_weights(np.arange(12) % 2, 6, seed=1)
  fast = metrics.WeightedBinaryMetrics(labels, scores, predictions, patients, 12)(weights)
  for b, w in enumerate(weights):
    reference = metrics.binary_metrics(labels, scores, predictions, w[patients])
    repeated = np.repeat(np.arange(60), w[patients].astype(int))
    assert metrics.binary_metrics(labels[repeated], scores[repeated],
                                  predictions[repeated]) == pytest.approx(reference)
    for name, value in reference.items():
      assert fast[name][b] == pytest.approx(value, abs=1e-12)
  assert skm.balanced_accuracy_score(labels, predictions) == pytest.approx(
      metrics.binary_metrics(labels, scores, predictions)["balanced_accuracy"])


def _patients_data(num_patients, seed=0, images=6):
  rng = np.random.default_rng(seed)
  patients = np.repeat(np.arange(num_patients), images)
  labels = (np.arange(num_patients) % 2)[patients]
  # A patient effect shared by its images (they are correlated), plus image noise.
  effect = rng.normal(0, 0.25, num_patients)[patients]
  scores = np.clip(0.5 + 0.12 * (2 * labels - 1) + effect + rng.normal(0, 0.15, len(patients)),
                   0, 1)
  predictions = (scores > 0.5).astype(int)
  votes = evaluate.vote(patients, predictions, 2, tie_class=0)
  return dict(labels=labels, scores=scores, predictions=predictions, groups=patients,
              group_votes=votes)


def test_patient_bootstrap_intervals_contain_the_estimate_shrink_and_repeat():
  """Guards against intervals that miss their own point estimate, that do not narrow with more
  patients (resampling the wrong unit), or that change from one run to the next."""
  small = metrics.clinical_metrics(**_patients_data(20), resamples=400, seed=3)
  large = metrics.clinical_metrics(**_patients_data(200), resamples=400, seed=3)
  for level in ("image", "group"):
    for name in metrics.BINARY_METRICS:
      assert 0 < small[level][name]["value"] < 1  # not a degenerate figure of zero width
      for out in (small, large):
        low, high = out[level][name]["ci95"]
        assert low <= out[level][name]["value"] <= high, (level, name)
      width = lambda o: o[level][name]["ci95"][1] - o[level][name]["ci95"][0]  # noqa: B023
      assert width(large) < width(small), (level, name)
  again = metrics.clinical_metrics(**_patients_data(20), resamples=400, seed=3)
  other = metrics.clinical_metrics(**_patients_data(20), resamples=400, seed=4)
  assert again == small
  assert other["image"]["roc_auc"]["ci95"] != small["image"]["roc_auc"]["ci95"]
  assert other["image"]["roc_auc"]["value"] == small["image"]["roc_auc"]["value"]
  # Resampling patients, not images: a patient's 6 images are drawn together, so the image-level
  # interval is wider than a bootstrap over single images would give.
  data = _patients_data(20)
  correlated = {**data, "scores": np.repeat(data["scores"][::6], 6),
                "predictions": np.repeat(data["predictions"][::6], 6)}
  patient_ci = metrics.clinical_metrics(**correlated, resamples=400, seed=3)
  image_units = {**correlated, "groups": np.arange(120),
                 "group_votes": dict(enumerate(correlated["predictions"].tolist()))}
  image_ci = metrics.clinical_metrics(**image_units, resamples=400, seed=3)
  w = lambda o: o["image"]["sensitivity"]["ci95"][1] - o["image"]["sensitivity"]["ci95"][0]
  assert w(patient_ci) > 1.5 * w(image_ci)


def _sklearn_figures(labels, scores, predictions) -> dict[str, float]:
  """BINARY_METRICS by scikit-learn's own scorers (not through `metrics.binary_metrics`)."""
  return {"sensitivity": skm.recall_score(labels, predictions, pos_label=1),
          "specificity": skm.recall_score(labels, predictions, pos_label=0),
          "balanced_accuracy": skm.balanced_accuracy_score(labels, predictions),
          "f1": skm.f1_score(labels, predictions, pos_label=1, zero_division=0.0),
          "roc_auc": skm.roc_auc_score(labels, scores)}


def _uneven_patients(seed=5):
  """5 benign and 8 malignant patients (shuffled) with 2 to 5 images each, and their votes."""
  rng = np.random.default_rng(seed)
  classes = rng.permutation([0] * 5 + [1] * 8)
  patients = np.repeat(np.arange(13), rng.integers(2, 6, 13))
  labels = classes[patients]
  effect = rng.normal(0, 0.2, 13)[patients]
  scores = np.clip(0.5 + 0.1 * (2 * labels - 1) + effect + rng.normal(0, 0.15, len(labels)), 0, 1)
  predictions = (scores > 0.5).astype(int)
  return dict(labels=labels, scores=scores, predictions=predictions, groups=patients,
              group_votes=evaluate.vote(patients, predictions, 2, tie_class=0)), classes


def test_bootstrap_intervals_are_percentiles_of_scikit_learn_on_resampled_patient_sets():
  """Guards against resampling all patients together instead of within each class (every
  resample must hold the test set's 5 benign and 8 malignant patients), a patient-level AUC
  from the votes instead of the patients' mean probabilities, and intervals that are not the
  2.5th and 97.5th percentiles: each resample is rebuilt as the data set of its drawn patients
  with repeats and scored by scikit-learn."""
  data, classes = _uneven_patients()
  out = metrics.clinical_metrics(**data, resamples=200, seed=7)
  weights = metrics.stratified_weights(classes, 200, seed=7)  # the draws clinical_metrics makes
  mean = np.array([data["scores"][data["groups"] == p].mean() for p in range(13)])
  votes = np.array([data["group_votes"][p] for p in range(13)])
  figures = {"image": [], "group": []}
  for w in weights:
    drawn = np.repeat(np.arange(13), w.astype(int))
    assert np.bincount(classes[drawn], minlength=2).tolist() == [5, 8]
    images = np.concatenate([np.flatnonzero(data["groups"] == p) for p in drawn])
    figures["image"].append(_sklearn_figures(data["labels"][images], data["scores"][images],
                                             data["predictions"][images]))
    figures["group"].append(_sklearn_figures(classes[drawn], mean[drawn], votes[drawn]))
  for level, resampled in figures.items():
    for name in metrics.BINARY_METRICS:
      expected = np.percentile([f[name] for f in resampled], [2.5, 97.5]).tolist()
      assert out[level][name]["ci95"] == pytest.approx(expected, abs=1e-12), (level, name)


def test_patient_roc_auc_scores_the_mean_probability_of_each_patients_images():
  """Guards against a patient-level ROC-AUC computed from the 0/1 votes (what the README says:
  the mean P(malignant) of the patient's images), per magnification and over all."""
  data, classes = _uneven_patients()
  mean = [data["scores"][data["groups"] == p].mean() for p in range(13)]
  votes = [data["group_votes"][p] for p in range(13)]
  expected = skm.roc_auc_score(classes, mean)
  assert expected != pytest.approx(skm.roc_auc_score(classes, votes))  # the two really differ
  out = _evaluate(
      probs=np.stack([1 - data["scores"], data["scores"]], -1), labels=data["labels"],
      subtypes=np.where(data["labels"] == 1, 4, 0), patients=data["groups"],
      magnifications=np.zeros(len(data["labels"]), int), selected=("40X",))
  for group in ("40X", "all"):
    assert out["clinical"]["group"][group]["roc_auc"]["value"] == pytest.approx(expected)
  assert out["clinical"]["group"]["all"]["sensitivity"]["value"] == pytest.approx(
      skm.recall_score(classes, votes))


def test_bootstrap_interval_is_the_central_95_percent_of_the_statistic():
  """Guards against a tail of 5% on each side (a 90% interval labelled 95%) and against resamples
  where a figure is undefined being counted: the statistic is the resample's index 0..1000, whose
  2.5th and 97.5th percentiles are 25 and 975."""
  def statistic(weights):
    assert weights.shape == (1001, 4)
    return {"index": np.arange(1001.0), "never": np.full(1001, np.nan),
            "odd": np.where(np.arange(1001) % 2, np.arange(1001.0), np.nan)}

  out = metrics.group_bootstrap(statistic, np.array([0, 1, 0, 1]), resamples=1001, seed=0)
  assert out["index"] == pytest.approx([25.0, 975.0])
  assert out["never"] is None
  assert out["odd"] == pytest.approx([1 + 0.025 * 998, 1 + 0.975 * 998])  # 500 odd values


def test_plurality_vote_and_its_tie_rule():
  """Guards against a binary majority (or a silent first-class tie) on 8 classes."""
  patients = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
  predictions = np.array([4, 4, 1, 6, 2, 3, 3, 5, 5])
  probs = np.full((9, 8), 0.01)
  probs[np.arange(9), predictions] = 0.9
  probs[7, 5] = probs[8, 5] = 0.95  # patient 2: 3 and 5 tie on votes, 5 has the higher mean
  # patient 0: 4 by plurality; patient 1: 6 vs 2 tie, equal means -> first in order (2)
  assert evaluate.vote(patients, predictions, 8, probs=probs) == {0: 4, 1: 2, 2: 5}
  assert evaluate.vote(patients, predictions, 8) == {0: 4, 1: 2, 2: 3}


def test_subtype_summary_per_class_metrics_match_hand_made_cases():
  """Guards against per-class precision/recall/F1 or the 8x8 confusion being computed on the
  binary classes, or the patient vote not being a plurality."""
  # 40X only; subtypes A=0, F=1, DC=4. Patient 0 (A): predicted A, A, F; patient 1 (F): F, F;
  # patient 2 (DC): DC, A, A.
  subtypes = np.array([0, 0, 0, 1, 1, 4, 4, 4])
  predictions = np.array([0, 0, 1, 1, 1, 4, 0, 0])
  probs = np.eye(8)[predictions]
  out = _evaluate(
      probs=probs, labels=(subtypes >= 4).astype(int), subtypes=subtypes,
      patients=np.array([0, 0, 0, 1, 1, 2, 2, 2]), magnifications=np.zeros(8, int),
      patient_ids=("A-1", "F-1", "DC-1"), task="subtype", selected=("40X",))
  per_class = out["per_class"]["40X"]
  # A: predicted 4 times, 2 right -> precision 1/2; recall 2/3; F1 = 2*(1/2*2/3)/(1/2+2/3) = 4/7
  assert per_class["A"] == {"precision": 0.5, "recall": pytest.approx(2 / 3),
                            "f1": pytest.approx(4 / 7), "support": 3}
  assert per_class["F"] == {"precision": pytest.approx(2 / 3), "recall": 1.0,
                            "f1": pytest.approx(0.8), "support": 2}
  assert per_class["DC"] == {"precision": 1.0, "recall": pytest.approx(1 / 3),
                             "f1": pytest.approx(0.5), "support": 3}
  assert per_class["PC"] == {"precision": None, "recall": None, "f1": None, "support": 0}
  confusion = np.zeros((8, 8), int)
  for t, p in zip(subtypes, predictions, strict=True):
    confusion[t, p] += 1
  assert out["confusion_matrix"]["40X"] == confusion.tolist()
  assert [p["vote"] for p in out["per_group"]["40X"]] == ["A", "F", "A"]
  assert out["group_accuracy"]["40X"] == pytest.approx(2 / 3)
  assert out["multiclass"]["40X"]["image"]["balanced_accuracy"] == pytest.approx(
      (2 / 3 + 1 + 1 / 3) / 3)
  # Macro F1: the unweighted mean over the 3 subtypes present (not weighted by their 3, 2, 3
  # images); at patient level, of the votes A, F, A for patients A, F, DC.
  assert out["multiclass"]["40X"]["image"]["macro_f1"] == pytest.approx((4 / 7 + 0.8 + 0.5) / 3)
  assert out["multiclass"]["40X"]["group"]["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
  patient = out["group_per_class"]["40X"]
  assert patient["A"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3),
                          "support": 1}
  assert patient["F"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
  assert patient["DC"] == {"precision": None, "recall": 0.0, "f1": 0.0, "support": 1}
  assert (out["strata"]["magnification"]["selected"], out["strata"]["magnification"]["absent"]) == (
      ["40X"], [])
  assert "clinical" not in out


def test_binary_results_have_clinical_figures_per_magnification_and_overall():
  """Guards against the clinical figures missing a magnification, or covering an absent one."""
  data = _patients_data(10)
  mags = np.where(np.arange(60) % 2 == 0, 0, 1)  # 40X and 100X; 200X selected but absent
  probs = np.stack([1 - data["scores"], data["scores"]], -1)
  out = _evaluate(
      probs=probs, labels=data["labels"], subtypes=np.where(data["labels"] == 1, 4, 0),
      patients=data["groups"], magnifications=mags, selected=("40X", "100X", "200X"),
      bootstrap_resamples=50, bootstrap_seed=0)
  assert (out["strata"]["magnification"]["selected"], out["strata"]["magnification"]["absent"]) == (
      ["40X", "100X", "200X"], ["200X"])
  assert set(out["image_accuracy"]) == {"40X", "100X"}
  for level in ("image", "group"):
    assert set(out["clinical"][level]) == {"40X", "100X", "all"}
  sel = mags == 0
  direct = metrics.binary_metrics(data["labels"][sel], data["scores"][sel],
                                  data["predictions"][sel])
  assert {k: v["value"] for k, v in out["clinical"]["image"]["40X"].items()} == direct
  assert out["clinical"]["bootstrap"]["resamples"] == 50
  assert "absent (no test images in this fold): 200X" in evaluate.format_table(
      {**out, "group_unit": "patient"})
  # 'all': every image of both magnifications; a patient votes with all its images.
  value = lambda level, group: {k: v["value"] for k, v in out["clinical"][level][group].items()}
  assert value("image", "all") == pytest.approx(
      _sklearn_figures(data["labels"], data["scores"], data["predictions"]))
  p_labels = (np.arange(10) % 2)
  mean = [data["scores"][data["groups"] == p].mean() for p in range(10)]
  votes = [int(data["predictions"][data["groups"] == p].mean() > 0.5) for p in range(10)]
  assert value("group", "all") == pytest.approx(_sklearn_figures(p_labels, mean, votes))


def test_clinical_patient_figures_follow_the_tie_rule():
  """Guards against the clinical patient-level figures ignoring `tie_rule` (while the patient
  accuracy follows it): benign patient 0 and malignant patient 3 tie 1-1; under 'benign' the
  votes are 0, 1, 0, 0 (sensitivity 1/2, specificity 1), under 'malignant' 1, 1, 0, 1 (1, 1/2)."""
  patients = np.array([0, 0, 1, 1, 1, 2, 2, 3, 3])
  labels = np.array([0, 0, 1, 1, 1, 0, 0, 1, 1])
  p_malignant = np.array([0.3, 0.7, 0.8, 0.9, 0.2, 0.1, 0.4, 0.6, 0.45])
  expected = {"benign": (0.5, 1.0), "malignant": (1.0, 0.5)}
  for rule, (sensitivity, specificity) in expected.items():
    out = _evaluate(
        probs=np.stack([1 - p_malignant, p_malignant], -1), labels=labels,
        subtypes=np.where(labels == 1, 4, 0), patients=patients,
        magnifications=np.zeros(9, int), tie_rule=rule)
    assert out["group_accuracy"]["40X"] == pytest.approx((sensitivity * 2 + specificity * 2) / 4)
    for group in ("40X", "all"):
      figures = out["clinical"]["group"][group]
      assert figures["sensitivity"]["value"] == sensitivity, (rule, group)
      assert figures["specificity"]["value"] == specificity, (rule, group)


def test_multiclass_figures_leave_out_classes_absent_from_the_labels():
  """A class predicted once but absent from the labels (an 8-class test set may lack a subtype):
  macro F1 over the classes present, by hand (class 0: 2/3, class 1: 1), and that class' own F1
  and recall undefined, its precision 0."""
  labels, predictions = np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1])
  summary = metrics.multiclass_summary(labels, predictions)
  assert summary["macro_f1"] == pytest.approx((2 / 3 + 1) / 2)
  assert summary["balanced_accuracy"] == pytest.approx((1 / 2 + 1) / 2)
  per_class = metrics.per_class_metrics(labels, predictions, ["a", "b", "c"])
  assert per_class["c"] == {"precision": 0.0, "recall": None, "f1": None, "support": 0}
  assert per_class["a"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3,
                                          "support": 2})
