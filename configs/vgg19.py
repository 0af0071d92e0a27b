"""The baseline, "VGG19" in Tables 1-2: fine-tuned VGG19 without attention.

  python -m jattn.main --config configs/vgg19.py --config.fold=1 --workdir runs/vgg19/fold1
"""

from configs import default


def get_config():
  config = default.get_config()
  config.name = "vgg19"
  config.paper_row = "VGG19"
  config.model.c_attn_blocks = ()
  config.model.s_attn_blocks = ()
  return config
