"""Ablation "VGG19 + C" in Tables 1-2: the paper's model without its S-Attn modules.

  python -m jattn.main --config configs/vgg19_c.py --config.fold=1 --workdir runs/vgg19_c/fold1
"""

from configs import default


def get_config():
  config = default.get_config()
  config.name = "vgg19_c"
  config.paper_row = "VGG19 + C"
  config.model.s_attn_blocks = ()
  return config
