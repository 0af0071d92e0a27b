"""The sweep runs configs x folds once each, survives being stopped, and prints the tables."""

from __future__ import annotations

import concurrent.futures
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jattn.cli import sweep as sweep_cli
from jattn.core.errors import UserError
from jattn.sweeps import sweep
from tests.runs import REPO, tiny_overrides

ROWS = "configs/demo.py:vgg19,configs/demo.py:ours"


def test_stopped_sweep_does_not_repeat_finished_runs(synthetic_tree, prepared_dir, tmp_path,
                                                     capsys):
  out = str(tmp_path / "sweep")
  sets = [a for o in tiny_overrides(synthetic_tree[0], prepared_dir) for a in ("--set", o)]
  cmd = [sys.executable, "experiments/sweep.py", "--configs", ROWS, "--folds", "1", "--out", out,
         *sets]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          start_new_session=True, text=True)
  first = os.path.join(out, "demo_vgg19", "fold1", "results.json")
  deadline = time.time() + 400
  while not os.path.exists(first) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.2)
  assert os.path.exists(first), proc.communicate()[0]
  os.killpg(proc.pid, signal.SIGKILL)  # stop the sweep and the run it has started
  proc.wait()
  stamp = os.path.getmtime(first)
  log = os.path.join(out, "demo_vgg19", "fold1", "log.txt")
  log_size = os.path.getsize(log)

  sweep_cli.main(["--configs", ROWS, "--folds", "1", "--out", out, *sets])
  printed = capsys.readouterr().out
  assert "2 runs, 1 finished before, 1 to run" in printed
  assert os.path.getmtime(first) == stamp and os.path.getsize(log) == log_size  # not run again
  assert os.path.exists(os.path.join(out, "demo_ours", "fold1", "results.json"))
  with open(os.path.join(out, "sweep.json")) as f:
    manifest = json.load(f)
  assert manifest["names"] == ["demo_vgg19", "demo_ours"] and manifest["folds"] == [1]
  assert "Table 1" in printed and "Table 2" in printed
  for name in ("tables.md", "tables.csv", "tables.png"):
    assert os.path.exists(os.path.join(out, name))

  sweep_cli.main(["--configs", ROWS, "--folds", "1", "--out", out, *sets])
  assert "2 finished before, 0 to run" in capsys.readouterr().out


def test_gpu_slots_follow_cuda_visible_devices(monkeypatch):
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,3")
  assert sweep.gpu_slots() == ["0", "1", "3"]
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
  assert sweep.gpu_slots() == [None]  # one device: runs go one after another


def test_a_bad_override_stops_before_any_run(tmp_path):
  with pytest.raises(UserError, match="unknown config field 'num_epoch'"):
    sweep.sweep(["configs/demo.py:vgg19"], [1], str(tmp_path), ["num_epoch=3"])
  assert not os.path.exists(tmp_path / "demo_vgg19")


def _plan(folds):
  return sweep.plan(["configs/demo.py:vgg19", "configs/demo.py:ours"], folds, [])


def test_parallel_folds_group_consecutive_folds_into_one_command():
  """Guards against --parallel-folds training the wrong folds (a fold twice, a finished one again,
  or one skipped): each process gets up to K consecutive folds of one config, and its command
  names the first fold, the count and a work-dir template jattn.main fills in per fold."""
  runs = _plan([1, 2, 3, 4, 5])
  groups = sweep.group_folds(runs, 2)
  assert [(g[0]["name"], [r["fold"] for r in g]) for g in groups] == [
      ("demo_vgg19", [1, 2]), ("demo_vgg19", [3, 4]), ("demo_vgg19", [5]),
      ("demo_ours", [1, 2]), ("demo_ours", [3, 4]), ("demo_ours", [5])]
  unfinished = [r for r in runs if (r["name"], r["fold"]) not in {("demo_ours", 2)}]
  assert [[r["fold"] for r in g] for g in sweep.group_folds(unfinished, 3)] == [
      [1, 2, 3], [4, 5], [1], [3, 4, 5]]
  assert [[r["fold"] for r in g] for g in sweep.group_folds(runs, 1)] == [
      [k] for k in range(1, 6)] * 2

  cmd = sweep.build_command("/o", groups[1], ["num_epochs=3"], 2)
  assert cmd[:4] == [sys.executable, "-m", "jattn.main", "--config"]
  assert cmd[4].endswith("configs/demo.py:vgg19")
  assert cmd[5:] == ["--workdir", "/o/demo_vgg19/fold{fold}", "--config.fold=3",
                     "--config.parallel_folds=2", "--config.num_epochs=3"]
  one = sweep.build_command("/o", [runs[6]], ["num_epochs=3"])
  assert one[5:] == ["--workdir", "/o/demo_ours/fold2", "--config.fold=2", "--config.num_epochs=3"]


