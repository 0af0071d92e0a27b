"""Test-set figures of the BreakHis protocol, from per-image predictions (NumPy, no JAX).

* Image-level accuracy per magnification (Table 1 of the paper).
* Patient-level accuracy per magnification (Table 2): each test patient's images vote by majority;
  the patient counts as right when the vote equals the patient's label. A tie counts as benign, as
  in the authors' code (`tie_rule`).
* The patient recognition rate of Spanhol et al. (2016), a different figure reported under its own
  name: the mean over test patients of the fraction of their images classified correctly.
* Beyond the paper (`evaluate_predictions`): clinical metrics with patient-bootstrap 95% CIs for
  binary runs, per magnification and over all (`jattn.metrics`, scikit-learn); for the 8-class
  subtype task (config.task='subtype'), a plurality vote per patient (`plurality_vote`),
  per-class precision, recall and F1 and the 8 x 8 confusion matrices.

Every figure is computed from the predicted probabilities and labels passed in, never inside the
evaluation step, so any way of producing probabilities (e.g. averaged over test-time flips) is
evaluated the same way. A magnification without test images is absent from every per-magnification
map.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jattn import files, metrics
from jattn.data.breakhis import CLASSES, MAGNIFICATIONS, SUBTYPE_CODES, SUBTYPES, TASKS

TIE_RULES = ("benign", "malignant")


def class_of(task: str) -> tuple[str, ...]:
  """The class (benign or malignant) of each of the task's outputs, in output order."""
  return tuple(c if c in CLASSES else SUBTYPES[c][1] for c in TASKS[task])


def malignant_probability(probs: np.ndarray, task: str) -> np.ndarray:
  """P(malignant) of [N, outputs] class probabilities: the malignant outputs' sum (a subtype run
  has four of them)."""
  malignant = [i for i, c in enumerate(class_of(task)) if c == "malignant"]
  return np.asarray(probs)[..., malignant].sum(-1)
ALL = "all"  # the key of the figures over every tested magnification together


def patient_vote(patients: np.ndarray, predictions: np.ndarray,
                 tie_rule: str = "benign") -> dict[int, int]:
  """Majority vote of the image predictions (0 benign, 1 malignant) of each patient."""
  if tie_rule not in TIE_RULES:
    raise ValueError(f"tie_rule={tie_rule!r}: use one of {TIE_RULES}")
  votes = {}
  for p in np.unique(patients):
    malignant = int(np.sum(predictions[patients == p] == 1))
    benign = int(np.sum(predictions[patients == p] == 0))
    votes[int(p)] = 1 if malignant > benign else 0 if benign > malignant else CLASSES.index(
        tie_rule)
  return votes


def plurality_vote(patients: np.ndarray, predictions: np.ndarray,
                   probs: np.ndarray | None = None) -> dict[int, int]:
  """Each patient's most frequent predicted class (any number of classes: the subtype task).

  A tie between classes goes to the tied class with the highest mean predicted probability over the
  patient's images (`probs` [N, classes]); if that ties too, or without `probs`, to the tied class
  that comes first (the order of SUBTYPE_CODES: benign subtypes first, like the binary tie rule).
  """
  votes = {}
  for p in np.unique(patients):
    mine = patients == p
    counts = np.bincount(predictions[mine])
    tied = np.flatnonzero(counts == counts.max())
    if len(tied) > 1 and probs is not None:
      mean = probs[mine][:, tied].mean(axis=0)
      tied = tied[mean == mean.max()]
    votes[int(p)] = int(tied[0])
  return votes


def patient_labels(patients: np.ndarray, labels: np.ndarray) -> dict[int, int]:
  """Each patient's label; all images of a patient must carry it."""
  out = {}
  for p in np.unique(patients):
    values = np.unique(labels[patients == p])
    if len(values) != 1:
      raise ValueError(f"patient {p} has images of several classes")
    out[int(p)] = int(values[0])
  return out


def patient_accuracy(patients, predictions, labels, tie_rule="benign") -> float:
  """Fraction of patients whose majority vote equals their label."""
  votes = patient_vote(patients, predictions, tie_rule)
  truth = patient_labels(patients, labels)
  return float(np.mean([votes[p] == truth[p] for p in truth]))


def patient_recognition_rate(patients, predictions, labels) -> float:
  """Spanhol et al. (2016): mean over patients of the fraction of their images that are right."""
  return float(np.mean([np.mean(predictions[patients == p] == labels[patients == p])
                        for p in np.unique(patients)]))


def confusion_matrix(labels, predictions) -> list[list[int]]:
  """[[benign->benign, benign->malignant], [malignant->benign, malignant->malignant]]."""
  return metrics.confusion(labels, predictions, 2)


