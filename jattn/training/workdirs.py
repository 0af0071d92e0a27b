"""A run's work dirs: which folds it writes where, and claiming one for a config.

A work dir belongs to one config: `action` says what claiming it takes (keep it, write config.json,
or discard another run when asked to overwrite) without writing anything, `claim` carries that out
once every check that can fail has passed. A run written before a field's default changed resumes
under the value it was trained with (`as_recorded`).
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from jattn.core import files
from jattn.core.errors import UserError
from jattn.evaluation import results
from jattn.training import compat


def action(workdir: str, config: ml_collections.ConfigDict, overwrite: bool) -> str:
  """What claiming the work dir for `config` will take, checked without writing anything:
  'keep' (its config.json holds this config), 'write' (no config.json yet, or one that differs
  only in BOOKKEEPING_FIELDS) or 'discard' (another run, and `overwrite`); another run without
  `overwrite` is a UserError."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return "write"
  stored = files.read_json(path, f"delete {workdir} to start this run again, or use another "
                                 f"--workdir")
  now = json.loads(config.to_json())
  if compat.comparable(stored) == compat.comparable(now):
    return "keep"  # nothing to write: a finished run on read-only storage just prints its results
  differ = compat.differing_fields(stored, now)
  if differ and not overwrite:
    raise UserError(f"{workdir} holds a run with a different config (fields: "
                    f"{', '.join(differ)}); use another --workdir, or --overwrite to discard it")
  return "discard" if differ else "write"


def as_recorded(config: ml_collections.ConfigDict,
                 workdirs: dict[int, str]) -> ml_collections.ConfigDict:
  """`config` with the values that the runs already in `workdirs` computed for fields whose
  default has changed since they were written (`compat.recorded_values`), so that such a run
  resumes as it began; work dirs that disagree keep `config` (and are refused as other runs)."""
  found = []
  for workdir in workdirs.values():
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
      stored = files.read_json(path, f"delete {workdir} to start this run again, or use another "
                                     f"--workdir")
      found.append(compat.recorded_values(stored, json.loads(config.to_json())))
  values = found[0] if found and all(v == found[0] for v in found) else {}
  if not values:
    return config
  config = config.copy_and_resolve_references()
  for key, value in values.items():
    *parents, field = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    with node.unlocked():
      node[field] = value
  if jax.process_index() == 0:
    fields = ", ".join(f"{k}={v}" for k, v in values.items())
    print(f"{', '.join(workdirs.values())} was written before the default of "
          f"{', '.join(values)} changed: it resumes as it was trained, with {fields} "
          f"(--overwrite trains it anew under the new default)", flush=True)
  return config


def claim(workdir: str, config: ml_collections.ConfigDict, action: str) -> None:
  """Carries out `action`'s answer: the other run discarded (the lock this run holds on
  the work dir kept), config.json written."""
  if action == "keep":
    return
  if action == "discard":
    for name in os.listdir(workdir):
      if name != ".lock":
        files.remove(os.path.join(workdir, name))
  os.makedirs(workdir, exist_ok=True)
  results.write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json()))


def truncate_metrics(path: str, step: int) -> None:
  """Drops metrics logged after `step` (by a run that was killed after its last checkpoint)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  kept = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        kept.append(line)
    except (json.JSONDecodeError, KeyError):
      break  # a line cut short by the kill
  files.atomic_write_text(path, "".join(kept))


def fold_workdirs(config: ml_collections.ConfigDict, workdir: str) -> dict[int, str]:
  """The work dir of each fold a run trains: `workdir` with `{fold}` replaced by the fold."""
  folds = range(config.fold, config.fold + config.get("parallel_folds", 1))
  if len(folds) > 1 and "{fold}" not in workdir:
    raise UserError(f"--workdir {workdir} has no {{fold}}, but --config.parallel_folds="
                    f"{len(folds)} writes one work dir per fold; use e.g. --workdir "
                    f"{os.path.join(workdir, 'fold{fold}')}")
  return {fold: os.path.abspath(os.path.expanduser(workdir.replace("{fold}", str(fold))))
          for fold in folds}
