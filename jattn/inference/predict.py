"""Predictions of a trained run for any images, with a group vote when names allow one.

  jattn predict --workdir runs/ours/fold1 IMAGE_OR_FOLDER... [--out FILE.csv]
      [--tta dihedral] [--batch-size 32]
  jattn predict --workdir runs/ours/fold1 --manifest FILE.csv [--results FILE.json] ...

A folder stands for every image file under it (IMAGE_EXTENSIONS, any case, in sorted order,
subfolders included); hidden files and folders (`.DS_Store`, `._*`) and anything else (`Thumbs.db`,
text) are skipped.

Images are preprocessed exactly as in training (RGB, resized to the run's image_size with PIL's
bilinear filter, normalised by the run's fold statistics). Each row gives the file (`file_name`,
as in a run's predictions.csv), the probability
of the run's positive label (BreakHis: malignant) and the prediction; when the run's data source
reads a group and strata from the file name (BreakHis' convention: the patient and the
magnification), also those and the vote of the group's given images in that stratum
(`evaluate.vote`: the majority, ties by the run's tie rule; the plurality with more classes). With
--tta dihedral (or a run trained with config.tta='dihedral') each probability is the mean over the
image's 8 flips and right-angle turns. A run whose classes are finer than its labels (BreakHis'
subtype task) also gives the predicted class (`subtype`, `prob_subtype`), and votes over them. A
run that has not finished (no results.json) is used from its latest checkpoint, with a warning
saying how far it got.

With --manifest (a CSV with columns `path,label`, optionally `group` and stratum columns, one row
per image, paths relative to the CSV's folder) the images are the manifest's and each row also
gives its `label` and whether the prediction is `correct`; the group and strata come from the
manifest (where it has those columns; the file name otherwise), the group vote is scored
(`<unit>_vote_correct`), and the evaluator's figures of the whole manifest
(`jattn.evaluation.evaluate`, as for a run's test set: per stratum, per group, clinical metrics
with bootstrap intervals) are printed on stderr as a run prints its table, and written as a
results.json with --results. A
group is only ever what the manifest or the data source's file naming says: in the ImageFolder
convention (a folder per class) the parent folder is the class, never the group. Images of the
run's own training split (the same decoded pixels as a training image of its prepared data) are
counted and said in one warning line: their figures are not those of unseen images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os

import numpy as np

from jattn.core import files
from jattn.core.errors import UserError, warn
from jattn.data import load_fold, sources, stain
from jattn.data.fold import FoldData, Strata
from jattn.data.prepare import decode_resize
from jattn.evaluation import evaluate
from jattn.inference import external, runs

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


@dataclasses.dataclass(frozen=True)
class Manifest:
  """The rows of a --manifest CSV: each image's path (as written, and as found), label, group
  (None without a `group` column) and stratum values (one list per further column)."""

  file: str
  paths: tuple[str, ...]  # as written in the CSV
  found: tuple[str, ...]  # relative to the CSV's folder
  labels: tuple[str, ...]
  groups: tuple[str, ...] | None
  strata: dict[str, tuple[str, ...]]
  lines: tuple[int, ...]  # each row's line in the CSV


def read_manifest(file: str) -> Manifest:
  """A --manifest CSV, checked: a missing column, an empty value, a missing or repeated file is
  one UserError naming the file and line (labels are checked against a run's classes later)."""
  read = files.read_csv(file, "--manifest ")
  header, body = list(read.header), read.rows
  for column in ("path", "label"):
    if column not in header:
      raise UserError(f"--manifest {file}: no {column!r} column (its header is "
                      f"{','.join(header) or 'empty'}){files.separator_hint(header)}; give "
                      f"columns path,label[,group][,<stratum>...]")
  repeated = sorted({h for h in header if header.count(h) > 1 or not h})
  if repeated:
    raise UserError(f"--manifest {file}: column {repeated[0]!r} is "
                    f"{'empty' if not repeated[0] else 'repeated'} in the header; give each "
                    f"column once")
  folder = os.path.dirname(os.path.abspath(file))
  values: dict[str, list[str]] = {h: [] for h in header}
  found, lines, seen = [], [], {}
  for line, row in body:
    if len(row) != len(header):
      raise UserError(f"--manifest {file}, line {line}: {len(row)} values for the {len(header)} "
                      f"columns {','.join(header)}")
    for column, value in zip(header, row, strict=True):
      if not value.strip():
        raise UserError(f"--manifest {file}, line {line}: empty {column!r}; every row needs a "
                        f"value in every column")
      values[column].append(value.strip())
    path = values["path"][-1]
    where = os.path.normpath(os.path.join(folder, os.path.expanduser(path)))
    if not os.path.isfile(where):
      raise UserError(f"--manifest {file}, line {line}: path {path!r} is not a file ({where}); "
                      f"paths are relative to the manifest's folder")
    if where in seen:
      raise UserError(f"--manifest {file}, line {line}: path {path!r} is listed again (first on "
                      f"line {seen[where]}); list each image once")
    seen[where] = line
    found.append(where)
    lines.append(line)
  if not found:
    raise UserError(f"--manifest {file}: no rows; give one row per image")
  return Manifest(file, tuple(values["path"]), tuple(found), tuple(values["label"]),
                  tuple(values["group"]) if "group" in values else None,
                  {h: tuple(values[h]) for h in header if h not in ("path", "label", "group")},
                  tuple(lines))


def predict(workdir: str, paths: list[str], batch_size: int = 32,
            tta: str | None = None, manifest: str | None = None) -> list[dict]:
  """One row per image (see the module docstring); `paths` may name folders (`image_paths`), or
  `manifest` a CSV of images with labels (then `paths` must be empty); `tta` None uses the run's
  config.tta."""
  return predict_and_score(workdir, paths, batch_size, tta, manifest)[0]


def predict_and_score(workdir: str, paths: list[str], batch_size: int, tta: str | None,
                      manifest_file: str | None) -> tuple[list[dict], dict | None]:
  """(rows, the evaluator's results of a manifest's images, or None without a manifest)."""
  if batch_size < 1:
    raise UserError(f"--batch-size {batch_size}: give a positive number of images per batch "
                    f"(default 32)")
  manifest = None
  if manifest_file is not None:
    if paths:
      raise UserError(f"--manifest {manifest_file} names the images: give no IMAGE arguments "
                      f"with it (got {paths[0]}{' ...' if len(paths) > 1 else ''})")
    manifest = read_manifest(manifest_file)
  config = runs.load_config(workdir)
  outputs = runs.outputs(config)
  if manifest is not None:
    for label, line in zip(manifest.labels, manifest.lines, strict=True):
      if label not in outputs.classes:
        raise UserError(f"--manifest {manifest.file}, line {line}: label {label!r} is not one of "
                        f"the run's {outputs.class_kind}es {', '.join(outputs.classes)}")
    found = list(manifest.found)
  else:
    found = image_paths(paths)
  if not found:
    raise UserError("give at least one image (or a folder of images) to predict")
  config, run_state = runs.restore(workdir)
  images = load_images(found, config.image_size)
  tta = tta or config.get("tta", "none")
  probs = runs.predict_probs(run_state, images, batch_size, tta, runs.temperature(workdir))
  source = sources.of(config)
  unit, b = outputs.group_unit, outputs.binary
  fine = b is not None and tuple(outputs.classes) != tuple(b.names)
  extra = list(manifest.strata) if manifest is not None else []
  strata_names = list(outputs.strata) + [n for n in extra if n not in outputs.strata]
  rows, keys = [], []
  for i, (path, p) in enumerate(zip(found, probs, strict=True)):
    k = int(np.argmax(p))
    shown = manifest.paths[i] if manifest is not None else path
    if b is not None:
      row = {"file_name": shown, f"prob_{b.positive_name}": f"{b.positive_probability(p):.6f}",
             "prediction": b.names[b.of[k]]}
    else:
      row = {"file_name": shown, "prediction": outputs.classes[k],
             **{f"prob_{c}": f"{p[j]:.6f}" for j, c in enumerate(outputs.classes)}}
    if manifest is not None:
      row.update(label=manifest.labels[i],
                 correct=str(outputs.classes[k] == manifest.labels[i]).lower())
    described = source.describe_file(path)
    group = (manifest.groups[i] if manifest is not None and manifest.groups is not None
             else described["group"] if described else "")
    row[f"{unit}_id"] = group
    for name in strata_names:
      row[name] = (manifest.strata[name][i] if name in extra
                   else described["strata"][name] if described else "")
    row[f"{unit}_vote"] = ""
    if manifest is not None:
      row[f"{unit}_vote_correct"] = ""
    if fine:
      row.update({outputs.class_kind: outputs.classes[k],
                  f"prob_{outputs.class_kind}": f"{p[k]:.6f}"})
    rows.append(row)
    keys.append((group, *(row[name] for name in strata_names)) if group else None)
  named = [i for i, key in enumerate(keys) if key is not None]
  if named:
    order = sorted({keys[i] for i in named})
    group = np.array([order.index(keys[i]) for i in named])
    votes = evaluate.vote(group, np.argmax(probs[named], -1), len(outputs.classes),
                          tie_class=(outputs.classes.index(config.tie_rule)
                                     if len(outputs.classes) == 2 and config.tie_rule else None),
                          probs=probs[named])
    for i, g in zip(named, group, strict=True):
      rows[i][f"{unit}_vote"] = outputs.classes[votes[int(g)]]
  if manifest is None:
    return rows, None
  seen = training_overlap(config, images)
  if seen:
    warn(f"{seen} of the {len(found)} images of --manifest {manifest.file} are in the "
                f"run's training split (fold {config.fold}): the figures below count images the "
                f"model was trained on")
  figures = _score_manifest(config, run_state, outputs, manifest, rows, probs, source)
  labels = {}  # a group's vote (in a stratum) is scored when its images carry one label
  for row, key in zip(rows, keys, strict=True):
    labels.setdefault(key, set()).add(row["label"])
  for row, key in zip(rows, keys, strict=True):
    if key is not None and len(labels[key]) == 1:
      row[f"{unit}_vote_correct"] = str(row[f"{unit}_vote"] == row["label"]).lower()
  return rows, figures


def training_overlap(config, images: np.ndarray) -> int | None:
  """How many of `images` (decoded as `load_images` decodes them) are, pixel for pixel, images of
  the run's training split, read from its prepared data (`load_fold` of the run's config); None
  when that data cannot be read (moved, or another machine's)."""

  try:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
      fold = load_fold(config)
  except (UserError, OSError):
    return None
  digest = lambda image: hashlib.sha256(np.ascontiguousarray(image).tobytes()).digest()
  trained = {digest(fold.images[i]) for i in fold.train_indices
             if fold.images[i].shape == images.shape[1:]}
  return sum(digest(image) in trained for image in images)


def _score_manifest(config, run_state, outputs, manifest: Manifest, rows: list[dict],
                    probs: np.ndarray, source) -> dict:
  """The evaluator's results (as results.json) of a manifest's images: groups from its `group`
  column (the file name's where it has none, else each image alone), strata from its further
  columns (the file name's where it has none, else the manifest as one stratum)."""
  n = len(rows)
  unit = outputs.group_unit
  named = all(r[f"{unit}_id"] for r in rows)
  group_names = [r[f"{unit}_id"] if named else r["file_name"] for r in rows]
  group_ids = tuple(dict.fromkeys(group_names))
  axes = list(manifest.strata) or [a for a in outputs.strata if all(r[a] for r in rows)]
  strata = []
  for axis in axes:
    values = [r[axis] for r in rows]
    known = tuple(getattr(source, "STRATA", {}).get(axis, ()))
    order = known if set(values) <= set(known) else tuple(dict.fromkeys(values))
    strata.append(Strata(axis, order, np.array([order.index(v) for v in values], np.int32)))
  if not strata:
    stem = os.path.splitext(os.path.basename(manifest.file))[0]
    strata = [Strata("set", (stem,), np.zeros(n, np.int32))]
  fold_data = FoldData(
      source=f"manifest:{manifest.file}", images=np.zeros((n, 1, 1, 3), np.uint8),
      file_names=manifest.paths,
      targets=np.array([outputs.classes.index(label) for label in manifest.labels], np.int32),
      classes=tuple(outputs.classes), groups=np.array([group_ids.index(g) for g in group_names],
                                                      np.int32),
      group_ids=group_ids, strata=tuple(strata), train_indices=np.zeros(0, np.int64),
      test_indices=np.arange(n, dtype=np.int64), mean=np.asarray(run_state.image_mean),
      std=np.asarray(run_state.image_std), fold=config.fold,
      folds_source=f"the images of {manifest.file}", group_unit=unit,
      class_kind=outputs.class_kind, binary=outputs.binary)
  reference = (stain.describe(run_state.stain_matrix, run_state.stain_max, "the run's")
               if run_state.stain_matrix is not None else None)
  result, _ = external.score(
      config, fold_data, fold_data.test_indices, probs, outputs.classes,
      what=f"--manifest {manifest.file}", stain_normalization=reference,
      normalization={"mean": [float(x) for x in np.asarray(run_state.image_mean)],
                     "std": [float(x) for x in np.asarray(run_state.image_std)],
                     "computed_on": "the run's training images (from its checkpoint)"},
      external={"manifest": os.path.abspath(manifest.file), "num_images": n,
                "groups_from": ("the manifest's group column" if manifest.groups is not None
                                else "file names" if named else "none: each image alone")})
  return result
