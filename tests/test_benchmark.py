"""jattn.perf.benchmark's arithmetic and command line, and experiments/gpu_check.sh run end to end
at a tiny size on CPU (so the GPU script cannot rot). No figure is asserted: speed is only
printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jattn.cli import benchmark as benchmark_cli
from jattn.perf import benchmark, profile
from tests.runs import REPO


def test_peak_table_matches_device_kinds():
  """MFU uses the right peak: the PCIe H100 is not taken for the SXM one, an unknown device and a
  dtype without tensor-core support have none (no made-up MFU)."""
  assert benchmark.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
  assert benchmark.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
  assert benchmark.peak_tflops("NVIDIA A100-SXM4-80GB", "float32") == 156.0
  assert benchmark.peak_tflops("NVIDIA L40S", "bfloat16") == 362.0
  assert benchmark.peak_tflops("Tesla V100-SXM2-16GB", "bfloat16") is None
  assert benchmark.peak_tflops("cpu", "float32") is None


def test_summary_speedup_mfu_and_protocol_hours():
  """Parallel folds are compared with the K = 1 rate of the same config and dtype; MFU is FLOPs x
  images/s over the peak; the protocol is 20 runs of 130 epochs of 5,500 images plus 2,409 test
  images each."""
  rows = [
      {"config": "ours", "dtype": "bfloat16", "parallel_folds": k, "train_images_per_s": rate,
       "eval_images_per_s": 1000.0, "train_flops_per_image": 1e11, "eval_flops_per_image": 3e10}
      for k, rate in ((1, 500.0), (5, 1500.0))]
  benchmark.summarize(rows, "NVIDIA H100 80GB HBM3", None)
  assert [r["train_speedup_vs_separate_runs"] for r in rows] == [1.0, 3.0]
  assert rows[1]["train_mfu"] == round(1e11 * 1500 / 989e12, 4)
  assert rows[0]["eval_mfu"] == round(3e10 * 1000 / 989e12, 4)
  assert rows[1]["protocol_hours"] == round(20 * (130 * 5500 / 1500 + 2409 / 1000) / 3600, 2)
  benchmark.summarize(rows, "cpu", 2.0)  # --peak-tflops for a device the table does not know
  assert rows[0]["train_mfu"] == round(1e11 * 500 / 2e12, 4)
  assert "ours" in benchmark.format_table(rows).splitlines()[1]


@pytest.mark.parametrize("args,message", [
    (["--parallel-folds", "0,5"], "--parallel-folds '0,5': give positive integers, e.g. 1,5"),
    (["--dtype", "float64"],
     "--dtype 'float64': use auto, float32, bfloat16, float16 (comma-separated)"),
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--steps-per-dispatch", "8,0"],
     "--steps-per-dispatch '8,0': give positive integers, e.g. 1,8"),
    (["--torch-mode", "eager,jit"],
     "--torch-mode 'eager,jit': use eager, channels_last, compile (comma-separated)"),
    (["--runs-per-device", "two"], "--runs-per-device 'two': give positive integers, e.g. 1,2,4"),
    (["--peak-gbps", "-1"], "--peak-gbps must be a positive number"),
])
def test_bad_arguments_are_one_line_errors(args, message, capsys):
  with pytest.raises(SystemExit) as e:
    benchmark_cli.main(args)
  assert e.value.code == 2
  assert capsys.readouterr().err == f"jattn benchmark: error: {message}\n"


def test_profile_splits_overlapping_ops_and_counts_idle_time_as_host_gaps():
  """Intervals (ns) by hand: a conv 0-10 alone, then 10-14 beside a copy (2 each), the copy alone
  14-16, idle 16-20, a fusion 20-30: conv 12, copies 4, host gaps 4, fusion 10, window 30."""
  kinds, window = profile.attribute([(0, 14, "convolutions"), (10, 16, "copies and transposes"),
                                     (20, 30, "element-wise fusions")])
  assert window == 30 and kinds == {"convolutions": 12, "copies and transposes": 4,
                                    "host gaps": 4, "element-wise fusions": 10}


def _json(path):
  with open(path) as f:
    return json.load(f)


@pytest.mark.slow
def test_gpu_check_script_runs_at_a_tiny_size(tmp_path):
  """experiments/gpu_check.sh with SIZE=small, every stage in order: the profile (its kinds add up
  to the traced step, which is within 10% of the wall clock per step, and the network's convs,
  their gradients, the attention products and Adam's update are found), the roofline at the
  nominal peaks, jattn beside each PyTorch mode (no compilation in a timed window), 1 and 8
  steps per dispatch, 1 and 2 benchmark processes at once, ViT-S/14 and ViT-L/16 beside timm, one
  epoch through jattn.main with 8 steps per dispatch (recorded in its layout), then the summary,
  last."""
  out = tmp_path / "out"
  env = {**os.environ, "SIZE": "small", "PYTHONPATH": REPO, "PYTHON": sys.executable}
  proc = subprocess.run(["bash", os.path.join(REPO, "experiments", "gpu_check.sh"), str(out),
                         str(tmp_path / "work")],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  stages = _json(out / "stages.json")["stages"]
  assert [(s["stage"], s["status"]) for s in stages] == [
      (name, "ok") for name in ("profile", "roofline", "peers", "dispatch", "runs_per_device",
                                "vit", "synthesize", "epoch")]
  (row,) = _json(out / "profile.json")["rows"]
  p = row["profile"]
  assert sum(p["kinds"].values()) == pytest.approx(p["step_s"], rel=1e-9)
  assert p["step_s"] == pytest.approx(p["wall_s_per_step"], rel=0.1)
  for kind in ("convolutions", "convolution gradients", "attention einsums", "optimiser update"):
    assert p["kinds"][kind] > 0 and p["ops_per_step"][kind] > 0, kind
  assert os.path.exists(p["xplane"])
  (row,) = _json(out / "roofline.json")["rows"]
  bound = row["roofline"]["bound"]
  assert bound["peak_tflops"] == 1 and bound["peak_gbps"] == 50
  assert bound["bound_s"] == max(row["roofline"]["flops"] / 1e12, row["roofline"]["bytes"] / 50e9)
  assert bound["achieved"] == pytest.approx(bound["bound_s"] * row["train_images_per_s"] / 8)
  (row,) = _json(out / "peers.json")["rows"]
  for mode in ("eager", "channels_last", "compile"):
    assert row[f"torch_{mode}_train_images_per_s"] > 0 and row[f"train_ratio_vs_torch_{mode}"] > 0
    assert row[f"torch_{mode}_compilations_in_windows"] == 0
  rows = _json(out / "dispatch.json")["rows"]
  assert [r["steps_per_dispatch"] for r in rows] == [1, 8]
  assert all(r["train_images_per_s"] > 0 and r["protocol_hours"] > 0 for r in rows)
  rows = _json(out / "runs_per_device.json")["runs_per_device"]
  assert [(r["processes"], len(r["train_images_per_s"])) for r in rows] == [(1, 1), (2, 2)]
  assert rows[1]["aggregate_train_images_per_s"] == pytest.approx(
      sum(rows[1]["train_images_per_s"]), abs=0.01)
  rows = _json(out / "vit.json")["rows"]  # ViT-S/14 and ViT-L/16 beside timm's eager
  assert [r["config"] for r in rows] == ["vit_s14", "uni"]
  assert all(r["torch_eager_train_images_per_s"] > 0 and r["train_ratio_vs_torch_eager"] > 0
             for r in rows)
  epoch = _json(out / "epoch.json")
  assert epoch["layout"]["steps_per_dispatch"] == 8 and epoch["median_images_per_s"] > 0
  last = proc.stdout.strip().splitlines()[-1]
  assert last.startswith("one epoch of configs/ours.py: ") and "(8 per dispatch)" in last
