"""Vision transformers as timm builds them, in one Flax module, with the presets of the pathology
foundation models, their weights from a local file, and C-Attn and S-Attn on the patch-token grid.

The ViT (timm's `VisionTransformer` with the options these models use): a convolutional patch
embedding (a p x p conv of stride p), a class token, `reg_tokens` register tokens, learned absolute
position embeddings (over the patch tokens only, `no_embed_class`, or over the class and register
tokens too), pre-norm blocks `x + ls1(attn(norm1(x)))`, `x + ls2(mlp(norm2(x)))` with fused QKV
attention (one `qkv` linear, `jax.nn.dot_product_attention`: cuDNN's fused kernel on a GPU),
LayerScale (`ls1`, `ls2`: a per-channel gain), an MLP with exact GELU or SwiGLU in timm's packed
layout (`SwiGLUPacked`: one `fc1` to 2h channels split into [a, b], silu(a) * b, `fc2` from h), a
final LayerNorm (`norm`, eps 1e-6 as timm's) on every token, then pooling: the class token
('token'), the mean of the patch tokens ('avg'), or both concatenated ('token+avg', Virchow's).
The pooled features go to the linear classifier `head`.

Another image size than the preset's native one resamples the patch tokens' position embeddings
bicubically with antialiasing, as timm's `resample_abs_pos_embed` (`jax.image.resize`, which
computes the same weights as torch's antialiased bicubic), at every call, so the stored embedding
keeps its native grid and its pretrained values.

The paper's modules (`jattn.models.attention`, unchanged) sit after chosen blocks
(`model.vit_c_attn_blocks`, `model.vit_s_attn_blocks`: 1..depth, or negative counting from the
end): the patch tokens are reshaped to their [B, H, W, C] grid (class and register tokens left
out and left as they are), attended, and put back. S-Attn is then spatial attention over the
patch grid, C-Attn channel attention over the tokens' channels. By default both sit after the
second-to-last block (-2): the last block is where the class token, which the modules do not
touch, reads the attended patch tokens; after the last block they would change nothing a
'token'-pooled model outputs. When a block has both, S-Attn runs first, as on VGG.

Parameter names mirror timm's state-dict keys with '.' as '/' and block indices joined by '_':
`patch_embed`, `cls_token`, `reg_token`, `pos_embed`, `blocks_3/attn/qkv`, `blocks_3/ls1/gamma`,
`blocks_3/mlp/fc1`, `norm`, `head`; attention at `blocks_3_s_attn`, `blocks_3_c_attn`.
`key_map` is the whole correspondence, for timm's layout and for Hugging Face's `Dinov2Model`
(Phikon-v2: separate query, key and value linears, concatenated into `qkv`).

Model config fields read here: name (a preset, `PRESETS`), num_classes, vit.depth, vit.embed_dim,
vit.num_heads (0: the preset's; smaller models for tests), vit.pool ('': the preset's),
vit_c_attn_blocks, vit_s_attn_blocks, c_attn_kernel, c_attn_stride, c_attn_padding,
s_attn_reduction, s_attn_impl, dtype, weights, freeze, train_last_blocks. VGG's and the ResNets'
fields are not read.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from flax import traverse_util
from safetensors.numpy import load_file as load_safetensors

from jattn import models
from jattn.core import files
from jattn.core.errors import UserError
from jattn.models import cpu_paths
from jattn.models import weights as torch_weights
from jattn.models.attention import ChannelAttention, SpatialAttention

POOLS = ("token", "avg", "token+avg")
MLPS = ("gelu", "swiglu")
LAYOUTS = ("timm", "hf_dinov2")
HUB = "https://huggingface.co/"


@dataclasses.dataclass(frozen=True)
class Preset:
  """One published ViT: its shapes (those of timm's `timm_arch` with `timm_kwargs`), its pooling,
  its weights' licence and where they are published."""

  timm_arch: str
  timm_kwargs: str  # the model card's timm kwargs, as text (docs; tests build timm from them)
  patch_size: int
  embed_dim: int
  depth: int
  num_heads: int
  mlp_ratio: float
  mlp: str = "gelu"
  reg_tokens: int = 0
  no_embed_class: bool = False  # position embeddings over the patch tokens only
  native_size: int = 224  # the image side its position embeddings were trained at
  layer_scale: bool = True
  pool: str = "token"
  licence: str = ""
  published: str = ""  # where its weights are (jattn never downloads them)
  gated: bool = True
  layout: str = "timm"  # the key layout of the published file

  @property
  def native_grid(self) -> int:
    return self.native_size // self.patch_size


_SWIGLU = "mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU"
PRESETS = {
    "dinov2_vits14_reg4": Preset(
        "vit_small_patch14_reg4_dinov2", "", 14, 384, 12, 6, 4.0, reg_tokens=4,
        no_embed_class=True, native_size=518, licence="Apache-2.0",
        published=HUB + "timm/vit_small_patch14_reg4_dinov2.lvd142m", gated=False),
    "dinov2_vitb14_reg4": Preset(
        "vit_base_patch14_reg4_dinov2", "", 14, 768, 12, 12, 4.0, reg_tokens=4,
        no_embed_class=True, native_size=518, licence="Apache-2.0",
        published=HUB + "timm/vit_base_patch14_reg4_dinov2.lvd142m", gated=False),
    "uni": Preset(
        "vit_large_patch16_224", "img_size=224, patch_size=16, init_values=1e-5, num_classes=0, "
        "dynamic_img_size=True", 16, 1024, 24, 16, 4.0, licence="CC-BY-NC-ND-4.0",
        published=HUB + "MahmoodLab/UNI"),
    "uni2_h": Preset(
        "vit_giant_patch14_224", "img_size=224, patch_size=14, depth=24, num_heads=24, "
        "init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667*2, num_classes=0, "
        f"no_embed_class=True, {_SWIGLU}, reg_tokens=8, dynamic_img_size=True",
        14, 1536, 24, 24, 2.66667 * 2, mlp="swiglu", reg_tokens=8, no_embed_class=True,
        licence="CC-BY-NC-ND-4.0", published=HUB + "MahmoodLab/UNI2-h"),
    "virchow2": Preset(
        "vit_huge_patch14_224", "img_size=224, init_values=1e-5, num_classes=0, "
        f"mlp_ratio=5.3375, reg_tokens=4, global_pool='', dynamic_img_size=True, {_SWIGLU}",
        14, 1280, 32, 16, 5.3375, mlp="swiglu", reg_tokens=4, pool="token+avg",
        licence="CC-BY-NC-ND-4.0", published=HUB + "paige-ai/Virchow2"),
    "h_optimus_0": Preset(
        "vit_giant_patch14_reg4_dinov2", "img_size=224, init_values=1e-5, num_classes=0, "
        "dynamic_img_size=True", 14, 1536, 40, 24, 2.66667 * 2, mlp="swiglu", reg_tokens=4,
        no_embed_class=True, licence="Apache-2.0", published=HUB + "bioptimus/H-optimus-0"),
    "gigapath": Preset(
        "vit_giant_patch14_dinov2", "img_size=224, in_chans=3, patch_size=16, embed_dim=1536, "
        "depth=40, num_heads=24, init_values=1e-5, mlp_ratio=5.33334, num_classes=0",
        16, 1536, 40, 24, 5.33334, mlp="swiglu", licence="Prov-GigaPath licence (see its card)",
        published=HUB + "prov-gigapath/prov-gigapath"),
    "phikon_v2": Preset(
        "vit_large_patch16_224", "init_values=1e-5, num_classes=0 (published as a Hugging Face "
        "Dinov2Model)", 16, 1024, 24, 16, 4.0, licence="Owkin non-commercial licence (see its "
        "card)", published=HUB + "owkin/phikon-v2", layout="hf_dinov2"),
}

# The paper's modules on a ViT (module docstring): model.vit_c_attn_blocks, model.vit_s_attn_blocks.
PLACEMENT = {"vit_c_attn_blocks": (-2,), "vit_s_attn_blocks": (-2,)}
TORCHVISION: dict[str, str] = {}  # ViT weights come from config.model.weights, never torchvision


@dataclasses.dataclass(frozen=True)
class Arch:
  """The shapes a model config gives: its preset with the vit.* overrides applied."""

  preset: Preset
  embed_dim: int
  depth: int
  num_heads: int
  pool: str

  @property
  def mlp_hidden(self) -> int:
    """fc1's outputs: int(dim * mlp_ratio), as timm (for SwiGLU, both halves)."""
    return int(self.embed_dim * self.preset.mlp_ratio)


def preset_of(model_config) -> Preset:
  return PRESETS[model_config["name"]]


def arch(model_config) -> Arch:
  p = preset_of(model_config)
  vit = model_config.get("vit") or {}
  pick = lambda field, default: vit.get(field) or default  # noqa: E731 -- 0 / '': the preset's
  return Arch(p, pick("embed_dim", p.embed_dim), pick("depth", p.depth),
              pick("num_heads", p.num_heads), pick("pool", p.pool))


def resolve_blocks(blocks: Sequence[int], depth: int) -> tuple[int, ...]:
  """Block numbers 1..depth (negative ones count from the end: -1 is the last block)."""
  return tuple(sorted({b if b > 0 else depth + 1 + b for b in blocks}))


def resample_pos_embed(pos: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """Patch position embeddings [1, G*G, D] at another grid [1, H*W, D]: bicubic, antialiased, as
  timm's `resample_abs_pos_embed` (F.interpolate(mode='bicubic', antialias=True)), in float32."""
  _, n, d = pos.shape
  side = int(round(n ** 0.5))
  if (side, side) == tuple(grid):
    return pos
  square = pos.reshape(1, side, side, d).astype(jnp.float32)
  out = jax.image.resize(square, (1, *grid, d), method="bicubic", antialias=True)
  return out.reshape(1, grid[0] * grid[1], d).astype(pos.dtype)


# timm's initialisation of what is trained from scratch: linears truncated normal (std 0.02,
# zero bias), position embeddings the same, class and register tokens N(0, 1e-6).
_trunc = nn.initializers.truncated_normal(0.02)


class LayerScale(nn.Module):
  init_value: float = 1e-5

  @nn.compact
  def __call__(self, x):
    gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],))
    return x * gamma.astype(x.dtype)


