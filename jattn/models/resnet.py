"""ResNet-18 and ResNet-50 (torchvision's layouts) with C-Attn and S-Attn after chosen stages.

torchvision's ResNet (v1.5): a stem (7x7 conv, stride 2, padding 3, no bias; batch norm; ReLU;
3x3 max-pool, stride 2, padding 1), four stages `layer1`..`layer4` of residual blocks with 64,
128, 256, 512 planes (stages 2-4 halve the resolution in their first block), a global average
pool and a linear head `fc`. ResNet-18 has 2-2-2-2 basic blocks (two 3x3 convs), ResNet-50 has
3-4-6-3 bottlenecks (1x1 to the planes, 3x3 carrying the stride, 1x1 to 4x the planes). A block's
shortcut is a 1x1 conv and batch norm (`downsample`) where the stride or the width changes.

Attention sites are numbered by stage, 0 being the stem: a module sits after the stem's
max-pool, or after a stage's last block (its residual addition and ReLU). By resolution, as the
paper places them on VGG19 (C-Attn on the two finest maps, 224 and 112 px; S-Attn, whose N x N
weights grow with the map, on the coarser 56 to 14): C-Attn after the stem and stage 1 (56x56 at
224), S-Attn after stages 2, 3 and 4 (28, 14, 7). Config
fields `model.c_attn_stages`, `model.s_attn_stages`; when a stage has both, S-Attn runs first,
as on VGG. The modules are `jattn.models.attention`'s, unchanged.

Parameter names mirror torchvision's state-dict keys with '.' as '/' and block indices joined
by '_': `conv1`, `bn1`, `layer1_0/conv1`, `layer1_0/bn1`, `layer2_0/downsample_conv`,
`layer2_0/downsample_bn`, `fc`; attention at `stem_c_attn`, `layer1_c_attn`, `layer2_s_attn`,
... (`attention_sites`). `torch_key_map` is the whole correspondence.

Initialisation (whatever is not loaded from ImageNet weights) is torchvision's: convs He-normal
with fan-out, batch norm scale 1 and bias 0, `fc` as torch.nn.Linear's default (weights and
bias uniform in +-1/sqrt(fan_in)). Batch norm keeps PyTorch's unbiased running variance unless
`model.bn_unbiased_running_var` is False (`jattn.models.norm`).

Model config fields read here: name ('resnet18' or 'resnet50'), num_classes, width (multiplies
the planes, at least 8 each: narrow models for tests and the demo), c_attn_stages,
s_attn_stages, c_attn_kernel, c_attn_stride, c_attn_padding, s_attn_reduction, s_attn_impl,
dtype and bn_unbiased_running_var. VGG's fields (batch_norm, classifier_width, pool_size,
dropout_rate, c_attn_blocks, s_attn_blocks) are not.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from flax import traverse_util

from jattn.errors import UserError
from jattn.models import conv as conv_lib
from jattn.models.attention import ChannelAttention, SpatialAttention, conv_init
from jattn.models.norm import BatchNorm

# name -> (block kind, blocks per stage)
ARCHS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet50": ("bottleneck", (3, 4, 6, 3))}
EXPANSION = {"basic": 1, "bottleneck": 4}  # a block's output channels / its planes
PLANES = (64, 128, 256, 512)
STAGES = (0, 1, 2, 3, 4)  # attention sites: 0 is the stem, 1-4 torchvision's layer1..layer4
STAGE_LABELS = {0: "after the stem", 1: "after stage 1", 2: "after stage 2", 3: "after stage 3",
                4: "after stage 4"}

# torchvision's ImageNet checkpoints of these layouts, under jattn.convert.TORCHVISION_URL
# (https://download.pytorch.org/models/); the digits after '-' in a file's name start its
# SHA-256. ResNet-50's is IMAGENET1K_V2 (ResNet50_Weights.DEFAULT); ResNet-18 has only V1.
TORCHVISION_FILES = {"resnet18": "resnet18-f37072fd.pth", "resnet50": "resnet50-11ad3fa6.pth"}
TORCHVISION_WEIGHTS = {"resnet18": "IMAGENET1K_V1", "resnet50": "IMAGENET1K_V2"}


class BlockSpec(NamedTuple):
  """One residual block: where it is and what it maps."""

  stage: int  # 1..4
  index: int  # within the stage
  in_channels: int
  planes: int
  out_channels: int
  stride: int
  downsample: bool  # a 1x1 conv + batch norm shortcut (stride or width changes)

  @property
  def name(self) -> str:
    return f"layer{self.stage}_{self.index}"

  @property
  def torch_name(self) -> str:
    return f"layer{self.stage}.{self.index}"


def stage_planes(width: float) -> tuple[int, ...]:
  """The four stages' planes scaled by `width` (1.0 is torchvision's), at least 8 each."""
  return tuple(max(8, round(p * width)) for p in PLANES)


def block_specs(block: str, stage_sizes: Sequence[int], planes: Sequence[int]
                ) -> Iterator[BlockSpec]:
  """Every residual block in order, as torchvision's `_make_layer` lays them out."""
  channels = planes[0]  # the stem's output
  for stage, (n, p) in enumerate(zip(stage_sizes, planes, strict=True), start=1):
    for index in range(n):
      stride = 2 if stage > 1 and index == 0 else 1
      out = p * EXPANSION[block]
      yield BlockSpec(stage, index, channels, p, out, stride,
                      index == 0 and (stride != 1 or channels != out))
      channels = out


