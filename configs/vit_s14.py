r"""The paper's baseline row (no attention module), on DINOv2 ViT-S/14 with 4 registers.

  jattn train --config configs/vit_s14.py --config.model.weights=model.safetensors \
      --config.fold=1 --workdir runs/vit_s14/fold1

configs/vit_s14_ours.py says where the weights are and what else the rows share.
"""

from configs import vit_s14_ours


def get_config():
  config = vit_s14_ours.get_config()
  config.name = "vit_s14"
  config.model.vit_c_attn_blocks = ()
  config.model.vit_s_attn_blocks = ()
  return config
