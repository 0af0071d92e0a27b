"""Cutting a run's steps into dispatches: the batches of each, one step or several (one
`lax.scan`, `config.steps_per_dispatch`), cut to single steps where an epoch end or a checkpoint
falls inside."""

from __future__ import annotations

import collections
from collections.abc import Iterator

import numpy as np

from jattn import data
from jattn.training import parallel
from jattn.training.fold_run import FoldRun


def fold_batches(fold: FoldRun, config, rows: tuple[int, int]) -> Iterator[dict]:
  """The fold's training batches (this process' rows) from its current step to its last."""
  for epoch in range(fold.step // fold.steps_per_epoch, config.num_epochs):
    yield from data.train_batches(fold.data, config.batch_size, seed=config.seed, epoch=epoch,
                                  start_step=max(fold.step - epoch * fold.steps_per_epoch, 0),
                                  num_threads=config.loader_threads, process_rows=rows)


def steps_to_save(fold: FoldRun, step: int) -> int:
  """Steps from `step` to the fold's next epoch end or checkpoint (its last step is an epoch
  end)."""
  to_save = fold.steps_per_epoch - step % fold.steps_per_epoch
  every = fold.config.checkpoint_every_steps
  return min(to_save, every - step % every) if every else to_save


def dispatches(plan, folds: list[FoldRun], config, per_dispatch: int
                ) -> Iterator[tuple[dict, np.ndarray, int]]:
  """(global batch, active folds, steps) of every dispatch until the last fold has finished.

  One step per dispatch when `per_dispatch` is 1; else `per_dispatch` steps stacked, or a single
  step (stacked too) wherever an active fold's epoch end or checkpoint falls before the dispatch's
  last step: two shapes to compile, and every save after the dispatch that ends on its step. The
  cut depends only on the steps, so a resumed run cuts as the uninterrupted one did. No fold
  starts or stops inside a dispatch (a fold ends at an epoch end), so `active` holds for all its
  steps.
  """
  rows = parallel.process_rows(plan)
  streams = [fold_batches(fold, config, rows) for fold in folds]
  for active, size in sizes(folds, per_dispatch):
    steps = [[next(s) if a else None for s, a in zip(streams, active, strict=True)]
             for _ in range(size)]
    if per_dispatch == 1:
      yield parallel.batch(plan, steps[0], config.batch_size), active, 1
    else:
      yield parallel.batches(plan, steps, config.batch_size), active, size


def sizes(folds: list[FoldRun], per_dispatch: int) -> Iterator[tuple[np.ndarray, int]]:
  """(active folds, steps) of each dispatch `dispatches` makes, from the folds' current steps."""
  starts = [fold.step for fold in folds]
  remaining = [fold.total_steps - fold.step for fold in folds]
  t = 0
  while t < max(remaining):
    active = np.array([t < r for r in remaining])
    size = per_dispatch if per_dispatch > 1 and all(
        steps_to_save(fold, start + t) >= per_dispatch
        for fold, start, a in zip(folds, starts, active, strict=True) if a) else 1
    yield active, size
    t += size


def prefetch(items: Iterator, size: int = 2) -> Iterator:
  """Assembles (and puts on the devices) the next items while the current step runs."""
  queue = collections.deque()
  for item in items:
    queue.append(item)
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
