"""Dihedral test-time augmentation: the mean of 8 views, exact for a rotation-invariant model."""

from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from jattn import models
from jattn.core.errors import UserError
from jattn.inference import runs
from jattn.training import parallel, test_evaluation, validate
from jattn.training import state as state_lib
from tests.runs import tiny_config


def _state(symmetric: bool):
  """A tiny demo 'Ours' model (C-Attn, S-Attn, batch norm, 1x1 pool) at 32x32, random weights;
  with `symmetric`, every conv kernel is averaged over its 8 flips/turns, which makes the whole
  model invariant to flipping and turning its input (convs, aligned pools and attention over
  positions all commute with them; the global pool forgets where things were)."""
  config = tiny_config("unused", "unused")
  model = models.build_model(config.model)
  variables = models.init_variables(model, jax.random.key(0), config.image_size)
  flat = traverse_util.flatten_dict(variables)
  for key, value in flat.items():
    value = np.asarray(value)
    if "classifier" in key and key[-1] == "kernel":
      value = value * 100  # initial logits are ~1e-6: make the classes' probabilities differ
    if symmetric and value.ndim == 4:  # [kh, kw, in, out]
      value = np.mean([np.rot90(np.flip(value, 1) if i >= 4 else value, i % 4, axes=(0, 1))
                       for i in range(8)], axis=0)
    flat[key] = value
  variables = traverse_util.unflatten_dict(flat)
  return state_lib.make_state(config, model, variables, np.full(3, 128.0), np.full(3, 60.0), 1)


def _images(n=3):
  return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3)).astype(np.uint8)


_EVAL = jax.jit(state_lib.eval_step, static_argnames="tta")


def _probs(state, images, tta="none"):
  return np.asarray(_EVAL(state, {"image": images}, tta=tta)["probs"])


def test_dihedral_tta_is_the_mean_of_the_8_views_by_hand():
  """Guards the views and the averaging: eval_step(tta='dihedral') equals the mean of the
  probabilities of the 8 flipped/turned images made with NumPy (probabilities, not logits)."""
  state, images = _state(symmetric=False), _images()
  views = [np.rot90(np.flip(images, 2) if i >= 4 else images, i % 4, axes=(1, 2))
           for i in range(8)]
  by_view = np.stack([_probs(state, np.ascontiguousarray(v)) for v in views])
  assert np.ptp(by_view, axis=0).max() > 1e-3  # the model is not invariant: views differ
  np.testing.assert_allclose(_probs(state, images, "dihedral"), by_view.mean(0), atol=1e-6)


def test_dihedral_tta_changes_nothing_for_an_invariant_model():
  """Guards against TTA that transforms something other than the image (or transforms it
  wrongly): for a model invariant by construction, it equals plain evaluation."""
  state, images = _state(symmetric=True), _images()
  plain = _probs(state, images)
  assert np.ptp(plain[:, 1]) > 1e-3  # the model does tell the images apart
  np.testing.assert_allclose(_probs(state, images, "dihedral"), plain, atol=1e-5)
  turned = np.ascontiguousarray(np.rot90(np.flip(images, 2), 1, axes=(1, 2)))
  np.testing.assert_allclose(_probs(state, turned), plain, atol=1e-5)  # invariant indeed


def test_evaluation_records_tta(trained_run):
  """Guards results.json and predict: a fold evaluated with config.tta records it, and its
  predictions are predict_probs' averaged probabilities."""
  with open(os.path.join(trained_run, "results.json")) as f:
    assert json.load(f)["tta"] == "none"
  config, state = runs.restore(trained_run)
  config.tta = "dihedral"
  config.eval_batch_size = 32  # predict_probs' batch: one compiled program serves both
  from jattn.data import load_fold

  data = load_fold(config)
  plan = parallel.make_plan(config)
  p_eval = parallel.eval_step(plan, functools.partial(state_lib.eval_step, tta="dihedral"))
  results, rows = test_evaluation.evaluate_fold(config, state, data, plan, p_eval)
  assert results["tta"] == "dihedral" and results["config"]["tta"] == "dihedral"
  images = np.asarray(data.images)[data.test_indices]
  want = runs.predict_probs(state, images, tta="dihedral")[:, 1]
  np.testing.assert_allclose([float(r["prob_malignant"]) for r in rows], want, atol=2e-6)


def test_unknown_tta_is_refused():
  """Guards the config check: only 'none' and 'dihedral' exist."""
  config = tiny_config("unused", "unused", tta="flips")
  with pytest.raises(UserError, match=r"--config.tta='flips': use one of \('none', "):
    validate.validate_config(config)
