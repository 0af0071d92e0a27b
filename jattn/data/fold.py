"""The generic description of one fold that every data source produces (`FoldData`).

Training, batching and evaluation read only this: the images, what the model is trained to tell
(`targets` over `classes`), the group of each image (the unit folds keep apart and the bootstrap
resamples: BreakHis' patient), the strata reported separately (BreakHis' magnification), an
optional map from the classes to a coarser label with a positive one, and the split. No source's
name, class or stratum is known outside its own module.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Strata:
  """One named partition of the images, each of its values reported on its own."""

  name: str  # e.g. 'magnification'
  values: tuple[str, ...]  # in report order, e.g. ('40X', '100X', '200X', '400X')
  index: np.ndarray  # int32 [N]: each image's value, an index into `values`
  mpp: tuple[float | None, ...] = ()  # microns per pixel of each value's images, where known
  mpp_note: str = ""  # where those figures come from (say so when they are estimates)


@dataclasses.dataclass(frozen=True)
class ClassMap:
  """Each class's coarser label and which coarse label is the positive one.

  BreakHis' binary task maps (benign, malignant) onto themselves; its subtype task maps the eight
  subtypes onto benign and malignant. P(positive) is the sum of the probabilities of the classes
  whose coarse label is `positive`.
  """

  names: tuple[str, ...]  # the coarse labels, e.g. ('benign', 'malignant')
  of: tuple[int, ...]  # the coarse label of each class, an index into `names`
  positive: int  # index into `names`

  @property
  def positive_name(self) -> str:
    return self.names[self.positive]

  def coarse(self, classes: np.ndarray) -> np.ndarray:
    """The coarse label index of each class index in `classes`."""
    return np.asarray(self.of, np.int64)[np.asarray(classes, np.int64)]

  def positive_probability(self, probs: np.ndarray) -> np.ndarray:
    """P(positive) of class probabilities [..., classes]."""
    members = [i for i, c in enumerate(self.of) if c == self.positive]
    return np.asarray(probs)[..., members].sum(-1)

  def to_json(self, classes: tuple[str, ...]) -> dict:
    return {"names": list(self.names), "positive": self.positive_name,
            "of": {c: self.names[k] for c, k in zip(classes, self.of, strict=True)}}


@dataclasses.dataclass(frozen=True)
class Outputs:
  """What a model's outputs mean, known from a config without reading data: its classes, what a
  class is called, their coarse labels (if any) and what a group is."""

  classes: tuple[str, ...]
  class_kind: str = "class"
  binary: ClassMap | None = None
  group_unit: str = "group"
  strata: tuple[str, ...] = ()  # the names of the strata axes
  decided_by: str = ""  # the config fields that decide the classes, for messages


@dataclasses.dataclass(frozen=True)
class Labelling:
  """A further labelling of the images, reported as accuracy per value (BreakHis: subtype)."""

  name: str
  values: tuple[str, ...]
  index: np.ndarray  # int32 [N]


@dataclasses.dataclass(frozen=True, eq=False)
class FoldData:
  """Every image of a data set (decoded, S x S) and one fold's train/test indices into them."""

  source: str  # the data source's name, e.g. 'breakhis'
  images: np.ndarray  # uint8 [N, S, S, 3], memory-mapped
  file_names: tuple[str, ...]  # unique: the rows of predictions.csv
  targets: np.ndarray  # int32 [N]: the class each image is trained on, an index into `classes`
  classes: tuple[str, ...]  # the model's outputs, in order
  groups: np.ndarray  # int32 [N]: index into group_ids
  group_ids: tuple[str, ...]
  strata: tuple[Strata, ...]
  train_indices: np.ndarray  # int64, sorted
  test_indices: np.ndarray  # int64, sorted
  mean: np.ndarray  # float32 [3], 0-255 scale, of this fold's training images
  std: np.ndarray  # float32 [3]
  fold: int
  folds_source: str  # the folds file or folder the fold comes from, or how it was generated
  group_unit: str = "group"  # what a group is, e.g. 'patient' or 'slide'
  class_kind: str = "class"  # what a class is called, e.g. 'subtype'
  binary: ClassMap | None = None  # classes -> a coarse label with a positive one
  subclasses: Labelling | None = None
  selected: tuple[tuple[str, ...], ...] = ()  # per strata axis, the values the run selected
  skipped: tuple[str, ...] = ()  # unreadable images left out, paths
  problems: tuple[str, ...] = ()  # what the source's scan found (misnamed files, ...)

  @property
  def outputs(self) -> Outputs:
    return Outputs(self.classes, self.class_kind, self.binary, self.group_unit,
                   tuple(s.name for s in self.strata))

  @property
  def image_size(self) -> int:
    return int(self.images.shape[1])

  @property
  def num_images(self) -> int:
    return int(self.images.shape[0])
