"""The demo of training from annotated slides: synthetic pyramidal slides with regions drawn as
QuPath exports them (jattn.data.synthetic_slides), written on first use into
~/.cache/jattn/demo_slides, the demo's small model on 32 x 32 tiles of 32 um (1 um per pixel, read
from the slides' second level), three patient-disjoint folds of six slides. Nothing to download;
about a minute on a laptop CPU:

  jattn train --config configs/demo_slides.py --workdir runs/demo_slides/fold1

then the held-out slide, scored per annotated region and written back as QuPath annotations:

  jattn slide --workdir runs/demo_slides/fold1 ~/.cache/jattn/demo_slides/heldout.tif \\
      --regions ~/.cache/jattn/demo_slides/heldout.geojson --annotations --out runs/demo_slides/out
"""

from configs import demo

DEMO_DIR = "~/.cache/jattn/demo_slides"


def get_config():
  config = demo.get_config()  # the demo's model and recipe
  config.name = "demo_slides"
  config.paper_row = ""
  config.data.breakhis.synthetic.enabled = False
  config.data.name = "slides"
  config.data.dir = DEMO_DIR
  config.data.slides.manifest = f"{DEMO_DIR}/slides.csv"
  config.data.slides.synthetic = True  # written there when it does not exist
  config.data.slides.classes = "Stroma,Tumor"
  config.data.slides.group = "patient"
  config.data.slides.positive_class = "Tumor"
  config.data.slides.tile_mpp = 1.0
  config.data.slides.min_region_fraction = 0.9
  config.data.num_folds = 3
  config.tie_rule = ""  # a tied patient vote: the class of higher mean probability
  config.image_size = 32
  config.model.pool_size = 1
  config.num_epochs = 4
  config.lr_decay_every = 3
  config.log_every_steps = 10
  return config
