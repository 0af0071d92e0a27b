"""Can a probability be trusted? Calibration figures of predicted probabilities, and temperature
scaling.

Conventions (docs/calibration.md):

* Two classes with a positive one (BreakHis' benign/malignant): the figures are those of
  P(positive), the probability a run reports (`prob_malignant`): a bin's confidence is its mean
  P(positive) and its accuracy the fraction of its items that are positive (the reliability
  diagram of scikit-learn's `calibration_curve`). More classes: the top-label convention of Guo
  et al. (2017), a bin's confidence the mean top probability, its accuracy the fraction whose top
  class is right, and the classwise ECE (Kull et al. 2019), the mean over classes of the ECE of
  each class's one-against-the-rest probability.
* ECE: `bins` equal-width bins over [0, 1], bin m holding the confidences in (m/M, (m+1)/M] (the
  first also 0), or equal-mass bins (the items in confidence order cut into M parts whose sizes
  differ by at most one; tied confidences at a cut may fall on both sides, in input order); ECE
  = sum over bins of (items in bin / items) x |accuracy − confidence|.
* Brier: half the mean over items of the squared distance between the probability vector and the
  one-hot label, sum_k (p_k − y_k)² / 2; with two classes this is the mean (P(positive) − y)²,
  scikit-learn's `brier_score_loss` either way. NLL: the mean −log p(label) (probabilities
  clipped at float64's eps, as scikit-learn's `log_loss`).
* AURC (selective classification): the items in decreasing top-label confidence, the risk at a
  coverage the error rate (top class wrong) of the items accepted; AURC is the mean over items of
  the risk at the coverage where the item is accepted. Tied confidences cannot be told apart, so
  a tie block is accepted together: every item of it carries the risk of the whole block
  accepted.

Every figure has a group-weighted form (`WeightedCalibration`) for the group bootstrap of
`jattn.evaluation.metrics`: a resample weights each group by how often it was drawn. Equal-width
bins, Brier, NLL and AURC under a weighting equal the figures of the resampled data set;
equal-mass bins keep the cuts of the unweighted items.

Temperature scaling (Guo et al. 2017): one T > 0 divides the logits, softmax(z / T); it changes
neither the top class nor the order of P(positive), so accuracy and ROC-AUC stay as they were.
`fit_temperature` minimises the NLL of validation logits over log T (SciPy's bounded scalar
minimiser). Where only probabilities are at hand, log p serves as the logits (softmax is
invariant to a shift of the logits, so softmax(log p / T) is exactly temperature scaling of the
model's logits; with test-time augmentation, of the log of the mean probability).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import scipy.optimize
import scipy.special
from matplotlib.figure import Figure

BINS = 15  # config.calibration.bins' default
FIGURES = ("ece", "ece_equal_mass", "classwise_ece", "brier", "nll", "aurc")
EPS = np.finfo(np.float64).eps  # probabilities are clipped here for the NLL (as scikit-learn)
T_BOUNDS = (0.01, 100.0)  # the temperatures fit_temperature searches


def equal_width_bins(confidence: np.ndarray, bins: int = BINS) -> np.ndarray:
  """Each confidence's bin among `bins` equal-width bins of [0, 1]: bin m holds (m/M, (m+1)/M],
  the first also 0."""
  edges = np.linspace(0.0, 1.0, bins + 1)
  return np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)


def equal_mass_bins(confidence: np.ndarray, bins: int = BINS) -> np.ndarray:
  """Each confidence's bin when the items, in increasing confidence (stable: ties in input
  order), are cut into `bins` parts of sizes that differ by at most one."""
  order = np.argsort(confidence, kind="stable")
  out = np.empty(len(confidence), np.int64)
  for m, part in enumerate(np.array_split(order, bins)):
    out[part] = m
  return out


def convention(probs: np.ndarray, labels: np.ndarray, positive: int | None):
  """(confidence, outcome in {0, 1}) of each item: P(positive) and whether the item is positive,
  or the top probability and whether the top class is right (`positive` None)."""
  if positive is not None:
    return probs[:, positive], (labels == positive).astype(np.float64)
  return probs.max(axis=1), (probs.argmax(axis=1) == labels).astype(np.float64)


def reliability(confidence: np.ndarray, outcome: np.ndarray, bins: np.ndarray, num_bins: int,
                weight: np.ndarray | None = None) -> list[dict]:
  """Per bin: `lower`, `upper` (equal-width edges), `count`, mean `confidence` and `accuracy`
  (mean outcome); None for an empty bin's means."""
  weight = np.ones(len(confidence)) if weight is None else weight
  count = np.bincount(bins, weight, num_bins)
  conf = np.bincount(bins, weight * confidence, num_bins)
  acc = np.bincount(bins, weight * outcome, num_bins)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  return [{"lower": float(edges[m]), "upper": float(edges[m + 1]), "count": float(count[m]),
           "confidence": float(conf[m] / count[m]) if count[m] else None,
           "accuracy": float(acc[m] / count[m]) if count[m] else None}
          for m in range(num_bins)]


