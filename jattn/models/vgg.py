"""VGG19 (torchvision's `vgg19` and `vgg19_bn` layout) with C-Attn and S-Attn after chosen blocks.

VGG19 has 16 3x3 convs in 5 blocks (2, 2, 4, 4, 4 convs of 64, 128, 256, 512, 512 channels), each
block ending in a 2x2 max-pool; then an adaptive average pool to 7x7 and the classifier
25088-4096-4096-classes with ReLU and dropout 0.5. An attention module sits after a block's last
conv (and its ReLU), before the block's max-pool (sec. 2.3, Fig. 1); the paper puts C-Attn after
blocks 1 and 2 and S-Attn after blocks 3, 4 and 5. When a block has both, S-Attn runs first, as
in the authors' code.

Parameter names: `block{b}/conv{i}`, `block{b}/bn{i}` (batch-norm variant), `block{b}/c_attn`,
`block{b}/s_attn`, `classifier/fc1`, `classifier/fc2`, `classifier/head`.

Batch norm (`jattn.models.norm.BatchNorm`) keeps PyTorch's unbiased running variance when
`bn_torch_running_var` is set (config.model.bn_unbiased_running_var), Flax's biased one otherwise
(exactly the runs written before that field).

Initialisation (used for whatever is not loaded from ImageNet weights): convs He-normal with
fan-out and zero bias, linear layers N(0, 0.01) with zero bias, batch norm scale 1 and bias 0, as
torchvision and the authors' code.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jattn.models import conv as conv_lib
from jattn.models.attention import ChannelAttention, SpatialAttention, conv_init
from jattn.models.norm import BatchNorm
from jattn.models.pooling import max_pool_2x2

VGG19_BLOCKS = ((64, 64), (128, 128), (256, 256, 256, 256), (512,) * 4, (512,) * 4)
linear_init = nn.initializers.normal(0.01)


@functools.cache
def _adaptive_pool_matrix(size_in: int, size_out: int) -> np.ndarray:
  """Averaging weights of torch's AdaptiveAvgPool along one axis: [size_out, size_in]."""
  m = np.zeros((size_out, size_in), np.float32)
  for i in range(size_out):
    start = (i * size_in) // size_out
    end = -((-(i + 1) * size_in) // size_out)  # ceil
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
  """torch.nn.AdaptiveAvgPool2d((size, size)) on NHWC, as two exact separable averages."""
  _, h, w, _ = x.shape
  if (h, w) == (size, size):
    return x
  ph = jnp.asarray(_adaptive_pool_matrix(h, size), x.dtype)
  pw = jnp.asarray(_adaptive_pool_matrix(w, size), x.dtype)
  return jnp.einsum("bhwc,ih,jw->bijc", x, ph, pw)


class Block(nn.Module):
  """One VGG block: 3x3 convs (each with batch norm if asked, then ReLU), attention, max-pool.

  `s_attn` and `c_attn` are unbound attention modules (or None); the block adopts them under
  those names, so their parameters live at block{b}/s_attn and block{b}/c_attn.
  """

  widths: Sequence[int]
  batch_norm: bool = False
  s_attn: nn.Module | None = None
  c_attn: nn.Module | None = None
  dtype: Any = jnp.float32
  bn_torch_running_var: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i, width in enumerate(self.widths, start=1):
      x = nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), kernel_init=conv_init,
                  dtype=self.dtype, conv_general_dilated=conv_lib.conv_general_dilated,
                  name=f"conv{i}")(x)
      if self.batch_norm:
        x = BatchNorm(use_running_average=not train, momentum=0.1, epsilon=1e-5,
                      torch_running_var=self.bn_torch_running_var, dtype=self.dtype,
                      name=f"bn{i}")(x)
      x = nn.relu(x)
    for attention in (self.s_attn, self.c_attn):
      if attention is not None:
        x = attention(x)
    return max_pool_2x2(x)


class Classifier(nn.Module):
  """torchvision's VGG head: Linear-ReLU-Dropout, Linear-ReLU-Dropout, Linear."""

  num_classes: int
  width: int = 4096
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    dense = functools.partial(nn.Dense, kernel_init=linear_init, dtype=self.dtype)
    x = nn.relu(dense(self.width, name="fc1")(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.relu(dense(self.width, name="fc2")(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return dense(self.num_classes, name="head")(x)


class VGG(nn.Module):
  """VGG with optional batch norm and attention after chosen blocks; NHWC float in, logits out."""

  num_classes: int = 2
  blocks: Sequence[Sequence[int]] = VGG19_BLOCKS
  batch_norm: bool = False
  c_attn_blocks: Sequence[int] = (1, 2)
  s_attn_blocks: Sequence[int] = (3, 4, 5)
  c_attn_kernel: int = 4
  c_attn_stride: int = 4
  c_attn_padding: int = 0
  s_attn_reduction: int = 8
  s_attn_impl: str = "explicit"  # 'explicit' einsums or 'fused' dot_product_attention
  classifier_width: int = 4096
  pool_size: int = 7
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32
  bn_torch_running_var: bool = False  # batch norm keeps PyTorch's unbiased running variance

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x.astype(self.dtype)
    for b, widths in enumerate(self.blocks, start=1):
      s_attn = (SpatialAttention(self.s_attn_reduction, self.dtype, self.s_attn_impl, parent=None)
                if b in self.s_attn_blocks else None)
      c_attn = (ChannelAttention(self.c_attn_kernel, self.c_attn_stride, self.c_attn_padding,
                                 dtype=self.dtype, parent=None)
                if b in self.c_attn_blocks else None)
      x = Block(widths, self.batch_norm, s_attn, c_attn, self.dtype, self.bn_torch_running_var,
                name=f"block{b}")(x, train)
    x = adaptive_avg_pool(x, self.pool_size)
    x = x.reshape(x.shape[0], -1)  # (h, w, c) order; the converter permutes torch's (c, h, w)
    x = Classifier(self.num_classes, self.classifier_width, self.dropout_rate, self.dtype,
                   name="classifier")(x, train)
    return x.astype(jnp.float32)
