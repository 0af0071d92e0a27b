"""Hostile runs: layouts and reproducibility, failed starts that leave nothing behind,
multi-process launches that end in one line within their bound, and config values that would
stall a run. Every refusal is one line on stderr, exit status 2, nothing already written changed.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import warnings

import jax
import pytest

from jattn import main
from jattn.training import test_evaluation
from tests.conftest import DEVICES_SETTINGS
from tests.runs import DEMO, REPO
from tests.test_hostile import copy_run, one_line_error, snapshot, train_args

PROG = "jattn train"
EVERY_STEP = 10**9  # _cut_back to it keeps every checkpoint


def _json(path):
  with open(path) as f:
    return json.load(f)


def _cut_back(workdir, step: int) -> None:
  """Makes a finished run an unfinished one whose latest checkpoint is `step`, as a run killed
  after that checkpoint leaves it."""
  for name in ("results.json", "predictions.csv", "roc.png"):
    os.remove(os.path.join(workdir, name))
  for name in os.listdir(os.path.join(workdir, "checkpoints")):
    if name.isdigit() and int(name) > step:
      shutil.rmtree(os.path.join(workdir, "checkpoints", name))


# ------------------------------------------------------------------------------------------------
# 3: what is reproducible: the layout of every stretch of training is recorded, and a resume under
# another layout says so.


def test_results_record_the_layout_of_the_run(trained_run):
  """results.json and layouts.json name the devices (as JAX lists them here), processes, folds in
  one program and the computation dtype (float32 on CPU); a run trained in one session has one
  layout. The results schema is unchanged: the key is an addition."""
  results = _json(os.path.join(trained_run, "results.json"))
  layout = results["layout"]
  device = jax.devices()[0]
  expected = {"devices": [str(device)], "platform": "cpu", "device_kind": device.device_kind,
              "num_devices": 0, "processes": 1, "parallel_folds": 1, "position": 1,
              "dtype": "float32", "steps_per_dispatch": 1}
  assert {k: v for k, v in layout.items() if k not in ("history", "one_layout")} == expected
  assert layout["history"] == [{"from_step": 0, "layout": expected}]
  assert layout["one_layout"] is True
  assert _json(os.path.join(trained_run, "layouts.json")) == layout["history"]
  assert results["schema"] == "jattn.results/2"


@pytest.mark.parametrize("run,changes", [
    ("four/fold1", "devices 4 -> 1"),
    ("folds/fold1", "devices 4 -> 1; parallel_folds 2 -> 1"),
])
def test_a_resume_under_another_layout_warns_and_is_recorded(
    run, changes, four_devices, synthetic_tree, prepared_dir, tmp_path, capsys):
  """Runs trained in a process with 4 CPU devices (sharded over four; two folds in one program
  over four), killed after step 3 and resumed here on one device as a run of its own: one warning
  line naming what changed, and results.json records both layouts (one_layout false)."""
  workdir = copy_run(four_devices / run, tmp_path / "run")
  _cut_back(workdir, 3)
  main.main(train_args(workdir, synthetic_tree[0], prepared_dir, **DEVICES_SETTINGS,
                       num_devices=1))
  err = capsys.readouterr().err
  assert [line for line in err.splitlines() if "layout" in line] == [
      f"jattn: warning: {workdir} was trained up to step 3 under another layout ({changes}); "
      f"resuming under this one gives a different, equally valid run, not the bit-identical "
      f"continuation of a resume under the same layout (results.json: layout.history)"]
  layout = _json(os.path.join(workdir, "results.json"))["layout"]
  before = _json(four_devices / run / "results.json")["layout"]
  assert [h["from_step"] for h in layout["history"]] == [0, 3]
  assert layout["history"][0]["layout"] == {k: v for k, v in before.items()
                                            if k not in ("history", "one_layout")}
  assert len(layout["history"][0]["layout"]["devices"]) == 4
  assert (layout["devices"], layout["parallel_folds"], layout["num_devices"]) == (
      [str(jax.devices()[0])], 1, 1)
  assert layout["one_layout"] is False


# ------------------------------------------------------------------------------------------------
# 6: a failed start writes nothing, so the retry its error suggests runs.


def test_the_retry_a_failed_start_suggests_then_runs(synthetic_tree, prepared_dir, tmp_path,
                                                     capsys):
  """Bug: a failed attempt had already written config.json, so the retry its own error suggested
  ("set --config.pretrained=''", another data dir) was refused as a different run. Now a missing
  data dir and missing weights leave no work dir (the weights are checked before the data is
  prepared: the fresh prepared dir stays absent), and the suggested retry trains. A run without
  a terminal logs a line per logged window, and the from-scratch warning is one line."""
  workdir, prepared = tmp_path / "runs" / "fold1", tmp_path / "prepared"
  args = train_args(workdir, synthetic_tree[0], str(prepared), num_epochs=1)
  one_line_error(lambda: main.main(args + [f"--config.data.dir={tmp_path / 'nowhere'}"]), capsys,
                 PROG, r"data_dir .*nowhere does not exist")
  assert not (tmp_path / "runs").exists() and not prepared.exists()
  err = one_line_error(lambda: main.main(args + [f"--config.pretrained={tmp_path / 'vgg19'}"]),
                       capsys, PROG, r"no converted weights there")
  assert err.rstrip().endswith("(or set --config.pretrained='' to train from scratch)")
  assert not (tmp_path / "runs").exists() and not prepared.exists()

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    main.main(args + [f"--config.pretrained={tmp_path / 'vgg19'}", "--config.pretrained="])
  out, err = capsys.readouterr()
  assert (workdir / "results.json").exists()
  assert not [w for w in caught if "pretrained" in str(w.message)]
  assert err.count("jattn: warning: config.pretrained is empty: training from scratch, not "
                   "fine-tuning ImageNet weights as the paper does\n") == 1
  logged = {m["step"]: m for m in map(json.loads, open(workdir / "metrics.jsonl"))}
  steps = logged[max(logged)]["step"]
  printed = re.findall(r"^step (\d+)/(\d+): training loss ([\d.]+), training accuracy ([\d.]+), "
                       r"\d+ images/s$", out, re.M)
  assert [int(s) for s, *_ in printed] == list(range(4, steps + 1, 4))  # log_every_steps=4
  for step, total, loss, accuracy in printed:
    assert int(total) == steps
    assert (loss, accuracy) == (f"{logged[int(step)]['loss']:.4f}",
                                f"{logged[int(step)]['accuracy']:.3f}")


def test_a_failed_overwrite_keeps_the_old_run(trained_run, synthetic_tree, prepared_dir,
                                              tmp_path, capsys):
  """--overwrite with another config discards the old run only once the new one can start: with
  missing weights the old run is left byte-identical."""
  workdir = copy_run(trained_run, tmp_path / "run")
  before = snapshot(workdir)
  one_line_error(lambda: main.main(train_args(workdir, synthetic_tree[0], prepared_dir, seed=5,
                                              pretrained=str(tmp_path / "vgg19"))
                                   + ["--overwrite"]),
                 capsys, PROG, r"no converted weights there")
  assert snapshot(workdir) == before


# ------------------------------------------------------------------------------------------------
# 8: multi-process launches that cannot start end in one line, within coordinator_timeout_s.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _process(port: int, index: int, workdir, *args, cwd=REPO) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, "-m", "jattn.main", "--config", DEMO, "--workdir", str(workdir), *args],
      cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, PYTHONPATH=REPO, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(index)))


def test_a_peer_that_never_starts_or_stops_is_one_line_on_every_process(synthetic_tree,
                                                                        prepared_dir, tmp_path):
  """Bug: a process whose peer never started waited 300 s in jax.distributed.initialize, then
  aborted in C++ (exit 134); processes started with different configs stopped with one line on
  one process and a raw Gloo error on the other. Now a lone process 0, and a lone process 1, say
  in one line who they waited for where, within --config.coordinator_timeout_s=3; two processes
  with different batch sizes both stop with the same line; and when one process stops (here its
  relative data_dir names no folder from its working directory) the other stops too, with one
  line naming it, instead of hanging until JAX's heartbeat aborts both. Nothing is written."""
  lone, mismatch, stops = _free_port(), _free_port(), _free_port()
  bound = ["--config.coordinator_timeout_s=3"]
  (tmp_path / "elsewhere").mkdir()
  here, tree = os.path.split(synthetic_tree[0])  # the data dir as a path relative to `here`
  tiny = train_args(tmp_path / "w3", tree, prepared_dir)[4:]
  procs = {"alone 0": _process(lone, 0, tmp_path / "w0", *bound),
           "alone 1": _process(_free_port(), 1, tmp_path / "w1", *bound),
           "config 0": _process(mismatch, 0, tmp_path / "w2"),
           "config 1": _process(mismatch, 1, tmp_path / "w2", "--config.batch_size=8"),
           "stops 0": _process(stops, 0, tmp_path / "w3", *tiny, cwd=here),
           "stops 1": _process(stops, 1, tmp_path / "w3", *tiny, cwd=tmp_path / "elsewhere")}
  outputs = {}
  try:
    for name, p in procs.items():  # far below the 300 s that JAX's own timeout took
      outputs[name] = p.communicate(timeout=120)
  finally:
    for p in procs.values():
      p.kill()
  errors = {}
  for name, p in procs.items():
    lines = outputs[name][1].splitlines()  # progress bars and warnings may come before the error
    assert p.returncode == 2 and "Traceback" not in outputs[name][1], (name, lines)
    assert [line for line in lines if "error" in line.lower()] == lines[-1:], (name, lines)
    errors[name] = lines[-1] + "\n"
  assert errors["alone 0"] == (
      f"jattn train: error: process(es) 1 of 2 did not join process 0 (the coordinator) at "
      f"127.0.0.1:{lone} within 3 s (--config.coordinator_timeout_s); start every process with "
      f"JAX_COORDINATOR_ADDRESS=127.0.0.1:{lone} JAX_NUM_PROCESSES=2 and its own JAX_PROCESS_ID\n")
  assert f"waiting up to 3 s at 127.0.0.1:{lone} for process(es) 1" in outputs["alone 0"][0]
  assert re.fullmatch(r"jattn train: error: process 1 of 2: process 0 \(the coordinator\) did not "
                      r"answer at 127.0.0.1:\d+ within 3 s \(--config.coordinator_timeout_s\); "
                      r".*\n", errors["alone 1"])
  line = ("jattn train: error: process 1 was started with another config than process 0 (fields: "
          "batch_size); start every process with the same command\n")
  assert errors["config 0"] == errors["config 1"] == line
  missing = f"data_dir {tmp_path / 'elsewhere' / tree} does not exist: "
  assert errors["stops 1"].startswith(f"jattn train: error: {missing}")
  assert errors["stops 0"].startswith(f"jattn train: error: process 1 of 2 stopped: {missing}")
  assert os.listdir(tmp_path) == ["elsewhere"]
  assert os.listdir(tmp_path / "elsewhere") == []


