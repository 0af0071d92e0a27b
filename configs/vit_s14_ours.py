r"""The paper's model ("Ours") on DINOv2 ViT-S/14 with 4 registers: S-Attn on the patch-token grid
and C-Attn on its tokens' channels, both after block 11 of 12, before the last block
(jattn/models/vit.py, docs/foundation-models.md).

  # the weights: https://huggingface.co/timm/vit_small_patch14_reg4_dinov2.lvd142m (Apache-2.0,
  # public; jattn never downloads them), e.g. its model.safetensors
  jattn train --config configs/vit_s14_ours.py --config.model.weights=model.safetensors \
      --config.fold=1 --workdir runs/vit_s14_ours/fold1

The paper's recipe otherwise (configs/default.py: Adam 5e-5, batch 8, 130 epochs, 224x224, every
parameter fine-tuned; --config.model.freeze=True trains only the attention modules and the head).
The paper has no ViT row: the tables show these runs as their own rows (paper_row '').
configs/vit_s14.py, vit_s14_c.py and vit_s14_s.py are the other rows of the ablation.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.name = "vit_s14_ours"
  config.paper_row = ""
  config.model.name = "dinov2_vits14_reg4"
  config.pretrained = ""  # a ViT's weights come from config.model.weights
  config.model.weights = "pretrained/vit_small_patch14_reg4_dinov2.safetensors"
  return config