def stage_channels(block: str, planes: Sequence[int]) -> tuple[int, ...]:
  """Channels at each attention site: the stem's, then each stage's output."""
  return (planes[0], *(p * EXPANSION[block] for p in planes))


def stage_sizes_at(image_size: int) -> tuple[int, ...]:
  """Feature-map side at each attention site for image_size x image_size inputs."""
  half = lambda s: (s - 1) // 2 + 1  # noqa: E731 -- ceil(s / 2): a stride-2 conv or the pool
  sides = [half(half(image_size))]  # 7x7/2 conv, 3x3/2 max-pool
  for stage in range(1, 5):
    sides.append(sides[-1] if stage == 1 else half(sides[-1]))
  return tuple(sides)


def _conv(features, kernel, stride, padding, dtype, name):
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)), use_bias=False,
                 kernel_init=conv_init, dtype=dtype,
                 conv_general_dilated=conv_lib.conv_general_dilated, name=name)


class Block(nn.Module):
  """A basic block (two 3x3 convs) or a bottleneck (1x1, 3x3 with the stride, 1x1), each conv
  followed by batch norm, ReLU after all but the last; shortcut added, then ReLU."""

  spec: BlockSpec
  bottleneck: bool
  bn_torch_running_var: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    s = self.spec
    norm = functools.partial(BatchNorm, use_running_average=not train, momentum=0.1,
                             epsilon=1e-5, torch_running_var=self.bn_torch_running_var,
                             dtype=self.dtype)
    if self.bottleneck:
      convs = ((s.planes, 1, 1, 0), (s.planes, 3, s.stride, 1), (s.out_channels, 1, 1, 0))
    else:
      convs = ((s.planes, 3, s.stride, 1), (s.planes, 3, 1, 1))
    y = x
    for i, (features, kernel, stride, padding) in enumerate(convs, start=1):
      y = _conv(features, kernel, stride, padding, self.dtype, f"conv{i}")(y)
      y = norm(name=f"bn{i}")(y)
      if i < len(convs):
        y = nn.relu(y)
    if s.downsample:
      x = _conv(s.out_channels, 1, s.stride, 0, self.dtype, "downsample_conv")(x)
      x = norm(name="downsample_bn")(x)
    return nn.relu(y + x)


