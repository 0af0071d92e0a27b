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
dropout_rate) are not read; VGG's placement (c_attn_blocks, s_attn_blocks) other than its
paper's or none is refused (`jattn.models.check`), as it would do nothing here.
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

from jattn import models
from jattn.core.errors import UserError
from jattn.models import conv as conv_lib
from jattn.models import pooling
from jattn.models.attention import ChannelAttention, SpatialAttention, conv_init
from jattn.models.norm import BatchNorm

# name -> (block kind, blocks per stage)
ARCHS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet50": ("bottleneck", (3, 4, 6, 3))}
EXPANSION = {"basic": 1, "bottleneck": 4}  # a block's output channels / its planes
PLANES = (64, 128, 256, 512)
STAGES = (0, 1, 2, 3, 4)  # attention sites: 0 is the stem, 1-4 torchvision's layer1..layer4
STAGE_LABELS = {0: "after the stem", 1: "after stage 1", 2: "after stage 2", 3: "after stage 3",
                4: "after stage 4"}

# The paper's placement carried over by resolution (the module docstring): model.c_attn_stages,
# model.s_attn_stages of configs/default.py.
PLACEMENT = {"c_attn_stages": (0, 1), "s_attn_stages": (2, 3, 4)}


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
  c_attn_stages: Sequence[int] = PLACEMENT["c_attn_stages"]
  s_attn_stages: Sequence[int] = PLACEMENT["s_attn_stages"]
  c_attn_kernel: int = 4
  c_attn_stride: int = 4
  c_attn_padding: int = 0
  s_attn_reduction: int = 8
  s_attn_impl: str = "explicit"
  bn_torch_running_var: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               return_features: bool = False) -> jax.Array:
    """Logits [B, num_classes] (float32); with `return_features`, the globally pooled features
    [B, D] that the head `fc` takes (D = the last stage's channels; `feature_dim`)."""
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
    x = pooling.max_pool_3x3_stride2(nn.relu(x))
    x = attend(x, 0)
    for spec in block_specs(self.block, self.stage_sizes, self.planes):
      x = Block(spec, self.block == "bottleneck", self.bn_torch_running_var, self.dtype,
                name=spec.name)(x, train)
      if spec.index == self.stage_sizes[spec.stage - 1] - 1:
        x = attend(x, spec.stage)
    x = jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1))
    bound = 1 / np.sqrt(x.shape[-1])  # torch.nn.Linear's default initialisation
    fc = nn.Dense(self.num_classes, dtype=self.dtype,
                  kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                  bias_init=lambda key, shape, dtype=jnp.float32: jax.random.uniform(
                      key, shape, dtype, -bound, bound), name="fc")
    if return_features:
      if self.is_initializing():  # the head's parameters exist whatever is returned
        fc(x)
      return x.astype(jnp.float32)
    return fc(x).astype(jnp.float32)


def site_name(stage: int) -> str:
  """The module-path prefix of the attention after `stage`: 'stem', 'layer1', ..."""
  return "stem" if stage == 0 else f"layer{stage}"


# --- What the model registry (jattn.models) asks of a backbone ---

def check(model_config: ml_collections.ConfigDict, image_size: int | None = None) -> None:
  """The ResNet's own fields: attention on stages that exist, an S-Attn reduction that divides
  the channels, a C-Attn kernel that fits the maps; each problem is one UserError naming the
  field."""
  mc = model_config
  for field in PLACEMENT:
    stages = tuple(mc[field])
    bad = [s for s in stages if s not in STAGES]
    if bad:
      raise UserError(f"config.model.{field}={stages}: {mc.name} has no stage {bad[0]!r}; "
                      f"stages are numbered 0 (the stem) to 4")
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
  mc = model_config
  block, stage_sizes = ARCHS[mc.name]
  return ResNet(
      block=block, stage_sizes=stage_sizes, planes=stage_planes(mc.width),
      num_classes=mc.num_classes, c_attn_stages=tuple(mc.c_attn_stages),
      s_attn_stages=tuple(mc.s_attn_stages), c_attn_kernel=mc.c_attn_kernel,
      c_attn_stride=mc.c_attn_stride, c_attn_padding=mc.c_attn_padding,
      s_attn_reduction=mc.s_attn_reduction,
      s_attn_impl=models.resolve_s_attn_impl(mc.get("s_attn_impl", "auto")),
      bn_torch_running_var=models.bn_unbiased_running_var(mc),
      dtype=models.compute_dtype(mc))


def attention_sites(model_config: ml_collections.ConfigDict) -> list[tuple[str, str, str]]:
  """(module path, 'c_attn' or 's_attn', label) of each attention module, in execution order."""
  mc = model_config
  sites = []
  for stage in STAGES:
    for kind, field in (("s_attn", "s_attn_stages"), ("c_attn", "c_attn_stages")):
      if stage in mc[field]:
        sites.append((f"{site_name(stage)}_{kind}", kind, STAGE_LABELS[stage]))
  return sites


