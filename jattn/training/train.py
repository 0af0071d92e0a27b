"""Training and evaluation of one fold, in the style of Flax's ImageNet example.

`train_step` (here) and `state.eval_step` are pure functions of their arguments (no Python side
effects), run under `jax.jit`; everything with side effects (data, checkpoints, logs, the progress
bar) lives in `train_and_evaluate`, the one function that runs a fold from start (or from its latest
checkpoint) to `results.json`. The train state is `jattn.training.state`'s, the optimiser
`jattn.training.optim`'s, the config checks `jattn.training.validate`'s, the figures
`jattn.evaluation.evaluate`'s and the results' form `jattn.evaluation.results`'. How the steps are
mapped over several folds and sharded over devices and processes is decided by
`jattn.training.parallel`; the loop reads the same for one fold on one CPU and five folds on eight
GPUs. With `config.steps_per_dispatch` N > 1 it hands the devices N steps at a time (one `lax.scan`
over N stacked batches), cut to single steps where an epoch end or a checkpoint falls inside N:
every step is still logged, checked and checkpointed where it was.

The recipe is section 3 of the paper and the authors' code: softmax cross-entropy; Adam with
learning rate 5e-5 and an L2 weight decay of 1e-4 added to the gradient before the moments, as
`torch.optim.Adam(weight_decay=...)` does; the learning rate halved every 30 epochs (or at given
milestones); batch size 8; backbone convs fine-tuned from ImageNet, classifier and attention
trained from scratch. The reported model is the one at the end of training: the test set is
evaluated once, after the last epoch, and never used to choose anything.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from jattn import data, models
from jattn.core import files
from jattn.core.errors import UserError
from jattn.data import augment as augment_lib
from jattn.data import sources, stain
from jattn.evaluation import evaluate, results
from jattn.models import mil
from jattn.training import (
  checkpoints,
  dispatch,
  holdout,
  layouts,
  log_windows,
  mil_train,
  optim,
  parallel,
  probe,
  test_evaluation,
  validate,
  workdirs,
)
from jattn.training import state as state_lib
from jattn.training.fold_run import FoldRun
from jattn.training.state import TrainState


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, *,
               augment: Mapping[str, Any], learning_rate_fn: Callable | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One Adam step on a batch of uint8 images; stain normalisation (if the run has a reference),
  augmentation and normalisation run on device, in that order.

  With `learning_rate_fn` (`functools.partial(optim.learning_rate_schedule, config)`) the metrics
  hold
  the learning rate this step's update was scaled by: the schedule at the state's step, with the
  state's own `steps_per_epoch`, as `TrainState.apply_gradients` gives them to the optimiser.
  """
  aug_rng, dropout_rng = jax.random.split(rng)
  images = state_lib.preprocess(state, augment_lib.augment(
      aug_rng, state_lib.normalize_stains(state, batch["image"]), **augment))
  labels = batch["label"]

  def loss_fn(params):
    logits, new_model_state = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, images, train=True,
        rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, new_model_state)

  (loss, (logits, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
  if learning_rate_fn is not None:
    metrics["learning_rate"] = learning_rate_fn(state.steps_per_epoch)(state.step)
  state = state.apply_gradients(grads=grads,
                                batch_stats=new_model_state.get("batch_stats", state.batch_stats))
  return state, metrics


# --------------------------------------------------------------------------------------------
# The loop: everything with side effects.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       overwrite: bool = False) -> dict | list[dict]:
  """Trains a fold (resuming from its latest checkpoint) and writes WORKDIR/results.json.

  With `config.parallel_folds` K > 1, folds fold..fold+K-1 are trained in one program, each into
  `workdir` with `{fold}` replaced by its number, with the steps of K separate runs (summed in
  another order: equally valid runs, not bit-identical ones); the result is then the list of their
  results. How the step runs (vmapped over folds, sharded over the devices of every process) is
  `jattn.training.parallel`'s business; this loop reads the same either way. Every work dir is
  locked for the whole run: a second run started on one of them is refused. Nothing is written into
  a work dir before every check that can fail has passed (the config, the weights, the data): a
  failed start leaves a new work dir absent and an existing one as it was.
  """
  validate.validate_config(config)
  fold_dirs = workdirs.fold_workdirs(config, workdir)
  plan = parallel.make_plan(config)  # checks the batch against the devices before writing
  with contextlib.ExitStack() as locks:
    if jax.process_index() == 0:  # the processes of a multi-host run share the work dirs
      for fold_workdir in fold_dirs.values():
        locks.enter_context(files.locked_or_refuse(fold_workdir, "--workdir",
                                                        remove_unused=True))
    if models.of(config.model) is mil:  # bags of tile features: the MIL loop
      return mil_train.train_and_evaluate(config, fold_dirs, overwrite)
    why_not = probe.why_not_cached(config)
    if why_not is None:  # a frozen backbone under a linear head: features computed once
      return probe.train_and_evaluate(config, plan, fold_dirs, overwrite)
    if config.model.get("freeze", False) and jax.process_index() == 0:
      print(f"config.model.freeze: training the unfrozen parameters step by step, not on cached "
            f"features ({why_not})", flush=True)
    return _train_and_evaluate(config, plan, fold_dirs, overwrite)


def _train_and_evaluate(config: ml_collections.ConfigDict, plan, fold_dirs: dict[int, str],
                        overwrite: bool) -> dict | list[dict]:
  is_main = jax.process_index() == 0  # only process 0 writes results, metrics and TensorBoard
  config = workdirs.as_recorded(config, fold_dirs)
  folds = []
  for number, fold_workdir in fold_dirs.items():
    fold_config = config.copy_and_resolve_references()
    fold_config.fold = number
    folds.append(FoldRun(fold_config, fold_workdir))
  for fold in folds:  # nothing is written into a work dir before every check that can fail passed
    fold.action = workdirs.action(fold.workdir, fold.config, overwrite)
    results_path = os.path.join(fold.workdir, "results.json")
    if fold.action != "discard" and os.path.exists(results_path):
      fold.results = results.read(results_path, "delete it to evaluate the run again from its "
                                             "last checkpoint")
      print(f"{fold.workdir} has finished (results.json); not training again.\n"
            f"{evaluate.format_table(fold.results)}")
  if all(fold.results is not None for fold in folds):
    return folds[0].results if len(folds) == 1 else [fold.results for fold in folds]
  _sync("work dirs checked")

  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  # Quick checks first: a missing data dir or weights folder stops the run at once, before
  # minutes of data preparation. Every fold starts from the same initialisation.
  sources.of(config).check_data_dir(config)
  model, variables = state_lib.initial_variables(config, init_rng)
  for fold in folds:
    fold.data = data.load_fold(fold.config)
    if fold.config.get("validation_fraction", 0.0) and fold.results is None:
      fold.data, fold.validation = holdout.split(fold.data, fold.config.validation_fraction,
                                                 fold.config.seed)
    fold.steps_per_epoch = data.steps_per_epoch(fold.data, config.batch_size)
    if fold.steps_per_epoch == 0:
      raise UserError(f"fold {fold.config.fold} has {len(fold.data.train_indices)} training "
                      f"images, fewer than one batch of --config.batch_size={config.batch_size}")
    fold.total_steps = fold.steps_per_epoch * config.num_epochs
    # The fold's stain reference, from its training images (a finished fold's state is never
    # stepped: make_state gives it a placeholder).
    if config.get("stain_norm", "none") != "none" and fold.results is None:
      fold.stain = stain.fit_reference(fold.data.images, fold.data.train_indices,
                                    what=f"the training images of fold {fold.config.fold}")
  _sync("data and weights checked")  # by every process: none writes before all could start
  if is_main:
    for fold in folds:
      if fold.results is None:
        workdirs.claim(fold.workdir, fold.config, fold.action)
  _sync("work dirs claimed")
  state_lib.warn_if_from_scratch(config)  # once the run starts (a failed start shows its error)

  dtype = models.resolve_dtype(config.model.dtype)
  states = []
  for k, fold in enumerate(folds):
    state = parallel.place(plan, state_lib.make_state(
        fold.config, model, variables, fold.data.mean, fold.data.std, fold.steps_per_epoch,
        fold.stain))
    if fold.results is None:
      fold.manager = checkpoints.manager(fold.workdir, config.keep_checkpoints)
      restored = checkpoints.restore_latest(fold.manager, state)
      if restored is not None:
        state = restored
        print(f"resuming {fold.workdir} from step {int(state.step)} of {fold.total_steps}")
      fold.step = fold.start_step = int(state.step)
      fold.layout = parallel.layout(plan, k, config.get("num_devices", 0), dtype,
                                 config.get("steps_per_dispatch", 1))
      if is_main:
        fold.layout_history = layouts.record(fold)
    else:
      fold.step = fold.start_step = fold.total_steps  # finished: its (fresh) state is never stepped
    states.append(state)
  state = parallel.stack(plan, states)
  del states, variables

  train_rng = parallel.place(plan, train_rng)
  started = time.time()
  fold_step = functools.partial(
      train_step, augment=config.augment.to_dict(),
      learning_rate_fn=functools.partial(optim.learning_rate_schedule, config))
  per_dispatch = config.get("steps_per_dispatch", 1)
  step_fn = (parallel.train_step(plan, fold_step) if per_dispatch == 1
             else parallel.train_steps(plan, fold_step))
  remaining = np.array([fold.total_steps - fold.step for fold in folds])
  bar = tqdm(total=int(remaining.max()), unit="step", dynamic_ncols=True, leave=False,
             desc=", ".join(f"fold {fold.config.fold}" for fold in folds), disable=None)
  for fold in folds:  # the bar draws only on a terminal; elsewhere (a log file) a line per window
    fold.print_windows = is_main and bar.disable
  try:  # pending asynchronous checkpoints are finished and files closed however the loop ends
    with contextlib.ExitStack() as stack:
      for fold in folds:
        if fold.results is None:
          stack.enter_context(log_windows.open_logs(fold, is_main))
          fold.window_start, fold.window_done = time.time(), fold.step
      batches = dispatch.prefetch(dispatch.dispatches(plan, folds, config, per_dispatch))
      for batch, active, size in batches:
        state, metrics = step_fn(state, batch, train_rng, active)
        bar.update(size)
        for i in range(size):
          for k, fold in enumerate(folds):
            if active[k]:
              _after_step(fold, k, plan, state, metrics, is_main,
                          index=None if per_dispatch == 1 else i, left=size - 1 - i)
  finally:
    bar.close()
    for fold in folds:
      if fold.manager is not None:
        checkpoints.wait(fold.manager)

  p_eval = parallel.eval_step(plan, functools.partial(state_lib.eval_step, tta=config.tta))
  for k, fold in enumerate(folds):
    if fold.results is not None:
      continue
    fold_state = parallel.unstack(plan, state, k)
    fold.results, rows = test_evaluation.evaluate_fold(fold.config, fold_state, fold.data, plan,
                                                       p_eval, fold.validation)
    fold.results["train"] = {"epochs": config.num_epochs, "steps": fold.step,
                          "steps_per_epoch": fold.steps_per_epoch,
                          "wall_time_this_session_s": round(time.time() - started, 1)}
    fold.results["layout"] = layouts.summary(fold.layout, fold.layout_history)
    if is_main:
      test_evaluation.write(fold, rows)
  _sync("results written")
  return folds[0].results if len(folds) == 1 else [fold.results for fold in folds]


def _sync(name: str) -> None:
  """Waits for every process (a no-op in a single-process run); stops, in one line, if another
  process has stopped (`parallel.sync`)."""
  parallel.sync(name)


def _after_step(fold: FoldRun, k: int, plan, state, metrics, is_main: bool,
                index: int | None = None, left: int = 0) -> None:
  """Logs, checks and checkpoints `fold` (the plan's k-th) after one of its steps: the
  `index`-th of a dispatch of several (None: a dispatch of one step), `left` steps before the
  dispatch's end (`state` is the state at that end)."""
  config = fold.config
  fold.pending.append((metrics, k, index))
  fold.step += 1
  epoch_end = fold.step % fold.steps_per_epoch == 0
  save_now = epoch_end or (
      config.checkpoint_every_steps and fold.step % config.checkpoint_every_steps == 0)
  if save_now and left:
    raise AssertionError(f"step {fold.step} is to be saved but {left} steps of its dispatch follow")
  if save_now or fold.step % config.log_every_steps == 0:  # every loss is checked before a save
    summary = log_windows.summarize(fold, plan, fold.step + left)
    fold.pending, fold.window_start, fold.window_done = [], time.time(), fold.step + left
    if not np.isfinite(summary["loss"]):  # a window's mean is NaN or inf if any loss is
      _stop_nonfinite("loss", fold.step, fold.workdir, fold.manager)
    fold.epoch_windows.append(summary)
    if fold.print_windows and fold.step % config.log_every_steps == 0:
      where = f"fold {config.fold}, " if plan.num_folds > 1 else ""
      print(f"{where}step {fold.step}/{fold.total_steps}: training loss {summary['loss']:.4f}, "
            f"training accuracy {summary['accuracy']:.3f}, "
            f"{summary['images_per_second']:.0f} images/s",
            flush=True)
    if is_main:
      fold.metrics_file.write(json.dumps(summary) + "\n")
      fold.metrics_file.flush()
      for key, v in summary.items():
        if key not in ("step", "steps"):
          fold.writer.add_scalar(f"train/{key}", v, fold.step)
  if save_now:
    fold_state = parallel.unstack(plan, state, k)
    if not parallel.all_finite(fold_state.params):  # weights no loss has been computed with yet
      _stop_nonfinite("weights", fold.step, fold.workdir, fold.manager)
    checkpoints.save(fold.manager, fold.step, fold_state)
  if epoch_end:
    weights = [w["steps"] for w in fold.epoch_windows]
    mean = {key: np.average([w[key] for w in fold.epoch_windows], weights=weights)
            for key in ("loss", "accuracy", "images_per_second")}
    fold.epoch_windows = []
    prefix = f"fold {config.fold}, " if plan.num_folds > 1 else ""
    print(f"{prefix}epoch {fold.step // fold.steps_per_epoch}/{config.num_epochs}: training loss "
          f"{mean['loss']:.4f}, training accuracy {mean['accuracy']:.3f}, "
          f"{mean['images_per_second']:.0f} images/s", flush=True)


def _stop_nonfinite(what: str, step: int, workdir: str, manager) -> None:
  checkpoints.wait(manager)  # the last good checkpoint may still be being written
  raise UserError(
      f"the training {what} became NaN or infinite by step {step}; stopped. The last good "
      f"checkpoint (step {manager.latest_step()}) is kept in {workdir}/checkpoints; try a lower "
      f"--config.learning_rate or check the input data")