class Mlp(nn.Module):
  """fc1, GELU (exact) or packed SwiGLU, fc2."""

  hidden: int
  kind: str = "gelu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    h = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=_trunc, name="fc1")(x)
    if self.kind == "swiglu":
      a, b = jnp.split(h, 2, axis=-1)  # timm's SwiGLUPacked: gate first (gate_last=False)
      h = jax.nn.silu(a) * b
    else:
      h = jax.nn.gelu(h, approximate=False)
    return nn.Dense(d, dtype=self.dtype, kernel_init=_trunc, name="fc2")(h)


class Attention(nn.Module):
  """Multi-head self-attention with one fused `qkv` linear; tokens [B, N, D] in and out."""

  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    h = self.num_heads
    qkv = nn.Dense(3 * d, dtype=self.dtype, kernel_init=_trunc, name="qkv")(x)
    # timm's layout of the fused output: [3 (q, k, v), heads, head dim] along the channels.
    q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, h, d // h), 2, 0)  # each [B, N, H, K]
    dh = d // h
    cudnn = (jax.default_backend() == "gpu" and x.dtype in (jnp.bfloat16, jnp.float16)
             and dh % 8 == 0 and dh <= 128)
    if cpu_paths.active() and x.dtype != jnp.float32:
      # XLA's CPU dot (jattn's flags) has no 16-bit kernel with the float32 logits the attention
      # takes: widened first (exact products, as attention.float32_einsum)
      q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    # out[b, n, h] = sum_m softmax_m(q[b, n, h] . k[b, m, h] / sqrt(K)) v[b, m, h]
    out = jax.nn.dot_product_attention(q, k, v, implementation="cudnn" if cudnn else "xla")
    out = out.astype(x.dtype)
    return nn.Dense(d, dtype=self.dtype, kernel_init=_trunc, name="proj")(out.reshape(b, n, d))


