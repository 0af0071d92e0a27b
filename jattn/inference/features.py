"""Features of a data set's images through a backbone, as one HDF5 file (h5py), in the layout
CLAM and TRIDENT read (docs/features.md; slides: `jattn.slides.features`).

  backbone = features.from_run("runs/x/fold1")      # or from_config("configs/x.py", overrides)
  features.write_dataset(backbone, "features/")     # -> features/<data set>.h5

The backbone is a restored run (its parameters, batch-norm statistics, channel statistics and
stain reference: the features its head was trained on) or a model config, initialised from its
seed with its converted weights merged (`config.pretrained`, `state.initial_variables`), whose
images are normalised by ImageNet's channel statistics (what converted ImageNet and foundation
weights expect). Features are `jattn.training.features`': the input of the final linear layer.

A file holds `features` [N, D] (float16 or float32), `names` [N] (the images' file names; for
slides, `coords` [N, 2] int64 level-0 top-left corners instead), and attributes saying what made
them: `backbone`, `weights_sha256` (of the variables used, path by path), `weights_source`, the
scale (`mpp`, `stratum`), the preprocessing and the jattn version. A data set's file also holds
each image's `labels`, `groups` and strata and the `split` of the config's fold. Files are written
to a temporary name and renamed: a file that exists is whole.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import h5py
import jax
import ml_collections
import numpy as np
from flax import traverse_util

import jattn
from jattn import data, models
from jattn.core import files
from jattn.core.errors import UserError
from jattn.inference import runs
from jattn.models import weights as weights_lib
from jattn.training import compat
from jattn.training import features as features_lib
from jattn.training import state as state_lib

FORMAT = "jattn.features/1"
DTYPES = ("float16", "float32")
# ImageNet's channel statistics on the 0-255 scale (torchvision's, times 255): a config's images.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclasses.dataclass
class Backbone:
  """A model whose features are written, and what says which model it is."""

  config: ml_collections.ConfigDict
  state: state_lib.TrainState
  source: str  # 'run' or 'config'
  weights_source: str  # the run dir and step, or the converted weights' folder (or none)
  weights_file_sha256: str  # of the file the weights were converted from, where known ('')
  workdir: str | None = None  # the run's, for a run

  @property
  def name(self) -> str:
    return models.name_of(self.config.model)

  @property
  def dim(self) -> int:
    return models.feature_dim(self.config.model)

  @property
  def weights_sha256(self) -> str:
    return variables_sha256({"params": self.state.params,
                             "batch_stats": self.state.batch_stats or {}})

  def attrs(self) -> dict:
    """The attributes every file of this backbone carries."""
    return {"format": FORMAT, "backbone": self.name, "feature_dim": self.dim,
            "model": json.dumps(self.config.model.to_dict(), sort_keys=True, default=list),
            "weights_sha256": self.weights_sha256, "weights_source": self.weights_source,
            "weights_file_sha256": self.weights_file_sha256, "backbone_from": self.source,
            "image_size": int(self.config.image_size),
            "normalization_mean": np.asarray(self.state.image_mean, np.float64),
            "normalization_std": np.asarray(self.state.image_std, np.float64),
            "stain_norm": self.config.get("stain_norm", "none"),
            "features_are": "the input of the final linear layer (return_features=True), eval "
                            "mode", "jattn_version": jattn.__version__}


def variables_sha256(variables) -> str:
  """SHA-256 of a variable tree: each array's path, dtype, shape and bytes, in path order."""
  h = hashlib.sha256()
  for path, value in sorted(traverse_util.flatten_dict(variables).items()):
    a = np.ascontiguousarray(np.asarray(value))
    h.update(f"{'/'.join(path)}:{a.dtype.str}:{a.shape};".encode())
    h.update(a.tobytes())
  return h.hexdigest()




def from_run(workdir: str) -> Backbone:
  """The backbone of a trained run (its latest checkpoint)."""
  config, state = runs.restore(workdir)
  path = os.path.abspath(os.path.expanduser(workdir))
  return Backbone(config, state, "run", f"{path} (step {int(state.step)})", "", path)


def from_config(spec: str, overrides: list[str] = ()) -> Backbone:
  """The backbone of a config file (with `field=value` overrides), from its seed and converted
  weights; a config that normalises stains needs a run's reference and is refused."""
  config = compat.load_config(spec, list(overrides))
  if config.get("stain_norm", "none") != "none":
    raise UserError(f"--config {spec}: config.stain_norm={config.stain_norm!r} needs the stain "
                    f"reference of a trained run; give its --workdir, or "
                    f"--config.stain_norm=none")
  models.check(config.model, config.image_size)
  model, variables = state_lib.initial_variables(
      config, jax.random.split(jax.random.key(config.seed))[0])
  state = state_lib.make_state(config, model, variables, IMAGENET_MEAN, IMAGENET_STD, 1)
  pretrained = config.get("pretrained", "")
  weights_file = config.model.get("weights", "")  # a ViT preset's published weights file
  digest, loaded = "", []
  if pretrained:
    loaded.append(f"{os.path.abspath(pretrained)} (config.pretrained, scope "
                  f"{config.pretrained_scope})")
    info = os.path.join(os.path.abspath(pretrained), weights_lib.INFO_FILE)
    if os.path.exists(info):
      record = files.read_json(info, "it describes the converted weights: convert them again")
      digest = str(record.get("sha256", "")) if isinstance(record, dict) else ""
  if weights_file:
    path = os.path.abspath(os.path.expanduser(weights_file))
    loaded.append(f"{path} (config.model.weights)")
    digest = files.sha256(path)
  source = (f"{' and '.join(loaded)}, the rest initialised from seed {config.seed}" if loaded
            else f"initialised from seed {config.seed} (no weights: config.pretrained empty)")
  return Backbone(config, state, "config", source, digest)


