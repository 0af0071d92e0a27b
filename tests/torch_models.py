"""The PyTorch reference models the conversion tests compare against (one copy, in jattn), and
random weights for them."""

import torch
from torch import nn

from jattn.perf.torch_reference import (
           VGG19_BLOCKS,
           RefCAttn,
           RefSAttn,
           TorchResNet,
           TorchVGG,
           resnet_from_config,
)

__all__ = ["VGG19_BLOCKS", "RefCAttn", "RefSAttn", "TorchResNet", "TorchVGG", "randomize_",
           "resnet_from_config"]


def randomize_(model: nn.Module, seed: int = 0, qk_scale: float = 0.05) -> nn.Module:
  """Random weights everywhere, batch-norm statistics included; query/key convs scaled down.

  The paper's softmax has no 1/sqrt(d): with He-scaled query and key weights its logits are large
  and the softmax saturates, so float rounding alone moves the outputs. Small query/key weights
  keep the attention soft, where a softmax over the wrong axis shows at once.
  """
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      fan_in = p[0].numel() if p.ndim > 1 else 1
      p.copy_(torch.randn(p.shape, generator=g) * (2.0 / fan_in) ** 0.5)
      if p.ndim == 1:
        p.mul_(0.1)
    for m in model.modules():
      if isinstance(m, (RefCAttn, RefSAttn)):  # conv1, conv2: the query and key convs
        m.conv1.weight.mul_(qk_scale)
        m.conv2.weight.mul_(qk_scale)
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        m.weight.add_(1.0)
  return model.eval()
