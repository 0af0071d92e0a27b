"""Parallel folds (jattn.training.parallel): K folds in one program give what K separate runs give.

The folds here differ in size (fold 2 loses 8 patients' training images to its test set), so they
have different steps per epoch, epoch boundaries and learning-rate decays.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from jattn.core.errors import UserError
from jattn.inference import runs
from jattn.training import optim, parallel, train
from jattn.training import state as state_lib
from tests.runs import DEMO, REPO, tiny_config, tiny_overrides

# Both runs, separate and parallel: one loss logged per step, the LR halved every epoch, small
# enough that rounding differences stay at rounding level. Batches of 32: folds 1 and 2 have 7
# and 6 steps per epoch.
SETTINGS = dict(log_every_steps=1, lr_decay_every=1, num_epochs=2, batch_size=32,
                learning_rate=1e-6)


def _uneven_folds(data_dir: str, path: str) -> str:
  """The tree's Folds.csv with 8 patients of fold 2 moved from its training to its test set."""
  with open(os.path.join(data_dir, "Folds.csv")) as f:
    rows = list(csv.DictReader(f))
  patient = lambda row: row["filename"].split("/")[-3]  # noqa: E731
  moved = sorted({patient(r) for r in rows if r["fold"] == "2" and r["grp"] == "train"})[:8]
  for r in rows:
    if r["fold"] == "2" and patient(r) in moved:
      r["grp"] = "test"
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  return path


@pytest.fixture(scope="module")
def runs_dir(synthetic_tree, prepared_dir, tmp_path_factory):
  """Folds 1 and 2 trained as two separate runs and as one parallel run (K=2)."""
  out = tmp_path_factory.mktemp("parallel")
  folds = _uneven_folds(synthetic_tree[0], str(out / "Folds.csv"))
  for fold in (1, 2):
    config = tiny_config(synthetic_tree[0], prepared_dir, fold=fold, folds=folds, **SETTINGS)
    train.train_and_evaluate(config, str(out / "separate" / f"fold{fold}"))
  config = tiny_config(synthetic_tree[0], prepared_dir, parallel_folds=2, folds=folds, **SETTINGS)
  stack = parallel.stack

  def keep_steps_per_epoch(plan, states):  # of the stacked state the parallel run steps
    stacked = stack(plan, states)
    (out / "stacked_steps_per_epoch.json").write_text(
        json.dumps(np.asarray(stacked.steps_per_epoch).tolist()))
    return stacked

  with pytest.MonkeyPatch.context() as m:
    m.setattr(parallel, "stack", keep_steps_per_epoch)
    train.train_and_evaluate(config, str(out / "parallel" / "fold{fold}"))
  return out


def test_fold_train_step_steps_each_fold_as_its_own_run():
  """Two stacked folds with 2 and 3 steps per epoch, the second finishing after 4 steps: each
  fold's weights, optimiser state and rng are exactly those of its own unvmapped steps, and a
  finished fold is left alone. Guards the per-fold learning rate (halved every epoch of that
  fold) and the mask. Elementwise maths only, so vmapping cannot change the rounding."""
  config = default.get_config()
  config.update(learning_rate=0.1, lr_decay_every=1)
  tx = optim.make_optimizer(config)

  def make_state(w, steps_per_epoch):
    return state_lib.TrainState.create(apply_fn=None, params={"w": jnp.asarray(w, jnp.float32)},
                                       tx=tx,
                                   steps_per_epoch=jnp.asarray(steps_per_epoch, jnp.int32))

  def step_fn(state, batch, rng):
    noise = jax.random.normal(rng, state.params["w"].shape)
    grads = jax.grad(lambda p: jnp.sum(p["w"] * batch["x"] + noise * p["w"]))(state.params)
    return state.apply_gradients(grads=grads), {"noise": noise}

  train_rng = jax.random.key(3)
  xs = np.random.default_rng(0).normal(size=(6, 2, 3)).astype(np.float32)  # [steps, folds, 3]
  separate = [make_state([1.0, -2.0, 0.5], 2), make_state([0.3, 0.2, -1.0], 3)]
  plain = jax.jit(lambda s, b: step_fn(s, b, jax.random.fold_in(train_rng, s.step)))
  stacked = parallel.stack_folds(separate)
  step = parallel.fold_train_step(step_fn)
  for t in range(6):
    active = np.array([True, t < 4])
    stacked, metrics = step(stacked, {"x": xs[t]}, train_rng, active)
    for k in range(2):
      if active[k]:
        separate[k], expected = plain(separate[k], {"x": xs[t, k]})
        np.testing.assert_array_equal(metrics["noise"][k], expected["noise"])
  for k, state in enumerate(separate):
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(stacked),
                    strict=True):
      np.testing.assert_array_equal(a, b[k])
  assert stacked.step.tolist() == [6, 4]
  lr = [optim.learning_rate_schedule(config, n)(s) for n, s in ((2, 5), (3, 3))]
  assert [float(x) for x in lr] == [0.1 * 0.5 ** 2, 0.1 * 0.5]  # the folds' last LRs differ


