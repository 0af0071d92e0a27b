"""Flax modules of jattn: VGG19 with C-Attn and S-Attn (`build_model` makes one from a config)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from jattn.errors import UserError
from jattn.models.attention import ChannelAttention, SpatialAttention
from jattn.models.vgg import VGG, VGG19_BLOCKS, adaptive_avg_pool

__all__ = [
    "VGG", "VGG19_BLOCKS", "ChannelAttention", "SpatialAttention", "adaptive_avg_pool",
    "build_model", "block_widths", "init_variables", "resolve_dtype", "resolve_s_attn_impl",
    "DTYPES", "S_ATTN_IMPLS",
]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DTYPES = ("auto", *_DTYPES)
S_ATTN_IMPLS = ("auto", "explicit", "fused")


def resolve_dtype(dtype: str, backend: str | None = None) -> str:
  """'auto' is bfloat16 on accelerators (GPU, TPU) and float32 on CPU; other names stay."""
  if dtype != "auto":
    return dtype
  return "float32" if (backend or jax.default_backend()) == "cpu" else "bfloat16"


def resolve_s_attn_impl(impl: str) -> str:
  """'auto' is the explicit einsums everywhere: measured at batch 8 (README, Performance), the
  fused dot_product_attention is no faster on an H100 (cuDNN, bfloat16: equal on block 3, 1.2-1.7x
  slower on blocks 4-5) and 4-7x slower on CPU."""
  return "explicit" if impl == "auto" else impl


def block_widths(width: float) -> tuple[tuple[int, ...], ...]:
  """VGG19's conv widths scaled by `width` (1.0 is VGG19 itself), at least 8 channels each."""
  return tuple(tuple(max(8, round(c * width)) for c in block) for block in VGG19_BLOCKS)


def build_model(model_config: ml_collections.ConfigDict) -> nn.Module:
  """The model `config.model` describes; apply it as `model.apply(variables, x, train=False)`."""
  mc = model_config
  for field in ("c_attn_blocks", "s_attn_blocks"):
    bad = [b for b in mc[field] if b not in (1, 2, 3, 4, 5)]
    if bad:
      raise UserError(f"config.model.{field}={tuple(mc[field])}: blocks are numbered 1 to 5")
  if mc.dtype not in DTYPES:
    raise UserError(f"config.model.dtype={mc.dtype!r}: use one of {', '.join(DTYPES)}")
  s_attn_impl = mc.get("s_attn_impl", "auto")
  if s_attn_impl not in S_ATTN_IMPLS:
    raise UserError(f"config.model.s_attn_impl={s_attn_impl!r}: use one of "
                    f"{', '.join(S_ATTN_IMPLS)}")
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
      s_attn_impl=resolve_s_attn_impl(s_attn_impl),
      classifier_width=mc.classifier_width,
      pool_size=mc.pool_size,
      dropout_rate=mc.dropout_rate,
      dtype=_DTYPES[resolve_dtype(mc.dtype)],
      # Absent from configs written before it: those runs kept Flax's biased running variance.
      bn_torch_running_var=mc.get("bn_unbiased_running_var", False),
  )


def init_variables(model: nn.Module, rng: jax.Array, image_size: int) -> dict:
  """The model's initial variables for image_size x image_size inputs.

  On CPU, XLA spends most of a minute optimising the ~40 random-number generators of an
  initialisation that runs once; compiling it without backend optimisation gives the same values
  in a few seconds.
  """
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  lowered = jax.jit(lambda rng, x: model.init(rng, x, train=False)).lower(rng, x)
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  return lowered.compile(compiler_options=options)(rng, jnp.zeros(x.shape, x.dtype))
