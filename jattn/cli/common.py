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
