"""The built-in demo: nothing to download, a few minutes on a laptop CPU.

  jattn train --config configs/demo.py

It generates a small synthetic BreakHis-format tree once (82 patients, 4 images per patient and
magnification, into ~/.cache/jattn/demo), then trains a narrow VGG19 with C-Attn and S-Attn at
64x64 from scratch and evaluates it as the paper does. The figures show that the pipeline learns;
they say nothing about BreakHis. With an argument it runs another row of the paper's ablation on
the same data (this is what `jattn sweep --demo` runs):

  jattn train --config configs/demo.py:vgg19     # also :vgg19_c, :vgg19_s, :ours

and the same four rows on a narrow ResNet-50 (planes 8-8-16-32, batch norm kept as PyTorch does),
`jattn sweep --demo --rows resnet50`:

  jattn train --config configs/demo.py:resnet50_ours   # also :resnet50, :resnet50_c, ...

and on a small ViT-S/14 (DINOv2's layout with 4 registers at 4 blocks of 96 channels, 56x56: a
4x4 patch grid), `jattn train --config configs/demo.py:vit_s14_ours` (also :vit_s14, :vit_s14_c,
:vit_s14_s), and on a narrow ResNet-18 (the ResNet-50 rows with `model.name` resnet18: basic
blocks, planes 8-8-16-32), named demo_resnet18*:

  jattn train --config configs/demo.py:resnet18_ours   # also :resnet18, :resnet18_c, ...

A run's name follows the model it trains: `--config.model.name=resnet18` on a resnet50 row names
it demo_resnet18_... (`config_lib.apply_overrides`).
"""

import importlib

from jattn.data.breakhis import synthetic

ROWS = ("vgg19", "vgg19_c", "vgg19_s", "ours")  # the paper's ablation, as configs/<row>.py
RESNET50_ROWS = ("resnet50", "resnet50_c", "resnet50_s", "resnet50_ours")  # the same on ResNet-50
RESNET18_ROWS = tuple(r.replace("resnet50", "resnet18") for r in RESNET50_ROWS)  # and ResNet-18
VIT_ROWS = ("vit_s14", "vit_s14_c", "vit_s14_s", "vit_s14_ours")  # and a small ViT-S/14


def get_config(row="ours"):
  every = ROWS + RESNET50_ROWS + RESNET18_ROWS + VIT_ROWS
  if row not in every:
    raise ValueError(f"no row {row!r}; use one of "
                     f"{', '.join(f'configs/demo.py:{r}' for r in every)}")
  resnet18 = row in RESNET18_ROWS  # the ResNet-50 row's config with the ResNet-18 backbone
  module = row.replace("resnet18", "resnet50") if resnet18 else row
  config = importlib.import_module(f"configs.{module}").get_config()  # the paper's row, full size
  if resnet18:
    config.model.name = "resnet18"
  config.name = f"demo_{row}"

  config.data.dir = synthetic.DEMO_DIR  # synthetic data goes only there or into an empty folder
  config.data.breakhis.synthetic.enabled = True
  config.data.breakhis.synthetic.images_per_patient = 4
  config.data.breakhis.synthetic.width = 175  # a quarter of BreakHis' 700 x 460
  config.data.breakhis.synthetic.height = 115
  config.image_size = 64

  config.model.width = 1 / 16  # / 16, at least 8: VGG19's 8-8-16-32-32, a ResNet's planes 8-8-16-32
  if row in ROWS:  # VGG's own fields (a ResNet has batch norm and a one-layer head)
    config.model.classifier_width = 64
    config.model.pool_size = 2
    config.model.batch_norm = True  # trains from scratch in a few epochs
  config.pretrained = ""  # no ImageNet weights in the demo
  if row in VIT_ROWS:  # ViT-S/14's layout at 4 blocks of 96 channels, 3 heads, from scratch
    config.model.weights = ""
    config.model.vit.depth = 4
    config.model.vit.embed_dim = 96
    config.model.vit.num_heads = 3
    config.image_size = 56  # a 4 x 4 patch grid

  config.num_epochs = 6
  config.batch_size = 16
  config.learning_rate = 1e-3
  config.lr_decay_every = 4
  config.log_every_steps = 20
  return config
