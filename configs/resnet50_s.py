r"""The paper's "+ S" ablation on ResNet-50: S-Attn after stages 2, 3 and 4 (28, 14, 7 at 224).

  python -m jattn.main --config configs/resnet50_s.py --config.fold=1 \
      --workdir runs/resnet50_s/fold1
"""

from configs import resnet50_ours


def get_config():
  config = resnet50_ours.get_config()
  config.name = "resnet50_s"
  config.model.c_attn_stages = ()
  return config
