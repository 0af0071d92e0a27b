"""VGG's 2x2 stride-2 max-pool, with a gradient that XLA's CPU backend computes fast.

`flax.linen.max_pool` is a reduce-window whose gradient XLA computes with select-and-scatter;
on the CPU backend that takes 337 ms for block 1's pool (batch 8, 224x224, 64 channels) in
every training step, against 44 ms for the same gradient as element-wise work: each output's
gradient goes to the first position of its 2x2 window (row-major) that holds the window's
maximum, exactly where select-and-scatter sends it (ties included, as after a ReLU, where
whole windows are 0). Forward and gradient are tested bit-equal to `nn.max_pool`'s. Off the
CPU (or inside `cpu_paths.off()`), or for a map with an odd side, this is `nn.max_pool` itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from jattn.models import cpu_paths


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """`nn.max_pool(x, (2, 2), strides=(2, 2))` on NHWC `x`."""
  _, h, w, _ = x.shape
  if not cpu_paths.active() or h % 2 or w % 2:
    return nn.max_pool(x, (2, 2), strides=(2, 2))
  return _pool(x)


def _windows(x: jax.Array) -> jax.Array:
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c)  # [b, i, di, j, dj, c]


@jax.custom_vjp
def _pool(x: jax.Array) -> jax.Array:
  return jnp.max(_windows(x), axis=(2, 4))


def _pool_fwd(x):
  y = _pool(x)
  return y, (x, y)


def _pool_bwd(residuals, g):
  x, y = residuals
  hit = _windows(x) == y[:, :, None, :, None, :]  # positions holding the window's maximum
  # Window positions in row-major order (0,0), (0,1), (1,0), (1,1): a position takes the
  # gradient if it holds the maximum and no earlier position does.
  h00, h01, h10 = hit[:, :, :1, :, :1], hit[:, :, :1, :, 1:], hit[:, :, 1:, :, :1]
  earlier = jnp.concatenate([
      jnp.concatenate([jnp.zeros_like(h00), h00], axis=4),
      jnp.concatenate([h00 | h01, h00 | h01 | h10], axis=4)], axis=2)
  dx = jnp.where(hit & ~earlier, g[:, :, None, :, None, :], jnp.zeros((), g.dtype))
  return (dx.reshape(x.shape),)


_pool.defvjp(_pool_fwd, _pool_bwd)
