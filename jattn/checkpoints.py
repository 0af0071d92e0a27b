"""A run's checkpoints: what is saved of a train state, and how it is written and read back.

Checkpoints are Orbax `CheckpointManager` steps under `WORKDIR/checkpoints/<step>/`, written
asynchronously and atomically. Everything that touches them goes through this module, so the
training loop and `jattn.runs` (prediction, inspection) restore a state the same way.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

SUBDIR = "checkpoints"


def items(state) -> dict[str, Any]:
  """The parts of a `train.TrainState` a checkpoint holds (not `apply_fn` or `tx`)."""
  return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
          "opt_state": state.opt_state, "image_mean": state.image_mean,
          "image_std": state.image_std}


def manager(workdir: str, keep: int | None = None, *, create: bool = True) -> ocp.CheckpointManager:
  """The checkpoint manager of a work dir; keeps the `keep` most recent steps (all if None)."""
  return ocp.CheckpointManager(
      os.path.join(workdir, SUBDIR),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create))


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
  """Starts writing `state` as checkpoint `step` (asynchronous; `mngr.wait_until_finished()`)."""
  mngr.save(step, args=ocp.args.StandardSave(items(state)))


def restore_latest(mngr: ocp.CheckpointManager, state):
  """`state` with the latest checkpoint's values, or None when there is no checkpoint.

  `state` gives the structure, shapes and dtypes to restore into (a real or an abstract state).
  """
  step = mngr.latest_step()
  if step is None:
    return None
  restored = mngr.restore(step, args=ocp.args.StandardRestore(items(state)))
  return state.replace(**restored)
