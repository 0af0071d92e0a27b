"""The demo on the folder source: the synthetic BreakHis of configs/demo.py written as a folder of
images per class with a manifest (patient, magnification, microns per pixel), the demo's small
model and recipe. Nothing to download; a minute on a laptop CPU:

  jattn data synthesize --format folder --out ~/.cache/jattn/demo_folder \\
      --images-per-patient 4 --width 175 --height 115
  jattn train --config configs/demo_folder.py --workdir runs/demo_folder/fold1

The folds are 5 stratified patient folds drawn by scikit-learn (seed 0), written to
~/.cache/jattn/prepared/manifest-manifest-<hash>/folds/; with
`--config.data.folds=~/.cache/jattn/demo_folder/folds.csv` it uses the synthetic tree's
BreakHis-style folds instead.
"""

from configs import demo

DEMO_DIR = "~/.cache/jattn/demo_folder"


def get_config():
  config = demo.get_config()  # the demo's model, recipe and image size
  config.name = "demo_folder"
  config.paper_row = ""
  config.data.breakhis.synthetic.enabled = False  # it reads what `synthesize --format folder` wrote
  config.data.name = "folder"
  config.data.dir = DEMO_DIR
  config.data.folder.manifest = f"{DEMO_DIR}/manifest.csv"
  config.data.folder.classes = "benign,malignant"  # checked against the manifest's labels
  config.data.folder.group = "patient"
  config.data.folder.strata = "magnification"
  config.data.folder.positive_class = "malignant"
  return config
