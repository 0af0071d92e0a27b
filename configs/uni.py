r"""UNI (MahmoodLab; timm's vit_large_patch16_224 with LayerScale, ViT-L/16) fine-tuned on the
paper's recipe without attention modules: the foundation-model baseline beside configs/vit_s14.py.

  # the weights: https://huggingface.co/MahmoodLab/UNI (CC-BY-NC-ND-4.0, gated: accept its terms,
  # download pytorch_model.bin yourself; jattn never downloads them)
  jattn train --config configs/uni.py --config.model.weights=pytorch_model.bin \
      --config.fold=1 --workdir runs/uni/fold1

--config.model.freeze=True trains the head only (a linear probe); with
--config.model.train_last_blocks=2 also the last two of its 24 blocks.
"""

from configs import vit_s14


def get_config():
  config = vit_s14.get_config()
  config.name = "uni"
  config.model.name = "uni"
  config.model.weights = "pretrained/uni/pytorch_model.bin"
  return config
