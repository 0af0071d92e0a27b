"""Checks of a run's config before anything is read or written; each problem is one UserError
naming the field. The data source checks its own fields, the backbone its own."""

from __future__ import annotations

import ml_collections

from jattn import models
from jattn.core.errors import UserError
from jattn.data import augment, sources, stain
from jattn.evaluation import metrics
from jattn.training import state


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise UserError(message)


def fold_range(config: ml_collections.ConfigDict) -> range:
  """The folds of the config's data source, 1..K."""
  return range(1, sources.of(config).num_folds(config) + 1)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the values a run depends on."""
  source = sources.of(config)  # an unknown config.data.name is one line
  source.check_config(config)
  folds = fold_range(config)
  last = folds[-1]
  _check(config.fold in folds, f"--config.fold={config.fold}: folds are numbered 1 to {last}")
  parallel_folds, num_devices = config.get("parallel_folds", 1), config.get("num_devices", 0)
  _check(isinstance(parallel_folds, int) and parallel_folds >= 1,
         f"--config.parallel_folds={parallel_folds!r}: the number of consecutive folds trained in "
         f"one program, at least 1 (1: this fold alone)")
  _check(parallel_folds <= last + 1 - config.fold,
         f"--config.parallel_folds={parallel_folds!r} with --config.fold={config.fold}: folds "
         f"{config.fold}..{config.fold + parallel_folds - 1} do not exist (folds are numbered 1 to "
         f"{last}); use at most {last + 1 - config.fold}")
  per_dispatch = config.get("steps_per_dispatch", 1)
  _check(isinstance(per_dispatch, int) and per_dispatch >= 1,
         f"--config.steps_per_dispatch={per_dispatch!r}: the training steps run in one dispatch, "
         f"at least 1 (1: one at a time)")
  _check(isinstance(num_devices, int) and num_devices >= 0,
         f"--config.num_devices={num_devices!r}: a device count, or 0 for all devices")
  for field in ("batch_size", "eval_batch_size", "num_epochs", "image_size", "log_every_steps"):
    _check(isinstance(config[field], int) and config[field] > 0,
           f"--config.{field}={config[field]!r}: must be a positive integer")
  _check(config.learning_rate > 0, f"--config.learning_rate={config.learning_rate}: must be > 0")
  _check(config.lr_decay_every > 0, "--config.lr_decay_every must be positive")
  outputs = source.outputs(config)
  classes = outputs.classes
  _check(len(classes) != 2 or config.tie_rule in ("", *classes),
         f"--config.tie_rule={config.tie_rule!r}: the class a tied vote goes to, one of "
         f"{', '.join(classes)}, or '' (the tied class with the higher mean probability)")
  _check(config.pretrained_scope in models.PRETRAINED_SCOPES,
         f"--config.pretrained_scope={config.pretrained_scope!r}: use one of "
         f"{models.PRETRAINED_SCOPES}")
  _check(config.augment.flip in augment.FLIPS,
         f"--config.augment.flip={config.augment.flip!r}: use one of {augment.FLIPS}")
  _check(config.augment.rotation in augment.ROTATIONS,
         f"--config.augment.rotation={config.augment.rotation!r}: use one of "
         f"{augment.ROTATIONS}")
  _check(0 <= config.augment.max_angle <= 180,
         f"--config.augment.max_angle={config.augment.max_angle}: degrees between 0 and 180")
  for name, high in augment.COLOR_RANGES.items():
    _check(0 <= config.augment[name] <= high,
           f"--config.augment.{name}={config.augment[name]}: between 0 (off) and {high}")
  _check(config.get("stain_norm", "none") in stain.METHODS,
         f"--config.stain_norm={config.get('stain_norm')!r}: use one of {stain.METHODS} (Macenko "
         f"stain normalisation, fitted on the fold's training images, or none)")
  _check(config.tta in state.TTA_MODES,
         f"--config.tta={config.tta!r}: use one of {state.TTA_MODES}")
  _check(config.model.num_classes == len(classes),
         f"--config.model.num_classes={config.model.num_classes} does not fit "
         f"{outputs.decided_by or 'the data'} ({len(classes)} classes: {', '.join(classes)}); set "
         f"--config.model.num_classes="
         f"{len(classes)}")
  _check(isinstance(config.bootstrap_resamples, int) and config.bootstrap_resamples >= 0,
         f"--config.bootstrap_resamples={config.bootstrap_resamples!r}: a count >= 0 (0: no CIs)")
  _check(config.bootstrap_resamples <= metrics.MAX_RESAMPLES,
         f"--config.bootstrap_resamples={config.bootstrap_resamples}: at most "
         f"{metrics.MAX_RESAMPLES:,} (the bootstrap holds a resamples x test groups matrix in "
         f"memory; 1,000 to 10,000 give stable 95% intervals)")
  fraction = config.get("validation_fraction", 0.0)
  _check(isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
         and 0 <= fraction <= 0.5,
         f"--config.validation_fraction={fraction!r}: the fraction of the training groups held "
         f"out for temperature scaling, from 0 (none) to 0.5")
  bins = config.get("calibration", {}).get("bins", 15)
  _check(isinstance(bins, int) and not isinstance(bins, bool) and bins >= 1,
         f"--config.calibration.bins={bins!r}: a number of bins >= 1")
  timeout = config.get("coordinator_timeout_s", 300.0)
  _check(isinstance(timeout, (int, float)) and timeout > 0,
         f"--config.coordinator_timeout_s={timeout!r}: a number of seconds > 0")
  _check(isinstance(config.keep_checkpoints, int) and config.keep_checkpoints >= 1,
         f"--config.keep_checkpoints={config.keep_checkpoints!r}: must be at least 1 (the final "
         f"state of a run is a checkpoint)")
  _check(isinstance(config.checkpoint_every_steps, int) and config.checkpoint_every_steps >= 0,
         f"--config.checkpoint_every_steps={config.checkpoint_every_steps!r}: must be 0 (at epoch "
         f"ends only) or a positive number of steps")
  models.check(config.model, config.image_size)
  backbone = models.of(config.model)
  if config.pretrained and not backbone.TORCHVISION:  # a ViT: its weights are model.weights
    backbone.torchvision_arch(config.model)
