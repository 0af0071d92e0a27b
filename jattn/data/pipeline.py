"""The input pipeline: one fold of BreakHis in memory-mapped uint8, and its train and test batches.

  fold_data = load_fold(config)                       # prepares what is missing, once
  for batch in train_batches(fold_data, 8, seed=0, epoch=e):   # {'image', 'label'}
  for batch in test_batches(fold_data, 32):           # + 'patient', 'magnification', 'subtype',
                                                      #   'index', 'mask'

Batches are gathered from the decoded-image cache by grain in this process, on threads (a batch is
one fancy-indexed read of the memory map, which releases the GIL); images stay uint8 and are
augmented and normalised on the accelerator. The training order is a pure function of
(seed, epoch), so a run resumed at (epoch, start_step) sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator

import grain
import numpy as np

from jattn import files
from jattn.data import breakhis, fetch, prepare
from jattn.data import folds as folds_lib
from jattn.data import scan as scan_lib
from jattn.errors import UserError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class FoldData:
  """Every image of the data set (decoded, S x S) and one fold's train/test indices into them."""

  images: np.ndarray  # uint8 [N, S, S, 3], memory-mapped
  labels: np.ndarray  # int32 [N]: 0 benign, 1 malignant
  subtypes: np.ndarray  # int32 [N]: index into breakhis.SUBTYPE_CODES
  magnifications: np.ndarray  # int32 [N]: index into breakhis.MAGNIFICATIONS
  patients: np.ndarray  # int32 [N]: index into patient_ids
  patient_ids: tuple[str, ...]  # sorted
  file_names: tuple[str, ...]
  train_indices: np.ndarray  # int64, sorted
  test_indices: np.ndarray  # int64, sorted
  mean: np.ndarray  # float32 [3], 0-255 scale, of this fold's training images
  std: np.ndarray  # float32 [3]
  fold: int
  folds_source: str  # the Folds.csv, mkfold folder or generated file the fold comes from
  skipped: tuple[str, ...] = ()  # unreadable images left out (skip_corrupt=True), paths
  problems: tuple[str, ...] = ()  # what the scan of the data dir found (misnamed files, ...)
  task: str = "binary"  # what the model is trained to tell: 'binary' or 'subtype' (breakhis.TASKS)

  @property
  def image_size(self) -> int:
    return int(self.images.shape[1])

  @property
  def num_images(self) -> int:
    return int(self.images.shape[0])

  @property
  def targets(self) -> np.ndarray:
    """int32 [N]: the class each image is trained on, its label or its subtype per `task`."""
    return self.subtypes if self.task == "subtype" else self.labels


def selection(config) -> tuple[tuple[str, ...], str]:
  """The magnifications and the task a config selects, checked: (magnifications, task)."""
  task = config.get("task", "binary")
  if task not in breakhis.TASKS:
    raise UserError(f"--config.task={task!r} is not a task: use 'binary' (benign vs malignant, the "
                    f"paper) or 'subtype' (the 8 BreakHis subtypes)")
  chosen = config.get("magnifications", breakhis.MAGNIFICATIONS)
  chosen = (chosen,) if isinstance(chosen, str) else tuple(chosen)
  unknown = [m for m in chosen if m not in breakhis.MAGNIFICATIONS]
  if unknown or not chosen:
    raise UserError(f"--config.magnifications={','.join(map(str, chosen))}: "
                    f"{'unknown magnification ' + repr(unknown[0]) if unknown else 'empty'}; "
                    f"use some of {','.join(breakhis.MAGNIFICATIONS)} (e.g. "
                    f"--config.magnifications=100X)")
  return tuple(m for m in breakhis.MAGNIFICATIONS if m in chosen), task


def _check_selection(records, magnifications, data_dir) -> None:
  """A magnification list that selects no image of the data set is an error."""
  if not any(r.magnification in magnifications for r in records):
    have = sorted({r.magnification for r in records}, key=breakhis.MAGNIFICATIONS.index)
    raise UserError(f"--config.magnifications={','.join(magnifications)} selects no images of "
                    f"{data_dir} (it has images at {', '.join(have) or 'no magnification'}); "
                    f"choose among those")


def _config_checks(config) -> None:
  if config.fold not in folds_lib.FOLDS:
    raise UserError(f"config.fold must be one of 1..5, got {config.fold!r}")
  if not isinstance(config.image_size, int) or config.image_size < 1:
    raise UserError(f"config.image_size must be a positive integer, got {config.image_size!r}")


