"""The protocol's figures on hand-made predictions of a BreakHis-like fold description."""

from __future__ import annotations

import numpy as np
import pytest

from jattn.data.breakhis import MAGNIFICATIONS, source
from jattn.evaluation import evaluate
from tests.runs import breakhis_fold


def one_hot(predictions, k=2):
  probs = np.full((len(predictions), k), 0.1 / (k - 1))
  probs[np.arange(len(predictions)), predictions] = 0.9
  return probs


def test_binary_vote_majority_and_ties():
  patients = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
  predictions = np.array([1, 1, 0, 1, 0, 0, 0, 1, 0])
  # patient 0: 2 malignant vs 1 benign; patient 1: a tie; patient 2: 1 vs 3
  assert evaluate.vote(patients, predictions, 2, tie_class=0) == {0: 1, 1: 0, 2: 0}
  assert evaluate.vote(patients, predictions, 2, tie_class=1) == {0: 1, 1: 1, 2: 0}


def test_patient_accuracy_and_recognition_rate_differ():
  # patient 0 (malignant): 3 of 4 images right -> vote right; patient 1 (benign): 1 of 3 right ->
  # vote wrong; patient 2 (malignant): a 1-1 tie -> benign under the authors' rule -> wrong.
  patients = [0, 0, 0, 0, 1, 1, 1, 2, 2]
  labels = [1, 1, 1, 1, 0, 0, 0, 1, 1]
  predictions = [1, 1, 1, 0, 0, 1, 1, 1, 0]
  d = breakhis_fold(labels, patients, np.zeros(9, int), [4] * 4 + [0] * 3 + [4] * 2)
  benign = evaluate.evaluate(one_hot(predictions), d, d.test_indices, tie_rule="benign")
  malignant = evaluate.evaluate(one_hot(predictions), d, d.test_indices, tie_rule="malignant")
  assert benign["group_accuracy"]["40X"] == pytest.approx(1 / 3)
  assert malignant["group_accuracy"]["40X"] == pytest.approx(2 / 3)
  # recognition rate: mean of 3/4, 1/3 and 1/2
  assert benign["group_recognition_rate"]["40X"] == pytest.approx((3 / 4 + 1 / 3 + 1 / 2) / 3)
  assert evaluate.recognition_rate(np.array(patients), np.array(predictions),
                                   np.array(labels)) == pytest.approx((3 / 4 + 1 / 3 + 1 / 2) / 3)


def test_figures_per_magnification():
  # two magnifications (40X = 0, 400X = 3); subtypes index SUBTYPE_CODES (0 'A', 4 'DC')
  labels = [0, 0, 1, 1, 1, 0, 1]
  predictions = [0, 1, 1, 1, 0, 0, 1]
  patients = [0, 0, 1, 1, 1, 0, 1]
  magnifications = [0, 0, 0, 0, 0, 3, 3]
  subtypes = [0, 0, 4, 4, 4, 0, 4]
  d = breakhis_fold(labels, patients, magnifications, subtypes, patient_ids=("A-14-1", "DC-14-2"))
  out = evaluate.evaluate(one_hot(predictions), d, d.test_indices, tie_rule="benign")
  assert set(out["image_accuracy"]) == {"40X", "400X"}  # magnifications without images are absent
  assert out["image_accuracy"]["40X"] == pytest.approx(3 / 5)
  assert out["image_accuracy"]["400X"] == 1.0
  # 40X: patient 0 (benign) ties 1-1 -> benign -> right; patient 1 votes 2-1 malignant -> right
  assert out["group_accuracy"]["40X"] == 1.0
  assert out["group_recognition_rate"]["40X"] == pytest.approx((1 / 2 + 2 / 3) / 2)
  assert out["majority_baseline"]["40X"] == {"image": 3 / 5, "group": 0.5}
  assert out["num_images"] == {"40X": 5, "400X": 2}
  assert out["num_groups"] == {"40X": 2, "400X": 2}
  assert out["confusion_matrix"]["40X"] == [[1, 1], [1, 2]]
  assert out["group_confusion_matrix"]["40X"] == [[1, 0], [0, 1]]
  assert out["subclass_accuracy"]["40X"] == {"A": 0.5, "DC": pytest.approx(2 / 3)}
  assert out["per_group"]["40X"][1] == {"group": "DC-14-2", "label": "malignant",
                                        "vote": "malignant", "images": 3, "correct_images": 2}
  assert out["strata"]["magnification"]["absent"] == ["100X", "200X"]  # selected, not tested
  table = evaluate.format_table({**out, "group_unit": "patient"})
  assert "60.0" in table and "100.0" in table


