"""Training and evaluation of one fold, in the style of Flax's ImageNet example.

`train_step` and `eval_step` are pure functions of their arguments (no Python side effects), run
under `jax.jit`; everything with side effects (data, checkpoints, logs, the progress bar) lives in
`train_and_evaluate`, the one function that runs a fold from start (or from its latest checkpoint)
to `results.json`.

The recipe is section 3 of the paper and the authors' code: softmax cross-entropy; Adam with
learning rate 5e-5 and an L2 weight decay of 1e-4 added to the gradient before the moments, as
`torch.optim.Adam(weight_decay=...)` does; the learning rate halved every 30 epochs (or at given
milestones); batch size 8; backbone convs fine-tuned from ImageNet, classifier and attention
trained from scratch. The reported model is the one at the end of training: the test set is
evaluated once, after the last epoch, and never used to choose anything.
"""

from __future__ import annotations

import collections
import csv
import functools
import io
import json
import os
import shutil
import time
import warnings
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
from jattn import checkpoints, convert, data, evaluate, files, models
from jattn.data import augment as augment_lib
from jattn.errors import UserError

RESULTS_SCHEMA = "jattn.results/1"
# Fields that change how a run is logged, not what it computes: a resumed run may change them.
PRETRAINED_SCOPES = ("backbone", "all")  # what config.pretrained provides: the paper's, or all
BOOKKEEPING_FIELDS = ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                      "loader_threads", "eval_batch_size")


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


def scale_by_step_decay(config: ml_collections.ConfigDict,
                        steps_per_epoch: int | None = None) -> optax.GradientTransformationExtraArgs:
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
               augment: Mapping[str, Any]) -> tuple[TrainState, dict[str, jax.Array]]:
  """One Adam step on a batch of uint8 images; augmentation and normalisation run on device."""
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
  state = state.apply_gradients(grads=grads,
                                batch_stats=new_model_state.get("batch_stats", state.batch_stats))
  metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
  return state, metrics


