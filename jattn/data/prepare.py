"""What every data source prepares once: a decoded-image cache and per-fold normalisation stats.

They live in the source's prepared dir (BreakHis: `<data_dir>/jattn_prepared`), beside what the
source itself writes there (its TFDS records, its generated folds):

  cache/<S>/images.npy             uint8 [N, S, S, 3]: every image decoded, RGB, resized to S x S
  cache/<S>/records.json           the source's fields of each image (file name, ...), same order
  stats/<folds-id>_fold<k>_<S>.json  per-channel mean and std of a fold's training images

Each stage runs once: callers hold `files.locked(prepared_dir)` around it, and every file is
written under a temporary name and renamed into place. A cache records the fingerprint of the data
it was decoded from and is rebuilt when that changes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import traceback
from collections.abc import Callable, Sequence

import numpy as np
import tqdm
from PIL import Image, UnidentifiedImageError

from jattn.core import errors, files
from jattn.core.errors import UserError

log = logging.getLogger(__name__)


def default_prepared_dir(data_dir: str) -> str:
  """`<data_dir>/jattn_prepared`; for a read-only data dir that holds none, a folder of the user's
  cache dir (`~/.cache/jattn/prepared/<hash of data_dir>`), said in one log line."""
  inside = os.path.join(data_dir, "jattn_prepared")
  if os.path.isdir(inside) or os.access(data_dir, os.W_OK) or not os.path.isdir(data_dir):
    return inside
  cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  digest = hashlib.sha256(os.path.abspath(data_dir).encode()).hexdigest()[:16]
  folder = os.path.join(cache_home, "jattn", "prepared", digest)
  log.warning("data_dir %s is read-only: preparing into %s (set --config.data.prepared_dir to "
              "choose "
              "another folder)", data_dir, folder)
  return folder


def user_cache_dir(name: str, *keys: bytes) -> str:
  """`~/.cache/jattn/prepared/<name>-<hash of keys>` (`$XDG_CACHE_HOME` if set): a prepared dir of
  the user's own, never inside the data."""
  cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  digest = hashlib.sha256(b"\0".join(keys)).hexdigest()[:16]
  return os.path.join(cache_home, "jattn", "prepared", f"{name}-{digest}")


def remove_stale(prepared_dir: str) -> list[str]:
  """Removes what a killed preparation left behind; returns the paths. Call under the lock.

  These are this project's temporary files (`.<name>.tmp-*`, see `files.temp_name`) and TFDS'
  `incomplete.*` folders and files: under the prepared dir's lock no other process is writing
  them, so any present is stale.
  """
  removed = []
  for folder, dirnames, names in os.walk(prepared_dir):
    for name in [*dirnames, *names]:
      if name.startswith("incomplete.") or (name.startswith(".") and ".tmp-" in name):
        removed.append(os.path.join(folder, name))
    dirnames[:] = [d for d in dirnames if os.path.join(folder, d) not in removed]
  for path in removed:
    files.remove(path)
  if removed:
    log.warning("removed %d file(s) left by an interrupted preparation in %s", len(removed),
                prepared_dir)
  return removed


# A worker of the preparation that died, as the parent sees it: a pool whose process was killed, an
# allocation that failed, or the other end of a multiprocessing pipe gone (EOFError and
# ConnectionError raised inside `multiprocessing`, e.g. by `Connection.recv_bytes`).
WORKER_DEATHS = (concurrent.futures.BrokenExecutor, MemoryError)
PIPE_ERRORS = (EOFError, ConnectionError)
CHUNK = 64  # images decoded together into the cache


def size_text(n: int) -> str:
  """A byte count for people: MiB or GiB."""
  return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def _worker_death(error: BaseException) -> BaseException | None:
  """The worker death behind `error` (itself or one of its causes), or None."""
  for e in errors.causes(error):
    if isinstance(e, WORKER_DEATHS):
      return e
    if isinstance(e, PIPE_ERRORS) and any(
        f"{os.sep}multiprocessing{os.sep}" in frame.filename
        for frame in traceback.extract_tb(e.__traceback__)
    ):
      return e
  return None


@contextlib.contextmanager
def reporting_worker_deaths(data_dir: str, prepared_dir: str, need: Callable[[], str]):
  """Turns a worker of the preparation that died (or memory that ran out) into one line: what
  happened, what preparation needs in memory (`need()`, the source's estimate) and to run again
  (the next start's `remove_stale` clears what it left)."""
  try:
    yield
  except UserError:
    raise
  except Exception as e:
    died = _worker_death(e)
    if died is None:
      raise
    reason = " ".join(str(died).split())[:120]
    what = type(died).__name__ + (f": {reason}" if reason else "")
    try:
      needed = need()
    except UserError:  # no images yet to estimate from
      needed = "preparation needs memory for its images"
    lead = (f"the preparation of {data_dir} into {prepared_dir} ran out of memory ({what})"
            if isinstance(died, MemoryError) else
            f"a worker of the preparation of {data_dir} into {prepared_dir} died ({what}), most "
            f"likely for lack of memory")
    raise UserError(
        f"{lead}: {needed}; free some memory (fewer jobs at once, or --config.loader_threads=1) "
        f"and run the same command again: it goes on from what is already prepared"
    ) from e


