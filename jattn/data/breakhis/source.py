"""BreakHis as a jattn data source: one fold of the tree in `config.data.dir` as a `FoldData`.

The images' group is the patient (folds keep patients apart, the bootstrap resamples them), their
stratum the magnification (each reported separately, the paper's columns), their subclass the
subtype; the task (`config.data.breakhis.task`) is benign vs malignant (the paper) or the 8
subtypes, which map onto benign and malignant for P(malignant).
"""

from __future__ import annotations

import logging
import os

import numpy as np

from jattn.core import files
from jattn.core.errors import UserError
from jattn.data import prepare
from jattn.data.breakhis import fetch, naming, tfds_builder
from jattn.data.breakhis import folds as folds_lib
from jattn.data.breakhis import (
  published as published,  # its published figures (jattn.evaluation.tables)
)
from jattn.data.breakhis import scan as scan_lib
from jattn.data.breakhis import synthetic as synthetic_lib
from jattn.data.fold import ClassMap, FoldData, Labelling, Outputs, Strata

log = logging.getLogger(__name__)

NAME = "breakhis"
STRATA = {"magnification": naming.MAGNIFICATIONS}  # the strata axes it reports, with their values
GROUP_UNIT = "patient"
# Microns per pixel at each magnification, estimated from the published optics (Spanhol et al.,
# 2016: objectives 4x, 10x, 20x and 40x behind a 3.3x relay lens, a camera of 6.5 um pixels):
# 6.5 / (3.3 x objective). BreakHis publishes no calibration, so these are estimates.
OBJECTIVES = (4, 10, 20, 40)
MPP = tuple(round(6.5 / (3.3 * objective), 4) for objective in OBJECTIVES)
# (width, height) in pixels of the images as published (a handful differ slightly): with a
# magnification's MPP, the physical field of a training image, which slide tiles cover.
FIELD_PIXELS = (700, 460)
# This source's group of config fields, config.data.breakhis, with their defaults.
DEFAULTS = {
    "download": False,  # True: download and unpack BreakHis into data.dir if it holds none
    "magnifications": naming.MAGNIFICATIONS,  # train and test on these (e.g. 100X)
    "task": "binary",  # 'binary' (benign/malignant) or 'subtype' (8 classes; model.num_classes=8)
    # A synthetic BreakHis-format tree generated into data.dir when it holds no BreaKHis_v1 (the
    # demo): only into the demo's ~/.cache/jattn/demo or a new or empty folder, never beside other
    # files.
    "synthetic": {
        "enabled": False,  # generate only when enabled; never over real data
        "images_per_patient": 4,  # per magnification
        "width": 700,  # PNG size, like BreakHis' 700 x 460
        "height": 460,
        "seed": 0,
    },
}
# Fields of this group added after runs were first written, with the value that reproduces what an
# older run computed (jattn.training.compat).
LATER_FIELDS = {"data.breakhis.magnifications": list(naming.MAGNIFICATIONS),
                "data.breakhis.task": "binary"}
MPP_NOTE = ("estimated from the published optics (objectives 4x-40x behind a 3.3x relay lens, "
            "6.5 um camera pixels): 6.5 / (3.3 x objective); not a calibration")


def selection(config) -> tuple[tuple[str, ...], str]:
  """The magnifications and the task a config selects, checked: (magnifications, task)."""
  task = config.data.breakhis.task
  if task not in naming.TASKS:
    raise UserError(f"--config.data.breakhis.task={task!r} is not a task: use 'binary' (benign vs "
                    "malignant, the "
                    f"paper) or 'subtype' (the 8 BreakHis subtypes)")
  chosen = config.data.breakhis.magnifications
  chosen = (chosen,) if isinstance(chosen, str) else tuple(chosen)
  unknown = [m for m in chosen if m not in naming.MAGNIFICATIONS]
  if unknown or not chosen:
    raise UserError(f"--config.data.breakhis.magnifications={','.join(map(str, chosen))}: "
                    f"{'unknown magnification ' + repr(unknown[0]) if unknown else 'empty'}; "
                    f"use some of {','.join(naming.MAGNIFICATIONS)} (e.g. "
                    f"--config.data.breakhis.magnifications=100X)")
  return tuple(m for m in naming.MAGNIFICATIONS if m in chosen), task


