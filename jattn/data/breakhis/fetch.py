"""Fetching BreakHis: download the official archive into the data dir and unpack it, once.

  jattn data download --data-dir data      # or config.data.breakhis.download=True in a run

The archive comes from `naming.ARCHIVE_URL` (or $JATTN_BREAKHIS_URL, e.g. a mirror) through
`jattn.core.download` (resumable, progress bar). It is unpacked by `scan.extract_archive`, which
checks every member and the layout before anything is renamed into place; an archive it refuses is
deleted and leaves no trace. Its publishers give no checksum, so the SHA-256 of the first download
that unpacked as BreakHis is recorded in `<data_dir>/downloads.json`, and a later download into the
same data dir (after the tree was deleted, or on another machine with the file copied along) must
match it (`forget_checksum=True`, `download --forget-checksum`, drops the record first). The archive
is then deleted unless asked to keep it. A data dir that already holds BreaKHis_v1 is left
untouched.
"""

from __future__ import annotations

import errno
import os

from jattn.core import download, files
from jattn.core.errors import UserError
from jattn.data.breakhis import naming
from jattn.data.breakhis import scan as scan_lib

URL_ENV = "JATTN_BREAKHIS_URL"  # overrides naming.ARCHIVE_URL (a mirror, a local server)
CHECKSUMS = "downloads.json"  # in the data dir: what was downloaded, its size and SHA-256


def archive_url() -> str:
  return os.environ.get(URL_ENV) or naming.ARCHIVE_URL


def ensure_breakhis(data_dir: str, *, url: str | None = None, keep_archive: bool = False,
                    forget_checksum: bool = False) -> str:
  """Makes `data_dir` hold BreaKHis_v1 (downloading and unpacking it if needed); says what it did.

  Returns 'present' (BreaKHis_v1 was there: nothing touched), 'unpacked' (an archive was there) or
  'downloaded'. Runs under the data dir's lock, so concurrent runs download once.
  `forget_checksum` first removes the SHA-256 recorded by an earlier download.
  """
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  hint = scan_lib.download_hint(data_dir, automatic=False)
  try:
    os.makedirs(data_dir, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create data_dir {data_dir} ({e.strerror}): {hint}") from None
  with files.locked(data_dir):
    checksums = os.path.join(data_dir, CHECKSUMS)
    if forget_checksum:
      _forget(checksums)
    if scan_lib.has_images_tree(data_dir):
      return "present"
    archive = os.path.join(data_dir, naming.ARCHIVE)
    fetched = not os.path.isfile(archive)
    known = download.recorded(checksums).get(naming.ARCHIVE, {}).get("sha256")
    if fetched:
      url = url or archive_url()
      print(f"downloading {url} into {data_dir}", flush=True)
      forget = (f"The expected SHA-256 is that of the first download into {data_dir}, recorded "
                f"in {checksums}; if the archive served now is the right one, forget the old one "
                f"with `jattn data download --data-dir {data_dir} --forget-checksum`. ")
      digest = download.fetch(url, archive, sha256=known, hint=hint, desc=naming.ARCHIVE,
                              on_mismatch=forget)
    print(f"unpacking {archive}", flush=True)
    try:
      scan_lib.extract_archive(data_dir)
    except UserError as e:
      disk_full = getattr(e.__cause__, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
      if fetched and not disk_full:  # not BreakHis, or broken: neither keep nor vouch for it
        files.remove(archive)
      raise
    if fetched and known is None:  # only an archive that unpacked as BreakHis is vouched for
      download.record(checksums, naming.ARCHIVE, url, archive, digest)
    if fetched and not keep_archive:
      files.remove(archive)
    return "downloaded" if fetched else "unpacked"


def _forget(checksums: str) -> None:
  """Drops the recorded SHA-256 of the archive from `checksums`, saying what it did."""
  entry = download.recorded(checksums).get(naming.ARCHIVE)
  if entry is None:
    print(f"no SHA-256 of {naming.ARCHIVE} recorded in {checksums}: nothing to forget",
          flush=True)
    return
  download.forget(checksums, naming.ARCHIVE)
  print(f"forgot the SHA-256 {str(entry.get('sha256'))[:16]}... of {naming.ARCHIVE} recorded "
        f"in {checksums}; the next download is recorded instead", flush=True)
