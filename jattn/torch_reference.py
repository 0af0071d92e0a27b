"""PyTorch transcriptions of jattn's VGG19 with C-Attn and S-Attn (torchvision's and the authors'
layouts), for the conversion tests and for the benchmark's PyTorch-eager peer.

Written from the layouts' descriptions (torchvision's `features`/`avgpool`/`classifier`
Sequentials; the authors' attention modules as extra `features` entries with `conv1`, `conv2`,
`conv3`); widths are parameters so tests can run narrow models quickly. PyTorch is an optional
extra: `pip install -e ".[convert]"`.
"""

from __future__ import annotations

try:
  import torch
  from torch import nn
except ImportError:
  from jattn.errors import UserError

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


def randomize_(model: nn.Module, seed: int = 0, qk_scale: float = 0.05) -> nn.Module:
  """Random weights everywhere, batch-norm statistics included; query/key convs scaled down.

  The paper's softmax has no 1/sqrt(d): with He-scaled query and key weights its logits are large
  and the softmax saturates, so float rounding alone moves the outputs. Small query/key weights
  keep the attention soft, where a softmax over the wrong axis shows at once.
  """
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      fan_in = p[0].numel() if p.ndim > 1 else 1
      p.copy_(torch.randn(p.shape, generator=g) * (2.0 / fan_in) ** 0.5)
      if name.endswith(("conv1.weight", "conv2.weight")) and ".conv" in name:
        p.mul_(qk_scale)
      if p.ndim == 1:
        p.mul_(0.1)
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        m.weight.add_(1.0)
  return model.eval()