def check_dtype(dtype: str) -> None:
  if dtype not in DTYPES:
    raise UserError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")


def _str(values) -> np.ndarray:
  return np.array([str(v) for v in values], dtype=h5py.string_dtype())


def write_h5(path: str, feats: np.ndarray, attrs: dict, datasets: dict[str, np.ndarray],
             coords_attrs: dict | None = None, features_attrs: dict | None = None) -> None:
  """`features` and `datasets` into `path` (a temporary file renamed when whole)."""
  with files.atomic_path(path) as tmp:
    with h5py.File(tmp, "w") as f:
      d = f.create_dataset("features", data=feats)
      for k, v in (features_attrs or {}).items():
        d.attrs[k] = v
      for name, value in datasets.items():
        d = f.create_dataset(name, data=value)
        if name == "coords":
          for k, v in (coords_attrs or {}).items():
            d.attrs[k] = v
      for k, v in attrs.items():
        f.attrs[k] = "None" if v is None else v


def dataset_name(config: ml_collections.ConfigDict) -> str:
  """The file stem of a config's data set: its source (and TFDS name), e.g. 'breakhis'."""
  return str(config.data.name).replace(":", "_").replace("/", "_") or "dataset"


def write_dataset(backbone: Backbone, out: str, dtype: str = "float32", batch_size: int = 64,
                  overwrite: bool = False) -> str:
  """The features of every image of the fold the backbone's config selects, training and test
  images both, into OUT/<data set>.h5; returns its path. An existing file of the same backbone
  and settings is kept (nothing computed again)."""
  check_dtype(dtype)
  if batch_size < 1:
    raise UserError(f"--batch-size {batch_size}: give a positive number of images per batch")
  config = backbone.config
  files.require_folder(out, "--out")
  path = os.path.join(out, f"{dataset_name(config)}.h5")
  settings = {**backbone.attrs(), "dtype": dtype, "data": json.dumps(config.data.to_dict(),
                                                                      sort_keys=True,
                                                                      default=list),
              "fold": int(config.fold)}
  if finished(path, settings, overwrite):
    print(f"{path} holds these features already; not computing them again")
    return path
  fold = data.load_fold(config)
  if int(fold.image_size) != int(config.image_size):
    raise AssertionError("prepared images of another size")
  index = np.union1d(fold.train_indices, fold.test_indices).astype(np.int64)
  feats = np.zeros((len(index), backbone.dim), np.dtype(dtype))
  for start, f in features_lib.batches(backbone.state, _Take(fold.images, index), batch_size):
    feats[start:start + len(f)] = f
  split = np.where(np.isin(index, fold.train_indices), "train", "test")
  datasets = {"names": _str(fold.file_names[i] for i in index),
              "labels": fold.targets[index].astype(np.int64),
              "groups": _str(fold.group_ids[g] for g in fold.groups[index]),
              "split": _str(split)}
  strata = {}
  for s in fold.strata:
    datasets[f"strata/{s.name}"] = _str(s.values[k] for k in s.index[index])
    strata[s.name] = {"values": list(s.values),
                      "mpp": dict(zip(s.values, s.mpp, strict=True)) if s.mpp else None}
  mpps = {v: m for s in strata.values() if s["mpp"] for v, m in s["mpp"].items() if m}
  attrs = {**settings, "kind": "dataset", "name": dataset_name(config), "source": fold.source,
           "classes": json.dumps(list(fold.classes)), "group_unit": fold.group_unit,
           "strata": json.dumps(strata), "num_images": len(index),
           "mpp": json.dumps(mpps) if mpps else "None", "stratum": "None",
           "split_of": f"fold {fold.fold} ({fold.folds_source})"}
  write_h5(path, feats, attrs, datasets, features_attrs={"name": dataset_name(config)})
  print(f"wrote the {backbone.dim}-dimensional {backbone.name} features of {len(index)} images "
        f"({dtype}) to {path}")
  return path


class _Take:
  """Rows `index` of a (memory-mapped) array, read a slice at a time."""

  def __init__(self, array, index):
    self.array, self.index = array, index

  def __len__(self):
    return len(self.index)

  def __getitem__(self, s: slice):
    return np.asarray(self.array[self.index[s]])


def read_attrs(path: str) -> dict:
  with h5py.File(path, "r") as f:
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}


def finished(path: str, settings: dict, overwrite: bool) -> bool:
  """Whether `path` holds features made under `settings` (then it is kept); a file made under
  other settings is refused in one line (or is to be replaced, with `overwrite`)."""
  if not os.path.exists(path):
    return False
  try:
    have = read_attrs(path)
  except OSError as e:
    raise UserError(f"{path}: not a readable HDF5 file ({e}); remove it or use another --out"
                    ) from None
  changed = [k for k, v in settings.items()
             if not np.array_equal(np.asarray(have.get(k)), np.asarray(v))]
  if changed and not overwrite:
    raise UserError(f"{path} holds features made otherwise (attributes {', '.join(changed[:4])} "
                    f"differ); pass --overwrite to replace them, or use another --out")
  return not changed and not overwrite
