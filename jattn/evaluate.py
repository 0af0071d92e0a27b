"""Test-set figures of the BreakHis protocol, from per-image predictions (NumPy, no JAX).

* Image-level accuracy per magnification (Table 1 of the paper).
* Patient-level accuracy per magnification (Table 2): each test patient's images vote by majority;
  the patient counts as right when the vote equals the patient's label. A tie counts as benign, as
  in the authors' code (`tie_rule`).
* The patient recognition rate of Spanhol et al. (2016), a different figure reported under its own
  name: the mean over test patients of the fraction of their images classified correctly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jattn.data.breakhis import CLASSES, MAGNIFICATIONS, SUBTYPE_CODES

TIE_RULES = ("benign", "malignant")


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


def patient_labels(patients: np.ndarray, labels: np.ndarray) -> dict[int, int]:
  """Each patient's label; all images of a patient must carry it."""
  out = {}
  for p in np.unique(patients):
    values = np.unique(labels[patients == p])
    if len(values) != 1:
      raise ValueError(f"patient {p} has images of both classes")
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
  return [[int(np.sum((labels == t) & (predictions == p))) for p in (0, 1)] for t in (0, 1)]


def summarize(*, labels: np.ndarray, predictions: np.ndarray, patients: np.ndarray,
              magnifications: np.ndarray, subtypes: np.ndarray,
              patient_ids: Sequence[str] | None = None, tie_rule: str = "benign") -> dict:
  """Every figure of the protocol, per magnification ('40X', ...), from one entry per test image.

  `magnifications` and `subtypes` index MAGNIFICATIONS and SUBTYPE_CODES; `patients` are
  integer patient indices (names from `patient_ids`, when given, label the patient table).
  """
  out = {k: {} for k in ("image_accuracy", "patient_accuracy", "patient_recognition_rate",
                         "majority_baseline", "num_images", "num_patients", "confusion_matrix",
                         "patient_confusion_matrix", "subtype_accuracy", "patients")}
  for m, mag in enumerate(MAGNIFICATIONS):
    sel = magnifications == m
    if not sel.any():
      continue
    y, pred, pat, sub = labels[sel], predictions[sel], patients[sel], subtypes[sel]
    votes = patient_vote(pat, pred, tie_rule)
    truth = patient_labels(pat, y)
    out["image_accuracy"][mag] = float(np.mean(pred == y))
    out["patient_accuracy"][mag] = float(np.mean([votes[p] == truth[p] for p in truth]))
    out["patient_recognition_rate"][mag] = patient_recognition_rate(pat, pred, y)
    # What always answering the more frequent class of this test set would score.
    patient_malignant = np.mean(list(truth.values()))
    out["majority_baseline"][mag] = {"image": float(max(y.mean(), 1 - y.mean())),
                                     "patient": float(max(patient_malignant,
                                                          1 - patient_malignant))}
    out["num_images"][mag] = int(sel.sum())
    out["num_patients"][mag] = len(truth)
    out["confusion_matrix"][mag] = confusion_matrix(y, pred)
    p_list = sorted(truth)
    out["patient_confusion_matrix"][mag] = confusion_matrix(
        np.array([truth[p] for p in p_list]), np.array([votes[p] for p in p_list]))
    out["subtype_accuracy"][mag] = {
        SUBTYPE_CODES[s]: float(np.mean(pred[sub == s] == y[sub == s])) for s in np.unique(sub)}
    out["patients"][mag] = [
        {"patient_id": patient_ids[p] if patient_ids is not None else int(p),
         "label": CLASSES[truth[p]], "vote": CLASSES[votes[p]],
         "images": int(np.sum(pat == p)),
         "correct_images": int(np.sum((pat == p) & (pred == y)))} for p in p_list]
  return out


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
  return "\n".join(lines)
