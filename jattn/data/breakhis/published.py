"""Figures published on BreakHis that jattn's tables place beside a sweep's own.

Wu et al., ISBI 2019, Tables 1 and 2: image- and patient-level accuracy (%), mean ± std over 5
folds, per magnification, for the rows "VGG19", "VGG19 + C", "VGG19 + S" and "Ours". They are
comparable only with runs of the paper's setting (`jattn.evaluation.tables` decides which).
"""

from __future__ import annotations

import fractions

from jattn import models
from jattn.data.breakhis import naming

PAPER = "Wu et al., ISBI 2019"
# Table 1: image-level accuracy (%).
TABLE1: dict[str, dict[str, tuple[float, float]]] = {
    "VGG19": {"40X": (89.1, 3.4), "100X": (90.3, 3.9), "200X": (90.6, 2.8), "400X": (87.4, 2.4)},
    "VGG19 + C": {"40X": (91.1, 2.6), "100X": (91.5, 3.5), "200X": (92.0, 2.2),
                  "400X": (88.6, 2.3)},
    "VGG19 + S": {"40X": (89.9, 3.0), "100X": (91.7, 2.5), "200X": (92.2, 1.9),
                  "400X": (89.2, 2.5)},
    "Ours": {"40X": (91.4, 3.0), "100X": (92.2, 2.9), "200X": (93.4, 2.3), "400X": (90.0, 2.2)},
}
# Table 2: patient-level accuracy (%), majority vote, same rows.
TABLE2: dict[str, dict[str, tuple[float, float]]] = {
    "VGG19": {"40X": (95.7, 3.9), "100X": (96.4, 3.6), "200X": (96.4, 2.5), "400X": (92.9, 3.6)},
    "VGG19 + C": {"40X": (97.1, 3.0), "100X": (98.6, 2.0), "200X": (98.6, 2.0),
                  "400X": (95.7, 3.0)},
    "VGG19 + S": {"40X": (97.9, 3.2), "100X": (98.6, 2.0), "200X": (97.9, 3.2),
                  "400X": (94.3, 4.8)},
    "Ours": {"40X": (97.9, 3.2), "100X": (99.3, 1.6), "200X": (98.6, 2.0), "400X": (96.4, 2.5)},
}
# results.json key -> the published table holding it
FIGURES = {"image_accuracy": TABLE1, "group_accuracy": TABLE2}
# How the markdown tables introduce these figures.
DESCRIPTION = "the figures published by Wu et al., ISBI 2019 (Tables 1 and 2)"
# The published row every other row is compared with by default (jattn.evaluation.compare): the
# plain VGG19 of the paper's ablation, which each attention module is claimed to improve on.
BASELINE = "VGG19"

# The paper's setting (section 3; configs/default.py holds the same values) for the config fields
# that change what a figure means. A run that differs is labelled, and no paper figure is shown
# beside it. Results without a config (written before it was recorded) count as the paper's.
PAPER_SETTING = {"model.name": "vgg19", "image_size": 224, "num_epochs": 130, "model.width": 1.0,
                 "model.classifier_width": 4096}


def setting(results: dict) -> str:
  """'' for the paper's setting (binary task, all four magnifications, ImageNet weights, 224x224,
  130 epochs, VGG19 at its widths), else what differs, e.g. '100X', 'from scratch, 64x64, 6
  epochs' or 'resnet50' (another backbone: never beside the paper's VGG19 figures).
  `results` is in schema 2 (`jattn.evaluation.results.read`)."""
  config = results.get("config") if isinstance(results.get("config"), dict) else {}
  model = config.get("model") if isinstance(config.get("model"), dict) else {}
  task = "subtype" if results.get("class_kind") == "subtype" else "binary"
  strata = results.get("strata", {}).get("magnification", {})
  selected = strata.get("selected", list(naming.MAGNIFICATIONS))
  parts = ([task] if task != "binary" else []) + (
      [",".join(selected)] if list(selected) != list(naming.MAGNIFICATIONS) else [])
  scratch = config.get("pretrained", "given") == "" and not model.get("weights")
  differs = ["from scratch"] if scratch else []
  if model.get("freeze"):  # a frozen backbone (its head and attention modules trained)
    k = model.get("train_last_blocks", 0)
    differs.append((f"frozen but the last {k} blocks" if k > 1 else "frozen but the last block")
                   if k else "frozen")
  value = {"model.name": model.get("name"), "image_size": config.get("image_size"),
           "num_epochs": config.get("num_epochs"), "model.width": model.get("width"),
           "model.classifier_width": model.get("classifier_width")}
  if value["model.name"] in models.BACKBONES:  # a field the backbone ignores says nothing
    for field in models.get(value["model.name"]).ignored_fields(model):
      value.pop(f"model.{field}", None)
  shown = {"model.name": lambda v: v, "image_size": lambda v: f"{v}x{v}",
           "num_epochs": lambda v: f"{v} epoch{'' if v == 1 else 's'}",
           "model.width": lambda v: f"width {fractions.Fraction(v).limit_denominator(1000)}",
           "model.classifier_width": lambda v: f"classifier {v}"}
  differs += [shown[key](value[key]) for key, paper in PAPER_SETTING.items()
              if value.get(key) is not None and value[key] != paper]
  if value["model.name"] not in (None, PAPER_SETTING["model.name"]):  # the backbone first
    differs.insert(0, differs.pop(differs.index(value["model.name"])))
  return ", ".join(([" ".join(parts)] if parts else []) + differs)
