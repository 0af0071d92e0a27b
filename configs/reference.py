"""The paper's model as the authors' public code builds and trains it (pxiangwu/attn-hist-classify).

  python -m jattn.main --config configs/reference.py --config.fold=1 --workdir runs/reference/fold1

Differences from the paper's text: a batch-norm VGG19 (torchvision's vgg19_bn weights), C-Attn
convs of kernel 7, stride 4, padding 3, the learning rate halved at epochs 30 and 60 only, and
horizontal flips with a rotation of at most 3.14 degrees (the code passes [-pi, pi] to
torchvision's RandomRotation, which reads degrees; ours fills the few corner pixels by reflection
where torchvision fills them black). Also converts the authors' checkpoints:
python -m jattn.models.weights --source reference --config configs/reference.py --pth X.pth --out
DIR
"""

import math

from configs import default


def get_config():
  config = default.get_config()
  config.name = "reference"
  config.paper_row = "Ours"
  config.model.batch_norm = True
  config.model.c_attn_kernel = 7
  config.model.c_attn_stride = 4
  config.model.c_attn_padding = 3
  config.pretrained = "pretrained/vgg19_bn"
  config.lr_milestones = (30, 60)
  config.augment.flip = "horizontal"
  config.augment.rotation = "uniform"
  config.augment.max_angle = math.pi  # degrees, as the code has it
  return config