class ResNet(nn.Module):
  """torchvision's ResNet with attention after chosen stages; NHWC float in, float32 logits out."""

  block: str = "bottleneck"  # 'basic' or 'bottleneck'
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  planes: Sequence[int] = PLANES
  num_classes: int = 1000
  c_attn_stages: Sequence[int] = (0, 1)
  s_attn_stages: Sequence[int] = (2, 3, 4)
  c_attn_kernel: int = 4
  c_attn_stride: int = 4
  c_attn_padding: int = 0
  s_attn_reduction: int = 8
  s_attn_impl: str = "explicit"
  bn_torch_running_var: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    def attend(x, stage):
      name = site_name(stage)
      if stage in self.s_attn_stages:
        x = SpatialAttention(self.s_attn_reduction, self.dtype, self.s_attn_impl,
                             name=f"{name}_s_attn")(x)
      if stage in self.c_attn_stages:
        x = ChannelAttention(self.c_attn_kernel, self.c_attn_stride, self.c_attn_padding,
                             dtype=self.dtype, name=f"{name}_c_attn")(x)
      return x

    x = x.astype(self.dtype)
    x = _conv(self.planes[0], 7, 2, 3, self.dtype, "conv1")(x)
    x = BatchNorm(use_running_average=not train, momentum=0.1, epsilon=1e-5,
                  torch_running_var=self.bn_torch_running_var, dtype=self.dtype, name="bn1")(x)
    x = nn.max_pool(nn.relu(x), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    x = attend(x, 0)
    for spec in block_specs(self.block, self.stage_sizes, self.planes):
      x = Block(spec, self.block == "bottleneck", self.bn_torch_running_var, self.dtype,
                name=spec.name)(x, train)
      if spec.index == self.stage_sizes[spec.stage - 1] - 1:
        x = attend(x, spec.stage)
    x = jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1))
    bound = 1 / np.sqrt(x.shape[-1])  # torch.nn.Linear's default initialisation
    x = nn.Dense(self.num_classes, dtype=self.dtype,
                 kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                 bias_init=lambda key, shape, dtype=jnp.float32: jax.random.uniform(
                     key, shape, dtype, -bound, bound), name="fc")(x)
    return x.astype(jnp.float32)


def site_name(stage: int) -> str:
  """The module-path prefix of the attention after `stage`: 'stem', 'layer1', ..."""
  return "stem" if stage == 0 else f"layer{stage}"


# --- The backbone's registry interface (DESIGN19.md, Models) ---

def check(model_config: ml_collections.ConfigDict, image_size: int | None = None) -> None:
  """The ResNet's model-config checks; each problem is one UserError naming the field."""
  mc = model_config
  from jattn import models  # noqa: PLC0415 -- the package imports this module

  if mc.name not in ARCHS:
    raise UserError(f"config.model.name={mc.name!r}: the ResNets are {', '.join(ARCHS)}")
  for field in ("c_attn_stages", "s_attn_stages"):
    stages = tuple(mc[field])
    bad = [s for s in stages if s not in STAGES]
    if bad:
      raise UserError(f"config.model.{field}={stages}: {mc.name} has no stage {bad[0]!r}; "
                      f"stages are numbered 0 (the stem) to 4")
  if mc.dtype not in models.DTYPES:
    raise UserError(f"config.model.dtype={mc.dtype!r}: use one of {', '.join(models.DTYPES)}")
  impl = mc.get("s_attn_impl", "auto")
  if impl not in models.S_ATTN_IMPLS:
    raise UserError(f"config.model.s_attn_impl={impl!r}: use one of "
                    f"{', '.join(models.S_ATTN_IMPLS)}")
  if not mc.width > 0 or not mc.num_classes >= 1:
    raise UserError("config.model.width and config.model.num_classes must be positive")
  block = ARCHS[mc.name][0]
  channels = stage_channels(block, stage_planes(mc.width))
  r = mc.s_attn_reduction
  for stage in mc.s_attn_stages:
    if not (isinstance(r, int) and r >= 1 and channels[stage] % r == 0):
      raise UserError(f"config.model.s_attn_reduction={r!r} does not divide the "
                      f"{channels[stage]} channels {STAGE_LABELS[stage]} of {mc.name} (width "
                      f"{mc.width}); choose a divisor")
  k, s, p = mc.c_attn_kernel, mc.c_attn_stride, mc.c_attn_padding
  if mc.c_attn_stages and not (k >= 1 and s >= 1 and p >= 0):
    raise UserError(f"config.model.c_attn_kernel={k}, c_attn_stride={s}, c_attn_padding={p}: "
                    f"kernel and stride must be positive, padding at least 0")
  if image_size is not None:
    sides = stage_sizes_at(image_size)
    for stage in mc.c_attn_stages:
      if sides[stage] + 2 * p < k:
        raise UserError(f"config.image_size={image_size}: the {sides[stage]}x{sides[stage]} map "
                        f"{STAGE_LABELS[stage]} is smaller than C-Attn's {k}x{k} kernel "
                        f"(config.model.c_attn_kernel); use larger images or move C-Attn "
                        f"(config.model.c_attn_stages)")


