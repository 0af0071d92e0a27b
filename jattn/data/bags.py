"""Slides as bags of tile features (`--config.data.name=bags`), for multiple-instance learning
(jattn/models/mil.py): a manifest of labelled slides and one HDF5 features file per slide.

- the manifest, `--config.data.bags.manifest=FILE.csv`: columns `slide,label`, optionally a
  `patient` column (or the one `--config.data.bags.group` names: the unit folds keep apart and
  the bootstrap resamples; without one, each slide is its own group, with a warning) and the
  stratum columns `--config.data.bags.strata` names;
- the features, `--config.data.bags.features_dir` ('' : the manifest's folder): `<slide>.h5` per
  slide (or `<slide>` as listed, when it ends in .h5), with a dataset `features` [N, D] and a
  dataset `coords` [N, 2] of the tiles' level-0 positions: what `jattn features` writes, and what
  CLAM's and TRIDENT's feature extraction write (h5py reads them; CLAM's `coords` carries the
  attributes patch_level and patch_size, jattn's patch_size_level0).

Every file is checked before training: a slide whose file is missing, not HDF5, has no
`features` or `coords`, no tiles, another feature width than the rest, or another backbone than
the rest (the file attributes `backbone` and `weights_sha256` that `jattn features` writes;
CLAM's files have none, and all files must then have none) is one line naming it.

Folds are those of the other labelled sources (jattn/data/labelled.py): K stratified group folds
drawn by scikit-learn's `StratifiedGroupKFold` from `config.data.folds_seed` (written to
`<prepared_dir>/folds/` for reuse), or a CSV of `fold,split,path` rows whose `path` is the slide.
`load_fold` returns the fold as a `FoldData` whose items are slides (file_names), groups the
patients and `images` an empty [N, 0, 0, 3] array: the evaluator and results.json read it as any
fold; `features(i)` and `coords(i)` read one slide's bag.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os

import h5py
import numpy as np

from jattn.core import files
from jattn.core.errors import UserError
from jattn.data import labelled
from jattn.data.fold import FoldData, Outputs

NAME = "bags"
GROUP_UNIT = "slide"
DEFAULTS = {
    "manifest": "",  # a CSV of slide,label[,patient][,<strata>] rows
    "features_dir": "",  # the folder of <slide>.h5 files ('': the manifest's folder)
    "classes": "",  # the classes in output order ('': the manifest's labels, sorted)
    "group": "",  # the column of each slide's group ('': 'patient' where there is one)
    "strata": "",  # columns reported separately, e.g. 'centre,scanner' ('': none)
    "positive_class": "",  # two classes: the positive one (sensitivity, ROC); '' for none
    # training only: a bag of more tiles is a sample of this many (jattn/training/mil_train.py)
    "train_max_tiles": 4096,
}
COLUMNS = ("slide", "label")
BACKBONE_ATTRS = ("backbone", "weights_sha256")  # what says which backbone wrote a file


def _settings(config):
  return config.data.bags


def manifest_path(config) -> str:
  path = labelled.manifest_path(_settings(config).manifest, config.data.dir)
  if not path:
    raise UserError("--config.data.bags.manifest: give the CSV of slide,label[,patient] rows "
                    "(docs/mil.md)")
  return path


def root(config) -> str:
  return os.path.dirname(manifest_path(config))


def features_dir(config) -> str:
  spec = os.path.expanduser(_settings(config).features_dir)
  if not spec:
    return root(config)
  inside = os.path.join(root(config), spec)
  return os.path.abspath(inside if not os.path.isabs(spec) and os.path.isdir(inside) else spec)


def file_of(config, slide: str) -> str:
  name = slide if slide.endswith(".h5") else f"{slide}.h5"
  return os.path.join(features_dir(config), name)


def prepared_dir(config) -> str:
  """`--config.data.prepared_dir`, else `~/.cache/jattn/prepared/bags-<manifest stem>-<hash of
  its absolute path>`: where generated folds are written."""
  if config.data.prepared_dir:
    return os.path.abspath(os.path.expanduser(config.data.prepared_dir))
  path = manifest_path(config)
  digest = hashlib.sha256(path.encode()).hexdigest()[:10]
  stem = os.path.splitext(os.path.basename(path))[0]
  return os.path.join(os.path.expanduser("~/.cache/jattn/prepared"), f"bags-{stem}-{digest}")


def _group_column(config) -> str:
  return _settings(config).group or "patient"


def read_table(config) -> labelled.Table:
  """The manifest's rows as a table (in row order); a missing column, repeated slide, empty or
  unknown label is one line naming the row."""
  path = manifest_path(config)
  if not os.path.isfile(path):
    raise UserError(f"--config.data.bags.manifest={_settings(config).manifest}: {path} does not "
                    f"exist; give a CSV of slide,label[,patient][,<strata>] rows")
  s = _settings(config)
  group_column = _group_column(config)
  strata = labelled.names_of(s.strata)
  requested = labelled.names_of(s.classes)
  read = files.read_csv(path)
  header = list(read.header)
  named = {**({group_column: "--config.data.bags.group"} if s.group else {}),
           **dict.fromkeys(strata, "--config.data.bags.strata")}
  missing = [c for c in [*COLUMNS, *named] if c not in header]
  if missing:
    by = f" (named by {named[missing[0]]})" if missing[0] in named else ""
    raise UserError(f"{path} has no column {missing[0]!r}{by}: its columns are "
                    f"{','.join(header) or 'none'}{files.separator_hint(header)}; a bags "
                    f"manifest has the columns slide,label, optionally patient and strata")
  has_group = group_column in header
  names, labels, groups, first = [], [], [], {}
  axes = {a: [] for a in strata}
  for line, row in read.records():
    slide = row["slide"].strip()
    if not slide:
      raise UserError(f"{path} line {line}: empty slide")
    if slide in first:
      raise UserError(f"{path} line {line}: slide {slide} is listed again (first on line "
                      f"{first[slide]}); list each slide once")
    first[slide] = line
    label = row["label"].strip()
    if not label:
      raise UserError(f"{path} line {line}: empty label")
    if requested and label not in requested:
      raise UserError(f"{path} line {line}: label {label!r} is not one of "
                      f"--config.data.bags.classes={','.join(requested)}")
    for a in strata:
      value = row[a].strip()
      if not value:
        raise UserError(f"{path} line {line}: empty {a} (a stratum column, "
                        f"--config.data.bags.strata)")
      axes[a].append(value)
    if has_group:
      group = row[group_column].strip()
      if not group:
        raise UserError(f"{path} line {line}: empty {group_column}")
      groups.append(group)
    names.append(slide)
    labels.append(label)
  if not names:
    raise UserError(f"{path} has a header but no rows")
  classes = labelled.classes_of(requested, labels, path, "data.bags")
  index = {c: i for i, c in enumerate(classes)}
  return labelled.Table(
      names=tuple(names), labels=np.asarray([index[c] for c in labels], np.int32),
      classes=classes, groups=tuple(groups) if has_group else None,
      strata=labelled.make_strata(axes, [None] * len(names), "",
                                  os.path.splitext(os.path.basename(path))[0]),
      where=path, group_unit=group_column.removesuffix("_id") if has_group else GROUP_UNIT)


@dataclasses.dataclass(frozen=True)
class BagInfo:
  """What a slide's features file holds, read without its features."""

  path: str
  length: int  # N, its tiles
  dim: int  # D
  backbone: tuple  # the BACKBONE_ATTRS' values (None where absent)


