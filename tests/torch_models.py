"""The PyTorch reference models the conversion tests compare against (one copy, in jattn)."""

from jattn.torch_reference import VGG19_BLOCKS, RefCAttn, RefSAttn, TorchVGG, randomize_

__all__ = ["VGG19_BLOCKS", "RefCAttn", "RefSAttn", "TorchVGG", "randomize_"]
