"""Tiny training runs for the tests: configs/demo.py shrunk to seconds on a synthetic tree."""

from __future__ import annotations

import os

from jattn import config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo.py")


def tiny_overrides(data_dir: str, prepared_dir: str, **kw) -> list[str]:
  """`field=value` overrides of the demo config: 32x32 images, 8-32 channels, 2 epochs."""
  values = {"data_dir": data_dir, "prepared_dir": prepared_dir, "image_size": 32,
            "num_epochs": 2, "batch_size": 16, "eval_batch_size": 48, "log_every_steps": 4,
            "synthetic.enabled": False, "model.classifier_width": 16, "model.pool_size": 1}
  values.update(kw)
  return [f"{k}={v}" for k, v in values.items()]


def tiny_config(data_dir: str, prepared_dir: str, spec: str = DEMO, **kw):
  config = config_lib.load_config(spec)
  return config_lib.apply_overrides(config, tiny_overrides(data_dir, prepared_dir, **kw))