def inspect_file(path: str, slide: str) -> BagInfo:
  """A slide's features file checked: one line naming the slide for each problem."""
  if not os.path.isfile(path):
    raise UserError(f"slide {slide}: its features file {path} does not exist (write it with "
                    f"`jattn features`, or point --config.data.bags.features_dir at CLAM's or "
                    f"TRIDENT's h5 folder)")
  try:
    with h5py.File(path, "r") as f:
      for name in ("features", "coords"):
        if name not in f or not isinstance(f[name], h5py.Dataset):
          raise UserError(f"slide {slide}: {path} has no dataset {name!r} (a features file "
                          f"holds features [N, D] and coords [N, 2])")
      shape, coords = f["features"].shape, f["coords"].shape
      attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
  except OSError as e:
    raise UserError(f"slide {slide}: {path} is not a readable HDF5 file ({e})") from None
  if len(shape) != 2:
    raise UserError(f"slide {slide}: {path}'s features have shape {shape}, not [N, D]")
  if shape[0] == 0:
    raise UserError(f"slide {slide}: {path} holds no tiles (features of shape {shape}): "
                    f"leave the slide out of the manifest, or extract its tiles again")
  if len(coords) != 2 or coords[0] != shape[0]:
    raise UserError(f"slide {slide}: {path} has {shape[0]} features but coords of shape "
                    f"{coords}: one [x, y] per tile")
  backbone = tuple(str(attrs[k]) if k in attrs else None for k in BACKBONE_ATTRS)
  return BagInfo(path, int(shape[0]), int(shape[1]), backbone)


def _odd_one(infos: list[BagInfo], slides, key, describe) -> None:
  """One line naming the first slide whose `key` differs from the most common one."""
  counts = collections.Counter(key(i) for i in infos)
  if len(counts) < 2:
    return
  common = counts.most_common(1)[0][0]
  odd = next(k for k, i in enumerate(infos) if key(i) != common)
  raise UserError(f"slide {slides[odd]}: {infos[odd].path} has {describe(key(infos[odd]))}; the "
                  f"other {counts[common]} of {len(infos)} slides have {describe(common)}: "
                  f"extract every slide's features with one backbone")


def _backbone_text(b: tuple) -> str:
  if not any(b):
    return "no backbone attribute"
  return f"backbone {b[0]} (weights_sha256 {str(b[1])[:12]})"


