"""Old runs: the config fields added or moved since runs were first written, and how configs
compare.

A run whose config.json predates a field computed what the field's value below computes, so it
resumes (or prints its results) instead of being refused as "a different config". Bookkeeping
fields change how a run is logged or laid out, not what it computes: a resumed run may change
them. The data fields moved under `config.data` (`FLAT_DATA_FIELDS`): a config.json, a config file
or a command line that names them as they were (`--config.data_dir=DIR`) is read in today's form
(`nest`, `nest_config`, `nest_overrides`; `load_config` does all of it for a config file and its
overrides).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import ml_collections

from jattn import models
from jattn.core import config_lib
from jattn.core.errors import UserError
from jattn.data import sources

# Where each data field of the configs written before `config.data` lives now. `{own}` is the
# group of the labelled source the config names: 'tfds' for tfds:NAME, 'slides' for the
# slide-regions source, else 'folder'; `{listed}` the group whose CSV a `manifest` is ('slides' for
# the slide-regions source, else 'folder').
FLAT_DATA_FIELDS = {
    "dataset": "data.name", "data_dir": "data.dir", "prepared_dir": "data.prepared_dir",
    "folds": "data.folds", "folds_seed": "data.folds_seed", "num_folds": "data.num_folds",
    "skip_corrupt": "data.skip_corrupt", "download": "data.breakhis.download",
    "magnifications": "data.breakhis.magnifications", "task": "data.breakhis.task",
    "synthetic": "data.breakhis.synthetic", "manifest": "data.{listed}.manifest",
    "classes": "data.{own}.classes", "group": "data.{own}.group", "strata": "data.{own}.strata",
    "mpp": "data.{own}.mpp", "positive_class": "data.{own}.positive_class",
    # The slide-regions source's tile fraction, as it was first named.
    "min_region_fraction": "data.slides.min_region_fraction",
}

LATER_FIELDS = {
    "data.breakhis.download": False, "augment.hed_scale": 0.0, "augment.hed_shift": 0.0,
    "augment.brightness": 0.0,
    "augment.contrast": 0.0, "augment.saturation": 0.0, "tta": "none",
    "bootstrap_resamples": 1000, "bootstrap_seed": 0, "model.s_attn_impl": "auto",
    "coordinator_timeout_s": 300.0, "data.name": "breakhis", "model.name": "vgg19",
    # The folder and TFDS sources' fields and stain normalisation.
    **{f"data.folder.{k}": v for k, v in sources.get("folder").DEFAULTS.items()},
    **{f"data.tfds.{k}": v for k, v in sources.get("tfds:").DEFAULTS.items()},
    # The slide-regions source's fields.
    **{f"data.slides.{k}": v for k, v in sources.get("slides").DEFAULTS.items()},
    "data.num_folds": 5, "stain_norm": "none",
    # The ResNets' placement and batch norm's running variance as PyTorch keeps it.
    "model.bn_unbiased_running_var": False, "model.c_attn_stages": [0, 1],
    "model.s_attn_stages": [2, 3, 4],
    # Several training steps per dispatch.
    "steps_per_dispatch": 1,
    # Calibration: its bins, and the validation split of temperature scaling.
    "validation_fraction": 0.0, "calibration.bins": 15,
    # A frozen backbone, and the linear probe on its cached features.
    "probe.solver": "jax",
    "probe.c_values": [0.001, 0.01, 0.1, 1.0, 10.0, 100.0], "probe.validation_fraction": 0.2,
    "probe.max_iter": 1000,
    # The ViT presets, their weights file and the training modes (freeze, the last k blocks).
    "model.vit_c_attn_blocks": [-2], "model.vit_s_attn_blocks": [-2], "model.vit.depth": 0,
    "model.vit.embed_dim": 0, "model.vit.num_heads": 0, "model.vit.pool": "",
    "model.weights": "", "model.freeze": False, "model.train_last_blocks": 0,
}
# Later fields whose default is not what runs before them computed: a run written before one of
# them resumes as it was trained (`recorded_values`), not refused as another config.
CHANGED_DEFAULTS = ("model.bn_unbiased_running_var",)
BOOKKEEPING_FIELDS = ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                      "loader_threads", "eval_batch_size", "data.breakhis.download",
                      "parallel_folds", "num_devices", "coordinator_timeout_s",
                      "steps_per_dispatch")


def _own(name) -> str:
  if str(name).startswith("tfds:"):
    return "tfds"
  return "slides" if name == "slides" else "folder"


def nested_key(key: str, name) -> str:
  """Today's dotted name of a field named as before `config.data` (`data_dir` -> `data.dir`,
  `synthetic.width` -> `data.breakhis.synthetic.width`); other names are returned as they are.
  `name` is the data source the config names (it decides where `classes` and the like go)."""
  head, dot, rest = key.partition(".")
  if head not in FLAT_DATA_FIELDS:
    return key
  own = _own(name)
  return (FLAT_DATA_FIELDS[head].format(own=own, listed="slides" if own == "slides" else "folder")
          + dot + rest)


def _source_named(pairs: Sequence[tuple[str, object]], default) -> object:
  return next((v for k, v in reversed(pairs) if k in ("dataset", "data.name")), default)


def nest(stored: dict) -> dict:
  """A config (as JSON: config.json, results.json's `config`) in today's form: the data fields of
  a config written before `config.data` moved to where `FLAT_DATA_FIELDS` says."""
  flat = [k for k in FLAT_DATA_FIELDS if k in stored]
  if not flat:
    return stored
  stored = json.loads(json.dumps(stored))
  name = stored.get("dataset", "breakhis")
  for key in flat:
    *parents, field = nested_key(key, name).split(".")
    node = stored
    for parent in parents:
      node = node.setdefault(parent, {})
    value = stored.pop(key)
    if isinstance(value, dict) and isinstance(node.get(field), dict):
      node[field].update(value)
    else:
      node[field] = value
  return stored


def nest_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A config file's config in today's form: the data fields it set as they were named before
  `config.data` (`config.data_dir = ...` on today's defaults adds a field of that name) moved into
  `config.data`, in place."""
  flat = [k for k in FLAT_DATA_FIELDS if k in config]
  if not flat:
    return config
  name = config["dataset"] if "dataset" in config else config.data.name
  with config.unlocked():
    for key in flat:
      value = config[key]
      del config[key]
      items = (value.items() if isinstance(value, ml_collections.ConfigDict) else [("", value)])
      for sub, v in items:
        parent, field = _node(config, nested_key(f"{key}.{sub}" if sub else key, name))
        with parent.unlocked():
          parent[field] = v
  return config


def _node(config, dotted: str):
  *parents, field = dotted.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  return node, field


def nest_overrides(overrides: Sequence[str], config: ml_collections.ConfigDict) -> list[str]:
  """`field=value` overrides with the data fields named as before `config.data` renamed
  (`data_dir=DIR` -> `data.dir=DIR`), for `config` (whose source, or the one the overrides
  name, decides where `classes` and the like go)."""
  pairs = [(k, v) for k, _, v in (o.partition("=") for o in overrides)]
  name = _source_named(pairs, config.data.name)
  return [f"{nested_key(k, name)}{'=' if sep else ''}{v}"
          for k, sep, v in (o.partition("=") for o in overrides)]


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The config file `spec` (`config_lib.load_config`) in today's form, with `overrides` (named
  either way) applied."""
  try:
    config = nest_config(config_lib.load_config(spec))
  except UserError as e:  # a config file of before that reads a moved field: say where it is
    moved = [k for k in FLAT_DATA_FIELDS if f"'{k}'" in str(e)]
    if not moved:
      raise
    raise UserError(f"{e} (the data fields moved under config.data: config.{moved[0]} is now "
                    f"config.{nested_key(moved[0], 'breakhis')}; see "
                    f"configs/default.py)") from None
  return config_lib.apply_overrides(config, nest_overrides(overrides, config))


def later_fields(dataset: str) -> dict:
  """`LATER_FIELDS` and the data source's own (its `LATER_FIELDS`), as {dotted field: value}."""
  return {**LATER_FIELDS, **getattr(sources.get(dataset), "LATER_FIELDS", {})}


