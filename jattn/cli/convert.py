"""PyTorch weights (torchvision's ImageNet models, the authors' checkpoints) into jattn's format
(`jattn.models.weights`).

  jattn convert --download vgg19      # fetch, check and convert into pretrained/vgg19
  jattn convert --source torchvision --arch vgg19 --pth vgg19-dcbb9e9d.pth --out pretrained/vgg19
  jattn convert --source reference --config configs/reference.py --pth model.pth --out DIR
"""

from __future__ import annotations

import argparse

from jattn.core.errors import exit_on_user_error
from jattn.models import weights

PROG = "jattn convert"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0] + " "
                                   + __doc__.split("\n")[1])
  parser.add_argument("--source", choices=weights.SOURCES)
  parser.add_argument("--arch", choices=sorted(weights.archs()), help="torchvision architecture")
  parser.add_argument("--config", help="for --source reference: the config whose model it is")
  parser.add_argument("--pth", help="the PyTorch state dict (.pth)")
  parser.add_argument("--out", help="folder to write; point config.pretrained at it")
  parser.add_argument("--download", choices=sorted(weights.TORCHVISION_FILES),
                      help="fetch torchvision's ImageNet checkpoint and convert it (into "
                      "pretrained/ARCH unless --out)")
  parser.add_argument("--keep-pth", action="store_true", help="with --download: keep the .pth")
  args = parser.parse_args(argv)
  if args.download:
    with exit_on_user_error(PROG):
      weights.download_torchvision(args.download, args.out, keep_pth=args.keep_pth)
    return
  for flag in ("source", "pth", "out"):
    if getattr(args, flag) is None:
      parser.error(f"--{flag} is required (or --download ARCH: "
                   f"{', '.join(weights.TORCHVISION_FILES)})")
  with exit_on_user_error(PROG):
    n = weights.convert(args.source, args.pth, args.out, arch=args.arch, config=args.config)
    print(f"wrote {n:,} parameters from {args.pth} to {args.out}")