def outputs(config) -> Outputs:
  """The model's classes for the config's task, their benign/malignant map, the patient unit."""
  task = selection(config)[1]
  return Outputs(naming.TASKS[task], "subtype" if task == "subtype" else "class",
                 binary_map(task), GROUP_UNIT, ("magnification",),
                 f"--config.data.breakhis.task={task}")


def num_folds(config) -> int:
  del config
  return len(folds_lib.FOLDS)


def check_config(config) -> None:
  """The fields this source reads: its task and magnifications."""
  selection(config)


def binary_map(task: str) -> ClassMap:
  """The task's classes onto benign/malignant, malignant the positive one."""
  if task == "binary":
    of = tuple(range(len(naming.CLASSES)))
  else:
    of = tuple(naming.CLASSES.index(naming.SUBTYPES[code][1]) for code in naming.SUBTYPE_CODES)
  return ClassMap(naming.CLASSES, of, naming.CLASSES.index("malignant"))


def magnification_strata(index: np.ndarray) -> Strata:
  return Strata("magnification", naming.MAGNIFICATIONS, np.asarray(index, np.int32), MPP,
                MPP_NOTE)


def describe_file(path: str) -> dict | None:
  """The group and strata a BreakHis file name gives (for `predict`), or None for other names."""
  try:
    parsed = naming.parse_file_name(os.path.basename(path))
  except ValueError:
    return None
  return {"group": parsed.patient_id, "strata": {"magnification": parsed.magnification}}


def check_data_dir(config) -> None:
  """A quick look that data_dir holds BreakHis or its archive, before minutes of other work
  (`load_fold` looks again, and fetches or generates the data instead when the config says so)."""
  if config.data.breakhis.download or config.data.breakhis.synthetic.enabled:
    return
  path = os.path.abspath(os.path.expanduser(config.data.dir))
  scan_lib.check_data_dir(scan_lib.resolve_data_dir(path))


def _check_selection(records, magnifications, data_dir) -> None:
  """A magnification list that selects no image of the data set is an error."""
  if not any(r.magnification in magnifications for r in records):
    have = sorted({r.magnification for r in records}, key=naming.MAGNIFICATIONS.index)
    raise UserError(f"--config.data.breakhis.magnifications={','.join(magnifications)} selects no "
                    "images of "
                    f"{data_dir} (it has images at {', '.join(have) or 'no magnification'}); "
                    f"choose among those")


def load_fold(config) -> FoldData:
  """Prepares (once) and loads fold `config.fold` of the data in `config.data.dir`.

  Stages, each only when its output is missing: with `config.data.breakhis.download`, BreakHis
  downloaded into data_dir (under the data dir's lock); then, under the prepared dir's lock, a
  synthetic tree (if `config.data.breakhis.synthetic.enabled` and data_dir holds no BreaKHis_v1),
  unpacking BreaKHis_v1.tar.gz, the TFDS data set, the decoded-image cache at `config.image_size`,
  the folds (`config.data.folds`), and the fold's normalisation stats. A later call only checks and
  maps.
  """
  return _load(config, every_image=False)


def load_all(config) -> FoldData:
  """Every image of the selected magnifications in `config.data.dir`, all of them test images
  (external validation, `jattn.data.sources`): prepared as for `load_fold`, but no folds are read
  or generated and no statistics computed (`mean` and `std` are NaN: a run brings its own)."""
  return _load(config, every_image=True)


