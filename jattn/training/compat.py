"""Old runs: the config fields added since runs were first written, and how configs compare.

A run whose config.json predates a field computed what the field's value below computes, so it
resumes (or prints its results) instead of being refused as "a different config". Bookkeeping
fields change how a run is logged or laid out, not what it computes: a resumed run may change
them.
"""

from __future__ import annotations

import json

from jattn import models
from jattn.data import sources

LATER_FIELDS = {
    "download": False, "augment.hed_scale": 0.0, "augment.hed_shift": 0.0,
    "augment.brightness": 0.0,
    "augment.contrast": 0.0, "augment.saturation": 0.0, "tta": "none",
    "bootstrap_resamples": 1000, "bootstrap_seed": 0, "model.s_attn_impl": "auto",
    "coordinator_timeout_s": 300.0, "dataset": "breakhis", "model.name": "vgg19",
    # The folder and TFDS sources' fields and stain normalisation.
    "manifest": "", "classes": "", "group": "", "strata": "", "mpp": 0.0, "num_folds": 5,
    "positive_class": "", "stain_norm": "none",
    # The ResNets' placement and batch norm's running variance as PyTorch keeps it.
    "model.bn_unbiased_running_var": False, "model.c_attn_stages": [0, 1],
    "model.s_attn_stages": [2, 3, 4],
    # Several training steps per dispatch.
    "steps_per_dispatch": 1,
    # Calibration: its bins, and the validation split of temperature scaling.
    "validation_fraction": 0.0, "calibration.bins": 15,
}
# Later fields whose default is not what runs before them computed: a run written before one of
# them resumes as it was trained (`recorded_values`), not refused as another config.
CHANGED_DEFAULTS = ("model.bn_unbiased_running_var",)
BOOKKEEPING_FIELDS = ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                      "loader_threads", "eval_batch_size", "download", "parallel_folds",
                      "num_devices", "coordinator_timeout_s", "steps_per_dispatch")


def later_fields(dataset: str) -> dict:
  """`LATER_FIELDS` and the data source's own (its `LATER_FIELDS`), as {dotted field: value}."""
  return {**LATER_FIELDS, **getattr(sources.get(dataset), "LATER_FIELDS", {})}


def comparable(stored: dict) -> dict:
  """A config (as JSON) with the `LATER_FIELDS` it predates filled in, `model.dtype` 'auto'
  replaced by what it computes in here and the model fields its backbone ignores left out
  (`ignored_fields`: e.g. the batch-norm statistics of a VGG without batch norm), so that equal
  computations compare equal. The data source's own later fields (its `LATER_FIELDS`) are filled
  in too."""
  stored = json.loads(json.dumps(stored))
  stored["model"]["dtype"] = models.resolve_dtype(stored["model"]["dtype"])
  for key, value in later_fields(stored.get("dataset", LATER_FIELDS["dataset"])).items():
    *parents, field = key.split(".")
    node = stored
    for parent in parents:
      node = node.setdefault(parent, {})
    node.setdefault(field, value)
  for field in models.of(stored["model"]).ignored_fields(stored["model"]):
    stored["model"].pop(field, None)
  return stored


def differing_fields(stored: dict, now: dict) -> list[str]:
  """The fields (besides bookkeeping; dotted within groups, e.g. 'model.width') in which two
  configs (as JSON) compute differently."""
  stored, now = _leaves(comparable(stored)), _leaves(comparable(now))
  return sorted(k for k in set(stored) | set(now)
                if k.split(".")[0] not in BOOKKEEPING_FIELDS and stored.get(k) != now.get(k))


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
  out = {}
  for key in CHANGED_DEFAULTS:
    *parents, field = key.split(".")
    node, current = stored, now
    for parent in parents:
      node, current = node.get(parent, {}), current.get(parent, {})
    if field not in node and field in current and current[field] != LATER_FIELDS[key]:
      out[key] = LATER_FIELDS[key]
  return out
