"""BreakHis for jattn: scanning, folds, TFDS preparation, the decoded-image cache and batches.

  from jattn.data import load_fold, train_batches, test_batches, steps_per_epoch
  fold_data = load_fold(config)   # configs/default.py: data_dir, folds, fold, image_size, ...

breakhis.py (naming), scan.py (the tree), fetch.py (download), folds.py (the three fold forms),
tfds_builder.py (`Breakhis`), prepare.py (cache and stats), pipeline.py (batches), augment.py
(on-device flips, rotations, stain colours), preview.py (augment-preview), synthetic.py (test
data).
The names below are imported on first use, so that `python -m jattn.data` and modules that need
only `jattn.data.breakhis` do not load grain, JAX and TFDS.
"""

import importlib

from jattn.data.breakhis import CLASSES, MAGNIFICATIONS, SUBTYPE_CODES, SUBTYPES, TASKS, Record

_LAZY = {
    "Breakhis": "jattn.data.tfds_builder",
    "FoldData": "jattn.data.pipeline",
    "Folds": "jattn.data.folds",
    "generate_folds": "jattn.data.folds",
    "load_fold": "jattn.data.pipeline",
    "read_folds": "jattn.data.folds",
    "selection": "jattn.data.pipeline",
    "steps_per_epoch": "jattn.data.pipeline",
    "synthesize": "jattn.data.synthetic",
    "test_batches": "jattn.data.pipeline",
    "train_batches": "jattn.data.pipeline",
}

__all__ = ["CLASSES", "MAGNIFICATIONS", "SUBTYPE_CODES", "SUBTYPES", "TASKS", "Record", *_LAZY]


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(__all__)
