"""BreakHis as a TFDS data set: every image of the archive, PNG bytes as published.

The builder is the one place that knows where BreakHis' files are: it scans the manual dir (the
folder that holds BreaKHis_v1, or BreaKHis_v1.tar.gz, which it unpacks once) with `jattn.data.scan`
and writes every readable image to one split in array_record files; the folds are not splits (they
are applied later, by file name). TensorFlow is not needed, to write or to read:

  builder = Breakhis(data_dir=PREPARED_DIR + '/tfds')
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=DATA_DIR))
  images = builder.as_data_source(split='all')   # or split=SPLIT

TFDS reserves the name 'all' for "every split together", so the one split is named `full` and
`split='all'` reads exactly it. `info.metadata` records what preparation found: `files`
([path, size] of every image scanned), `fingerprint`, `skipped` (unreadable images left out with
`skip_corrupt=True`) and `problems` (misnamed files and other scan problems).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import resource
import types

import tensorflow_datasets as tfds
from etils import epath
from PIL import Image
from tensorflow_datasets.core import shuffle

from jattn.core import errors, files
from jattn.core.errors import UserError
from jattn.data import prepare
from jattn.data.breakhis import naming
from jattn.data.breakhis import scan as scan_lib

SPLIT = "full"  # every image; TFDS reserves 'all' (which reads the union of splits, i.e. this one)

_CITATION = """\
@article{spanhol2016breakhis,
  title={A Dataset for Breast Cancer Histopathological Image Classification},
  author={Spanhol, Fabio A. and Oliveira, Luiz S. and Petitjean, Caroline and Heutte, Laurent},
  journal={IEEE Transactions on Biomedical Engineering},
  volume={63}, number={7}, pages={1455--1462}, year={2016}
}"""


class _NeverRaised(Exception):
  pass


# What TFDS' shuffler uses of `tf`, on local files (OSError propagates as it is).
_LOCAL_TF = types.SimpleNamespace(
    io=types.SimpleNamespace(
        gfile=types.SimpleNamespace(GFile=open, exists=os.path.exists, remove=os.remove)
    ),
    errors=types.SimpleNamespace(ResourceExhaustedError=_NeverRaised),
)


@contextlib.contextmanager
def _shuffler_on_local_files():
  """Lets TFDS write a split over 1 GB without TensorFlow.

  TFDS' shuffler keeps up to 1 GB of examples in memory, then spills them to temporary bucket
  files through `tf.io.gfile`; BreakHis' PNGs (several GB) go past that. Without TensorFlow,
  hand it Python's own files for the duration (the buckets are local: the prepared dir), and
  allow the one open file per bucket it keeps.
  """
  if importlib.util.find_spec("tensorflow") is not None:
    yield
    return
  soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
  wanted = shuffle.BUCKETS_NUMBER + 256
  if soft < wanted and (hard == resource.RLIM_INFINITY or hard >= wanted):
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
  original = shuffle.tf
  shuffle.tf = _LOCAL_TF
  try:
    yield
  finally:
    shuffle.tf = original


class Breakhis(tfds.core.GeneratorBasedBuilder):
  """BreakHis v1: 7,909 breast tumour H&E images of 82 patients at 40X, 100X, 200X and 400X."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Every image of BreaKHis_v1 in one split, PNG bytes as published."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
  Download {naming.ARCHIVE} from
  {naming.DOWNLOAD_URL}
  and either put the archive itself in the manual dir, or unpack it there so that
  `<manual_dir>/{naming.SLIDES}/benign/...` exists. In jattn the manual dir
  is `config.data.dir`: set --config.data.dir=DIR to the folder that holds BreaKHis_v1.
  """

  def __init__(self, *, skip_corrupt: bool = False, check_threads: int = 2, **kwargs):
    """`skip_corrupt`: leave unreadable PNGs out (listed in `info.metadata['skipped']`) instead of
    stopping with a `UserError` that names them; `check_threads` read the images for that check."""
    self._skip_corrupt = skip_corrupt
    self._check_threads = check_threads
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10 finds a packaged builder's file through `importlib_resources`, a package it
    # requires only before Python 3.9 (so it is not installed): name the file directly.
    return epath.Path(__file__)

  def download_and_prepare(self, *args, **kwargs):
    """As TFDS', also without TensorFlow for data sets larger than 1 GB (see above)."""
    with _shuffler_on_local_files():
      return super().download_and_prepare(*args, **kwargs)

  # TFDS prints "Downloading and preparing dataset Unknown size ..." before and "... downloaded and
  # prepared" after, though nothing is downloaded: `prepare.prepare_tfds` says what happens instead.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Breast cancer histopathology (H&E) images, 700x460 RGB PNG, labelled benign or "
            "malignant and by one of 8 subtypes, with patient id and magnification."
        ),
        features=tfds.features.FeaturesDict(
            {
                # Stored as the original PNG bytes (any size); decoded later, once, into the cache.
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                "label": tfds.features.ClassLabel(names=naming.CLASSES),
                "subtype": tfds.features.ClassLabel(names=naming.SUBTYPE_CODES),
                "patient_id": tfds.features.Text(),
                "magnification": tfds.features.ClassLabel(names=naming.MAGNIFICATIONS),
                "file_name": tfds.features.Text(),
            }
        ),
        supervised_keys=("image", "label"),
        homepage=naming.DOWNLOAD_URL,
        citation=_CITATION,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    try:
      data_dir = os.fspath(dl_manager.manual_dir)
    except AssertionError as e:  # TFDS' way of saying the manual dir is missing
      raise UserError(" ".join(str(e).split())) from None
    scan_lib.check_data_dir(data_dir)
    scan_lib.extract_archive(data_dir)
    found = scan_lib.scan(data_dir)
    bad = scan_lib.unreadable_images(
        data_dir, found.records, threads=self._check_threads, progress=True
    )
    if bad and not self._skip_corrupt:
      path, why = sorted(bad.items())[0]
      more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
      raise UserError(
          f"{os.path.join(data_dir, path)} is not a readable image ({why}){more}: replace it "
          f"from the archive, or set --config.data.skip_corrupt=True to leave unreadable images out"
      )
    self.info.metadata.update(
        {
            "files": [list(f) for f in found.files],
            "fingerprint": found.fingerprint,
            "skipped": sorted(bad),
            "problems": list(found.problems),
        }
    )
    keep = [r for r in found.records if r.path not in bad]
    return {SPLIT: self._generate_examples(data_dir, keep)}

  def _generate_examples(self, data_dir: str, records):
    for r in records:
      with open(os.path.join(data_dir, *r.path.split("/")), "rb") as f:
        png = f.read()
      yield (
          r.file_name,
          {
              "image": png,
              "label": r.label,
              "subtype": r.subtype,
              "patient_id": r.patient_id,
              "magnification": r.magnification,
              "file_name": r.file_name,
          },
      )


