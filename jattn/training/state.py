"""A model's train state and what every user of a trained model needs: preprocessing (stain
normalisation, then the fold's channel statistics), the evaluation step, a fresh state from a
config (ImageNet weights merged) and its abstract shape.

Training (`jattn.training.train`), reading a run (`jattn.inference.runs`), `predict`, `inspect` and
slide inference import this, never the training loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util
from flax.training import train_state

from jattn import models
from jattn.core import errors
from jattn.data import augment as augment_lib
from jattn.data import stain
from jattn.models import weights as convert
from jattn.training import optim

TTA_MODES = ("none", "dihedral")  # config.tta: test-time augmentation of eval_step


class TrainState(train_state.TrainState):
  """Parameters, optimiser state and step, plus batch-norm statistics and the fold's image stats."""

  batch_stats: Any = None
  image_mean: jax.Array = None  # [3], 0-255 scale: the fold's training images
  image_std: jax.Array = None
  # int32 []: the fold's steps per epoch, as data rather than a Python constant so that states of
  # folds with different training-set sizes can be stacked and stepped in one program.
  steps_per_epoch: jax.Array = None
  # config.stain_norm='macenko': the reference fitted on the fold's training images
  # (`jattn.data.stain.fit_reference`); None (no stain normalisation) in every other run.
  stain_matrix: jax.Array = None  # [2, 3]: unit haematoxylin and eosin OD vectors
  stain_max: jax.Array = None  # [2]: their maximum concentrations

  def apply_gradients(self, *, grads, **kwargs):
    """One optimiser step; the learning rate follows this state's own `steps_per_epoch`. Its ops
    are named `optimizer` in the program (the profile's kind `optimiser update`)."""
    with jax.named_scope("optimizer"):
      updates, opt_state = self.tx.update(grads, self.opt_state, self.params,
                                          steps_per_epoch=self.steps_per_epoch)
      params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **kwargs)


def normalize_stains(state: TrainState, images: jax.Array) -> jax.Array:
  """Images [B, H, W, 3] (0-255) normalised to the run's stain reference, per image, in float32
  (Macenko: `jattn.data.stain.normalize`); returned as they are when the run has none. The train
  step applies it before augmentation, the eval step before test-time flips: every image a model
  sees has been through it."""
  if state.stain_matrix is None:
    return images
  return stain.normalize(images, state.stain_matrix, state.stain_max)


def preprocess(state: TrainState, images: jax.Array) -> jax.Array:
  """Normalises 0-255 images by the fold's channel mean and std."""
  return (images.astype(jnp.float32) - state.image_mean) / state.image_std


def eval_step(state: TrainState, batch: Mapping[str, jax.Array], *,
              tta: str = "none") -> dict[str, jax.Array]:
  """Class probabilities of a batch of uint8 images (padding rows are dropped by the caller).

  tta='dihedral' averages the probabilities of the 8 flips and right-angle turns of each image,
  one view after the other (`lax.map`: the memory of one view, not eight). Stains are normalised
  first (`normalize_stains`), once per image: Macenko's estimate ignores where pixels are.
  """
  def probs(images):
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                            preprocess(state, images), train=False)
    return jax.nn.softmax(logits)

  if tta not in TTA_MODES:
    raise ValueError(f"tta={tta!r}: use one of {TTA_MODES}")
  images = normalize_stains(state, batch["image"])
  if tta == "dihedral":
    return {"probs": jnp.mean(jax.lax.map(probs, augment_lib.dihedral_stack(images)), 0)}
  return {"probs": probs(images)}


def initial_variables(config: ml_collections.ConfigDict, rng: jax.Array):
  """(model, variables): the model initialised from `rng`, ImageNet weights merged per the config
  (a missing or unfitting weights folder is a UserError)."""
  model = models.build_model(config.model)
  variables = models.init_variables(model, rng, config.image_size)
  if config.pretrained:
    variables = models.merge_pretrained(config.model, variables,
                                        convert.load_weights(config.pretrained, config.model),
                                        config.pretrained_scope, config.pretrained)
  if config.model.get("weights", ""):  # a ViT preset's published weights (jattn.models.vit)
    variables = models.merge_pretrained(config.model, variables,
                                        models.of(config.model).load_weights(config.model),
                                        "backbone", f"config.model.weights={config.model.weights}")
  return model, variables


def warn_if_from_scratch(config: ml_collections.ConfigDict) -> None:
  if not config.pretrained and not config.model.get("weights", ""):
    errors.warn("config.pretrained is empty: training from scratch, not fine-tuning ImageNet "
                "weights as the paper does")


def make_state(config, model, variables, image_mean, image_std, steps_per_epoch,
               stain_reference=None) -> TrainState:
  """A TrainState of `variables` with the config's optimiser and the fold's image statistics (and
  stain reference, `jattn.data.stain.fit_reference`'s, with config.stain_norm='macenko'; without
  one, a placeholder of its shapes: for abstract shapes and benchmarks, never for training)."""
  wants = config.get("stain_norm", "none") != "none"
  if not wants and stain_reference is not None:
    raise ValueError("a stain reference for a config with stain_norm='none'")
  ref = (stain_reference or stain.placeholder_reference()) if wants else {}
  return TrainState.create(
      apply_fn=model.apply, params=variables["params"],
      tx=optim.make_optimizer(config, trainable=trainable_labels(config, variables["params"])),
      batch_stats=variables.get("batch_stats", {}),
      image_mean=jnp.asarray(image_mean, jnp.float32),
      image_std=jnp.asarray(image_std, jnp.float32),
      steps_per_epoch=jnp.asarray(steps_per_epoch, jnp.int32),
      stain_matrix=jnp.asarray(ref["stain_matrix"], jnp.float32) if ref else None,
      stain_max=jnp.asarray(ref["max_concentrations"], jnp.float32) if ref else None)


def trainable_labels(config: ml_collections.ConfigDict, params) -> Any:
  """The parameters' labels for the optimiser ('train' or 'frozen', `models.trainable`), or None
  when everything is trained (config.model.freeze False: the optimiser of every run before it)."""
  if not config.model.get("freeze", False):
    return None
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {k: "train" if models.trainable(config.model, k) else "frozen" for k in flat})


def abstract_state(config: ml_collections.ConfigDict) -> TrainState:
  """The shapes and dtypes of a run's train state, without computing anything."""
  model = models.build_model(config.model)
  x = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  return jax.eval_shape(lambda: make_state(
      config, model, model.init(jax.random.key(0), x), np.zeros(3), np.ones(3), 1))
