"""Training and evaluation of one fold, in the style of Flax's ImageNet example.

`train_step` and `eval_step` are pure functions of their arguments (no Python side effects), run
under `jax.jit`; everything with side effects (data, checkpoints, logs, the progress bar) lives in
`train_and_evaluate`, the one function that runs a fold from start (or from its latest checkpoint)
to `results.json`. How the steps are mapped over several folds and sharded over devices and
processes is decided by `jattn.parallel`; the loop reads the same for one fold on one CPU and five
folds on eight GPUs.

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
import csv
import dataclasses
import functools
import io
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
from flax import traverse_util
from flax.training import train_state
from tensorboardX import SummaryWriter
from tqdm import tqdm

import jattn
from jattn import checkpoints, convert, data, errors, evaluate, files, models, parallel
from jattn import metrics as metrics_lib
from jattn.data import augment as augment_lib
from jattn.data import scan as scan_lib
from jattn.errors import UserError

RESULTS_SCHEMA = "jattn.results/1"
LONG_BOOTSTRAP = 1_000_000  # resamples x test patients from which evaluation says it bootstraps
TTA_MODES = ("none", "dihedral")  # config.tta: test-time augmentation of eval_step
# Fields that change how a run is logged, not what it computes: a resumed run may change them.
PRETRAINED_SCOPES = ("backbone", "all")  # what config.pretrained provides: the paper's, or all
BOOKKEEPING_FIELDS = ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                      "loader_threads", "eval_batch_size", "download", "parallel_folds",
                      "num_devices", "coordinator_timeout_s")


# Fields added to the config after runs were first written, with the value that reproduces what a
# run whose config.json predates them computed: such a run resumes, or prints its results, instead
# of being refused as "a different config".
LATER_FIELDS = {
    "download": False, "magnifications": ["40X", "100X", "200X", "400X"], "task": "binary",
    "augment.hed_scale": 0.0, "augment.hed_shift": 0.0, "augment.brightness": 0.0,
    "augment.contrast": 0.0, "augment.saturation": 0.0, "tta": "none",
    "bootstrap_resamples": 1000, "bootstrap_seed": 0, "model.s_attn_impl": "auto",
    "coordinator_timeout_s": 300.0,
}


class TrainState(train_state.TrainState):
  """Parameters, optimiser state and step, plus batch-norm statistics and the fold's image stats."""

  batch_stats: Any = None
  image_mean: jax.Array = None  # [3], 0-255 scale: the fold's training images
  image_std: jax.Array = None
  # int32 []: the fold's steps per epoch, as data rather than a Python constant so that states of
  # folds with different training-set sizes can be stacked and stepped in one program.
  steps_per_epoch: jax.Array = None

  def apply_gradients(self, *, grads, **kwargs):
    """One optimiser step; the learning rate follows this state's own `steps_per_epoch`."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params,
                                        steps_per_epoch=self.steps_per_epoch)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state, **kwargs)


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           steps_per_epoch: int | jax.Array) -> Callable[[jax.Array], jax.Array]:
  """Step decay by epoch: lr * factor^(number of milestones reached), as torch's MultiStepLR."""
  milestones = jnp.asarray(config.lr_milestones, jnp.int32)

  def schedule(step):
    epoch = step // steps_per_epoch
    if config.lr_milestones:
      decays = jnp.sum(epoch >= milestones)
    else:
      decays = epoch // config.lr_decay_every
    return config.learning_rate * config.lr_decay_factor ** decays

  return schedule


def scale_by_step_decay(config: ml_collections.ConfigDict, steps_per_epoch: int | None = None
                        ) -> optax.GradientTransformationExtraArgs:
  """optax.scale_by_learning_rate(learning_rate_schedule(...)), with the same state and numerics,
  whose steps per epoch may also be passed to `update` as an array (`steps_per_epoch=`)."""
  def update_fn(updates, state, params=None, *, steps_per_epoch=steps_per_epoch, **extra_args):
    del extra_args
    schedule = learning_rate_schedule(config, steps_per_epoch)
    return optax.scale_by_learning_rate(schedule).update(updates, state, params)

  return optax.GradientTransformationExtraArgs(optax.scale_by_schedule(lambda c: c).init,
                                               update_fn)


