"""Test-set figures of a fold from per-image probabilities and the fold's description (NumPy).

What is reported comes from the `FoldData` alone (`jattn.data.fold`), never from a data set's name:
image-level figures per stratum value (BreakHis: per magnification, the paper's Table 1) and over
all; the majority vote of each group's images per stratum value (BreakHis: a patient's images at one
magnification, Table 2), a tie going to `tie_rule` (two classes) or to the tied class with the
highest mean probability, then the first (more classes); the recognition rate of Spanhol et al.
(2016), the mean over groups of the fraction of their images classified correctly. Group-level
figures (votes, group accuracy, group ROC-AUC) are reported only when every group's images carry one
label; otherwise they are omitted and `group_figures` says why, while the bootstrap still resamples
groups. Two classes with a positive one (`FoldData.binary`) add clinical metrics with
group-bootstrap 95% intervals (`jattn.evaluation.metrics`, scikit-learn); more classes add per-class
precision, recall and F1 and k x k confusion matrices.

Every figure is computed from the probabilities passed in, so any way of producing them (one pass,
the mean over test-time flips) is evaluated the same way. A stratum value without test images is
absent from every per-stratum map.

As a command, `jattn validate-external --workdir RUN --config.data.dir=OTHER ...` scores a finished
run on every image of another labelled set (external validation: `jattn.inference.external`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jattn.core import files
from jattn.data.fold import FoldData
from jattn.evaluation import calibration, metrics

ALL = "all"  # the key of the figures over every evaluated image together


def vote(groups: np.ndarray, predictions: np.ndarray, num_classes: int, *,
         tie_class: int | None = None, probs: np.ndarray | None = None) -> dict[int, int]:
  """Each group's most frequent predicted class.

  A tie between the two classes of a binary task goes to `tie_class`; otherwise (more classes, or
  no `tie_class`) to the tied class with the highest mean predicted probability over the group's
  images (`probs` [N, classes]) and then to the tied class that comes first.
  """
  votes = {}
  for g in np.unique(groups):
    mine = groups == g
    counts = np.bincount(predictions[mine], minlength=num_classes)
    tied = np.flatnonzero(counts == counts.max())
    if len(tied) > 1 and num_classes == 2 and tie_class is not None:
      tied = np.array([tie_class])
    elif len(tied) > 1 and probs is not None:
      mean = probs[mine][:, tied].mean(axis=0)
      tied = tied[mean == mean.max()]
    votes[int(g)] = int(tied[0])
  return votes


def group_labels(groups: np.ndarray, targets: np.ndarray) -> dict[int, int] | None:
  """Each group's label, or None when some group's images carry several labels."""
  out = {}
  for g in np.unique(groups):
    values = np.unique(targets[groups == g])
    if len(values) != 1:
      return None
    out[int(g)] = int(values[0])
  return out


def recognition_rate(groups: np.ndarray, predictions: np.ndarray, targets: np.ndarray) -> float:
  """Spanhol et al. (2016): the mean over groups of the fraction of their images that are right."""
  return float(np.mean([np.mean(predictions[groups == g] == targets[groups == g])
                        for g in np.unique(groups)]))


def stratum_key(fold_data: FoldData, axis: int, value: str) -> str:
  """The key of a stratum value in results: the value itself with one strata axis, else
  'axis=value'."""
  return value if len(fold_data.strata) == 1 else f"{fold_data.strata[axis].name}={value}"


def columns(fold_data: FoldData, indices: np.ndarray) -> dict[str, np.ndarray]:
  """{stratum key: mask over `indices`} for every stratum value that has images there."""
  out = {}
  for a, strata in enumerate(fold_data.strata):
    index = strata.index[indices]
    for v, value in enumerate(strata.values):
      if np.any(index == v):
        out[stratum_key(fold_data, a, value)] = index == v
  return out


def tie_class(fold_data: FoldData, tie_rule: str) -> int | None:
  """The class a tied binary vote goes to (`config.tie_rule` names it), or None (more classes, or
  tie_rule '': the tied class with the higher mean probability, as with more classes)."""
  if len(fold_data.classes) != 2 or not tie_rule:
    return None
  if tie_rule not in fold_data.classes:
    raise ValueError(f"tie_rule={tie_rule!r}: use one of {fold_data.classes}")
  return fold_data.classes.index(tie_rule)


def calibration_figures(probs: np.ndarray, fold_data: FoldData, indices: np.ndarray, *,
                        bootstrap_resamples: int = 0, bootstrap_seed: int = 0,
                        bins: int = calibration.BINS) -> dict:
  """results.json's `calibration` block (`jattn.evaluation.calibration`'s figures): per stratum
  and over all, at image level and (every group of one label) at group level, a group's mean
  probabilities against its label, each figure with a group-bootstrap 95% interval as the
  clinical metrics have; the reliability bins of the images. Two classes with a positive one: the
  figures of P(positive); otherwise top-label (and classwise ECE)."""
  d = fold_data
  indices, probs = np.asarray(indices), np.asarray(probs, np.float64)
  y, groups = d.targets[indices], d.groups[indices]
  positive = None
  if len(d.classes) == 2 and d.binary is not None:
    positive = next(i for i, c in enumerate(d.binary.of) if c == d.binary.positive)
  single = group_labels(groups, y) is not None
  levels = ("image", "group") if single else ("image",)
  out = {"convention": "positive_class" if positive is not None else "top_label",
         "positive": d.classes[positive] if positive is not None else None, "bins": bins,
         **{level: {} for level in levels}, "reliability": {}}
  for col, sel in [*columns(d, indices).items(), (ALL, np.ones(len(y), bool))]:
    ys, ps, gs = y[sel], probs[sel], groups[sel]
    ids = np.unique(gs)
    index = np.searchsorted(ids, gs)
    items = {"image": (ps, ys, index)}
    strata = np.zeros(len(ids), np.int64)
    if single:
      g_probs = np.stack([ps[index == i].mean(axis=0) for i in range(len(ids))])
      g_labels = np.array([ys[index == i][0] for i in range(len(ids))])
      items["group"] = (g_probs, g_labels, np.arange(len(ids)))
      strata = g_labels
    for level, (p, labels, units) in items.items():
      point = calibration.figures(p, labels, positive=positive, bins=bins)
      ci = {}
      if bootstrap_resamples:
        statistic = calibration.WeightedCalibration(p, labels, units, len(ids),
                                                    positive=positive, bins=bins)
        ci = metrics.group_bootstrap(statistic, strata, resamples=bootstrap_resamples,
                                     seed=bootstrap_seed)
      out[level][col] = {name: {"value": value, "ci95": ci.get(name)}
                         for name, value in point.items()}
    confidence, outcome = calibration.convention(ps, ys, positive)
    out["reliability"][col] = calibration.reliability(
        confidence, outcome, calibration.equal_width_bins(confidence, bins), bins)
  out["bootstrap"] = {"resamples": bootstrap_resamples, "seed": bootstrap_seed,
                      "level": metrics.LEVEL, "unit": d.group_unit,
                      "stratified_by": f"the {d.group_unit}'s class" if single else None}
  return out


def evaluate(probs: np.ndarray, fold_data: FoldData, indices: np.ndarray, *,
             tie_rule: str = "", bootstrap_resamples: int = 0, bootstrap_seed: int = 0,
             calibration_bins: int = calibration.BINS) -> dict:
  """The figures of results.json for the images `indices` of `fold_data` and their class
  probabilities `probs` [len(indices), classes] (in the same order)."""
  indices = np.asarray(indices)
  probs = np.asarray(probs)
  d = fold_data
  y, groups = d.targets[indices], d.groups[indices]
  pred = np.argmax(probs, axis=-1)
  k = len(d.classes)
  tie = tie_class(d, tie_rule)
  single = group_labels(groups, y) is not None  # one label per group over the evaluated images
  cols = columns(d, indices)
  keys = ["image_accuracy", "group_recognition_rate", "majority_baseline", "num_images",
          "num_groups", "confusion_matrix", "per_group"]
  keys += ["group_accuracy", "group_confusion_matrix"] if single else []
  keys += ["subclass_accuracy"] if d.subclasses is not None else []
  keys += (["per_class", "multiclass"] + (["group_per_class"] if single else [])) if k > 2 else []
  out = {key: {} for key in keys}
  for col, sel in cols.items():
    ys, ps, gs = y[sel], pred[sel], groups[sel]
    out["image_accuracy"][col] = float(np.mean(ps == ys))
    out["group_recognition_rate"][col] = recognition_rate(gs, ps, ys)
    out["num_images"][col] = int(sel.sum())
    out["num_groups"][col] = len(np.unique(gs))
    out["confusion_matrix"][col] = metrics.confusion(ys, ps, k)
    # What always answering the most frequent class of this test set would score.
    out["majority_baseline"][col] = {"image": float(np.bincount(ys).max() / len(ys))}
    rows = []
    if single:
      truth = group_labels(gs, ys)
      votes = vote(gs, ps, k, tie_class=tie, probs=probs[sel])
      g_list = sorted(truth)
      g_truth = np.array([truth[g] for g in g_list])
      g_votes = np.array([votes[g] for g in g_list])
      out["group_accuracy"][col] = float(np.mean(g_truth == g_votes))
      out["majority_baseline"][col]["group"] = float(np.bincount(g_truth).max() / len(g_truth))
      out["group_confusion_matrix"][col] = metrics.confusion(g_truth, g_votes, k)
      if k > 2:
        out["group_per_class"][col] = metrics.per_class_metrics(g_truth, g_votes, d.classes)
    for g in np.unique(gs):
      row = {"group": d.group_ids[g]}
      if single:
        row.update(label=d.classes[truth[int(g)]], vote=d.classes[votes[int(g)]])
      row.update(images=int(np.sum(gs == g)), correct_images=int(np.sum((gs == g) & (ps == ys))))
      rows.append(row)
    out["per_group"][col] = rows
    if d.subclasses is not None:
      sub = d.subclasses.index[indices][sel]
      out["subclass_accuracy"][col] = {
          d.subclasses.values[s]: float(np.mean(ps[sub == s] == ys[sub == s]))
          for s in np.unique(sub)}
    if k > 2:
      out["per_class"][col] = metrics.per_class_metrics(ys, ps, d.classes)
      out["multiclass"][col] = {"image": metrics.multiclass_summary(ys, ps)}
      if single:
        out["multiclass"][col]["group"] = metrics.multiclass_summary(g_truth, g_votes)
  out["group_figures"] = (
      {"reported": True} if single else
      {"reported": False, "why": f"some {d.group_unit}s have test images of several "
                                 f"{d.class_kind}es: a vote per {d.group_unit} has no single "
                                 f"truth to be scored against"})
  out["strata"] = {s.name: {"values": list(s.values), "selected": list(sel_values),
                            "absent": [v for v in sel_values
                                       if stratum_key(d, a, v) not in cols],
                            "mpp": dict(zip(s.values, s.mpp, strict=True)) if s.mpp else None,
                            "mpp_note": s.mpp_note}
                   for a, (s, sel_values) in enumerate(zip(d.strata, _selected(d), strict=True))}
  out["calibration"] = calibration_figures(probs, d, indices,
                                           bootstrap_resamples=bootstrap_resamples,
                                           bootstrap_seed=bootstrap_seed, bins=calibration_bins)
  if k > 2:
    out["per_class"][ALL] = metrics.per_class_metrics(y, pred, d.classes)
    out["multiclass"][ALL] = {"image": metrics.multiclass_summary(y, pred)}
    out["confusion_matrix"][ALL] = metrics.confusion(y, pred, k)
    return out
  if d.binary is None:
    return out
  labels01 = (d.binary.coarse(y) == d.binary.positive).astype(np.int64)
  pred01 = (d.binary.coarse(pred) == d.binary.positive).astype(np.int64)
  scores = d.binary.positive_probability(probs)
  clinical = {"image": {}, "group": {}} if single else {"image": {}}
  for col, sel in [*cols.items(), (ALL, np.ones(len(y), bool))]:
    group_votes = (vote(groups[sel], pred[sel], k, tie_class=tie, probs=probs[sel])
                   if single else None)
    if group_votes is not None:  # votes over classes -> their coarse label
      group_votes = {g: int(d.binary.of[v] == d.binary.positive) for g, v in group_votes.items()}
    figures = metrics.clinical_metrics(
        labels=labels01[sel], scores=scores[sel], predictions=pred01[sel], groups=groups[sel],
        group_votes=group_votes, resamples=bootstrap_resamples, seed=bootstrap_seed)
    for level in clinical:
      clinical[level][col] = figures[level]
  clinical["bootstrap"] = {"resamples": bootstrap_resamples, "seed": bootstrap_seed,
                           "level": metrics.LEVEL, "unit": d.group_unit,
                           "stratified_by": f"the {d.group_unit}'s class" if single else None}
  out["clinical"] = clinical
  return out


def _selected(d: FoldData) -> tuple[tuple[str, ...], ...]:
  return d.selected or tuple(s.values for s in d.strata)


def write_roc_plot(path: str, rows: Sequence[dict], *, positive: str, stratum: str,
                   order: Sequence[str], title: str) -> None:
  """ROC curves of P(positive), per stratum value and over all, from predictions.csv's rows
  (`label`, `prob_<positive>`, `<stratum>`), as a PNG written atomically."""
  labels = np.array([r["label"] == positive for r in rows], np.int64)
  scores = np.array([float(r[f"prob_{positive}"]) for r in rows])
  values = np.array([r[stratum] for r in rows])
  present = [v for v in order if np.any(values == v)]
  groups = {v: (labels[values == v], scores[values == v]) for v in present}
  groups[ALL] = (labels, scores)
  fig = metrics.roc_figure(groups, f"{title}: image-level ROC of P({positive})")
  with files.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=120)


def write_reliability_plot(path: str, block: dict, *, title: str) -> None:
  """Reliability diagrams of results.json's calibration `block`, per stratum and over all (bin
  accuracy against mean confidence, the count per bin, the diagonal, ECE in the legend), as a PNG
  written atomically."""
  positive = block.get("positive")
  panels = {col: (bins, block["image"][col]["ece"]["value"])
            for col, bins in block["reliability"].items()}
  what = f"P({positive})" if positive else "top-label confidence"
  fig = calibration.reliability_figure(
      panels, f"{title}: image-level reliability of {what}, {block['bins']} equal-width bins",
      f"mean {what} in bin", f"fraction {positive}" if positive else "accuracy")
  with files.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=100)


def format_table(results: dict) -> str:
  """The headline figures of one run (results.json, schema 2) as a small text table (percent).
  Where every test group holds one image (a folder source without groups: each image is its own
  group) the group rows would repeat the image rows: one line says so instead."""
  unit = results.get("group_unit", "group")
  cols = [c for c in _report_columns(results) if c in results["image_accuracy"]]
  alone = bool(cols) and all(results["num_images"][c] == results["num_groups"][c] for c in cols)
  rows = [("image accuracy", "image_accuracy")] + ([] if alone else [
      (f"{unit} accuracy", "group_accuracy"),
      (f"{unit} recognition rate", "group_recognition_rate")])
  levels = (("image", "image"),) if alone else (("image", "image"), (unit, "group"))
  lines = [f"{'':<26}" + "".join(f"{c:>8}" for c in cols)]
  for title, key in rows:
    if key in results:
      lines.append(f"{title:<26}" + "".join(f"{100 * results[key][c]:>8.1f}" for c in cols))
  for level, key in levels:
    if all(key in results["majority_baseline"][c] for c in cols):
      lines.append(f"{'majority class, ' + level:<26}" + "".join(
          f"{100 * results['majority_baseline'][c][key]:>8.1f}" for c in cols))
  lines.append(f"{'test images / ' + unit + 's':<26}" + "".join(
      f"{results['num_images'][c]:>5}/{results['num_groups'][c]:<2}" for c in cols))
  clinical = results.get("clinical", {})
  for level, key in levels:
    if key not in clinical:
      continue
    for name in metrics.BINARY_METRICS:
      cells = [clinical[key].get(c, {}).get(name, {}).get("value") for c in cols]
      lines.append(f"{level + ' ' + name.replace('_', ' '):<26}" + "".join(
          f"{'—':>8}" if v is None else f"{100 * v:>8.1f}" for v in cells))
  kind = results.get("class_kind", "class")
  for name in ("balanced_accuracy", "macro_f1") if "multiclass" in results else ():
    lines.append(f"{kind + ' ' + name.replace('_', ' '):<26}" + "".join(
        f"{100 * results['multiclass'][c]['image'][name]:>8.1f}" for c in cols))
  absent = [v for s in results.get("strata", {}).values() for v in s["absent"]]
  if absent:
    lines.append(f"absent (no test images in this fold): {', '.join(absent)}")
  if alone:
    lines.append(f"no {unit}s: each test image is its own {unit}, so {unit} level = image level "
                 f"({unit} rows not shown)")
  elif not results.get("group_figures", {}).get("reported", True):
    lines.append(f"{unit} figures omitted: {results['group_figures']['why']}")
  return "\n".join(lines)


def _report_columns(results: dict) -> list[str]:
  """The per-stratum keys of a results dict in report order."""
  strata = results.get("strata", {})
  if len(strata) == 1:
    return list(next(iter(strata.values()))["values"])
  return [f"{name}={v}" for name, s in strata.items() for v in s["values"]]