def comparable(stored: dict) -> dict:
  """A config (as JSON) in today's form (`nest`) with the `LATER_FIELDS` it predates filled in,
  `model.dtype` 'auto' replaced by what it computes in here, the groups of data sources it does
  not use and the model fields its backbone ignores left out (`ignored_fields`: e.g. the
  batch-norm statistics of a VGG without batch norm), so that equal computations compare equal.
  The data source's own later fields (its `LATER_FIELDS`) are filled in too."""
  stored = json.loads(json.dumps(nest(stored)))
  stored["model"]["dtype"] = models.resolve_dtype(stored["model"]["dtype"])
  name = stored.get("data", {}).get("name", LATER_FIELDS["data.name"])
  for key, value in later_fields(name).items():
    *parents, field = key.split(".")
    node = stored
    for parent in parents:
      node = node.setdefault(parent, {})
    node.setdefault(field, value)
  own = sources.get(name).NAME
  for group in [n for n, v in stored["data"].items() if isinstance(v, dict) and n != own]:
    del stored["data"][group]
  for field in models.of(stored["model"]).ignored_fields(stored["model"]):
    stored["model"].pop(field, None)
  return stored


def differing_fields(stored: dict, now: dict) -> list[str]:
  """The fields (besides bookkeeping; dotted within groups, e.g. 'model.width') in which two
  configs (as JSON) compute differently."""
  stored, now = _leaves(comparable(stored)), _leaves(comparable(now))
  return sorted(k for k in set(stored) | set(now)
                if not _bookkeeping(k) and stored.get(k) != now.get(k))


def _bookkeeping(key: str) -> bool:
  return any(key == b or key.startswith(f"{b}.") for b in BOOKKEEPING_FIELDS)


def _leaves(config: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in config.items():
    if isinstance(value, dict):
      out.update(_leaves(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def recorded_values(stored: dict, now: dict) -> dict:
  """{dotted field: the value its run computed} for the `CHANGED_DEFAULTS` that a run's stored
  config predates and `now` sets otherwise: resuming the run under those values continues the
  computation it began (a run trained with Flax's biased running variance keeps it)."""
  out, stored, now = {}, nest(stored), nest(now)
  for key in CHANGED_DEFAULTS:
    *parents, field = key.split(".")
    node, current = stored, now
    for parent in parents:
      node, current = node.get(parent, {}), current.get(parent, {})
    if field not in node and field in current and current[field] != LATER_FIELDS[key]:
      out[key] = LATER_FIELDS[key]
  return out
