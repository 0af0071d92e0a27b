"""jattn's data: a source per kind of data set, one generic fold description, batches.

  from jattn import data
  fold_data = data.load_fold(config)   # config.data.name picks the source (default 'breakhis')
  for batch in data.train_batches(fold_data, 8, seed=0, epoch=e): ...

fold.py (`FoldData`: images, targets, classes, groups, strata, split), sources.py (the registry),
prepare.py (the decoded-image cache and normalisation stats every source shares), pipeline.py
(batches), augment.py (on-device flips, rotations, stain colours), stain.py (Macenko stain
normalisation), preview.py (augment-preview);
breakhis/ (BreakHis: naming, scan, download, folds, TFDS builder, synthesizer, describe, export);
folder.py (a folder per class, or a manifest), tfds_source.py (a prepared TFDS data set),
slide_regions.py (regions annotated on whole slides in QuPath), bags.py (slides as bags of
tile features in HDF5, for multiple-instance learning) and labelled.py (what those share:
the table of images, folds, the FoldData); wsi.py (a whole slide's scale and tiles, which the slide
command reads with too), annotations.py (QuPath's GeoJSON regions, shapely's geometry),
synthetic_slides.py (the annotated slides of the slides demo).
The names below are imported on first use, so that `jattn data` does not load grain,
JAX and TFDS.
"""

import importlib

_LAZY = {
    "ClassMap": "jattn.data.fold",
    "FoldData": "jattn.data.fold",
    "Labelling": "jattn.data.fold",
    "Strata": "jattn.data.fold",
    "load_all": "jattn.data.pipeline",
    "load_fold": "jattn.data.pipeline",
    "steps_per_epoch": "jattn.data.pipeline",
    "test_batches": "jattn.data.pipeline",
    "train_batches": "jattn.data.pipeline",
}

__all__ = list(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(__all__)