def _ece(confidence, outcome, bins, num_bins) -> float:
  gap = np.bincount(bins, outcome - confidence, num_bins)
  return float(np.abs(gap).sum() / len(confidence))


def ece(probs: np.ndarray, labels: np.ndarray, *, positive: int | None = None, bins: int = BINS,
        equal_mass: bool = False) -> float:
  """Expected calibration error of class probabilities [N, k] against labels [N] (the module's
  conventions: of P(positive) with `positive`, else top-label)."""
  confidence, outcome = convention(np.asarray(probs, np.float64), np.asarray(labels), positive)
  assign = equal_mass_bins if equal_mass else equal_width_bins
  return _ece(confidence, outcome, assign(confidence, bins), bins)


def classwise_ece(probs: np.ndarray, labels: np.ndarray, *, bins: int = BINS) -> float:
  """The mean over classes of the equal-width ECE of P(class) against (label == class)."""
  probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
  return float(np.mean([ece(probs, labels, positive=c, bins=bins)
                        for c in range(probs.shape[1])]))


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
  """Half the mean squared distance to the one-hot label (two classes: mean (P(pos) − y)²)."""
  probs = np.asarray(probs, np.float64)
  onehot = np.eye(probs.shape[1])[np.asarray(labels)]
  return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)) / 2)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
  """Mean −log p(label), p clipped to [eps, 1] and rows renormalised (scikit-learn's log_loss)."""
  probs = np.clip(np.asarray(probs, np.float64), EPS, 1.0)
  probs = probs / probs.sum(axis=1, keepdims=True)
  return float(-np.mean(np.log(probs[np.arange(len(probs)), np.asarray(labels)])))


def _tie_blocks(confidence: np.ndarray) -> np.ndarray:
  """Each item's block among the distinct confidences, in decreasing confidence (block 0 the most
  confident)."""
  distinct = np.unique(confidence)[::-1]
  return np.searchsorted(-distinct, -confidence)


def aurc(probs: np.ndarray, labels: np.ndarray) -> float:
  """Area under the risk-coverage curve of top-label confidence (tie blocks accepted together)."""
  probs = np.asarray(probs, np.float64)
  confidence = probs.max(axis=1)
  error = (probs.argmax(axis=1) != np.asarray(labels)).astype(np.float64)
  block = _tie_blocks(confidence)
  k = int(block.max()) + 1
  n_block, e_block = np.bincount(block, minlength=k), np.bincount(block, error, k)
  risk = np.cumsum(e_block) / np.cumsum(n_block)
  return float(np.sum(n_block * risk) / len(probs))


def figures(probs: np.ndarray, labels: np.ndarray, *, positive: int | None = None,
            bins: int = BINS) -> dict[str, float]:
  """Every figure of FIGURES of one set of items (`classwise_ece` only for more than two
  classes)."""
  out = {"ece": ece(probs, labels, positive=positive, bins=bins),
         "ece_equal_mass": ece(probs, labels, positive=positive, bins=bins, equal_mass=True)}
  if np.shape(probs)[1] > 2:
    out["classwise_ece"] = classwise_ece(probs, labels, bins=bins)
  out.update(brier=brier(probs, labels), nll=nll(probs, labels), aurc=aurc(probs, labels))
  return out


