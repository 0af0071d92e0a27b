"""The optimiser against PyTorch, the learning-rate schedule, the train step, pretrained weights."""

from __future__ import annotations

import contextlib
import io
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from configs import default
from jattn import models
from jattn.core.errors import UserError
from jattn.inference import runs
from jattn.training import optim, train
from jattn.training import state as state_lib


def _config(**kw):
  config = default.get_config()
  config.update(kw)
  return config


def test_optimizer_matches_torch_adam_with_weight_decay():
  """Adam + L2 in the gradient + step decay, against torch.optim.Adam + MultiStepLR, to 1e-6."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 5)).astype(np.float32)
  y = rng.normal(size=(16, 3)).astype(np.float32)
  w0 = rng.normal(size=(5, 3)).astype(np.float32)
  b0 = rng.normal(size=(3,)).astype(np.float32)
  steps_per_epoch, epochs = 2, 4
  config = _config(learning_rate=1e-2, weight_decay=0.1, lr_decay_every=1)

  tx = optim.make_optimizer(config, steps_per_epoch)
  params = {"w": jnp.asarray(w0), "b": jnp.asarray(b0)}
  opt_state = tx.init(params)
  loss = lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)  # noqa: E731
  for _ in range(steps_per_epoch * epochs):
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    params = optax.apply_updates(params, updates)

  tw, tb = torch.tensor(w0, requires_grad=True), torch.tensor(b0, requires_grad=True)
  opt = torch.optim.Adam([tw, tb], lr=1e-2, weight_decay=0.1)
  sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # stepped once per epoch
  for _ in range(epochs):
    for _ in range(steps_per_epoch):
      opt.zero_grad()
      torch.mean((torch.tensor(x) @ tw + tb - torch.tensor(y)) ** 2).backward()
      opt.step()
    sched.step()
  np.testing.assert_allclose(params["w"], tw.detach().numpy(), atol=1e-6, rtol=0)
  np.testing.assert_allclose(params["b"], tb.detach().numpy(), atol=1e-6, rtol=0)
  assert np.abs(np.asarray(params["w"]) - w0).max() > 1e-2  # the parameters did move


def test_learning_rate_schedule():
  every = optim.learning_rate_schedule(_config(learning_rate=1.0, lr_decay_every=30), 10)
  assert [float(every(s)) for s in (0, 299, 300, 599, 600, 1299)] == [1, 1, .5, .5, .25, .125 / 2]
  milestones = optim.learning_rate_schedule(_config(learning_rate=1.0, lr_milestones=(30, 60)), 10)
  assert [float(milestones(s)) for s in (299, 300, 600, 1299)] == [1, .5, .25, .25]


def test_preprocess_divides_by_the_std():
  """Guards against a wrong input normalisation (e.g. no division by the std) in training,
  evaluation, predict and inspect: each channel of mean + k * std comes out as k."""
  state = types.SimpleNamespace(image_mean=jnp.array([100.0, 120.0, 140.0]),
                                image_std=jnp.array([20.0, 30.0, 50.0]))
  images = np.stack([np.full((2, 2, 3), v, np.uint8) for v in
                     ([120, 150, 190], [100, 120, 140], [60, 60, 40])])  # k = 1, 0, -2
  out = np.asarray(state_lib.preprocess(state, jnp.asarray(images)))
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[0], 1.0)
  np.testing.assert_allclose(out[1], 0.0)
  np.testing.assert_allclose(out[2], -2.0)


def _fresh_state(config):
  """A fresh state as the training loop makes one: weights merged, then the fold's statistics."""
  model, variables = state_lib.initial_variables(config, jax.random.key(0))
  state_lib.warn_if_from_scratch(config)
  return state_lib.make_state(config, model, variables, [120.0] * 3, [50.0] * 3, 10)


def _tiny_state(batch_norm=False, **kw):
  config = _config(image_size=32, pretrained="")
  config.model.update(dict(width=0.125, classifier_width=16, batch_norm=batch_norm,
                           c_attn_blocks=(1,), s_attn_blocks=(3,), pool_size=1, dropout_rate=0.0))
  config.update(kw)
  err = io.StringIO()
  with contextlib.redirect_stderr(err):  # the warning is one line on stderr, not a UserWarning
    state = _fresh_state(config)
  assert err.getvalue() == ("jattn: warning: config.pretrained is empty: training from scratch, "
                            "not fine-tuning ImageNet weights as the paper does\n")
  return config, state


