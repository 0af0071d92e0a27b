"""The tile grid of a slide, the tissue tiles on it, and a bounded stream of their images.

Tiles start at level-0 (0, 0) and step by `stride` times the tile (1: side by side, 0.5: half
overlapping); only whole tiles inside the slide are on the grid. The stream reads tiles on a pool
of threads, at most `in_flight` at a time (the memory of a few batches, whatever the slide's
size), and yields them in order, batch by batch; a region OpenSlide cannot read is left out and
reported, not fatal.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import time
from collections.abc import Callable, Iterator

import numpy as np
import openslide

from jattn.data.wsi import Grid
from jattn.slides import tissue


@dataclasses.dataclass(frozen=True)
class Tiles:
  """The tissue tiles of a slide, in row-major order."""

  rows: np.ndarray  # int64 [n]
  cols: np.ndarray
  xs: np.ndarray  # level-0 top-left corners
  ys: np.ndarray
  fractions: np.ndarray  # float64 [n], of the tile the tissue mask covers (or its region)
  regions: np.ndarray | None = None  # int64 [n]: each tile's annotated region (--regions)

  def __len__(self) -> int:
    return len(self.xs)


def tissue_tiles(grid: Grid, mask: np.ndarray, per_pixel: tuple[float, float],
                 min_tissue: float) -> Tiles:
  """The grid's tiles with at least `min_tissue` of their area (and some) under the mask."""
  rows, cols = (a.ravel() for a in np.meshgrid(np.arange(grid.rows), np.arange(grid.cols),
                                               indexing="ij"))
  xs, ys = cols * grid.step[0], rows * grid.step[1]
  fractions = tissue.tile_fractions(mask, xs, ys, grid.tile, per_pixel)
  keep = (fractions >= min_tissue) & (fractions > 0)
  return Tiles(rows[keep], cols[keep], xs[keep], ys[keep], fractions[keep])


@dataclasses.dataclass
class Stats:
  """What a stream spent its time on: thread-seconds reading (and resizing), seconds the consumer
  waited for tiles, and the regions it could not read ((index, message))."""

  read_s: float = 0.0
  wait_s: float = 0.0
  failures: list[tuple[int, str]] = dataclasses.field(default_factory=list)


def stream(read: Callable[[int], np.ndarray], count: int, batch_size: int, threads: int,
           stats: Stats, in_flight: int | None = None
           ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(indices [n], images [n, ...]) batches of `read(i)` for i in range(count), in order, n <=
  batch_size; `read` runs on `threads` threads, at most `in_flight` (default 2 batches, at
  least 2 per thread) reads ahead. An `openslide.OpenSlideError` from `read(i)` leaves i out and
  is recorded in `stats.failures`."""
  in_flight = in_flight or max(2 * batch_size, 2 * threads)

  def timed(i):
    start = time.perf_counter()
    image = read(i)
    return image, time.perf_counter() - start

  pending: collections.deque = collections.deque()
  next_index = 0
  with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="jattn-tiles") as pool:
    try:
      indices, images = [], []
      while next_index < count or pending:
        while next_index < count and len(pending) < in_flight:
          pending.append((next_index, pool.submit(timed, next_index)))
          next_index += 1
        i, future = pending.popleft()
        start = time.perf_counter()
        try:
          image, seconds = future.result()
        except openslide.OpenSlideError as e:
          stats.failures.append((i, " ".join(str(e).split()) or type(e).__name__))
          continue
        finally:
          stats.wait_s += time.perf_counter() - start
        stats.read_s += seconds
        indices.append(i)
        images.append(image)
        if len(images) == batch_size:
          yield np.asarray(indices), np.stack(images)
          indices, images = [], []
      if images:
        yield np.asarray(indices), np.stack(images)
    finally:
      pool.shutdown(wait=True, cancel_futures=True)
