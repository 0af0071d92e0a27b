"""An already prepared TFDS data set as a jattn data source (`--config.data.name=tfds:NAME`).

`NAME` is as TFDS spells it (`colorectal_histology`, `patch_camelyon:2.0.0`, `name/config`), found
in `--config.data.dir` (the TFDS data dir, e.g. ~/tensorflow_datasets). It is read from its files
alone (`tfds.builder_from_files`: no builder code, no TensorFlow) through TFDS' random-access data
source, so it must have been prepared in the array_record format. The image is the first of the
supervised keys (else the one Image feature), the label the second (else the one ClassLabel
feature): the classes are its names (TFDS numbers them '0', '1', ... where the builder names none).
The group is the feature `--config.data.tfds.group` names, else the first of GROUP_FEATURES the data
set has; without one every image is its own group. `--config.data.tfds.strata` names features
reported separately. Folds (`--config.data.folds`): `splits` (its train and test splits, one fold),
`generated` (K stratified group folds over its train split, `jattn.data.labelled`) or a
`fold,split,path` CSV of image names `<split>/<index>`.

Every image is decoded once into the shared cache (`jattn.data.prepare`) in the data set's order
(split by split), with its scalar features, under the lock of `<data_dir>/jattn_prepared/tfds/
<name>/<version>/<splits>` (or `--config.data.prepared_dir`); a data set prepared again differently
since is refused, never used stale.
"""

from __future__ import annotations

import os

import numpy as np

from jattn.core import files
from jattn.core.errors import UserError
from jattn.data import labelled, prepare
from jattn.data.fold import FoldData, Outputs

NAME = "tfds"
# This source's group of config fields, config.data.tfds, with their defaults.
DEFAULTS = {
    "classes": "",  # the label feature's names in output order ('': as the data set has them)
    "group": "",  # the feature of each image's group ('': the first of GROUP_FEATURES it has)
    "strata": "",  # features reported separately ('': none)
    "mpp": 0.0,  # microns per pixel of the images (0: unknown)
    "positive_class": "",  # two classes: the positive one (sensitivity, ROC); '' for none
}
PREFIX = "tfds:"
GROUP_UNIT = "group"
STRATA = {labelled.DATASET_AXIS: ()}
GROUP_FEATURES = ("group", "patient_id", "patient", "slide_id", "slide", "case_id")


def dataset_name(config) -> str:
  return config.data.name[len(PREFIX):]


def _data_dir(config) -> str:
  return os.path.abspath(os.path.expanduser(config.data.dir))


def prepare_command(name: str, data_dir: str) -> str:
  """What prepares `name` where this source reads it (TFDS' own command line)."""
  return f"tfds build {name} --data_dir={data_dir} --file_format=array_record"


