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
    "steps_per_dispatch": 1,
}
BOOKKEEPING_FIELDS = ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                      "loader_threads", "eval_batch_size", "download", "parallel_folds",
                      "num_devices", "coordinator_timeout_s", "steps_per_dispatch")


def later_fields(dataset: str) -> dict:
  """`LATER_FIELDS` and the data source's own (its `LATER_FIELDS`), as {dotted field: value}."""
  return {**LATER_FIELDS, **getattr(sources.get(dataset), "LATER_FIELDS", {})}


def comparable(stored: dict) -> dict:
  """A config (as JSON) with the `LATER_FIELDS` it predates filled in and `model.dtype` 'auto'
  replaced by what it computes in here, so that equal computations compare equal. The data
  source's own later fields (its `LATER_FIELDS`) are filled in too."""
  stored = json.loads(json.dumps(stored))
  stored["model"]["dtype"] = models.resolve_dtype(stored["model"]["dtype"])
  for key, value in later_fields(stored.get("dataset", LATER_FIELDS["dataset"])).items():
    *parents, field = key.split(".")
    node = stored
    for parent in parents:
      node = node.setdefault(parent, {})
    node.setdefault(field, value)
  return stored


def differing_fields(stored: dict, now: dict) -> list[str]:
  """The fields (besides bookkeeping) in which two configs (as JSON) compute differently."""
  stored, now = comparable(stored), comparable(now)
  return sorted(k for k in set(stored) | set(now)
                if k not in BOOKKEEPING_FIELDS and stored.get(k) != now.get(k))
