"""PyTorch transcriptions of jattn's models, for the conversion tests and for the benchmark's
PyTorch-eager peer: VGG19 with C-Attn and S-Attn (torchvision's and the authors' layouts) and
torchvision's ResNet-18/50 with the same attention modules after chosen stages.

Written from the layouts' descriptions (torchvision's VGG `features`/`avgpool`/`classifier`
Sequentials; the authors' attention modules as extra `features` entries with `conv1`, `conv2`,
`conv3`; torchvision's ResNet `conv1`/`bn1`/`layer1`..`layer4`/`fc` with `BasicBlock` and
`Bottleneck`, whose state-dict keys are torchvision's); widths are parameters so tests can run
narrow models quickly. PyTorch is an optional extra: `pip install -e ".[convert]"`.
"""

from __future__ import annotations

from jattn import models
from jattn.core.errors import UserError
from jattn.models import resnet, vgg, vit

try:
  import torch
  from torch import nn
except ImportError:
  raise UserError(
      'the PyTorch reference models need PyTorch: pip install -e ".[convert]"') from None

VGG19_BLOCKS = ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4)


class RefCAttn(nn.Module):
  """The paper's C-Attn in the authors' layout (their class `SpatialAttention`)."""

  def __init__(self, c, kernel=7, stride=4, padding=3):
    super().__init__()
    self.conv1 = nn.Conv2d(c, c, kernel, stride, padding, bias=False)
    self.conv2 = nn.Conv2d(c, c, kernel, stride, padding, bias=False)
    self.conv3 = nn.Conv2d(c, c, 1, bias=False)

  def forward(self, x):
    b, c, h, w = x.shape
    m_q = self.conv1(x).flatten(2)  # [b, c, n']
    m_k = self.conv2(x).flatten(2)
    m_v = self.conv3(x).flatten(2)  # [b, c, n]
    d = m_q @ m_k.transpose(1, 2)  # [b, c, c]
    d_prime = torch.softmax(d, dim=1)
    a_c = d_prime.transpose(1, 2) @ m_v
    return x + a_c.view(b, c, h, w)


class RefSAttn(nn.Module):
  """The paper's S-Attn in the authors' layout (their class `ChannelAttention`)."""

  def __init__(self, c, r=8):
    super().__init__()
    self.conv1 = nn.Conv2d(c, c // r, 1, bias=False)
    self.conv2 = nn.Conv2d(c, c // r, 1, bias=False)
    self.conv3 = nn.Conv2d(c, c, 1, bias=False)

  def forward(self, x):
    b, c, h, w = x.shape
    s_q = self.conv1(x).flatten(2)  # [b, c', n]
    s_k = self.conv2(x).flatten(2)
    s_v = self.conv3(x).flatten(2)  # [b, c, n]
    e = s_q.transpose(1, 2) @ s_k  # [b, n, n]
    e_prime = torch.softmax(e, dim=1)
    return x + (s_v @ e_prime).view(b, c, h, w)


class TorchVGG(nn.Module):
  """torchvision's VGG layout (layout='torchvision') or the authors' (layout='reference')."""

  def __init__(self, blocks=VGG19_BLOCKS, batch_norm=False, num_classes=1000, hidden=4096,
               layout="torchvision", c_attn_blocks=(), s_attn_blocks=(), c_attn_kernel=7,
               c_attn_stride=4, c_attn_padding=3, s_attn_reduction=8, pool_size=7,
               dropout_rate=0.5):
    super().__init__()
    layers, cin = [], 3
    for b, widths in enumerate(blocks, start=1):
      for width in widths:
        layers.append(nn.Conv2d(cin, width, 3, padding=1))
        if batch_norm:
          layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU(inplace=True))
        cin = width
      if b in s_attn_blocks:
        layers.append(RefSAttn(cin, s_attn_reduction))
      if b in c_attn_blocks:
        layers.append(RefCAttn(cin, c_attn_kernel, c_attn_stride, c_attn_padding))
      layers.append(nn.MaxPool2d(2, 2))
    self.features = nn.Sequential(*layers)
    self.layout = layout
    if layout == "torchvision":
      self.avgpool = nn.AdaptiveAvgPool2d((pool_size, pool_size))
    self.classifier = nn.Sequential(
        nn.Linear(cin * pool_size * pool_size, hidden), nn.ReLU(True), nn.Dropout(dropout_rate),
        nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(dropout_rate),
        nn.Linear(hidden, num_classes))

  def forward(self, x):
    x = self.features(x)
    if self.layout == "torchvision":
      return self.classifier(torch.flatten(self.avgpool(x), 1))
    return torch.log_softmax(self.classifier(x.view(x.size(0), -1)), dim=1)


def from_config(model_config, blocks) -> TorchVGG:
  """The torchvision-layout TorchVGG with the shapes of jattn's model for `config.model`.

  `blocks` are the conv widths (jattn.models.vgg.block_widths(model_config.width)).
  """
  mc = model_config
  return TorchVGG(blocks, batch_norm=mc.batch_norm, num_classes=mc.num_classes,
                  hidden=mc.classifier_width, c_attn_blocks=tuple(mc.c_attn_blocks),
                  s_attn_blocks=tuple(mc.s_attn_blocks), c_attn_kernel=mc.c_attn_kernel,
                  c_attn_stride=mc.c_attn_stride, c_attn_padding=mc.c_attn_padding,
                  s_attn_reduction=mc.s_attn_reduction, pool_size=mc.pool_size,
                  dropout_rate=mc.dropout_rate)


class BasicBlock(nn.Module):
  """torchvision's ResNet-18/34 block: two 3x3 convs with batch norm, shortcut, ReLU."""

  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + identity)


