"""A fold's training log: metrics.jsonl and TensorBoard, and the mean of each logged window of
steps (its loss, accuracy, learning rate and images per second)."""

from __future__ import annotations

import contextlib
import os
import time

import jax
import numpy as np
from tensorboardX import SummaryWriter

from jattn.training import workdirs
from jattn.training.fold_run import FoldRun


@contextlib.contextmanager
def open_logs(fold: FoldRun, is_main: bool):
  """The fold's metrics.jsonl (cut back to its checkpoint) and TensorBoard writer, on process 0."""
  if not is_main:
    yield
    return
  metrics_path = os.path.join(fold.workdir, "metrics.jsonl")
  workdirs.truncate_metrics(metrics_path, fold.start_step)
  with open(metrics_path, "a") as fold.metrics_file, SummaryWriter(
      os.path.join(fold.workdir, "tensorboard"), purge_step=fold.start_step) as fold.writer:
    yield


def summarize(fold: FoldRun, plan, done: int) -> dict[str, float]:
  """The fold's mean metrics over the steps since its last summary (waits for them). `done` is
  the step the wait reaches (the end of the dispatch holding the window's last step): the rate
  counts the steps run since the last wait (a window whose steps all ran in a dispatch already
  waited for has that dispatch's rate)."""
  fetched = {id(m): m for m, _, _ in fold.pending}
  fetched = dict(zip(fetched, jax.device_get(list(fetched.values())), strict=True))
  seconds = time.time() - fold.window_start  # after the wait: the window's steps have run
  if done > fold.window_done:
    fold.window_rate = (done - fold.window_done) * fold.config.batch_size / max(seconds, 1e-9)
  stacked = []
  for m, k, i in fold.pending:  # the step's metrics: its index in a dispatch, then its fold
    m = fetched[id(m)]
    m = m if i is None else {key: v[i] for key, v in m.items()}
    stacked.append(m if plan.num_folds == 1 else {key: v[k] for key, v in m.items()})
  return {
      "step": fold.step,
      "steps": len(stacked),
      "loss": float(np.mean([m["loss"] for m in stacked])),
      "accuracy": float(np.mean([m["accuracy"] for m in stacked])),
      "learning_rate": float(stacked[-1]["learning_rate"]),  # what the optimiser last applied
      "images_per_second": fold.window_rate,
  }
