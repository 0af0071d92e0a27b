"""Ablation "VGG19 + S" in Tables 1-2: the paper's model without its C-Attn modules.

  python -m jattn.main --config configs/vgg19_s.py --config.fold=1 --workdir runs/vgg19_s/fold1
"""

from configs import default


def get_config():
  config = default.get_config()
  config.name = "vgg19_s"
  config.paper_row = "VGG19 + S"
  config.model.c_attn_blocks = ()
  return config