def builder(config):
  """The prepared data set's read-only builder; a data set not prepared (or not as array_record)
  is one line saying what prepares it."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core import read_only_builder, registered

  name, data_dir = dataset_name(config), _data_dir(config)
  how = (f"prepare it once (this needs TensorFlow and, for most data sets, internet): "
         f"`{prepare_command(name, data_dir)}`, then run again")
  if not name:
    raise UserError("--config.data.name=tfds: name the TFDS data set, e.g. "
                    "--config.data.name=tfds:colorectal_histology")
  try:
    found = read_only_builder.builder_from_files(name, data_dir=data_dir)
  except registered.DatasetNotFoundError:
    raise UserError(f"--config.data.name=tfds:{name}: no prepared TFDS data set {name} in "
                    f"--config.data.dir={data_dir}; {how}") from None
  if found.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise UserError(f"--config.data.name=tfds:{name}: {found.data_dir} holds "
                    f"{found.info.file_format.value} files, which cannot be read at random without "
                    f"TensorFlow; {how}")
  return found


def _kind(feature) -> str | None:
  """'class', 'text' or 'number' for a scalar feature jattn can read, else None."""
  import tensorflow_datasets as tfds

  if isinstance(feature, tfds.features.ClassLabel):
    return "class"
  if isinstance(feature, tfds.features.Text):
    return "text"
  if (isinstance(feature, tfds.features.Tensor) and tuple(feature.shape) == ()
      and np.dtype(feature.np_dtype).kind in "iub"):
    return "number"
  return None


def features(info, config) -> dict:
  """{'image', 'label', 'group' (or None), 'strata': (...)}: the feature keys this run reads."""
  import tensorflow_datasets as tfds

  name = dataset_name(config)
  found = info.features
  supervised = tuple(info.supervised_keys or ())[:2]
  images = [k for k, f in found.items() if isinstance(f, tfds.features.Image)]
  labels = [k for k, f in found.items() if isinstance(f, tfds.features.ClassLabel)]
  image = supervised[0] if supervised and supervised[0] in images else (
      images[0] if len(images) == 1 else None)
  label = supervised[1] if len(supervised) == 2 and supervised[1] in labels else (
      labels[0] if len(labels) == 1 else None)
  if image is None or label is None:
    what = "image" if image is None else "class label"
    raise UserError(f"tfds:{name} has no single {what} feature jattn can tell (its features: "
                    f"{', '.join(found)}, supervised keys: {supervised or 'none'})")
  readable = {k for k, f in found.items() if _kind(f) is not None}
  asked = config.data.tfds.group
  if asked and asked not in readable:
    raise UserError(f"--config.data.tfds.group={asked!r} is not a scalar feature of tfds:{name} "
                    "(its "
                    f"features: {', '.join(sorted(readable))})")
  group = asked or next((k for k in GROUP_FEATURES if k in readable and k != label), None)
  strata = labelled.names_of(config.data.tfds.strata)
  unknown = [s for s in strata if s not in readable]
  if unknown:
    raise UserError(f"--config.data.tfds.strata: {unknown[0]!r} is not a scalar feature of "
                    f"tfds:{name} "
                    f"(its features: {', '.join(sorted(readable))})")
  return {"image": image, "label": label, "group": group, "strata": strata}


def _splits(info, config) -> tuple[str, ...]:
  """The splits a run reads: train and test for `splits`, the train split for generated folds
  (the one split, if the data set has only one), the train and test splits there are for a CSV."""
  have = tuple(info.splits)
  name = dataset_name(config)
  if config.data.folds == "splits":
    missing = [s for s in labelled.SPLITS if s not in have]
    if missing:
      raise UserError(f"--config.data.folds=splits: tfds:{name} has no {missing[0]} split (its "
                      "splits: "
                      f"{', '.join(have)}); use --config.data.folds=generated for folds over its "
                      f"train split")
    return labelled.SPLITS
  if config.data.folds == "generated":
    if "train" in have:
      return ("train",)
    if len(have) == 1:
      return have
    raise UserError(f"tfds:{name} has no train split (its splits: {', '.join(have)}) to generate "
                    f"folds over")
  return tuple(s for s in labelled.SPLITS if s in have) or have


def classes(info, config) -> tuple[str, ...]:
  names = tuple(info.features[features(info, config)["label"]].names)
  asked = labelled.names_of(config.data.tfds.classes)
  if asked and asked != names:
    raise UserError(f"--config.data.tfds.classes={','.join(asked)}: the classes of "
                    f"tfds:{dataset_name(config)} are its label feature's, in its order "
                    f"({','.join(names)}); leave --config.data.tfds.classes empty")
  return labelled.classes_of("", names, f"tfds:{dataset_name(config)}", "data.tfds")


def _unit(key: str | None) -> str:
  """What a group is called: the group feature's name without an '_id' ('patient_id': patient)."""
  return (key.removesuffix("_id") or GROUP_UNIT) if key else GROUP_UNIT


def prepared_dir(config, b, splits) -> str:
  if config.data.prepared_dir:
    return os.path.abspath(os.path.expanduser(config.data.prepared_dir))
  info = b.info
  parts = [info.name, *([info.config_name] if info.config_name else []), str(info.version)]
  return os.path.join(prepare.default_prepared_dir(_data_dir(config)), "tfds", *parts,
                      "+".join(splits))


# ------------------------------------------------------------------------------------------------
# The source's functions (jattn/data/sources.py).


def check_config(config) -> None:
  """The fields this source reads: folds, num_folds, mpp."""
  labelled.check_fields(config)


def outputs(config) -> Outputs:
  b = builder(config)
  names = classes(b.info, config)
  keys = features(b.info, config)
  return Outputs(names, "class",
                 labelled.class_map(config.data.tfds.positive_class, names, "data.tfds"),
                 _unit(keys["group"]), keys["strata"] or (labelled.DATASET_AXIS,),
                 f"the label feature of tfds:{dataset_name(config)}")


def num_folds(config) -> int:
  if config.data.folds == "splits":
    return 1
  if config.data.folds == "generated":
    return config.data.num_folds
  return labelled.count_folds(labelled.folds_path(config.data.folds, _data_dir(config)))


def describe_file(path: str) -> dict | None:
  del path
  return None


def check_data_dir(config) -> None:
  b = builder(config)
  classes(b.info, config)
  _splits(b.info, config)


class _Examples:
  """The examples of some splits, one after another, as `prepare.build_cache` reads them: the
  encoded image, a unique name (`<split>/<index>`) and every scalar feature."""

  def __init__(self, b, splits, image_key: str, scalars: dict[str, str]):
    import tensorflow_datasets as tfds

    self.image_key, self.scalars = image_key, scalars
    self.parts = [(s, b.as_data_source(split=s,
                                       decoders={image_key: tfds.decode.SkipDecoding()}))
                  for s in splits]
    self.starts = np.cumsum([0] + [len(p) for _, p in self.parts])

  def __len__(self) -> int:
    return int(self.starts[-1])

  def __getitems__(self, indices):
    out = []
    for k, (split, part) in enumerate(self.parts):
      mine = [i - int(self.starts[k]) for i in indices if self.starts[k] <= i < self.starts[k + 1]]
      for j, example in zip(mine, part.__getitems__(mine) if mine else [], strict=True):
        record = {"image": example[self.image_key], "file_names": f"{split}/{j}"}
        for key, kind in self.scalars.items():
          value = example[key]
          record[f"feature:{key}"] = (value.decode("utf-8", "replace") if kind == "text"
                                      else np.asarray(value).item())
        out.append(record)
    return out


