"""One error type for bad user input, and the wrapper that turns it into a one-line message.

Anything the user can fix (a missing folder, a malformed Folds.csv, a wrong config value) raises
`UserError` with a message that names the file, field or value and says what to do. Command-line
entry points run under `exit_on_user_error`, which prints that message as one line on stderr and
exits with status 2, without a traceback. Programming errors still raise normally.

A full disk, a read-only file system or a missing permission is also the user's to fix, wherever
it strikes (a checkpoint, the prepared data, a results or predictions file): `exit_on_user_error`
turns such an `OSError` into one line naming the path, even when a library wrapped it in its own
exception (Orbax reports the failure of an asynchronous checkpoint write that way).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys


class UserError(Exception):
  """Bad input that the user can fix; its message is shown as one line, without a traceback."""


# errno -> (verb, what happened, what to do): storage problems a user fixes outside jattn.
STORAGE_ERRNOS = {
    errno.ENOSPC: ("write", "no space left on device", "free some space (or write elsewhere)"),
    errno.EDQUOT: ("write", "disk quota exceeded", "free some space (or write elsewhere)"),
    errno.EROFS: ("write", "read-only file system", "make it writable or write elsewhere"),
    errno.EACCES: ("access", "permission denied", "fix its permissions or use another folder"),
    errno.EPERM: ("access", "operation not permitted", "fix its permissions or use another folder"),
}


_BY_TEXT = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # unambiguous in any library's message
# TensorStore (under Orbax) reports a failed write as a ValueError whose text ends like this.
_TENSORSTORE_ERRNO = re.compile(r"\[os_error_code='?(\d+)'?\]")


def causes(error: BaseException):
  """`error` and every exception behind it (causes, contexts, an exception group's members),
  each once."""
  seen, todo = set(), [error]
  while todo:
    e = todo.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    yield e
    todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


def storage_error(error: BaseException) -> OSError | None:
  """The full-disk / read-only / permission `OSError` behind `error` (its causes included)."""
  for e in causes(error):
    if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
      return e
    code = _TENSORSTORE_ERRNO.search(str(e))
    if code and int(code.group(1)) in STORAGE_ERRNOS:
      return OSError(int(code.group(1)), os.strerror(int(code.group(1))))
    for number in _BY_TEXT:  # C++ writers (array_record) quote strerror in a RuntimeError
      if os.strerror(number) in str(e):
        return OSError(number, os.strerror(number))
  return None


def storage_message(e: OSError, path: str | None = None) -> str:
  """One line: what failed where, that nothing written before is lost, and what to do."""
  verb, what, todo = STORAGE_ERRNOS[e.errno]
  where = path or e.filename or "a file"
  return (f"cannot {verb} {where}: {what} (errno {errno.errorcode[e.errno]}); {todo} and run the "
          f"same command again: everything written before is kept")


@contextlib.contextmanager
def writing(path: str):
  """Turns a full-disk / read-only / permission error inside the block into a `UserError`."""
  try:
    yield
  except UserError:
    raise
  except Exception as e:
    cause = storage_error(e)
    if cause is None:
      raise
    raise UserError(storage_message(cause, path)) from None


@contextlib.contextmanager
def exit_on_user_error(prog: str = "jattn"):
  """Within this context, a `UserError` (or a storage `OSError`, see above) prints
  `prog: error: <message>` and exits with status 2."""
  try:
    yield
  except UserError as e:
    _exit(prog, str(e))
  except Exception as e:
    cause = storage_error(e)
    if cause is None:
      raise
    _exit(prog, storage_message(cause))


def warn(message: str) -> None:
  """Prints `jattn: warning: <message>` as one line on stderr: something the user should know
  that does not stop the command (not a Python warning, which adds a source line)."""
  print(f"jattn: warning: {' '.join(message.split())}", file=sys.stderr, flush=True)


def _exit(prog: str, message: str):
  message = " ".join(message.split())  # one line, whatever the message holds
  print(f"{prog}: error: {message}", file=sys.stderr)
  raise SystemExit(2) from None
