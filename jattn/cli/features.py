"""Features of images or slides' tissue tiles through a backbone, as HDF5 files (CLAM's and
TRIDENT's layout).

  jattn features --workdir runs/x/fold1 --out DIR [--dtype float16|float32] [--batch-size 64]
  jattn features --config configs/resnet50.py [--config.FIELD=VALUE ...] --out DIR
  jattn features --workdir runs/x/fold1 --out DIR --slides SLIDE_OR_FOLDER... [--stratum 40X]
      [--mpp UM] [--tile-um W[,H]] [--min-tissue 0.5] [--stride 1] [--tissue saturation|od]
      [--threads N] [--overwrite]

Without --slides it writes the features of every image of the data set (the run's, or the
config's data source and fold) into DIR/<data set>.h5; with --slides, each slide's tissue tiles,
tiled as `jattn slide` tiles them, into DIR/<slide name>.h5. A file already written with the same
backbone and settings is skipped (a killed run resumes). The library: `jattn.inference.features`,
`jattn.slides.features`; the layout: docs/features.md.
"""

from __future__ import annotations

import argparse
import sys

from jattn.cli import common
from jattn.core import config_lib
from jattn.core.errors import UserError, exit_on_user_error
from jattn.inference import features
from jattn.slides import features as slide_features
from jattn.slides import pipeline, tissue

PROG = "jattn features"


def main(argv: list[str] | None = None) -> None:
  overrides, rest = config_lib.split_argv(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0] + " "
                                   + __doc__.split("\n")[1],
                                   epilog="With --config, override any field with "
                                          "--config.FIELD=VALUE.")
  parser.add_argument("--workdir", help="a trained run's work dir: its backbone and data")
  parser.add_argument("--config", help="a config file[:arg]: its model (with its converted "
                      "weights, config.pretrained) and data")
  parser.add_argument("--out", required=True, help="folder of the HDF5 files")
  parser.add_argument("--dtype", choices=features.DTYPES, default="float32",
                      help="of the features dataset (default float32)")
  parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
  parser.add_argument("--slides", nargs="+", help="slide files or folders: their tissue tiles")
  parser.add_argument("--stratum", help="the run's stratum whose scale tiles are read at")
  parser.add_argument("--mpp", type=float, help="the slides' level-0 microns per pixel, over "
                      "their metadata")
  parser.add_argument("--tile-um", type=common.field_um,
                      help="the field a tile covers, W,H in um (needed with --config)")
  parser.add_argument("--min-tissue", type=float, default=0.5)
  parser.add_argument("--stride", type=float, default=1.0)
  parser.add_argument("--tissue", choices=tissue.METHODS, default="saturation")
  parser.add_argument("--threads", type=int, default=pipeline.DEFAULT_THREADS)
  parser.add_argument("--overwrite", action="store_true",
                      help="replace files made with another backbone or other settings")
  args = parser.parse_args(rest)
  with exit_on_user_error(PROG):
    if (args.workdir is None) == (args.config is None):
      raise UserError("give the backbone as --workdir RUN or --config FILE (one of them)")
    if overrides and args.config is None:
      raise UserError(f"--config.{overrides[0].split('=')[0]}: overrides change a --config, not "
                      f"a run's recorded config")
    if args.batch_size < 1:
      raise UserError(f"--batch-size {args.batch_size}: give a positive number")
    if args.slides and args.config is not None and args.tile_um is None:
      raise UserError("--config has no training scale: give the field a tile covers with "
                      "--tile-um W,H (um), or a trained run's --workdir")
    backbone = (features.from_run(args.workdir) if args.workdir
                else features.from_config(args.config, overrides))
    if args.slides:
      options = pipeline.Options(stratum=args.stratum, mpp=args.mpp, tile_um=args.tile_um,
                                 min_tissue=args.min_tissue, stride=args.stride,
                                 tissue=args.tissue, batch_size=args.batch_size,
                                 threads=args.threads, overwrite=args.overwrite)
      slide_features.write_slides(backbone, args.slides, args.out, options, args.dtype)
    else:
      features.write_dataset(backbone, args.out, args.dtype, args.batch_size, args.overwrite)