# ------------------------------------------------------------------------------------------------
# 10 and the one-line messages of the later sections.


@pytest.mark.parametrize("override,message", [
    ("bootstrap_resamples=10000000", r"--config.bootstrap_resamples=10000000: at most 100,000 "
                                     r"\(the bootstrap holds a resamples x test groups matrix"),
    ("parallel_folds=0", r"--config.parallel_folds=0: the number of consecutive folds trained in "
                         r"one program, at least 1"),
    ("coordinator_timeout_s=0", r"--config.coordinator_timeout_s=0.0: a number of seconds > 0"),
])
def test_values_that_would_stall_or_mislead_are_one_line(override, message, trained_run,
                                                         synthetic_tree, prepared_dir, tmp_path,
                                                         capsys):
  """Bug: bootstrap_resamples=10000000 sat silent for minutes at 4.7 GB; parallel_folds=0 said
  "folds 1..0 do not exist". Refused before anything is written, a new work dir or a run."""
  for workdir in (tmp_path / "new", copy_run(trained_run, tmp_path / "run")):
    before = snapshot(tmp_path)
    one_line_error(lambda w=workdir: main.main(
        train_args(w, synthetic_tree[0], prepared_dir) + [f"--config.{override}"]),
        capsys, PROG, message)
    assert snapshot(tmp_path) == before and not (tmp_path / "new").exists()


