r"""The paper's model ("Ours") on ResNet-50: C-Attn after the stem and stage 1, S-Attn after stages
2-4, placed by resolution as the paper places them on VGG19 (jattn/models/resnet.py).

  python -m jattn.models.weights --download resnet50       # torchvision's IMAGENET1K_V2 weights
  python -m jattn.main --config configs/resnet50_ours.py --config.fold=1 \
      --workdir runs/resnet50_ours/fold1

The paper's recipe otherwise (configs/default.py: Adam 5e-5, batch 8, 130 epochs, 224x224, the
backbone from ImageNet, attention and head from scratch). The paper has no ResNet row, so this
reproduces none (paper_row '').
"""

from configs import default


def get_config():
  config = default.get_config()
  config.name = "resnet50_ours"
  config.paper_row = ""
  config.model.name = "resnet50"
  config.pretrained = "pretrained/resnet50"
  return config