# Pillow's modes for 16-bit samples (a 16-bit grey PNG opens as one of these); `convert('RGB')`
# would clip them at 255, turning an image white, so they are scaled to 8 bits here instead.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(im: Image.Image, name: str) -> Image.Image:
  """Any image Pillow opens -> 8-bit RGB, 16-bit samples scaled (v / 257, rounded), or refused."""
  if im.mode in SIXTEEN_BIT_MODES:
    values = np.clip(np.asarray(im, dtype=np.int64), 0, 65535)
    return Image.fromarray(np.round(values / 257).astype(np.uint8)).convert("RGB")
  if im.mode == "F":  # no range to scale from: a float image is not a histology slide's PNG
    raise UserError(f"{name}: a floating-point image (mode F) has no 8-bit form; save it as 8-bit "
                    f"RGB PNG")
  try:
    return im.convert("RGB")
  except ValueError as e:
    raise UserError(f"{name}: images of mode {im.mode} cannot be converted to RGB ({e}); save it "
                    f"as 8-bit RGB PNG") from None


def decode_resize(png: bytes, image_size: int, name: str = "image") -> np.ndarray:
  """PNG bytes -> uint8 [S, S, 3]: RGB, resized with PIL's bilinear filter, aspect not kept.

  `name` (the file) is what a `UserError` names when the bytes do not decode.
  """
  try:
    with Image.open(io.BytesIO(png)) as im:
      im = to_rgb(im, name)
  except UnidentifiedImageError:
    why = "an empty file" if not png else "not an image file Pillow can read, or cut short"
    raise UserError(f"{name}: cannot decode it ({why})") from None
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001 -- PIL raises many types for a broken file
    raise UserError(f"{name}: cannot decode it ({type(e).__name__}: {e})") from None
  return resize_rgb(im, image_size)


