"""One fold of multiple-instance learning: a MIL module (jattn/models/mil.py) trained on the bags
of the bag source (jattn/data/bags.py), evaluated per slide and per patient by the evaluator of
any run, written as any run's results.json and predictions.csv (so `jattn tables` and
`jattn compare` read it).

`train.train_and_evaluate` hands a run here when `config.model.name` is a MIL module. This is a
focused loop of its own, not the image loop (whose batches, parallel layouts and checkpoints are
those of images):

- each step takes `config.batch_size` bags in an order drawn from (`config.seed`, epoch), the
  last partial batch dropped; a batch is padded to a bucket length, the next power of two of its
  longest bag (at least 16), so that at most log2(longest) shapes are compiled;
- during training only, a bag longer than `config.data.bags.train_max_tiles` (0: never) is a
  sample of that many of its tiles without replacement, drawn from (`config.seed`, epoch, slide
  index): recorded in results.json's `mil` block; at test every tile of every bag is used;
- the loss is the slide cross-entropy, for CLAM-SB (1 - c) * it + c * its instance loss
  (c = config.model.mil.instance_weight); the optimiser is the run's (`optim.make_optimizer`:
  Adam, L2 weight decay, the step decay); dropout draws from (`config.seed`, step);
- a checkpoint (`mil_state.msgpack`: parameters, optimiser state, epochs done, their losses)
  is written
  atomically at the end of each epoch; a killed run resumes from the last one and, every draw
  being a function of the seed, the epoch and the step, ends with the figures of an
  uninterrupted run;
- the test bags are predicted one at a time with every tile (padded to their bucket, which
  changes nothing); the evaluator's figures
  (slide level: `image_*`; patient level: the `group_*` votes and the clinical group figures,
  bootstrap intervals over patients) go into results.json; `attention.h5` holds each test
  slide's attention per tile with its coords (the heatmaps' input).
"""

from __future__ import annotations

import functools
import os
import time

import h5py
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import serialization

from jattn import models
from jattn.core import files
from jattn.core.errors import UserError
from jattn.data import bags as bags_source
from jattn.evaluation import evaluate, results
from jattn.models import mil
from jattn.training import optim, workdirs

STATE_FILE = "mil_state.msgpack"
ATTENTION_FILE = "attention.h5"
MIN_BUCKET = 16


def bucket(length: int) -> int:
  """The padded length of a batch whose longest bag has `length` tiles."""
  return max(MIN_BUCKET, 1 << max(0, int(length) - 1).bit_length())


def sample_tiles(n: int, limit: int, seed: int, epoch: int, index: int) -> np.ndarray:
  """The tiles a training step takes of a bag of n: all, or `limit` drawn without replacement
  from (seed, epoch, slide index), in their order."""
  if not limit or n <= limit:
    return np.arange(n)
  return np.sort(np.random.default_rng([seed, epoch, index]).choice(n, limit, replace=False))