def summarize(*, labels: np.ndarray, predictions: np.ndarray, patients: np.ndarray,
              magnifications: np.ndarray, subtypes: np.ndarray,
              patient_ids: Sequence[str] | None = None, tie_rule: str = "benign",
              task: str = "binary", probs: np.ndarray | None = None) -> dict:
  """Every figure of the protocol, per magnification ('40X', ...), from one entry per test image.

  `labels` and `predictions` are the task's classes (TASKS[task]: 0 benign / 1 malignant, or a
  subtype index); `magnifications` and `subtypes` index MAGNIFICATIONS and SUBTYPE_CODES;
  `patients` are integer patient indices (names from `patient_ids`, when given, label the patient
  table). Binary patients vote by majority (ties: `tie_rule`), subtype patients by plurality
  (`plurality_vote`, ties by `probs`). The subtype task adds `per_class` and 8 x 8 confusions.
  """
  names = TASKS[task]
  keys = ["image_accuracy", "patient_accuracy", "patient_recognition_rate", "majority_baseline",
          "num_images", "num_patients", "confusion_matrix", "patient_confusion_matrix",
          "subtype_accuracy", "patients"]
  out = {k: {} for k in keys + (["per_class", "patient_per_class", "multiclass"]
                                if task == "subtype" else [])}
  for m, mag in enumerate(MAGNIFICATIONS):
    sel = magnifications == m
    if not sel.any():
      continue
    y, pred, pat, sub = labels[sel], predictions[sel], patients[sel], subtypes[sel]
    votes = (plurality_vote(pat, pred, None if probs is None else probs[sel]) if task == "subtype"
             else patient_vote(pat, pred, tie_rule))
    truth = patient_labels(pat, y)
    out["image_accuracy"][mag] = float(np.mean(pred == y))
    out["patient_accuracy"][mag] = float(np.mean([votes[p] == truth[p] for p in truth]))
    out["patient_recognition_rate"][mag] = patient_recognition_rate(pat, pred, y)
    # What always answering the most frequent class of this test set would score.
    out["majority_baseline"][mag] = {
        "image": float(np.bincount(y).max() / len(y)),
        "patient": float(np.bincount(list(truth.values())).max() / len(truth))}
    out["num_images"][mag] = int(sel.sum())
    out["num_patients"][mag] = len(truth)
    out["confusion_matrix"][mag] = metrics.confusion(y, pred, len(names))
    p_list = sorted(truth)
    p_truth, p_votes = np.array([truth[p] for p in p_list]), np.array([votes[p] for p in p_list])
    out["patient_confusion_matrix"][mag] = metrics.confusion(p_truth, p_votes, len(names))
    out["subtype_accuracy"][mag] = {
        SUBTYPE_CODES[s]: float(np.mean(pred[sub == s] == y[sub == s])) for s in np.unique(sub)}
    out["patients"][mag] = [
        {"patient_id": patient_ids[p] if patient_ids is not None else int(p),
         "label": names[truth[p]], "vote": names[votes[p]],
         "images": int(np.sum(pat == p)),
         "correct_images": int(np.sum((pat == p) & (pred == y)))} for p in p_list]
    if task == "subtype":
      out["per_class"][mag] = metrics.per_class_metrics(y, pred, names)
      out["patient_per_class"][mag] = metrics.per_class_metrics(p_truth, p_votes, names)
      out["multiclass"][mag] = {"image": metrics.multiclass_summary(y, pred),
                                "patient": metrics.multiclass_summary(p_truth, p_votes)}
  return out


