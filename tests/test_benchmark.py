"""jattn.benchmark's arithmetic and command line, and experiments/gpu_check.sh run end to end at a
tiny size on CPU (so the GPU script cannot rot). No figure is asserted: speed is only printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jattn import benchmark
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
])
def test_bad_arguments_are_one_line_errors(args, message, capsys):
  with pytest.raises(SystemExit) as e:
    benchmark.main(args)
  assert e.value.code == 2
  assert capsys.readouterr().err == f"jattn.benchmark: error: {message}\n"


@pytest.mark.slow
def test_gpu_check_script_runs_at_a_tiny_size(tmp_path):
  """experiments/gpu_check.sh with SIZE=small: the benchmark (K = 1 and 2 parallel folds, the
  PyTorch peer), a synthetic tree and one epoch through jattn.main, then the summary, last."""
  out = tmp_path / "out"
  env = {**os.environ, "SIZE": "small", "PYTHONPATH": REPO, "PYTHON": sys.executable}
  proc = subprocess.run(["bash", os.path.join(REPO, "experiments", "gpu_check.sh"), str(out)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / "bench_ours.json") as f:
    result = json.load(f)
  rows = result["rows"]
  assert [(r["config"], r["dtype"], r["parallel_folds"]) for r in rows] == [
      ("ours", "float32", 1), ("ours", "float32", 2)]
  assert rows[0]["train_speedup_vs_separate_runs"] == 1.0
  assert rows[0]["train_ratio_vs_torch"] > 0 and "train_ratio_vs_torch" not in rows[1]
  assert all(r["train_flops_per_image"] > 0 and r["protocol_hours"] > 0 for r in rows)
  assert result["device"]["backend"] == "cpu"
  with open(out / "epoch" / "results.json") as f:
    assert json.load(f)["train"]["epochs"] == 1
  last = proc.stdout.strip().splitlines()[-1]
  assert last.startswith("one epoch of configs/ours.py: ") and "images/s" in last
