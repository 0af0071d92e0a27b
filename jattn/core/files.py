"""Small file-system helpers: a lock for shared folders and atomic writes.

Several runs of a sweep may start at once on the same prepared folder, so every stage that writes
there runs under `locked(folder)`, and every file appears whole or not at all: it is written under a
temporary name in the same folder and renamed into place (`os.replace` is atomic on POSIX); a full
disk or read-only storage while writing is a one-line `UserError` naming the file. A run's work dir
is held with `locked_or_refuse` (a second run is refused, not queued), and `read_json` turns a file
cut short into one line.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from typing import Any

from jattn.core import errors
from jattn.core.errors import UserError


@contextlib.contextmanager
def locked(folder: str):
  """Holds an exclusive `flock` on `<folder>/.lock` (created if needed) while the block runs."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, ".lock"), "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def locked_or_refuse(folder: str, what: str = "folder", *, remove_unused: bool = False):
  """Holds `<folder>/.lock` while the block runs, or refuses at once if another process holds it.

  A run's work dir is locked this way for the whole run: a second run started on it stops with a
  one-line `UserError` instead of training alongside. On read-only storage nobody can write to the
  folder, so the block runs unlocked (a finished run still prints its results there). With
  `remove_unused`, a folder this call created and the block left holding only the lock is removed
  again (a run that stopped before writing anything leaves no trace).
  """
  require_folder(folder, what)
  folder = os.path.abspath(folder)
  created = []  # the folders makedirs creates, innermost first
  parent = folder
  while not os.path.exists(parent):
    created.append(parent)
    parent = os.path.dirname(parent)
  os.makedirs(folder, exist_ok=True)
  try:
    with _locked_or_refuse(folder, what):
      yield
  finally:
    if remove_unused and created:
      with contextlib.suppress(OSError):
        if os.listdir(folder) == [".lock"]:
          os.remove(os.path.join(folder, ".lock"))
          for path in created:
            os.rmdir(path)  # stops at the first that holds something else


@contextlib.contextmanager
def _locked_or_refuse(folder: str, what: str):
  path = os.path.join(folder, ".lock")
  try:
    f = open(path, "a")  # noqa: SIM115 -- closed below
  except OSError as e:
    if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
      raise
    if not os.path.exists(path):
      yield
      return
    f = open(path)  # noqa: SIM115 -- a read-only descriptor can still be locked
  with f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise UserError(f"{what} {folder} is in use by another process (it holds {path}); wait for "
                      f"it to finish, or use another folder") from None
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def require_folder(path: str, what: str = "folder") -> None:
  """Refuses, in one line, an existing file given where a folder is expected."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"{what} {path} is a file, not a folder: give the path of a folder (new or "
                    f"existing)")


def read_json(path: str, remedy: str) -> Any:
  """The JSON in `path`; a file cut short or otherwise unparseable is a one-line `UserError`."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path} is not valid JSON (truncated or damaged: {e}); {remedy}") from None


def temp_name(path: str) -> str:
  """A fresh name next to `path` (same folder, so the final rename is atomic)."""
  folder, name = os.path.split(os.path.abspath(path))
  return os.path.join(folder, f".{name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")


@contextlib.contextmanager
def _renamed_on_success(tmp: str, path: str):
  """Yields `tmp`; renames it to `path` when the block succeeds, removes it when it fails."""
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    remove(tmp)
    raise


@contextlib.contextmanager
def atomic_path(path: str):
  """Yields a temporary path; on success renames it to `path`, on failure removes it."""
  with errors.writing(path):  # a full disk or read-only storage: one line naming `path`
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with _renamed_on_success(temp_name(path), path) as tmp:
      yield tmp


def atomic_write_text(path: str, text: str) -> None:
  """Writes `text` to `path` so that readers see the old file or the new one, never a part."""
  with atomic_path(path) as tmp:
    with open(tmp, "w", encoding="utf-8", newline="") as f:  # the text exactly as given
      f.write(text)


@contextlib.contextmanager
def atomic_folder(path: str):
  """Yields a temporary folder next to `path` and renames it to `path` when the block succeeds;
  a full disk or read-only storage is one line naming `path`, as for `atomic_path`."""
  with errors.writing(path):
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with _renamed_on_success(
        tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent), path) as tmp:
      yield tmp


def remove(path: str) -> None:
  """Removes a file or a folder tree if it exists."""
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    os.remove(path)