def pad(bags: list[np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
  x = np.zeros((len(bags), length, bags[0].shape[1]), np.float32)
  mask = np.zeros((len(bags), length), bool)
  for b, f in enumerate(bags):
    x[b, :len(f)] = f
    mask[b, :len(f)] = True
  return x, mask


def loss_fn(model, config, params, x, mask, labels, rng):
  out = model.apply({"params": params}, x, mask, train=True, rngs={"dropout": rng})
  slide = optax.softmax_cross_entropy_with_integer_labels(out["logits"], labels).mean()
  if isinstance(model, mil.CLAMSB):
    s = mil.settings(config.model)
    inst = mil.clam_instance_loss(out, mask, labels, s["instance_k"], s["subtyping"]).mean()
    c = s["instance_weight"]
    return (1 - c) * slide + c * inst, (slide, inst)
  return slide, (slide, jnp.zeros(()))


def train_and_evaluate(config: ml_collections.ConfigDict, fold_dirs: dict[int, str],
                       overwrite: bool) -> dict:
  if config.data.name != bags_source.NAME:
    raise UserError(f"--config.model.name={config.model.name}: a MIL module trains on bags of "
                    f"tile features; set --config.data.name=bags (docs/mil.md)")
  for field, off, what in (("validation_fraction", 0.0, "temperature scaling"),
                           ("tta", "none", "test-time augmentation"),
                           ("stain_norm", "none", "stain normalisation")):
    if config.get(field, off) != off:
      raise UserError(f"--config.{field}={config.get(field)!r}: {what} is not done on a MIL run "
                      f"(it acts on images; a bag is tile features); use {off!r}")
  if len(fold_dirs) != 1:
    raise UserError("--config.parallel_folds: a MIL run trains one fold at a time; use 1")
  config = workdirs.as_recorded(config, fold_dirs)
  ((number, workdir),) = fold_dirs.items()
  config = config.copy_and_resolve_references()
  config.fold = number
  action = workdirs.action(workdir, config, overwrite)
  results_path = os.path.join(workdir, "results.json")
  if action != "discard" and os.path.exists(results_path):
    done = results.read(results_path, "delete it to evaluate the run again")
    print(f"{workdir} has finished (results.json); not training again.\n"
          f"{evaluate.format_table(done)}")
    return done
  bags = bags_source.load_bags(config)
  fd = bags.fold
  model = models.build_model(config.model)
  params = mil.init_variables(model, jax.random.key(config.seed), bags.dim)["params"]
  b = config.batch_size
  steps_per_epoch = len(fd.train_indices) // b
  if steps_per_epoch == 0:
    raise UserError(f"fold {number} has {len(fd.train_indices)} training slides, fewer than one "
                    f"batch of --config.batch_size={b}")
  tx = optim.make_optimizer(config, steps_per_epoch)
  opt_state = tx.init(params)
  workdirs.claim(workdir, config, action)
  state_path = os.path.join(workdir, STATE_FILE)
  epochs_done, losses = 0, []
  if action != "discard" and os.path.exists(state_path):
    with open(state_path, "rb") as f:
      saved = serialization.msgpack_restore(f.read())
    params = serialization.from_state_dict(params, saved["params"])
    opt_state = serialization.from_state_dict(opt_state, saved["opt_state"])
    epochs_done, losses = int(saved["epochs"]), [float(x) for x in saved["losses"]]
    print(f"{workdir}: resuming after epoch {epochs_done}", flush=True)

  @jax.jit
  def step(params, opt_state, x, mask, labels, rng):
    (loss, parts), grads = jax.value_and_grad(
        functools.partial(loss_fn, model, config), has_aux=True)(params, x, mask, labels, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, parts

  limit = config.data.bags.train_max_tiles
  train = np.asarray(fd.train_indices)
  started, shapes = time.time(), set()
  key = jax.random.key(config.seed)
  for epoch in range(epochs_done, config.num_epochs):
    order = np.random.default_rng([config.seed, epoch]).permutation(train)
    epoch_loss = []
    for s in range(steps_per_epoch):
      chosen = order[s * b:(s + 1) * b]
      batch = []
      for i in chosen:
        f = bags.features(int(i))
        batch.append(f[sample_tiles(len(f), limit, config.seed, epoch, int(i))])
      x, mask = pad(batch, bucket(max(len(f) for f in batch)))
      shapes.add(x.shape)
      rng = jax.random.fold_in(key, epoch * steps_per_epoch + s)
      params, opt_state, loss, _ = step(params, opt_state, jnp.asarray(x), jnp.asarray(mask),
                                        jnp.asarray(fd.targets[chosen]), rng)
      epoch_loss.append(float(loss))
    losses.append(round(float(np.mean(epoch_loss)), 6))
    with files.atomic_path(state_path) as tmp, open(tmp, "wb") as f:
      f.write(serialization.to_bytes({"params": params, "opt_state": opt_state,
                                      "epochs": epoch + 1,
                                      "losses": np.asarray(losses, np.float64)}))
    print(f"fold {number} epoch {epoch + 1}/{config.num_epochs}: loss {losses[-1]:.4f}",
          flush=True)

  predict = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m))
  index = np.asarray(fd.test_indices)
  probs, attention = [], {}
  for i in index:
    f = bags.features(int(i))
    x, mask = pad([f], bucket(len(f)))  # padding changes nothing (tests/test_mil.py)
    out = predict(params, jnp.asarray(x), jnp.asarray(mask))
    probs.append(np.asarray(jax.nn.softmax(out["logits"][0].astype(jnp.float32))))
    attention[fd.file_names[i]] = np.asarray(out["attention"][0, :len(f)])
  probs = np.stack(probs)
  figures = evaluate.evaluate(probs, fd, index, tie_rule=config.tie_rule,
                              bootstrap_resamples=config.get("bootstrap_resamples", 0),
                              bootstrap_seed=config.get("bootstrap_seed", 0),
                              calibration_bins=config.get("calibration", {}).get("bins", 15))
  out = results.build(config, fd, figures)
  out["normalization"] = {"mean": [], "std": [],
                          "computed_on": "none: a MIL run takes tile features as they are"}
  out["mil"] = {"model": config.model.name, "settings": mil.settings(config.model),
                "feature_dim": bags.dim, "features_backbone": bags.backbone,
                "levels": {"image": "slide", "group": fd.group_unit},
                "train_max_tiles": limit,
                "sampling": ("none" if not limit else
                             f"bags over {limit} tiles: {limit} drawn without replacement from "
                             f"(seed {config.seed}, epoch, slide index), training only"),
                "buckets_this_session": sorted({int(s[1]) for s in shapes}),
                "test": "every tile of every test bag, one bag at a time",
                "checkpoint": STATE_FILE,
                "epoch_losses": losses}
  out["train"] = {"epochs": config.num_epochs, "steps": config.num_epochs * steps_per_epoch,
                  "steps_per_epoch": steps_per_epoch,
                  "wall_time_this_session_s": round(time.time() - started, 1)}
  rows = results.prediction_rows(fd, index, probs)
  _write_attention(os.path.join(workdir, ATTENTION_FILE), bags, index, attention)
  files.atomic_write_text(os.path.join(workdir, "predictions.csv"), results.csv_text(rows))
  results.write_json(results_path, out)
  print(f"fold {number} of {config.name}: results in {results_path}\n"
        f"{evaluate.format_table(out)}")
  return out


def _write_attention(path: str, bags, index, attention: dict[str, np.ndarray]) -> None:
  """attention.h5: a group per test slide with `attention` [N] and its tiles' `coords` [N, 2]."""
  with files.atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
    for i in index:
      name = bags.fold.file_names[i]
      g = f.create_group(name)
      g.create_dataset("attention", data=attention[name])
      g.create_dataset("coords", data=bags.coords(int(i)))