def make_optimizer(config: ml_collections.ConfigDict,
                   steps_per_epoch: int | None = None) -> optax.GradientTransformationExtraArgs:
  """torch.optim.Adam(lr, weight_decay): L2 term added to the gradient, then Adam, then -lr.

  Without `steps_per_epoch`, `update` must be given it (`tx.update(..., steps_per_epoch=n)`), as
  `TrainState.apply_gradients` does.
  """
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
      scale_by_step_decay(config, steps_per_epoch),
  )


def preprocess(state: TrainState, images: jax.Array) -> jax.Array:
  """Normalises 0-255 images by the fold's channel mean and std."""
  return (images.astype(jnp.float32) - state.image_mean) / state.image_std


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, *,
               augment: Mapping[str, Any], learning_rate_fn: Callable | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One Adam step on a batch of uint8 images; augmentation and normalisation run on device.

  With `learning_rate_fn` (`functools.partial(learning_rate_schedule, config)`) the metrics hold
  the learning rate this step's update was scaled by: the schedule at the state's step, with the
  state's own `steps_per_epoch`, as `TrainState.apply_gradients` gives them to the optimiser.
  """
  aug_rng, dropout_rng = jax.random.split(rng)
  images = preprocess(state, augment_lib.augment(aug_rng, batch["image"], **augment))
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


def eval_step(state: TrainState, batch: Mapping[str, jax.Array], *,
              tta: str = "none") -> dict[str, jax.Array]:
  """Class probabilities of a batch of uint8 images (padding rows are dropped by the caller).

  tta='dihedral' averages the probabilities of the 8 flips and right-angle turns of each image,
  one view after the other (`lax.map`: the memory of one view, not eight).
  """
  def probs(images):
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                            preprocess(state, images), train=False)
    return jax.nn.softmax(logits)

  if tta == "dihedral":
    return {"probs": jnp.mean(jax.lax.map(probs, augment_lib.dihedral_stack(batch["image"])), 0)}
  if tta != "none":
    raise ValueError(f"tta={tta!r}: use one of {TTA_MODES}")
  return {"probs": probs(batch["image"])}


def create_train_state(config: ml_collections.ConfigDict, rng: jax.Array, image_mean, image_std,
                       steps_per_epoch: int) -> TrainState:
  """A fresh state: model initialised from `rng`, ImageNet weights merged per the config."""
  model, variables = initial_variables(config, rng)
  warn_if_from_scratch(config)
  return make_state(config, model, variables, image_mean, image_std, steps_per_epoch)


def initial_variables(config: ml_collections.ConfigDict, rng: jax.Array):
  """(model, variables): the model initialised from `rng`, ImageNet weights merged per the config
  (a missing or unfitting weights folder is a UserError)."""
  model = models.build_model(config.model)
  variables = models.init_variables(model, rng, config.image_size)
  if config.pretrained:
    variables = merge_pretrained(variables, convert.load_weights(config.pretrained),
                                 config.pretrained_scope, config.pretrained)
  return model, variables


def warn_if_from_scratch(config: ml_collections.ConfigDict) -> None:
  if not config.pretrained:
    errors.warn("config.pretrained is empty: training from scratch, not fine-tuning ImageNet "
                "weights as the paper does")


def make_state(config, model, variables, image_mean, image_std, steps_per_epoch) -> TrainState:
  """A TrainState of `variables` with the config's optimiser and the fold's image statistics."""
  return TrainState.create(
      apply_fn=model.apply, params=variables["params"], tx=make_optimizer(config),
      batch_stats=variables.get("batch_stats", {}),
      image_mean=jnp.asarray(image_mean, jnp.float32),
      image_std=jnp.asarray(image_std, jnp.float32),
      steps_per_epoch=jnp.asarray(steps_per_epoch, jnp.int32))


def merge_pretrained(variables: Mapping[str, Any], pretrained: Mapping[str, Any], scope: str,
                     source: str = "pretrained") -> dict[str, Any]:
  """Copies pretrained weights into `variables`: the backbone convs (and batch norm) or all.

  With scope 'backbone' (the paper) every conv and batch-norm variable of the five blocks must be
  present with the right shape; attention modules and the classifier keep their initialisation.
  With scope 'all', every variable present in `pretrained` with a matching path is copied.
  """
  if scope not in PRETRAINED_SCOPES:
    raise UserError(f"config.pretrained_scope={scope!r}: use one of {PRETRAINED_SCOPES}")
  flat = traverse_util.flatten_dict(variables)
  given = traverse_util.flatten_dict(pretrained)
  copied = 0
  for key, value in flat.items():
    is_backbone = key[1].startswith("block") and key[2].startswith(("conv", "bn"))
    if scope == "backbone" and not is_backbone:
      continue
    if key not in given:
      if scope == "backbone":
        raise UserError(f"{source}: no weights for {'/'.join(key)}; were they converted for "
                        f"this architecture (vgg19 vs vgg19_bn, model.width)?")
      continue
    if tuple(given[key].shape) != tuple(value.shape):
      raise UserError(f"{source}: {'/'.join(key)} has shape {tuple(given[key].shape)}, the model "
                      f"needs {tuple(value.shape)}; convert weights for this architecture")
    flat[key] = jnp.asarray(given[key], value.dtype)
    copied += 1
  if not copied:
    raise UserError(f"{source}: none of its weights fit this model")
  return traverse_util.unflatten_dict(flat)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the values a run depends on; each problem is one UserError naming the field."""
  def check(ok, message):
    if not ok:
      raise UserError(message)

  check(config.fold in (1, 2, 3, 4, 5), f"--config.fold={config.fold}: folds are numbered 1 to 5")
  parallel_folds, num_devices = config.get("parallel_folds", 1), config.get("num_devices", 0)
  check(isinstance(parallel_folds, int) and parallel_folds >= 1,
        f"--config.parallel_folds={parallel_folds!r}: the number of consecutive folds trained in "
        f"one program, at least 1 (1: this fold alone)")
  check(parallel_folds <= 6 - config.fold,
        f"--config.parallel_folds={parallel_folds!r} with --config.fold={config.fold}: folds "
        f"{config.fold}..{config.fold + parallel_folds - 1} do not exist (folds are numbered 1 to "
        f"5); use at most {6 - config.fold}")
  check(isinstance(num_devices, int) and num_devices >= 0,
        f"--config.num_devices={num_devices!r}: a device count, or 0 for all devices")
  for field in ("batch_size", "eval_batch_size", "num_epochs", "image_size", "log_every_steps"):
    check(isinstance(config[field], int) and config[field] > 0,
          f"--config.{field}={config[field]!r}: must be a positive integer")
  check(config.image_size >= 32, f"--config.image_size={config.image_size}: VGG's five max-pools "
        f"need at least 32 pixels")
  check(config.learning_rate > 0, f"--config.learning_rate={config.learning_rate}: must be > 0")
  check(config.lr_decay_every > 0, "--config.lr_decay_every must be positive")
  check(config.tie_rule in evaluate.TIE_RULES,
        f"--config.tie_rule={config.tie_rule!r}: use one of {evaluate.TIE_RULES}")
  check(config.pretrained_scope in PRETRAINED_SCOPES,
        f"--config.pretrained_scope={config.pretrained_scope!r}: use one of {PRETRAINED_SCOPES}")
  check(config.augment.flip in augment_lib.FLIPS,
        f"--config.augment.flip={config.augment.flip!r}: use one of {augment_lib.FLIPS}")
  check(config.augment.rotation in augment_lib.ROTATIONS,
        f"--config.augment.rotation={config.augment.rotation!r}: use one of "
        f"{augment_lib.ROTATIONS}")
  check(0 <= config.augment.max_angle <= 180,
        f"--config.augment.max_angle={config.augment.max_angle}: degrees between 0 and 180")
  for name, high in augment_lib.COLOR_RANGES.items():
    check(0 <= config.augment[name] <= high,
          f"--config.augment.{name}={config.augment[name]}: between 0 (off) and {high}")
  check(config.tta in TTA_MODES, f"--config.tta={config.tta!r}: use one of {TTA_MODES}")
  _, task = data.selection(config)  # config.magnifications and config.task
  classes = data.TASKS[task]
  check(config.model.num_classes == len(classes),
        f"--config.model.num_classes={config.model.num_classes} does not fit --config.task={task} "
        f"({len(classes)} classes: {', '.join(classes)}); set --config.model.num_classes="
        f"{len(classes)}")
  check(isinstance(config.bootstrap_resamples, int) and config.bootstrap_resamples >= 0,
        f"--config.bootstrap_resamples={config.bootstrap_resamples!r}: a count >= 0 (0: no CIs)")
  check(config.bootstrap_resamples <= metrics_lib.MAX_RESAMPLES,
        f"--config.bootstrap_resamples={config.bootstrap_resamples}: at most "
        f"{metrics_lib.MAX_RESAMPLES:,} (the bootstrap holds a resamples x test patients matrix in "
        f"memory; 1,000 to 10,000 give stable 95% intervals)")
  timeout = config.get("coordinator_timeout_s", 300.0)
  check(isinstance(timeout, (int, float)) and timeout > 0,
        f"--config.coordinator_timeout_s={timeout!r}: a number of seconds > 0")
  check(isinstance(config.keep_checkpoints, int) and config.keep_checkpoints >= 1,
        f"--config.keep_checkpoints={config.keep_checkpoints!r}: must be at least 1 (the final "
        f"state of a run is a checkpoint)")
  check(isinstance(config.checkpoint_every_steps, int) and config.checkpoint_every_steps >= 0,
        f"--config.checkpoint_every_steps={config.checkpoint_every_steps!r}: must be 0 (at epoch "
        f"ends only) or a positive number of steps")
  models.build_model(config.model)  # checks the model fields


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


