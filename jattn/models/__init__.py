"""Flax modules of jattn: VGG19 with C-Attn and S-Attn (`build_model` makes one from a config)."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from jattn.errors import UserError
from jattn.models.attention import ChannelAttention, SpatialAttention
from jattn.models.vgg import VGG, VGG19_BLOCKS, adaptive_avg_pool

__all__ = [
    "VGG", "VGG19_BLOCKS", "ChannelAttention", "SpatialAttention", "adaptive_avg_pool",
    "build_model", "block_widths",
]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def block_widths(width: float) -> tuple[tuple[int, ...], ...]:
  """VGG19's conv widths scaled by `width` (1.0 is VGG19 itself), at least 8 channels each."""
  return tuple(tuple(max(8, round(c * width)) for c in block) for block in VGG19_BLOCKS)


def build_model(model_config: ml_collections.ConfigDict) -> nn.Module:
  """The model that `config.model` describes; apply it as `model.apply(variables, x, train=False)`."""
  mc = model_config
  for field in ("c_attn_blocks", "s_attn_blocks"):
    bad = [b for b in mc[field] if b not in (1, 2, 3, 4, 5)]
    if bad:
      raise UserError(f"config.model.{field}={tuple(mc[field])}: blocks are numbered 1 to 5")
  if mc.dtype not in _DTYPES:
    raise UserError(f"config.model.dtype={mc.dtype!r}: use one of {sorted(_DTYPES)}")
  if mc.width <= 0 or mc.num_classes < 1:
    raise UserError("config.model.width and config.model.num_classes must be positive")
  return VGG(
      num_classes=mc.num_classes,
      blocks=block_widths(mc.width),
      batch_norm=mc.batch_norm,
      c_attn_blocks=tuple(mc.c_attn_blocks),
      s_attn_blocks=tuple(mc.s_attn_blocks),
      c_attn_kernel=mc.c_attn_kernel,
      c_attn_stride=mc.c_attn_stride,
      c_attn_padding=mc.c_attn_padding,
      s_attn_reduction=mc.s_attn_reduction,
      classifier_width=mc.classifier_width,
      pool_size=mc.pool_size,
      dropout_rate=mc.dropout_rate,
      dtype=_DTYPES[mc.dtype],
  )
