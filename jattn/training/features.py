"""Features of images through a model's backbone: what its final linear layer (`head`) takes.

  compute(state, images)   uint8 [N, S, S, 3] -> float32 [N, D]

The images are preprocessed as the eval step does (`state.normalize_stains`, then the state's
channel statistics) and go through the model in eval mode (`train=False`: batch norm from its
running statistics, no dropout) with `return_features=True` (`jattn.models.feature_dim` gives D).
The features of an image are therefore those its logits come from: `head(features)` are the
logits `state.eval_step` turns into probabilities (without test-time augmentation). Batches have a
fixed size (the last one padded), so one program serves a whole data set or slide.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from jattn.training import state as state_lib

DEFAULT_BATCH_SIZE = 64


def features_of(state: state_lib.TrainState, images: jax.Array) -> jax.Array:
  """float32 [B, D] of uint8 images [B, S, S, 3] (pure; jitted by `compute`)."""
  x = state_lib.preprocess(state, state_lib.normalize_stains(state, images))
  out = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, x,
                       train=False, return_features=True)
  return out.astype(np.float32)


_jitted = jax.jit(features_of)


def batches(state: state_lib.TrainState, images, batch_size: int = DEFAULT_BATCH_SIZE):
  """(start, float32 [n, D]) of each batch of `images` (an array or memory map), in order."""
  for start in range(0, len(images), batch_size):
    chunk = np.asarray(images[start:start + batch_size])
    n = len(chunk)
    if n < batch_size:  # one shape for every call: pad with the first image, drop its rows
      chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - n, axis=0)])
    yield start, np.asarray(_jitted(state, chunk))[:n]


def compute(state: state_lib.TrainState, images, batch_size: int = DEFAULT_BATCH_SIZE
            ) -> np.ndarray:
  """float32 [N, D]: the features of every image of `images` (uint8 [N, S, S, 3])."""
  out = [f for _, f in batches(state, images, batch_size)]
  if out:
    return np.concatenate(out)
  dim = jax.eval_shape(functools.partial(features_of, state),
                       jax.ShapeDtypeStruct((1, *np.shape(images)[1:]), np.uint8)).shape[-1]
  return np.zeros((0, dim), np.float32)
