"""A trained run, as prediction, inspection and notebooks use it: its config and its state.

  config, state = runs.restore(workdir)        # the config.json and the latest checkpoint
  outputs = runs.outputs(config)               # what its outputs mean (classes, positive label)
  probs = runs.predict_probs(state, images)    # uint8 [N, S, S, 3] -> P(class) [N, classes]
  predictor = runs.Predictor(state, 32, tta)   # the same, one batch at a time (slides)
  t = runs.temperature(workdir)                # its fitted temperature (1.0: none)

Training (`jattn.training.train`) writes a run; this module only reads one (through
`jattn.training.state`), so tools that look at a run stand beside the training loop rather than on
it.
"""

from __future__ import annotations

import functools
import os
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np

from jattn.core import files
from jattn.core.errors import UserError
from jattn.data import sources
from jattn.data.fold import Outputs
from jattn.evaluation import calibration
from jattn.models import mil
from jattn.training import checkpoints, compat, parallel, test_evaluation
from jattn.training import state as state_lib


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was started with (its work dir's config.json), in today's form (a run
  written before `config.data` has its data fields moved there: `compat.nest`)."""
  path = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "config.json")
  if not os.path.exists(path):
    raise UserError(f"{workdir} is not a jattn run (no config.json); pass the --workdir of a run")
  return ml_collections.ConfigDict(compat.nest(files.read_json(
      path, "it is this run's config: restore it from a backup, or train the run again")))


def outputs(config: ml_collections.ConfigDict) -> Outputs:
  """What a run's outputs mean (its classes, their coarse labels, its group unit), from its data
  source and config, without reading data."""
  return sources.of(config).outputs(config)


def restore(workdir: str) -> tuple[ml_collections.ConfigDict, state_lib.TrainState]:
  """A run's config and its latest checkpointed state; warns (one line on stderr) when the run has
  not finished, i.e. has no results.json."""
  config = load_config(workdir)
  if mil.is_mil(config.model):
    raise UserError(f"{workdir} is a MIL run (config.model.name={config.model.name}): it scores "
                    f"slides from their tile features, not images; its test slides' attention "
                    f"per tile is {os.path.join(workdir, 'attention.h5')} (docs/mil.md)")
  workdir = os.path.abspath(os.path.expanduser(workdir))
  with checkpoints.manager(workdir, create=False) as mngr:
    state = checkpoints.restore_latest(mngr, state_lib.abstract_state(config))
    if state is None:
      raise UserError(f"{workdir} has no checkpoint yet; train it first (jattn train)")
    step = int(state.step)
    per_epoch = checkpoints.recorded_steps_per_epoch(mngr, step)
    if not os.path.exists(os.path.join(workdir, "results.json")):
      print(f"jattn: warning: {unfinished(config, step, per_epoch)}", file=sys.stderr, flush=True)
  # A checkpoint holds no steps per epoch (a state's constant): the one recorded beside it, if any.
  return config, state.replace(steps_per_epoch=None if per_epoch is None else
                               jnp.asarray(per_epoch, jnp.int32))


def temperature(workdir: str) -> float:
  """The temperature a run fitted on its validation split (`WORKDIR/temperature.json`, written
  with `config.validation_fraction` > 0), or 1.0 (none: probabilities as the model gives them)."""
  path = os.path.join(os.path.abspath(os.path.expanduser(workdir)),
                      test_evaluation.TEMPERATURE_FILE)
  if not os.path.exists(path):
    return 1.0
  record = files.read_json(path, "it is this run's fitted temperature: restore it from a backup, "
                                 "or delete it and results.json to evaluate the run again")
  value = record.get("temperature") if isinstance(record, dict) else None
  if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
    raise UserError(f"{path}: 'temperature' must be a number > 0, got {value!r}; delete it and "
                    f"results.json to evaluate the run again")
  return float(value)


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


@functools.cache
def _sharded_eval(tta: str) -> tuple[parallel.Plan, object]:
  """A plan over every local device and its jitted eval step, one per TTA mode, so that calls in
  chunks (`predict_probs`, external validation) reuse the compiled programs."""
  plan = parallel.Plan(mesh=parallel.make_mesh(), num_folds=1)
  return plan, parallel.eval_step(plan, functools.partial(state_lib.eval_step, tta=tta))


class Predictor:
  """A run's jitted eval step over every local device, as the test evaluation runs it.

  The path of `test_evaluation.evaluate_fold`: `state.eval_step` (stain normalisation, statistics,
  TTA) jitted by `parallel.eval_step` with the batch sharded over a `data` mesh of every device
  (`parallel.eval_images`), the state replicated. `predict`, `predict_probs`, external validation
  and slide inference all go through `__call__`.
  """

  def __init__(self, state: state_lib.TrainState, batch_size: int = 32, tta: str = "none",
               temperature: float = 1.0):
    self.plan, self._step = _sharded_eval(tta)
    self.temperature = temperature  # applied to every probability (`calibration`)
    self.batch_size = self.plan.eval_batch_size(batch_size)  # a multiple of the device count
    self.tta = tta
    self.state = parallel.place(self.plan, state)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """P(class) [n, classes] of uint8 images [n <= batch_size, S, S, 3] (padded to one batch)."""
    n = len(images)
    if not 0 < n <= self.batch_size:
      raise ValueError(f"{n} images for a batch of {self.batch_size}")
    if n < self.batch_size:
      images = np.concatenate([images, np.repeat(images[:1], self.batch_size - n, axis=0)])
    out = self._step(self.state, {"image": parallel.eval_images(self.plan, images,
                                                                 self.batch_size)})
    return calibration.apply_temperature(np.asarray(out["probs"])[:n], self.temperature)


def predict_probs(state: state_lib.TrainState, images: np.ndarray, batch_size: int = 32,
                  tta: str = "none", temperature: float = 1.0) -> np.ndarray:
  """P(class) for uint8 images [N, S, S, 3], in batches of fixed size (last one padded), through
  `Predictor` (sharded over the local devices; `batch_size` rounded up to a multiple of them).

  tta: 'none', or 'dihedral' (the mean over the 8 flips and right-angle turns; `state.eval_step`).
  temperature: the run's (`temperature`), applied as softmax(log p / T).
  """
  predictor = Predictor(state, batch_size, tta, temperature)
  out = [predictor(images[start:start + predictor.batch_size])
         for start in range(0, len(images), predictor.batch_size)]
  num_classes = out[0].shape[-1] if out else 2
  return np.concatenate(out) if out else np.zeros((0, num_classes), np.float32)


def stain_reference(workdir: str) -> dict[str, np.ndarray]:
  """The stain reference a run recorded in its train state; one line when it has none."""
  config, state = restore(workdir)
  if state.stain_matrix is None:
    raise UserError(f"{workdir} was trained without stain normalisation "
                    f"(config.stain_norm={config.get('stain_norm', 'none')!r}): give --reference "
                    f"IMAGE... instead")
  return {"stain_matrix": np.asarray(state.stain_matrix),
          "max_concentrations": np.asarray(state.stain_max)}