class WeightedCalibration:
  """The figures of items under many group weightings at once (`metrics.group_bootstrap`'s
  statistic): per group and bin sums, so that a weighting W [B, G] gives each figure by a few
  matrix products."""

  def __init__(self, probs, labels, units, num_units: int, *, positive: int | None = None,
               bins: int = BINS):
    probs, labels, units = np.asarray(probs, np.float64), np.asarray(labels), np.asarray(units)
    n, k = probs.shape
    onehot = np.zeros((n, num_units))
    onehot[np.arange(n), units] = 1.0
    self.count = onehot.sum(axis=0)
    confidence, outcome = convention(probs, labels, positive)

    def gaps(conf, out, assign):  # [G, bins]: the sums of outcome − confidence per group and bin
      return onehot.T @ (np.eye(bins)[assign] * (out - conf)[:, None])

    self.gaps = {"ece": gaps(confidence, outcome, equal_width_bins(confidence, bins)),
                 "ece_equal_mass": gaps(confidence, outcome, equal_mass_bins(confidence, bins))}
    self.classwise = ([gaps(probs[:, c], (labels == c).astype(np.float64),
                            equal_width_bins(probs[:, c], bins)) for c in range(k)]
                      if k > 2 else None)
    target = np.eye(k)[labels]
    self.brier = onehot.T @ (np.sum((probs - target) ** 2, axis=1) / 2)
    clipped = np.clip(probs, EPS, 1.0)
    clipped = clipped / clipped.sum(axis=1, keepdims=True)
    self.nll = onehot.T @ -np.log(clipped[np.arange(n), labels])
    top = probs.max(axis=1)
    error = (probs.argmax(axis=1) != labels).astype(np.float64)
    block = _tie_blocks(top)
    self.block_count = np.zeros((num_units, int(block.max()) + 1))  # [G, K]: items per block
    self.block_error = np.zeros_like(self.block_count)  # and their errors
    np.add.at(self.block_count, (units, block), 1.0)
    np.add.at(self.block_error, (units, block), error)

  def __call__(self, weights: np.ndarray) -> dict[str, np.ndarray]:
    weights = np.atleast_2d(weights)
    total = weights @ self.count
    with np.errstate(divide="ignore", invalid="ignore"):
      out = {name: np.abs(weights @ g).sum(axis=1) / total for name, g in self.gaps.items()}
      if self.classwise is not None:
        out["classwise_ece"] = np.mean([np.abs(weights @ g).sum(axis=1) / total
                                        for g in self.classwise], axis=0)
      out["brier"] = weights @ self.brier / total
      out["nll"] = weights @ self.nll / total
      n_block, e_block = weights @ self.block_count, weights @ self.block_error
      risk = np.where(n_block > 0, np.cumsum(e_block, 1) / np.cumsum(n_block, 1), 0.0)
      out["aurc"] = np.sum(n_block * risk, axis=1) / total
    return out


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
  """softmax(log p / T) of probabilities [N, k] (p clipped at float64's eps); T = 1 returns the
  probabilities unchanged."""
  probs = np.asarray(probs)
  if temperature == 1.0:
    return probs
  logits = np.log(np.clip(np.asarray(probs, np.float64), EPS, 1.0))
  return scipy.special.softmax(logits / temperature, axis=1).astype(probs.dtype)


def temperature_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
  """Mean −log softmax(logits / T)[label]."""
  z = scipy.special.log_softmax(np.asarray(logits, np.float64) / temperature, axis=1)
  return float(-np.mean(z[np.arange(len(z)), np.asarray(labels)]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
  """The T in T_BOUNDS minimising the NLL of softmax(logits / T): SciPy's bounded scalar
  minimiser (Brent's method) over log T."""
  low, high = np.log(T_BOUNDS)
  result = scipy.optimize.minimize_scalar(
      lambda log_t: temperature_nll(logits, labels, float(np.exp(log_t))), bounds=(low, high),
      method="bounded", options={"xatol": 1e-10})
  return float(np.exp(result.x))


def reliability_figure(panels: Mapping[str, tuple[list[dict], float]], title: str,
                       xlabel: str, ylabel: str) -> Figure:
  """A matplotlib Figure with one reliability diagram per panel {name: (bins, ECE)}: each bin's
  accuracy against its mean confidence, the counts as bars below, the diagonal, ECE in the
  legend."""
  n = len(panels)
  fig = Figure(figsize=(3.2 * n, 4.6), layout="constrained")
  axes = fig.subplots(2, n, squeeze=False, sharex=True, height_ratios=(3, 1))
  for j, (name, (bins, value)) in enumerate(panels.items()):
    top, bottom = axes[0, j], axes[1, j]
    full = [b for b in bins if b["count"]]
    top.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    top.bar([(b["lower"] + b["upper"]) / 2 for b in full], [b["accuracy"] for b in full],
            width=[b["upper"] - b["lower"] for b in full], alpha=0.35, edgecolor="C0")
    top.plot([b["confidence"] for b in full], [b["accuracy"] for b in full], "o-", color="C0",
             markersize=3, label=f"ECE {value:.3f}")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.01)
    top.set_title(name, fontsize=9)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar([(b["lower"] + b["upper"]) / 2 for b in bins], [b["count"] for b in bins],
               width=[b["upper"] - b["lower"] for b in bins], color="C1")
    bottom.set_xlabel(xlabel, fontsize=8)
    if j == 0:
      top.set_ylabel(ylabel, fontsize=8)
      bottom.set_ylabel("count", fontsize=8)
  fig.suptitle(title, fontsize=9)
  return fig