def test_figures_count_a_tie_by_the_tie_rule():
  """Guards against the evaluator ignoring `tie_rule` (`--config.tie_rule=malignant` silently
  doing nothing in results.json): a benign patient whose images tie 1-1 is right under 'benign',
  wrong under 'malignant', at the patient level only."""
  d = breakhis_fold([0, 0, 1, 1, 1], [0, 0, 1, 1, 1], np.zeros(5, int), [0, 0, 4, 4, 4])

  def figures(tie_rule):
    return evaluate.evaluate(one_hot([0, 1, 1, 1, 0]), d, d.test_indices, tie_rule=tie_rule)

  benign, malignant = figures("benign"), figures("malignant")
  assert benign["group_accuracy"]["40X"] == 1.0  # patient 0 ties -> benign (right), 1 -> 2:1
  assert malignant["group_accuracy"]["40X"] == 0.5  # patient 0 ties -> malignant (wrong)
  assert [p["vote"] for p in malignant["per_group"]["40X"]] == ["malignant", "malignant"]
  assert malignant["group_confusion_matrix"]["40X"] == [[0, 1], [0, 1]]
  for key in ("image_accuracy", "group_recognition_rate", "confusion_matrix"):
    assert benign[key] == malignant[key], key  # the image-level figures have no vote


def test_format_table_rows_carry_their_labels_and_figures():
  """Guards against rows of the printed table being swapped or mislabelled (Table 1's image
  accuracy shown as Table 2's patient accuracy): every row is read back by its label."""
  mags = MAGNIFICATIONS
  results = {
      "group_unit": "patient",
      "strata": {"magnification": {"values": list(mags), "absent": []}},
      "image_accuracy": dict(zip(mags, (0.911, 0.912, 0.913, 0.914), strict=True)),
      "group_accuracy": dict(zip(mags, (0.821, 0.822, 0.823, 0.824), strict=True)),
      "group_recognition_rate": dict(zip(mags, (0.731, 0.732, 0.733, 0.734), strict=True)),
      "majority_baseline": {m: {"image": 0.6, "group": 0.55} for m in mags},
      "num_images": dict(zip(mags, (100, 101, 102, 103), strict=True)),
      "num_groups": dict.fromkeys(mags, 25),
  }
  lines = evaluate.format_table(results).splitlines()
  assert lines[0].split() == list(mags)
  rows = {line[:26].strip(): line[26:].split() for line in lines[1:]}
  assert rows == {
      "image accuracy": ["91.1", "91.2", "91.3", "91.4"],
      "patient accuracy": ["82.1", "82.2", "82.3", "82.4"],
      "patient recognition rate": ["73.1", "73.2", "73.3", "73.4"],
      "majority class, image": ["60.0"] * 4,
      "majority class, patient": ["55.0"] * 4,
      "test images / patients": ["100/25", "101/25", "102/25", "103/25"],
  }


def test_malignant_probability_sums_the_malignant_outputs():
  """Guards against reading P(malignant) as output 1 in a subtype run (where output 1 is
  fibroadenoma, a benign subtype): the four malignant subtypes' probabilities are summed."""
  binary, subtype = source.binary_map("binary"), source.binary_map("subtype")
  assert [binary.names[c] for c in binary.of] == ["benign", "malignant"]
  assert [subtype.names[c] for c in subtype.of] == ["benign"] * 4 + ["malignant"] * 4
  np.testing.assert_allclose(binary.positive_probability(np.array([[0.3, 0.7], [0.9, 0.1]])),
                             [0.7, 0.1])
  probs = np.array([[0.05, 0.5, 0.05, 0.0, 0.1, 0.1, 0.1, 0.1]])
  np.testing.assert_allclose(subtype.positive_probability(probs), [0.4])


