"""The `jattn` command: one module per subcommand, each parsing its arguments and calling the
library. Nothing in the library imports this package.

  jattn <command> [options]        (or: python -m jattn <command> [options])
  jattn <command> --help
"""

from __future__ import annotations

import importlib
import sys

# name: (module under jattn.cli, what it does in one line)
COMMANDS = {
    "train": ("train", "train and evaluate one fold of a config (jattn train is the same)"),
    "sweep": ("sweep", "configs x folds x seeds, one run each, then the tables and comparisons"),
    "tables": ("tables", "the paper's Tables 1-2 and the paired comparisons of a sweep folder"),
    "predict": ("predict", "a finished run's predictions for image files, folders or a manifest"),
    "inspect": ("inspect", "what the attention modules attend to, as figures"),
    "validate-external": ("validate_external",
                          "score a finished run on every image of another labelled set"),
    "slide": ("slide", "whole-slide images through a run: heatmaps, QuPath GeoJSON, cohorts"),
    "stain": ("stain", "a PNG grid of Macenko stain normalisation"),
    "convert": ("convert", "PyTorch weights (torchvision, the authors') into jattn's format"),
    "data": ("data", "BreakHis: download, synthesize, describe, export, preview augmentation"),
    "benchmark": ("benchmark", "how fast the steps run here, beside PyTorch; profile, roofline"),
    "models": ("models", "parameters per module and forward FLOPs of a config's model"),
    "features": ("features", "a backbone's features of a data set or slides' tiles, as HDF5"),
}


def usage() -> str:
  width = max(map(len, COMMANDS))
  rows = "\n".join(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items())
  return (f"usage: jattn <command> [options]   (jattn <command> --help for its options)\n\n"
          f"commands:\n{rows}\n")


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help"):
    print(usage(), end="")
    sys.exit(0 if argv else 2)
  name, rest = argv[0], argv[1:]
  if name not in COMMANDS:
    print(f"jattn: error: unknown command {name!r}: choose one of {', '.join(COMMANDS)}",
          file=sys.stderr)
    sys.exit(2)
  module = importlib.import_module(f"jattn.cli.{COMMANDS[name][0]}")
  module.main(rest)