def _fixed_batch_losses(state, steps):
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
           "label": np.array([0, 1] * 4, np.int32)}
  step = jax.jit(lambda s, b, r: train.train_step(s, b, r, augment=dict(flip="none",
                                                                          rotation="none")))
  losses = []
  for i in range(steps):
    state, metrics = step(state, batch, jax.random.key(i))
    losses.append(float(metrics["loss"]))  # the loss before this step's update
  return state, losses


def test_train_step_lowers_the_loss_on_a_fixed_batch():
  """Plain VGG: one step of the paper's optimiser lowers the loss and moves every parameter."""
  _, state = _tiny_state(learning_rate=1e-4)
  before = jax.tree_util.tree_map(np.array, state.params)
  state, losses = _fixed_batch_losses(state, 2)
  assert int(state.step) == 2 and losses[1] < losses[0], losses
  moved = jax.tree_util.tree_map(lambda a, b: np.abs(np.asarray(a) - b).max(), state.params, before)
  assert min(jax.tree_util.tree_leaves(moved)) > 0  # attention and classifier included


def test_train_steps_fit_a_fixed_batch_with_batch_norm():
  _, state = _tiny_state(batch_norm=True, learning_rate=3e-3)
  state, losses = _fixed_batch_losses(state, 10)
  assert losses[1] < losses[0] and losses[-1] < losses[0] - 0.01, losses
  assert not np.allclose(state.batch_stats["block1"]["bn1"]["mean"], 0.0)  # running stats move


def test_eval_step_is_deterministic_probabilities():
  _, state = _tiny_state()
  images = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
  probs = jax.jit(state_lib.eval_step)(state, {"image": images})["probs"]
  np.testing.assert_allclose(np.sum(probs, -1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(probs, runs.predict_probs(state, images, batch_size=2))


def test_merge_pretrained_backbone_only():
  config, state = _tiny_state()
  variables = {"params": state.params}
  pretrained = jax.tree_util.tree_map(lambda x: np.full(x.shape, 7.0, np.float32), variables)
  merged = models.merge_pretrained(config.model, variables, pretrained, "backbone")
  p = merged["params"]
  assert np.all(p["block2"]["conv1"]["kernel"] == 7.0) and np.all(p["block5"]["conv4"]["bias"] == 7)
  np.testing.assert_array_equal(p["block1"]["c_attn"]["m_q"]["kernel"],
                                state.params["block1"]["c_attn"]["m_q"]["kernel"])
  np.testing.assert_array_equal(p["classifier"]["head"]["kernel"],
                                state.params["classifier"]["head"]["kernel"])
  everything = models.merge_pretrained(config.model, variables, pretrained, "all")["params"]
  assert np.all(everything["classifier"]["head"]["kernel"] == 7.0)
  del pretrained["params"]["block3"]["conv2"]
  with pytest.raises(UserError, match="no weights for params/block3/conv2/bias"):
    models.merge_pretrained(config.model, variables, pretrained, "backbone")


def test_a_fresh_state_fine_tunes_converted_weights(tmp_path):
  """config.pretrained points at `jattn.models.weights` output: backbone from it, the rest from
  init."""
  from jattn.models import weights as convert

  config, scratch = _tiny_state()
  converted = jax.tree_util.tree_map(lambda x: np.full(x.shape, 0.5, np.float32),
                                     {"params": scratch.params})
  del converted["params"]["block1"]["c_attn"]  # a torchvision file holds no attention
  convert.save_weights(converted, str(tmp_path / "w"), {"source": "test"})
  config.pretrained = str(tmp_path / "w")
  state = _fresh_state(config)
  assert np.all(state.params["block4"]["conv3"]["kernel"] == 0.5)
  np.testing.assert_array_equal(state.params["block1"]["c_attn"]["m_v"]["kernel"],
                                scratch.params["block1"]["c_attn"]["m_v"]["kernel"])
  np.testing.assert_array_equal(state.params["classifier"]["fc1"]["kernel"],
                                scratch.params["classifier"]["fc1"]["kernel"])