@pytest.mark.parametrize("args,sbatch,message", [
    (["--partition", "gpu"], False, "--launcher slurm: no sbatch on PATH; run the sweep on"),
    ([], True, "--launcher slurm needs --partition P"),
    (["--partition", "gpu", "--time", "2h"], True, "--time '2h': give the time limit of one run "
     "as HH:MM:SS"),
    (["--partition", "gpu", "--time", "1:60:00"], True, "--time '1:60:00'"),
])
def test_bad_slurm_options_give_one_line_and_write_nothing(args, sbatch, message, tmp_path,
                                                          monkeypatch, capsys):
  """Guards against a SLURM sweep that fails late (after writing its manifest or submitting) or
  with a traceback when sbatch is missing or an option is wrong."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for command in ("sbatch", "srun", "sacct") if sbatch else ():
    (bin_dir / command).write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / command).chmod(0o755)
  monkeypatch.setenv("PATH", str(bin_dir))
  out = tmp_path / "sweep"
  with pytest.raises(SystemExit) as e:
    sweep_cli.main(["--configs", ROWS, "--out", str(out), "--launcher", "slurm", *args])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count("\n") == 1 and message in err, err
  assert not out.exists()


def _process_running(*words):
  """The pid of a process of this user whose command line holds all `words`, and its parent's."""
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmdline = f.read().decode(errors="replace")
      with open(f"/proc/{pid}/stat") as f:
        parent = int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
      continue
    if all(w in cmdline for w in words):
      return int(pid), parent
  return None


def test_sweep_through_submitit_resumes_a_preempted_run(synthetic_tree, prepared_dir, tmp_path,
                                                        capsys):
  """Guards against a SLURM sweep that loses a preempted run, restarts it from scratch or trains
  a finished run again. The SLURM launcher's code path, sbatch aside, on submitit's local
  executor (real subprocesses): one job per run; a run preempted after a checkpoint (SIGUSR2, as
  SLURM sends before preempting or at the time limit) is requeued by submitit and resumes from
  its checkpoint; all runs finish, the tables are written, and a second sweep submits nothing."""
  from jattn.sweeps.slurm import submitit  # imported there without its logging set-up

  out = tmp_path / "sweep"
  overrides = tiny_overrides(synthetic_tree[0], prepared_dir, checkpoint_every_steps=3)

  def local_executor(folder):
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(timeout_min=30)
    return executor

  def run_sweep():
    return sweep.sweep(ROWS.split(","), [1], str(out), overrides, make_executor=local_executor)

  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    result = pool.submit(run_sweep)
    workdir = out / "demo_vgg19" / "fold1"
    deadline = time.time() + 400
    while time.time() < deadline and not result.done():
      steps = [int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()] if (
          workdir / "checkpoints").is_dir() else []
      found = _process_running("jattn.main", str(workdir)) if steps and max(steps) >= 3 else None
      if found:
        os.kill(found[1], signal.SIGUSR2)  # to submitit's process running the task
        break
      time.sleep(0.05)
    assert found, "the run ended before it could be preempted"
    printed_tables = result.result(timeout=600)

  log = (workdir / "log.txt").read_text()
  assert log.count("$ ") == 2 and re.search(r"resuming .* from step [1-9]", log), log
  for name in ("demo_vgg19", "demo_ours"):
    assert (out / name / "fold1" / "results.json").exists()
    logs = os.listdir(out / name / "fold1" / "submitit")  # the task's submitit folder, linked
    assert any(f.endswith("_log.out") for f in logs) and any(f.endswith("_log.err") for f in logs)
  with open(workdir / "metrics.jsonl") as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == sorted(set(steps))  # the resumed run dropped what it logged after the checkpoint
  assert "Table 1" in printed_tables and (out / "tables.md").exists()
  assert "All 2 runs finished" in (out / "tables.md").read_text()
  capsys.readouterr()

  sweep.sweep(ROWS.split(","), [1], str(out), overrides, make_executor=local_executor)
  assert "2 finished before, 0 to run" in capsys.readouterr().out


