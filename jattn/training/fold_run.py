"""What the training loop keeps of one fold it trains (`FoldRun`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections


@dataclasses.dataclass(eq=False)
class FoldRun:
  """What the loop keeps of one fold it trains: its data, work dir, counters and open files."""

  config: ml_collections.ConfigDict
  workdir: str
  data: Any = None
  steps_per_epoch: int = 0
  total_steps: int = 0
  step: int = 0  # a Python copy of the fold's state.step: reading the device's would wait
  start_step: int = 0
  results: dict | None = None  # read from results.json when the fold had finished
  stain: dict | None = None  # its stain reference (config.stain_norm), fitted on its training set
  validation: Any = None  # the validation split's indices (config.validation_fraction), or None
  manager: Any = None
  metrics_file: Any = None
  writer: Any = None
  pending: list = dataclasses.field(default_factory=list)  # (metrics, fold k, index in dispatch)
  window_start: float = 0.0
  window_done: int = 0  # the steps known to have run when window_start was taken
  window_rate: float = 0.0  # images/s of the last window that waited for steps to run
  epoch_windows: list = dataclasses.field(default_factory=list)
  print_windows: bool = False  # a line per logged window (no progress bar: not a terminal)
  action: str = "write"  # what claiming the work dir takes (`workdirs.action`)(`action`)
  layout: dict | None = None  # `parallel.layout` of this session
  layout_history: list | None = None  # layouts.json: [{from_step, layout}], on process 0

  @property
  def name(self) -> str:
    return f"fold {self.config.fold} of {self.config.name}"
