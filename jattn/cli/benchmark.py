"""How fast jattn's steps run on this machine, beside PyTorch; their profile and roofline; several
runs per device (`jattn.perf`).

  jattn benchmark --configs configs/ours.py,configs/vgg19.py --torch --out bench.json
  jattn benchmark --dtype float32,bfloat16 --parallel-folds 1,5 --peak-tflops 989
  jattn benchmark --torch --torch-mode eager,channels_last,compile --roofline
  jattn benchmark --profile trace/          # where the step's time goes
  jattn benchmark --steps-per-dispatch 1,8  # steps per dispatch (lax.scan)
  jattn benchmark --runs-per-device 1,2,4   # K processes on one device at once
"""

from __future__ import annotations

import json
import sys

from jattn.core import files
from jattn.core.errors import exit_on_user_error
from jattn.perf import benchmark, runs_per_device

PROG = "jattn benchmark"


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  with exit_on_user_error(PROG):
    args = benchmark.parse_args(argv)
    if args.torch:
      benchmark.require_torch()
    if args.runs_per_device:
      result, report = runs_per_device.benchmark_result(args), runs_per_device.report
    else:
      result, report = benchmark.benchmark(args), benchmark.report
    if args.out:
      files.atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
  print(report(result))
