"""The input pipeline: one fold of a data set in memory-mapped uint8, and its train and test
batches.

  fold_data = load_fold(config)                       # the config's source prepares it, once
  every = load_all(config)                            # every image as test images (no folds)
  for batch in train_batches(fold_data, 8, seed=0, epoch=e):   # {'image', 'label'}
  for batch in test_batches(fold_data, 32):           # + 'group', 'index', 'mask'

Batches are gathered from the decoded-image cache by grain in this process, on threads (a batch is
one fancy-indexed read of the memory map, which releases the GIL); images stay uint8 and are
augmented and normalised on the accelerator. The training order is a pure function of
(seed, epoch), so a run resumed at (epoch, start_step) sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import grain
import numpy as np

from jattn.core.errors import UserError
from jattn.data import sources
from jattn.data.fold import FoldData


def load_fold(config) -> FoldData:
  """Fold `config.fold` of the data set `config.data.name` names, prepared once (its source's
  `load_fold`), after the checks that need no data."""
  source = sources.of(config)
  source.check_config(config)
  if not isinstance(config.fold, int) or not 1 <= config.fold <= source.num_folds(config):
    raise UserError(f"config.fold must be one of 1..{source.num_folds(config)}, got "
                    f"{config.fold!r}")
  if not isinstance(config.image_size, int) or config.image_size < 1:
    raise UserError(f"config.image_size must be a positive integer, got {config.image_size!r}")
  return source.load_fold(config)


def load_all(config) -> FoldData:
  """Every image of the data set `config.data.name` names that the config selects, all as test
  images and no training split (its source's `load_all`; external validation)."""
  source = sources.of(config)
  source.check_config(config)
  if not hasattr(source, "load_all"):
    raise UserError(f"--config.data.name={source.NAME!r} cannot give all its images at once (its "
                    f"source has no load_all), so a run cannot be evaluated on it")
  if not isinstance(config.image_size, int) or config.image_size < 1:
    raise UserError(f"config.image_size must be a positive integer, got {config.image_size!r}")
  return source.load_all(config)


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

  'label' is what the model is trained on (`FoldData.targets`, an index into its classes).

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

  Batches: 'image' uint8 [B, S, S, 3], 'label' (the target), 'group', 'index' (int32 [B], index
  into the fold data's arrays) and 'mask' (bool [B]). The last batch is padded
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
        "label": d.targets[idx],
        "group": d.groups[idx],
        "index": idx.astype(np.int32),
        "mask": positions < n,
    }

  batches = grain.MapDataset.source(np.arange(len(padded))).batch(batch_size).map(gather)
  return iter(batches.to_iter_dataset(_read_options(num_threads)))


test_batches.__test__ = False  # not a test, though pytest collects `test_*` imported into tests
