"""Configs x folds x seeds, one run each, then the tables and paired comparisons
(`jattn.sweeps.sweep`).

  jattn sweep                        # the paper's four rows, folds 1-5
  jattn sweep --set num_epochs=130 --set data_dir=/data/breakhis
  jattn sweep --demo                 # the four rows on the demo data, folds 1-2
  jattn sweep --rows resnet50        # the four rows on ResNet-50 (also --demo)
  jattn sweep --rows vit_s14         # the four rows on DINOv2 ViT-S/14 (also --demo)
  jattn sweep --launcher slurm --partition gpu --gpus-per-run 1 --time 24:00:00
"""

from __future__ import annotations

import argparse
import os

from jattn.core.errors import UserError, exit_on_user_error
from jattn.sweeps import sweep

PROG = "jattn sweep"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog=PROG,
                                   description=" ".join(__doc__.split("\n")[:2]))
  parser.add_argument("--configs", help="comma-separated config specs (default: the paper's rows)")
  parser.add_argument("--folds", default=None, help="comma-separated folds (default 1,2,3,4,5)")
  parser.add_argument("--seeds", default=None,
                      help="comma-separated seeds (config.seed), every row and fold trained with "
                           "each; seed 0 in OUT/<name>/fold<k>, seed s in OUT/<name>/seed<s>/"
                           "fold<k> (default: each config's own seed, in OUT/<name>/fold<k>)")
  parser.add_argument("--out", default=None,
                      help="sweep folder (default sweeps/paper or sweeps/demo)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="config override passed to every run (repeatable)")
  parser.add_argument("--demo", action="store_true",
                      help="the four rows on the built-in demo data, folds 1 and 2")
  parser.add_argument("--rows", choices=sorted(sweep.ROWS), default="paper",
                      help="the four rows of the paper on its VGG19 (default), on ResNet-50 or on "
                           "DINOv2 ViT-S/14")
  parser.add_argument("--launcher", choices=("local", "slurm"), default="local",
                      help="local GPUs (default), or a SLURM job array through submitit")
  parser.add_argument("--partition", help="slurm: the partition to submit to")
  parser.add_argument("--gpus-per-run", type=int, default=1, help="slurm: GPUs per run (1)")
  parser.add_argument("--time", default="24:00:00",
                      help="slurm: time limit per job, HH:MM:SS; a run that needs longer is "
                           "requeued and resumes (default 24:00:00)")
  parser.add_argument("--max-parallel", type=int, default=None,
                      help="slurm: most runs at a time (the array's %%K; default all)")
  parser.add_argument("--parallel-folds", type=int, default=1, metavar="K",
                      help="train K consecutive folds of a config in one process")
  parser.add_argument("--runs-per-device", type=int, default=1, metavar="K",
                      help="local: K runs at a time on each GPU (or the CPU), each with 0.9/K of "
                           "its memory (default 1)")
  args = parser.parse_args(argv)
  with exit_on_user_error(PROG):
    configs = args.configs.split(",") if args.configs else sweep.ROWS[args.rows][args.demo]
    default_folds = "1,2" if args.demo else "1,2,3,4,5"
    try:
      folds = [int(f) for f in (args.folds or default_folds).split(",")]
    except ValueError:
      raise UserError(f"--folds {args.folds!r}: give fold numbers like 1,2,3") from None
    seeds = sweep.parse_seeds(args.seeds)
    if args.parallel_folds < 1:
      raise UserError(f"--parallel-folds {args.parallel_folds}: give a number of folds >= 1")
    if args.runs_per_device < 1:
      raise UserError(f"--runs-per-device {args.runs_per_device}: give a number of runs >= 1")
    if args.runs_per_device > 1 and args.launcher != "local":
      raise UserError("--runs-per-device is for the local launcher; a SLURM array task gets "
                      "its own GPU (ask for smaller ones, or run the sweep on the node)")
    make_executor = None
    if args.launcher == "slurm":  # checked before anything is written
      from jattn.sweeps import slurm  # noqa: PLC0415 -- optional: submitit

      make_executor = slurm.slurm_executor(args.partition, args.gpus_per_run, args.time,
                                           args.max_parallel)
    folder = ("demo" if args.demo else "paper") if args.rows == "paper" else (
        f"demo_{args.rows}" if args.demo else args.rows)
    out = args.out or os.path.join(sweep.REPO, "sweeps", folder)
    print(sweep.sweep(configs, folds, out, args.set, args.parallel_folds, make_executor, seeds,
                args.runs_per_device))
