"""The paper's optimiser and learning-rate schedule (section 3 and the authors' code).

Adam with an L2 weight decay added to the gradient before the moments, as
`torch.optim.Adam(weight_decay=...)` does, and the learning rate halved every 30 epochs (or at
given milestones), as torch's StepLR / MultiStepLR. Steps per epoch may be data (an array in the
train state), so that folds of different sizes are stepped in one program.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           steps_per_epoch: int | jax.Array) -> Callable[[jax.Array], jax.Array]:
  """Step decay by epoch: lr * factor^(number of milestones reached), as torch's MultiStepLR."""
  milestones = jnp.asarray(config.lr_milestones, jnp.int32)

  def schedule(step):
    epoch = step // steps_per_epoch
    if config.lr_milestones:
      decays = jnp.sum(epoch >= milestones)
    else:
      decays = epoch // config.lr_decay_every
    return config.learning_rate * config.lr_decay_factor ** decays

  return schedule


def scale_by_step_decay(config: ml_collections.ConfigDict, steps_per_epoch: int | None = None
                        ) -> optax.GradientTransformationExtraArgs:
  """optax.scale_by_learning_rate(learning_rate_schedule(...)), with the same state and numerics,
  whose steps per epoch may also be passed to `update` as an array (`steps_per_epoch=`)."""
  def update_fn(updates, state, params=None, *, steps_per_epoch=steps_per_epoch, **extra_args):
    del extra_args
    schedule = learning_rate_schedule(config, steps_per_epoch)
    return optax.scale_by_learning_rate(schedule).update(updates, state, params)

  return optax.GradientTransformationExtraArgs(optax.scale_by_schedule(lambda c: c).init,
                                               update_fn)


def make_optimizer(config: ml_collections.ConfigDict,
                   steps_per_epoch: int | None = None, *,
                   trainable: Any = None) -> optax.GradientTransformationExtraArgs:
  """torch.optim.Adam(lr, weight_decay): L2 term added to the gradient, then Adam, then -lr.

  Without `steps_per_epoch`, `update` must be given it (`tx.update(..., steps_per_epoch=n)`), as
  `TrainState.apply_gradients` does. `trainable`, a tree of 'train' / 'frozen' labels like the
  parameters' (a frozen backbone, `jattn.training.state.trainable_labels`), gives the frozen ones
  zero updates and no optimiser state (`optax.partition` with `optax.set_to_zero`).
  """
  tx = _adam(config, steps_per_epoch)
  if trainable is None:
    return tx
  return optax.partition({"train": tx, "frozen": optax.set_to_zero()}, trainable)


def _adam(config, steps_per_epoch):
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
      scale_by_step_decay(config, steps_per_epoch),
  )