class Bottleneck(nn.Module):
  """torchvision's ResNet-50 block (v1.5: the stride on the 3x3 conv): 1x1, 3x3, 1x1 to 4x."""

  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * self.expansion)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(out + identity)


RESNETS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet50": (Bottleneck, (3, 4, 6, 3))}
RESNET_PLANES = (64, 128, 256, 512)


class TorchResNet(nn.Module):
  """torchvision's ResNet (its module names, so its state dict has torchvision's keys), with
  RefSAttn / RefCAttn after chosen stages (0 = the stem, after its max-pool; 1-4 after a stage's
  last block), as attributes `stem_c_attn`, `layer1_c_attn`, `layer2_s_attn`, ... (S-Attn first
  when a stage has both)."""

  def __init__(self, arch="resnet50", num_classes=1000, planes=RESNET_PLANES, c_attn_stages=(),
               s_attn_stages=(), c_attn_kernel=4, c_attn_stride=4, c_attn_padding=0,
               s_attn_reduction=8):
    super().__init__()
    block, layers = RESNETS[arch]
    self.inplanes = planes[0]
    self.conv1 = nn.Conv2d(3, planes[0], 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(planes[0])
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    for stage, (n, p) in enumerate(zip(layers, planes, strict=True), start=1):
      setattr(self, f"layer{stage}", self._make_layer(block, p, n, 1 if stage == 1 else 2))
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(planes[3] * block.expansion, num_classes)
    self.sites = []
    channels = (planes[0], *(p * block.expansion for p in planes))
    for stage in range(5):
      site = "stem" if stage == 0 else f"layer{stage}"
      if stage in s_attn_stages:
        setattr(self, f"{site}_s_attn", RefSAttn(channels[stage], s_attn_reduction))
        self.sites.append((stage, f"{site}_s_attn"))
      if stage in c_attn_stages:
        setattr(self, f"{site}_c_attn", RefCAttn(channels[stage], c_attn_kernel, c_attn_stride,
                                                 c_attn_padding))
        self.sites.append((stage, f"{site}_c_attn"))
    for m in self.modules():  # torchvision's initialisation
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)

  def _make_layer(self, block, planes, blocks, stride):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(
          nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
          nn.BatchNorm2d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    layers.extend(block(self.inplanes, planes) for _ in range(1, blocks))
    return nn.Sequential(*layers)

  def _attend(self, x, stage):
    for s, name in self.sites:
      if s == stage:
        x = getattr(self, name)(x)
    return x

  def forward(self, x):
    x = self._attend(self.maxpool(self.relu(self.bn1(self.conv1(x)))), 0)
    for stage in range(1, 5):
      x = self._attend(getattr(self, f"layer{stage}")(x), stage)
    return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet_from_config(model_config, planes) -> TorchResNet:
  """The TorchResNet with the shapes of jattn's ResNet for `config.model`.

  `planes` are the stages' planes (jattn.models.resnet.stage_planes(model_config.width)).
  """
  mc = model_config
  return TorchResNet(mc.name, mc.num_classes, planes, tuple(mc.c_attn_stages),
                     tuple(mc.s_attn_stages), mc.c_attn_kernel, mc.c_attn_stride,
                     mc.c_attn_padding, mc.s_attn_reduction)


def timm_vit(model_config, image_size: int = 224) -> nn.Module:
  """timm's own VisionTransformer of a ViT preset (jattn.models.vit) at the config's shapes, for
  `image_size` inputs (its position embeddings resampled per call, as ours, `dynamic_img_size`):
  the peer of a ViT without attention modules ('token+avg' pooling is timm's 'token' here: the
  same blocks, one mean fewer)."""
  try:
    import timm
  except ImportError:
    raise UserError('the PyTorch peer of a ViT is timm\'s: pip install -e ".[test]"') from None
  mc = model_config
  if vit.attention_sites(mc):
    raise UserError(f"config.model.name={mc.name!r} with attention modules has no timm peer; "
                    f"benchmark it without (e.g. configs/vit_s14.py)")
  a = vit.arch(mc)
  p = a.preset
  extra = ({"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": nn.SiLU}
           if p.mlp == "swiglu" else {})
  return timm.create_model(
      p.timm_arch, pretrained=False, num_classes=mc.num_classes, img_size=p.native_size,
      patch_size=p.patch_size, embed_dim=a.embed_dim, depth=a.depth, num_heads=a.num_heads,
      mlp_ratio=p.mlp_ratio, reg_tokens=p.reg_tokens, no_embed_class=p.no_embed_class,
      init_values=1e-5 if p.layer_scale else None, global_pool="token", dynamic_img_size=True,
      **extra)


def for_config(model_config, image_size: int = 224) -> nn.Module:
  """The transcription of jattn's model for `config.model` (any backbone), torchvision's layout
  (timm's own model for a ViT)."""
  mc = model_config
  transcriptions = {vgg: lambda: from_config(mc, vgg.block_widths(mc.width)),
                    resnet: lambda: resnet_from_config(mc, resnet.stage_planes(mc.width)),
                    vit: lambda: timm_vit(mc, image_size)}
  backbone = models.of(mc)
  if backbone not in transcriptions:
    raise UserError(f"config.model.name={models.name_of(mc)!r} has no PyTorch transcription in "
                    f"jattn.perf.torch_reference; run without --torch")
  return transcriptions[backbone]()