def without_attention(model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  plain = model_config.copy_and_resolve_references()
  with plain.unlocked():
    plain.c_attn_stages, plain.s_attn_stages = (), ()
  return plain


def ignored_fields(model_config) -> tuple[str, ...]:
  """Model fields that change nothing a ResNet computes: VGG's head and batch-norm switch."""
  return ("batch_norm", "classifier_width", "pool_size", "dropout_rate")


def feature_dim(model_config: ml_collections.ConfigDict) -> int:
  """The width of the pooled features `ResNet(..., return_features=True)` returns."""
  block = ARCHS[model_config.name][0]
  return stage_channels(block, stage_planes(model_config.width))[-1]


def head_params(model_config: ml_collections.ConfigDict) -> tuple[tuple[str, ...], ...]:
  """The parameter-path prefixes of the final linear layer, which takes the features."""
  return (("fc",),)


def is_pretrained(path: Sequence[str]) -> bool:
  """ImageNet provides the stem and the residual blocks; the attention modules and the head `fc`
  are new. `path` is a variable's, without the collection: ('layer1_0', 'conv1', 'kernel')."""
  return path[0] in ("conv1", "bn1") or (path[0].startswith("layer")
                                          and not path[0].endswith("_attn"))


def parameter_groups(params: Mapping[str, Any]) -> list[tuple[str, Any]]:
  """(row label, subtree) of the parameter table of `jattn models`: the stem, each
  stage's blocks, each attention module after the part it follows, the head."""
  rows = [("stem", {k: params[k] for k in ("conv1", "bn1")})]
  for stage in STAGES:
    if stage:
      rows.append((f"stage {stage}", {k: v for k, v in params.items()
                                      if k.startswith(f"layer{stage}_") and k[-5:] != "_attn"}))
    for kind, label in (("s_attn", "S-Attn"), ("c_attn", "C-Attn")):
      if f"{site_name(stage)}_{kind}" in params:
        rows.append((f"{rows[-1][0]} {label}", params[f"{site_name(stage)}_{kind}"]))
  return rows + [("fc", params["fc"])]


# torchvision's ImageNet checkpoints (under jattn.models.weights.TORCHVISION_URL); the digits after
# '-' start the file's SHA-256. ResNet-50's is IMAGENET1K_V2 (torchvision's default for it since
# 0.13); ResNet-18 has only IMAGENET1K_V1.
TORCHVISION = {"resnet18": "resnet18-f37072fd.pth", "resnet50": "resnet50-11ad3fa6.pth"}


def torchvision_arch(model_config: ml_collections.ConfigDict) -> str:
  """The torchvision architecture whose ImageNet weights this config's backbone takes."""
  return model_config.name


def torchvision_model_config(arch: str, state_dict: Mapping[str, Any] | None = None
                             ) -> ml_collections.ConfigDict:
  """The model config of torchvision's `arch`: no attention, float32, the classes and width of
  `state_dict` when given (narrow copies of the layout convert too), else 1000 and full width."""
  num_classes, width = 1000, 1.0
  if state_dict is not None:
    if "fc.weight" in state_dict:
      num_classes = int(state_dict["fc.weight"].shape[0])
    if "conv1.weight" in state_dict:
      width = state_dict["conv1.weight"].shape[0] / PLANES[0]
  return ml_collections.ConfigDict(dict(
      name=arch, num_classes=num_classes, width=width, c_attn_stages=(), s_attn_stages=(),
      c_attn_kernel=4, c_attn_stride=4, c_attn_padding=0, s_attn_reduction=8,
      s_attn_impl="auto", dtype="float32", bn_unbiased_running_var=True))


def state_dict_arch(state_dict: Mapping[str, Any]) -> str | None:
  """The torchvision ResNet a state dict is of (by its block kind and blocks per stage), if any."""
  bottleneck = "layer1.0.conv3.weight" in state_dict
  sizes = tuple(len({k.split(".")[1] for k in state_dict if k.startswith(f"layer{s}.")})
                for s in range(1, 5))
  for arch, (block, stage_sizes) in ARCHS.items():
    if (block == "bottleneck") == bottleneck and sizes == stage_sizes:
      return arch
  return None


def check_state_dict(state_dict: Mapping[str, Any], model_config: ml_collections.ConfigDict
                     ) -> None:
  """A VGG's state dict, or another ResNet's, is one clear line naming what it is."""
  name = model_config.name
  if any(k.startswith("features.") for k in state_dict):
    raise UserError(f"the state dict is a VGG (features.*), not a ResNet, but "
                    f"config.model.name={name!r}; convert it with --arch vgg19 or vgg19_bn")
  arch = state_dict_arch(state_dict)
  if arch is not None and arch != name:
    raise UserError(f"the state dict is a {arch} but config.model.name={name!r}; convert it "
                    f"with --arch {arch} or change the config")


# Flax name -> torch name, per kind of module
_BN_PARAMS = {"scale": "weight", "bias": "bias"}
_BN_STATS = {"mean": "running_mean", "var": "running_var"}
_ATTN_CONVS = {"c_attn": ("m_q", "m_k", "m_v"), "s_attn": ("s_q", "s_k", "s_v")}


def torch_key_map(model_config: ml_collections.ConfigDict, source: str
                  ) -> list[tuple[str, tuple[str, ...], str]]:
  """(torch key, Flax variable path, kind) for every tensor of torchvision's state dict (without
  `num_batches_tracked`), in its order; kind 'conv': (out, in, kh, kw) -> (kh, kw, in, out),
  'linear': transposed, 'vector' as is.

  `source="reference"` adds the attention modules as `jattn.perf.torch_reference.TorchResNet` holds
  them (`<site>.conv1/2/3.weight`, the authors' modules: M_Q, M_K, M_V or S_Q, S_K, S_V), which
  no torchvision file has.
  """
  if source not in ("torchvision", "reference"):
    raise ValueError(f"source={source!r}: use torchvision or reference")
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
  if source == "reference":
    for site, kind, _ in attention_sites(mc):
      for j, flax_conv in enumerate(_ATTN_CONVS[kind], start=1):
        entries.append((f"{site}.conv{j}.weight", ("params", site, flax_conv, "kernel"), "conv"))
  return entries


def rearrange(t: np.ndarray, kind: str, flax_name: str, model_config) -> np.ndarray:
  """A torch tensor in the layout of its Flax variable."""
  if kind == "conv":
    return t.transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)
  if kind == "linear":
    return t.T
  if kind == "vector":
    return t
  raise ValueError(kind)