def build(model_config: ml_collections.ConfigDict) -> ResNet:
  """The ResNet `config.model` describes (checked first)."""
  from jattn import models  # noqa: PLC0415 -- the package imports this module

  mc = model_config
  check(mc)
  block, stage_sizes = ARCHS[mc.name]
  return ResNet(
      block=block, stage_sizes=stage_sizes, planes=stage_planes(mc.width),
      num_classes=mc.num_classes, c_attn_stages=tuple(mc.c_attn_stages),
      s_attn_stages=tuple(mc.s_attn_stages), c_attn_kernel=mc.c_attn_kernel,
      c_attn_stride=mc.c_attn_stride, c_attn_padding=mc.c_attn_padding,
      s_attn_reduction=mc.s_attn_reduction,
      s_attn_impl=models.resolve_s_attn_impl(mc.get("s_attn_impl", "auto")),
      bn_torch_running_var=mc.get("bn_unbiased_running_var", True),
      dtype=models._DTYPES[models.resolve_dtype(mc.dtype)])


def attention_sites(model_config: ml_collections.ConfigDict) -> list[tuple[str, str, str]]:
  """(module path, 'c_attn' or 's_attn', label) of each attention module, in execution order."""
  mc = model_config
  sites = []
  for stage in STAGES:
    for kind, field in (("s_attn", "s_attn_stages"), ("c_attn", "c_attn_stages")):
      if stage in mc[field]:
        sites.append((f"{site_name(stage)}_{kind}", kind, STAGE_LABELS[stage]))
  return sites


def is_pretrained(path: Sequence[str]) -> bool:
  """Whether a variable (its flattened path, collection first: ('params', 'layer1_0', 'conv1',
  'kernel')) comes from ImageNet weights: the stem and the residual blocks do; the attention
  modules and the head `fc` do not."""
  module = path[1]
  return module in ("conv1", "bn1") or (module.startswith("layer") and not module.endswith(
      "_attn"))


def torchvision_model_config(arch: str, num_classes: int = 1000) -> ml_collections.ConfigDict:
  """The model config of torchvision's `arch`: full width, no attention, float32."""
  if arch not in ARCHS:
    raise UserError(f"--arch {arch!r}: use one of {sorted(ARCHS)}")
  return ml_collections.ConfigDict(dict(
      name=arch, num_classes=num_classes, width=1.0, c_attn_stages=(), s_attn_stages=(),
      c_attn_kernel=4, c_attn_stride=4, c_attn_padding=0, s_attn_reduction=8,
      s_attn_impl="auto", dtype="float32", bn_unbiased_running_var=True))


# --- torchvision's state dict ---

# Flax name -> torch name, per kind of module
_BN_PARAMS = {"scale": "weight", "bias": "bias"}
_BN_STATS = {"mean": "running_mean", "var": "running_var"}
_ATTN_CONVS = {"c_attn": ("m_q", "m_k", "m_v"), "s_attn": ("s_q", "s_k", "s_v")}


def torch_key_map(model_config: ml_collections.ConfigDict, attention: bool = False
                  ) -> list[tuple[str, tuple[str, ...], str]]:
  """(torch key, Flax variable path, kind) for every tensor of torchvision's state dict (without
  `num_batches_tracked`), in its order; kind 'conv': (out, in, kh, kw) -> (kh, kw, in, out),
  'linear': transposed, 'vector' as is.

  With `attention`, also the attention modules of `jattn.torch_reference.TorchResNet`
  (`<site>.conv1/2/3.weight`: M_Q, M_K, M_V or S_Q, S_K, S_V), which no torchvision file holds.
  """
  mc = model_config
  block, stage_sizes = ARCHS[mc.name]
  entries = []

  def conv(torch_name, module):
    entries.append((f"{torch_name}.weight", ("params", *module, "kernel"), "conv"))

  def bn(torch_name, module):
    for names, collection in ((_BN_PARAMS, "params"), (_BN_STATS, "batch_stats")):
      for flax_name, torch_suffix in names.items():
        entries.append((f"{torch_name}.{torch_suffix}", (collection, *module, flax_name),
                        "vector"))

  conv("conv1", ("conv1",))
  bn("bn1", ("bn1",))
  for spec in block_specs(block, stage_sizes, stage_planes(mc.width)):
    for i in range(1, 4 if block == "bottleneck" else 3):
      conv(f"{spec.torch_name}.conv{i}", (spec.name, f"conv{i}"))
      bn(f"{spec.torch_name}.bn{i}", (spec.name, f"bn{i}"))
    if spec.downsample:
      conv(f"{spec.torch_name}.downsample.0", (spec.name, "downsample_conv"))
      bn(f"{spec.torch_name}.downsample.1", (spec.name, "downsample_bn"))
  entries.append(("fc.weight", ("params", "fc", "kernel"), "linear"))
  entries.append(("fc.bias", ("params", "fc", "bias"), "vector"))
  if attention:
    for site, kind, _ in attention_sites(mc):
      for j, flax_conv in enumerate(_ATTN_CONVS[kind], start=1):
        entries.append((f"{site}.conv{j}.weight", ("params", site, flax_conv, "kernel"), "conv"))
  return entries