def _metrics(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _json(path) -> dict:
  with open(path) as f:
    return json.load(f)


def test_parallel_folds_take_the_steps_of_separate_runs(runs_dir):
  """Each fold keeps its own data, normalisation, rng and steps per epoch; guards against folds
  that share a stream, statistics or a step counter. Losses agree to 1e-5 at every step: vmapped
  convs round differently, and Adam's early updates (±lr wherever a gradient is at the rounding
  level, e.g. conv biases before batch norm) carry that into the weights; at the demo's learning
  rate of 1e-3 the difference reaches 1e-5 by the third step, hence 1e-6 here."""
  lengths = {}
  for fold in (1, 2):
    separate = _metrics(runs_dir / "separate" / f"fold{fold}")
    parallel = _metrics(runs_dir / "parallel" / f"fold{fold}")
    assert [m["step"] for m in parallel] == [m["step"] for m in separate]
    assert [m["learning_rate"] for m in parallel] == [m["learning_rate"] for m in separate]
    np.testing.assert_allclose([m["loss"] for m in parallel], [m["loss"] for m in separate],
                               rtol=0, atol=1e-5)
    lengths[fold] = len(parallel)
    sep_config = _json(runs_dir / "separate" / f"fold{fold}" / "config.json")
    par_config = _json(runs_dir / "parallel" / f"fold{fold}" / "config.json")
    assert par_config["fold"] == fold
    assert {k: v for k, v in par_config.items() if k != "parallel_folds"} == {
        k: v for k, v in sep_config.items() if k != "parallel_folds"}
    sep_results = _json(runs_dir / "separate" / f"fold{fold}" / "results.json")
    par_results = _json(runs_dir / "parallel" / f"fold{fold}" / "results.json")
    for key in ("fold", "normalization", "data"):
      assert par_results[key] == sep_results[key], key
    assert par_results["train"]["steps"] == sep_results["train"]["steps"]
    assert sorted(os.listdir(runs_dir / "parallel" / f"fold{fold}" / "checkpoints")) == sorted(
        os.listdir(runs_dir / "separate" / f"fold{fold}" / "checkpoints"))
  assert lengths == {1: 14, 2: 12}  # 7 and 6 steps per epoch: the folds really differ


def test_each_fold_decays_its_learning_rate_at_its_own_epoch_ends(runs_dir):
  """Guards against the folds' stacked state holding one fold's steps_per_epoch for all (fold 2
  would halve its learning rate a step late): the stacked state holds each fold's training images
  (counted in Folds.csv) // 32, and the learning rate each step reports, read on the device from
  the state the optimiser uses, is 1e-6 halved at each of that fold's epoch ends."""
  with open(runs_dir / "Folds.csv") as f:
    rows = list(csv.DictReader(f))
  expected = [sum(r["fold"] == str(k) and r["grp"] == "train" for r in rows) // 32 for k in (1, 2)]
  assert expected == [7, 6]
  assert _json(runs_dir / "stacked_steps_per_epoch.json") == expected
  for fold, steps_per_epoch in zip((1, 2), expected, strict=True):
    for kind in ("parallel", "separate"):
      logged = [(m["step"], m["learning_rate"]) for m in _metrics(runs_dir / kind / f"fold{fold}")]
      assert logged == [(s, pytest.approx(1e-6 * 0.5 ** ((s - 1) // steps_per_epoch), rel=1e-6))
                        for s in range(1, 2 * steps_per_epoch + 1)], (kind, fold)


def test_parallel_predictions_are_those_of_the_checkpoint(runs_dir):
  """predictions.csv of each parallel fold = a separate evaluation of that fold's checkpoint;
  guards against evaluating the wrong fold's slice of the stacked state."""
  for fold in (1, 2):
    workdir = runs_dir / "parallel" / f"fold{fold}"
    config, state = runs.restore(str(workdir))
    assert config.fold == fold
    with open(workdir / "predictions.csv") as f:
      rows = list(csv.DictReader(f))
    from jattn import data  # the fold's test images, in the run's order
    fold_data = data.load_fold(config)
    index = {name: i for i, name in enumerate(fold_data.file_names)}
    images = np.asarray(fold_data.images)[[index[r["file_name"]] for r in rows]]
    probs = runs.predict_probs(state, images)
    np.testing.assert_allclose([float(r["prob_malignant"]) for r in rows], probs[:, 1],
                               rtol=0, atol=1e-6)
    assert len(rows) == len(fold_data.test_indices)


def test_killed_parallel_run_resumes_to_the_same_figures(runs_dir, synthetic_tree, prepared_dir,
                                                         tmp_path):
  """A parallel run killed with SIGKILL after a checkpoint and resumed ends exactly as the
  uninterrupted parallel run; guards against a fold restoring another's checkpoint or step."""
  folds = str(runs_dir / "Folds.csv")
  settings = dict(SETTINGS, folds=folds, parallel_folds=2, checkpoint_every_steps=3)
  workdir = str(tmp_path / "fold{fold}")
  overrides = tiny_overrides(synthetic_tree[0], prepared_dir, **settings)
  proc = subprocess.Popen(
      [sys.executable, "-m", "jattn.main", "--config", DEMO, "--workdir", workdir,
       *[f"--config.{o}" for o in overrides]],
      cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
      env=dict(os.environ, PYTHONPATH=REPO))
  checkpoints = [tmp_path / f"fold{fold}" / "checkpoints" for fold in (1, 2)]
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if all(d.is_dir() and any(s.name.isdigit() for s in d.iterdir()) for d in checkpoints):
      break
    time.sleep(0.02)
  assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()}"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not any((tmp_path / f"fold{fold}" / "results.json").exists() for fold in (1, 2))

  config = tiny_config(synthetic_tree[0], prepared_dir, **settings)
  resumed = train.train_and_evaluate(config, workdir)
  for fold, results in zip((1, 2), resumed, strict=True):
    straight = _json(runs_dir / "parallel" / f"fold{fold}" / "results.json")
    for key in ("fold", "image_accuracy", "group_accuracy", "confusion_matrix"):
      assert results[key] == straight[key], key
    with open(runs_dir / "parallel" / f"fold{fold}" / "predictions.csv") as a, open(
        tmp_path / f"fold{fold}" / "predictions.csv") as b:
      assert a.read() == b.read()
    assert [m["loss"] for m in _metrics(tmp_path / f"fold{fold}")] == [
        m["loss"] for m in _metrics(runs_dir / "parallel" / f"fold{fold}")]


@pytest.mark.parametrize("settings,workdir,message", [
    (dict(fold=4, parallel_folds=3), "w/fold{fold}",
     r"^--config.parallel_folds=3 with --config.fold=4: folds 4..6 do not exist \(folds are "
     r"numbered 1 to 5\); use at most 2$"),
    (dict(parallel_folds=2), "w", r"^--workdir .*w has no \{fold\}, but --config.parallel_folds=2 "
     r"writes one work dir per fold; use e.g. --workdir .*w/fold\{fold\}$"),
])
def test_bad_parallel_settings_are_one_line(settings, workdir, message, synthetic_tree,
                                            prepared_dir, tmp_path):
  """Folds past 5 and one work dir for several folds are refused before anything is written."""
  config = tiny_config(synthetic_tree[0], prepared_dir, **settings)
  with pytest.raises(UserError, match=message):
    train.train_and_evaluate(config, str(tmp_path / workdir))
  assert not os.listdir(tmp_path)


# four_devices (tests/conftest.py): the runs of one process that sees 4 CPU devices.


def test_batch_sharded_over_four_devices_gives_the_one_device_figures(four_devices):
  """Data parallelism changes only the order of the batch reductions; guards against a batch
  that is split instead of sharded (per-device batch norm or loss), a device count that changes
  the data, and padding rows of an eval batch rounded up to the devices leaking into results. A
  batch that does not divide by the devices is one line, before anything is written.

  Tolerance: losses agree to 1e-5 at every step (one epoch, learning rate 1e-6: the rounding
  differences of the all-reduced sums, amplified by Adam's early ±lr updates, stay small), and
  P(malignant) of every test image to 1e-4, with the same predicted class."""
  tmp_path = four_devices
  one, four = tmp_path / "one" / "fold1", tmp_path / "four" / "fold1"
  assert _json(four / "results.json")["versions"]["devices"] == _json(
      one / "results.json")["versions"]["devices"]  # all four were there, only the mesh differs
  losses = {name: [m["loss"] for m in _metrics(tmp_path / name / "fold1")]
            for name in ("one", "four", "folds")}
  assert len(losses["one"]) == 7
  np.testing.assert_allclose(losses["four"], losses["one"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(losses["folds"], losses["one"], rtol=0, atol=1e-5)
  for other in (four, tmp_path / "folds" / "fold1"):
    _assert_same_predictions(one, other)
  assert (tmp_path / "odd.txt").read_text() == (
      "--config.batch_size=30 does not divide by the 4 devices; use a multiple of 4 (it is the "
      "global batch)\n")
  assert not (tmp_path / "odd").exists()  # refused before anything was written


def _assert_same_predictions(workdir, other, atol=1e-4):
  with open(workdir / "predictions.csv") as a, open(other / "predictions.csv") as b:
    rows_a, rows_b = list(csv.DictReader(a)), list(csv.DictReader(b))
  assert [r["file_name"] for r in rows_a] == [r["file_name"] for r in rows_b]
  assert [r["prediction"] for r in rows_a] == [r["prediction"] for r in rows_b]
  np.testing.assert_allclose([float(r["prob_malignant"]) for r in rows_a],
                             [float(r["prob_malignant"]) for r in rows_b], rtol=0, atol=atol)


# Two processes of 2 CPU devices each, as one run: the "four" run of _DEVICES_SCRIPT, launched
# the way `jax.distributed` is on a cluster (coordinator, process count and id in the env).
_TWO_PROCESS_SETTINGS = dict(log_every_steps=1, num_epochs=1, learning_rate=1e-6, batch_size=32,
                             eval_batch_size=10, checkpoint_every_steps=3)


def _start_two_processes(synthetic_tree, prepared_dir, workdir) -> list[subprocess.Popen]:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  overrides = tiny_overrides(synthetic_tree[0], prepared_dir, **_TWO_PROCESS_SETTINGS)
  return [subprocess.Popen(
      [sys.executable, "-m", "jattn.main", "--config", DEMO, "--workdir", str(workdir),
       *[f"--config.{o}" for o in overrides]],
      cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i)))
      for i in range(2)]


def _finish(procs) -> None:
  for p in procs:
    _, err = p.communicate(timeout=400)
    assert p.returncode == 0, err[-3000:]


@pytest.fixture(scope="module")
def two_processes(synthetic_tree, prepared_dir, tmp_path_factory):
  """The work dir of an uninterrupted two-process run."""
  workdir = tmp_path_factory.mktemp("two_processes")
  _finish(_start_two_processes(synthetic_tree, prepared_dir, workdir))
  return workdir


def test_two_processes_give_the_figures_of_one_process_with_four_devices(two_processes,
                                                                         four_devices):
  """Each process loads its half of every global batch; guards against processes that load the
  same rows, another order than one process, or that all write the run's files. Tolerance as
  for four devices (the all-reduces go over TCP instead of memory)."""
  four = four_devices / "four" / "fold1"
  losses = [m["loss"] for m in _metrics(two_processes)]
  np.testing.assert_allclose(losses, [m["loss"] for m in _metrics(four)], rtol=0, atol=1e-5)
  _assert_same_predictions(four, two_processes)
  results = _json(two_processes / "results.json")
  assert len(results["versions"]["devices"]) == 4
  with open(two_processes / "metrics.jsonl") as f:
    assert len(f.readlines()) == 7  # written by process 0 alone


def test_killed_two_process_run_resumes_to_the_same_figures(two_processes, synthetic_tree,
                                                            prepared_dir, tmp_path):
  """Both processes killed with SIGKILL after a checkpoint and started again with the same
  command end exactly as the uninterrupted run."""
  procs = _start_two_processes(synthetic_tree, prepared_dir, tmp_path)
  deadline = time.time() + 300
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if any(d.name.isdigit() for d in (tmp_path / "checkpoints").glob("*")):
      break
    time.sleep(0.05)
  assert all(p.poll() is None for p in procs), "a process ended before it could be killed"
  for p in procs:
    p.send_signal(signal.SIGKILL)
    p.wait()
  assert not (tmp_path / "results.json").exists()
  _finish(_start_two_processes(synthetic_tree, prepared_dir, tmp_path))
  assert [m["loss"] for m in _metrics(tmp_path)] == [m["loss"] for m in _metrics(two_processes)]
  with open(two_processes / "predictions.csv") as a, open(tmp_path / "predictions.csv") as b:
    assert a.read() == b.read()


def test_a_process_count_unlike_the_coordinators_is_one_line(tmp_path):
  """A process started with another JAX_NUM_PROCESSES than the coordinator's says so in one
  line (exit 2) instead of training with a wrong slice of every batch."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = []
  for i, count in ((0, 2), (1, 3)):
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "jattn.main", "--config", DEMO, "--workdir", str(tmp_path / "w"),
         "--config.fold=7"],  # process 0 stops there, once both have joined
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=REPO, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                 JAX_NUM_PROCESSES=str(count), JAX_PROCESS_ID=str(i))))
  try:
    _, err = procs[1].communicate(timeout=120)
  finally:
    procs[0].kill()
    procs[0].wait()
  assert procs[1].returncode == 2 and err.count("\n") == 1, err
  assert err == (f"jattn train: error: JAX_NUM_PROCESSES=3, but the coordinator at "
                 f"127.0.0.1:{port} runs 2 processes; start every process with the same "
                 f"JAX_NUM_PROCESSES\n")
  assert not (tmp_path / "w").exists()
