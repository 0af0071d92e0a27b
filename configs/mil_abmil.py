"""ABMIL (Ilse et al. 2018, gated attention) on bags of tile features: a CSV of
slide,label[,patient] rows and one HDF5 features file per slide (`jattn features`, or CLAM's or
TRIDENT's), five patient-disjoint folds (docs/mil.md):

  jattn train --config configs/mil_abmil.py --config.data.bags.manifest=slides.csv \\
      --config.data.bags.features_dir=features --workdir runs/mil_abmil/fold1

The recipe is CLAM's (Adam, learning rate 2e-4, weight decay 1e-5, one bag per step, dropout
0.25, no learning-rate decay); the widths are CLAM's (512 embedding, 256 attention).
"""

import ml_collections

from configs import default

MIL = {"hidden": 512, "attention_dim": 256, "heads": 8, "instance_weight": 0.3,
       "instance_k": 8, "subtyping": False}  # jattn.models.mil.DEFAULTS


def get_config(model: str = "abmil"):
  config = default.get_config()
  config.name = f"mil_{model}"
  config.paper_row = ""
  config.data.breakhis.synthetic.enabled = False
  config.data.name = "bags"
  config.pretrained = ""  # trained from scratch on the features
  config.model.name = model
  config.model.dropout_rate = 0.25
  config.model.mil = ml_collections.ConfigDict(MIL)
  config.batch_size = 1
  config.learning_rate = 2e-4
  config.weight_decay = 1e-5
  config.num_epochs = 20
  config.lr_decay_every = 1000  # no decay within the run
  config.tie_rule = ""  # a tied patient vote: the class of higher mean probability
  config.bootstrap_resamples = 1000
  return config