def _rearrange(t: np.ndarray, kind: str) -> np.ndarray:
  if kind == "conv":
    return t.transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)
  if kind == "linear":
    return t.T
  return t


def state_dict_arch(state_dict: Mapping[str, Any]) -> str | None:
  """The torchvision ResNet a state dict is of (by its block kind and blocks per stage), if any."""
  bottleneck = "layer1.0.conv3.weight" in state_dict
  sizes = tuple(len({k.split(".")[1] for k in state_dict if k.startswith(f"layer{s}.")})
                for s in range(1, 5))
  for arch, (block, stage_sizes) in ARCHS.items():
    if (block == "bottleneck") == bottleneck and sizes == stage_sizes:
      return arch
  return None


def torch_to_flax(state_dict: Mapping[str, Any], model_config: ml_collections.ConfigDict,
                  attention: bool = False) -> dict[str, Any]:
  """Flax variables ({'params', 'batch_stats'}, NumPy float32) from torchvision's state dict.

  `model_config` fixes the architecture, width and classes (and, with `attention`, where the
  attention modules of a TorchResNet state dict sit; otherwise the result has none). Raises
  UserError naming the architecture or the key that is missing, unexpected or misshapen.
  """
  mc = model_config
  check(mc)
  state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()
                if not k.endswith("num_batches_tracked")}
  if any(k.startswith("features.") for k in state_dict):
    raise UserError(f"the state dict is a VGG (features.*), not a ResNet, but "
                    f"config.model.name={mc.name!r}")
  arch = state_dict_arch(state_dict)
  if arch is not None and arch != mc.name:
    raise UserError(f"the state dict is a {arch} but config.model.name={mc.name!r}; convert it "
                    f"with --arch {arch} or change the config")
  model = build(mc)
  shapes = traverse_util.flatten_dict(jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x), jax.ShapeDtypeStruct((1, 224, 224, 3),
                                                                       jnp.float32)))
  key_map = torch_key_map(mc, attention)
  flat = {}
  for torch_key, path, kind in key_map:
    if torch_key not in state_dict:
      raise UserError(f"the state dict has no key {torch_key!r} (needed for {'/'.join(path)}); "
                      f"check --arch and config.model against the checkpoint")
    t = state_dict[torch_key]
    t = np.asarray(t.detach().cpu().numpy() if hasattr(t, "detach") else t, np.float32)
    if not np.isfinite(t).all():
      raise UserError(f"the state dict's {torch_key!r} holds NaN or infinite values: the "
                      f"checkpoint is damaged or from a diverged training; use another one")
    value = _rearrange(t, kind)
    want = shapes[path].shape
    if value.shape != want:
      raise UserError(f"key {torch_key!r} has shape {tuple(t.shape)}, which gives "
                      f"{value.shape} for {'/'.join(path)}, but the config expects "
                      f"{tuple(want)}; check config.model.width and num_classes against the "
                      f"checkpoint")
    flat[path] = value
  unexpected = sorted(set(state_dict) - {key for key, _, _ in key_map})
  if unexpected:
    raise UserError(f"the state dict has keys this config does not use: "
                    f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}; "
                    f"check config.model.name and the attention placement")
  return traverse_util.unflatten_dict(flat)
