"""Tiny training runs for the tests (configs/demo.py shrunk to seconds on a synthetic tree), and
BreakHis-like fold descriptions made by hand."""

from __future__ import annotations

import os

import numpy as np

from jattn.data.breakhis import SUBTYPE_CODES, TASKS, source
from jattn.data.fold import FoldData, Labelling
from jattn.training import compat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo.py")


def tiny_overrides(data_dir: str, prepared_dir: str, **kw) -> list[str]:
  """`field=value` overrides of the demo config: 32x32 images, 8-32 channels, 2 epochs (`kw` may
  name a data field as configs before `config.data` did: `data_dir`, `manifest`)."""
  values = {"data.dir": data_dir, "data.prepared_dir": prepared_dir, "image_size": 32,
            "num_epochs": 2, "batch_size": 16, "eval_batch_size": 48, "log_every_steps": 4,
            "data.breakhis.synthetic.enabled": False, "model.classifier_width": 16,
            "model.pool_size": 1}
  values.update(kw)
  return [f"{k}={v}" for k, v in values.items()]


def tiny_config(data_dir: str, prepared_dir: str, spec: str = DEMO, **kw):
  return compat.load_config(spec, tiny_overrides(data_dir, prepared_dir, **kw))


def breakhis_fold(labels, patients, magnifications, subtypes, task="binary",
                  patient_ids=None, selected=None) -> FoldData:
  """A FoldData as the BreakHis source describes its images (no images needed)."""
  n = len(labels)
  subtypes = np.asarray(subtypes, np.int32)
  return FoldData(
      source="breakhis", images=np.zeros((n, 1, 1, 3), np.uint8),
      file_names=tuple(f"{i}.png" for i in range(n)),
      targets=subtypes if task == "subtype" else np.asarray(labels, np.int32),
      classes=TASKS[task], groups=np.asarray(patients, np.int32),
      group_ids=patient_ids or tuple(str(p) for p in range(max(patients) + 1)),
      strata=(source.magnification_strata(magnifications),),
      train_indices=np.zeros(0, np.int64), test_indices=np.arange(n, dtype=np.int64),
      mean=np.zeros(3, np.float32), std=np.ones(3, np.float32), fold=1, folds_source="by hand",
      group_unit="patient", class_kind="subtype" if task == "subtype" else "class",
      binary=source.binary_map(task), subclasses=Labelling("subtype", SUBTYPE_CODES, subtypes),
      selected=(tuple(selected),) if selected is not None else ())
