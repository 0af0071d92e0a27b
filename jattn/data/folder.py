"""A folder of labelled images as a jattn data source (`--config.data.name=folder`).

Two ways to say what the images are:

- torchvision's ImageFolder convention: `DATA_DIR/<class>/**/*.{png,jpg,jpeg,tif,tiff}`, one
  folder per class (classes sorted by name), images in any sub-folders below it. There are no
  groups: every image is its own group, with a warning that a patient's images may then fall on
  both sides of a split.
- a manifest, `--config.data.folder.manifest=FILE.csv`: columns `path,label`, optionally a group
  column (`group`, or the one `--config.data.folder.group` names, e.g. `patient`), the stratum
  columns `--config.data.folder.strata=centre,...` names and an `mpp` column (microns per pixel;
  else `--config.data.folder.mpp`). Paths are relative to the CSV's folder (a `..` may leave it), or
  absolute. The images are cached in the row order; the CSV is read by `files.read_csv`.

The images are decoded once into the shared cache (`jattn.data.prepare`) in a deterministic order
(ImageFolder: class, then path; manifest: its rows) under the prepared dir's lock (`prepared_dir`
below); a prepared dir made from other images (added, removed, resized or reordered) is refused,
never used stale. Folds: `jattn.data.labelled`.
"""

from __future__ import annotations

import logging
import math
import os
import posixpath

import numpy as np
from PIL import Image

from jattn.core import files
from jattn.core.errors import UserError
from jattn.data import labelled, prepare
from jattn.data.fold import FoldData, Outputs

NAME = "folder"
GROUP_UNIT = "group"
# This source's group of config fields, config.data.folder, with their defaults.
DEFAULTS = {
    "manifest": "",  # a CSV of path,label[,group,<strata>,mpp] rows ('': DIR/<class>/...)
    "classes": "",  # the classes in output order, e.g. 'normal,tumour' ('': the data's, sorted)
    "group": "",  # the column of each image's group ('': 'group' where there is one)
    "strata": "",  # columns reported separately, e.g. 'centre,scanner' ('': none)
    "mpp": 0.0,  # microns per pixel of the images (0: unknown; a manifest's mpp column wins)
    "positive_class": "",  # two classes: the positive one (sensitivity, ROC); '' for none
}
STRATA = {labelled.DATASET_AXIS: ()}  # the report columns when no run finished: the data's own
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
PREPARED = "jattn_prepared"

log = logging.getLogger(__name__)
COLUMNS = ("path", "label")


def _data_dir(config) -> str:
  return os.path.abspath(os.path.expanduser(config.data.dir))


def _manifest(config) -> str:
  """The manifest's absolute path ('' without one): as given, else relative to data_dir."""
  return labelled.manifest_path(config.data.folder.manifest, config.data.dir)


def _root(config) -> str:
  """The folder image paths are relative to: the manifest's, or data_dir."""
  manifest = _manifest(config)
  return os.path.dirname(manifest) if manifest else _data_dir(config)


def prepared_dir(config) -> str:
  """`--config.data.prepared_dir`, else a folder of the user's cache, never inside the data:
  `~/.cache/jattn/prepared/manifest-<its stem>-<hash>` for a manifest (the hash of its absolute
  path and its bytes: an edited manifest is prepared anew) and `.../folder-<DIR's name>-<hash of
  DIR's absolute path>` for a folder per class; said in one log line. A run prepared where jattn
  used to prepare (`<the data's folder>/jattn_prepared/manifest-<its name>` or
  `DIR/jattn_prepared/folder`) keeps using that folder while it exists."""
  if config.data.prepared_dir:
    return os.path.abspath(os.path.expanduser(config.data.prepared_dir))
  manifest = _manifest(config)
  if manifest:
    where = os.path.abspath(manifest)
    old = os.path.join(os.path.dirname(where), PREPARED, f"manifest-{os.path.basename(where)}")
    if os.path.isdir(old):
      return old
    try:
      with open(where, "rb") as f:
        content = f.read()
    except OSError:
      content = b""  # reading the manifest says what is wrong with it
    folder = prepare.user_cache_dir(
        f"manifest-{os.path.splitext(os.path.basename(where))[0]}", where.encode(), content)
  else:
    where = os.path.abspath(_data_dir(config))
    old = os.path.join(where, PREPARED, "folder")
    if os.path.isdir(old):
      return old
    folder = prepare.user_cache_dir(f"folder-{os.path.basename(where)}", where.encode())
  if folder not in _SAID:
    _SAID.add(folder)
    log.info("prepared data of %s: %s (--config.data.prepared_dir chooses another folder)", where,
             folder)
  return folder


_SAID: set[str] = set()