def _record_of(example: dict) -> dict:
  return {k: v for k, v in example.items() if k != "image"}


def _fingerprint(b) -> tuple[str, list]:
  """What identifies a prepared data set: its version and each split's examples and bytes."""
  info = b.info
  entries = [[f"{info.full_name}/{s.name}", s.num_examples, s.num_bytes]
             for s in info.splits.values()]
  return labelled.fingerprint_of(entries), entries


def _text(feature, value) -> str:
  return feature.names[int(value)] if _kind(feature) == "class" else str(value)


def _table(b, config, cache: prepare.Cache, names: tuple[str, ...]) -> labelled.Table:
  keys = features(b.info, config)
  f = b.info.features
  column = cache.table
  mpp = float(config.data.tfds.mpp) or None
  group = keys["group"]
  return labelled.Table(
      names=tuple(column["file_names"]),
      labels=np.asarray(column[f"feature:{keys['label']}"], np.int32), classes=names,
      groups=(tuple(_text(f[group], v) for v in column[f"feature:{group}"]) if group else None),
      strata=labelled.make_strata(
          {s: [_text(f[s], v) for v in column[f"feature:{s}"]] for s in keys["strata"]},
          [mpp] * len(column["file_names"]), "--config.data.tfds.mpp", dataset_name(config)),
      where=f"tfds:{dataset_name(config)} ({b.data_dir})", group_unit=_unit(group))


def load_fold(config) -> FoldData:
  """Fold `config.fold`: under the prepared dir's lock and each only once, the decoded-image cache
  of the splits read (with every scalar feature), the generated folds and the fold's
  normalisation statistics."""
  return _load(config, every_image=False)


def load_all(config) -> FoldData:
  """Every image of the splits read as a test image, no folds and no statistics (external
  validation, `jattn.data.sources`)."""
  return _load(config, every_image=True)


def _load(config, every_image: bool) -> FoldData:
  b = builder(config)
  names = classes(b.info, config)
  binary = labelled.class_map(config.data.tfds.positive_class, names, "data.tfds")
  keys = features(b.info, config)
  splits = _splits(b.info, config)
  prepared = prepared_dir(config, b, splits)
  fingerprint, entries = _fingerprint(b)
  where = f"tfds:{dataset_name(config)} ({b.data_dir})"
  labelled.check_unchanged(prepared, fingerprint, entries, where)
  scalars = {k: _kind(feature) for k, feature in b.info.features.items()
             if _kind(feature) is not None}
  threads = max(1, int(config.loader_threads))
  with (
      prepare.reporting_worker_deaths(
          os.fspath(b.data_dir), prepared,
          lambda: f"decoding {sum(b.info.splits[s].num_examples for s in splits):,} images"),
      files.locked(prepared),
  ):
    prepare.remove_stale(prepared)
    labelled.check_unchanged(prepared, fingerprint, entries, where)
    source = _Examples(b, splits, keys["image"], scalars)
    if not prepare.has_cache(prepared, config.image_size):
      print(f"preparing {len(source):,} images of {where}, splits {', '.join(splits)}, into "
            f"{prepared} (once: a decoded-image cache, normalisation statistics)", flush=True)
    cache = prepare.build_cache(
        source, prepared, config.image_size,
        fingerprint=labelled.fingerprint_of([fingerprint, list(splits), sorted(scalars)]),
        record_of=_record_of, where=where, threads=threads)
    labelled.record_source(prepared, fingerprint, entries)
    table = _table(b, config, cache, names)
    if every_image:
      folds, notes = None, []
    elif config.data.folds == "splits":
      folds = labelled.Folds(f"the train and test splits of tfds:{dataset_name(config)}",
                             {1: {n: n.split("/", 1)[0] for n in table.names}})
      notes = labelled.validate_fold(folds, 1, table, own="data.tfds")
    else:
      folds, notes = labelled.resolve_folds(config, table, prepared, root=_data_dir(config))
      folds = labelled.save_generated(config, table, prepared, folds)
    data = labelled.fold_data(config, source=config.data.name, table=table, cache=cache,
                              folds=folds, prepared_dir=prepared, binary=binary)
  if table.groups is None:
    notes.insert(0, f"{where} has no group feature (--config.data.tfds.group): every image is its "
                    "own "
                    f"group, so splits are image-level and one patient's (or slide's) images may "
                    f"fall on both sides")
  labelled.warn_all(notes)
  return data

