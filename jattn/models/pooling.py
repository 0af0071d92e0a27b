"""VGG's 2x2 stride-2 max-pool and the ResNets' 3x3 stride-2 stem max-pool, with gradients that
XLA's CPU backend computes fast.

`flax.linen.max_pool` is a reduce-window whose gradient XLA computes with select-and-scatter;
on the CPU backend this computes the same gradient as element-wise work instead: each output's
gradient goes to the first position of its 2x2 window (row-major) that holds the window's
maximum, exactly where select-and-scatter sends it (ties included, as after a ReLU, where
whole windows are 0). Forward and gradient are tested bit-equal to `nn.max_pool`'s. Off the
CPU (or inside `cpu_paths.off()`), or for a map with an odd side, this is `nn.max_pool` itself.

The ResNet stem's 3x3 windows overlap (stride 2, padding 1): an input position can take the
gradient of up to four windows. `max_pool_3x3_stride2` sends each window's gradient to its first
maximum as above, one of the 9 window positions at a time, and adds the 9 placed arrays in the
order in which select-and-scatter visits the windows that share a position (row-major), so its
sums, too, are select-and-scatter's bit for bit (tested).
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


def max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
  """`nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))` on NHWC `x`."""
  if not cpu_paths.active():
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  return _pool3(x)


def _out_side(side: int) -> int:
  return (side - 1) // 2 + 1  # (side + 2 - 3) // 2 + 1


def _taps(x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
  """x padded by one -inf row and column each side, and its 9 strided views: tap (di, dj) holds
  each window's element at (di, dj), in row-major order of (di, dj)."""
  _, h, w, _ = x.shape
  ho, wo = _out_side(h), _out_side(w)
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  taps = [xp[:, di:di + 2 * ho - 1:2, dj:dj + 2 * wo - 1:2, :]
          for di in range(3) for dj in range(3)]
  return xp, taps


@jax.custom_vjp
def _pool3(x: jax.Array) -> jax.Array:
  _, taps = _taps(x)
  y = taps[0]
  for tap in taps[1:]:
    y = jnp.maximum(y, tap)
  return y


def _pool3_fwd(x):
  y = _pool3(x)
  return y, (x, y)


def _pool3_bwd(residuals, g):
  x, y = residuals
  xp, taps = _taps(x)
  _, hp, wp, _ = xp.shape
  ho, wo = y.shape[1], y.shape[2]
  zero = jnp.zeros((), g.dtype)
  taken = jnp.zeros(y.shape, bool)  # windows whose first maximum came at an earlier position
  placed = {}
  for k, tap in enumerate(taps):
    di, dj = divmod(k, 3)
    take = (tap == y) & ~taken
    taken = taken | take
    # The window's gradient at its (di, dj) element, placed on the padded input grid (rows
    # di, di + 2, ...; columns dj, dj + 2, ...).
    placed[di, dj] = jax.lax.pad(
        jnp.where(take, g, zero), zero,
        ((0, 0, 0), (di, hp - di - (2 * ho - 1), 1), (dj, wp - dj - (2 * wo - 1), 1), (0, 0, 0)))
  # A padded position (P, Q) lies in windows i with 2i <= P <= 2i + 2: the earlier (row-major)
  # of two windows sees it at di = 2, the later at di = 0 (likewise dj). Adding the placed
  # arrays by descending (di, dj) adds each position's contributions in window order.
  dxp = jnp.zeros(xp.shape, g.dtype)
  for di in (2, 1, 0):
    for dj in (2, 1, 0):
      dxp = dxp + placed[di, dj]
  return (dxp[:, 1:-1, 1:-1, :],)


_pool3.defvjp(_pool3_fwd, _pool3_bwd)