def load_fold(config) -> FoldData:
  """Prepares (once) and loads fold `config.fold` of the data in `config.data_dir`.

  Stages, each only when its output is missing: with `config.download`, BreakHis downloaded into
  data_dir (under the data dir's lock); then, under the prepared dir's lock, a synthetic tree (if
  `config.synthetic.enabled` and data_dir holds no BreaKHis_v1), unpacking BreaKHis_v1.tar.gz,
  the TFDS data set, the decoded-image cache at `config.image_size`, the folds (`config.folds`),
  and the fold's normalisation stats. A later call only checks and maps.
  """
  _config_checks(config)
  magnifications, task = selection(config)
  data_dir = scan_lib.resolve_data_dir(os.path.abspath(os.path.expanduser(config.data_dir)))
  prepared_dir = os.path.abspath(
      os.path.expanduser(config.prepared_dir or prepare.default_prepared_dir(data_dir))
  )
  threads = max(1, int(config.loader_threads))
  if config.get("download", False):  # before anything else looks at (or writes into) data_dir
    fetch.ensure_breakhis(data_dir)
  synthetic = config.synthetic.enabled and not (
      scan_lib.has_images_tree(data_dir) or scan_lib.has_archive(data_dir)
  )
  if synthetic:  # before creating anything in a wrong folder
    from jattn.data import synthetic as synthetic_lib

    synthetic_lib.check_target(data_dir, prepared_dir)
  else:
    scan_lib.check_data_dir(data_dir)
  with (
      prepare.reporting_worker_deaths(data_dir, prepared_dir, config.image_size, threads),
      files.locked(prepared_dir),
  ):
    prepare.remove_stale(prepared_dir)
    if synthetic and not scan_lib.has_images_tree(data_dir):
      log.warning("data_dir %s holds no BreakHis: generating a synthetic tree there", data_dir)
      synthetic_lib.synthesize(
          data_dir,
          images_per_patient=config.synthetic.images_per_patient,
          width=config.synthetic.width,
          height=config.synthetic.height,
          seed=config.synthetic.seed,
          progress=True,
      )
    scan_lib.extract_archive(data_dir)
    fresh = scan_lib.scan(data_dir)
    if not prepare.has_cache(prepared_dir, config.image_size):  # before TFDS writes anything
      prepare.check_cache_space(prepared_dir, len(fresh.records), config.image_size)
    for problem in fresh.problems:
      log.warning("%s", problem)
    builder = prepare.prepare_tfds(
        data_dir, prepared_dir, fresh=fresh, skip_corrupt=config.skip_corrupt, threads=threads
    )
    skipped = tuple(builder.info.metadata["skipped"])
    if skipped:
      log.warning("left out %d unreadable image(s): %s", len(skipped), ", ".join(skipped))
    cache = prepare.build_cache(builder, prepared_dir, config.image_size, threads=threads)
    records = [r for r in fresh.records if r.path not in frozenset(skipped)]
    _check_selection(records, magnifications, data_dir)
    folds = folds_lib.resolve_folds(
        config.folds,
        records=records,
        data_dir=data_dir,
        prepared_dir=prepared_dir,
        seed=config.folds_seed,
    )
    for warning in folds_lib.validate_folds(
        folds, records, fold=config.fold, skipped=skipped, magnifications=magnifications,
        task=task,
    ):
      log.warning("%s", warning)
    split = folds.splits[config.fold]
    groups = np.array([
        split.get(name, "") if mag in magnifications else ""
        for name, mag in zip(cache.file_names, cache.magnifications, strict=True)
    ])
    train_indices = np.flatnonzero(groups == "train").astype(np.int64)
    test_indices = np.flatnonzero(groups == "test").astype(np.int64)
    train_names = [cache.file_names[i] for i in train_indices]
    stats_file = prepare.stats_path(
        prepared_dir,
        prepare.folds_id(folds.source, train_names),
        config.fold,
        config.image_size,
    )
    mean, std = prepare.fold_stats(stats_file, cache.images, train_indices)
  patient_ids = tuple(sorted(set(cache.patient_ids)))
  patient_index = {p: i for i, p in enumerate(patient_ids)}
  return FoldData(
      images=cache.images,
      labels=np.asarray(cache.labels, np.int32),
      subtypes=np.asarray([breakhis.SUBTYPE_CODES.index(s) for s in cache.subtypes], np.int32),
      magnifications=np.asarray(
          [breakhis.MAGNIFICATIONS.index(m) for m in cache.magnifications], np.int32
      ),
      patients=np.asarray([patient_index[p] for p in cache.patient_ids], np.int32),
      patient_ids=patient_ids,
      file_names=cache.file_names,
      train_indices=train_indices,
      test_indices=test_indices,
      mean=mean,
      std=std,
      fold=config.fold,
      folds_source=folds.source,
      skipped=skipped,
      problems=fresh.problems,
      task=task,
  )


