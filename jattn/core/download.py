"""Resumable downloads with a progress bar and a SHA-256 check, for BreakHis and ImageNet weights.

  digest = download.fetch(url, dest, hint="download URL by hand into DIR", sha256=None)

The file grows as `<dest>.part` and is renamed to `dest` only once it is complete and its checksum
matches, so `dest` is whole or absent. A cut connection or a full disk keeps the `.part` file and
says so; the same call then resumes from its end with an HTTP Range request (a server that ignores
Range sends the file again from its start). A checksum mismatch discards it. Every failure is one
`UserError` line that ends with `hint`: what to download by hand and where to put it.

Why not TFDS's `tfds.download.DownloadManager`: it runs without TensorFlow here (tfds 4.9.10) and
records checksums, but every try downloads from byte 0 into a fresh `<name>.tmp.<uuid>` folder; for
a multi-GB archive on a university server a resume is what matters. HTTP goes through `requests`
(a TFDS dependency), which honours the usual proxy variables (HTTPS_PROXY, NO_PROXY).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
import urllib.parse

import requests
import urllib3
from tqdm import tqdm

from jattn.core import files
from jattn.core.errors import UserError

CHUNK = 1 << 20
TIMEOUT_S = 60  # seconds without a byte before a try gives up (it can then be resumed)


def sha256_of(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(CHUNK), b""):
      h.update(chunk)
  return h.hexdigest()


def part_path(dest: str) -> str:
  return dest + ".part"


def _size(n: int | None) -> str:
  return "unknown size" if n is None else f"{n / 2**20:,.1f} MiB"


def _reason(e: BaseException) -> str:
  """The cause of a requests/urllib3 error, short: '[Errno 111] Connection refused', not reprs."""
  text = " ".join(str(e).split())
  found = re.search(r"\[Errno -?\d+\] [^'\")]*", text)
  if found:
    return found.group(0)
  return (text[:160] + "...") if len(text) > 160 else text or type(e).__name__


def fetch(url: str, dest: str, *, hint: str, sha256: str | None = None,
          sha256_prefix: str | None = None, desc: str | None = None,
          on_mismatch: str = "") -> str:
  """Downloads `url` to `dest` (resuming `<dest>.part`); returns the file's SHA-256 (hex).

  `sha256` (full) or `sha256_prefix` (e.g. torchvision's 8 digits) must match when given; a file
  that does not is deleted, and the error says `on_mismatch` (where the expected value comes from,
  how to forget it) before `hint`. `dest` must not exist: callers decide what an existing file
  means.
  """
  dest = os.path.abspath(dest)
  if os.path.exists(dest):
    raise FileExistsError(dest)
  part = part_path(dest)
  os.makedirs(os.path.dirname(dest), exist_ok=True)
  have = os.path.getsize(part) if os.path.exists(part) else 0
  host = urllib.parse.urlsplit(url).netloc or url
  headers = {"Accept-Encoding": "identity"}  # the bytes as stored: Range offsets stay valid
  if have:
    headers["Range"] = f"bytes={have}-"
  try:
    response = requests.get(url, headers=headers, stream=True, timeout=TIMEOUT_S)
  except requests.exceptions.ProxyError as e:
    raise UserError(f"cannot reach {host} through the proxy ({_reason(e)}): {hint}") from None
  except requests.exceptions.TooManyRedirects:
    raise UserError(f"too many redirects from {url} (more than "
                    f"{requests.models.DEFAULT_REDIRECT_LIMIT}, a redirect loop): that server or "
                    f"mirror is misconfigured, the network is fine; use another URL, or {hint}") \
        from None
  except requests.RequestException as e:
    raise UserError(f"cannot reach {host} (offline? {_reason(e)}): {hint}") from None
  with response:
    if response.status_code == 416 and have:  # nothing after byte `have`: the part is whole
      total = have
    elif response.status_code >= 400:
      raise UserError(f"{url} answered HTTP {response.status_code} {response.reason}: {hint}")
    else:
      if response.status_code != 206:  # the server ignored Range: start again
        have = 0
      length = response.headers.get("Content-Length")
      total = have + int(length) if length is not None else None
      _check_space(part, (total or 0) - have, hint)
      _stream(response, part, have, total, desc or os.path.basename(dest), url, hint)
  got = os.path.getsize(part)
  if total is not None and got != total:
    raise UserError(f"the download of {url} stopped at {got:,} of {total:,} bytes; run the same "
                    f"command again to resume {part}, or {hint}")
  digest = sha256_of(part)
  want = sha256 or sha256_prefix
  if want and not digest.startswith(want.lower()):
    files.remove(part)
    raise UserError(f"{url}: checksum mismatch (SHA-256 {digest[:16]}..., expected {want}); the "
                    f"file was discarded. {on_mismatch}Run again, or {hint}")
  os.replace(part, dest)
  return digest


def _check_space(path: str, needed: int, hint: str) -> None:
  free = shutil.disk_usage(os.path.dirname(path)).free
  if needed > free:
    raise UserError(f"not enough disk space for {path}: {_size(needed)} to download, "
                    f"{_size(free)} free; free some space and run again, or {hint}")


def _stream(response, part: str, have: int, total: int | None, desc: str, url: str,
            hint: str) -> None:
  """Appends the body of `response` to `part` (from byte `have`), with a progress bar."""
  bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
             dynamic_ncols=True, disable=None)
  try:
    with open(part, "ab" if have else "wb") as f:
      try:
        for chunk in response.raw.stream(CHUNK, decode_content=False):
          f.write(chunk)
          bar.update(len(chunk))
      except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
        f.flush()
        of = f" of {total:,}" if total is not None else ""
        raise UserError(f"the download of {url} was cut at {f.tell():,}{of} bytes "
                        f"({_reason(e)}); run the same command again to resume {part}, or "
                        f"{hint}") from None
  except OSError as e:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
      raise UserError(f"disk full while writing {part}; free some space and run the same command "
                      f"again to resume it, or {hint}") from None
    raise
  finally:
    bar.close()


def record(json_path: str, name: str, url: str, path: str, digest: str) -> None:
  """Adds {name: {url, bytes, sha256, recorded}} to the small JSON of checksums at `json_path`."""
  entries = recorded(json_path)
  entries[name] = {"url": url, "bytes": os.path.getsize(path), "sha256": digest,
                   "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
  files.atomic_write_text(json_path, json.dumps(entries, indent=2, sort_keys=True) + "\n")


def forget(json_path: str, name: str) -> None:
  """Removes `name` from the checksums JSON at `json_path` (the file goes when it empties)."""
  entries = recorded(json_path)
  entries.pop(name, None)
  if entries:
    files.atomic_write_text(json_path, json.dumps(entries, indent=2, sort_keys=True) + "\n")
  else:
    files.remove(json_path)


def recorded(json_path: str) -> dict:
  """The entries of a checksums JSON written by `record` ({} when there is none)."""
  if not os.path.exists(json_path):
    return {}
  try:
    with open(json_path) as f:
      entries = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f"{json_path} is not a readable checksums file ({e}); fix or delete it") \
        from None
  if not isinstance(entries, dict):
    raise UserError(f"{json_path} is not a checksums file (a JSON object); fix or delete it")
  return entries
