"""Preparing BreakHis once: TFDS records, a decoded-image cache, and per-fold normalisation stats.

Everything lives in the prepared dir (default `<data_dir>/jattn_prepared`):

  tfds/breakhis/1.0.0/...          the TFDS data set (`Breakhis`), PNG bytes as published
  cache/<S>/images.npy             uint8 [N, S, S, 3]: every image decoded, RGB, resized to S x S
  cache/<S>/records.json           file name, label, subtype, patient id, magnification, same order
  folds/Folds_generated_seed<k>.csv  generated folds (when no Folds.csv or mkfold is given)
  stats/<folds-id>_fold<k>_<S>.json  per-channel mean and std of a fold's training images

Each stage runs once: callers hold `files.locked(prepared_dir)` around it, and every file is
written under a temporary name and renamed into place. The TFDS metadata remembers which files
(paths and sizes) it was built from; `prepare_tfds` compares them with a fresh scan and refuses a
prepared dir built from a different tree, so a stale cache is never used silently.
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

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from PIL import Image, UnidentifiedImageError
from tensorflow_datasets.core import shuffle

from jattn import errors, files
from jattn.data import breakhis, tfds_builder
from jattn.data import scan as scan_lib
from jattn.errors import UserError

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
  log.warning("data_dir %s is read-only: preparing into %s (set --config.prepared_dir to choose "
              "another folder)", data_dir, folder)
  return folder


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


def _bytes(n: int) -> str:
  return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def _worker_death(error: BaseException) -> BaseException | None:
  """The worker death behind `error` (itself or one of its causes), or None."""
  seen, todo = set(), [error]
  while todo:
    e = todo.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    if isinstance(e, WORKER_DEATHS):
      return e
    if isinstance(e, PIPE_ERRORS) and any(
        f"{os.sep}multiprocessing{os.sep}" in frame.filename
        for frame in traceback.extract_tb(e.__traceback__)
    ):
      return e
    todo += [e.__cause__, e.__context__]
  return None


def memory_needed(fresh: scan_lib.Scan, image_size: int, threads: int) -> int:
  """Bytes of memory preparation needs at its peak, besides the process itself (an estimate).

  The largest of its stages: TFDS' shuffle buffer (the PNGs, up to 1,000 MiB before it spills
  to disk) while each thread checks one decoded image; then a chunk of PNGs, their decoded and
  resized images and each thread's full-size image and RGB copy while the cache is written.
  """
  largest = max(fresh.sizes)
  path = os.path.join(fresh.data_dir, *fresh.records[fresh.sizes.index(largest)].path.split("/"))
  try:
    with Image.open(path) as im:  # reads the header only
      pixels = im.size[0] * im.size[1]
  except Exception:  # noqa: BLE001 -- an unreadable file: assume BreakHis' 700 x 460
    pixels = 700 * 460
  decoded = 3 * pixels
  tfds_stage = min(sum(fresh.sizes), shuffle.MAX_MEM_BUFFER_SIZE) + threads * 2 * decoded
  cache_stage = CHUNK * (largest + 3 * image_size**2) + threads * 2 * decoded
  return max(tfds_stage, cache_stage)


@contextlib.contextmanager
def reporting_worker_deaths(data_dir: str, prepared_dir: str, image_size: int, threads: int):
  """Turns a worker of the preparation that died (or memory that ran out) into one line: what
  happened, what preparation needs in memory, and to run again (the next start's `remove_stale`
  clears what it left)."""
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
      fresh = scan_lib.scan(data_dir)
      need = (f"preparing {len(fresh.records):,} images ({_bytes(sum(fresh.sizes))} of PNGs) at "
              f"{image_size}x{image_size} with {threads} thread(s) needs about "
              f"{_bytes(memory_needed(fresh, image_size, threads))} of memory besides the process "
              f"itself")
    except UserError:  # no images yet to estimate from
      need = "preparation needs memory for its images"
    lead = (f"the preparation of {data_dir} into {prepared_dir} ran out of memory ({what})"
            if isinstance(died, MemoryError) else
            f"a worker of the preparation of {data_dir} into {prepared_dir} died ({what}), most "
            f"likely for lack of memory")
    raise UserError(
        f"{lead}: {need}; free some memory (fewer jobs at once, or --config.loader_threads=1) and "
        f"run the same command again: it goes on from what is already prepared"
    ) from e


def make_builder(prepared_dir: str, **kwargs) -> tfds_builder.Breakhis:
  """The `Breakhis` builder whose data lives in `<prepared_dir>/tfds`."""
  return tfds_builder.Breakhis(
      data_dir=os.path.join(prepared_dir, "tfds"), file_format="array_record", **kwargs
  )


def is_prepared(builder: tfds_builder.Breakhis) -> bool:
  # Like builder.is_prepared(), without its warning about a folder that is not prepared yet.
  return os.path.isfile(os.path.join(os.fspath(builder.data_path), "dataset_info.json"))


def _refuse_stale(data_dir: str, prepared_dir: str, recorded, fresh: scan_lib.Scan) -> None:
  old, new = {tuple(f) for f in recorded}, set(fresh.files)
  added, removed = sorted(new - old), sorted(old - new)
  example = (added or removed)[0][0] if (added or removed) else "?"
  raise UserError(
      f"the images under {data_dir} changed since {prepared_dir} was prepared from them "
      f"({len(added)} added or resized, {len(removed)} removed or resized, e.g. {example}): "
      f"delete {prepared_dir} to prepare again, or set --config.prepared_dir to a new folder"
  )


def prepare_tfds(
    data_dir: str,
    prepared_dir: str,
    *,
    fresh: scan_lib.Scan,
    skip_corrupt: bool = False,
    threads: int = 2,
) -> tfds_builder.Breakhis:
  """Builds the TFDS data set once, and checks that a prepared one matches the scan `fresh`.

  Call under the prepared dir's lock. Returns the builder; its `info.metadata` holds `skipped`.
  """
  builder = make_builder(prepared_dir, skip_corrupt=skip_corrupt, check_threads=threads)
  if is_prepared(builder) and "fingerprint" not in builder.info.metadata:
    files.remove(os.fspath(builder.data_path))  # no metadata: an interrupted older preparation
    builder = make_builder(prepared_dir, skip_corrupt=skip_corrupt, check_threads=threads)
  if not is_prepared(builder):
    print(f"preparing {len(fresh.records):,} images from {data_dir} into {prepared_dir} (once: "
          f"TFDS records, a decoded-image cache, normalisation statistics)", flush=True)
    with errors.writing(prepared_dir):
      builder.download_and_prepare(
          download_dir=os.path.join(prepared_dir, "tfds", "downloads"),
          download_config=tfds.download.DownloadConfig(manual_dir=data_dir),
      )
    builder = make_builder(prepared_dir, skip_corrupt=skip_corrupt, check_threads=threads)
  metadata = builder.info.metadata
  if metadata["fingerprint"] != fresh.fingerprint:
    _refuse_stale(data_dir, prepared_dir, metadata["files"], fresh)
  if metadata["skipped"] and not skip_corrupt:
    raise UserError(
        f"{prepared_dir} was prepared with skip_corrupt=True and leaves out "
        f"{len(metadata['skipped'])} unreadable image(s) ({', '.join(metadata['skipped'][:3])}): "
        f"set --config.skip_corrupt=True to use it, or replace them and delete {prepared_dir}"
    )
  return builder


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
  if im.size != (image_size, image_size):
    im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
  return np.asarray(im, dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class Cache:
  """The decoded images and their records, in the same order (the TFDS data source's)."""

  images: np.ndarray  # uint8 [N, S, S, 3], memory-mapped read-only
  file_names: tuple[str, ...]
  labels: tuple[int, ...]
  subtypes: tuple[str, ...]
  patient_ids: tuple[str, ...]
  magnifications: tuple[str, ...]
  fingerprint: str  # of the TFDS data set it was decoded from


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
        f"--config.image_size={image_size} needs a decoded-image cache of {_bytes(needed)} "
        f"({num_images:,} images x {image_size} x {image_size} x 3 bytes) in {folder}, but its "
        f"file system has {_bytes(free)} free: set --config.image_size lower (the paper's is 224), "
        f"free some space, or set --config.prepared_dir to a folder on a larger disk"
    )


