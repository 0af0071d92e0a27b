"""CLAM-SB (Lu et al. 2021): ABMIL's gated attention plus its instance-level clustering loss,
weighted config.model.mil.instance_weight = 0.3 against the slide loss's 0.7, on the B = 8 most
and least attended tiles (docs/mil.md):

  jattn train --config configs/mil_clam.py --config.data.bags.manifest=slides.csv \\
      --config.data.bags.features_dir=features --workdir runs/mil_clam/fold1
"""

from configs import mil_abmil


def get_config():
  return mil_abmil.get_config("clam_sb")