def image_path(root: str, name: str) -> str:
  """The file of an image name ('/'-separated, as the table holds it): relative to `root`, or an
  absolute path as written; a '..' is resolved as written (it may leave `root`)."""
  return os.path.normpath(os.path.join(root, *name.split("/")) if not posixpath.isabs(name)
                          else name)


def _not_a_file(path: str) -> str:
  """Why `path` is no image file, as the end of a sentence that starts with it."""
  if os.path.islink(path) and not os.path.exists(path):
    return (f"is a symbolic link to {os.readlink(path)}, which does not exist (moved or deleted): "
            f"restore that file or remove the link")
  if os.path.isdir(path):
    return "is a folder, not an image file"
  return "does not exist" if not os.path.lexists(path) else "is not a regular file"


def _is_image(name: str) -> bool:
  return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _group_column(config) -> str:
  return config.data.folder.group or "group"


def _unit(column: str) -> str:
  return column.removesuffix("_id") or "group"


# ------------------------------------------------------------------------------------------------
# Reading what the images are (quick: no image is opened).


def _class_folders(data_dir: str, config) -> list[str]:
  if not os.path.isdir(data_dir):
    raise UserError(f"--config.data.dir={data_dir} does not exist: give the folder that holds a "
                    "folder of images per class (DIR/<class>/...), or "
                    "--config.data.folder.manifest=FILE.csv")
  skip = {os.path.join(data_dir, PREPARED), prepared_dir(config)}  # jattn's, not classes
  folders = sorted(e.name for e in os.scandir(data_dir)
                   if e.is_dir() and not e.name.startswith(".")
                   and os.path.join(data_dir, e.name) not in skip)
  if not folders:
    raise UserError(f"{data_dir} holds no class folders: put each class's images in a folder of "
                    f"its own (DIR/<class>/*.png), or give --config.data.folder.manifest=FILE.csv")
  return folders


def _images_under(folder: str) -> list[str]:
  """Image paths under `folder`, relative to it, in torchvision's order (folder, then name)."""
  found = []
  for here, dirnames, names in os.walk(folder, followlinks=True):
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    rel = os.path.relpath(here, folder)
    found += [(rel, n) for n in names if _is_image(n)]
  return [n if rel == "." else f"{rel.replace(os.sep, '/')}/{n}" for rel, n in sorted(found)]


def scan_folder(config) -> tuple[labelled.Table, list[int]]:
  """The ImageFolder tree in data_dir as a table, and each image's size in bytes."""
  data_dir = _data_dir(config)
  for field in ("strata", "group"):
    if labelled.names_of(config.data.folder[field]):
      raise UserError(f"--config.data.folder.{field} names manifest columns: give "
                      "--config.data.folder.manifest=FILE.csv "
                      f"(a folder per class has no {field} to read)")
  folders = _class_folders(data_dir, config)
  classes = labelled.classes_of(config.data.folder.classes, folders, data_dir, "data.folder")
  stray = [f for f in folders if f not in classes]
  if stray:
    raise UserError(f"{os.path.join(data_dir, stray[0])} is a class folder, but {stray[0]!r} is "
                    f"not one of --config.data.folder.classes={','.join(classes)}: add it there or "
                    "move the "
                    f"folder out of {data_dir}")
  names, labels = [], []
  for c, name in enumerate(classes):
    folder = os.path.join(data_dir, name)
    if not os.path.isdir(folder):
      raise UserError(f"--config.data.folder.classes names {name!r}, but {data_dir} has no folder "
                      f"{name}/")
    images = _images_under(folder)
    if not images:
      raise UserError(f"class folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}): "
                      f"put its images in it, or remove it")
    for p in images:
      full = image_path(data_dir, f"{name}/{p}")
      if not os.path.isfile(full):
        raise UserError(f"{full} in class folder {folder} {_not_a_file(full)}")
    names += [f"{name}/{p}" for p in images]
    labels += [c] * len(images)
  sizes = [os.path.getsize(image_path(data_dir, n)) for n in names]
  mpp = _mpp(config)
  table = labelled.Table(
      names=tuple(names), labels=np.asarray(labels, np.int32), classes=classes,
      groups=None,
      strata=labelled.make_strata({}, [mpp] * len(names), "--config.data.folder.mpp",
                                  os.path.basename(data_dir)),
      where=data_dir)
  return table, sizes


def _mpp(config) -> float | None:
  value = config.data.folder.mpp
  return float(value) if value else None