def steps_per_epoch(fold_data: FoldData, batch_size: int) -> int:
  """Training steps in one epoch: the last partial batch is dropped (fixed shapes under jit)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  return len(fold_data.train_indices) // batch_size


def _epoch_seed(seed: int, epoch: int) -> int:
  """A 32-bit seed for the permutation of `epoch`, different for every (seed, epoch)."""
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _rows(batch_size: int, process_rows: tuple[int, int]) -> slice:
  """The rows of a batch that process p of n reads."""
  p, n = process_rows
  if batch_size % n or not 0 <= p < n:
    raise ValueError(f"process {p} of {n} cannot take an equal slice of a batch of {batch_size}")
  return slice(p * batch_size // n, (p + 1) * batch_size // n)


def _read_options(num_threads: int) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2, 4 * num_threads))


def train_batches(
    fold_data: FoldData,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    start_step: int = 0,
    num_threads: int = 2,
    process_rows: tuple[int, int] = (0, 1),
) -> Iterator[dict[str, np.ndarray]]:
  """One epoch of training batches {'image': uint8 [B, S, S, 3], 'label': int32 [B]}.

  'label' is what the fold's task trains on (`FoldData.targets`: class or subtype index).

  The order is a fresh permutation for every epoch, a pure function of (seed, epoch); the last
  partial batch is dropped; `start_step` skips the first batches exactly (for a resumed run).
  With `process_rows=(p, n)` only rows p*B/n..(p+1)*B/n of every batch are read (process p of n
  loads its slice of the global batch, in the same global order).
  """
  steps = steps_per_epoch(fold_data, batch_size)
  if steps == 0:
    raise UserError(
        f"batch_size {batch_size} exceeds the {len(fold_data.train_indices)} training images of "
        f"fold {fold_data.fold}; set --config.batch_size lower"
    )
  if not 0 <= start_step <= steps:
    raise ValueError(f"start_step {start_step} is outside [0, {steps}]")
  images, labels = np.asarray(fold_data.images), fold_data.targets  # a plain view of the map
  rows = _rows(batch_size, process_rows)

  def gather(indices: np.ndarray) -> dict[str, np.ndarray]:
    indices = indices[rows]
    return {"image": images[indices], "label": labels[indices]}

  batches = (
      grain.MapDataset.source(fold_data.train_indices)
      .shuffle(seed=_epoch_seed(seed, epoch))
      .batch(batch_size, drop_remainder=True)
  )[start_step:].map(gather)
  return iter(batches.to_iter_dataset(_read_options(num_threads)))


def test_batches(
    fold_data: FoldData,
    batch_size: int,
    *,
    indices: np.ndarray | None = None,
    num_threads: int = 2,
    process_rows: tuple[int, int] = (0, 1),
) -> Iterator[dict[str, np.ndarray]]:
  """Every test image (or each of `indices`) exactly once, in sorted order, in batches of B.

  Batches: 'image' uint8 [B, S, S, 3], 'label', 'patient', 'magnification', 'subtype', 'index'
  (int32 [B], index into the fold data's arrays) and 'mask' (bool [B]). The last batch is padded
  to B with copies of the first image, with mask False; nothing is dropped. With
  `process_rows=(p, n)`, 'image' holds only rows p*B/n..(p+1)*B/n (this process' slice of the
  global batch); the other fields describe the whole batch.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  order = np.sort(np.asarray(fold_data.test_indices if indices is None else indices, np.int64))
  n = len(order)
  if n == 0:
    return iter(())
  padded = np.concatenate([order, np.full((-n) % batch_size, order[0], np.int64)])
  d = fold_data
  images = np.asarray(d.images)  # a plain view of the map
  rows = _rows(batch_size, process_rows)

  def gather(positions: np.ndarray) -> dict[str, np.ndarray]:
    idx = padded[positions]
    return {
        "image": images[idx[rows]],
        "label": d.labels[idx],
        "patient": d.patients[idx],
        "magnification": d.magnifications[idx],
        "subtype": d.subtypes[idx],
        "index": idx.astype(np.int32),
        "mask": positions < n,
    }

  batches = grain.MapDataset.source(np.arange(len(padded))).batch(batch_size).map(gather)
  return iter(batches.to_iter_dataset(_read_options(num_threads)))


test_batches.__test__ = False  # not a test, though pytest collects `test_*` imported into tests
