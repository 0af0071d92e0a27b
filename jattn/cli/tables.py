"""The paper's Tables 1 and 2 and the paired comparisons of a sweep folder.

  jattn tables SWEEP_DIR [--compare FIRST:SECOND ...] [--metric accuracy|ece|brier]
"""

from __future__ import annotations

import argparse

from jattn.core.errors import exit_on_user_error
from jattn.evaluation import compare, report

PROG = "jattn tables"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
  parser.add_argument("sweep_dir", metavar="SWEEP_DIR", help="the folder a sweep wrote")
  parser.add_argument("--compare", action="append", metavar="FIRST:SECOND",
                      help="paired comparison of two rows (a row of another sweep as DIR/ROW) over "
                           "the same folds and seeds (repeatable; default: each row against the "
                           "baseline row of its setting)")
  parser.add_argument("--metric", choices=compare.METRICS, default="accuracy",
                      help="the figure the paired comparisons compare: image and group accuracy "
                           "(default), or the calibration block's ECE or Brier score (lower is "
                           "better)")
  args = parser.parse_args(argv)
  with exit_on_user_error(PROG):
    markdown, comparisons = report.write(args.sweep_dir, args.compare, args.metric)
    print(markdown)
    print(comparisons)
    print(f"wrote tables.md, tables.csv, tables.png, compare.md and compare.csv in "
          f"{args.sweep_dir}")