def read_manifest(config) -> tuple[labelled.Table, list[int]]:
  """The manifest's rows as a table (in row order), and each image's size in bytes. A missing
  column or file, a repeated path, an empty or unknown label is one line naming the row."""
  path = _manifest(config)
  if not os.path.isfile(path):
    raise UserError(f"--config.data.folder.manifest={config.data.folder.manifest}: {path} does not "
                    "exist; give a CSV of "
                    f"{','.join(COLUMNS)}[,group,<strata>...] rows")
  root = os.path.dirname(path)
  group_column = _group_column(config)
  strata = labelled.names_of(config.data.folder.strata)
  requested = labelled.names_of(config.data.folder.classes)
  default_mpp = _mpp(config)
  read = files.read_csv(path)
  header = list(read.header)
  named = {**({group_column: "--config.data.folder.group"} if config.data.folder.group else {}),
           **dict.fromkeys(strata, "--config.data.folder.strata")}
  missing = [c for c in [*COLUMNS, *named] if c not in header]
  if missing:
    by = f" (named by {named[missing[0]]})" if missing[0] in named else ""
    raise UserError(f"{path} has no column {missing[0]!r}{by}: its columns are "
                    f"{','.join(header) or 'none'}{files.separator_hint(header)}; a manifest has "
                    f"the columns {','.join(COLUMNS)}, optionally a group, strata and mpp")
  has_group = group_column in header
  names, labels, groups, sizes, mpps, first = [], [], [], [], [], {}
  axes = {s: [] for s in strata}
  for line, row in read.records():
    name = labelled.normalise_path(row["path"])
    if not name:
      raise UserError(f"{path} line {line}: empty path")
    full = image_path(root, name)
    if full in first:
      raise UserError(f"{path} line {line}: {name} is listed again (first on line "
                      f"{first[full]}); list each image once")
    first[full] = line
    if not os.path.isfile(full):
      raise UserError(f"{path} line {line}: {full} {_not_a_file(full)} (paths are relative to "
                      f"the manifest's folder {root}, or absolute)")
    label = row["label"].strip()
    if not label:
      raise UserError(f"{path} line {line}: empty label")
    if requested and label not in requested:
      raise UserError(f"{path} line {line}: label {label!r} is not one of "
                      "--config.data.folder.classes="
                      f"{','.join(requested)}")
    for s in strata:
      value = row[s].strip()
      if not value:
        raise UserError(f"{path} line {line}: empty {s} (a stratum column, "
                        "--config.data.folder.strata)")
      axes[s].append(value)
    if has_group:
      group = row[group_column].strip()
      if not group:
        raise UserError(f"{path} line {line}: empty {group_column}")
      groups.append(group)
    mpp = default_mpp
    if row.get("mpp", "").strip():
      try:
        mpp = float(row["mpp"])
      except ValueError:
        mpp = -1.0
      if not (math.isfinite(mpp) and mpp > 0):
        raise UserError(f"{path} line {line}: mpp {row['mpp']!r} is not a positive number of "
                        f"microns per pixel (leave it empty where unknown)")
    names.append(name)
    labels.append(label)
    sizes.append(os.path.getsize(full))
    mpps.append(mpp)
  if not names:
    raise UserError(f"{path} has a header but no rows")
  classes = labelled.classes_of(requested, labels, path, "data.folder")
  index = {c: i for i, c in enumerate(classes)}
  note = "the manifest's mpp column" if "mpp" in header else "--config.data.folder.mpp"
  table = labelled.Table(
      names=tuple(names), labels=np.asarray([index[c] for c in labels], np.int32),
      classes=classes, groups=tuple(groups) if has_group else None,
      strata=labelled.make_strata(axes, mpps, note,
                                  os.path.splitext(os.path.basename(path))[0]),
      where=path, group_unit=_unit(group_column) if has_group else GROUP_UNIT)
  return table, sizes


def read_table(config) -> tuple[labelled.Table, list[int]]:
  return read_manifest(config) if config.data.folder.manifest else scan_folder(config)


def _warnings(table: labelled.Table) -> list[str]:
  if table.groups is not None:
    return []
  return [f"{table.where} gives no group of each image: every image is its own group, so splits "
          f"are image-level and one patient's (or slide's) images may fall on both sides; give a "
          f"manifest with a group column to keep them apart"]


# ------------------------------------------------------------------------------------------------
# The source's functions (jattn/data/sources.py).


def check_config(config) -> None:
  """The fields this source reads: folds, num_folds, mpp."""
  labelled.check_fields(config)


