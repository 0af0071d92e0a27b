"""Small file-system helpers: a lock for shared folders and atomic writes.

Several runs of a sweep may start at once on the same prepared folder, so every stage that writes
there runs under `locked(folder)`, and every file appears whole or not at all: it is written under a
temporary name in the same folder and renamed into place (`os.replace` is atomic on POSIX); a full
disk or read-only storage while writing is a one-line `UserError` naming the file. A run's work dir
is held with `locked_or_refuse` (a second run is refused, not queued), and `read_json` turns a file
cut short into one line. `read_csv` is how every CSV a user gives is read (manifests, folds, slide
labels): UTF-8 with or without a byte-order mark, blank rows skipped, and a file in another
encoding, a workbook, a NUL byte or a field over the csv module's size limit one line naming the
file (and line).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import fcntl
import hashlib
import io
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


@dataclasses.dataclass(frozen=True)
class Csv:
  """A CSV as read by `read_csv`: its header (names stripped) and its non-blank rows."""

  path: str
  header: tuple[str, ...]
  rows: tuple[tuple[int, tuple[str, ...]], ...]  # (line number, values as written)

  def records(self):
    """(line, {column: value}) per row; a value the row lacks is '' (extra values are dropped)."""
    for line, values in self.rows:
      yield line, {c: values[i] if i < len(values) else "" for i, c in enumerate(self.header)}


_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")  # UTF-32's start with these too
_WORKBOOK_MAGIC = (b"PK\x03\x04", b"\xd0\xcf\x11\xe0")  # .xlsx (a zip) and the older .xls


def read_csv(path: str, what: str = "") -> Csv:
  """The header and rows of the CSV at `path`, read whole. UTF-8, with or without a byte-order
  mark; a row that is empty or only commas and spaces is skipped. Anything else is one
  `UserError` naming the file (`what`, e.g. '--labels ', comes before it) and, where there is one,
  the line: a file that cannot be read, a spreadsheet workbook, UTF-16 or other non-UTF-8 text
  (with the fix: save it as UTF-8), a NUL byte, or a field longer than `csv.field_size_limit()`
  characters (131,072 unless changed: most often an unclosed quote that runs on)."""
  where = f"{what}{path}"
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise UserError(f"{where}: cannot read it ({e.strerror or e})") from None
  save = ("save it as UTF-8 (in a spreadsheet: 'CSV UTF-8'; or `iconv -f latin1 -t utf-8`) and "
          "run again")
  if data.startswith(_WORKBOOK_MAGIC):
    raise UserError(f"{where} is a spreadsheet workbook, not a CSV: save it as CSV (UTF-8)")
  if data.startswith(_UTF16_BOMS):
    raise UserError(f"{where} is UTF-16 text (it starts with a UTF-16 byte-order mark), not "
                    f"UTF-8: {save}")
  try:
    text = data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise UserError(f"{where} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}; "
                    f"perhaps Latin-1 or Windows-1252, as spreadsheets often save): {save}"
                    ) from None
  if "\0" in text:
    line = text.count("\n", 0, text.index("\0")) + 1
    raise UserError(f"{where} line {line} holds a NUL byte: not a text CSV; save it as CSV "
                    f"(UTF-8)")
  reader = csv.reader(io.StringIO(text, newline=""))
  rows = []
  try:
    for values in reader:
      if any(v.strip() for v in values):
        rows.append((reader.line_num, tuple(values)))
  except csv.Error as e:
    limit = csv.field_size_limit()
    if "field limit" in str(e):
      raise UserError(f"{where} line {reader.line_num}: a field longer than {limit:,} "
                      f"characters, more than a CSV cell may hold here (most often an unclosed "
                      f"quote \" that runs on over later lines): fix that row") from None
    raise UserError(f"{where} line {reader.line_num}: not a valid CSV row ({e})") from None
  if not rows:
    return Csv(path, (), ())
  (_, first), *rows = rows
  header = tuple(c.strip().lstrip("\ufeff").strip() for c in first)
  return Csv(path, header, tuple(rows))


def separator_hint(header) -> str:
  """' (...)' when a header that lacks the columns looks separated by ';' or tabs, else ''."""
  joined = ",".join(header)
  for sep, name in ((";", "semicolons"), ("\t", "tabs")):
    if len(header) == 1 and sep in joined:
      return (f" (its header looks separated by {name}: save it comma-separated, as a "
              f"spreadsheet's 'CSV UTF-8 (comma delimited)')")
  return ""


def sha256(path: str) -> str:
  """The sha256 of a file's bytes, read a megabyte at a time (weights files, annotations)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


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
