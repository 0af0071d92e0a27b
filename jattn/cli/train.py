"""Trains and evaluates one fold of one config: the project's main job.

  jattn train --config configs/ours.py [--workdir DIR] [--config.fold=K] [--overwrite]

(`python -m jattn.main` is the same command.)

With --config.parallel_folds=K it trains folds fold..fold+K-1 in one program, each into its own
work dir (--workdir with {fold}). Launched as several processes (SLURM, Open MPI, or
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), the processes train one run
together over all their devices.

This file is intentionally kept short: the logic is in `jattn.training.train`, importable in a
notebook. Without --config it runs the built-in demo (configs/demo.py: a synthetic BreakHis-format
data set, nothing to download). Running the same command again resumes from the latest checkpoint; a
run that has finished prints its results and stops.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax

from jattn.core import config_lib
from jattn.core.errors import exit_on_user_error
from jattn.training import compat, parallel, train

# Compiled XLA programs are kept on disk, so resumed runs and the runs of a sweep skip compilation.
COMPILATION_CACHE = "~/.cache/jattn/xla"
PROG = "jattn train"  # error lines begin with it


def main(argv: list[str] | None = None) -> None:
  overrides, rest = config_lib.split_argv(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                                   epilog="Override any config field with --config.FIELD=VALUE.")
  parser.add_argument("--config", default="configs/demo.py", help="config file[:arg]")
  parser.add_argument("--workdir", default=None,
                      help="default: runs/<config.name>/fold{fold}; {fold} becomes the fold "
                           "(needed with --config.parallel_folds > 1)")
  parser.add_argument("--overwrite", action="store_true",
                      help="discard a run with a different config in --workdir")
  args = parser.parse_args(rest)
  with exit_on_user_error(PROG):
    # The config is read first (that touches no device), so that its coordinator_timeout_s bounds
    # the wait for the other processes and they can check that they all run the same config;
    # then the processes start JAX's runtime together, before anything touches the devices.
    config = compat.load_config(args.config, overrides)
    workdir = args.workdir or f"runs/{config.name}/fold{{fold}}"
    parallel.initialize_distributed(config.get("coordinator_timeout_s", 300.0),
                                    agree_on={"config": json.loads(config.to_json()),
                                              "--workdir": workdir})
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(COMPILATION_CACHE))
  with exit_on_user_error(PROG), parallel.telling_peers():
    train.train_and_evaluate(config, workdir, overwrite=args.overwrite)
