"""A convolution whose windows do not overlap (kernel = stride, no padding), computed as a
reshape and one matrix product: a drop-in for `lax.conv_general_dilated` in Flax's
`nn.Conv(conv_general_dilated=...)`, with the same parameters.

C-Attn's query and key convs (eq. 1: 4x4, stride 4, no padding, in the paper) are such
convolutions; on XLA's CPU backend the convolution and its gradients run several times slower
than PyTorch's (block 1 of the paper's model, batch 8), while the same sums as a matrix product
over 4x4 patches are plain matmuls (C-Attn on block 1: 25-35% faster, forward and backward).
Any other convolution, and any convolution off the CPU, is lax's own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

NHWC = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated`; on CPU an NHWC conv with kernel = stride and no padding is a
  matmul."""
  kh, kw, c_in, c_out = rhs.shape
  ones = (None, 1, (1, 1))
  patches = (jax.default_backend() == "cpu" and lhs.ndim == 4 and dimension_numbers is not None
             and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
             == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
             and tuple(window_strides) == (kh, kw) and not isinstance(padding, str)
             and all(tuple(p) == (0, 0) for p in padding)
             and (lhs_dilation if lhs_dilation is None else tuple(lhs_dilation)) in ones
             and (rhs_dilation if rhs_dilation is None else tuple(rhs_dilation)) in ones
             and feature_group_count == 1 and batch_group_count == 1
             and lhs.shape[1] % kh == 0 and lhs.shape[2] % kw == 0)
  if not patches:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, batch_group_count,
                                    precision, preferred_element_type)
  b, h, w, _ = lhs.shape
  x = lhs.reshape(b, h // kh, kh, w // kw, kw, c_in)  # each output position's kh x kw window
  return jnp.einsum("bpiqjc,ijco->bpqo", x, rhs, precision=precision,
                    preferred_element_type=preferred_element_type)
