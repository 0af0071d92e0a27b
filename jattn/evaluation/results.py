"""results.json and predictions.csv of a finished run: the schema, its assembly and its reading.

Schema `jattn.results/2` (this module is its one home): the evaluator's figures
(`jattn.evaluation.evaluate.evaluate`: per-stratum maps, `clinical`, `per_class`, `group_figures`,
`strata`) and what they are figures of: `source`, `classes`, `class_kind`, `binary` (the classes'
coarse labels and the positive one), `group_unit`, `subclasses`, the run's `layout`,
`normalization`, `stain_normalization`, `data`, `config`, `versions`, `train`. Runs written under
schema 1 (BreakHis only, with patient-named keys) are read as schema 2 (`read`), so old runs and
sweeps keep printing and tabulating.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

import jattn
from jattn import models
from jattn.core import files
from jattn.core.errors import UserError
from jattn.data import sources
from jattn.data.fold import FoldData

SCHEMA = "jattn.results/2"
V1 = "jattn.results/1"
SCHEMAS = (V1, SCHEMA)
REQUIRED = ("schema", "name", "paper_row", "fold", "finished")


def build(config: ml_collections.ConfigDict, fold_data: FoldData, figures: dict, *,
          stain_normalization: dict | None = None) -> dict:
  """A finished fold's results: the evaluator's `figures` with what they are figures of (and the
  run's stain reference, `jattn.data.stain.describe`'s record, when it normalises stains)."""
  d = fold_data
  return {
      "schema": SCHEMA, "name": config.name, "paper_row": config.paper_row,
      "fold": config.fold, "finished": True, "tie_rule": config.tie_rule, "tta": config.tta,
      "source": d.source, "classes": list(d.classes), "class_kind": d.class_kind,
      "binary": d.binary.to_json(d.classes) if d.binary is not None else None,
      "group_unit": d.group_unit,
      "subclasses": ({"name": d.subclasses.name, "values": list(d.subclasses.values)}
                     if d.subclasses is not None else None),
      **figures,
      "normalization": {"mean": [float(x) for x in d.mean],
                        "std": [float(x) for x in d.std],
                        "computed_on": f"the {len(d.train_indices)} training images of "
                                       f"fold {config.fold}, at {config.image_size}x"
                                       f"{config.image_size}, 0-255 scale"},
      "stain_normalization": stain_normalization,
      "data": {"data_dir": config.data.dir, "folds": d.folds_source,
               "num_train_images": len(d.train_indices),
               "num_test_images": len(d.test_indices),
               "skipped_files": list(d.skipped)},
      "config": json.loads(config.to_json()),
      **({"backbone": record} if (record := models.weights_record(config.model)) else {}),
      "versions": {"jattn": jattn.__version__, "jax": jax.__version__,
                   "devices": [str(x) for x in jax.devices()]},
  }


def prediction_rows(fold_data: FoldData, index: np.ndarray, probs: np.ndarray) -> list[dict]:
  """predictions.csv: one row per image `index` with its strata, group, label, the probability of
  the positive label and the prediction (with a coarse label: the coarse ones, and the class
  itself beside them when the classes are finer); without one, every class' probability."""
  d = fold_data
  predicted = np.argmax(probs, axis=-1)
  rows = []
  for i, k, p in zip(index, predicted, probs, strict=True):
    row = {"file_name": d.file_names[i]}
    row.update({s.name: s.values[s.index[i]] for s in d.strata})
    row[f"{d.group_unit}_id"] = d.group_ids[d.groups[i]]
    if d.binary is not None:
      coarse = d.binary.names
      row["label"] = coarse[d.binary.of[d.targets[i]]]
      row[f"prob_{d.binary.positive_name}"] = f"{d.binary.positive_probability(p):.6f}"
      row["prediction"] = coarse[d.binary.of[k]]
      if tuple(d.classes) != tuple(coarse):
        row[d.class_kind] = d.classes[d.targets[i]]
        row[f"predicted_{d.class_kind}"] = d.classes[k]
    else:
      row["label"] = d.classes[d.targets[i]]
      row["prediction"] = d.classes[k]
      row.update({f"prob_{c}": f"{p[j]:.6f}" for j, c in enumerate(d.classes)})
    rows.append(row)
  return rows


def csv_text(rows: Sequence[dict]) -> str:
  text = io.StringIO()
  writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else ["file_name"])
  writer.writeheader()
  writer.writerows(rows)
  return text.getvalue()


def write_json(path: str, obj) -> None:
  files.atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read(path: str, remedy: str = "delete it to rerun that run") -> dict:
  """A run's results.json as schema 2, whichever schema it was written in; a file that is not a
  jattn run's results is one UserError naming it."""
  r = files.read_json(path, remedy)
  if not isinstance(r, dict):
    raise UserError(f"{path}: expected a JSON object; {remedy}")
  missing = [k for k in REQUIRED if k not in r]
  if missing:
    raise UserError(f"{path}: missing key {missing[0]!r}; not a finished jattn run's results, "
                    f"{remedy}")
  if r["schema"] not in SCHEMAS:
    raise UserError(f"{path}: schema {r['schema']!r}, expected one of {', '.join(SCHEMAS)}")
  return upgrade(r) if r["schema"] == V1 else r


def upgrade(r: dict) -> dict:
  """Schema 1 results (BreakHis', the only source then) in schema 2's form."""
  return sources.get(r.get("source", "breakhis")).upgrade_v1(r)