class Block(nn.Module):
  """timm's pre-norm block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

  num_heads: int
  mlp_hidden: int
  mlp: str = "gelu"
  layer_scale: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    norm = functools.partial(nn.LayerNorm, epsilon=1e-6, dtype=self.dtype)
    scale = (lambda name: LayerScale(name=name)) if self.layer_scale else (  # noqa: E731
        lambda name: (lambda y: y))
    x = x + scale("ls1")(Attention(self.num_heads, self.dtype, name="attn")(norm(name="norm1")(x)))
    return x + scale("ls2")(Mlp(self.mlp_hidden, self.mlp, self.dtype,
                                name="mlp")(norm(name="norm2")(x)))


class ViT(nn.Module):
  """A ViT with attention modules on its patch grid after chosen blocks; NHWC float images in,
  float32 logits out (or, with return_features, the pooled features the head takes)."""

  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_hidden: int = 3072
  mlp: str = "gelu"
  reg_tokens: int = 0
  no_embed_class: bool = False
  native_grid: int = 14
  layer_scale: bool = True
  pool: str = "token"
  num_classes: int = 2
  c_attn_blocks: Sequence[int] = ()  # 1..depth
  s_attn_blocks: Sequence[int] = ()
  c_attn_kernel: int = 4
  c_attn_stride: int = 4
  c_attn_padding: int = 0
  s_attn_reduction: int = 8
  s_attn_impl: str = "explicit"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
    del train  # no dropout, no batch statistics
    d, p = self.embed_dim, self.patch_size
    x = x.astype(self.dtype)
    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                kernel_init=nn.initializers.lecun_normal(), name="patch_embed")(x)
    b, gh, gw, _ = x.shape  # the patch grid
    x = x.reshape(b, gh * gw, d)
    prefix = 1 + self.reg_tokens
    cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, d))
    tokens = [jnp.broadcast_to(cls, (b, 1, d)).astype(x.dtype)]
    if self.reg_tokens:
      reg = self.param("reg_token", nn.initializers.normal(1e-6), (1, self.reg_tokens, d))
      tokens.append(jnp.broadcast_to(reg, (b, self.reg_tokens, d)).astype(x.dtype))
    n_pos = self.native_grid ** 2 + (0 if self.no_embed_class else prefix)
    pos = self.param("pos_embed", _trunc, (1, n_pos, d))
    if self.no_embed_class:  # embeddings of the patch tokens only: add, then prepend the prefix
      x = jnp.concatenate([*tokens, x + resample_pos_embed(pos, (gh, gw)).astype(x.dtype)], 1)
    else:  # the prefix tokens have their own (never resampled), the patch tokens theirs
      x = jnp.concatenate([*tokens, x], 1)
      x = x + jnp.concatenate([pos[:, :prefix], resample_pos_embed(pos[:, prefix:], (gh, gw))],
                              1).astype(x.dtype)
    for i in range(1, self.depth + 1):
      x = Block(self.num_heads, self.mlp_hidden, self.mlp, self.layer_scale, self.dtype,
                name=f"blocks_{i - 1}")(x)
      if i in self.s_attn_blocks or i in self.c_attn_blocks:
        grid = x[:, prefix:].reshape(b, gh, gw, d)  # patch tokens as the [B, H, W, C] map
        if i in self.s_attn_blocks:
          grid = SpatialAttention(self.s_attn_reduction, self.dtype, self.s_attn_impl,
                                  name=f"blocks_{i - 1}_s_attn")(grid)
        if i in self.c_attn_blocks:
          grid = ChannelAttention(self.c_attn_kernel, self.c_attn_stride, self.c_attn_padding,
                                  dtype=self.dtype, name=f"blocks_{i - 1}_c_attn")(grid)
        x = jnp.concatenate([x[:, :prefix], grid.reshape(b, gh * gw, d)], 1)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)
    pooled = {"token": lambda: x[:, 0], "avg": lambda: jnp.mean(x[:, prefix:], 1),
              "token+avg": lambda: jnp.concatenate([x[:, 0], jnp.mean(x[:, prefix:], 1)], -1)
              }[self.pool]()
    head = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=_trunc, name="head")
    if return_features:
      if self.is_initializing():  # the head's parameters exist whatever is returned
        head(pooled)
      return pooled.astype(jnp.float32)
    return head(pooled).astype(jnp.float32)


# --- What the model registry (jattn.models) asks of a backbone ---

def check(model_config: ml_collections.ConfigDict, image_size: int | None = None) -> None:
  """The ViT's fields: sizes that divide, a pooling, blocks that exist for the attention, an
  S-Attn reduction that divides the channels, a C-Attn kernel that fits the patch grid, the
  training mode; each problem is one UserError naming the field."""
  mc = model_config
  a = arch(mc)
  if min(a.embed_dim, a.depth, a.num_heads) < 1 or a.embed_dim % a.num_heads:
    raise UserError(f"config.model.vit: embed_dim={a.embed_dim} must divide into num_heads="
                    f"{a.num_heads} heads (depth={a.depth}); 0 keeps the preset's")
  if a.preset.mlp == "swiglu" and a.mlp_hidden % 2:
    raise UserError(f"config.model.vit.embed_dim={a.embed_dim} gives an odd SwiGLU width "
                    f"int({a.embed_dim} * {a.preset.mlp_ratio:g}) = {a.mlp_hidden}; choose another")
  if a.pool not in POOLS:
    raise UserError(f"config.model.vit.pool={a.pool!r}: use one of {', '.join(POOLS)} ('' for "
                    f"the preset's, {a.preset.pool!r})")
  for field in PLACEMENT:
    blocks = tuple(mc.get(field, ()))
    bad = [x for x in blocks if not (isinstance(x, int) and 1 <= abs(x) <= a.depth)]
    if bad:
      raise UserError(f"config.model.{field}={blocks}: {mc.name} has blocks 1 to {a.depth} "
                      f"(or -1 to -{a.depth} from the end); {bad[0]!r} is none of them")
  r = mc.s_attn_reduction
  if mc.get("vit_s_attn_blocks") and not (isinstance(r, int) and r >= 1 and a.embed_dim % r == 0):
    raise UserError(f"config.model.s_attn_reduction={r!r} does not divide the {a.embed_dim} "
                    f"token channels of {mc.name}; choose a divisor")
  k, s, pad = mc.c_attn_kernel, mc.c_attn_stride, mc.c_attn_padding
  if mc.get("vit_c_attn_blocks"):
    if not (k >= 1 and s >= 1 and pad >= 0):
      raise UserError(f"config.model.c_attn_kernel={k}, c_attn_stride={s}, c_attn_padding={pad}:"
                      f" kernel and stride must be positive, padding at least 0")
    if image_size is not None and image_size // a.preset.patch_size + 2 * pad < k:
      g = image_size // a.preset.patch_size
      raise UserError(f"config.image_size={image_size}: the {g}x{g} patch grid of {mc.name} is "
                      f"smaller than C-Attn's {k}x{k} kernel (config.model.c_attn_kernel); use "
                      f"larger images or a smaller kernel")
  if image_size is not None and image_size < a.preset.patch_size:
    raise UserError(f"config.image_size={image_size} is smaller than {mc.name}'s "
                    f"{a.preset.patch_size}-pixel patches")
  k_last = mc.get("train_last_blocks", 0)
  if not (isinstance(k_last, int) and 0 <= k_last <= a.depth):
    raise UserError(f"config.model.train_last_blocks={k_last!r}: use 0 to {a.depth} (the blocks "
                    f"of {mc.name})")


def build(model_config: ml_collections.ConfigDict) -> ViT:
  mc = model_config
  a = arch(mc)
  p = a.preset
  return ViT(
      patch_size=p.patch_size, embed_dim=a.embed_dim, depth=a.depth, num_heads=a.num_heads,
      mlp_hidden=a.mlp_hidden, mlp=p.mlp, reg_tokens=p.reg_tokens,
      no_embed_class=p.no_embed_class, native_grid=p.native_grid, layer_scale=p.layer_scale,
      pool=a.pool, num_classes=mc.num_classes,
      c_attn_blocks=resolve_blocks(mc.get("vit_c_attn_blocks", ()), a.depth),
      s_attn_blocks=resolve_blocks(mc.get("vit_s_attn_blocks", ()), a.depth),
      c_attn_kernel=mc.c_attn_kernel, c_attn_stride=mc.c_attn_stride,
      c_attn_padding=mc.c_attn_padding, s_attn_reduction=mc.s_attn_reduction,
      s_attn_impl=models.resolve_s_attn_impl(mc.get("s_attn_impl", "auto")),
      dtype=models.compute_dtype(mc))


def attention_sites(model_config) -> list[tuple[str, str, str]]:
  """(module path, 'c_attn' or 's_attn', label) of each attention module, in execution order."""
  depth = arch(model_config).depth
  c = resolve_blocks(model_config.get("vit_c_attn_blocks", ()), depth)
  s = resolve_blocks(model_config.get("vit_s_attn_blocks", ()), depth)
  sites = []
  for i in range(1, depth + 1):
    for kind, blocks in (("s_attn", s), ("c_attn", c)):
      if i in blocks:
        sites.append((f"blocks_{i - 1}_{kind}", kind, f"after block {i} of {depth}"))
  return sites


def without_attention(model_config):
  plain = model_config.copy_and_resolve_references()
  with plain.unlocked():
    plain.vit_c_attn_blocks, plain.vit_s_attn_blocks = (), ()
  return plain


def ignored_fields(model_config) -> tuple[str, ...]:
  """Model fields that change nothing a ViT computes: VGG's head, batch norm and widths."""
  return ("batch_norm", "classifier_width", "pool_size", "dropout_rate", "width",
          "bn_unbiased_running_var")


