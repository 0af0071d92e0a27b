"""Clinical and per-class metrics of a test set, with confidence intervals by a group bootstrap.

Every figure is computed by scikit-learn (`sklearn.metrics`) from labels, predictions and predicted
probabilities passed in, so the caller decides how the probabilities were made (one pass, or the
mean over test-time augmentations):

* `binary_metrics`: sensitivity (recall of the positive class), specificity (recall of the
  negative one), balanced accuracy (their mean), F1 of the positive class and ROC-AUC of
  P(positive); None where a figure is
  undefined (a class absent from the test set).
* `per_class_metrics` and `confusion`: precision, recall, F1 and support per class, and the
  k x k confusion matrix (rows: truth), for the 8-class subtype task.
* `group_bootstrap`: 95% percentile intervals by resampling GROUPS (BreakHis: patients) with
  replacement (their images are correlated, so resampling images would give intervals that are
  too narrow). Resampling is stratified by the group's class, so every resample holds both
  classes; a resample is the original data with each group weighted by how often it was drawn,
  which is exactly the data set of the drawn groups with repeats. `WeightedBinaryMetrics` computes
  the figures of all resamples at once (scikit-learn, called once per resample, takes ~20 s per
  thousand); tests check it equals scikit-learn's `sample_weight` figures. Seeded: the same
  seed, the same intervals.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from sklearn import metrics as skm

BINARY_METRICS = ("sensitivity", "specificity", "balanced_accuracy", "f1", "roc_auc")
LEVEL = 0.95  # of the bootstrap intervals
# The most resamples a bootstrap draws (config.bootstrap_resamples): the weights matrix is
# resamples x patients float64 (100,000 x 82 patients: 66 MB, and a few seconds of arithmetic).
MAX_RESAMPLES = 100_000


def _none_if_nan(x) -> float | None:
  return None if x is None or not np.isfinite(x) else float(x)


def binary_metrics(labels: np.ndarray, scores: np.ndarray, predictions: np.ndarray,
                   sample_weight: np.ndarray | None = None) -> dict[str, float | None]:
  """BINARY_METRICS of 0/1 `labels` (1 positive), predicted classes and P(positive) `scores`."""
  labels, predictions = np.asarray(labels), np.asarray(predictions)
  weight = np.ones(len(labels)) if sample_weight is None else np.asarray(sample_weight, float)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # undefined figures come back as NaN, then None
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        labels, predictions, labels=[0, 1], sample_weight=weight, zero_division=np.nan)
  present = [bool(np.sum(weight[labels == c]) > 0) for c in (0, 1)]
  specificity, sensitivity = (_none_if_nan(recall[c]) if present[c] else None for c in (0, 1))
  balanced = (sensitivity + specificity) / 2 if all(present) else None
  auc = (float(skm.roc_auc_score(labels, scores, sample_weight=weight)) if all(present)
         else None)
  return {"sensitivity": sensitivity, "specificity": specificity, "balanced_accuracy": balanced,
          "f1": _none_if_nan(f1[1]) if present[1] else None, "roc_auc": auc}


def per_class_metrics(labels: np.ndarray, predictions: np.ndarray,
                      class_names: Sequence[str]) -> dict[str, dict[str, float | int | None]]:
  """{class: {precision, recall, f1, support}}; None where undefined (never predicted, no
  images of the class)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, predictions, labels=list(range(len(class_names))), zero_division=np.nan)
  return {name: {"precision": _none_if_nan(precision[i]), "recall": _none_if_nan(recall[i]),
                 "f1": _none_if_nan(f1[i]) if support[i] else None, "support": int(support[i])}
          for i, name in enumerate(class_names)}


