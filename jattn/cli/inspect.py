"""What the attention modules attend to, for a trained run and a few images
(`jattn.inference.attention_maps`).

  jattn inspect --workdir runs/demo_ours/fold1 IMAGE_OR_FOLDER... --out attention/ \\
      [--position 0.5,0.5]
"""

from __future__ import annotations

import argparse

from jattn.core.errors import exit_on_user_error
from jattn.inference import attention_maps

PROG = "jattn inspect"


def _position(text: str) -> tuple[float, float]:
  try:
    r, c = (float(x) for x in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: give row,col as fractions, e.g. 0.5,0.5") from None
  if not (0 <= r <= 1 and 0 <= c <= 1):
    raise argparse.ArgumentTypeError(f"{text!r}: row and col are fractions between 0 and 1")
  return r, c


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0] + " "
                                   + __doc__.split("\n")[1])
  parser.add_argument("--workdir", required=True, help="a run's work dir")
  parser.add_argument("--out", required=True, help="folder for the PNGs")
  parser.add_argument("--position", type=_position, default=(0.5, 0.5),
                      help="query position for S-Attn maps, as row,col fractions (default 0.5,0.5)")
  parser.add_argument("images", nargs="+", help="image files, or folders of them (searched "
                      "recursively)")
  args = parser.parse_args(argv)
  with exit_on_user_error(PROG):
    for path in attention_maps.inspect_images(args.workdir, args.images, args.out, args.position):
      print(path)
