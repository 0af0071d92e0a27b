"""Batch norm that keeps its running statistics as PyTorch's `BatchNorm2d` does in training.

Both PyTorch and `flax.linen.BatchNorm` normalise a training batch by its biased variance (the
mean of squared deviations over the n = batch x H x W values of a channel). They differ in what
they keep: PyTorch moves `running_var` towards the unbiased variance, n / (n - 1) times the
biased one, Flax towards the biased one. A model fine-tuned from torchvision's weights and then
evaluated on its running statistics (as every test here is) therefore drifts from PyTorch's by a
factor that grows as the feature maps shrink. `BatchNorm` with `torch_running_var=True` keeps
PyTorch's; with False it is `flax.linen.BatchNorm(momentum=1 - momentum, epsilon=epsilon)`
computation for computation (the same operations in the same order, so the same bits), which is
what runs written before it computed.

Variable names are flax.linen.BatchNorm's (`params`: scale, bias; `batch_stats`: mean, var), so
checkpoints of either restore into the other.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax


class BatchNorm(nn.Module):
  """Batch norm over every axis but the last (NHWC), PyTorch's conventions.

  `momentum` is PyTorch's: running = (1 - momentum) * running + momentum * batch statistic
  (Flax's `momentum` is 1 minus it). Statistics and normalisation are computed in float32
  (as flax.linen.BatchNorm), the output is cast to `dtype`.
  """

  use_running_average: bool | None = None
  momentum: float = 0.1
  epsilon: float = 1e-5
  torch_running_var: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                         use_running_average)
    features = (x.shape[-1],)
    axes = tuple(range(x.ndim - 1))
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), features)
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      xf = x.astype(jnp.promote_types(self.dtype or x.dtype, jnp.float32))
      if self.torch_running_var:  # biased, E[(x - E[x])^2]: no cancellation (PyTorch's value)
        mean = xf.mean(axes)
        var = lax.square(xf - jnp.expand_dims(mean, axes)).mean(axes)
      else:  # biased, E[x^2] - E[x]^2, in flax.linen.BatchNorm's order of operations
        square = lax.square(xf)
        mean, mean2 = xf.mean(axes), square.mean(axes)
        var = jnp.maximum(0.0, mean2 - lax.square(mean))
      if not self.is_initializing():
        n = math.prod(x.shape[:-1])
        if self.torch_running_var and n < 2:
          raise ValueError(f"batch norm in training needs more than 1 value per channel, got {n}")
        kept = var * (n / (n - 1)) if self.torch_running_var else var
        decay = 1.0 - self.momentum  # Flax's momentum: the same constants, the same order
        ra_mean.value = decay * ra_mean.value + (1 - decay) * mean
        ra_var.value = decay * ra_var.value + (1 - decay) * kept
    # The normalisation as flax.linen.normalization._normalize writes it (the order of the
    # operations fixes the order in which the gradient's terms are summed, hence its bits).
    mean, var = jnp.expand_dims(mean, axes), jnp.expand_dims(var, axes)
    y = x - mean
    mul = lax.rsqrt(var + self.epsilon)
    scale = self.param("scale", nn.initializers.ones, features, jnp.float32).reshape(
        (1,) * len(axes) + features)
    mul *= scale
    y *= mul
    bias = self.param("bias", nn.initializers.zeros, features, jnp.float32).reshape(
        (1,) * len(axes) + features)
    y += bias
    return jnp.asarray(y, self.dtype or jnp.result_type(x, scale, bias))