def _write_json(path: str, obj: Any) -> None:
  files.atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


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
  stored, now = _comparable(stored), _comparable(json.loads(config.to_json()))
  if stored == now:
    return "keep"  # nothing to write: a finished run on read-only storage just prints its results
  differ = sorted(k for k in set(stored) | set(now)
                  if k not in BOOKKEEPING_FIELDS and stored.get(k) != now.get(k))
  if differ and not overwrite:
    raise UserError(f"{workdir} holds a run with a different config (fields: "
                    f"{', '.join(differ)}); use another --workdir, or --overwrite to discard it")
  return "discard" if differ else "write"


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
  _write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json()))


def _comparable(stored: dict) -> dict:
  """A config (as JSON) with the `LATER_FIELDS` it predates filled in and `model.dtype` 'auto'
  replaced by what it computes in here, so that equal computations compare equal."""
  stored = json.loads(json.dumps(stored))
  stored["model"]["dtype"] = models.resolve_dtype(stored["model"]["dtype"])
  for key, value in LATER_FIELDS.items():
    *parents, field = key.split(".")
    node = stored
    for parent in parents:
      node = node.setdefault(parent, {})
    node.setdefault(field, value)
  return stored


def _write_csv(path: str, rows: list[dict]) -> None:
  text = io.StringIO()
  writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else ["file_name"])
  writer.writeheader()
  writer.writerows(rows)
  files.atomic_write_text(path, text.getvalue())


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
  manager: Any = None
  metrics_file: Any = None
  writer: Any = None
  pending: list = dataclasses.field(default_factory=list)
  window_start: float = 0.0
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
  every process) is `jattn.parallel`'s business; this loop reads the same either way. Every work
  dir is locked for the whole run: a second run started on one of them is refused. Nothing is
  written into a work dir before every check that can fail has passed (the config, the weights,
  the data): a failed start leaves a new work dir absent and an existing one as it was.
  """
  validate_config(config)
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
  folds = []
  for number, fold_workdir in workdirs.items():
    fold_config = config.copy_and_resolve_references()
    fold_config.fold = number
    folds.append(_Fold(fold_config, fold_workdir))
  for f in folds:  # nothing is written into a work dir before every check that can fail passed
    f.action = _workdir_action(f.workdir, f.config, overwrite)
    results_path = os.path.join(f.workdir, "results.json")
    if f.action != "discard" and os.path.exists(results_path):
      f.results = files.read_json(results_path, "delete it to evaluate the run again from its "
                                                "last checkpoint")
      print(f"{f.workdir} has finished (results.json); not training again.\n"
            f"{evaluate.format_table(f.results)}")
  if all(f.results is not None for f in folds):
    return folds[0].results if len(folds) == 1 else [f.results for f in folds]
  _sync("work dirs checked")

  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  # Quick checks first: a missing data dir or weights folder stops the run at once, before
  # minutes of data preparation. Every fold starts from the same initialisation.
  _check_data_dir(config)
  model, variables = initial_variables(config, init_rng)
  for f in folds:
    f.data = data.load_fold(f.config)
    f.steps_per_epoch = data.steps_per_epoch(f.data, config.batch_size)
    if f.steps_per_epoch == 0:
      raise UserError(f"fold {f.config.fold} has {len(f.data.train_indices)} training images, "
                      f"fewer than one batch of --config.batch_size={config.batch_size}")
    f.total_steps = f.steps_per_epoch * config.num_epochs
  _sync("data and weights checked")  # by every process: none writes before all could start
  if is_main:
    for f in folds:
      if f.results is None:
        _claim_workdir(f.workdir, f.config, f.action)
  _sync("work dirs claimed")
  warn_if_from_scratch(config)  # once the run starts: a start that fails shows its error alone

  dtype = models.resolve_dtype(config.model.dtype)
  states = []
  for k, f in enumerate(folds):
    state = parallel.place(plan, make_state(f.config, model, variables, f.data.mean, f.data.std,
                                            f.steps_per_epoch))
    if f.results is None:
      f.manager = checkpoints.manager(f.workdir, config.keep_checkpoints)
      restored = checkpoints.restore_latest(f.manager, state)
      if restored is not None:
        state = restored
        print(f"resuming {f.workdir} from step {int(state.step)} of {f.total_steps}")
      f.step = f.start_step = int(state.step)
      f.layout = parallel.layout(plan, k, config.get("num_devices", 0), dtype)
      if is_main:
        f.layout_history = _record_layout(f)
    else:
      f.step = f.start_step = f.total_steps  # finished: its (fresh) state is never stepped
    states.append(state)
  state = parallel.stack(plan, states)
  del states, variables

  train_rng = parallel.place(plan, train_rng)
  started = time.time()
  step_fn = parallel.train_step(plan, functools.partial(
      train_step, augment=config.augment.to_dict(),
      learning_rate_fn=functools.partial(learning_rate_schedule, config)))
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
          f.window_start = time.time()
      for batch, active in _prefetch(_global_batches(plan, folds, config)):
        state, metrics = step_fn(state, batch, train_rng, active)
        bar.update()
        for k, f in enumerate(folds):
          if active[k]:
            _after_step(f, k, plan, state, metrics, is_main)
  finally:
    bar.close()
    for f in folds:
      if f.manager is not None:
        checkpoints.wait(f.manager)

  p_eval = parallel.eval_step(plan, functools.partial(eval_step, tta=config.tta))
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
      _write_csv(os.path.join(f.workdir, "predictions.csv"), rows)
      evaluate.write_roc_plot(os.path.join(f.workdir, "roc.png"), rows, f.name)
      with SummaryWriter(os.path.join(f.workdir, "tensorboard")) as writer:
        for m, v in f.results["image_accuracy"].items():
          writer.add_scalar(f"test/image_accuracy_{m}", v, f.step)
      results_path = os.path.join(f.workdir, "results.json")
      _write_json(results_path, f.results)
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


def _global_batches(plan, folds: list[_Fold], config) -> Iterator[tuple[dict, np.ndarray]]:
  """(global batch, active folds) of every step until the last fold has finished."""
  remaining = [f.total_steps - f.step for f in folds]
  rows = parallel.process_rows(plan)
  streams = [_fold_batches(f, config, rows) for f in folds]
  for t in range(max(remaining)):
    active = np.array([t < r for r in remaining])
    fold_batches = [next(s) if a else None for s, a in zip(streams, active, strict=True)]
    yield parallel.batch(plan, fold_batches, config.batch_size), active


def _after_step(f: _Fold, k: int, plan, state, metrics, is_main: bool) -> None:
  """Logs, checks and checkpoints fold `f` (the plan's k-th) after one of its steps."""
  config = f.config
  f.pending.append((metrics, k))
  f.step += 1
  epoch_end = f.step % f.steps_per_epoch == 0
  save_now = epoch_end or (
      config.checkpoint_every_steps and f.step % config.checkpoint_every_steps == 0)
  if save_now or f.step % config.log_every_steps == 0:  # every loss is checked before a save
    summary = _summarize_window(f, plan)
    f.pending, f.window_start = [], time.time()
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


def _check_data_dir(config: ml_collections.ConfigDict) -> None:
  """A quick look that data_dir holds BreakHis or its archive (`data.load_fold` checks it again,
  and fetches or generates the data instead when the config says so)."""
  if config.get("download", False) or config.synthetic.enabled:
    return
  path = os.path.abspath(os.path.expanduser(config.data_dir))
  scan_lib.check_data_dir(scan_lib.resolve_data_dir(path))


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
  if before != f.layout:
    history.append({"from_step": f.start_step, "layout": f.layout})
  _write_json(path, history)
  return history


def _summarize_window(f: _Fold, plan) -> dict[str, float]:
  """The fold's mean metrics over the steps since its last summary (waits for them)."""
  stacked = jax.device_get([m for m, _ in f.pending])
  seconds = time.time() - f.window_start  # after the wait: the window's steps have run
  if plan.num_folds > 1:  # metrics of every fold: keep this one's
    stacked = [{key: v[f.pending[0][1]] for key, v in m.items()} for m in stacked]
  return {
      "step": f.step,
      "steps": len(stacked),
      "loss": float(np.mean([m["loss"] for m in stacked])),
      "accuracy": float(np.mean([m["accuracy"] for m in stacked])),
      "learning_rate": float(stacked[-1]["learning_rate"]),  # what the optimiser last applied
      "images_per_second": len(stacked) * f.config.batch_size / max(seconds, 1e-9),
  }


def _stop_nonfinite(what: str, step: int, workdir: str, manager) -> None:
  checkpoints.wait(manager)  # the last good checkpoint may still be being written
  raise UserError(
      f"the training {what} became NaN or infinite by step {step}; stopped. The last good "
      f"checkpoint (step {manager.latest_step()}) is kept in {workdir}/checkpoints; try a lower "
      f"--config.learning_rate or check the input data")


def _evaluate_fold(config, state, fold_data, plan, p_eval) -> tuple[dict, list[dict]]:
  """Predicts every test image once; returns the protocol's figures and one row per image."""
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
  task = config.get("task", "binary")
  names = data.TASKS[task]
  p_malignant = evaluate.malignant_probability(probs, task)
  predicted = np.argmax(probs, axis=-1)  # a class, or a subtype whose class is predicted
  rows = [{"file_name": fold_data.file_names[i],
           "magnification": data.MAGNIFICATIONS[fold_data.magnifications[i]],
           "patient_id": fold_data.patient_ids[fold_data.patients[i]],
           "label": evaluate.CLASSES[fold_data.labels[i]], "prob_malignant": f"{pm:.6f}",
           "prediction": evaluate.class_of(task)[k],
           **({"subtype": names[fold_data.subtypes[i]], "predicted_subtype": names[k]}
              if task == "subtype" else {})}
          for i, k, pm in zip(index, predicted, p_malignant, strict=True)]
  resamples = config.get("bootstrap_resamples", 0)
  num_patients = len(np.unique(fold_data.patients[index]))
  if task == "binary" and resamples * num_patients >= LONG_BOOTSTRAP:
    print(f"fold {config.fold}: 95% intervals of the clinical metrics from {resamples:,} "
          f"bootstrap resamples of the {num_patients} test patients, per magnification and "
          f"level ...", flush=True)
  figures = evaluate.evaluate_predictions(
      probs=probs, labels=fold_data.labels[index], subtypes=fold_data.subtypes[index],
      patients=fold_data.patients[index], magnifications=fold_data.magnifications[index],
      patient_ids=fold_data.patient_ids, task=task, tie_rule=config.tie_rule,
      selected=data.selection(config)[0], bootstrap_resamples=config.get("bootstrap_resamples", 0),
      bootstrap_seed=config.get("bootstrap_seed", 0))
  results = {
      "schema": RESULTS_SCHEMA, "name": config.name, "paper_row": config.paper_row,
      "fold": config.fold, "finished": True, "tie_rule": config.tie_rule, "tta": config.tta,
      **figures,
      "normalization": {"mean": [float(x) for x in fold_data.mean],
                        "std": [float(x) for x in fold_data.std],
                        "computed_on": f"the {len(fold_data.train_indices)} training images of "
                                       f"fold {config.fold}, at {config.image_size}x"
                                       f"{config.image_size}, 0-255 scale"},
      "data": {"data_dir": config.data_dir, "folds": fold_data.folds_source,
               "num_train_images": len(fold_data.train_indices),
               "num_test_images": len(fold_data.test_indices),
               "skipped_files": list(fold_data.skipped)},
      "config": json.loads(config.to_json()),
      "versions": {"jattn": jattn.__version__, "jax": jax.__version__,
                   "devices": [str(d) for d in jax.devices()]},
  }
  return results, rows
