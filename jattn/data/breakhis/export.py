"""BreakHis as a folder of images per class with a manifest, the form the folder source reads.

  OUT/<class>/<file>.png   every image (hard-linked where the file system allows, else copied)
  OUT/manifest.csv         path,label,patient,magnification,subtype,mpp (paths relative to OUT)
  OUT/folds.csv            fold,split,path: the BreakHis folds given, if any

With the manifest, `--config.data.name=folder --config.data.folder.manifest=OUT/manifest.csv
--config.data.folder.group=patient --config.data.folder.strata=magnification
--config.data.folder.positive_class=malignant` sees the same images, patients, magnifications and
(with `--config.data.folds=OUT/folds.csv`) folds as the BreakHis source (`configs/demo_folder.py`).
`jattn data synthesize --format folder` writes a synthetic BreakHis in this form.
"""

from __future__ import annotations

import csv
import io
import os
import shutil

from jattn.core import files
from jattn.core.errors import UserError
from jattn.data.breakhis import folds as folds_lib
from jattn.data.breakhis import naming, source
from jattn.data.breakhis import scan as scan_lib

MANIFEST = "manifest.csv"
FOLDS = "folds.csv"
COLUMNS = ("path", "label", "patient", "magnification", "subtype", "mpp")


def _link_or_copy(src: str, dst: str) -> None:
  try:
    os.link(src, dst)
  except OSError:
    shutil.copyfile(src, dst)


def to_folder(data_dir: str, out: str, *, folds: folds_lib.Folds | None = None) -> dict:
  """Writes the BreakHis tree in `data_dir` into the new or empty folder `out` (whole or not at
  all) in the form above; returns {out, images, manifest, folds}."""
  out = os.path.abspath(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise UserError(f"{out} exists and is not an empty folder: choose a new folder")
  records = scan_lib.scan(scan_lib.resolve_data_dir(os.path.abspath(data_dir))).records
  mpp = dict(zip(naming.MAGNIFICATIONS, source.MPP, strict=True))
  path_of = {r.file_name: f"{naming.CLASSES[r.label]}/{r.file_name}" for r in records}
  with files.atomic_folder(out) as tmp:
    for name in naming.CLASSES:
      os.makedirs(os.path.join(tmp, name))
    manifest = io.StringIO()
    writer = csv.writer(manifest, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in records:
      _link_or_copy(os.path.join(data_dir, *r.path.split("/")),
                    os.path.join(tmp, *path_of[r.file_name].split("/")))
      writer.writerow([path_of[r.file_name], naming.CLASSES[r.label], r.patient_id,
                       r.magnification, r.subtype, mpp[r.magnification]])
    with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8", newline="") as f:
      f.write(manifest.getvalue())
    if folds is not None:
      text = io.StringIO()
      writer = csv.writer(text, lineterminator="\n")
      writer.writerow(("fold", "split", "path"))
      for fold, split in folds.splits.items():
        for name, side in sorted(split.items(), key=lambda item: path_of.get(item[0], item[0])):
          if name in path_of:
            writer.writerow([fold, side, path_of[name]])
      with open(os.path.join(tmp, FOLDS), "w", encoding="utf-8", newline="") as f:
        f.write(text.getvalue())
  return {"out": out, "images": len(records), "manifest": os.path.join(out, MANIFEST),
          "folds": os.path.join(out, FOLDS) if folds is not None else None}