def is_pretrained(path: Sequence[str]) -> bool:
  """The published weights provide everything but the head and the attention modules."""
  return path[0] != "head" and not path[0].endswith("_attn")


def block_index(path: Sequence[str]) -> int | None:
  """The block (0-based) a parameter path belongs to, None outside the blocks."""
  name = path[0]
  if name.startswith("blocks_") and not name.endswith("_attn"):
    return int(name.split("_")[1])
  return None


def num_blocks(model_config) -> int:
  return arch(model_config).depth


def feature_dim(model_config) -> int:
  """The width of the pooled features the head takes (twice the tokens' for 'token+avg')."""
  a = arch(model_config)
  return a.embed_dim * (2 if a.pool == "token+avg" else 1)


def head_params(model_config) -> tuple[tuple[str, ...], ...]:
  """The parameter-path prefixes of the final linear layer, which takes the pooled features."""
  return (("head",),)


def parameter_groups(params: Mapping[str, Any]) -> list[tuple[str, Any]]:
  """(row label, subtree) of `jattn models`: the embeddings, each block (and the attention after
  it), the final norm, the head."""
  rows = [("embeddings", {k: params[k] for k in ("patch_embed", "cls_token", "reg_token",
                                                  "pos_embed") if k in params})]
  i = 0
  while f"blocks_{i}" in params:
    rows.append((f"block {i + 1}", params[f"blocks_{i}"]))
    for kind, label in (("s_attn", "S-Attn"), ("c_attn", "C-Attn")):
      if f"blocks_{i}_{kind}" in params:
        rows.append((f"block {i + 1} {label}", params[f"blocks_{i}_{kind}"]))
    i += 1
  return rows + [("norm", params["norm"]), ("head", params["head"])]


