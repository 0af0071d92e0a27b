"""Training and evaluation of one fold, in the style of Flax's ImageNet example.

`train_step` (here) and `state.eval_step` are pure functions of their arguments (no Python side
effects), run under `jax.jit`; everything with side effects (data, checkpoints, logs, the progress
bar) lives in `train_and_evaluate`, the one function that runs a fold from start (or from its
latest checkpoint) to `results.json`. The train state is `jattn.training.state`'s, the optimiser
`jattn.training.optim`'s, the config checks `jattn.training.validate`'s, the figures `jattn.evaluation.evaluate`'s and the
results' form `jattn.evaluation.results`'. How the steps are mapped over several folds and sharded over
devices and processes is decided by `jattn.training.parallel`; the loop reads the same for one fold on one
CPU and five folds on eight GPUs. With `config.steps_per_dispatch` N > 1 it hands the devices N
steps at a time (one `lax.scan` over N stacked batches), cut to single steps where an epoch end or a
checkpoint falls inside N: every step is still logged, checked and checkpointed where it was.

The recipe is section 3 of the paper and the authors' code: softmax cross-entropy; Adam with
learning rate 5e-5 and an L2 weight decay of 1e-4 added to the gradient before the moments, as
`torch.optim.Adam(weight_decay=...)` does; the learning rate halved every 30 epochs (or at given
milestones); batch size 8; backbone convs fine-tuned from ImageNet, classifier and attention
trained from scratch. The reported model is the one at the end of training: the test set is
evaluated once, after the last epoch, and never used to choose anything.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tensorboardX import SummaryWriter
from tqdm import tqdm

from jattn import data, models
from jattn.core import errors, files
from jattn.core.errors import UserError
from jattn.data import augment as augment_lib
from jattn.data import sources, stain
from jattn.evaluation import evaluate, results
from jattn.training import checkpoints, compat, optim, parallel, validate
from jattn.training import state as state_lib
from jattn.training.state import TrainState

LONG_BOOTSTRAP = 1_000_000  # resamples x test groups from which evaluation says it bootstraps


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


def _prefetch(items: Iterator, size: int = 2) -> Iterator:
  """Assembles (and puts on the devices) the next items while the current step runs."""
  queue = collections.deque()
  for item in items:
    queue.append(item)
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def _check_workdir(workdir: str, config: ml_collections.ConfigDict, overwrite: bool,
                   write: bool = True) -> None:
  """Refuses a work dir that holds a different run, unless asked to overwrite it; then (if it
  `write`s: process 0) discards that run and writes config.json. The training loop does these two
  halves apart (`_workdir_action`, `_claim_workdir`), with every check that can fail between."""
  action = _workdir_action(workdir, config, overwrite)
  if write:
    _claim_workdir(workdir, config, action)


def _workdir_action(workdir: str, config: ml_collections.ConfigDict, overwrite: bool) -> str:
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


def _as_recorded(config: ml_collections.ConfigDict,
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
  values = found[0] if found and all(f == found[0] for f in found) else {}
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


def _claim_workdir(workdir: str, config: ml_collections.ConfigDict, action: str) -> None:
  """Carries out `_workdir_action`'s answer: the other run discarded (the lock this run holds on
  the work dir kept), config.json written."""
  if action == "keep":
    return
  if action == "discard":
    for name in os.listdir(workdir):
      if name != ".lock":
        files.remove(os.path.join(workdir, name))
  os.makedirs(workdir, exist_ok=True)
  results.write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json()))


def _truncate_metrics(path: str, step: int) -> None:
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
  return {f: os.path.abspath(os.path.expanduser(workdir.replace("{fold}", str(f))))
          for f in folds}


@dataclasses.dataclass(eq=False)
class _Fold:
  """What the loop keeps of one fold it trains: its data, work dir, counters and open files."""

  config: ml_collections.ConfigDict
  workdir: str
  data: Any = None
  steps_per_epoch: int = 0
  total_steps: int = 0
  step: int = 0  # a Python copy of the fold's state.step: reading the device's would wait
  start_step: int = 0
  results: dict | None = None  # read from results.json when the fold had finished
  stain: dict | None = None  # its stain reference (config.stain_norm), fitted on its training set
  manager: Any = None
  metrics_file: Any = None
  writer: Any = None
  pending: list = dataclasses.field(default_factory=list)  # (metrics, fold k, index in dispatch)
  window_start: float = 0.0
  window_done: int = 0  # the steps known to have run when window_start was taken
  window_rate: float = 0.0  # images/s of the last window that waited for steps to run
  epoch_windows: list = dataclasses.field(default_factory=list)
  print_windows: bool = False  # a line per logged window (no progress bar: not a terminal)
  action: str = "write"  # what claiming the work dir takes (`_workdir_action`)
  layout: dict | None = None  # `parallel.layout` of this session
  layout_history: list | None = None  # layouts.json: [{from_step, layout}], on process 0

  @property
  def name(self) -> str:
    return f"fold {self.config.fold} of {self.config.name}"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       overwrite: bool = False) -> dict | list[dict]:
  """Trains a fold (resuming from its latest checkpoint) and writes WORKDIR/results.json.

  With `config.parallel_folds` K > 1, folds fold..fold+K-1 are trained in one program, each into
  `workdir` with `{fold}` replaced by its number, with the steps of K separate runs (summed in
  another order: equally valid runs, not bit-identical ones); the result is then the list of their
  results. How the step runs (vmapped over folds, sharded over the devices of
  every process) is `jattn.training.parallel`'s business; this loop reads the same either way. Every work
  dir is locked for the whole run: a second run started on one of them is refused. Nothing is
  written into a work dir before every check that can fail has passed (the config, the weights,
  the data): a failed start leaves a new work dir absent and an existing one as it was.
  """
  validate.validate_config(config)
  workdirs = fold_workdirs(config, workdir)
  plan = parallel.make_plan(config)  # checks the batch against the devices before writing
  with contextlib.ExitStack() as locks:
    if jax.process_index() == 0:  # the processes of a multi-host run share the work dirs
      for fold_workdir in workdirs.values():
        locks.enter_context(files.locked_or_refuse(fold_workdir, "--workdir",
                                                        remove_unused=True))
    return _train_and_evaluate(config, plan, workdirs, overwrite)


def _train_and_evaluate(config: ml_collections.ConfigDict, plan, workdirs: dict[int, str],
                        overwrite: bool) -> dict | list[dict]:
  is_main = jax.process_index() == 0  # only process 0 writes results, metrics and TensorBoard
  config = _as_recorded(config, workdirs)
  folds = []
  for number, fold_workdir in workdirs.items():
    fold_config = config.copy_and_resolve_references()
    fold_config.fold = number
    folds.append(_Fold(fold_config, fold_workdir))
  for f in folds:  # nothing is written into a work dir before every check that can fail passed
    f.action = _workdir_action(f.workdir, f.config, overwrite)
    results_path = os.path.join(f.workdir, "results.json")
    if f.action != "discard" and os.path.exists(results_path):
      f.results = results.read(results_path, "delete it to evaluate the run again from its "
                                             "last checkpoint")
      print(f"{f.workdir} has finished (results.json); not training again.\n"
            f"{evaluate.format_table(f.results)}")
  if all(f.results is not None for f in folds):
    return folds[0].results if len(folds) == 1 else [f.results for f in folds]
  _sync("work dirs checked")

  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  # Quick checks first: a missing data dir or weights folder stops the run at once, before
  # minutes of data preparation. Every fold starts from the same initialisation.
  sources.of(config).check_data_dir(config)
  model, variables = state_lib.initial_variables(config, init_rng)
  for f in folds:
    f.data = data.load_fold(f.config)
    f.steps_per_epoch = data.steps_per_epoch(f.data, config.batch_size)
    if f.steps_per_epoch == 0:
      raise UserError(f"fold {f.config.fold} has {len(f.data.train_indices)} training images, "
                      f"fewer than one batch of --config.batch_size={config.batch_size}")
    f.total_steps = f.steps_per_epoch * config.num_epochs
    # The fold's stain reference, from its training images (a finished fold's state is never
    # stepped: make_state gives it a placeholder).
    if config.get("stain_norm", "none") != "none" and f.results is None:
      f.stain = stain.fit_reference(f.data.images, f.data.train_indices,
                                    what=f"the training images of fold {f.config.fold}")
  _sync("data and weights checked")  # by every process: none writes before all could start
  if is_main:
    for f in folds:
      if f.results is None:
        _claim_workdir(f.workdir, f.config, f.action)
  _sync("work dirs claimed")
  state_lib.warn_if_from_scratch(config)  # once the run starts (a failed start shows its error)

  dtype = models.resolve_dtype(config.model.dtype)
  states = []
  for k, f in enumerate(folds):
    state = parallel.place(plan, state_lib.make_state(f.config, model, variables, f.data.mean,
                                                      f.data.std, f.steps_per_epoch, f.stain))
    if f.results is None:
      f.manager = checkpoints.manager(f.workdir, config.keep_checkpoints)
      restored = checkpoints.restore_latest(f.manager, state)
      if restored is not None:
        state = restored
        print(f"resuming {f.workdir} from step {int(state.step)} of {f.total_steps}")
      f.step = f.start_step = int(state.step)
      f.layout = parallel.layout(plan, k, config.get("num_devices", 0), dtype,
                                 config.get("steps_per_dispatch", 1))
      if is_main:
        f.layout_history = _record_layout(f)
    else:
      f.step = f.start_step = f.total_steps  # finished: its (fresh) state is never stepped
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
  remaining = np.array([f.total_steps - f.step for f in folds])
  bar = tqdm(total=int(remaining.max()), unit="step", dynamic_ncols=True, leave=False,
             desc=", ".join(f"fold {f.config.fold}" for f in folds), disable=None)
  for f in folds:  # the bar draws only on a terminal; elsewhere (a log file) a line per window
    f.print_windows = is_main and bar.disable
  try:  # pending asynchronous checkpoints are finished and files closed however the loop ends
    with contextlib.ExitStack() as stack:
      for f in folds:
        if f.results is None:
          stack.enter_context(_open_logs(f, is_main))
          f.window_start, f.window_done = time.time(), f.step
      for batch, active, size in _prefetch(_dispatches(plan, folds, config, per_dispatch)):
        state, metrics = step_fn(state, batch, train_rng, active)
        bar.update(size)
        for i in range(size):
          for k, f in enumerate(folds):
            if active[k]:
              _after_step(f, k, plan, state, metrics, is_main,
                          index=None if per_dispatch == 1 else i, left=size - 1 - i)
  finally:
    bar.close()
    for f in folds:
      if f.manager is not None:
        checkpoints.wait(f.manager)

  p_eval = parallel.eval_step(plan, functools.partial(state_lib.eval_step, tta=config.tta))
  for k, f in enumerate(folds):
    if f.results is not None:
      continue
    fold_state = parallel.unstack(plan, state, k)
    f.results, rows = _evaluate_fold(f.config, fold_state, f.data, plan, p_eval)
    f.results["train"] = {"epochs": config.num_epochs, "steps": f.step,
                          "steps_per_epoch": f.steps_per_epoch,
                          "wall_time_this_session_s": round(time.time() - started, 1)}
    history = f.layout_history
    f.results["layout"] = {
        **f.layout, "history": history,
        "one_layout": None if history is None or history[0]["layout"] is None else all(
            not parallel.layout_changes(history[0]["layout"], h["layout"]) for h in history)}
    if is_main:
      files.atomic_write_text(os.path.join(f.workdir, "predictions.csv"), results.csv_text(rows))
      if f.data.binary is not None:
        evaluate.write_roc_plot(os.path.join(f.workdir, "roc.png"), rows,
                                positive=f.data.binary.positive_name,
                                stratum=f.data.strata[0].name, order=f.data.strata[0].values,
                                title=f.name)
      with SummaryWriter(os.path.join(f.workdir, "tensorboard")) as writer:
        for m, v in f.results["image_accuracy"].items():
          writer.add_scalar(f"test/image_accuracy_{m}", v, f.step)
      results_path = os.path.join(f.workdir, "results.json")
      results.write_json(results_path, f.results)
      print(f"{f.name}: results in {results_path}\n{evaluate.format_table(f.results)}")
  _sync("results written")
  return folds[0].results if len(folds) == 1 else [f.results for f in folds]


def _sync(name: str) -> None:
  """Waits for every process (a no-op in a single-process run); stops, in one line, if another
  process has stopped (`parallel.sync`)."""
  parallel.sync(name)


@contextlib.contextmanager
def _open_logs(f: _Fold, is_main: bool):
  """The fold's metrics.jsonl (cut back to its checkpoint) and TensorBoard writer, on process 0."""
  if not is_main:
    yield
    return
  metrics_path = os.path.join(f.workdir, "metrics.jsonl")
  _truncate_metrics(metrics_path, f.start_step)
  with open(metrics_path, "a") as f.metrics_file, SummaryWriter(
      os.path.join(f.workdir, "tensorboard"), purge_step=f.start_step) as f.writer:
    yield