def _read_cache(folder: str, fingerprint: str) -> Cache | None:
  images_path = os.path.join(folder, "images.npy")
  records_path = os.path.join(folder, "records.json")
  if not (os.path.isfile(images_path) and os.path.isfile(records_path)):
    return None
  with open(records_path, encoding="utf-8") as f:
    table = json.load(f)
  images = np.load(images_path, mmap_mode="r")
  if table["fingerprint"] != fingerprint or len(images) != len(table["file_names"]):
    return None  # decoded from another TFDS data set: rebuild
  return Cache(
      images=images,
      file_names=tuple(table["file_names"]),
      labels=tuple(table["labels"]),
      subtypes=tuple(table["subtypes"]),
      patient_ids=tuple(table["patient_ids"]),
      magnifications=tuple(table["magnifications"]),
      fingerprint=fingerprint,
  )


def build_cache(
    builder: tfds_builder.Breakhis, prepared_dir: str, image_size: int, *, threads: int = 2
) -> Cache:
  """Decodes every image once into `cache/<S>/images.npy` (memory-mapped), unless already there.

  Call under the prepared dir's lock. The records table is written first and the image array is
  renamed into place last, so a present `images.npy` means a complete cache.
  """
  if image_size < 1:
    raise UserError(f"image_size must be a positive number of pixels, got {image_size}")
  fingerprint = builder.info.metadata["fingerprint"]
  folder = cache_dir(prepared_dir, image_size)
  cache = _read_cache(folder, fingerprint)
  if cache is not None:
    return cache
  source = builder.as_data_source(
      split=tfds_builder.SPLIT, decoders={"image": tfds.decode.SkipDecoding()}
  )
  n = len(source)
  check_cache_space(prepared_dir, n, image_size)
  os.makedirs(folder, exist_ok=True)
  images_path = os.path.join(folder, "images.npy")
  table = {k: [] for k in ("file_names", "labels", "subtypes", "patient_ids", "magnifications")}
  with files.atomic_path(images_path) as tmp:
    out = np.lib.format.open_memmap(
        tmp, mode="w+", dtype=np.uint8, shape=(n, image_size, image_size, 3)
    )
    with open(tmp, "r+b") as f:  # reserve the space now: a full disk is then an OSError here,
      os.posix_fallocate(f.fileno(), 0, os.path.getsize(tmp))  # not a SIGBUS while decoding

    def decode(example):
      name = f"{example['file_name'].decode()} (in {builder.data_path})"
      return decode_resize(example["image"], image_size, name)

    chunk = CHUNK
    with (
        concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool,
        tqdm.tqdm(total=n, desc=f"Decoding images to {image_size}x{image_size}", unit="img") as bar,
    ):
      for start in range(0, n, chunk):
        examples = source.__getitems__(list(range(start, min(n, start + chunk))))
        for i, image in enumerate(pool.map(decode, examples)):
          out[start + i] = image
        for ex in examples:
          table["file_names"].append(ex["file_name"].decode())
          table["labels"].append(int(ex["label"]))
          table["subtypes"].append(breakhis.SUBTYPE_CODES[int(ex["subtype"])])
          table["patient_ids"].append(ex["patient_id"].decode())
          table["magnifications"].append(breakhis.MAGNIFICATIONS[int(ex["magnification"])])
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