def torchvision_arch(model_config) -> str:
  raise UserError(f"config.model.name={model_config.name!r} takes its weights from "
                  f"config.model.weights (a local file), not config.pretrained: set "
                  f"--config.pretrained='' and --config.model.weights=PATH")


def check_state_dict(state_dict, model_config) -> None:
  """jattn.models.weights' torchvision and reference conversions have no ViT."""
  raise UserError(f"jattn convert does not convert ViTs; point --config.model.weights at the "
                  f"{model_config.name} file instead")


# --- The key maps and the weights file ---

def key_map(model_config, layout: str = "timm") -> list[tuple[str, tuple[str, ...], str]]:
  """(file key, Flax parameter path, kind) for every tensor of the backbone in `layout`: 'timm'
  (timm's `VisionTransformer` state dict) or 'hf_dinov2' (Hugging Face's `Dinov2Model`, whose
  query, key and value are three keys: kind 'qkv_part:0/1/2' fills a third of `qkv`). Kinds:
  'conv' (out, in, kh, kw) -> (kh, kw, in, out), 'linear' transposed, 'vector' as is.
  The head is not included (the published files have none)."""
  a = arch(model_config)
  entries = []
  hf = layout == "hf_dinov2"
  if layout not in LAYOUTS:
    raise ValueError(layout)
  emb = "embeddings." if hf else ""
  entries.append((f"{emb}patch_embeddings.projection.weight" if hf else "patch_embed.proj.weight",
                  ("patch_embed", "kernel"), "conv"))
  entries.append((f"{emb}patch_embeddings.projection.bias" if hf else "patch_embed.proj.bias",
                  ("patch_embed", "bias"), "vector"))
  entries.append((f"{emb}cls_token", ("cls_token",), "vector"))
  if a.preset.reg_tokens:
    entries.append((f"{emb}register_tokens" if hf else "reg_token", ("reg_token",), "vector"))
  entries.append((f"{emb}position_embeddings" if hf else "pos_embed", ("pos_embed",), "vector"))

  def lin(key, path):
    entries.append((f"{key}.weight", (*path, "kernel"), "linear"))
    entries.append((f"{key}.bias", (*path, "bias"), "vector"))

  def ln(key, path):
    entries.append((f"{key}.weight", (*path, "scale"), "vector"))
    entries.append((f"{key}.bias", (*path, "bias"), "vector"))

  for i in range(a.depth):
    blk = f"blocks_{i}"
    t = f"encoder.layer.{i}" if hf else f"blocks.{i}"
    ln(f"{t}.norm1", (blk, "norm1"))
    if hf:  # query, key and value apart, joined into the fused qkv
      for j, part in enumerate(("query", "key", "value")):
        entries.append((f"{t}.attention.attention.{part}.weight", (blk, "attn", "qkv", "kernel"),
                        f"qkv_part:{j}"))
        entries.append((f"{t}.attention.attention.{part}.bias", (blk, "attn", "qkv", "bias"),
                        f"qkv_part:{j}"))
      lin(f"{t}.attention.output.dense", (blk, "attn", "proj"))
    else:
      lin(f"{t}.attn.qkv", (blk, "attn", "qkv"))
      lin(f"{t}.attn.proj", (blk, "attn", "proj"))
    if a.preset.layer_scale:
      for k in (1, 2):
        key = f"{t}.layer_scale{k}.lambda1" if hf else f"{t}.ls{k}.gamma"
        entries.append((key, (blk, f"ls{k}", "gamma"), "vector"))
    ln(f"{t}.norm2", (blk, "norm2"))
    lin(f"{t}.mlp.fc1", (blk, "mlp", "fc1"))
    lin(f"{t}.mlp.fc2", (blk, "mlp", "fc2"))
  ln("layernorm" if hf else "norm", ("norm",))
  return entries


