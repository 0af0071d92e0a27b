"""The data sources jattn can train and evaluate on, by `config.dataset`.

A source is a module that knows one kind of data set and turns it into the generic `FoldData`
(jattn/data/fold.py); nothing else in jattn knows a source's name, classes or strata. Each
provides:

  NAME, GROUP_UNIT
  check_config(config)            its own config fields (one UserError naming the field)
  outputs(config) -> Outputs      the model's classes and their meaning, without reading data
  num_folds(config) -> int        folds are numbered 1..num_folds
  check_data_dir(config)          a quick look that the data is there, before slower checks
  load_fold(config) -> FoldData   prepares what is missing, once, then maps the cache
  describe_file(path) -> dict | None   {group, strata} from a file's name, for predict
  published                       figures a paper reported on it (tables), or absent
"""

from __future__ import annotations

import difflib
import importlib
from types import ModuleType

from jattn.errors import UserError

SOURCES = {"breakhis": "jattn.data.breakhis.source"}


def get(name: str) -> ModuleType:
  """The source module of `config.dataset`; an unknown name is one line naming the choices."""
  if name not in SOURCES:
    close = difflib.get_close_matches(str(name), SOURCES, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UserError(f"--config.dataset={name!r} is not a data source: use one of "
                    f"{', '.join(SOURCES)}{hint}")
  return importlib.import_module(SOURCES[name])


def of(config) -> ModuleType:
  """The source a config names (`config.dataset`, BreakHis for configs that predate it)."""
  return get(config.get("dataset", "breakhis"))
