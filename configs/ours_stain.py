"""The paper's model ("Ours") trained with H&E stain augmentation: an extension, not a paper row.

  python -m jattn.main --config configs/ours_stain.py --config.fold=1

configs/ours.py plus colour jitter inside the train step: HED stain jitter (Tellez et al., 2018)
with each stain's concentration scaled by U(0.95, 1.05) and shifted by U(-0.05, 0.05) (the
'HED-light' setting of Tellez et al., 2019), and mild brightness, contrast and saturation jitter.
See what it does with `python -m jattn.data augment-preview --config configs/ours_stain.py
--out grid.png`. Add --config.tta=dihedral to average the 8 flips/turns at test time.
"""

from configs import ours


def get_config():
  config = ours.get_config()
  config.name = "ours_stain"
  config.paper_row = ""  # not in the paper's tables
  config.augment.hed_scale = 0.05
  config.augment.hed_shift = 0.05
  config.augment.brightness = 0.1
  config.augment.contrast = 0.1
  config.augment.saturation = 0.1
  return config
