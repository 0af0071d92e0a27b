"""`lax.conv_general_dilated` with two faster ways on XLA's CPU backend, a drop-in for Flax's
`nn.Conv(conv_general_dilated=...)` with the same parameters.

A convolution whose windows do not overlap (kernel = stride, no padding) is a reshape and one matrix
product. C-Attn's query and key convs (eq. 1: 4x4, stride 4, no padding, in the paper) are such
convolutions; on XLA's CPU backend they are computed as that matrix product over 4x4 patches,
forward and backward.

VGG's 3x3 convolutions (stride 1, padding 1) on float32 maps of side 28 to 56 with at least 256
input channels (blocks 3 and 4 at 224x224) are computed on CPU, in the forward pass, by Winograd's
F(2x2, 3x3) algorithm: each 2x2 block of outputs from a 4x4 input tile with 16 products per
channel pair instead of 36, as 16 matrix products over the tiles. The transforms only add,
subtract and halve, so the results match lax's to float rounding (about 1e-6 relative). Larger
maps, block 5's 14x14 and fewer channels keep lax's (where Winograd measured slower:
docs/performance.md). The gradient is lax's own (Winograd's was slower there). Any other
convolution, and any convolution off the CPU, is lax's own; inside `cpu_paths.off()` (counting
the program a GPU runs) every convolution is lax's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jattn.models import cpu_paths

NHWC = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated`; on CPU an NHWC conv with kernel = stride and no padding is a
  matmul, and VGG's 3x3 convs of blocks 3-4 are Winograd's in the forward pass (module doc)."""
  kh, kw, c_in, c_out = rhs.shape
  plain = _plain_cpu_nhwc(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                          feature_group_count, batch_group_count)
  if plain and _winograd_pays(lhs, rhs, window_strides, padding, preferred_element_type):
    return winograd_conv3x3(lhs, rhs)
  patches = (plain and tuple(window_strides) == (kh, kw)
             and all(tuple(p) == (0, 0) for p in padding)
             and lhs.shape[1] % kh == 0 and lhs.shape[2] % kw == 0)
  if not patches:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, batch_group_count,
                                    precision, preferred_element_type)
  b, h, w, _ = lhs.shape
  x = lhs.reshape(b, h // kh, kh, w // kw, kw, c_in)  # each output position's kh x kw window
  return jnp.einsum("bpiqjc,ijco->bpqo", x, rhs, precision=precision,
                    preferred_element_type=preferred_element_type)


def _plain_cpu_nhwc(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                    feature_group_count, batch_group_count) -> bool:
  """On the CPU backend (its CPU-only paths not turned off: `cpu_paths`), an NHWC / HWIO
  convolution with explicit padding, no dilation, no groups: the kind both faster ways handle."""
  ones = (None, 1, (1, 1))
  return (cpu_paths.active() and lhs.ndim == 4 and dimension_numbers is not None
          and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
          == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
          and not isinstance(padding, str)
          and (lhs_dilation if lhs_dilation is None else tuple(lhs_dilation)) in ones
          and (rhs_dilation if rhs_dilation is None else tuple(rhs_dilation)) in ones
          and feature_group_count == 1 and batch_group_count == 1)


def _winograd_pays(lhs, rhs, window_strides, padding, preferred_element_type) -> bool:
  """Whether `winograd_conv3x3` computes this plain CPU NHWC convolution (`_plain_cpu_nhwc`),
  and is faster there (module doc)."""
  _, h, w, c_in = lhs.shape
  return (rhs.shape[:2] == (3, 3) and tuple(window_strides) == (1, 1)
          and tuple(map(tuple, padding)) == ((1, 1), (1, 1))
          and preferred_element_type is None
          and lhs.dtype == rhs.dtype == jnp.float32
          and h % 2 == 0 and w % 2 == 0 and 28 <= min(h, w) and max(h, w) <= 56
          and c_in >= 256)


def _same_conv3x3(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)


# Winograd F(2, 3) in one dimension: y = A^T [(G g) * (B^T d)] for a tile d of 4 inputs and a
# kernel g of 3, the two outputs y_i = sum_k d_{i+k} g_k (correlation, as lax's convolution).
_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)


def _input_transform(d):  # B^T d, d a list of the tile's 4 rows (or columns)
  return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]


def _output_transform(m):  # A^T m, m a list of 4
  return [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]


@jax.custom_vjp
def winograd_conv3x3(x: jax.Array, w: jax.Array) -> jax.Array:
  """A 3x3, stride-1, padding-1 NHWC convolution of `x` [B, H, W, C] (H, W even) by `w` [3, 3, C,
  O], by Winograd's F(2x2, 3x3); its gradient is lax's."""
  b, h, wd, c = x.shape
  t, s = h // 2, wd // 2  # output tiles of 2x2
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(b, t + 1, 2, s + 1, 2, c)
  # Input tile (i, j) of output tile (t, s) is padded pixel (2t + i, 2s + j), i, j in 0..3.
  d = [[xp[:, i // 2:i // 2 + t, i % 2, j // 2:j // 2 + s, j % 2] for j in range(4)]
       for i in range(4)]
  rows = [_input_transform([d[i][j] for i in range(4)]) for j in range(4)]  # rows[j][alpha]
  v = [_input_transform([rows[j][alpha] for j in range(4)]) for alpha in range(4)]  # [a][b]
  u = jnp.einsum("ai,ijco,bj->abco", _G, w, _G)  # G g G^T for every channel pair
  # 16 separate matrix products over the tiles: no concatenation of the transformed tiles.
  m = [[jnp.einsum("btsc,co->btso", v[alpha][beta], u[alpha, beta]) for beta in range(4)]
       for alpha in range(4)]
  cols = [_output_transform([m[alpha][beta] for alpha in range(4)]) for beta in range(4)]
  y = [[_output_transform([cols[beta][p] for beta in range(4)])[q] for q in range(2)]
       for p in range(2)]  # y[p][q]: output pixel (2t + p, 2s + q)
  y = jnp.stack([jnp.stack(y[p], axis=3) for p in range(2)], axis=2)  # [b, t, 2, s, 2, o]
  return y.reshape(b, h, wd, w.shape[-1])


def _winograd_fwd(x, w):
  return winograd_conv3x3(x, w), (x, w)


def _winograd_bwd(residuals, g):
  x, w = residuals
  return jax.vjp(_same_conv3x3, x, w)[1](g)


winograd_conv3x3.defvjp(_winograd_fwd, _winograd_bwd)