# Keys a published file may hold that no jattn parameter takes: timm's classifier of a model with
# classes (the head is trained anew), HF's mask token (used only in pretraining).
_UNUSED = {"timm": ("head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"),
           "hf_dinov2": ("embeddings.mask_token",)}


# transformers 5's Dinov2 attention keys -> those of the files published with transformers 4
_HF5_NAMES = {".attention.q_proj.": ".attention.attention.query.",
              ".attention.k_proj.": ".attention.attention.key.",
              ".attention.v_proj.": ".attention.attention.value.",
              ".attention.o_proj.": ".attention.output.dense."}


def _hf4_name(key: str) -> str:
  for new, old in _HF5_NAMES.items():
    key = key.replace(new, old)
  return key


def _rearrange(t: np.ndarray, kind: str) -> np.ndarray:
  if kind == "conv":
    return t.transpose(2, 3, 1, 0)
  if kind == "linear" or (kind.startswith("qkv_part") and t.ndim == 2):
    return t.T
  return t


def backbone_shapes(model_config) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{parameter path: shape} of the backbone's parameters (no computation)."""
  model = build(model_config)
  size = model.patch_size * 4
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)["params"]
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()
          if is_pretrained(k)}


def convert(state_dict: Mapping[str, Any], model_config, source: str = "the state dict"
            ) -> dict[str, Any]:
  """{'params': ...} (NumPy float32) from a timm or Hugging Face state dict, key by key and shape
  by shape; anything missing, misshapen or left over is one UserError naming it."""
  layout = preset_of(model_config).layout
  sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
  if layout == "timm" and "embeddings.cls_token" in sd:
    layout = "hf_dinov2"  # a Hugging Face Dinov2Model of the same shapes
  elif layout == "hf_dinov2" and "cls_token" in sd:
    layout = "timm"
  if layout == "hf_dinov2":  # transformers >= 5 names the attention's linears otherwise
    sd = {_hf4_name(k): v for k, v in sd.items()}
  shapes = backbone_shapes(model_config)
  flat: dict[tuple[str, ...], np.ndarray] = {}
  parts: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
  entries = key_map(model_config, layout)
  fix = (f"check --config.model.name={model_config.name} (and config.model.vit) against the "
         f"file, or use the file its card names ({preset_of(model_config).published})")
  for key, path, kind in entries:
    if key not in sd:
      raise UserError(f"{source}: no key {key!r} (for {'/'.join(path)}); {fix}")
    t = np.asarray(sd[key], np.float32)
    if not np.isfinite(t).all():
      raise UserError(f"{source}: {key!r} holds NaN or infinite values; use an undamaged file")
    value = _rearrange(t, kind)
    want = shapes[path]
    if kind.startswith("qkv_part"):
      third = (want[0], want[1] // 3) if len(want) == 2 else (want[0] // 3,)
      if value.shape != third:
        raise UserError(f"{source}: {key!r} has shape {tuple(t.shape)}, but {model_config.name} "
                        f"needs a third of {'/'.join(path)} {want}; {fix}")
      parts.setdefault(path, {})[int(kind.split(":")[1])] = value
      continue
    if value.shape != want:
      raise UserError(f"{source}: {key!r} has shape {tuple(t.shape)}, which gives {value.shape} "
                      f"for {'/'.join(path)}, but {model_config.name} needs {want}; {fix}")
    flat[path] = value
  for path, p in parts.items():
    flat[path] = np.concatenate([p[0], p[1], p[2]], axis=-1)
  used = {k for k, _, _ in entries} | set(_UNUSED[layout])
  unexpected = sorted(k for k in sd if k not in used)
  if unexpected:
    raise UserError(f"{source}: keys {model_config.name} has no place for: "
                    f"{', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''} "
                    f"({len(unexpected)}); {fix}")
  return {"params": traverse_util.unflatten_dict(flat)}


def read_state_dict(path: str, model_config) -> dict[str, Any]:
  """A state dict from a .safetensors (NumPy, no PyTorch) or .bin / .pth file (torch.load with
  weights_only); a missing file says where the preset's weights are published."""
  p = preset_of(model_config)
  if not os.path.isfile(path):
    access = ("access is gated: accept its terms on the hub, then download it yourself"
              if p.gated else "it is public")
    raise UserError(f"config.model.weights={path!r}: no such file. {model_config.name}'s weights "
                    f"({p.licence}) are published at {p.published} ({access}); jattn never "
                    f"downloads them")
  if path.endswith(".safetensors"):
    try:
      return dict(load_safetensors(path))
    except Exception as e:  # noqa: BLE001 -- a damaged file fails in several ways
      raise UserError(f"config.model.weights={path!r}: not a readable safetensors file "
                      f"({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
  if path.endswith((".bin", ".pth", ".pt")):
    return torch_weights.load_state_dict(path)
  raise UserError(f"config.model.weights={path!r}: use a .safetensors, .bin or .pth state dict")




def load_weights(model_config) -> dict[str, Any]:
  """The backbone's variables from `config.model.weights`, converted and checked."""
  path = model_config.weights
  return convert(read_state_dict(path, model_config), model_config,
                 f"config.model.weights={path!r}")


def weights_record(model_config) -> dict[str, Any]:
  """What results.json records of the backbone: the preset, its licence, the weights file and
  its sha256 (None without a file: trained from scratch)."""
  p = preset_of(model_config)
  path = model_config.get("weights", "")
  return {"preset": model_config.name, "timm_arch": p.timm_arch, "licence": p.licence,
          "published": p.published, "weights": os.path.abspath(path) if path else None,
          "weights_sha256": files.sha256(path) if path and os.path.isfile(path) else None,
          "freeze": bool(model_config.get("freeze", False)),
          "train_last_blocks": int(model_config.get("train_last_blocks", 0))}
