"""A linear probe on cached features: a frozen backbone's run whose head trains on each image's
features computed once (eva's protocol), with the folds, evaluator and results.json of any run.

A run takes this path (`cached`) when `config.model.freeze` is on, augmentation is off (every
image is then seen identically each epoch), no attention module is placed, and nothing trainable
precedes the pooled features: every parameter outside the final linear layer
(`models.head_params`) is one the backbone's `is_pretrained` names, so the freeze leaves exactly
that layer to train. The backbone then runs once per training image in eval mode (batch norm from
its running statistics; `jattn.training.features`), and the head is fitted on those features by
`config.probe.solver`:

- 'jax': the head as a JAX linear layer trained with the run's own recipe (`optim.make_optimizer`:
  Adam, L2 weight decay `config.weight_decay`, the step decay), `config.num_epochs` epochs of
  `config.batch_size`, in an order drawn from `config.seed` per epoch, the last partial batch
  dropped as `jattn train` does; its regularisation is the run's weight decay.
- 'logistic': scikit-learn's `LogisticRegression` (L-BFGS, multinomial) on the features
  standardised by the training images' mean and standard deviation (`StandardScaler`), with C
  chosen from `config.probe.c_values` by the log-loss on a validation split of the training groups
  (the run's own, `config.validation_fraction`, or else `config.probe.validation_fraction` of them,
  group-disjoint and stratified: `holdout.split`), then refitted on every training image with that
  C. The test split never chooses anything. The scaler and the coefficients are folded into the
  head's kernel and bias (two classes: logits [0, w.x + b], whose softmax is the regression's
  sigmoid).

The fitted head is put into the model's parameters, checkpointed, and the run is evaluated by the
test evaluation of any run (`test_evaluation`), so its predictions.csv, results.json (with a
`probe` block saying what was fitted and chosen), tables and paired comparisons are those of any
run; `jattn predict`, `slide` and `features` read it as any run.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.preprocessing import StandardScaler

from jattn import data, models
from jattn.core import files
from jattn.core.errors import UserError
from jattn.data import sources, stain
from jattn.evaluation import evaluate, results
from jattn.training import (
  checkpoints,
  features,
  holdout,
  layouts,
  optim,
  parallel,
  test_evaluation,
  workdirs,
)
from jattn.training import state as state_lib
from jattn.training.fold_run import FoldRun

SOLVERS = ("jax", "logistic")
PROBE_FILE = "probe.json"  # in a work dir: what the probe fitted (results.json's `probe`)


def augmentation_off(config: ml_collections.ConfigDict) -> bool:
  a = config.augment
  return (a.flip == "none" and a.rotation == "none"
          and not any(a.get(k, 0.0) for k in ("hed_scale", "hed_shift", "brightness",
                                               "contrast", "saturation")))


def why_not_cached(config: ml_collections.ConfigDict) -> str | None:
  """None when a frozen run trains its head on cached features; else why it does not."""
  mc = config.model
  if not mc.get("freeze", False):
    return "config.model.freeze is off"
  if not augmentation_off(config):
    return "augmentation is on (config.augment)"
  if models.attention_sites(mc):
    return "attention modules are placed (they train before the pooled features)"
  if mc.get("train_last_blocks", 0):
    return "config.model.train_last_blocks trains blocks before the pooled features"
  if config.get("parallel_folds", 1) != 1:
    return "config.parallel_folds > 1"
  if jax.process_count() > 1:
    return "the run spans several processes"
  heads = models.head_params(mc)
  backbone = models.of(mc)
  size = min(config.image_size, models.INIT_SIZE)
  shapes = jax.eval_shape(lambda: models.build_model(mc).init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
  for path in traverse_util.flatten_dict(shapes["params"]):
    if not any(path[:len(h)] == tuple(h) for h in heads) and not backbone.is_pretrained(path):
      return f"{'/'.join(path)} is trained and precedes the pooled features"
  return None


def cached(config: ml_collections.ConfigDict) -> bool:
  return why_not_cached(config) is None


def check(config: ml_collections.ConfigDict) -> None:
  probe = config.get("probe", {})
  solver = probe.get("solver", "jax")
  if solver not in SOLVERS:
    raise UserError(f"--config.probe.solver={solver!r}: use one of {', '.join(SOLVERS)}")
  values = tuple(probe.get("c_values", ()))
  if solver == "logistic" and (not values or not all(
      isinstance(c, (int, float)) and c > 0 for c in values)):
    raise UserError(f"--config.probe.c_values={values}: give one or more positive values of "
                    f"LogisticRegression's C")
  fraction = probe.get("validation_fraction", 0.2)
  if solver == "logistic" and not 0 < fraction <= 0.5:
    raise UserError(f"--config.probe.validation_fraction={fraction}: the fraction of training "
                    f"groups that chooses C, in (0, 0.5]")


# ---------------------------------------------------------------------------------------------
# The two solvers: (kernel [D, K], bias [K], what results.json records).


def fit_jax(config, feats: np.ndarray, labels: np.ndarray, num_classes: int, kernel, bias,
            steps_per_epoch: int) -> tuple[np.ndarray, np.ndarray, dict]:
  """The head trained by the run's optimiser on cached features, from its initialisation."""
  tx = optim.make_optimizer(config, steps_per_epoch)
  params = {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}
  b = config.batch_size

  def loss_fn(p, x, y):
    logits = x @ p["kernel"] + p["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def epoch(carry, x, y):
    def step(carry, batch):
      p, opt_state = carry
      loss, grads = jax.value_and_grad(loss_fn)(p, *batch)
      updates, opt_state = tx.update(grads, opt_state, p)
      return (optax.apply_updates(p, updates), opt_state), loss
    return jax.lax.scan(step, carry, (x, y))

  carry = (params, tx.init(params))
  losses = []
  for e in range(config.num_epochs):
    order = np.random.default_rng([config.seed, e]).permutation(len(feats))
    order = order[:steps_per_epoch * b].reshape(steps_per_epoch, b)
    carry, loss = epoch(carry, jnp.asarray(feats[order]), jnp.asarray(labels[order]))
    losses.append(float(np.mean(loss)))
  p = carry[0]
  return (np.asarray(p["kernel"]), np.asarray(p["bias"]),
          {"solver": "jax", "epochs": config.num_epochs, "steps_per_epoch": steps_per_epoch,
           "batch_size": b, "weight_decay": config.weight_decay,
           "learning_rate": config.learning_rate, "epoch_losses": [round(x, 6) for x in losses],
           "regularisation": "the run's weight decay (config.weight_decay), not chosen"})


def logistic(c: float, max_iter: int, seed: int):
  return LogisticRegression(C=c, max_iter=max_iter, random_state=seed)


def fit_logistic(config, fold_data, feats_of, validation: np.ndarray | None
                 ) -> tuple[np.ndarray, np.ndarray, dict]:
  """C chosen on a validation split of the training groups, then refitted on them all."""
  probe = config.probe
  train = np.asarray(fold_data.train_indices)
  if validation is not None:
    rest, held = train, np.asarray(validation)
    chosen_on = (f"the run's validation split (config.validation_fraction="
                 f"{config.validation_fraction}), never the test split")
  else:
    inner, held = holdout.split(fold_data, probe.validation_fraction, config.seed)
    rest = np.asarray(inner.train_indices)
    chosen_on = (f"a validation split of {probe.validation_fraction} of the training "
                 f"{fold_data.group_unit}s (holdout.split, seed {config.seed}), never the test "
                 f"split")
  classes = np.arange(len(fold_data.classes))
  scores = {}
  for c in probe.c_values:
    scaler = StandardScaler().fit(feats_of(rest))
    model = logistic(c, probe.max_iter, config.seed).fit(
        scaler.transform(feats_of(rest)), fold_data.targets[rest])
    p = model.predict_proba(scaler.transform(feats_of(held)))
    full = np.zeros((len(held), len(classes)))
    full[:, model.classes_] = p
    scores[float(c)] = float(log_loss(fold_data.targets[held], full, labels=classes))
  best = min(scores, key=lambda c: (scores[c], c))  # ties: the stronger regularisation
  x = feats_of(train)
  scaler = StandardScaler().fit(x)
  model = logistic(best, probe.max_iter, config.seed).fit(scaler.transform(x),
                                                         fold_data.targets[train])
  kernel, bias = fold_head(model, scaler, len(classes))
  return kernel, bias, {
      "solver": "logistic", "C": best, "validation_log_loss": {str(c): v
                                                               for c, v in scores.items()},
      "chosen_on": chosen_on, "validation_images": len(held),
      "refit_on": f"the {len(train)} training images", "max_iter": probe.max_iter,
      "standardised": "StandardScaler on the training features, folded into the head",
      "library": "scikit-learn LogisticRegression (lbfgs)"}


def fold_head(model: LogisticRegression, scaler: StandardScaler, num_classes: int
              ) -> tuple[np.ndarray, np.ndarray]:
  """kernel [D, K], bias [K] of a linear layer on raw features whose softmax is `model`'s
  predict_proba of the standardised features."""
  scale = scaler.scale_.astype(np.float64)
  coef = np.asarray(model.coef_, np.float64) / scale  # on raw features
  intercept = np.asarray(model.intercept_, np.float64) - coef @ scaler.mean_
  kernel = np.zeros((coef.shape[1], num_classes))
  bias = np.zeros(num_classes)
  if len(model.classes_) == 2 and coef.shape[0] == 1:  # sigmoid(z) = softmax([0, z])[1]
    kernel[:, model.classes_[1]], bias[model.classes_[1]] = coef[0], intercept[0]
  else:
    kernel[:, model.classes_] = coef.T
    bias[model.classes_] = intercept
  return kernel.astype(np.float32), bias.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The run.


def set_head(model_config, params, kernel: np.ndarray, bias: np.ndarray):
  """`params` with the final linear layer's kernel and bias replaced."""
  (prefix,) = models.head_params(model_config)
  flat = traverse_util.flatten_dict(params)
  for name, value in (("kernel", kernel), ("bias", bias)):
    key = (*prefix, name)
    if flat[key].shape != value.shape:
      raise AssertionError(f"{'/'.join(key)}: {flat[key].shape} vs {value.shape}")
    flat[key] = jnp.asarray(value, flat[key].dtype)
  return traverse_util.unflatten_dict(flat)


def get_head(model_config, params) -> tuple[np.ndarray, np.ndarray]:
  (prefix,) = models.head_params(model_config)
  node = params
  for name in prefix:
    node = node[name]
  return np.asarray(node["kernel"]), np.asarray(node["bias"])


def train_and_evaluate(config: ml_collections.ConfigDict, plan, fold_dirs: dict[int, str],
                       overwrite: bool) -> dict:
  """The probe run of one fold (`train.train_and_evaluate` hands it a cached run, its work dir
  locked): the features computed once, the head fitted, the run evaluated and written."""
  check(config)
  is_main = jax.process_index() == 0
  config = workdirs.as_recorded(config, fold_dirs)
  ((number, workdir),) = fold_dirs.items()
  fold_config = config.copy_and_resolve_references()
  fold_config.fold = number
  fold = FoldRun(fold_config, workdir)
  fold.action = workdirs.action(workdir, fold_config, overwrite)
  results_path = os.path.join(workdir, "results.json")
  if fold.action != "discard" and os.path.exists(results_path):
    fold.results = results.read(results_path, "delete it to evaluate the run again")
    print(f"{workdir} has finished (results.json); not training again.\n"
          f"{evaluate.format_table(fold.results)}")
    return fold.results
  init_rng, _ = jax.random.split(jax.random.key(config.seed))  # as train.py: the same init
  sources.of(config).check_data_dir(config)
  model, variables = state_lib.initial_variables(config, init_rng)
  fold.data = data.load_fold(fold_config)
  if fold_config.get("validation_fraction", 0.0):
    fold.data, fold.validation = holdout.split(fold.data, fold_config.validation_fraction,
                                               fold_config.seed)
  fold.steps_per_epoch = data.steps_per_epoch(fold.data, config.batch_size)
  if fold.steps_per_epoch == 0:
    raise UserError(f"fold {number} has {len(fold.data.train_indices)} training images, fewer "
                    f"than one batch of --config.batch_size={config.batch_size}")
  fold.total_steps = fold.steps_per_epoch * config.num_epochs
  if config.get("stain_norm", "none") != "none":
    fold.stain = stain.fit_reference(fold.data.images, fold.data.train_indices,
                                     what=f"the training images of fold {number}")
  if is_main:
    workdirs.claim(workdir, fold_config, fold.action)
  state_lib.warn_if_from_scratch(config)
  started = time.time()
  state = state_lib.make_state(fold_config, model, variables, fold.data.mean, fold.data.std,
                               fold.steps_per_epoch, fold.stain)
  fold.manager = checkpoints.manager(workdir, config.keep_checkpoints)
  dtype = models.resolve_dtype(config.model.dtype)
  fold.layout = parallel.layout(plan, 0, config.get("num_devices", 0), dtype, 1)
  if is_main:
    fold.layout_history = layouts.record(fold)
  try:
    restored = checkpoints.restore_latest(fold.manager, state)
    record_path = os.path.join(workdir, PROBE_FILE)
    if restored is not None and os.path.exists(record_path):  # killed during the evaluation
      state = restored
      probe_record = files.read_json(record_path, "delete the run's checkpoints to fit it again")
      print(f"{workdir}: the head fitted before (step {int(state.step)}) is evaluated")
    else:
      state, probe_record = _fit(fold_config, fold, state)
      if restored is None:
        checkpoints.save(fold.manager, fold.total_steps, state)
      else:  # a checkpoint without its record: the fit is deterministic, keep the checkpoint's
        state = restored
      if is_main:
        results.write_json(record_path, probe_record)
    fold.step = int(state.step)
  finally:
    checkpoints.wait(fold.manager)
  p_eval = parallel.eval_step(plan, functools.partial(state_lib.eval_step, tta=config.tta))
  fold.results, rows = test_evaluation.evaluate_fold(
      fold_config, parallel.place(plan, state), fold.data, plan, p_eval, fold.validation)
  fold.results["train"] = {"epochs": config.num_epochs, "steps": fold.step,
                           "steps_per_epoch": fold.steps_per_epoch,
                           "wall_time_this_session_s": round(time.time() - started, 1)}
  fold.results["probe"] = probe_record
  fold.results["layout"] = layouts.summary(fold.layout, fold.layout_history)
  if is_main:
    test_evaluation.write(fold, rows)
  return fold.results


def _fit(config, fold: FoldRun, state) -> tuple[state_lib.TrainState, dict]:
  """The head fitted on the cached features of the training images (and, for the logistic
  solver, of the validation split that chooses C)."""
  fd = fold.data
  needed = np.asarray(fd.train_indices)
  if fold.validation is not None:
    needed = np.union1d(needed, fold.validation)
  start = time.perf_counter()
  cache = features.compute(state, fd.images[needed])
  print(f"fold {fd.fold}: features of {len(needed)} images computed once "
        f"({cache.shape[1]} per image, {time.perf_counter() - start:.1f} s); fitting the head "
        f"({config.probe.solver})", flush=True)
  position = {int(i): k for k, i in enumerate(needed)}
  feats_of = lambda idx: cache[[position[int(i)] for i in idx]].astype(np.float64)  # noqa: E731
  if config.probe.solver == "logistic":
    kernel, bias, record = fit_logistic(config, fd, feats_of, fold.validation)
  else:
    train = np.asarray(fd.train_indices)
    kernel, bias = get_head(config.model, state.params)
    kernel, bias, record = fit_jax(config, feats_of(train), fd.targets[train],
                                   len(fd.classes), kernel, bias, fold.steps_per_epoch)
  record.update(features={"dim": int(cache.shape[1]), "images": len(needed),
                          "computed": "once per image, eval mode, no augmentation"})
  state = state.replace(params=set_head(config.model, state.params, kernel, bias),
                        step=jnp.asarray(fold.total_steps, jnp.int32))
  return state, record