def _load(config, every_image: bool) -> FoldData:
  magnifications, task = selection(config)
  data_dir = scan_lib.resolve_data_dir(os.path.abspath(os.path.expanduser(config.data.dir)))
  prepared_dir = os.path.abspath(
      os.path.expanduser(config.data.prepared_dir or prepare.default_prepared_dir(data_dir))
  )
  threads = max(1, int(config.loader_threads))
  if config.data.breakhis.download:  # before anything else looks at (or writes into) data_dir
    fetch.ensure_breakhis(data_dir)
  synthetic = config.data.breakhis.synthetic.enabled and not (
      scan_lib.has_images_tree(data_dir) or scan_lib.has_archive(data_dir)
  )
  if synthetic:  # before creating anything in a wrong folder

    synthetic_lib.check_target(data_dir, prepared_dir)
  else:
    scan_lib.check_data_dir(data_dir)

  def memory_needed() -> str:
    fresh = scan_lib.scan(data_dir)
    need = tfds_builder.memory_needed(fresh, config.image_size, threads)
    return (f"preparing {len(fresh.records):,} images ({prepare.size_text(sum(fresh.sizes))} of "
            f"PNGs) at {config.image_size}x{config.image_size} with {threads} thread(s) needs "
            f"about {prepare.size_text(need)} of memory besides the process itself")

  with (
      prepare.reporting_worker_deaths(data_dir, prepared_dir, memory_needed),
      files.locked(prepared_dir),
  ):
    prepare.remove_stale(prepared_dir)
    if synthetic and not scan_lib.has_images_tree(data_dir):
      log.warning("data_dir %s holds no BreakHis: generating a synthetic tree there", data_dir)
      synthetic_lib.synthesize(
          data_dir,
          images_per_patient=config.data.breakhis.synthetic.images_per_patient,
          width=config.data.breakhis.synthetic.width,
          height=config.data.breakhis.synthetic.height,
          seed=config.data.breakhis.synthetic.seed,
          progress=True,
      )
    scan_lib.extract_archive(data_dir)
    fresh = scan_lib.scan(data_dir)
    if not prepare.has_cache(prepared_dir, config.image_size):  # before TFDS writes anything
      prepare.check_cache_space(prepared_dir, len(fresh.records), config.image_size)
    for problem in fresh.problems:
      log.warning("%s", problem)
    builder = tfds_builder.prepare_tfds(
        data_dir, prepared_dir, fresh=fresh, skip_corrupt=config.data.skip_corrupt, threads=threads
    )
    skipped = tuple(builder.info.metadata["skipped"])
    if skipped:
      log.warning("left out %d unreadable image(s): %s", len(skipped), ", ".join(skipped))
    cache = tfds_builder.build_cache(builder, prepared_dir, config.image_size, threads=threads)
    records = [r for r in fresh.records if r.path not in frozenset(skipped)]
    _check_selection(records, magnifications, data_dir)
    table = cache.table
    if every_image:
      train_indices = np.zeros(0, np.int64)
      test_indices = np.flatnonzero(np.isin(table["magnifications"], magnifications))
      mean = std = np.full(3, np.nan, np.float32)
      folds_source = f"every image of {data_dir} (no folds)"
    else:
      train_indices, test_indices, mean, std, folds_source = _fold_split(
          config, records, skipped, magnifications, task, table, cache, data_dir, prepared_dir)
  info = outputs(config)
  patient_ids = tuple(sorted(set(table["patient_ids"])))
  patient_index = {p: i for i, p in enumerate(patient_ids)}
  subtypes = np.asarray([naming.SUBTYPE_CODES.index(s) for s in table["subtypes"]], np.int32)
  labels = np.asarray(table["labels"], np.int32)
  return FoldData(
      source=NAME,
      images=cache.images,
      file_names=cache.file_names,
      targets=subtypes if task == "subtype" else labels,
      classes=info.classes,
      groups=np.asarray([patient_index[p] for p in table["patient_ids"]], np.int32),
      group_ids=patient_ids,
      strata=(magnification_strata(
          [naming.MAGNIFICATIONS.index(m) for m in table["magnifications"]]),),
      train_indices=train_indices,
      test_indices=test_indices.astype(np.int64),
      mean=mean,
      std=std,
      fold=0 if every_image else config.fold,
      folds_source=folds_source,
      group_unit=info.group_unit,
      class_kind=info.class_kind,
      binary=info.binary,
      subclasses=Labelling("subtype", naming.SUBTYPE_CODES, subtypes),
      selected=(magnifications,),
      skipped=skipped,
      problems=fresh.problems,
  )


