"""A sweep's report: its tables (`tables`) and its paired comparisons (`compare`), written together
into the sweep folder."""

from __future__ import annotations

import os

from jattn.core import files
from jattn.evaluation import compare, tables


def write(sweep_dir: str, pairs: list[str] | None = None,
          metric: str = "accuracy") -> tuple[str, str]:
  """Writes tables.md, tables.csv, tables.png and the paired comparisons (those of `pairs`,
  FIRST:SECOND, else the default ones), compare.md and compare.csv, into the sweep folder, once
  everything has been read and checked; returns the tables' and the comparisons' Markdown."""
  sweep = tables.collect(sweep_dir)
  cells = tables.aggregate(sweep)
  comparisons = compare.compute(sweep, pairs, metric)
  markdown = tables.format_markdown(sweep, cells)
  files.atomic_write_text(os.path.join(sweep_dir, "tables.md"), markdown)
  files.atomic_write_text(os.path.join(sweep_dir, "tables.csv"),
                          tables.format_csv(cells, sweep.layout))
  tables.plot(sweep, cells, os.path.join(sweep_dir, "tables.png"))
  return markdown, compare.write(comparisons)
