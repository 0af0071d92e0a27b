"""Small file-system helpers: a lock for shared folders and atomic writes.

Several runs of a sweep may start at once on the same prepared folder, so every stage that writes
there runs under `locked(folder)`, and every file appears whole or not at all: it is written under a
temporary name in the same folder and renamed into place (`os.replace` is atomic on POSIX).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile


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


def temp_name(path: str) -> str:
  """A fresh name next to `path` (same folder, so the final rename is atomic)."""
  folder, name = os.path.split(os.path.abspath(path))
  return os.path.join(folder, f".{name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")


@contextlib.contextmanager
def atomic_path(path: str):
  """Yields a temporary path; on success renames it to `path`, on failure removes it."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = temp_name(path)
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    remove(tmp)
    raise


def atomic_write_text(path: str, text: str) -> None:
  """Writes `text` to `path` so that readers see the old file or the new one, never a part."""
  with atomic_path(path) as tmp:
    with open(tmp, "w", encoding="utf-8", newline="") as f:  # the text exactly as given
      f.write(text)


@contextlib.contextmanager
def atomic_folder(path: str):
  """Yields a temporary folder next to `path` and renames it to `path` when the block succeeds."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    remove(tmp)
    raise


def remove(path: str) -> None:
  """Removes a file or a folder tree if it exists."""
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    os.remove(path)
