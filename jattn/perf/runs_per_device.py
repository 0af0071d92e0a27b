"""Several training processes on one device at once: their memory shares and aggregate rate.

  jattn benchmark --runs-per-device 1,2,4 [--dtype bfloat16] [--steps 10 --windows 5]

For each K, K benchmark processes (this module's `child`) start together on the device, each
with `XLA_PYTHON_CLIENT_MEM_FRACTION` = `memory_fraction(K)` of its memory (a GPU's; the CPU
backend ignores it). Each compiles and warms up the train step of the first config and dtype,
then waits at a barrier for the others, times --windows windows of --steps steps and reports its
median rate and when its windows ran. The aggregate rate is the sum of the K rates; `overlap` is
the fraction of the span of all timed windows in which every process was timing (near 1: the
rates were measured together). `experiments/sweep.py --runs-per-device K` runs a sweep so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from jattn.core.errors import UserError
from jattn.perf import benchmark
from jattn.training import compat

MEMORY_SHARE = 0.9  # of a device's memory, split between the runs on it


def memory_fraction(k: int) -> str | None:
  """XLA_PYTHON_CLIENT_MEM_FRACTION for each of K processes on one device ('0.45' for 2), or
  None for one (JAX's default, 0.75)."""
  if k <= 1:
    return None
  return f"{int(MEMORY_SHARE / k * 100) / 100:.2f}"


def environment(k: int, base: dict | None = None) -> dict:
  """`base` (os.environ) with each of K processes' memory fraction set."""
  env = dict(os.environ if base is None else base)
  fraction = memory_fraction(k)
  if fraction is not None:
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = fraction
  return env


def _child_args(args) -> list[str]:
  spec = [s.strip() for s in args.configs.split(",") if s.strip()][0]
  return ["--configs", spec, "--dtype", args.dtypes[0], "--image-size", str(args.image_size),
          "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--windows",
          str(args.windows), "--warmup", str(args.warmup),
          *[f"--config.{o}" for o in args.overrides]]


def measure(args, timeout_s: float = 1800.0) -> list[dict]:
  """One row per K of `args.runs_per_device`: K processes' rates, their sum, the overlap of
  their timed windows and the speed-up of the sum over K = 1's."""
  rows = []
  for k in args.runs_per_device:
    with tempfile.TemporaryDirectory(prefix="jattn-runs-per-device-") as folder:
      procs = [subprocess.Popen(
          [sys.executable, "-m", "jattn.perf.runs_per_device", "--barrier", folder,
           "--index", str(i), "--processes", str(k), *_child_args(args)],
          env=environment(k), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for i in range(k)]
      print(f"[runs per device] {k} process(es) ...", file=sys.stderr, flush=True)
      deadline = time.monotonic() + timeout_s
      errors = []
      for p in procs:
        try:
          _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
          p.kill()
          _, err = p.communicate()
        if p.returncode:
          errors.append(err.strip().splitlines()[-1] if err.strip() else f"exit {p.returncode}")
      if errors:
        raise UserError(f"--runs-per-device {k}: a benchmark process failed: {errors[0]}")
      results = []
      for i in range(k):
        with open(os.path.join(folder, f"{i}.json")) as f:
          results.append(json.load(f))
    rates = [r["train_images_per_s"] for r in results]
    starts, ends = [r["windows"][0][0] for r in results], [r["windows"][-1][1] for r in results]
    span = max(ends) - min(starts)
    rows.append({"processes": k, "memory_fraction": memory_fraction(k),
                 "train_images_per_s": [round(x, 3) for x in rates],
                 "aggregate_train_images_per_s": round(sum(rates), 3),
                 "overlap": round(max(0.0, min(ends) - max(starts)) / span, 3) if span else 1.0})
  one = next((r for r in rows if r["processes"] == 1), None)
  for r in rows:
    r["speedup_vs_one"] = (round(r["aggregate_train_images_per_s"]
                                 / one["aggregate_train_images_per_s"], 3) if one else None)
  return rows


def format_table(rows: list[dict]) -> str:
  head = f"{'processes':>9}  {'memory':>6}  {'img/s each':>24}  {'sum':>9}  {'x one':>6}  overlap"
  lines = [head]
  for r in rows:
    each = ", ".join(f"{x:.1f}" for x in r["train_images_per_s"])
    speedup = "-" if r["speedup_vs_one"] is None else f"{r['speedup_vs_one']:.2f}"
    lines.append(f"{r['processes']:>9}  {r['memory_fraction'] or 'JAX':>6}  {each:>24}  "
                 f"{r['aggregate_train_images_per_s']:>9.1f}  {speedup:>6}  {r['overlap']:.2f}")
  return "\n".join(lines)


def _barrier(folder: str, index: int, processes: int, timeout_s: float = 1800.0) -> None:
  """Marks this process ready in `folder`, then waits until all `processes` are."""
  with open(os.path.join(folder, f"{index}.ready"), "w"):
    pass
  deadline = time.monotonic() + timeout_s
  while not all(os.path.exists(os.path.join(folder, f"{i}.ready")) for i in range(processes)):
    if time.monotonic() > deadline:
      raise TimeoutError(f"the other benchmark processes were not ready within {timeout_s:g} s")
    time.sleep(0.01)


def child(argv: list[str]) -> None:
  """One of the K processes: the first config and dtype's train step, warmed up, then its timed
  windows after the barrier, into BARRIER/INDEX.json."""
  parser = argparse.ArgumentParser(prog="python -m jattn.perf.runs_per_device")
  parser.add_argument("--barrier", required=True, help="the folder the K processes share")
  parser.add_argument("--index", type=int, required=True, help="this process' number, 0..K-1")
  parser.add_argument("--processes", type=int, required=True, help="K")
  known, rest = parser.parse_known_args(argv)

  args = benchmark.parse_args(rest)
  config = compat.load_config(args.configs, args.overrides)
  with config.unlocked():
    config.model.dtype = args.dtypes[0]
  case = benchmark.JaxCase(config, args.image_size, args.batch_size, args.eval_batch_size, 1)
  case.train_window(max(args.warmup, 1))
  _barrier(known.barrier, known.index, known.processes)
  windows = []
  for _ in range(args.windows):
    started = time.time()
    seconds = case.train_window(args.steps)
    windows.append((started, started + seconds))
  rate = args.steps * case.images_per_train_step / statistics.median(e - s for s, e in windows)
  with open(os.path.join(known.barrier, f"{known.index}.json"), "w") as f:
    json.dump({"train_images_per_s": rate, "windows": windows}, f)


def benchmark_result(args) -> dict:
  """The benchmark's result (`benchmark.result_header`) with the rows of `measure`."""
  return benchmark.result_header(args) | {"runs_per_device": measure(args)}


def report(result: dict) -> str:
  """The printed report of a `benchmark_result`."""
  return f"{benchmark.report_head(result)}\n{format_table(result['runs_per_device'])}"


if __name__ == "__main__":
  child(sys.argv[1:])
