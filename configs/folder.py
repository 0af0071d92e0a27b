"""The paper's model ("Ours": VGG19, C-Attn after blocks 1-2, S-Attn after 3-5, its recipe) on a
folder of labelled patches of your own: one folder per class (torchvision's ImageFolder), or a
manifest CSV that also gives each image's patient (or slide) and strata.

  python -m jattn.main --config configs/folder.py --config.data.dir=PATCHES \\
      --config.model.num_classes=9 --workdir runs/folder/fold1

  python -m jattn.main --config configs/folder.py \\
      --config.data.folder.manifest=PATCHES/manifest.csv --config.data.folder.group=patient \\
      --config.data.folder.strata=centre --config.model.num_classes=2 \\
      --config.data.folder.positive_class=tumour --workdir runs/folder/fold1

PATCHES/<class>/**/*.png (.jpg, .jpeg, .tif, .tiff), or a manifest of path,label[,patient,centre,
mpp] rows with paths relative to it. `model.num_classes` must equal the number of classes (the class
folders or labels, sorted by name, or --config.data.folder.classes); `positive_class` (two classes)
is the one sensitivity, specificity and ROC are of. A patient's tied vote goes to the tied class of
higher mean probability (`--config.tie_rule=CLASS` sends ties to CLASS). Folds: 5 stratified group
folds drawn from `folds_seed` (--config.data.num_folds), or --config.data.folds=FOLDS.csv
(fold,split,path). Needs ImageNet weights converted into pretrained/vgg19 (README); 130 epochs at
224x224, batch 8, as the paper.
"""

from configs import ours


def get_config():
  config = ours.get_config()
  config.name = "folder"
  config.paper_row = ""  # not a row of the paper: its model on other data
  config.data.name = "folder"
  config.data.dir = "patches"
  config.tie_rule = ""  # a tied vote: the class of higher mean probability (no class is 'benign')
  return config
