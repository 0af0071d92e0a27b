"""`--config.steps_per_dispatch=N`: N training steps in one `lax.scan`, against single steps; where
the loop cuts dispatches; a run of N = 4 killed mid-run resumes to the uninterrupted figures."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest

from jattn.core.errors import UserError
from jattn.training import dispatch, optim, parallel, train, validate
from jattn.training import state as state_lib
from tests.runs import DEMO, REPO, tiny_config, tiny_overrides

# The runs here: the tests' tiny demo run (tests/runs.py) at a learning rate at which Adam's
# amplification of rounding (README, Reproducibility) stays below the tolerances, halved after
# each epoch (so that a dispatch's steps must each read their rate from the state).
SETTINGS = dict(learning_rate=1e-6, lr_decay_every=1, checkpoint_every_steps=8, log_every_steps=1,
                bootstrap_resamples=0)


def _tiny(tmp_path, **settings):
  """The tiny run's state and step as the training loop steps them: its compiled steps are those
  of the runs below (XLA's persistent cache)."""
  config = tiny_config(str(tmp_path), str(tmp_path), **{**SETTINGS, **settings})
  model, variables = state_lib.initial_variables(config, jax.random.key(0))
  state = state_lib.make_state(config, model, variables, [120.0] * 3, [50.0] * 3, 2)
  step = functools.partial(train.train_step, augment=config.augment.to_dict(),
                           learning_rate_fn=functools.partial(optim.learning_rate_schedule, config))
  rng = np.random.default_rng(0)
  batches = [{"image": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
              "label": rng.integers(0, 2, (16,)).astype(np.int32)} for _ in range(4)]
  return config, parallel.make_plan(config), state, step, batches


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_steps_in_one_scan_equal_single_steps(tmp_path):
  """Four steps as one dispatch against four plain steps (the same batches, rng and schedule):
  equal to rounding, not bit for bit: XLA's CPU backend orders the convolution weight gradients'
  sums differently inside a loop, and Adam moves a weight whose near-zero gradient changes sign by
  up to the learning rate the other way (README, Reproducibility). Measured: losses within 6e-8,
  parameters within 6e-7 of their 3e-6 moves; tolerances 1e-6 and 2e-6. Dispatches
  of 4 and of 1 x 4 steps are bit-identical (losses, parameters and Adam's moments): how a run is
  cut into dispatches (at epoch ends, checkpoints, a resume) changes nothing. With 2 steps per
  epoch (in the state) and the rate halved each epoch, the steps apply 1e-6, 1e-6, 5e-7, 5e-7."""
  config, plan, state, step, batches = _tiny(tmp_path)
  rng, active = jax.random.key(7), np.ones(1, bool)
  plain = parallel.train_step(plan, step)
  single, single_losses, single_rates = jax.tree_util.tree_map(np.array, state), [], []
  for b in batches:
    single, m = plain(single, parallel.batch(plan, [b], 16), rng, active)
    single_losses.append(float(m["loss"]))
    single_rates.append(float(m["learning_rate"]))
  np.testing.assert_allclose(single_rates, [1e-6, 1e-6, 5e-7, 5e-7], rtol=1e-6)

  scan = parallel.train_steps(plan, step)
  cuts = {}
  for cut in ((4,), (1, 1, 1, 1)):
    s, losses, rates, i = jax.tree_util.tree_map(np.array, state), [], [], 0
    for n in cut:
      s, m = scan(s, parallel.batches(plan, [[b] for b in batches[i:i + n]], 16), rng, active)
      assert m["loss"].shape == m["learning_rate"].shape == (n,)
      losses += [float(v) for v in m["loss"]]
      i += n
      rates += [float(v) for v in m["learning_rate"]]
    cuts[cut] = (s, losses)
    assert int(s.step) == 4 and rates == single_rates
  assert cuts[(4,)][1][0] == single_losses[0]  # before any update: the same forward pass
  np.testing.assert_allclose(cuts[(4,)][1], single_losses, rtol=0, atol=1e-6)
  for a, b in zip(_leaves(cuts[(4,)][0].params), _leaves(single.params), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-6)
  moved = max(np.abs(a - b).max() for a, b in zip(_leaves(single.params), _leaves(state.params),
                                                   strict=True))
  assert moved > 2 * config.learning_rate  # the steps did train
  assert cuts[(1, 1, 1, 1)][1] == cuts[(4,)][1]
  for a, b in zip(_leaves(cuts[(1, 1, 1, 1)][0]), _leaves(cuts[(4,)][0]), strict=True):
    np.testing.assert_array_equal(a, b)


def test_a_scanned_step_at_the_demo_rate_equals_a_single_step_to_rounding(tmp_path):
  """The bound that holds at any learning rate: the first step of a dispatch, at the demo's 1e-3,
  has the single step's loss bit for bit and moves every parameter as the single step does to
  within a hundredth of the rate (Adam moves each weight by about the rate, so a gradient whose
  sign differed would put that weight 2e-3 off; a near-zero gradient's move is about its size, so
  its rounding shows: measured 3.5e-6 here, 2.1e-7 on the demo). The gradients inside the scan
  are summed in another order, so from the next step on Adam amplifies the difference (README,
  Reproducibility)."""
  config, plan, state, step, batches = _tiny(tmp_path, learning_rate=1e-3, lr_decay_every=4)
  rng, active = jax.random.key(7), np.ones(1, bool)
  single, m1 = parallel.train_step(plan, step)(jax.tree_util.tree_map(np.array, state),
                                               parallel.batch(plan, [batches[0]], 16), rng, active)
  scanned, mn = parallel.train_steps(plan, step)(jax.tree_util.tree_map(np.array, state),
                                                 parallel.batches(plan, [[batches[0]]], 16), rng,
                                                 active)
  assert float(mn["loss"][0]) == float(m1["loss"])
  moves = [np.abs(a - b).max() for a, b in zip(_leaves(single.params), _leaves(state.params),
                                                strict=True)]
  assert np.median(moves) > 0.5 * config.learning_rate  # the leaves moved by about the rate
  for a, b in zip(_leaves(scanned.params), _leaves(single.params), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=config.learning_rate / 100)


@dataclasses.dataclass
class _Fold:
  steps_per_epoch: int
  total_steps: int
  step: int
  config: types.SimpleNamespace


def _sizes(folds, n):
  return [(tuple(active), size) for active, size in dispatch.sizes(folds, n)]


def test_dispatches_are_cut_at_epoch_ends_and_checkpoints():
  """14 steps per epoch, 2 epochs, a checkpoint every 8 steps, N = 4 (by hand): 4, 4 to the
  checkpoint at 8; 4 to 12; single steps to 13, 14 (epoch end), 15, 16 (checkpoint); then 4 to the
  checkpoint at 24 and 4 to the end. A resume from step 14 cuts as the uninterrupted run did
  from there; two parallel folds are cut where either saves, and a finished one rests."""
  every8 = types.SimpleNamespace(checkpoint_every_steps=8)
  fold = _Fold(14, 28, 0, every8)
  assert [s for _, s in _sizes([fold], 4)] == [4, 4, 4, 1, 1, 1, 1, 4, 4, 4]
  assert [s for _, s in _sizes([dataclasses.replace(fold, step=14)], 4)] == [1, 1, 4, 4, 4]
  assert [s for _, s in _sizes([fold], 1)] == [1] * 28
  folds = [_Fold(6, 12, 0, types.SimpleNamespace(checkpoint_every_steps=0)),
           _Fold(4, 8, 0, types.SimpleNamespace(checkpoint_every_steps=0))]
  # Saves at 4, 6, 8 (end of fold 2), 12 (end of fold 1).
  assert _sizes(folds, 4) == [((True, True), 4), ((True, True), 1), ((True, True), 1),
                              ((True, True), 1), ((True, True), 1), ((True, False), 4)]


def test_a_change_of_steps_per_dispatch_is_a_layout_change():
  """A layout recorded before steps_per_dispatch existed was 1 step per dispatch: resuming it
  with 1 changes nothing, with 4 is named like another device count."""
  old = {"platform": "cpu", "devices": ["cpu:0"], "dtype": "float32", "parallel_folds": 1}
  assert parallel.layout_changes(old, {**old, "steps_per_dispatch": 1}) == []
  assert parallel.layout_changes(old, {**old, "steps_per_dispatch": 4}) == [
      "steps_per_dispatch 1 -> 4"]


def test_steps_per_dispatch_must_be_a_positive_integer(tmp_path):
  config = tiny_config(str(tmp_path), str(tmp_path), steps_per_dispatch=0)
  with pytest.raises(UserError, match=r"^--config.steps_per_dispatch=0: the training steps run in "
                                      r"one dispatch, at least 1 \(1: one at a time\)$"):
    validate.validate_config(config)


def _json(path):
  with open(path) as f:
    return json.load(f)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [(m["step"], m["loss"]) for m in map(json.loads, f)]


@pytest.mark.slow
def test_killed_run_of_four_steps_per_dispatch_resumes_to_the_uninterrupted_figures(
    synthetic_tree, prepared_dir, tmp_path):
  """The tiny run with N = 4 and a checkpoint every 8 steps: uninterrupted, it logs every step's
  loss and records steps_per_dispatch 4 in its layout; killed with SIGKILL after its checkpoint
  at step 8 (in a later dispatch) and resumed, it ends with the uninterrupted run's predictions,
  figures and losses, bit for bit."""
  settings = dict(SETTINGS, steps_per_dispatch=4)
  straight = str(tmp_path / "straight")
  results = train.train_and_evaluate(
      tiny_config(synthetic_tree[0], prepared_dir, **settings), straight)
  assert results["layout"]["steps_per_dispatch"] == 4 and results["layout"]["one_layout"]
  losses = _losses(straight)
  assert [s for s, _ in losses] == list(range(1, results["train"]["steps"] + 1))

  workdir = str(tmp_path / "killed")
  overrides = tiny_overrides(synthetic_tree[0], prepared_dir, **settings)
  proc = subprocess.Popen([sys.executable, "-m", "jattn.main", "--config", DEMO, "--workdir",
                           workdir, *[f"--config.{o}" for o in overrides]],
                          cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          env=dict(os.environ, PYTHONPATH=REPO))
  checkpoints = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(os.path.join(checkpoints, "8")):
      break
    time.sleep(0.02)
  assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()}"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(workdir, "results.json"))

  resumed = train.train_and_evaluate(
      tiny_config(synthetic_tree[0], prepared_dir, **settings), workdir)
  for key in ("image_accuracy", "group_accuracy", "confusion_matrix", "clinical"):
    assert resumed[key] == results[key], key
  with open(os.path.join(straight, "predictions.csv")) as a, open(
      os.path.join(workdir, "predictions.csv")) as b:
    assert a.read() == b.read()
  assert _losses(workdir) == losses
