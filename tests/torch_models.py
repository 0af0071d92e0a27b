"""The PyTorch reference models the conversion tests compare against (one copy, in jattn)."""

from jattn.perf.torch_reference import (
           VGG19_BLOCKS,
           RefCAttn,
           RefSAttn,
           TorchResNet,
           TorchVGG,
           randomize_,
           resnet_from_config,
)

__all__ = ["VGG19_BLOCKS", "RefCAttn", "RefSAttn", "TorchResNet", "TorchVGG", "randomize_",
           "resnet_from_config"]
