"""What several commands share."""

from __future__ import annotations

import argparse

from jattn.core.errors import UserError, exit_on_user_error
from jattn.inference import external


def refuse_stain_norm(argv, prog: str) -> None:
  """Exits with the refusal (status 2) if `argv` of a scoring command asks for a stain
  normalisation; does nothing otherwise."""
  asked = external.stain_norm_asked(argv)
  if asked is None:
    return
  known, _ = _workdir_parser().parse_known_args(list(argv))
  with exit_on_user_error(prog):
    raise UserError(external.stain_norm_refusal(asked, known.workdir))


def _workdir_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(add_help=False)
  parser.add_argument("--workdir")
  return parser


def field_um(text: str) -> tuple[float, float]:
  """`--tile-um W,H` (or one number for a square): the field a tile covers, in um."""
  try:
    values = [float(v) for v in text.split(",")]
  except ValueError:
    values = []
  if len(values) not in (1, 2):
    raise argparse.ArgumentTypeError(f"{text!r}: give the field's width and height in um, W,H "
                                     f"(or one number for a square)")
  return (values[0], values[-1])
