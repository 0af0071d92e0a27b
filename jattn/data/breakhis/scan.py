"""Finding BreakHis on disk: the data dir, its archive, and the images it holds.

`scan(data_dir)` walks `<data_dir>/BreaKHis_v1/histology_slides/breast/` and returns one `Record`
per well-named PNG, plus the problems it found, as text that names the file: a PNG whose name breaks
the convention (left out), a file whose folders disagree with its name (kept: the name decides), a
file name seen twice (the second left out). Linked folders are followed (data sets get spread over
disks); a link cycle is refused. Junk that archives carry (`Thumbs.db`, `.DS_Store`,
`._*`, text files) is not an image and is only listed in `Scan.ignored`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import hashlib
import os
import posixpath
import tarfile
import tempfile

import tqdm
from PIL import Image

from jattn.core import files
from jattn.core.errors import UserError
from jattn.data.breakhis import naming


def download_hint(data_dir: str, automatic: bool = True) -> str:
  """What to download, where to put it and which flag to set: the end of every 'no data' error.

  `automatic` adds the command that downloads it (left out when that command is what failed).
  """
  command = (f"; `jattn data download --data-dir {data_dir}` does both" if automatic
             else "")
  return (
      f"download {naming.ARCHIVE_URL} (linked from {naming.DOWNLOAD_URL}) and unpack it into "
      f"{data_dir} so that {os.path.join(data_dir, 'BreaKHis_v1', 'histology_slides')} exists (or "
      f"put the archive itself there{command}), or set --config.data.dir=DIR to the folder that "
      f"holds BreaKHis_v1"
  )


def slides_dir(data_dir: str) -> str:
  return os.path.join(data_dir, *naming.SLIDES.split("/"))


def has_images_tree(data_dir: str) -> bool:
  return os.path.isdir(os.path.join(data_dir, naming.ROOT))


def has_archive(data_dir: str) -> bool:
  return os.path.isfile(os.path.join(data_dir, naming.ARCHIVE))


def resolve_data_dir(path: str) -> str:
  """The data dir meant by `path`: its folder when `path` is the archive BreaKHis_v1.tar.gz."""
  if os.path.isfile(path):
    if os.path.basename(path) == naming.ARCHIVE:
      return os.path.dirname(os.path.abspath(path))
    raise UserError(f"data_dir {path} is a file: set it to the folder that holds BreaKHis_v1 (or "
                    f"{naming.ARCHIVE})")
  return path


def check_data_dir(data_dir: str) -> None:
  """Raises a `UserError` saying what to do when `data_dir` holds neither BreakHis nor archive."""
  if not os.path.isdir(data_dir):
    raise UserError(f"data_dir {data_dir} does not exist: {download_hint(data_dir)}")
  if has_images_tree(data_dir) or has_archive(data_dir):
    return
  for inner in ("histology_slides", "breast", "benign", "malignant"):
    if os.path.isdir(os.path.join(data_dir, inner)):
      raise UserError(
          f"data_dir {data_dir} looks like a folder inside BreaKHis_v1 (it holds {inner}/): set "
          f"--config.data.dir to the folder that holds BreaKHis_v1 itself"
      )
  raise UserError(f"data_dir {data_dir} holds no BreaKHis_v1 folder: {download_hint(data_dir)}")


# More members than BreakHis' archive could hold (about 8,300: its 7,909 images and their folders):
# an archive past this is not BreakHis, and is refused before it fills the disk with empty files.
MAX_ARCHIVE_MEMBERS = 20_000


def _not_breakhis(archive: str, why: str) -> UserError:
  return UserError(f"{archive} is not the BreakHis archive ({why}): nothing was unpacked; download "
                   f"it again from {naming.ARCHIVE_URL} (linked from {naming.DOWNLOAD_URL})")


def _member_filter(archive: str, found_png: list[bool]):
  """A tarfile extraction filter: tarfile's 'data' filter, after BreakHis' own checks.

  Refuses absolute and `..` member names, links that replace a folder of BreakHis' image path or
  point out of BreaKHis_v1, and more than `MAX_ARCHIVE_MEMBERS` members; skips members outside
  BreaKHis_v1 (they would be discarded anyway). Sets `found_png[0]` once an image is seen.
  """
  count = 0
  path_folders = {"/".join(naming.SLIDES.split("/")[:k]) for k in range(1, 4)}

  def check(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    nonlocal count
    count += 1
    if count > MAX_ARCHIVE_MEMBERS:
      raise _not_breakhis(archive, f"it holds more than {MAX_ARCHIVE_MEMBERS:,} members; "
                                   f"BreakHis' has about 8,300")
    name = member.name.replace("\\", "/")
    if name.startswith("/") or os.path.isabs(member.name):
      raise _not_breakhis(archive, f"member {member.name!r} has an absolute path")
    if ".." in name.split("/"):
      raise _not_breakhis(archive, f"member {member.name!r} climbs out with '..'")
    norm = posixpath.normpath(name)
    inside = norm == naming.ROOT or norm.startswith(naming.ROOT + "/")
    if not inside:
      return None
    if member.issym() or member.islnk():
      if norm in path_folders:
        raise _not_breakhis(archive, f"member {norm} is a link, not the folder of BreakHis' "
                                     f"images")
      link = member.linkname.replace("\\", "/")
      target = posixpath.normpath(
          link if member.islnk() else posixpath.join(posixpath.dirname(norm), link)
      )
      if link.startswith("/") or not target.startswith(naming.ROOT + "/"):
        raise _not_breakhis(archive, f"link {norm} -> {member.linkname} points out of "
                                     f"{naming.ROOT}")
    elif (member.isfile() and norm.startswith(naming.SLIDES + "/")
          and not is_junk(posixpath.basename(norm))):
      found_png[0] = True
    return tarfile.data_filter(member, dest)

  return check


def extract_archive(data_dir: str) -> bool:
  """Unpacks `<data_dir>/BreaKHis_v1.tar.gz` once (when BreaKHis_v1 is absent); True if it did.

  Each member is checked as it is read (`_member_filter`, then tarfile's 'data' filter: no
  absolute paths, links out of the tree or devices) and unpacked into a temporary folder; only an
  archive that gave a real `BreaKHis_v1/histology_slides/breast/` with images is renamed into
  place, so a refused or failed one leaves nothing behind. Run it under a lock when several
  processes may share the data dir.
  """
  archive = os.path.join(data_dir, naming.ARCHIVE)
  target = os.path.join(data_dir, naming.ROOT)
  if os.path.isdir(target) or not os.path.isfile(archive):
    return False
  tmp = tempfile.mkdtemp(prefix=".BreaKHis_v1.unpacking-", dir=data_dir)
  found_png = [False]
  try:
    try:
      with tarfile.open(archive, "r:*") as tar:
        tar.extractall(tmp, filter=_member_filter(archive, found_png))
    except OSError as e:
      if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        raise UserError(f"cannot unpack {archive} ({e}): download it again from "
                        f"{naming.ARCHIVE_URL}") from e
      raise UserError(f"disk full while unpacking {archive} into {data_dir}: free some space "
                      f"(BreakHis needs about as much as the archive again) and run again") from e
    except (tarfile.TarError, EOFError) as e:
      raise UserError(
          f"cannot unpack {archive} ({e}): download it again from {naming.DOWNLOAD_URL}"
      ) from e
    unpacked = os.path.join(tmp, naming.ROOT)
    if not os.path.isdir(unpacked) or os.path.islink(unpacked):
      raise _not_breakhis(archive, f"it holds no {naming.ROOT}/ folder")
    if not os.path.isdir(slides_dir(tmp)):
      raise _not_breakhis(archive, f"it holds no {naming.SLIDES}/ folder")
    if not found_png[0]:
      raise _not_breakhis(archive, f"it holds no PNG image under {naming.SLIDES}/")
    os.replace(unpacked, target)
  finally:
    files.remove(tmp)
  return True


def is_junk(name: str) -> bool:
  """Not an image: hidden files (`.DS_Store`, `._*`), `Thumbs.db`, text, anything but .png."""
  return name.startswith(".") or not name.lower().endswith(".png")


@dataclasses.dataclass(frozen=True)
class Scan:
  """What a walk of the image tree found."""

  data_dir: str
  records: tuple[naming.Record, ...]  # sorted by path; file names are unique
  sizes: tuple[int, ...]  # bytes of each record's file, in the same order
  problems: tuple[str, ...]  # one line each, naming the file
  ignored: tuple[str, ...]  # junk files (paths relative to data_dir)

  @property
  def fingerprint(self) -> str:
    """Identifies the images (paths and sizes): a prepared cache is valid only for this value."""
    return fingerprint(self.files)

  @property
  def files(self) -> tuple[tuple[str, int], ...]:
    return tuple(zip((r.path for r in self.records), self.sizes, strict=True))


def fingerprint(files_and_sizes) -> str:
  h = hashlib.sha256()
  for path, size in sorted(files_and_sizes):
    h.update(f"{path}\t{size}\n".encode())
  return h.hexdigest()[:20]


def scan(data_dir: str) -> Scan:
  """Walks the image tree of `data_dir` (the folder holding BreaKHis_v1): records and problems."""
  data_dir = os.path.abspath(data_dir)
  check_data_dir(data_dir)
  root = slides_dir(data_dir)
  if not os.path.isdir(root):
    if has_archive(data_dir) and not has_images_tree(data_dir):
      raise UserError(
          f"{os.path.join(data_dir, naming.ARCHIVE)} is not unpacked yet: unpack it with "
          f"`tar -xzf {naming.ARCHIVE}` inside {data_dir} (training does this itself)"
      )
    raise UserError(f"{data_dir} has no {naming.SLIDES}/ folder: {download_hint(data_dir)}")
  records, sizes, problems, ignored = [], [], [], []
  first_seen: dict[str, str] = {}
  reached: dict[str, str] = {}  # real path of each folder walked -> the path it was reached by
  for folder, dirnames, names in os.walk(root, followlinks=True):  # data sets spread over disks
    real = os.path.realpath(folder)
    if real in reached:
      raise UserError(f"{folder} is a link to {reached[real]}, which the scan of {root} reaches "
                      f"already (a link cycle, or one folder linked twice): remove that link")
    reached[real] = folder
    dirnames.sort()
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    prefix = os.path.relpath(folder, data_dir).replace(os.sep, "/") + "/"
    for name in sorted(names):
      full = os.path.join(folder, name)
      path = prefix + name
      if is_junk(name):
        ignored.append(path)
        continue
      if not os.path.exists(full):
        problems.append(f"broken link: {path} points to a missing file; it is left out")
        continue
      try:
        record = naming.record(path)
      except ValueError as e:
        problems.append(f"unparseable name: {path}: {e}")
        continue
      if name in first_seen:
        problems.append(
            f"duplicate file name: {path} repeats {first_seen[name]}; the second is left out, "
            f"remove one of them"
        )
        continue
      first_seen[name] = path
      expected = naming.image_path(record.patient_id, record.magnification, record.sequence)
      if path != expected:
        problems.append(
            f"folder disagrees with name: {path} should be at {expected} (the name decides "
            f"its class, subtype, patient and magnification)"
        )
      records.append(record)
      sizes.append(os.path.getsize(full))
  if not records:
    raise UserError(f"{root} holds no BreakHis images (*.png): {download_hint(data_dir)}")
  order = sorted(range(len(records)), key=lambda i: records[i].path)
  return Scan(
      data_dir=data_dir,
      records=tuple(records[i] for i in order),
      sizes=tuple(sizes[i] for i in order),
      problems=tuple(problems),
      ignored=tuple(ignored),
  )


def check_image(path: str) -> str | None:
  """None if `path` reads as an image, else why not. Verifies the chunk checksums, then decodes."""
  try:
    with Image.open(path) as im:
      im.verify()
    with Image.open(path) as im:
      im.load()
  except Exception as e:  # noqa: BLE001 -- PIL raises many types for a broken file
    if os.path.getsize(path) == 0:
      return "an empty file"
    # The caller names the file: keep it out of the reason (Pillow quotes it in its messages).
    return f"{type(e).__name__}: {str(e).replace(repr(path), 'it').replace(path, 'it')}"
  return None


def unreadable_images(data_dir: str, records, *, threads: int = 2, progress: bool = False):
  """{path: reason} for the records whose file does not decode; checked on a thread pool."""
  paths = [r.path for r in records]
  full = [os.path.join(data_dir, *p.split("/")) for p in paths]
  with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
    results = pool.map(check_image, full, chunksize=16)
    if progress:
      results = tqdm.tqdm(results, total=len(full), desc="Checking images", unit="img")
    return {p: why for p, why in zip(paths, results, strict=True) if why is not None}