def inspect_all(config, table: labelled.Table) -> list[BagInfo]:
  infos = [inspect_file(file_of(config, s), s) for s in table.names]
  _odd_one(infos, table.names, lambda i: i.dim, lambda d: f"features of width {d}")
  _odd_one(infos, table.names, lambda i: i.backbone, _backbone_text)
  return infos


def read_features(path: str) -> np.ndarray:
  with h5py.File(path, "r") as f:
    return np.asarray(f["features"][:], np.float32)


def read_coords(path: str) -> np.ndarray:
  with h5py.File(path, "r") as f:
    return np.asarray(f["coords"][:])


# ---------------------------------------------------------------------------------------------
# The source's interface (jattn/data/sources.py).


def check_config(config) -> None:
  folds, k = config.data.folds, config.data.num_folds
  if folds == "generated" and not (isinstance(k, int) and k >= 2):
    raise UserError(f"--config.data.num_folds={k!r}: the number of folds to generate, at least 2")
  limit = _settings(config).train_max_tiles
  if not (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0):
    raise UserError(f"--config.data.bags.train_max_tiles={limit!r}: the most tiles of a bag a "
                    f"training step takes (a sample), or 0 for all")
  if config.model.get("name") not in ("abmil", "clam_sb", "transmil"):
    raise UserError(f"--config.data.name=bags: bags of tile features train a MIL module; set "
                    f"--config.model.name to abmil, clam_sb or transmil (not "
                    f"{config.model.get('name')!r})")


def outputs(config) -> Outputs:
  s = _settings(config)
  if labelled.names_of(s.classes):
    classes = labelled.classes_of(s.classes, (), "--config.data.bags.classes", "data.bags")
    decided_by = "--config.data.bags.classes"
  else:
    classes = read_table(config).classes
    decided_by = f"the labels of {manifest_path(config)}"
  strata = labelled.names_of(s.strata) or (labelled.DATASET_AXIS,)
  unit = _group_column(config).removesuffix("_id")
  return Outputs(classes, "class", labelled.class_map(s.positive_class, classes, "data.bags"),
                 unit, strata, decided_by)


def num_folds(config) -> int:
  if config.data.folds == "generated":
    return config.data.num_folds
  return labelled.count_folds(labelled.folds_path(config.data.folds, root(config)))


def describe_file(path: str) -> dict | None:
  del path
  return None


def check_data_dir(config) -> None:
  """The manifest, every features file and the fold being run, checked; nothing is written."""
  table = read_table(config)
  labelled.class_map(_settings(config).positive_class, table.classes, "data.bags")
  inspect_all(config, table)
  labelled.resolve_folds(config, table, prepared_dir(config), root=root(config))


@dataclasses.dataclass(frozen=True, eq=False)
class Bags:
  """One fold of a bag data set: its `FoldData` (items are slides) and each slide's file."""

  fold: FoldData
  infos: tuple[BagInfo, ...]

  @property
  def dim(self) -> int:
    return self.infos[0].dim

  @property
  def backbone(self) -> dict:
    return dict(zip(BACKBONE_ATTRS, self.infos[0].backbone, strict=True))

  def features(self, i: int) -> np.ndarray:
    return read_features(self.infos[i].path)

  def coords(self, i: int) -> np.ndarray:
    return read_coords(self.infos[i].path)


def load_bags(config) -> Bags:
  """Fold `config.fold` of the bags (generated folds written for reuse)."""
  table = read_table(config)
  if table.groups is None:
    labelled.warn_all([f"{table.where} has no {_group_column(config)} column: each slide is "
                       f"its own group, so a patient's slides may fall on both sides of a fold"])
  binary = labelled.class_map(_settings(config).positive_class, table.classes, "data.bags")
  infos = inspect_all(config, table)
  prepared = prepared_dir(config)
  folds, notes = labelled.resolve_folds(config, table, prepared, root=root(config))
  labelled.warn_all(notes)
  folds = labelled.save_generated(config, table, prepared, folds)
  split = folds.splits[config.fold]
  sides = np.array([split.get(n, "") for n in table.names])
  group_ids, groups = labelled.group_index(table)
  nan = np.full(3, np.nan, np.float32)
  fold = FoldData(
      source=NAME, images=np.zeros((len(table.names), 0, 0, 3), np.uint8),
      file_names=table.names, targets=table.labels, classes=table.classes, groups=groups,
      group_ids=group_ids, strata=table.strata,
      train_indices=np.flatnonzero(sides == "train").astype(np.int64),
      test_indices=np.flatnonzero(sides == "test").astype(np.int64), mean=nan, std=nan,
      fold=config.fold, folds_source=folds.source, group_unit=table.group_unit,
      class_kind="class", binary=binary)
  return Bags(fold, tuple(infos))


def load_fold(config) -> FoldData:
  return load_bags(config).fold
