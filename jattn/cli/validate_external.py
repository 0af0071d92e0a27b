"""External validation: a finished run scored on every image of another labelled set
(`jattn.inference.external`).

  jattn validate-external --workdir RUN --config.data.dir=OTHER [--config.data.name=SOURCE]
      [--config.FIELD=VALUE ...] [--out DIR] [--name NAME] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import sys

from jattn.cli import common
from jattn.core import config_lib
from jattn.core.errors import exit_on_user_error
from jattn.evaluation import evaluate
from jattn.inference import external

PROG = "jattn validate-external"


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  common.refuse_stain_norm(argv, PROG)
  overrides, rest = config_lib.split_argv(argv)
  parser = argparse.ArgumentParser(
      prog=PROG, description=__doc__.split("\n")[0] + " " + __doc__.split("\n")[1],
      epilog="Name the other set with --config.FIELD=VALUE (data_dir, dataset, ...).")
  parser.add_argument("--workdir", required=True, help="a finished run's work dir")
  parser.add_argument("--out", help="the folder to write (default: WORKDIR/external/<name>)")
  parser.add_argument("--name", help="the set's name (default: its data dir's folder name)")
  parser.add_argument("--batch-size", type=int, help="images per batch (default: the run's "
                      "eval_batch_size)")
  args = parser.parse_args(rest)
  with exit_on_user_error(PROG):
    result, out = external.external_evaluation(args.workdir, overrides, args.out, args.name,
                                               args.batch_size)
    print(f"{result['name']} fold {result['fold']} on {result['external']['data_dir']}: results "
          f"in {out}\n{evaluate.format_table(result)}")