def _fold_batches(f: _Fold, config, rows: tuple[int, int]) -> Iterator[dict]:
  """The fold's training batches (this process' rows) from its current step to its last."""
  for epoch in range(f.step // f.steps_per_epoch, config.num_epochs):
    yield from data.train_batches(f.data, config.batch_size, seed=config.seed, epoch=epoch,
                                  start_step=max(f.step - epoch * f.steps_per_epoch, 0),
                                  num_threads=config.loader_threads, process_rows=rows)


def _steps_to_save(f: _Fold, step: int) -> int:
  """Steps from `step` to the fold's next epoch end or checkpoint (its last step is an epoch
  end)."""
  to_save = f.steps_per_epoch - step % f.steps_per_epoch
  every = f.config.checkpoint_every_steps
  return min(to_save, every - step % every) if every else to_save


def _dispatches(plan, folds: list[_Fold], config, per_dispatch: int
                ) -> Iterator[tuple[dict, np.ndarray, int]]:
  """(global batch, active folds, steps) of every dispatch until the last fold has finished.

  One step per dispatch when `per_dispatch` is 1; else `per_dispatch` steps stacked, or a single
  step (stacked too) wherever an active fold's epoch end or checkpoint falls before the dispatch's
  last step: two shapes to compile, and every save after the dispatch that ends on its step. The
  cut depends only on the steps, so a resumed run cuts as the uninterrupted one did. No fold
  starts or stops inside a dispatch (a fold ends at an epoch end), so `active` holds for all its
  steps.
  """
  rows = parallel.process_rows(plan)
  streams = [_fold_batches(f, config, rows) for f in folds]
  for active, size in _dispatch_sizes(folds, per_dispatch):
    steps = [[next(s) if a else None for s, a in zip(streams, active, strict=True)]
             for _ in range(size)]
    if per_dispatch == 1:
      yield parallel.batch(plan, steps[0], config.batch_size), active, 1
    else:
      yield parallel.batches(plan, steps, config.batch_size), active, size


def _dispatch_sizes(folds: list[_Fold], per_dispatch: int) -> Iterator[tuple[np.ndarray, int]]:
  """(active folds, steps) of each dispatch `_dispatches` makes, from the folds' current steps."""
  starts = [f.step for f in folds]
  remaining = [f.total_steps - f.step for f in folds]
  t = 0
  while t < max(remaining):
    active = np.array([t < r for r in remaining])
    size = per_dispatch if per_dispatch > 1 and all(
        _steps_to_save(f, start + t) >= per_dispatch
        for f, start, a in zip(folds, starts, active, strict=True) if a) else 1
    yield active, size
    t += size


def _after_step(f: _Fold, k: int, plan, state, metrics, is_main: bool, index: int | None = None,
                left: int = 0) -> None:
  """Logs, checks and checkpoints fold `f` (the plan's k-th) after one of its steps: the
  `index`-th of a dispatch of several (None: a dispatch of one step), `left` steps before the
  dispatch's end (`state` is the state at that end)."""
  config = f.config
  f.pending.append((metrics, k, index))
  f.step += 1
  epoch_end = f.step % f.steps_per_epoch == 0
  save_now = epoch_end or (
      config.checkpoint_every_steps and f.step % config.checkpoint_every_steps == 0)
  if save_now and left:
    raise AssertionError(f"step {f.step} is to be saved but {left} steps of its dispatch follow")
  if save_now or f.step % config.log_every_steps == 0:  # every loss is checked before a save
    summary = _summarize_window(f, plan, f.step + left)
    f.pending, f.window_start, f.window_done = [], time.time(), f.step + left
    if not np.isfinite(summary["loss"]):  # a window's mean is NaN or inf if any loss is
      _stop_nonfinite("loss", f.step, f.workdir, f.manager)
    f.epoch_windows.append(summary)
    if f.print_windows and f.step % config.log_every_steps == 0:
      where = f"fold {config.fold}, " if plan.num_folds > 1 else ""
      print(f"{where}step {f.step}/{f.total_steps}: training loss {summary['loss']:.4f}, training "
            f"accuracy {summary['accuracy']:.3f}, {summary['images_per_second']:.0f} images/s",
            flush=True)
    if is_main:
      f.metrics_file.write(json.dumps(summary) + "\n")
      f.metrics_file.flush()
      for key, v in summary.items():
        if key not in ("step", "steps"):
          f.writer.add_scalar(f"train/{key}", v, f.step)
  if save_now:
    fold_state = parallel.unstack(plan, state, k)
    if not parallel.all_finite(fold_state.params):  # weights no loss has been computed with yet
      _stop_nonfinite("weights", f.step, f.workdir, f.manager)
    checkpoints.save(f.manager, f.step, fold_state)
  if epoch_end:
    weights = [w["steps"] for w in f.epoch_windows]
    mean = {key: np.average([w[key] for w in f.epoch_windows], weights=weights)
            for key in ("loss", "accuracy", "images_per_second")}
    f.epoch_windows = []
    prefix = f"fold {config.fold}, " if plan.num_folds > 1 else ""
    print(f"{prefix}epoch {f.step // f.steps_per_epoch}/{config.num_epochs}: training loss "
          f"{mean['loss']:.4f}, training accuracy {mean['accuracy']:.3f}, "
          f"{mean['images_per_second']:.0f} images/s", flush=True)


LAYOUTS_FILE = "layouts.json"  # in a work dir: the layout of each stretch of its training


def _record_layout(f: _Fold) -> list[dict]:
  """The fold's layout history with this session's layout, written to WORKDIR/layouts.json.

  The history is a list of {from_step, layout}: the steps from `from_step` on were trained under
  `layout` (None: before jattn recorded layouts). Entries of sessions whose steps were not kept
  (killed before a checkpoint) are dropped. Resuming under another layout is correct but not
  bit-identical to training under one (README, Reproducibility): a warning says so.
  """
  path = os.path.join(f.workdir, LAYOUTS_FILE)
  history = files.read_json(path, f"delete it (it only records how {f.workdir} was laid out)"
                            ) if os.path.exists(path) else []
  history = [h for h in history if h["from_step"] < f.start_step]
  if f.start_step and not history:
    history = [{"from_step": 0, "layout": None}]
  before = history[-1]["layout"] if history else None
  changes = parallel.layout_changes(before, f.layout) if before is not None else []
  if changes:
    errors.warn(f"{f.workdir} was trained up to step {f.start_step} under another layout "
                f"({'; '.join(changes)}); resuming under this one gives a different, equally valid "
                f"run, not the bit-identical continuation of a resume under the same layout "
                f"(results.json: layout.history)")
  if before is None or {**parallel.LAYOUT_DEFAULTS, **before} != f.layout:
    history.append({"from_step": f.start_step, "layout": f.layout})
  results.write_json(path, history)
  return history


def _summarize_window(f: _Fold, plan, done: int) -> dict[str, float]:
  """The fold's mean metrics over the steps since its last summary (waits for them). `done` is
  the step the wait reaches (the end of the dispatch holding the window's last step): the rate
  counts the steps run since the last wait (a window whose steps all ran in a dispatch already
  waited for has that dispatch's rate)."""
  fetched = {id(m): m for m, _, _ in f.pending}
  fetched = dict(zip(fetched, jax.device_get(list(fetched.values())), strict=True))
  seconds = time.time() - f.window_start  # after the wait: the window's steps have run
  if done > f.window_done:
    f.window_rate = (done - f.window_done) * f.config.batch_size / max(seconds, 1e-9)
  stacked = []
  for m, k, i in f.pending:  # the step's metrics: its index in a dispatch, then its fold
    m = fetched[id(m)]
    m = m if i is None else {key: v[i] for key, v in m.items()}
    stacked.append(m if plan.num_folds == 1 else {key: v[k] for key, v in m.items()})
  return {
      "step": f.step,
      "steps": len(stacked),
      "loss": float(np.mean([m["loss"] for m in stacked])),
      "accuracy": float(np.mean([m["accuracy"] for m in stacked])),
      "learning_rate": float(stacked[-1]["learning_rate"]),  # what the optimiser last applied
      "images_per_second": f.window_rate,
  }


def _stop_nonfinite(what: str, step: int, workdir: str, manager) -> None:
  checkpoints.wait(manager)  # the last good checkpoint may still be being written
  raise UserError(
      f"the training {what} became NaN or infinite by step {step}; stopped. The last good "
      f"checkpoint (step {manager.latest_step()}) is kept in {workdir}/checkpoints; try a lower "
      f"--config.learning_rate or check the input data")


def _evaluate_fold(config, state, fold_data, plan, p_eval) -> tuple[dict, list[dict]]:
  """Predicts every test image once; returns the results' figures and one row per image."""
  batch_size = plan.eval_batch_size(config.eval_batch_size)  # a multiple of the device count
  index, probs = [], []
  for batch in data.test_batches(fold_data, batch_size, num_threads=config.loader_threads,
                                 process_rows=parallel.process_rows(plan)):
    mask = np.asarray(batch["mask"])
    out = p_eval(state, {"image": parallel.eval_images(plan, batch["image"], batch_size)})
    probs.append(np.asarray(out["probs"])[mask])
    index.append(np.asarray(batch["index"])[mask])
  index, probs = np.concatenate(index), np.concatenate(probs)
  if sorted(index.tolist()) != sorted(np.asarray(fold_data.test_indices).tolist()):
    raise AssertionError("the test loader did not yield every test image exactly once")
  resamples = config.get("bootstrap_resamples", 0)
  num_groups = len(np.unique(fold_data.groups[index]))
  if len(fold_data.classes) == 2 and resamples * num_groups >= LONG_BOOTSTRAP:
    print(f"fold {config.fold}: 95% intervals of the clinical metrics from {resamples:,} "
          f"bootstrap resamples of the {num_groups} test {fold_data.group_unit}s, per "
          f"{' and '.join(x.name for x in fold_data.strata)} and level ...", flush=True)
  figures = evaluate.evaluate(probs, fold_data, index, tie_rule=config.tie_rule,
                              bootstrap_resamples=resamples,
                              bootstrap_seed=config.get("bootstrap_seed", 0))
  reference = None
  if state.stain_matrix is not None:
    reference = stain.describe(
        state.stain_matrix, state.stain_max,
        f"the median of the estimates of the {len(fold_data.train_indices)} training images of "
        f"fold {config.fold} (at most {stain.REFERENCE_PIXELS} pixels each), at "
        f"{config.image_size}x{config.image_size}")
  return (results.build(config, fold_data, figures, stain_normalization=reference),
          results.prediction_rows(fold_data, index, probs))
