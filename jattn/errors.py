"""One error type for bad user input, and the wrapper that turns it into a one-line message.

Anything the user can fix (a missing folder, a malformed Folds.csv, a wrong config value) raises
`UserError` with a message that names the file, field or value and says what to do. Command-line
entry points run under `exit_on_user_error`, which prints that message as one line on stderr and
exits with status 2, without a traceback. Programming errors still raise normally.
"""

from __future__ import annotations

import contextlib
import sys


class UserError(Exception):
  """Bad input that the user can fix; its message is shown as one line, without a traceback."""


@contextlib.contextmanager
def exit_on_user_error(prog: str = "jattn"):
  """Within this context, a `UserError` prints `prog: error: <message>` and exits with status 2."""
  try:
    yield
  except UserError as e:
    message = " ".join(str(e).split())  # one line, whatever the message holds
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2) from None
