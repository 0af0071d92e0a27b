"""The data sources jattn can train and evaluate on, by `config.data.name`: `breakhis` (the
paper's), `folder` (a folder per class, or a manifest), `slides` (regions annotated on whole
slides in QuPath), `bags` (slides as bags of tile features, for multiple-instance learning) and
`tfds:NAME` (a prepared TFDS data set).

A config's data settings are `config.data`: the fields every source reads (`dir`, `prepared_dir`,
`folds`, `folds_seed`, `num_folds`, `skip_corrupt`) and one group per source holding the fields
only it reads, `config.data.<NAME>` (BreakHis' task, magnifications and synthetic tree; the folder
source's manifest, classes, group, strata and mpp; the TFDS source's own), each group's defaults
given by its source (`DEFAULTS`) and checked by it (`check_config`).

A source is a module that knows one kind of data set and turns it into the generic `FoldData`
(jattn/data/fold.py); nothing else in jattn knows a source's name, classes or strata. Each
provides:

  NAME, GROUP_UNIT               NAME also names its group of fields, config.data.<NAME>
  DEFAULTS                        that group's fields and defaults, {field: value}
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
                                  MPP, the field a slide tile covers (jattn.slides), or absent;
  field_pixels(config)            (optional) the same where the config decides it (slides)

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

import ml_collections

from jattn.core.errors import UserError

SOURCES = {"breakhis": "jattn.data.breakhis.source", "folder": "jattn.data.folder",
           "slides": "jattn.data.slide_regions", "bags": "jattn.data.bags"}
# Families of sources named `<prefix>NAME`: `tfds:colorectal_histology` is the TFDS source.
PREFIXED = {"tfds:": "jattn.data.tfds_source"}


def get(name: str) -> ModuleType:
  """The source module of `config.data.name`; an unknown name is one line naming the choices."""
  for prefix, module in PREFIXED.items():
    if str(name).startswith(prefix):
      return importlib.import_module(module)
  if name not in SOURCES:
    close = difflib.get_close_matches(str(name), SOURCES, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    choices = [*SOURCES, *(f"{prefix}NAME (a prepared TFDS data set)" for prefix in PREFIXED)]
    raise UserError(f"--config.data.name={name!r} is not a data source: use one of "
                    f"{', '.join(choices)}{hint}")
  return importlib.import_module(SOURCES[name])


def of(config) -> ModuleType:
  """The source a config names (`config.data.name`)."""
  return get(config.data.name)


def settings(config) -> ml_collections.ConfigDict:
  """The config's group of fields of its own source, `config.data.<NAME>`."""
  return config.data[of(config).NAME]


def field(config, name: str) -> str:
  """A field of the config's own source by its dotted name, as messages give it:
  `field(config, 'classes')` is 'data.folder.classes' for the folder source."""
  return f"data.{of(config).NAME}.{name}"


# The fields every source reads, with their defaults (configs/default.py's `config.data`).
COMMON = {
    # BreakHis: the folder that holds BreaKHis_v1/ (or BreaKHis_v1.tar.gz); folder: DIR/<class>/...;
    # tfds: the TFDS data dir (e.g. ~/tensorflow_datasets).
    "dir": "data",
    # The decoded-image cache and normalisation statistics ('': a folder of ~/.cache/jattn/prepared,
    # or <dir>/jattn_prepared for BreakHis).
    "prepared_dir": "",
    # 'generated'; BreakHis: a Folds.csv file or an mkfold/ folder; folder and tfds: a CSV of
    # fold,split,path rows; tfds: also 'splits' (its own train and test splits, one fold).
    "folds": "generated",
    "folds_seed": 0,  # seed of the generated folds (used only when folds == 'generated')
    # folds drawn when folds == 'generated' (StratifiedGroupKFold's K; not BreakHis, which has 5)
    "num_folds": 5,
    "skip_corrupt": False,  # skip unreadable images (listed in the log) instead of stopping
}


def default_config(name: str = "breakhis") -> ml_collections.ConfigDict:
  """`config.data` with every source's group at its defaults, `name` the source used."""
  data = ml_collections.ConfigDict({"name": name, **COMMON})
  for module in [*SOURCES.values(), *PREFIXED.values()]:
    source = importlib.import_module(module)
    data[source.NAME] = ml_collections.ConfigDict(source.DEFAULTS)
  return data
