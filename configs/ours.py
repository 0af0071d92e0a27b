"""The paper's model, "Ours" in Tables 1-2: VGG19 with C-Attn after blocks 1-2, S-Attn after 3-5.

  python -m jattn.main --config configs/ours.py --config.fold=1 --workdir runs/ours/fold1

Needs BreakHis under data/ and ImageNet weights converted into pretrained/vgg19 (README). 130 epochs
of ~5,500 training images at 224x224, batch 8. The paper trained in float32; model.dtype 'auto'
computes in bfloat16 on a GPU (parameters, optimiser state and attention softmax stay float32),
a choice of arithmetic, not of the model: --config.model.dtype=float32 for the paper's.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.name = "ours"
  config.paper_row = "Ours"
  return config