def make_builder(prepared_dir: str, **kwargs) -> Breakhis:
  """The `Breakhis` builder whose data lives in `<prepared_dir>/tfds`."""
  return Breakhis(
      data_dir=os.path.join(prepared_dir, "tfds"), file_format="array_record", **kwargs
  )


def is_prepared(builder: Breakhis) -> bool:
  # Like builder.is_prepared(), without its warning about a folder that is not prepared yet.
  return os.path.isfile(os.path.join(os.fspath(builder.data_path), "dataset_info.json"))


def _refuse_stale(data_dir: str, prepared_dir: str, recorded, fresh: scan_lib.Scan) -> None:
  old, new = {tuple(f) for f in recorded}, set(fresh.files)
  added, removed = sorted(new - old), sorted(old - new)
  example = (added or removed)[0][0] if (added or removed) else "?"
  raise UserError(
      f"the images under {data_dir} changed since {prepared_dir} was prepared from them "
      f"({len(added)} added or resized, {len(removed)} removed or resized, e.g. {example}): "
      f"delete {prepared_dir} to prepare again, or set --config.data.prepared_dir to a new folder"
  )


def prepare_tfds(
    data_dir: str,
    prepared_dir: str,
    *,
    fresh: scan_lib.Scan,
    skip_corrupt: bool = False,
    threads: int = 2,
) -> Breakhis:
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
        f"set --config.data.skip_corrupt=True to use it, or replace them and delete {prepared_dir}"
    )
  return builder


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
  cache_stage = prepare.CHUNK * (largest + 3 * image_size**2) + threads * 2 * decoded
  return max(tfds_stage, cache_stage)


def record_of(example: dict) -> dict:
  """What the decoded-image cache keeps of a BreakHis example (`prepare.build_cache`)."""
  return {"file_names": example["file_name"].decode(), "labels": int(example["label"]),
          "subtypes": naming.SUBTYPE_CODES[int(example["subtype"])],
          "patient_ids": example["patient_id"].decode(),
          "magnifications": naming.MAGNIFICATIONS[int(example["magnification"])]}


def build_cache(builder: Breakhis, prepared_dir: str, image_size: int, *,
                threads: int = 2) -> prepare.Cache:
  """The decoded-image cache of a prepared `Breakhis` data set (`prepare.build_cache`)."""
  source = builder.as_data_source(split=SPLIT, decoders={"image": tfds.decode.SkipDecoding()})
  return prepare.build_cache(source, prepared_dir, image_size,
                             fingerprint=builder.info.metadata["fingerprint"],
                             record_of=record_of, where=os.fspath(builder.data_path),
                             threads=threads)
