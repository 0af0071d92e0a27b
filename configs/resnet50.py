"""The paper's baseline row on ResNet-50: fine-tuned torchvision ResNet-50 without attention.

  python -m jattn.models.weights --download resnet50       # torchvision's IMAGENET1K_V2 weights
  python -m jattn.main --config configs/resnet50.py --config.fold=1 --workdir runs/resnet50/fold1

Not a row of the paper: the tables show these runs as their own rows, never beside the paper's
VGG19 figures. configs/resnet50_c.py, resnet50_s.py and resnet50_ours.py add attention modules.
"""

from configs import resnet50_ours


def get_config():
  config = resnet50_ours.get_config()
  config.name = "resnet50"
  config.model.c_attn_stages = ()
  config.model.s_attn_stages = ()
  return config