def test_seeds_plan_every_config_fold_and_seed_into_its_own_work_dir():
  """Guards against seeds that overwrite each other's runs, a group of parallel folds that mixes
  seeds, or a seed the command does not pass on: seed 0 in <name>/fold<k> (as before seeds),
  seed s in <name>/seed<s>/fold<k>, every row's seed 0 first."""
  runs = sweep.plan(["configs/demo.py:vgg19", "configs/demo.py:ours"], [1, 2], [], [0, 2])
  assert [(r["name"], r["fold"], r["seed"], r["workdir"]) for r in runs] == [
      ("demo_vgg19", 1, 0, "demo_vgg19/fold1"), ("demo_vgg19", 2, 0, "demo_vgg19/fold2"),
      ("demo_ours", 1, 0, "demo_ours/fold1"), ("demo_ours", 2, 0, "demo_ours/fold2"),
      ("demo_vgg19", 1, 2, "demo_vgg19/seed2/fold1"),
      ("demo_vgg19", 2, 2, "demo_vgg19/seed2/fold2"),
      ("demo_ours", 1, 2, "demo_ours/seed2/fold1"), ("demo_ours", 2, 2, "demo_ours/seed2/fold2")]
  groups = sweep.group_folds(runs, 5)
  assert [[(r["name"], r["fold"], r["seed"]) for r in g] for g in groups] == [
      [("demo_vgg19", 1, 0), ("demo_vgg19", 2, 0)], [("demo_ours", 1, 0), ("demo_ours", 2, 0)],
      [("demo_vgg19", 1, 2), ("demo_vgg19", 2, 2)], [("demo_ours", 1, 2), ("demo_ours", 2, 2)]]
  assert sweep.build_command("/o", groups[2], ["num_epochs=3"], 2)[5:] == [
      "--workdir", "/o/demo_vgg19/seed2/fold{fold}", "--config.fold=1",
      "--config.parallel_folds=2", "--config.seed=2", "--config.num_epochs=3"]
  assert sweep.build_command("/o", groups[0][:1], [])[5:] == [
      "--workdir", "/o/demo_vgg19/fold1", "--config.fold=1"]  # seed 0 is the config's own
  # Without --seeds: each config's own seed, as before (here set by --set), in <name>/fold<k>.
  plain = sweep.plan(["configs/demo.py:ours"], [1], ["seed=7"])
  assert [(r["seed"], r["workdir"]) for r in plain] == [(7, "demo_ours/fold1")]
  assert sweep.build_command("/o", plain, ["seed=7"])[5:] == [
      "--workdir", "/o/demo_ours/fold1", "--config.fold=1", "--config.seed=7"]


@pytest.mark.parametrize(("args", "message"), [
    (["--seeds", "0,0"], "--seeds '0,0': give distinct seeds >= 0 like 0,1,2"),
    (["--seeds", "one"], "--seeds 'one': give distinct seeds"),
    (["--seeds", "-1"], "--seeds '-1': give distinct seeds"),
    (["--seeds", "0,1", "--set", "seed=1"], "--set seed=... and --seeds: give the seeds with "
     "--seeds alone"),
])
def test_bad_seeds_are_one_line_and_write_nothing(args, message, tmp_path, capsys):
  out = tmp_path / "sweep"
  with pytest.raises(SystemExit) as e:
    sweep_cli.main(["--configs", ROWS, "--out", str(out), *args])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count("\n") == 1 and message in err, err
  assert not out.exists()


