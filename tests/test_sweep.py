"""The sweep runs configs x folds once each, survives being stopped, and prints the tables."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from experiments import sweep
from jattn.errors import UserError
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

  sweep.main(["--configs", ROWS, "--folds", "1", "--out", out, *sets])
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

  sweep.main(["--configs", ROWS, "--folds", "1", "--out", out, *sets])
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
