"""The validation split of temperature scaling, carved out of a fold's training groups.

Any data source's fold (`FoldData`) is split the same way, from its training indices, groups and
targets alone: scikit-learn's `StratifiedGroupKFold` (shuffled with `config.seed`) cuts the
training groups into round(1 / fraction) parts whose class proportions are as close to the
training set's as whole groups allow; the first part is the validation split. A group (BreakHis:
a patient, with every image of every magnification) is never on both sides, and the test split is
not touched. The model trains on the rest, whose channel statistics replace the fold's.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from jattn.core.errors import UserError
from jattn.data import prepare
from jattn.data.fold import FoldData


def parts(fraction: float) -> int:
  """How many parts the training groups are cut into for a validation fraction in (0, 0.5]."""
  return max(2, round(1 / fraction))


def split(fold_data: FoldData, fraction: float, seed: int) -> tuple[FoldData, np.ndarray]:
  """(the fold with the rest of its training images as training set, the validation indices,
  sorted): about `fraction` of the training groups, stratified by class, drawn with `seed`."""
  train = np.asarray(fold_data.train_indices)
  groups, targets = fold_data.groups[train], fold_data.targets[train]
  k = parts(fraction)
  if len(np.unique(groups)) < k:
    raise UserError(f"--config.validation_fraction={fraction}: fold {fold_data.fold} has "
                    f"{len(np.unique(groups))} training {fold_data.group_unit}s, fewer than the "
                    f"{k} parts it is cut into; give a larger fraction or 0 (no validation split)")
  splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
  rest, validation = next(splitter.split(np.zeros(len(train)), targets, groups))
  rest, validation = np.sort(train[rest]), np.sort(train[validation])
  mean, std = prepare.channel_stats(fold_data.images, rest)
  return dataclasses.replace(fold_data, train_indices=rest, mean=mean, std=std), validation


def describe(fold_data: FoldData, validation: np.ndarray, fraction: float, seed: int) -> dict:
  """What results.json says of the split."""
  return {"fraction": fraction, "parts": parts(fraction), "seed": seed,
          "method": "StratifiedGroupKFold (scikit-learn), the first of the parts",
          "images": len(validation),
          "groups": len(np.unique(fold_data.groups[validation])),
          "train_images": len(fold_data.train_indices),
          "train_groups": len(np.unique(fold_data.groups[fold_data.train_indices]))}
