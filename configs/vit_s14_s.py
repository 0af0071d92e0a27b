r"""The paper's "+ S" ablation on DINOv2 ViT-S/14 with 4 registers: S-Attn on the
patch-token grid after block 11 of 12.

  jattn train --config configs/vit_s14_s.py --config.model.weights=model.safetensors \
      --config.fold=1 --workdir runs/vit_s14_s/fold1

configs/vit_s14_ours.py says where the weights are and what else the rows share.
"""

from configs import vit_s14_ours


def get_config():
  config = vit_s14_ours.get_config()
  config.name = "vit_s14_s"
  config.model.vit_c_attn_blocks = ()
  return config
