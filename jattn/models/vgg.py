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
import ml_collections
import numpy as np
from flax import linen as nn

from jattn import models
from jattn.core.errors import UserError
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
  """torchvision's VGG head: Linear-ReLU-Dropout, Linear-ReLU-Dropout, Linear. With
  `return_features` it returns what the last Linear (`head`) takes: the second Dropout's output,
  [B, width]."""

  num_classes: int
  width: int = 4096
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               return_features: bool = False) -> jax.Array:
    dense = functools.partial(nn.Dense, kernel_init=linear_init, dtype=self.dtype)
    x = nn.relu(dense(self.width, name="fc1")(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.relu(dense(self.width, name="fc2")(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    head = dense(self.num_classes, name="head")
    if return_features:
      if self.is_initializing():  # the head's parameters exist whatever is returned
        head(x)
      return x
    return head(x)


class VGG(nn.Module):
  """VGG with optional batch norm and attention after chosen blocks; NHWC float in, logits out."""

  num_classes: int = 2
  blocks: Sequence[Sequence[int]] = VGG19_BLOCKS
  batch_norm: bool = False
  c_attn_blocks: Sequence[int] = (1, 2)  # PLACEMENT, below
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
  def __call__(self, x: jax.Array, train: bool = False,
               return_features: bool = False) -> jax.Array:
    """Logits [B, num_classes] (float32); with `return_features`, the features [B, D] that the
    classifier's last layer `classifier/head` takes (D = classifier_width; `feature_dim`)."""
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
                   name="classifier")(x, train, return_features)
    return x.astype(jnp.float32)


# --------------------------------------------------------------------------------------------
# What the model registry (jattn.models) asks of a backbone.

ATTENTION_BLOCKS = (1, 2, 3, 4, 5)
# The paper's placement (sec. 2.3): model.c_attn_blocks, model.s_attn_blocks of configs/default.py.
PLACEMENT = {"c_attn_blocks": (1, 2), "s_attn_blocks": (3, 4, 5)}


def block_widths(width: float) -> tuple[tuple[int, ...], ...]:
  """VGG19's conv widths scaled by `width` (1.0 is VGG19 itself), at least 8 channels each."""
  return tuple(tuple(max(8, round(c * width)) for c in block) for block in VGG19_BLOCKS)


def check(model_config, image_size: int | None = None) -> None:
  """VGG's own fields: where the attention modules sit, and an input its five max-pools can take."""
  for field in ("c_attn_blocks", "s_attn_blocks"):
    bad = [b for b in model_config[field] if b not in ATTENTION_BLOCKS]
    if bad:
      raise UserError(f"config.model.{field}={tuple(model_config[field])}: VGG's blocks are "
                      f"numbered 1 to 5")
  if image_size is not None and image_size < 32:
    raise UserError(f"--config.image_size={image_size}: VGG's five max-pools need at least 32 "
                    f"pixels")


def build(model_config) -> VGG:
  mc = model_config
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
      s_attn_impl=models.resolve_s_attn_impl(mc.get("s_attn_impl", "auto")),
      classifier_width=mc.classifier_width,
      pool_size=mc.pool_size,
      dropout_rate=mc.dropout_rate,
      dtype=models.compute_dtype(mc),
      bn_torch_running_var=models.bn_unbiased_running_var(mc),
  )


def attention_sites(model_config) -> list[tuple[str, str, str]]:
  """Each attention module in forward order: S-Attn before C-Attn in a block with both."""
  sites = []
  for b in ATTENTION_BLOCKS:
    for kind, field in (("s_attn", "s_attn_blocks"), ("c_attn", "c_attn_blocks")):
      if b in model_config[field]:
        sites.append((f"block{b}/{kind}", kind, f"after block {b}"))
  return sites


def without_attention(model_config):
  plain = model_config.copy_and_resolve_references()
  with plain.unlocked():
    plain.c_attn_blocks, plain.s_attn_blocks = (), ()
  return plain


def ignored_fields(model_config) -> tuple[str, ...]:
  """Model fields that change nothing this VGG computes (old runs resume when they differ)."""
  return () if model_config.get("batch_norm") else ("bn_unbiased_running_var",)


def feature_dim(model_config) -> int:
  """The width of the features `VGG(..., return_features=True)` returns: the classifier's."""
  return int(model_config.classifier_width)


def head_params(model_config) -> tuple[tuple[str, ...], ...]:
  """The parameter-path prefixes of the final linear layer, which takes the features."""
  return (("classifier", "head"),)


def is_pretrained(path: tuple[str, ...]) -> bool:
  """ImageNet provides the blocks' convs and batch norms; attention and classifier are new."""
  return path[0].startswith("block") and path[1].startswith(("conv", "bn"))


def parameter_groups(params) -> list[tuple[str, Any]]:
  """(row label, subtree) of the parameter table of `jattn models`."""
  rows = []
  for name in sorted(params, key=lambda n: (not n.startswith("block"), n)):
    if name.startswith("block"):
      sub = params[name]
      rows.append((f"{name} convs", {k: v for k, v in sub.items()
                                      if k.startswith(("conv", "bn"))}))
      for attn, label in (("s_attn", "S-Attn"), ("c_attn", "C-Attn")):
        if attn in sub:
          rows.append((f"{name} {label}", sub[attn]))
    else:
      rows.append((name, params[name]))
  return rows


# torchvision's ImageNet checkpoints of this backbone; the digits after '-' start the SHA-256.
TORCHVISION = {"vgg19": "vgg19-dcbb9e9d.pth", "vgg19_bn": "vgg19_bn-c79401a0.pth"}


def torchvision_arch(model_config) -> str:
  """The torchvision architecture whose ImageNet weights this config's VGG takes."""
  return "vgg19_bn" if model_config.batch_norm else "vgg19"


def torchvision_model_config(arch: str, state_dict=None):
  """The model config of torchvision's `vgg19` / `vgg19_bn`: no attention, the widths, head and
  classifier of `state_dict` when given (narrow copies of the layout convert too), else full."""
  num_classes, width, hidden = 1000, 1.0, 4096
  if state_dict is not None:
    num_classes = int(state_dict["classifier.6.weight"].shape[0]) if (
        "classifier.6.weight" in state_dict) else num_classes
    width = state_dict["features.0.weight"].shape[0] / 64 if (
        "features.0.weight" in state_dict) else width
    hidden = int(state_dict["classifier.0.weight"].shape[0]) if (
        "classifier.0.weight" in state_dict) else hidden
  return ml_collections.ConfigDict(dict(
      name="vgg19", num_classes=num_classes, batch_norm=arch == "vgg19_bn", width=width,
      classifier_width=hidden, pool_size=7, dropout_rate=0.5, c_attn_blocks=(), s_attn_blocks=(),
      c_attn_kernel=4, c_attn_stride=4, c_attn_padding=0, s_attn_reduction=8, dtype="float32"))


def check_state_dict(state_dict, model_config) -> None:
  """A state dict of another architecture, or of the other VGG variant (with or without batch
  norm), is one clear line."""
  if not any(k.startswith("features.") for k in state_dict):
    raise UserError("the state dict is not a VGG's (no features.* keys) but config.model.name="
                    "'vgg19'; convert it with the --arch of its architecture (python -m "
                    "jattn.models.weights --help lists them)")
  has_bn = "features.1.running_mean" in state_dict
  if has_bn != model_config.batch_norm:
    kind = "a batch-norm VGG (vgg19_bn)" if has_bn else "a VGG without batch norm (vgg19)"
    raise UserError(f"the state dict is {kind} but config.model.batch_norm="
                    f"{model_config.batch_norm}; use --arch {'vgg19_bn' if has_bn else 'vgg19'} "
                    f"or change the config")


# Flax name -> (kind, torch suffix); kinds say how a tensor is rearranged.
_CONV = {"kernel": "weight", "bias": "bias"}
_BN_PARAMS = {"scale": "weight", "bias": "bias"}
_BN_STATS = {"mean": "running_mean", "var": "running_var"}


def torch_key_map(model_config, source: str) -> list[tuple[str, tuple[str, ...], str]]:
  """(torch key, Flax path, kind) for every tensor a torch VGG of this layout holds: torchvision's
  (`source="torchvision"`) or the authors' (`"reference"`, attention modules inside `features`)."""
  if source not in ("torchvision", "reference"):
    raise ValueError(f"source={source!r}: use torchvision or reference")
  model = build(model_config)
  entries = []
  i = 0  # index into torch's `features` Sequential

  def add(torch_prefix, path, names, kind, collection="params"):
    for flax_name, torch_name in names.items():
      entries.append((f"{torch_prefix}.{torch_name}", (collection, *path, flax_name), kind))

  for b, widths in enumerate(model.blocks, start=1):
    block = f"block{b}"
    for c in range(1, len(widths) + 1):
      add(f"features.{i}", (block, f"conv{c}"), _CONV, "conv")
      i += 1
      if model.batch_norm:
        add(f"features.{i}", (block, f"bn{c}"), _BN_PARAMS, "vector")
        add(f"features.{i}", (block, f"bn{c}"), _BN_STATS, "vector", "batch_stats")
        i += 1
      i += 1  # ReLU
    if source == "reference":
      for has, name, convs in ((b in model.s_attn_blocks, "s_attn", ("s_q", "s_k", "s_v")),
                               (b in model.c_attn_blocks, "c_attn", ("m_q", "m_k", "m_v"))):
        if has:
          for torch_conv, flax_conv in zip(("conv1", "conv2", "conv3"), convs, strict=True):
            entries.append((f"features.{i}.{torch_conv}.weight",
                            ("params", block, name, flax_conv, "kernel"), "conv"))
          i += 1
    i += 1  # MaxPool
  for torch_index, name, kind in ((0, "fc1", "linear_flatten"), (3, "fc2", "linear"),
                                  (6, "head", "linear")):
    add(f"classifier.{torch_index}", ("classifier", name), {"kernel": "weight", "bias": "bias"},
        kind)
  return entries


def rearrange(t: np.ndarray, kind: str, flax_name: str, model_config) -> np.ndarray:
  """A torch tensor in the layout of its Flax variable."""
  pool_size = model_config.pool_size
  if flax_name == "bias" or kind == "vector":
    return t
  if kind == "conv":
    return t.transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)
  if kind == "linear":
    return t.T
  if kind == "linear_flatten":  # inputs flattened as (c, h, w) by torch, (h, w, c) by us
    out, fan_in = t.shape
    c = fan_in // (pool_size * pool_size)
    return t.reshape(out, c, pool_size, pool_size).transpose(2, 3, 1, 0).reshape(fan_in, out)
  raise ValueError(kind)
