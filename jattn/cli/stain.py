"""A PNG grid of Macenko stain normalisation (`jattn.data.stain`): per row an image, then two
recolourings of it (another centre's staining), each followed by its normalisation.

  jattn stain --out grid.png [--workdir RUN | --reference IMAGE...] [IMAGE...]
"""

from __future__ import annotations

import argparse

from PIL import Image

from jattn.core import files
from jattn.core.errors import UserError, exit_on_user_error
from jattn.data import preview as preview_lib
from jattn.data import stain
from jattn.inference import runs
from jattn.inference.predict import load_images

PROG = "jattn stain"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog=PROG,
      description="A PNG grid of Macenko stain normalisation: per row an image, then two "
                  "recolourings of it (another centre's staining), each followed by its "
                  "normalisation to the reference.")
  parser.add_argument("--out", required=True, help="the PNG file to write")
  parser.add_argument("--workdir", help="use this run's recorded reference (a run trained with "
                      "--config.stain_norm=macenko)")
  parser.add_argument("--reference", nargs="+", help="fit the reference on these images "
                      "(default: the images shown)")
  parser.add_argument("--size", type=int, default=128, help="pixels per tile (default 128)")
  parser.add_argument("--rows", type=int, default=4, help="synthetic images, without IMAGE")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("images", nargs="*", help="image files (default: synthetic H&E-like)")
  args = parser.parse_args(argv)
  with exit_on_user_error(PROG):
    if args.size < 16 or args.rows < 1:
      raise UserError(f"--size {args.size} --rows {args.rows}: give at least 16 pixels and 1 row")
    images = (load_images(args.images, args.size) if args.images
              else preview_lib.synthetic.sample_images(args.rows, args.size, args.seed))
    if args.workdir:
      reference = runs.stain_reference(args.workdir)
    else:
      reference = stain.fit_reference(load_images(args.reference, args.size) if args.reference
                                      else images, what="the reference images")
    grid = stain.preview(images, reference)
    with files.atomic_path(args.out) as tmp:
      Image.fromarray(grid).save(tmp, format="PNG", optimize=True)
    print(f"wrote {args.out}: {len(images)} rows of 6 tiles")