def eval_step(state: TrainState, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Class probabilities of a batch of uint8 images (padding rows are dropped by the caller)."""
  logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                          preprocess(state, batch["image"]), train=False)
  return {"probs": jax.nn.softmax(logits)}


def create_train_state(config: ml_collections.ConfigDict, rng: jax.Array, image_mean, image_std,
                       steps_per_epoch: int) -> TrainState:
  """A fresh state: model initialised from `rng`, ImageNet weights merged per the config."""
  model = models.build_model(config.model)
  variables = models.init_variables(model, rng, config.image_size)
  if config.pretrained:
    variables = merge_pretrained(variables, convert.load_weights(config.pretrained),
                                 config.pretrained_scope, config.pretrained)
  else:
    warnings.warn("config.pretrained is empty: training from scratch, not fine-tuning ImageNet "
                  "weights as the paper does", stacklevel=2)
  return make_state(config, model, variables, image_mean, image_std, steps_per_epoch)


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
  models.build_model(config.model)  # checks the model fields


# --------------------------------------------------------------------------------------------
# The loop: everything with side effects.


def _device_prefetch(batches: Iterator[dict], size: int = 2) -> Iterator[dict]:
  """Puts the next batches on the device while the current step runs."""
  queue = collections.deque()
  for batch in batches:
    queue.append(jax.device_put(batch))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def _write_json(path: str, obj: Any) -> None:
  files.atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _check_workdir(workdir: str, config: ml_collections.ConfigDict, overwrite: bool) -> None:
  """Refuses a work dir that holds a different run, unless asked to overwrite it."""
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
    current = json.loads(config.to_json())
    differ = sorted(k for k in set(stored) | set(current)
                    if k not in BOOKKEEPING_FIELDS and stored.get(k) != current.get(k))
    if differ and not overwrite:
      raise UserError(f"{workdir} holds a run with a different config (fields: "
                      f"{', '.join(differ)}); use another --workdir, or --overwrite to discard it")
    if differ:
      shutil.rmtree(workdir)
  os.makedirs(workdir, exist_ok=True)
  _write_json(path, json.loads(config.to_json()))


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       overwrite: bool = False) -> dict:
  """Trains one fold (resuming from the latest checkpoint) and writes WORKDIR/results.json."""
  validate_config(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  _check_workdir(workdir, config, overwrite)
  results_path = os.path.join(workdir, "results.json")
  if os.path.exists(results_path):
    with open(results_path) as f:
      results = json.load(f)
    print(f"{workdir} has finished (results.json); not training again.\n"
          f"{evaluate.format_table(results)}")
    return results

  fold_data = data.load_fold(config)
  steps_per_epoch = data.steps_per_epoch(fold_data, config.batch_size)
  if steps_per_epoch == 0:
    raise UserError(f"fold {config.fold} has {len(fold_data.train_indices)} training images, fewer "
                    f"than one batch of --config.batch_size={config.batch_size}")
  total_steps = steps_per_epoch * config.num_epochs
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  state = create_train_state(config, init_rng, fold_data.mean, fold_data.std, steps_per_epoch)

  manager = checkpoints.manager(workdir, config.keep_checkpoints)
  restored = checkpoints.restore_latest(manager, state)
  if restored is not None:
    state = restored
    print(f"resuming {workdir} from step {int(state.step)} of {total_steps}")
  start_step = int(state.step)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  _truncate_metrics(metrics_path, start_step)

  writer = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step)
  schedule = learning_rate_schedule(config, steps_per_epoch)
  p_train_step = jax.jit(functools.partial(train_step, augment=config.augment.to_dict()),
                         donate_argnums=(0,))
  started = time.time()
  step = start_step  # a Python copy of state.step: reading the device's would wait for each step
  try:  # a pending asynchronous checkpoint is finished however the loop ends
    with open(metrics_path, "a") as metrics_file:
      for epoch in range(start_step // steps_per_epoch, config.num_epochs):
        first = max(start_step - epoch * steps_per_epoch, 0)  # steps already done this epoch
        batches = data.train_batches(fold_data, config.batch_size, seed=config.seed, epoch=epoch,
                                     start_step=first, num_threads=config.loader_threads)
        pending, window_start, epoch_windows = [], time.time(), []
        bar = tqdm(total=steps_per_epoch, initial=first, unit="step", dynamic_ncols=True,
                   desc=f"epoch {epoch + 1}/{config.num_epochs}", leave=False, disable=None)
        for batch in _device_prefetch(batches):
          state, metrics = p_train_step(state, batch, jax.random.fold_in(train_rng, step))
          pending.append(metrics)
          bar.update()
          step += 1
          save_now = step % steps_per_epoch == 0 or (
              config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0)
          if save_now or step % config.log_every_steps == 0:  # every loss is checked before a save
            summary = _summarize_window(pending, step, schedule, config.batch_size,
                                        time.time() - window_start)
            pending, window_start = [], time.time()
            if not np.isfinite(summary["loss"]):  # a window's mean is NaN or inf if any loss is
              _stop_nonfinite("loss", step, workdir, manager)
            epoch_windows.append(summary)
            metrics_file.write(json.dumps(summary) + "\n")
            metrics_file.flush()
            for k, v in summary.items():
              if k not in ("step", "steps"):
                writer.add_scalar(f"train/{k}", v, step)
            bar.set_postfix(loss=f"{summary['loss']:.4f}",
                            img_s=f"{summary['images_per_second']:.0f}")
          if save_now:
            if not _all_finite(state.params):  # weights no loss has been computed with yet
              _stop_nonfinite("weights", step, workdir, manager)
            checkpoints.save(manager, step, state)
        bar.close()
        weights = [w["steps"] for w in epoch_windows]
        mean = {k: np.average([w[k] for w in epoch_windows], weights=weights)
                for k in ("loss", "accuracy", "images_per_second")}
        print(f"epoch {epoch + 1}/{config.num_epochs}: training loss {mean['loss']:.4f}, "
              f"training accuracy {mean['accuracy']:.3f}, {mean['images_per_second']:.0f} images/s",
              flush=True)
  finally:
    manager.wait_until_finished()
  writer.flush()

  results, rows = _evaluate_fold(config, state, fold_data)
  _write_csv(os.path.join(workdir, "predictions.csv"), rows)
  results["train"] = {"epochs": config.num_epochs, "steps": int(state.step),
                      "steps_per_epoch": steps_per_epoch,
                      "wall_time_this_session_s": round(time.time() - started, 1)}
  for m, v in results["image_accuracy"].items():
    writer.add_scalar(f"test/image_accuracy_{m}", v, int(state.step))
  writer.close()
  _write_json(results_path, results)
  print(f"fold {config.fold} of {config.name}: results in {results_path}\n"
        f"{evaluate.format_table(results)}")
  return results


def _summarize_window(pending, step, schedule, batch_size, seconds) -> dict[str, float]:
  stacked = jax.device_get(pending)
  return {
      "step": step,
      "steps": len(stacked),
      "loss": float(np.mean([m["loss"] for m in stacked])),
      "accuracy": float(np.mean([m["accuracy"] for m in stacked])),
      "learning_rate": float(schedule(step - 1)),
      "images_per_second": len(stacked) * batch_size / max(seconds, 1e-9),
  }


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree_util.tree_leaves(tree)]))


def _stop_nonfinite(what: str, step: int, workdir: str, manager) -> None:
  manager.wait_until_finished()  # the last good checkpoint may still be being written
  raise UserError(
      f"the training {what} became NaN or infinite by step {step}; stopped. The last good "
      f"checkpoint (step {manager.latest_step()}) is kept in {workdir}/checkpoints; try a lower "
      f"--config.learning_rate or check the input data")


def _evaluate_fold(config, state, fold_data) -> tuple[dict, list[dict]]:
  """Predicts every test image once; returns the protocol's figures and one row per image."""
  p_eval = jax.jit(eval_step)
  index, probs = [], []
  for batch in data.test_batches(fold_data, config.eval_batch_size,
                                 num_threads=config.loader_threads):
    mask = np.asarray(batch["mask"])
    out = p_eval(state, {"image": batch["image"]})
    probs.append(np.asarray(out["probs"])[mask])
    index.append(np.asarray(batch["index"])[mask])
  index, probs = np.concatenate(index), np.concatenate(probs)
  if sorted(index.tolist()) != sorted(np.asarray(fold_data.test_indices).tolist()):
    raise AssertionError("the test loader did not yield every test image exactly once")
  predictions = np.argmax(probs, axis=-1)
  rows = [{"file_name": fold_data.file_names[i],
           "magnification": data.MAGNIFICATIONS[fold_data.magnifications[i]],
           "patient_id": fold_data.patient_ids[fold_data.patients[i]],
           "label": evaluate.CLASSES[fold_data.labels[i]],
           "prob_malignant": f"{p[1]:.6f}", "prediction": evaluate.CLASSES[int(np.argmax(p))]}
          for i, p in zip(index, probs, strict=True)]
  results = {
      "schema": RESULTS_SCHEMA, "name": config.name, "paper_row": config.paper_row,
      "fold": config.fold, "finished": True, "tie_rule": config.tie_rule,
      **evaluate.summarize(
          labels=fold_data.labels[index], predictions=predictions,
          patients=fold_data.patients[index], magnifications=fold_data.magnifications[index],
          subtypes=fold_data.subtypes[index], patient_ids=fold_data.patient_ids,
          tie_rule=config.tie_rule),
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