def resize_rgb(im: Image.Image, image_size: int) -> np.ndarray:
  """An RGB image -> uint8 [S, S, 3] with PIL's bilinear filter, aspect not kept: how every
  training image, predicted file and slide tile reaches the model's input size."""
  if im.size != (image_size, image_size):
    im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
  return np.asarray(im, dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class Cache:
  """The decoded images and a table of per-image fields, in the same order (the data source's)."""

  images: np.ndarray  # uint8 [N, S, S, 3], memory-mapped read-only
  table: dict[str, tuple]  # field -> one value per image, as the source's `record_of` gave them
  fingerprint: str  # of the data set it was decoded from

  @property
  def file_names(self) -> tuple[str, ...]:
    return self.table["file_names"]


def cache_dir(prepared_dir: str, image_size: int) -> str:
  return os.path.join(prepared_dir, "cache", str(image_size))


def has_cache(prepared_dir: str, image_size: int) -> bool:
  """Whether a decoded-image cache at `image_size` was written (it may still be stale)."""
  return os.path.isfile(os.path.join(cache_dir(prepared_dir, image_size), "images.npy"))


def check_cache_space(prepared_dir: str, num_images: int, image_size: int) -> None:
  """Refuses, before anything is written, a decoded-image cache larger than its disk's free space.

  The cache is N x S x S x 3 bytes (`image_size` S), written next to any older one it replaces.
  """
  folder = cache_dir(prepared_dir, image_size)
  needed = num_images * image_size * image_size * 3
  existing = folder
  while not os.path.isdir(existing):
    existing = os.path.dirname(existing)
  free = shutil.disk_usage(existing).free
  if needed > free:
    raise UserError(
        f"--config.image_size={image_size} needs a decoded-image cache of {size_text(needed)} "
        f"({num_images:,} images x {image_size} x {image_size} x 3 bytes) in {folder}, but its "
        f"file system has {size_text(free)} free: set --config.image_size lower (the paper's "
        f"is 224), "
        f"free some space, or set --config.data.prepared_dir to a folder on a larger disk"
    )


def _read_cache(folder: str, fingerprint: str) -> Cache | None:
  images_path = os.path.join(folder, "images.npy")
  records_path = os.path.join(folder, "records.json")
  if not (os.path.isfile(images_path) and os.path.isfile(records_path)):
    return None
  with open(records_path, encoding="utf-8") as f:
    table = json.load(f)
  images = np.load(images_path, mmap_mode="r")
  if table.pop("fingerprint") != fingerprint or len(images) != len(table["file_names"]):
    return None  # decoded from another data set: rebuild
  table.pop("image_size", None)
  return Cache(images=images, table={k: tuple(v) for k, v in table.items()},
               fingerprint=fingerprint)


def build_cache(
    source: Sequence, prepared_dir: str, image_size: int, *, fingerprint: str,
    record_of: Callable[[dict], dict], where: str, threads: int = 2,
    decode: Callable[[dict], np.ndarray] | None = None,
) -> Cache:
  """Decodes every image once into `cache/<S>/images.npy` (memory-mapped), unless already there.

  `source` is a random-access data source of examples with encoded `image` bytes (a TFDS data
  source read with `SkipDecoding`); `record_of(example)` gives the fields the source keeps of each
  image in `records.json` (at least `file_names`, its unique name); `where` names the data set in
  messages; `decode(example)`, when given, gives the uint8 [S, S, 3] image of an example without
  encoded bytes (a slide's tile, read on the same threads). Call under the prepared dir's lock.
  The records table is written first and the image array is renamed into place last, so a
  present `images.npy` means a complete cache.
  """
  if image_size < 1:
    raise UserError(f"image_size must be a positive number of pixels, got {image_size}")
  folder = cache_dir(prepared_dir, image_size)
  cache = _read_cache(folder, fingerprint)
  if cache is not None:
    return cache
  n = len(source)
  check_cache_space(prepared_dir, n, image_size)
  os.makedirs(folder, exist_ok=True)
  images_path = os.path.join(folder, "images.npy")
  table: dict[str, list] = {}
  with files.atomic_path(images_path) as tmp:
    out = np.lib.format.open_memmap(
        tmp, mode="w+", dtype=np.uint8, shape=(n, image_size, image_size, 3)
    )
    with open(tmp, "r+b") as f:  # reserve the space now: a full disk is then an OSError here,
      os.posix_fallocate(f.fileno(), 0, os.path.getsize(tmp))  # not a SIGBUS while decoding

    def decoded(example):
      record = record_of(example)
      if decode is not None:
        return record, decode(example)
      return record, decode_resize(example["image"], image_size,
                                   f"{record['file_names']} (in {where})")

    with (
        concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool,
        tqdm.tqdm(total=n, desc=f"Decoding images to {image_size}x{image_size}", unit="img") as bar,
    ):
      for start in range(0, n, CHUNK):
        examples = source.__getitems__(list(range(start, min(n, start + CHUNK))))
        for i, (record, image) in enumerate(pool.map(decoded, examples)):
          out[start + i] = image
          for key, value in record.items():
            table.setdefault(key, []).append(value)
        bar.update(len(examples))
    out.flush()
    del out
    records_json = json.dumps({"fingerprint": fingerprint, "image_size": image_size, **table})
    files.atomic_write_text(os.path.join(folder, "records.json"), records_json)
  cache = _read_cache(folder, fingerprint)
  assert cache is not None
  return cache


def stats_path(prepared_dir: str, folds_id: str, fold: int, image_size: int) -> str:
  return os.path.join(prepared_dir, "stats", f"{folds_id}_fold{fold}_{image_size}.json")


def folds_id(source: str, train_names) -> str:
  """Names a fold's training set in file names: the folds file's stem and a hash of the set."""
  stem = os.path.splitext(os.path.basename(source.rstrip("/")))[0] or "folds"
  stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)
  digest = hashlib.sha256("\n".join(sorted(train_names)).encode()).hexdigest()[:10]
  return f"{stem}-{digest}"


def channel_stats(images: np.ndarray, indices: np.ndarray, *, chunk: int = 128):
  """Per-channel mean and std (0-255 scale) over every pixel of `images[indices]`, exactly.

  Counts each channel's 256 values, so the sums are exact integers whatever the data set's size.
  """
  counts = np.zeros(3 * 256, dtype=np.int64)
  offsets = np.arange(3, dtype=np.int32) * 256
  for start in tqdm.trange(0, len(indices), chunk, desc="Normalisation stats", unit="chunk"):
    block = np.asarray(images[np.sort(indices[start : start + chunk])])
    counts += np.bincount((block.reshape(-1, 3) + offsets).ravel(), minlength=3 * 256)
  counts = counts.reshape(3, 256).astype(np.float64)
  values = np.arange(256, dtype=np.float64)
  total = counts.sum(axis=1)
  mean = (counts * values).sum(axis=1) / total
  var = (counts * (values - mean[:, None]) ** 2).sum(axis=1) / total
  return mean.astype(np.float32), np.sqrt(var).astype(np.float32)


def fold_stats(path: str, images: np.ndarray, train_indices: np.ndarray):
  """Mean and std of a fold's training images, computed once and stored at `path` (JSON)."""
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      stored = json.load(f)
    if stored["num_images"] == len(train_indices):
      return np.asarray(stored["mean"], np.float32), np.asarray(stored["std"], np.float32)
  mean, std = channel_stats(images, train_indices)
  files.atomic_write_text(
      path,
      json.dumps(
          {
              "mean": mean.tolist(),
              "std": std.tolist(),
              "num_images": len(train_indices),
              "image_size": int(images.shape[1]),
          }
      ),
  )
  return mean, std
