"""A finished run's predictions for image files, folders or a manifest (`jattn.inference.predict`).

  jattn predict --workdir runs/ours/fold1 IMAGE_OR_FOLDER... [--out FILE.csv] [--tta dihedral]
  jattn predict --workdir runs/ours/fold1 --manifest FILE.csv [--results FILE.json] ...
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys

from jattn.cli import common
from jattn.core import files
from jattn.core.errors import UserError, exit_on_user_error
from jattn.evaluation import evaluate, results
from jattn.inference import predict
from jattn.training import state

PROG = "jattn predict"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a run's work dir (jattn train)")
  parser.add_argument("--out", help="CSV file to write (default: standard output)")
  parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
  parser.add_argument("--tta", choices=state.TTA_MODES,
                      help="test-time augmentation (default: the run's config.tta)")
  parser.add_argument("--manifest", help="a CSV of images with labels: columns path,label[,group]"
                      "[,<stratum>...], paths relative to the CSV; adds label, correctness and "
                      "the figures")
  parser.add_argument("--results", help="with --manifest: write the figures as this JSON file "
                      "(results.json's form)")
  parser.add_argument("images", nargs="*", help="image files (PNG, JPEG, TIFF, BMP), or folders "
                      "of them (searched recursively)")
  common.refuse_stain_norm(sys.argv[1:] if argv is None else argv, PROG)
  args = parser.parse_args(argv)
  with exit_on_user_error(PROG):
    for flag, path in (("--out", args.out), ("--results", args.results)):
      if path and os.path.isdir(path):  # refused before any work, not after it
        kind, name = ("CSV", "predictions.csv") if flag == "--out" else ("JSON", "results.json")
        raise UserError(f"{flag} {path} is a folder: give the {kind} file to write, e.g. "
                        f"{os.path.join(path, name)}")
    if args.results and not args.manifest:
      raise UserError("--results needs --manifest: only images with labels have figures")
    rows, figures = predict.predict_and_score(args.workdir, args.images, args.batch_size,
                                              args.tta, args.manifest)
    if figures is not None:
      print(f"{len(rows)} images of {args.manifest}:\n{evaluate.format_table(figures)}",
            file=sys.stderr)
      if args.results:
        results.write_json(args.results, figures)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    if args.out:
      files.atomic_write_text(args.out, text.getvalue())
    else:
      sys.stdout.write(text.getvalue())
