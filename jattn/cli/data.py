"""Command line of jattn.data: fetch BreakHis, generate a synthetic tree, describe a tree and its
folds, or preview the augmentation.

  jattn data download [--data-dir data] [--url URL] [--keep-archive] [--no-image-check]
      [--forget-checksum]
  jattn data synthesize --out DIR [--images-per-patient 4 | --counts real]
      [--width 700 --height 460] [--seed 0] [--no-junk] [--odd-sizes 3] [--no-folds]
      [--format breakhis|folder]
  jattn data describe --source DATA_DIR [--folds FOLDS_CSV_OR_MKFOLD] [--seed 0]
      [--json] [--no-image-check] [--threads 2]
  jattn data augment-preview --out GRID.png [--config configs/ours_stain.py]
      [--rows 4] [--samples 7] [--seed 0] [IMAGE...]

`download` fetches BreaKHis_v1.tar.gz (resumable; jattn.data.breakhis.fetch), checks and unpacks
it into DATA_DIR, records its SHA-256 in DATA_DIR/downloads.json (a later download must match it;
--forget-checksum drops the record first), deletes the archive (unless --keep-archive) and then
describes the data set as `describe` does. A DATA_DIR that holds BreaKHis_v1 is not touched.

`synthesize --format folder` writes the same synthetic images as a folder per class with a
manifest and the generated folds (`jattn.data.breakhis.export`), the folder source's demo data.

`describe`: see `jattn.data.breakhis.describe`, whose docstring lists its --json keys.

Errors are one line on stderr, exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from jattn.core import files
from jattn.core.errors import UserError, exit_on_user_error
from jattn.data import preview
from jattn.data.breakhis import describe, export, fetch, naming, synthetic
from jattn.data.breakhis import folds as folds_lib
from jattn.training import compat

PROG = "jattn data"


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  dl = commands.add_parser("download", help="download and unpack BreakHis, then describe it")
  dl.add_argument("--data-dir", default="data", help="the folder to hold BreaKHis_v1")
  dl.add_argument("--url", help="where to download from (default: $JATTN_BREAKHIS_URL or the "
                  "official archive)")
  dl.add_argument("--keep-archive", action="store_true", help="keep BreaKHis_v1.tar.gz")
  dl.add_argument("--no-image-check", action="store_true", help="do not decode every image")
  dl.add_argument("--forget-checksum", action="store_true",
                  help="forget the SHA-256 recorded in DATA_DIR/downloads.json by an earlier "
                  "download (when the archive served now is the right one)")
  preview = commands.add_parser("augment-preview", help="a PNG grid of augmented samples")
  preview.add_argument("--out", required=True, help="the PNG file to write")
  preview.add_argument("--config", default="configs/ours_stain.py",
                       help="the config whose `augment` fields are shown")
  preview.add_argument("--rows", type=int, default=4, help="synthetic images (without IMAGE)")
  preview.add_argument("--samples", type=int, default=7, help="augmented draws per image")
  preview.add_argument("--seed", type=int, default=0)
  preview.add_argument("images", nargs="*", help="image files (default: synthetic H&E-like)")
  syn = commands.add_parser("synthesize", help="write a synthetic BreaKHis_v1 tree")
  syn.add_argument(
      "--out", required=True, help="folder to hold BreaKHis_v1 (and Folds.csv, mkfold/)"
  )
  syn.add_argument("--images-per-patient", type=int, default=4, help="per magnification")
  syn.add_argument("--counts", choices=["real"], help="'real': BreakHis' 7,909 images")
  syn.add_argument("--width", type=int, default=700)
  syn.add_argument("--height", type=int, default=460)
  syn.add_argument("--seed", type=int, default=0)
  syn.add_argument("--no-junk", action="store_true", help="no Thumbs.db, .DS_Store, ._*, .txt")
  syn.add_argument("--odd-sizes", type=int, default=3, help="images a few pixels off the size")
  syn.add_argument("--no-folds", action="store_true", help="no Folds.csv and mkfold/")
  syn.add_argument("--threads", type=int, default=None)
  syn.add_argument("--format", choices=["breakhis", "folder"], default="breakhis",
                   help="'folder': OUT/<class>/*.png with manifest.csv and folds.csv (the folder "
                   "source's form) instead of BreaKHis_v1")
  desc = commands.add_parser("describe", help="counts and problems of a tree and its folds")
  desc.add_argument("--source", required=True, help="the folder that holds BreaKHis_v1")
  desc.add_argument("--folds", help="'generated' (the default), a Folds.csv or an mkfold folder")
  desc.add_argument("--seed", type=int, default=0, help="seed of the generated folds")
  desc.add_argument("--json", action="store_true", help="print one JSON object")
  desc.add_argument("--no-image-check", action="store_true", help="do not decode every image")
  desc.add_argument("--threads", type=int, default=2)
  return parser


def _synthesize_folder(out: str, options: dict) -> dict:
  """A synthetic BreakHis written as a folder per class with a manifest and its generated folds
  (into the new or empty folder `out`)."""

  out = os.path.abspath(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise UserError(f"{out} exists and is not an empty folder: choose a new folder")
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tree = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.synthesizing-", dir=parent)
  try:
    summary = synthetic.synthesize(tree, folds_csv=True, mkfold=False, **options)
    folds = folds_lib.read_folds_csv(summary["folds_csv"])
    return {**export.to_folder(tree, out, folds=folds),
            **{k: summary[k] for k in ("patients", "size", "seed")}}
  finally:
    files.remove(tree)


def main(argv=None) -> None:
  args = _parser().parse_args(argv)
  with exit_on_user_error(PROG):
    if args.command == "download":
      did = fetch.ensure_breakhis(args.data_dir, url=args.url, keep_archive=args.keep_archive,
                                  forget_checksum=args.forget_checksum)
      if did == "present":
        print(f"{os.path.abspath(args.data_dir)} already holds {naming.ROOT}: nothing "
              f"downloaded", flush=True)
      found = describe.describe(args.data_dir, check_images=not args.no_image_check)
      print(describe.format_description(found))
    elif args.command == "augment-preview":
      config = compat.load_config(args.config)
      rows, columns = preview.write_preview(config, args.out, args.images, rows=args.rows,
                                            samples=args.samples, seed=args.seed)
      print(f"wrote {args.out}: {rows} image(s), each as given and in {columns - 1} draws of "
            f"{args.config}'s augmentation {config.augment.to_dict()}")
    elif args.command == "synthesize":
      options = dict(
          images_per_patient=args.images_per_patient, counts=args.counts, width=args.width,
          height=args.height, seed=args.seed, junk=not args.no_junk, odd_sizes=args.odd_sizes,
          threads=args.threads, progress=True)
      if args.format == "folder":
        print(json.dumps(_synthesize_folder(args.out, options), indent=1))
      else:
        summary = synthetic.synthesize(
            args.out, folds_csv=not args.no_folds, mkfold=not args.no_folds, **options)
        print(json.dumps(summary, indent=1))
    else:
      d = describe.describe(
          args.source,
          folds=args.folds,
          seed=args.seed,
          check_images=not args.no_image_check,
          threads=args.threads,
      )
      print(json.dumps(d) if args.json else describe.format_description(d))
  sys.stdout.flush()