def outputs(config) -> Outputs:
  """The classes (`config.data.folder.classes`, else the class folders or the manifest's labels,
  sorted)."""
  if labelled.names_of(config.data.folder.classes):
    classes = labelled.classes_of(config.data.folder.classes, (), "--config.data.folder.classes",
                                    "data.folder")
    decided_by = "--config.data.folder.classes"
  else:
    classes = read_table(config)[0].classes
    decided_by = (f"the labels of {_manifest(config)}" if config.data.folder.manifest else
                  f"the class folders of {_data_dir(config)}")
  strata = labelled.names_of(config.data.folder.strata) or (labelled.DATASET_AXIS,)
  group = config.data.folder.group
  return Outputs(classes, "class",
                 labelled.class_map(config.data.folder.positive_class, classes, "data.folder"),
                 _unit(group) if group else GROUP_UNIT, strata, decided_by)


def num_folds(config) -> int:
  if config.data.folds == "generated":
    return config.data.num_folds
  return labelled.count_folds(labelled.folds_path(config.data.folds, _root(config)))


def describe_file(path: str) -> dict | None:
  del path  # a file's name says nothing of its group here: the manifest does
  return None


def check_data_dir(config) -> None:
  """Reads the folder or manifest and checks the folds of the fold being run, before any slower
  work; every problem is one line, and nothing is written."""
  table, sizes = read_table(config)
  labelled.class_map(config.data.folder.positive_class, table.classes, "data.folder")
  entries = [[n, s] for n, s in zip(table.names, sizes, strict=True)]
  labelled.check_unchanged(prepared_dir(config), labelled.fingerprint_of(entries), entries,
                           table.where)
  labelled.resolve_folds(config, table, prepared_dir(config), root=_root(config))


class _Files:
  """The images of a table as the random-access examples `prepare.build_cache` decodes."""

  def __init__(self, root: str, names):
    self.root, self.names = root, names

  def __len__(self) -> int:
    return len(self.names)

  def __getitems__(self, indices):
    out = []
    for i in indices:
      with open(image_path(self.root, self.names[i]), "rb") as f:
        out.append({"image": f.read(), "name": self.names[i]})
    return out


def _memory_needed(root: str, table: labelled.Table, sizes, image_size: int, threads: int) -> str:
  largest = max(range(len(sizes)), key=sizes.__getitem__)
  try:
    with Image.open(image_path(root, table.names[largest])) as im:
      pixels = im.size[0] * im.size[1]
  except Exception:  # noqa: BLE001 -- unreadable: its own error comes when it is decoded
    pixels = 1024 * 1024
  need = prepare.CHUNK * (sizes[largest] + 3 * image_size**2) + threads * 2 * 3 * pixels
  return (f"preparing {len(sizes):,} images at {image_size}x{image_size} with {threads} "
          f"thread(s) needs about {prepare.size_text(need)} of memory besides the process itself")


def load_fold(config) -> FoldData:
  """Fold `config.fold` of the folder or manifest: checked first (nothing written on a problem),
  then, under the prepared dir's lock and each only once, the decoded-image cache, the generated
  folds and the fold's normalisation statistics."""
  return _load(config, every_image=False)


def load_all(config) -> FoldData:
  """Every image of the folder or manifest as a test image, no folds read or generated and no
  statistics computed (external validation, `jattn.data.sources`)."""
  return _load(config, every_image=True)


def _load(config, every_image: bool) -> FoldData:
  table, sizes = read_table(config)
  binary = labelled.class_map(config.data.folder.positive_class, table.classes, "data.folder")
  root, prepared = _root(config), prepared_dir(config)
  entries = [[n, s] for n, s in zip(table.names, sizes, strict=True)]
  fingerprint = labelled.fingerprint_of(entries)
  labelled.check_unchanged(prepared, fingerprint, entries, table.where)
  folds, notes = (None, []) if every_image else labelled.resolve_folds(
      config, table, prepared, root=root)  # before writing
  threads = max(1, int(config.loader_threads))
  with (
      prepare.reporting_worker_deaths(
          root, prepared, lambda: _memory_needed(root, table, sizes, config.image_size, threads)),
      files.locked(prepared),
  ):
    prepare.remove_stale(prepared)
    labelled.check_unchanged(prepared, fingerprint, entries, table.where)
    if not prepare.has_cache(prepared, config.image_size):
      print(f"preparing {len(table.names):,} images of {table.where} into {prepared} (once: a "
            f"decoded-image cache, normalisation statistics)", flush=True)
    cache = prepare.build_cache(_Files(root, table.names), prepared, config.image_size,
                                fingerprint=fingerprint,
                                record_of=lambda e: {"file_names": e["name"]},
                                where=table.where, threads=threads)
    labelled.record_source(prepared, fingerprint, entries)
    if folds is not None:
      folds = labelled.save_generated(config, table, prepared, folds)
    data = labelled.fold_data(config, source=NAME, table=table, cache=cache, folds=folds,
                              prepared_dir=prepared, binary=binary)
  labelled.warn_all(_warnings(table) + notes)
  return data
