"""The evaluator on hand-made fold descriptions that are not BreakHis: every figure worked out by
hand from the predictions written below."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from jattn.data.fold import ClassMap, FoldData, Strata
from jattn.evaluation import evaluate


def fold(targets, groups, strata_index, *, classes=("a", "b", "c"), binary=None,
         strata_values=("centre1", "centre2"), extra_axis=None) -> FoldData:
  n = len(targets)
  strata = [Strata("centre", strata_values, np.asarray(strata_index, np.int32))]
  if extra_axis is not None:
    strata.append(Strata("scanner", ("s1", "s2"), np.asarray(extra_axis, np.int32)))
  return FoldData(
      source="handmade", images=np.zeros((n, 1, 1, 3), np.uint8),
      file_names=tuple(f"img{i}.png" for i in range(n)),
      targets=np.asarray(targets, np.int32), classes=classes,
      groups=np.asarray(groups, np.int32), group_ids=tuple(f"g{i}" for i in range(max(groups) + 1)),
      strata=tuple(strata), train_indices=np.zeros(0, np.int64),
      test_indices=np.arange(n, dtype=np.int64), mean=np.zeros(3, np.float32),
      std=np.ones(3, np.float32), fold=1, folds_source="by hand", group_unit="slide",
      binary=binary)


def one_hot_probs(predictions, k, confidence=0.8):
  probs = np.full((len(predictions), k), (1 - confidence) / (k - 1))
  probs[np.arange(len(predictions)), predictions] = confidence
  return probs


# Three classes, two centres, four slides each of one class:
#   slide 0 (a): centre1 images predicted a, a, b   centre2: a
#   slide 1 (b): centre1 b, c                        centre2: b, b
#   slide 2 (c): centre1 c                           centre2: a, c, c
#   slide 3 (a): centre1 b, b                        (no centre2 images)
TARGETS = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0]
GROUPS = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3]
CENTRE = [0, 0, 0, 1, 0, 0, 1, 1, 0, 1, 1, 1, 0, 0]
PREDICTED = [0, 0, 1, 0, 1, 2, 1, 1, 2, 0, 2, 2, 1, 1]


def test_three_classes_two_strata_single_label_groups():
  d = fold(TARGETS, GROUPS, CENTRE)
  out = evaluate.evaluate(one_hot_probs(PREDICTED, 3), d, d.test_indices, tie_rule="")
  # centre1: 8 images (0,1,2,4,5,8,12,13), right: 0,1,4,8 -> 4/8
  assert out["image_accuracy"] == {"centre1": 0.5, "centre2": pytest.approx(5 / 6)}
  assert out["num_images"] == {"centre1": 8, "centre2": 6}
  assert out["num_groups"] == {"centre1": 4, "centre2": 3}
  # votes in centre1: slide 0 a,a,b -> a (right); slide 1 b,c tie -> mean prob equal, first: b
  # (right); slide 2 c (right); slide 3 b,b -> b (wrong) -> 3/4.
  # centre2: slide 0 a (right); slide 1 b,b (right); slide 2 a,c,c -> c (right) -> 3/3.
  assert out["group_accuracy"] == {"centre1": 0.75, "centre2": 1.0}
  votes = {r["group"]: r["vote"] for r in out["per_group"]["centre1"]}
  assert votes == {"g0": "a", "g1": "b", "g2": "c", "g3": "b"}
  # recognition rate centre1: slide0 2/3, slide1 1/2, slide2 1, slide3 0 -> mean
  assert out["group_recognition_rate"]["centre1"] == pytest.approx((2 / 3 + 1 / 2 + 1 + 0) / 4)
  assert out["group_recognition_rate"]["centre2"] == pytest.approx((1 + 1 + 2 / 3) / 3)
  # majority class of centre1's images: a has 5 of 8; of its slides: a has 2 of 4
  assert out["majority_baseline"]["centre1"] == {"image": 5 / 8, "group": 0.5}
  assert out["confusion_matrix"]["centre1"] == [[2, 3, 0], [0, 1, 1], [0, 0, 1]]
  assert out["group_confusion_matrix"]["centre1"] == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
  assert out["per_group"]["centre1"][0] == {"group": "g0", "label": "a", "vote": "a",
                                            "images": 3, "correct_images": 2}
  # per-class figures against scikit-learn on the same images, and over all images
  sel = np.array(CENTRE) == 0
  recall = skm.recall_score(np.array(TARGETS)[sel], np.array(PREDICTED)[sel], average=None)
  assert [out["per_class"]["centre1"][c]["recall"] for c in "abc"] == pytest.approx(recall)
  assert out["per_class"][evaluate.ALL]["a"]["support"] == 6
  assert out["multiclass"][evaluate.ALL]["image"]["balanced_accuracy"] == pytest.approx(
      skm.balanced_accuracy_score(TARGETS, PREDICTED))
  assert "clinical" not in out  # three classes: per-class figures, no binary ones
  assert out["group_figures"] == {"reported": True}
  assert out["strata"]["centre"]["absent"] == []


def test_groups_with_mixed_labels_omit_votes_but_the_bootstrap_resamples_groups():
  # Two classes, positive 'tumour'; slide 0 holds images of both classes.
  targets = [0, 1, 1, 0, 0, 1, 1, 1]
  groups = [0, 0, 0, 1, 1, 2, 2, 3]
  centre = [0, 0, 1, 0, 1, 0, 1, 1]
  scores = np.array([0.2, 0.7, 0.4, 0.1, 0.6, 0.9, 0.8, 0.3])
  probs = np.stack([1 - scores, scores], -1)
  binary = ClassMap(("normal", "tumour"), (0, 1), 1)
  d = fold(targets, groups, centre, classes=("normal", "tumour"), binary=binary)
  out = evaluate.evaluate(probs, d, d.test_indices, tie_rule="normal", bootstrap_resamples=200,
                          bootstrap_seed=3)
  for key in ("group_accuracy", "group_confusion_matrix"):
    assert key not in out
  assert "group" not in out["majority_baseline"]["centre1"]
  assert out["group_figures"]["reported"] is False and "several" in out["group_figures"]["why"]
  assert "label" not in out["per_group"]["centre1"][0]
  assert set(out["clinical"]) == {"image", "bootstrap"}
  assert out["clinical"]["bootstrap"]["unit"] == "slide"
  assert out["clinical"]["bootstrap"]["stratified_by"] is None
  # point estimates: scikit-learn on all images
  pred = (scores > 0.5).astype(int)
  image = out["clinical"]["image"][evaluate.ALL]
  assert image["roc_auc"]["value"] == pytest.approx(skm.roc_auc_score(targets, scores))
  assert image["sensitivity"]["value"] == pytest.approx(skm.recall_score(targets, pred))
  # the interval: resample the 4 slides (unstratified) with the same generator by hand
  rng = np.random.default_rng(3)
  draws = rng.integers(0, 4, (200, 4))
  aucs = []
  for b in range(200):
    weight = np.bincount(draws[b], minlength=4)[groups]
    if len(set(np.array(targets)[weight > 0])) == 2:
      aucs.append(skm.roc_auc_score(targets, scores, sample_weight=weight))
  assert image["roc_auc"]["ci95"] == pytest.approx(np.percentile(aucs, [2.5, 97.5]))


def test_two_strata_axes_key_columns_by_axis():
  d = fold([0, 1, 0, 1], [0, 1, 2, 3], [0, 0, 1, 1], classes=("x", "y"),
           binary=ClassMap(("x", "y"), (0, 1), 1), extra_axis=[0, 1, 0, 1])
  out = evaluate.evaluate(one_hot_probs([0, 1, 1, 1], 2), d, d.test_indices, tie_rule="x")
  assert list(out["image_accuracy"]) == ["centre=centre1", "centre=centre2", "scanner=s1",
                                         "scanner=s2"]
  assert out["image_accuracy"]["scanner=s1"] == 0.5  # images 0 (right) and 2 (wrong)
  assert out["image_accuracy"]["centre=centre1"] == 1.0


def test_binary_tie_goes_to_the_tie_rule_class():
  d = fold([1, 1, 0], [0, 0, 1], [0, 0, 0], classes=("neg", "pos"),
           binary=ClassMap(("neg", "pos"), (0, 1), 1))
  probs = one_hot_probs([0, 1, 0], 2)
  to_neg = evaluate.evaluate(probs, d, d.test_indices, tie_rule="neg")
  to_pos = evaluate.evaluate(probs, d, d.test_indices, tie_rule="pos")
  assert to_neg["group_accuracy"]["centre1"] == 0.5  # slide 0 (pos) ties -> neg: wrong
  assert to_pos["group_accuracy"]["centre1"] == 1.0
  with pytest.raises(ValueError, match="tie_rule='coin'"):
    evaluate.evaluate(probs, d, d.test_indices, tie_rule="coin")
  # tie_rule '' (a source without a negative class): the tied class of higher mean probability.
  # Slide 0's images: P = (0.9, 0.1) and (0.3, 0.7): means 0.6 (neg) and 0.4 (pos) -> neg.
  probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.8, 0.2]])
  assert evaluate.evaluate(probs, d, d.test_indices, tie_rule="")["per_group"]["centre1"][0][
      "vote"] == "neg"
  probs[0] = [0.6, 0.4]  # means 0.45 and 0.55 -> pos
  assert evaluate.evaluate(probs, d, d.test_indices, tie_rule="")["per_group"]["centre1"][0][
      "vote"] == "pos"
