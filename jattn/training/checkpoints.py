"""A run's checkpoints: what is saved of a train state, and how it is written and read back.

Checkpoints are Orbax `CheckpointManager` steps under `WORKDIR/checkpoints/<step>/`, written
asynchronously and atomically. Everything that touches them goes through this module, so the
training loop and `jattn.inference.runs` (prediction, inspection) restore a state the same way.

A checkpoint the storage damaged after it was written (files cut short by a crash or a full disk)
does not stop a run: `restore_latest` falls back to the newest step that loads, says which step it
skipped and why, and moves the unreadable one to `WORKDIR/checkpoints.unreadable/<step>` (outside
Orbax's folder, never deleted). A full disk or read-only storage while writing is one `UserError`.

Each step also records the run's steps per epoch in Orbax's step metadata (`custom_metadata`), so
that a tool reading an unfinished run can say how far it got (`recorded_steps_per_epoch`) without
loading its data; steps written before this have none.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from jattn.core import errors

SUBDIR = "checkpoints"
UNREADABLE_SUBDIR = "checkpoints.unreadable"  # beside SUBDIR, so Orbax never lists its steps


def items(state) -> dict[str, Any]:
  """The parts of a `state.TrainState` a checkpoint holds (not `apply_fn` or `tx`); the stain
  reference only in runs that have one, so checkpoints written before it restore unchanged."""
  out = {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
         "opt_state": state.opt_state, "image_mean": state.image_mean,
         "image_std": state.image_std}
  if getattr(state, "stain_matrix", None) is not None:
    out.update(stain_matrix=state.stain_matrix, stain_max=state.stain_max)
  return out


def manager(workdir: str, keep: int | None = None, *, create: bool = True) -> ocp.CheckpointManager:
  """The checkpoint manager of a work dir; keeps the `keep` most recent steps (all if None).

  With `create` (training, which holds the work dir's lock) it also removes the temporary folder
  of a save that a kill or a full disk interrupted.
  """
  _quiet_storage_tracebacks()
  return ocp.CheckpointManager(
      os.path.join(workdir, SUBDIR),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           cleanup_tmp_directories=create))


class _DropStorageErrors(logging.Filter):
  """Orbax logs the traceback of every background thread a full disk stops (hundreds of lines);
  the same failure is then raised, and shown as one line: drop those log records."""

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return errors.storage_error(error or Exception(record.getMessage())) is None


def _quiet_storage_tracebacks() -> None:
  absl = logging.getLogger("absl")
  if not any(isinstance(f, _DropStorageErrors) for f in absl.filters):
    absl.addFilter(_DropStorageErrors())


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
  """Starts writing `state` as checkpoint `step` (asynchronous: finish it with `wait`).

  A full disk or read-only storage (here or from the previous step's write) is a `UserError`.
  """
  per_epoch = getattr(state, "steps_per_epoch", None)
  concrete = per_epoch is not None and not isinstance(per_epoch, jax.ShapeDtypeStruct)
  metadata = {"steps_per_epoch": int(per_epoch)} if concrete else {}
  with errors.writing(os.fspath(mngr.directory)):
    mngr.save(step, args=ocp.args.StandardSave(items(state)), custom_metadata=metadata)


def recorded_steps_per_epoch(mngr: ocp.CheckpointManager, step: int) -> int | None:
  """The steps per epoch that `save` recorded with checkpoint `step`; None if it has none."""
  absl = logging.getLogger("absl")
  level = absl.level
  absl.setLevel(logging.ERROR)  # Orbax warns that it cannot restore the item it does not read
  try:
    value = (mngr.metadata(step).custom_metadata or {}).get("steps_per_epoch")
  except Exception:  # noqa: BLE001 -- a step without (readable) metadata: nothing recorded
    return None
  finally:
    absl.setLevel(level)
  return value if isinstance(value, int) and value > 0 else None


def wait(mngr: ocp.CheckpointManager) -> None:
  """Waits for a pending asynchronous save; its storage failure surfaces here as a `UserError`."""
  with errors.writing(os.fspath(mngr.directory)):
    mngr.wait_until_finished()


def restore_latest(mngr: ocp.CheckpointManager, state):
  """`state` with the newest checkpoint that loads, or None when there is no checkpoint.

  `state` gives the structure, shapes and dtypes to restore into (a real or an abstract state).
  Newer steps that do not load are reported (one line each on stderr) and moved aside; when no
  step loads, nothing is moved (the cause may be this code rather than the files) and the first
  failure is a `UserError`.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  if steps:
    mismatch = _model_mismatch(mngr, steps[0], state)
    if mismatch:
      raise errors.UserError(
          f"the checkpoints in {mngr.directory} do not fit the model of this run's config "
          f"({mismatch}): the config's model fields (model.width, model.batch_norm, ...) differ "
          f"from those the checkpoints were trained with (was config.json edited?); run with the "
          f"config they were trained with, or use another --workdir. Nothing was changed")
  failed = []
  for step in steps:
    try:  # a fresh manager per step: a failed restore leaves a manager unable to read others
      with manager(os.path.dirname(os.fspath(mngr.directory)), create=False) as probe:
        restored = probe.restore(step, args=ocp.args.StandardRestore(items(state)))
    except Exception as e:  # noqa: BLE001 -- Orbax and TensorStore raise many types for bad files
      failed.append((step, _first_line(e)))
      continue
    for bad, why in failed:
      _set_aside(mngr, bad, why, step)
    if failed:
      mngr.reload()
    return state.replace(**restored)
  if failed:
    step, why = failed[0]
    raise errors.UserError(
        f"no checkpoint in {mngr.directory} loads (step {step}: {why}); they are left as they are: "
        f"move {mngr.directory} aside to start this run again from scratch")
  return None


MODEL_ITEMS = ("params", "batch_stats")  # the arrays whose shapes the config's model fields set


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """{'params/block1/conv1/kernel': shape} of the model arrays in `tree` (a state's items, or a
  checkpoint's metadata)."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    if keys and keys[0] in MODEL_ITEMS and hasattr(leaf, "shape"):
      out["/".join(keys)] = tuple(leaf.shape)
  return out


def _model_mismatch(mngr: ocp.CheckpointManager, step: int, state) -> str | None:
  """How the model arrays of checkpoint `step` differ from `state`'s, or None when they fit or
  the checkpoint's metadata does not load (a damaged step: restoring it says so).

  Checked from the metadata before restoring: Orbax restoring arrays of other shapes fails with
  hundreds of lines of asynchronous tracebacks, and the cause is the config, not the files.
  """
  try:
    stored = _shapes(ocp.StandardCheckpointHandler().metadata(
        epath.Path(os.fspath(mngr.directory)) / str(step) / "default"))
  except Exception:  # noqa: BLE001 -- damaged metadata: the restore below reports it
    return None
  wanted = _shapes(items(state))
  if not stored:
    return None
  differ = [k for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]
  if not differ:
    return None
  key = differ[0]
  shown = lambda shape: "absent" if shape is None else str(shape)  # noqa: E731
  return (f"{key}: {shown(stored.get(key))} in step {step}, {shown(wanted.get(key))} from the "
          f"config; {len(differ)} array(s) differ")


def _first_line(e: BaseException) -> str:
  text = " ".join(str(e).split()).split(" See full TensorStore details")[0] or type(e).__name__
  return f"{type(e).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def _set_aside(mngr: ocp.CheckpointManager, step: int, why: str, used: int) -> None:
  """Moves an unreadable step out of Orbax's folder (best effort on read-only storage)."""
  source = os.path.join(os.fspath(mngr.directory), str(step))
  aside = os.path.join(os.path.dirname(os.fspath(mngr.directory)), UNREADABLE_SUBDIR, str(step))
  while os.path.exists(aside):
    aside += "+"  # an earlier step of this number was set aside already: keep both
  try:
    os.makedirs(os.path.dirname(aside), exist_ok=True)
    os.replace(source, aside)
    where = f"moved to {aside}"
  except OSError as e:
    where = f"left in place ({e.strerror})"
  errors.warn(f"checkpoint step {step} does not load ({why}); using step {used} instead; the "
              f"unreadable step is {where}")