def multiclass_summary(labels: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
  """Balanced accuracy (mean recall over the classes present) and macro F1 over those classes."""
  present = sorted(set(np.asarray(labels).tolist()))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # a predicted class absent from the labels
    return {"balanced_accuracy": float(skm.balanced_accuracy_score(labels, predictions)),
            "macro_f1": float(skm.f1_score(labels, predictions, labels=present, average="macro",
                                           zero_division=0))}


def confusion(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> list[list[int]]:
  """k x k counts, rows the true class, columns the predicted one."""
  return skm.confusion_matrix(labels, predictions, labels=list(range(num_classes))).tolist()


class WeightedBinaryMetrics:
  """BINARY_METRICS of items (images or groups) under many group weightings at once.

  The bootstrap's inner loop: per-group confusion counts and a group x group matrix of
  Mann-Whitney pair counts are summed once, so that a weighting W [B, G] (how often each group
  was drawn, in each of B resamples) gives every figure by a few matrix products. Equal to
  `binary_metrics(..., sample_weight=W[b, units])` for each b (tests check this against
  scikit-learn); NaN where a figure is undefined.
  """

  def __init__(self, labels, scores, predictions, units, num_units: int):
    labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
    predictions, units = np.asarray(predictions), np.asarray(units)
    onehot = np.zeros((len(labels), num_units))
    onehot[np.arange(len(labels)), units] = 1.0
    # counts[g] = (tn, fp, fn, tp) of group g's items
    cells = 2 * labels + predictions
    self.counts = onehot.T @ np.eye(4)[cells]
    pos, neg = labels == 1, labels == 0
    pairs = ((scores[pos][:, None] > scores[neg][None, :])
             + 0.5 * (scores[pos][:, None] == scores[neg][None, :]))
    self.pairs = onehot[pos].T @ pairs @ onehot[neg]  # [P, P]: pos items of p over neg of q

  def __call__(self, weights: np.ndarray) -> dict[str, np.ndarray]:
    weights = np.atleast_2d(weights)
    tn, fp, fn, tp = (weights @ self.counts).T
    with np.errstate(divide="ignore", invalid="ignore"):
      sensitivity, specificity = tp / (tp + fn), tn / (tn + fp)
      auc = np.einsum("bp,pq,bq->b", weights, self.pairs, weights) / ((tp + fn) * (tn + fp))
      return {"sensitivity": sensitivity, "specificity": specificity,
              "balanced_accuracy": (sensitivity + specificity) / 2,
              "f1": np.where(tp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan), "roc_auc": auc}


def stratified_weights(strata: np.ndarray, resamples: int, seed: int) -> np.ndarray:
  """[resamples, G]: how often each group is drawn when, within each stratum (a group's class),
  as many groups as the stratum has are drawn with replacement."""
  strata = np.asarray(strata)
  rng = np.random.default_rng(seed)
  weights = np.zeros((resamples, len(strata)))
  for c in np.unique(strata):
    members = np.flatnonzero(strata == c)
    n = len(members)
    draws = rng.integers(0, n, (resamples, n))
    # Row b's counts: one bincount over all rows, each row's draws offset by b * n.
    counts = np.bincount((draws + n * np.arange(resamples)[:, None]).ravel(),
                         minlength=resamples * n)
    weights[:, members] = counts.reshape(resamples, n)
  return weights


def group_bootstrap(statistic: Callable[[np.ndarray], Mapping[str, np.ndarray]],
                    strata: np.ndarray, *, resamples: int, seed: int,
                    level: float = LEVEL) -> dict[str, list[float] | None]:
  """Percentile intervals of `statistic(W)` over `resamples` stratified group resamples.

  `statistic` maps group weights W [B, G] to named figures [B] (NaN where undefined); `strata`
  holds each group's stratum (its class; all equal for an unstratified bootstrap).
  Returns {name: [low, high]}, None where no resample defined the figure.
  """
  values = statistic(stratified_weights(strata, resamples, seed))
  tail = 100 * (1 - level) / 2
  out = {}
  for name, v in values.items():
    v = v[np.isfinite(v)]
    out[name] = [float(x) for x in np.percentile(v, [tail, 100 - tail])] if len(v) else None
  return out


def clinical_metrics(*, labels: np.ndarray, scores: np.ndarray, predictions: np.ndarray,
                     groups: np.ndarray, group_votes: Mapping[int, int] | None, resamples: int,
                     seed: int) -> dict[str, dict[str, dict]]:
  """BINARY_METRICS of one set of test images, at image level and (with `group_votes`) at group
  level, with 95% intervals from a bootstrap over groups.

  Image level: each image's P(positive) `scores` and 0/1 predicted class. Group level (only when
  every group has one label; `group_votes` maps each group to its 0/1 vote): a group's score is
  the mean P(positive) of its images (ROC-AUC), its prediction its vote. Point estimates by
  `binary_metrics` (scikit-learn); intervals by `group_bootstrap` with `resamples` resamples (none
  when 0), stratified by the group's label when groups have one, else unstratified.
  Returns {image[, group]: {metric: {value, ci95}}}.
  """
  labels, scores, predictions = map(np.asarray, (labels, scores, predictions))
  ids = np.unique(groups)
  index = np.searchsorted(ids, groups)  # image -> position of its group in ids
  levels = {"image": (labels, scores, predictions, index)}
  strata = np.zeros(len(ids), np.int64)
  if group_votes is not None:
    g_labels = np.array([labels[index == i][0] for i in range(len(ids))])
    g_scores = np.array([scores[index == i].mean() for i in range(len(ids))])
    g_votes = np.array([group_votes[int(g)] for g in ids])
    levels["group"] = (g_labels, g_scores, g_votes, np.arange(len(ids)))
    strata = g_labels
  out = {}
  for level, (y, s, pred, units) in levels.items():
    point = binary_metrics(y, s, pred)
    ci = {}
    if resamples:
      statistic = WeightedBinaryMetrics(y, s, pred, units, len(ids))
      ci = group_bootstrap(statistic, strata, resamples=resamples, seed=seed)
    out[level] = {name: {"value": point[name], "ci95": ci.get(name)} for name in BINARY_METRICS}
  return out


def roc_figure(groups: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str):
  """A matplotlib Figure with one ROC curve per group {name: (0/1 labels, scores)}."""
  fig = Figure(figsize=(5.5, 5), layout="constrained")
  ax = fig.subplots()
  for name, (labels, scores) in groups.items():
    if len(np.unique(labels)) < 2:
      continue  # a curve needs both classes
    fpr, tpr, _ = skm.roc_curve(labels, scores)
    ax.plot(fpr, tpr, label=f"{name} (AUC {skm.roc_auc_score(labels, scores):.3f})")
  ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
  ax.set_xlabel("1 - specificity (false positive rate)")
  ax.set_ylabel("sensitivity (true positive rate)")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1.01)
  ax.set_title(title, fontsize=9)
  ax.legend(loc="lower right", fontsize=8)
  return fig
