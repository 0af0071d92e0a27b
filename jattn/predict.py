"""Predictions of a trained run for any images, with a group vote when names allow one.

  python -m jattn.predict --workdir runs/ours/fold1 IMAGE_OR_FOLDER... [--out FILE.csv]
      [--tta dihedral] [--batch-size 32]

A folder stands for every image file under it (IMAGE_EXTENSIONS, any case, in sorted order,
subfolders included); hidden files and folders (`.DS_Store`, `._*`) and anything else (`Thumbs.db`,
text) are skipped.

Images are preprocessed exactly as in training (RGB, resized to the run's image_size with PIL's
bilinear filter, normalised by the run's fold statistics). Each row gives the file, the probability
of the run's positive label (BreakHis: malignant) and the prediction; when the run's data source
reads a group and strata from the file name (BreakHis' convention: the patient and the
magnification), also those and the vote of the group's given images in that stratum
(`evaluate.vote`: the majority, ties by the run's tie rule; the plurality with more classes). With
--tta dihedral (or a run trained with config.tta='dihedral') each probability is the mean over the
image's 8 flips and right-angle turns. A run whose classes are finer than its labels (BreakHis'
subtype task) also gives the predicted class (`subtype`, `prob_subtype`), and votes over them. A
run that has not finished (no results.json) is used from its latest checkpoint, with a warning
saying how far it got.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys

import numpy as np

from jattn import evaluate, files, runs, state
from jattn.data import sources
from jattn.data.prepare import decode_resize
from jattn.errors import UserError, exit_on_user_error

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")  # the files of a folder read


def image_paths(paths: list[str]) -> list[str]:
  """The image files that `paths` name: a file as given, a folder as the image files under it."""
  out = []
  for path in paths:
    if not os.path.isdir(path):
      out.append(path)
      continue
    found, seen = [], set()
    for root, dirs, names in os.walk(path, followlinks=True):
      if os.path.realpath(root) in seen:  # a link back to a folder already walked
        dirs[:] = []
        continue
      seen.add(os.path.realpath(root))
      dirs[:] = [d for d in dirs if not d.startswith(".")]
      found += [os.path.join(root, n) for n in names
                if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
    if not found:
      raise UserError(f"{path}: a folder without image files ({', '.join(IMAGE_EXTENSIONS)}, "
                      f"subfolders included); give image files or a folder that holds some")
    out += sorted(found, key=lambda p: os.path.relpath(p, path).split(os.sep))
  return out


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


def predict(workdir: str, paths: list[str], batch_size: int = 32,
            tta: str | None = None) -> list[dict]:
  """One row per image (see COLUMNS); `paths` may name folders (`image_paths`); `tta` None uses
  the run's config.tta."""
  if batch_size < 1:
    raise UserError(f"--batch-size {batch_size}: give a positive number of images per batch "
                    f"(default 32)")
  paths = image_paths(paths)
  if not paths:
    raise UserError("give at least one image (or a folder of images) to predict")
  config, run_state = runs.restore(workdir)
  tta = tta or config.get("tta", "none")
  probs = runs.predict_probs(run_state, load_images(paths, config.image_size), batch_size, tta)
  outputs = runs.outputs(config)
  source = sources.of(config)
  unit, b = outputs.group_unit, outputs.binary
  fine = b is not None and tuple(outputs.classes) != tuple(b.names)
  rows, keys = [], []
  for path, p in zip(paths, probs, strict=True):
    k = int(np.argmax(p))
    if b is not None:
      row = {"file": path, f"prob_{b.positive_name}": f"{b.positive_probability(p):.6f}",
             "prediction": b.names[b.of[k]]}
    else:
      row = {"file": path, "prediction": outputs.classes[k],
             **{f"prob_{c}": f"{p[j]:.6f}" for j, c in enumerate(outputs.classes)}}
    described = source.describe_file(path)
    row[f"{unit}_id"] = described["group"] if described else ""
    row.update({name: described["strata"][name] if described else ""
                for name in outputs.strata})
    row[f"{unit}_vote"] = ""
    if fine:
      row.update({outputs.class_kind: outputs.classes[k],
                  f"prob_{outputs.class_kind}": f"{p[k]:.6f}"})
    rows.append(row)
    keys.append((row[f"{unit}_id"], *(row[name] for name in outputs.strata)) if described
                else None)
  named = [i for i, key in enumerate(keys) if key is not None]
  if named:
    order = sorted({keys[i] for i in named})
    group = np.array([order.index(keys[i]) for i in named])
    votes = evaluate.vote(group, np.argmax(probs[named], -1), len(outputs.classes),
                          tie_class=(outputs.classes.index(config.tie_rule)
                                     if len(outputs.classes) == 2 else None),
                          probs=probs[named])
    for i, g in zip(named, group, strict=True):
      rows[i][f"{unit}_vote"] = outputs.classes[votes[int(g)]]
  return rows


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m jattn.predict",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a run's work dir (python -m jattn.main)")
  parser.add_argument("--out", help="CSV file to write (default: standard output)")
  parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
  parser.add_argument("--tta", choices=state.TTA_MODES,
                      help="test-time augmentation (default: the run's config.tta)")
  parser.add_argument("images", nargs="*", help="image files (PNG, JPEG, TIFF, BMP), or folders "
                      "of them (searched recursively)")
  args = parser.parse_args(argv)
  with exit_on_user_error("jattn.predict"):
    if args.out and os.path.isdir(args.out):  # refused before any work, not after it
      raise UserError(f"--out {args.out} is a folder: give the CSV file to write, e.g. "
                      f"{os.path.join(args.out, 'predictions.csv')}")
    rows = predict(args.workdir, args.images, args.batch_size, args.tta)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    if args.out:
      files.atomic_write_text(args.out, text.getvalue())
    else:
      sys.stdout.write(text.getvalue())

if __name__ == "__main__":
  main()
