"""The layout history of a work dir: under which parallel layout each stretch of its steps was
trained (WORKDIR/layouts.json; results.json's `layout`)."""

from __future__ import annotations

import os

from jattn.core import errors, files
from jattn.evaluation import results
from jattn.training import parallel
from jattn.training.fold_run import FoldRun

LAYOUTS_FILE = "layouts.json"  # in a work dir: the layout of each stretch of its training


def record(fold: FoldRun) -> list[dict]:
  """The fold's layout history with this session's layout, written to WORKDIR/layouts.json.

  The history is a list of {from_step, layout}: the steps from `from_step` on were trained under
  `layout` (None: before jattn recorded layouts). Entries of sessions whose steps were not kept
  (killed before a checkpoint) are dropped. Resuming under another layout is correct but not
  bit-identical to training under one (README, Reproducibility): a warning says so.
  """
  path = os.path.join(fold.workdir, LAYOUTS_FILE)
  history = files.read_json(path, f"delete it (it only records how {fold.workdir} was laid out)"
                            ) if os.path.exists(path) else []
  history = [h for h in history if h["from_step"] < fold.start_step]
  if fold.start_step and not history:
    history = [{"from_step": 0, "layout": None}]
  before = history[-1]["layout"] if history else None
  changes = parallel.layout_changes(before, fold.layout) if before is not None else []
  if changes:
    errors.warn(f"{fold.workdir} was trained up to step {fold.start_step} under another layout "
                f"({'; '.join(changes)}); resuming under this one gives a different, equally valid "
                f"run, not the bit-identical continuation of a resume under the same layout "
                f"(results.json: layout.history)")
  if before is None or {**parallel.LAYOUT_DEFAULTS, **before} != fold.layout:
    history.append({"from_step": fold.start_step, "layout": fold.layout})
  results.write_json(path, history)
  return history


def summary(layout: dict, history: list[dict] | None) -> dict:
  """results.json's `layout`: this session's layout, the work dir's history and `one_layout`
  (True: every step under one layout; None: unknown)."""
  return {**layout, "history": history,
          "one_layout": None if history is None or history[0]["layout"] is None else all(
              not parallel.layout_changes(history[0]["layout"], h["layout"]) for h in history)}