def _fold_split(config, records, skipped, magnifications, task, table, cache, data_dir,
                prepared_dir):
  """(train indices, test indices, mean, std, folds source) of fold `config.fold` (under the
  prepared dir's lock): its folds resolved (and generated, once) and checked, its stats."""
  folds = folds_lib.resolve_folds(
      config.data.folds,
      records=records,
      data_dir=data_dir,
      prepared_dir=prepared_dir,
      seed=config.data.folds_seed,
  )
  for warning in folds_lib.validate_folds(
      folds, records, fold=config.fold, skipped=skipped, magnifications=magnifications,
      task=task,
  ):
    log.warning("%s", warning)
  split = folds.splits[config.fold]
  sides = np.array([
      split.get(name, "") if mag in magnifications else ""
      for name, mag in zip(table["file_names"], table["magnifications"], strict=True)
  ])
  train_indices = np.flatnonzero(sides == "train").astype(np.int64)
  test_indices = np.flatnonzero(sides == "test").astype(np.int64)
  train_names = [table["file_names"][i] for i in train_indices]
  stats_file = prepare.stats_path(
      prepared_dir,
      prepare.folds_id(folds.source, train_names),
      config.fold,
      config.image_size,
  )
  mean, std = prepare.fold_stats(stats_file, cache.images, train_indices)
  return train_indices, test_indices, mean, std, folds.source


# Schema 1 results (written before data sources existed; all BreakHis) -> schema 2 keys.
_V1_KEYS = {"patient_accuracy": "group_accuracy",
            "patient_recognition_rate": "group_recognition_rate", "num_patients": "num_groups",
            "patient_confusion_matrix": "group_confusion_matrix",
            "subtype_accuracy": "subclass_accuracy", "patient_per_class": "group_per_class"}


def upgrade_v1(r: dict) -> dict:
  """A schema 1 results dict in schema 2's form (`jattn.evaluation.results.read`); the figures
  unchanged."""
  out = {}
  for key, value in r.items():
    if key in _V1_KEYS:
      out[_V1_KEYS[key]] = value
    elif key == "majority_baseline":
      out[key] = {m: {"group" if k == "patient" else k: v for k, v in b.items()}
                  for m, b in value.items()}
    elif key == "multiclass":
      out[key] = {m: {"group" if k == "patient" else k: v for k, v in b.items()}
                  for m, b in value.items()}
    elif key == "patients":
      out["per_group"] = {m: [{"group" if k == "patient_id" else k: v for k, v in row.items()}
                              for row in rows] for m, rows in value.items()}
    elif key == "clinical":
      out[key] = {"group" if k == "patient" else k: v for k, v in value.items()}
    elif key not in ("magnifications", "task"):
      out[key] = value
  task = r.get("task", "binary")
  selected = r.get("magnifications", {}).get("selected", list(naming.MAGNIFICATIONS))
  out.update(
      source=NAME, classes=list(naming.TASKS[task]),
      class_kind="subtype" if task == "subtype" else "class",
      binary=binary_map(task).to_json(naming.TASKS[task]), group_unit=GROUP_UNIT,
      subclasses={"name": "subtype", "values": list(naming.SUBTYPE_CODES)},
      group_figures={"reported": True},
      strata={"magnification": {"values": list(naming.MAGNIFICATIONS), "selected": selected,
                                "absent": r.get("magnifications", {}).get("absent", []),
                                "mpp": dict(zip(naming.MAGNIFICATIONS, MPP, strict=True)),
                                "mpp_note": MPP_NOTE}},
      upgraded_from=r["schema"], schema="jattn.results/2")
  return out
