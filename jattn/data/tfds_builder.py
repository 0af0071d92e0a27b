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
from tensorflow_datasets.core import shuffle

from jattn.data import breakhis
from jattn.data import scan as scan_lib
from jattn.errors import UserError

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
  Download {breakhis.ARCHIVE} from
  {breakhis.DOWNLOAD_URL}
  and either put the archive itself in the manual dir, or unpack it there so that
  `<manual_dir>/{breakhis.SLIDES}/benign/...` exists. In jattn the manual dir
  is `config.data_dir`: set --config.data_dir=DIR to the folder that holds BreaKHis_v1.
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
                "label": tfds.features.ClassLabel(names=breakhis.CLASSES),
                "subtype": tfds.features.ClassLabel(names=breakhis.SUBTYPE_CODES),
                "patient_id": tfds.features.Text(),
                "magnification": tfds.features.ClassLabel(names=breakhis.MAGNIFICATIONS),
                "file_name": tfds.features.Text(),
            }
        ),
        supervised_keys=("image", "label"),
        homepage=breakhis.DOWNLOAD_URL,
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
          f"from the archive, or set --config.skip_corrupt=True to leave unreadable images out"
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
