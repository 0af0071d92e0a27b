"""Predictions of a trained run for any images, with a patient vote when names allow one.

  python -m jattn.predict --workdir runs/ours/fold1 IMAGE... [--out predictions.csv]

Images are preprocessed exactly as in training (RGB, resized to the run's image_size with PIL's
bilinear filter, normalised by the run's fold statistics). Each row gives the file, the probability
of malignant and the prediction; when the file name follows BreakHis' convention, also the patient,
the magnification and the majority vote of that patient's given images at that magnification
(ties by the run's tie rule).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys

import numpy as np

from jattn import evaluate, files, runs
from jattn.data.breakhis import CLASSES, parse_file_name
from jattn.data.prepare import decode_resize
from jattn.errors import UserError, exit_on_user_error

COLUMNS = ("file", "prob_malignant", "prediction", "patient_id", "magnification", "patient_vote")


def load_images(paths: list[str], image_size: int) -> np.ndarray:
  """uint8 [N, S, S, 3], preprocessed as the training cache; a bad file is a UserError."""
  images = []
  for path in paths:
    try:
      with open(path, "rb") as f:
        images.append(decode_resize(f.read(), image_size, path))
    except OSError as e:
      raise UserError(f"{path}: cannot read this image ({e.__class__.__name__}: {e})") from None
  return np.stack(images)


def predict(workdir: str, paths: list[str], batch_size: int = 32) -> list[dict]:
  """One row per image (see COLUMNS)."""
  if not paths:
    raise UserError("give at least one image to predict")
  config, state = runs.restore(workdir)
  probs = runs.predict_probs(state, load_images(paths, config.image_size), batch_size)
  rows = []
  for path, p in zip(paths, probs, strict=True):
    row = {"file": path, "prob_malignant": f"{p[1]:.6f}", "prediction": CLASSES[int(p[1] > p[0])],
           "patient_id": "", "magnification": "", "patient_vote": ""}
    try:
      parsed = parse_file_name(os.path.basename(path))
      row.update(patient_id=parsed.patient_id, magnification=parsed.magnification)
    except ValueError:
      pass
    rows.append(row)
  named = [r for r in rows if r["patient_id"]]
  if named:
    keys = sorted({(r["patient_id"], r["magnification"]) for r in named})
    group = np.array([keys.index((r["patient_id"], r["magnification"])) for r in named])
    preds = np.array([CLASSES.index(r["prediction"]) for r in named])
    votes = evaluate.patient_vote(group, preds, config.tie_rule)
    for r, g in zip(named, group, strict=True):
      r["patient_vote"] = CLASSES[votes[int(g)]]
  return rows


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m jattn.predict",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a run's work dir (python -m jattn.main)")
  parser.add_argument("--out", help="CSV file to write (default: standard output)")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("images", nargs="*", help="image files (PNG, JPEG, ...)")
  args = parser.parse_args(argv)
  with exit_on_user_error("jattn.predict"):
    rows = predict(args.workdir, args.images, args.batch_size)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    if args.out:
      files.atomic_write_text(args.out, text.getvalue())
    else:
      sys.stdout.write(text.getvalue())

if __name__ == "__main__":
  main()