def test_roc_plot_draws_the_roc_of_p_malignant_per_magnification(tmp_path, monkeypatch):
  """Guards against roc.png's curves being drawn from P(benign) (the mirror image, AUC 1 - AUC) or
  from the wrong magnification's rows: each curve's points are scikit-learn's ROC of the rows'
  prob_malignant, and its legend carries that AUC."""
  from sklearn import metrics as skm

  from jattn.evaluation import metrics

  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 40)
  p_malignant = np.clip(0.35 + 0.3 * labels + rng.normal(0, 0.2, 40), 0, 1).round(3)
  mags = np.where(np.arange(40) < 15, "40X", "200X")
  rows = [{"label": ("benign", "malignant")[y], "prob_malignant": f"{p:.6f}", "magnification": m}
          for y, p, m in zip(labels, p_malignant, mags, strict=True)]
  figures, roc_figure = [], metrics.roc_figure

  def keep(*args):  # the figure write_roc_plot saves
    figures.append(roc_figure(*args))
    return figures[-1]

  monkeypatch.setattr(metrics, "roc_figure", keep)
  evaluate.write_roc_plot(str(tmp_path / "roc.png"), rows, positive="malignant",
                          stratum="magnification", order=MAGNIFICATIONS, title="a run")
  with open(tmp_path / "roc.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  lines = [line for line in figures[0].axes[0].get_lines() if line.get_label()[0] != "_"]
  expected = {"40X": mags == "40X", "200X": mags == "200X", "all": np.ones(40, bool)}
  assert [line.get_label().split()[0] for line in lines] == list(expected)
  for line, sel in zip(lines, expected.values(), strict=True):
    fpr, tpr, _ = skm.roc_curve(labels[sel], p_malignant[sel])
    np.testing.assert_allclose(line.get_xdata(), fpr)
    np.testing.assert_allclose(line.get_ydata(), tpr)
    auc = skm.roc_auc_score(labels[sel], p_malignant[sel])
    assert auc > 0.6 and line.get_label().endswith(f"(AUC {auc:.3f})")


def test_a_fold_without_groups_prints_no_group_rows_that_repeat_the_image_rows():
  """Each image its own group (a folder source without groups): the group figures equal the
  image figures (checked here by hand: 3 of 5 right, both ways), so the table shows the image rows
  and one line saying group level = image level; with real groups the group rows stay."""
  predictions = [0, 1, 1, 0, 1]
  d = breakhis_fold([0, 0, 1, 1, 1], [0, 1, 2, 3, 4], np.zeros(5, int), [0, 0, 4, 4, 4])
  out = evaluate.evaluate(one_hot(predictions), d, d.test_indices, tie_rule="benign")
  right = np.mean(np.array(predictions) == np.array([0, 0, 1, 1, 1]))
  assert out["image_accuracy"]["40X"] == out["group_accuracy"]["40X"] == right == 3 / 5
  table = evaluate.format_table({**out, "group_unit": "group"})
  labels = [line[:26].strip() for line in table.splitlines()[1:]]
  assert not [label for label in labels if label.startswith(("group", "majority class, group"))]
  assert "image accuracy" in labels and "image sensitivity" in labels
  assert table.count("no groups: each test image is its own group, so group level = image level") \
      == 1
  grouped = breakhis_fold([0, 0, 1, 1, 1], [0, 0, 1, 1, 1], np.zeros(5, int), [0, 0, 4, 4, 4])
  table = evaluate.format_table({**evaluate.evaluate(one_hot(predictions), grouped,
                                                     grouped.test_indices, tie_rule="benign"),
                                 "group_unit": "patient"})
  assert "patient accuracy" in table and "group level = image level" not in table
