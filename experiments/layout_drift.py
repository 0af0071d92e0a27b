"""How far two layouts of the same run drift apart: the README's Reproducibility figures.

  python experiments/layout_drift.py            # about 1 minute on 2 CPU cores

Trains the tests' tiny demo run (`tests/runs.py`: 2 epochs at learning rate 1e-3 on the tests'
synthetic tree of 82 patients) three times in one process that sees 4 CPU devices: on 1 device,
sharded over 4, and as fold 1 of 2 folds in one program; prints how far the training losses and
the test images' P(malignant) of the last two are from the first.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"  # before JAX starts
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from anywhere: find jattn

from jattn.data import synthesize  # noqa: E402
from jattn.training import train  # noqa: E402
from tests.runs import tiny_config  # noqa: E402

LAYOUTS = {"1 device": dict(num_devices=1), "4 devices": dict(num_devices=4),
           "2 folds in one program": dict(parallel_folds=2, num_devices=1)}


def main() -> None:
  out = tempfile.mkdtemp(prefix="jattn-layout-drift-")
  data_dir = os.path.join(out, "data")
  synthesize(data_dir, images_per_patient=1, width=64, height=42, seed=0)  # the tests' tree
  losses, probs = {}, {}
  for name, layout in LAYOUTS.items():
    workdir = os.path.join(out, name.replace(" ", "_"), "fold{fold}")
    config = tiny_config(data_dir, os.path.join(out, "prepared"), log_every_steps=1, **layout)
    train.train_and_evaluate(config, workdir)
    fold1 = workdir.replace("{fold}", "1")
    with open(os.path.join(fold1, "metrics.jsonl")) as f:
      losses[name] = [json.loads(line)["loss"] for line in f]
    with open(os.path.join(fold1, "predictions.csv")) as f:
      probs[name] = {r["file_name"]: float(r["prob_malignant"]) for r in csv.DictReader(f)}
  base = next(iter(LAYOUTS))
  for name in list(LAYOUTS)[1:]:
    diff = [abs(a - b) for a, b in zip(losses[name], losses[base], strict=True)]
    worst = max(abs(probs[name][k] - probs[base][k]) for k in probs[base])
    print(f"{name} against {base}: |training loss difference| at steps 1-5 "
          f"{', '.join(f'{d:.1e}' for d in diff[:5])}, largest {max(diff):.1e} (of "
          f"{len(diff)} steps); largest |P(malignant) difference| of a test image {worst:.3f}")


if __name__ == "__main__":
  main()
