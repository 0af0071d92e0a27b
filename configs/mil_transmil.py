"""TransMIL (Shao et al. 2021) with exact attention, not Nystrom's (why: docs/mil.md), trained
with Adam where the paper used Lookahead RAdam; bags over 4,096 tiles are sampled during training
(config.data.bags.train_max_tiles), never at test:

  jattn train --config configs/mil_transmil.py --config.data.bags.manifest=slides.csv \\
      --config.data.bags.features_dir=features --workdir runs/mil_transmil/fold1
"""

from configs import mil_abmil


def get_config():
  config = mil_abmil.get_config("transmil")
  config.model.dropout_rate = 0.0  # TransMIL's code has no dropout
  return config