def test_seeds_on_the_demo_train_each_seed_into_its_layout(trained_run, synthetic_tree,
                                                           prepared_dir, tmp_path, capsys):
  """`--seeds 0,1` with one fold: the suite's tiny demo run stands for seed 0 in
  demo_ours/fold1 (finished, so not trained again); seed 1 is trained into
  demo_ours/seed1/fold1 with config.seed 1, and the tables average the two."""
  out = tmp_path / "sweep"
  shutil.copytree(trained_run, out / "demo_ours" / "fold1")
  first = out / "demo_ours" / "fold1" / "results.json"
  stamp = os.path.getmtime(first)
  sets = [a for o in tiny_overrides(synthetic_tree[0], prepared_dir) for a in ("--set", o)]
  sweep_cli.main(["--configs", "configs/demo.py:ours", "--folds", "1", "--seeds", "0,1",
              "--out", str(out), *sets])
  printed = capsys.readouterr().out
  assert "2 runs, 1 finished before, 1 to run" in printed and "demo_ours fold 1 seed 1 done" in (
      printed)
  assert os.path.getmtime(first) == stamp
  second = out / "demo_ours" / "seed1" / "fold1"
  assert sorted(p.name for p in out.iterdir()) == ["compare.csv", "compare.md", "demo_ours",
                                                  "sweep.json", "tables.csv", "tables.md",
                                                  "tables.png"]
  assert sorted(p.name for p in (out / "demo_ours").iterdir()) == ["fold1", "seed1"]
  assert [json.loads((d / "config.json").read_text())["seed"] for d in (first.parent, second)
          ] == [0, 1]
  runs = [json.loads(p.read_text()) for p in (first, second / "results.json")]
  assert [(r["fold"], r["config"]["seed"]) for r in runs] == [(1, 0), (1, 1)]
  assert "--config.seed=1" in (second / "log.txt").read_text()
  probs = [[row["prob_malignant"] for row in csv.DictReader(
      (d / "predictions.csv").read_text().splitlines())] for d in (first.parent, second)]
  assert probs[0] != probs[1]  # another initialisation and data order
  with open(out / "sweep.json") as f:
    manifest = json.load(f)
  assert (manifest["folds"], manifest["seeds"]) == ([1], [0, 1])
  assert [(r["seed"], r["workdir"]) for r in manifest["runs"]] == [
      (0, "demo_ours/fold1"), (1, "demo_ours/seed1/fold1")]
  table = (out / "tables.md").read_text()
  values = [100 * r["image_accuracy"]["40X"] for r in runs]
  spread = abs(values[0] - values[1]) / np.sqrt(2)  # the sample std of two values
  label = "demo_ours (from scratch, 32x32, 2 epochs, width 1/16, classifier 16)"
  assert f"| {label} | {np.mean(values):.1f} (seeds {spread:.1f}; 2/2) |" in table
  assert "All 2 runs finished." in table


def test_an_old_sweep_run_again_tabulates_byte_for_byte(tmp_path):
  """A sweep written before seeds, run again through sweep.py (nothing left to train): its
  manifest now records seed 0, and its tables are those written before."""
  out = tmp_path / "sweep"
  shutil.copytree(os.path.join(REPO, "tests", "data", "sweep_v1"), out)
  want_md, want_csv = ((out / name).read_text() for name in ("tables.md", "tables.csv"))
  sweep.sweep(["configs/demo.py:vgg19", "configs/demo.py:ours"], [1, 2], str(out), [])
  assert (out / "tables.md").read_text().split("\n", 1)[1] == want_md.split("\n", 1)[1]
  assert (out / "tables.csv").read_text() == want_csv
  with open(out / "sweep.json") as f:
    manifest = json.load(f)
  assert manifest["seeds"] == [0] and {r["seed"] for r in manifest["runs"]} == {0}


def test_two_runs_per_device_run_at_once_and_both_finish(synthetic_tree, prepared_dir, tmp_path,
                                                         capsys):
  """--runs-per-device 2 on the CPU: both runs start before either ends, both write results, each
  process was given 0.9 / 2 of a device's memory (by hand: 0.45; one run keeps JAX's default)."""
  from jattn.perf import runs_per_device

  assert runs_per_device.environment(2, {}) == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.45"}
  assert runs_per_device.environment(4, {}) == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.22"}
  assert runs_per_device.environment(1, {}) == {}
  out = str(tmp_path / "sweep")
  sets = [a for o in tiny_overrides(synthetic_tree[0], prepared_dir, num_epochs=1)
          for a in ("--set", o)]
  sweep_cli.main(["--configs", ROWS, "--folds", "1", "--out", out, "--runs-per-device", "2", *sets])
  printed = capsys.readouterr().out.splitlines()
  events = [line.split()[0] if line.startswith("  start") else "done" for line in printed
            if line.startswith("  start") or re.match(r"\[\d/2\] .* done after", line)]
  assert events == ["start", "start", "done", "done"], printed
  for name in ("demo_vgg19", "demo_ours"):
    with open(os.path.join(out, name, "fold1", "results.json")) as f:
      assert json.load(f)["train"]["epochs"] == 1


@pytest.mark.parametrize("args,message", [
    (["--runs-per-device", "0"], "--runs-per-device 0: give a number of runs >= 1"),
    (["--runs-per-device", "2", "--launcher", "slurm"], "--runs-per-device is for the local "
                                                        "launcher"),
])
def test_bad_runs_per_device_is_one_line(args, message, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    sweep_cli.main(["--configs", ROWS, "--folds", "1", "--out", str(tmp_path / "s"), *args])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count("\n") == 1 and message in err, err
  assert not (tmp_path / "s").exists()