def evaluate_predictions(*, probs: np.ndarray, labels: np.ndarray, subtypes: np.ndarray,
                         patients: np.ndarray, magnifications: np.ndarray,
                         patient_ids: Sequence[str] | None = None, task: str = "binary",
                         tie_rule: str = "benign", selected: Sequence[str] = MAGNIFICATIONS,
                         bootstrap_resamples: int = 0, bootstrap_seed: int = 0) -> dict:
  """The figures of a run's results.json from its test images' probabilities [N, classes].

  `labels` are 0/1 (benign/malignant) whatever the task; `selected` the run's magnifications.
  Returns `summarize`'s maps plus `task`, `magnifications` ({selected, absent}: selected ones
  without test images, absent from every map) and, for binary runs, `clinical`:
  {image|patient: {40X..400X|all: {metric: {value, ci95}}}, bootstrap: {...}}.
  """
  predictions = np.argmax(probs, axis=-1)
  targets = subtypes if task == "subtype" else labels
  out = summarize(labels=targets, predictions=predictions, patients=patients,
                  magnifications=magnifications, subtypes=subtypes, patient_ids=patient_ids,
                  tie_rule=tie_rule, task=task, probs=probs)
  tested = [MAGNIFICATIONS[m] for m in sorted(set(np.asarray(magnifications).tolist()))]
  out["task"] = task
  out["magnifications"] = {"selected": list(selected),
                           "absent": [m for m in selected if m not in tested]}
  if task == "subtype":
    out["per_class"][ALL] = metrics.per_class_metrics(targets, predictions, TASKS[task])
    out["multiclass"][ALL] = {"image": metrics.multiclass_summary(targets, predictions)}
    out["confusion_matrix"][ALL] = metrics.confusion(targets, predictions, len(TASKS[task]))
    return out
  clinical = {"image": {}, "patient": {}}
  groups = [(mag, magnifications == MAGNIFICATIONS.index(mag)) for mag in tested]
  for group, sel in [*groups, (ALL, np.ones(len(labels), bool))]:
    if not sel.any():
      continue
    figures = metrics.clinical_metrics(
        labels=labels[sel], scores=probs[sel, 1], predictions=predictions[sel],
        patients=patients[sel], patient_votes=patient_vote(patients[sel], predictions[sel],
                                                           tie_rule),
        resamples=bootstrap_resamples, seed=bootstrap_seed)
    for level in clinical:
      clinical[level][group] = figures[level]
  clinical["bootstrap"] = {"resamples": bootstrap_resamples, "seed": bootstrap_seed,
                           "level": metrics.LEVEL, "unit": "patient",
                           "stratified_by": "the patient's class"}
  out["clinical"] = clinical
  return out


def roc_groups(probs: np.ndarray, labels: np.ndarray,
               magnifications: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{40X..400X, all: (0/1 labels, P(malignant))} of the test images, for `metrics.roc_figure`."""
  groups = {mag: (labels[magnifications == m], probs[magnifications == m, 1])
            for m, mag in enumerate(MAGNIFICATIONS) if np.any(magnifications == m)}
  groups[ALL] = (labels, probs[:, 1])
  return groups


def write_roc_plot(path: str, rows: Sequence[dict], title: str) -> None:
  """ROC curves of P(malignant), per magnification and over all, from predictions.csv's rows, as
  a PNG (atomically)."""
  labels = np.array([CLASSES.index(r["label"]) for r in rows], np.int64)
  scores = np.array([float(r["prob_malignant"]) for r in rows])
  mags = np.array([MAGNIFICATIONS.index(r["magnification"]) for r in rows], np.int64)
  fig = metrics.roc_figure(roc_groups(np.stack([1 - scores, scores], -1), labels, mags),
                           f"{title}: image-level ROC of P(malignant)")
  with files.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=120)


def format_table(results: dict) -> str:
  """The headline figures of one run as a small text table (percent)."""
  mags = [m for m in MAGNIFICATIONS if m in results["image_accuracy"]]
  rows = [("image accuracy", "image_accuracy"), ("patient accuracy", "patient_accuracy"),
          ("patient recognition rate", "patient_recognition_rate")]
  lines = [f"{'':<26}" + "".join(f"{m:>8}" for m in mags)]
  for title, key in rows:
    lines.append(f"{title:<26}" + "".join(f"{100 * results[key][m]:>8.1f}" for m in mags))
  if "majority_baseline" in results:
    for level in ("image", "patient"):
      lines.append(f"{'majority class, ' + level:<26}" + "".join(
          f"{100 * results['majority_baseline'][m][level]:>8.1f}" for m in mags))
  lines.append(f"{'test images / patients':<26}" + "".join(
      f"{results['num_images'][m]:>5}/{results['num_patients'][m]:<2}" for m in mags))
  for level in ("image", "patient") if "clinical" in results else ():
    for name in metrics.BINARY_METRICS:
      cells = [results["clinical"][level].get(m, {}).get(name, {}).get("value") for m in mags]
      lines.append(f"{level + ' ' + name.replace('_', ' '):<26}" + "".join(
          f"{'—':>8}" if v is None else f"{100 * v:>8.1f}" for v in cells))
  for name in ("balanced_accuracy", "macro_f1") if "multiclass" in results else ():
    lines.append(f"{'subtype ' + name.replace('_', ' '):<26}" + "".join(
        f"{100 * results['multiclass'][m]['image'][name]:>8.1f}" for m in mags))
  absent = results.get("magnifications", {}).get("absent", [])
  if absent:
    lines.append(f"absent (no test images in this fold): {', '.join(absent)}")
  return "\n".join(lines)
