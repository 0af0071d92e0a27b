"""The data sources jattn can train and evaluate on, by `config.dataset`: `breakhis` (the paper's),
`folder` (a folder per class, or a manifest) and `tfds:NAME` (a prepared TFDS data set).

A source is a module that knows one kind of data set and turns it into the generic `FoldData`
(jattn/data/fold.py); nothing else in jattn knows a source's name, classes or strata. Each
provides:

  NAME, GROUP_UNIT
  check_config(config)            its own config fields (one UserError naming the field)
  outputs(config) -> Outputs      the model's classes and their meaning, without reading data
  num_folds(config) -> int        folds are numbered 1..num_folds
  check_data_dir(config)          a quick look that the data is there, before slower checks
  load_fold(config) -> FoldData   prepares what is missing, once, then maps the cache
  load_all(config) -> FoldData    (optional) every image the config selects, for external
                                  validation (below)
  describe_file(path) -> dict | None   {group, strata} from a file's name, for predict
  published                       figures a paper reported on it (tables), or absent
  FIELD_PIXELS                    (width, height) of its images as published: with a stratum's
                                  MPP, the field a slide tile covers (jattn.slides), or absent

`load_all` is the fold-free mode that external validation (`jattn validate-external`,
`jattn.inference.external`) scores a finished run with: the data set prepared as `load_fold`
prepares it (same cache, at `config.image_size`), as one `FoldData` whose `test_indices` are every
image the config selects (sorted), `train_indices` empty, `fold` 0, `mean` and `std` NaN (no
statistics are computed: the run brings its own), `folds_source` saying that no folds were used, and
nothing about folds read, generated or written. A source without it cannot be used for external
validation (one line says so).
"""

from __future__ import annotations

import difflib
import importlib
from types import ModuleType

from jattn.core.errors import UserError

SOURCES = {"breakhis": "jattn.data.breakhis.source", "folder": "jattn.data.folder"}
# Families of sources named `<prefix>NAME`: `tfds:colorectal_histology` is the TFDS source.
PREFIXED = {"tfds:": "jattn.data.tfds_source"}


def get(name: str) -> ModuleType:
  """The source module of `config.dataset`; an unknown name is one line naming the choices."""
  for prefix, module in PREFIXED.items():
    if str(name).startswith(prefix):
      return importlib.import_module(module)
  if name not in SOURCES:
    close = difflib.get_close_matches(str(name), SOURCES, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    choices = [*SOURCES, *(f"{prefix}NAME (a prepared TFDS data set)" for prefix in PREFIXED)]
    raise UserError(f"--config.dataset={name!r} is not a data source: use one of "
                    f"{', '.join(choices)}{hint}")
  return importlib.import_module(SOURCES[name])


def of(config) -> ModuleType:
  """The source a config names (`config.dataset`, BreakHis for configs that predate it)."""
  return get(config.get("dataset", "breakhis"))
