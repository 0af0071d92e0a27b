"""A trained run, as prediction, inspection and notebooks use it: its config and its state.

  config, state = runs.restore(workdir)        # the config.json and the latest checkpoint
  outputs = runs.outputs(config)               # what its outputs mean (classes, positive label)
  probs = runs.predict_probs(state, images)    # uint8 [N, S, S, 3] -> P(class) [N, classes]

Training (`jattn.train`) writes a run; this module only reads one (through `jattn.state`), so
tools that look at a run stand beside the training loop rather than on it.
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jattn import checkpoints, files
from jattn import state as state_lib
from jattn.data import sources
from jattn.data.fold import Outputs
from jattn.errors import UserError


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was started with (its work dir's config.json)."""
  path = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "config.json")
  if not os.path.exists(path):
    raise UserError(f"{workdir} is not a jattn run (no config.json); pass the --workdir of a run")
  return ml_collections.ConfigDict(files.read_json(path, "it is this run's config: restore it "
                                                       "from a backup, or train the run again"))


def outputs(config: ml_collections.ConfigDict) -> Outputs:
  """What a run's outputs mean (its classes, their coarse labels, its group unit), from its data
  source and config, without reading data."""
  return sources.of(config).outputs(config)


def restore(workdir: str) -> tuple[ml_collections.ConfigDict, state_lib.TrainState]:
  """A run's config and its latest checkpointed state; warns (one line on stderr) when the run has
  not finished, i.e. has no results.json."""
  config = load_config(workdir)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  with checkpoints.manager(workdir, create=False) as mngr:
    state = checkpoints.restore_latest(mngr, state_lib.abstract_state(config))
    if state is None:
      raise UserError(f"{workdir} has no checkpoint yet; train it first (python -m jattn.main)")
    step = int(state.step)
    per_epoch = checkpoints.recorded_steps_per_epoch(mngr, step)
    if not os.path.exists(os.path.join(workdir, "results.json")):
      print(f"jattn: warning: {unfinished(config, step, per_epoch)}", file=sys.stderr, flush=True)
  # A checkpoint holds no steps per epoch (a state's constant): the one recorded beside it, if any.
  return config, state.replace(steps_per_epoch=None if per_epoch is None else
                               jnp.asarray(per_epoch, jnp.int32))


def unfinished(config: ml_collections.ConfigDict, step: int, steps_per_epoch: int | None) -> str:
  """What a run without results.json is: the step its latest checkpoint reached, of how many."""
  run = f"{config.name} fold {config.get('fold', '?')}"
  if not steps_per_epoch:  # a checkpoint written before jattn recorded its steps per epoch
    return (f"{run} has not finished (no results.json): its latest checkpoint is step {step}, of "
            f"a run of {config.num_epochs} epochs whose steps per epoch were not recorded; using "
            f"that checkpoint")
  total = steps_per_epoch * config.num_epochs
  if step >= total:
    return (f"{run} has trained all {total} steps but not been evaluated (no results.json; run "
            f"its command again to evaluate it); using its last checkpoint, step {step}")
  return (f"{run} has not finished training (no results.json): its latest checkpoint is step "
          f"{step} of {total} ({step // steps_per_epoch} of {config.num_epochs} epochs done); "
          f"using that partly trained model")


def predict_probs(state: state_lib.TrainState, images: np.ndarray, batch_size: int = 32,
                  tta: str = "none") -> np.ndarray:
  """P(class) for uint8 images [N, S, S, 3], in batches of fixed size (last one padded).

  tta: 'none', or 'dihedral' (the mean over the 8 flips and right-angle turns; `state.eval_step`).
  """
  p_eval = jax.jit(functools.partial(state_lib.eval_step, tta=tta))
  out = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[:1], pad, axis=0)])
    out.append(np.asarray(p_eval(state, {"image": chunk})["probs"])[:batch_size - pad])
  num_classes = out[0].shape[-1] if out else 2
  return np.concatenate(out) if out else np.zeros((0, num_classes), np.float32)