def test_a_long_bootstrap_says_so(trained_run, synthetic_tree, prepared_dir, tmp_path, capsys,
                                  monkeypatch):
  """Evaluation announces a bootstrap of many resamples x patients before it starts (here the
  threshold is lowered to the run's 1,000 resamples x 25 test patients of a magnification)."""
  workdir = copy_run(trained_run, tmp_path / "run")
  _cut_back(workdir, EVERY_STEP)  # evaluated again from its last checkpoint
  monkeypatch.setattr(test_evaluation, "LONG_BOOTSTRAP", 1000)
  main.main(train_args(workdir, synthetic_tree[0], prepared_dir))
  with open(os.path.join(trained_run, "predictions.csv")) as f:
    patients = len({row["patient_id"] for row in csv.DictReader(f)})
  assert ("fold 1: 95% intervals of the clinical metrics from 1,000 bootstrap resamples of the "
          f"{patients} test patients, per magnification and level ...") in capsys.readouterr().out


def test_a_config_whose_model_differs_from_its_checkpoints_names_the_cause(
    trained_run, synthetic_tree, prepared_dir, tmp_path, capsys):
  """Bug: a config.json whose model.width disagrees with its checkpoints advised moving the
  checkpoints aside, after hundreds of lines of 'Event loop is closed' tracebacks. The cause is
  the config: one line says so, and nothing is moved."""
  workdir = copy_run(trained_run, tmp_path / "run")
  _cut_back(workdir, EVERY_STEP)
  config = _json(os.path.join(workdir, "config.json"))
  config["model"]["width"] = 0.125
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config, f)
  before = snapshot(workdir)
  one_line_error(lambda: main.main(train_args(workdir, synthetic_tree[0], prepared_dir,
                                              **{"model.width": 0.125})),
                 capsys, PROG,
                 r"the checkpoints in .*checkpoints do not fit the model of this run's config "
                 r"\(\S+: \(.*\) in step \d+, \(.*\) from the config; \d+ array\(s\) "
                 r"differ\): the config's model fields")
  assert snapshot(workdir) == before
