r"""The paper's "+ C" ablation on ResNet-50: C-Attn after the stem and stage 1 (56x56 at 224).

  python -m jattn.main --config configs/resnet50_c.py --config.fold=1 \
      --workdir runs/resnet50_c/fold1
"""

from configs import resnet50_ours


def get_config():
  config = resnet50_ours.get_config()
  config.name = "resnet50_c"
  config.model.s_attn_stages = ()
  return config
