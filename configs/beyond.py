"""The paper's model ("Ours") in settings the paper does not use: one magnification, or 8 subtypes.

  python -m jattn.main --config configs/beyond.py:100X --config.fold=1   # 100X only
  python -m jattn.main --config configs/beyond.py:subtype --config.fold=1  # 8 classes

The argument is a magnification (40X, 100X, 200X, 400X: a magnification-specific model, trained
and tested on that magnification's images, as in Spanhol et al. 2016) or `subtype` (the 8 BreakHis
subtypes as classes, an 8-way head). The four magnification-specific models as one sweep, each
filling its own column of the tables:

  python experiments/sweep.py --configs \
      configs/beyond.py:40X,configs/beyond.py:100X,configs/beyond.py:200X,configs/beyond.py:400X
"""

from configs import ours

SETTINGS = ("40X", "100X", "200X", "400X", "subtype")


def get_config(setting="100X"):
  if setting not in SETTINGS:
    raise ValueError(f"no setting {setting!r}; use one of "
                     f"{', '.join(f'configs/beyond.py:{s}' for s in SETTINGS)}")
  config = ours.get_config()
  config.name = f"ours_{setting}"
  config.paper_row = ""  # the paper reports neither setting
  if setting == "subtype":
    config.data.breakhis.task = "subtype"
    config.model.num_classes = 8
  else:
    config.data.breakhis.magnifications = (setting,)
  return config
