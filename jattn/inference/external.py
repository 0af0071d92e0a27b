"""External validation: a finished run scored on every image of another labelled set.

  jattn validate-external --workdir RUN --config.data.dir=OTHER [--config.data.name=SOURCE]
      [--config.FIELD=VALUE ...] [--out DIR] [--name NAME] [--batch-size 32]

The other set's images come from its data source's fold-free mode (`load_all`, see
`jattn.data.sources`), prepared at the run's `image_size`; the run's own preprocessing is
applied to them (its checkpointed normalisation statistics and stain reference, never the other
set's) with its `tta` (or `--config.tta`). The figures are the evaluator's (`evaluate.evaluate`,
with the run's tie rule and bootstrap settings) over all of the set's images, written as a run's
own test evaluation is: results.json (schema 2, plus `external`), predictions.csv and roc.png
(two classes), into a folder of their own, `RUN/external/<name>` (`<name>`: the other data dir's
folder name, or `--name`; `--out` chooses the folder), which appears whole or not at all and is
replaced whole by a later evaluation of the same name.

The evaluation config is the run's config.json with the overrides applied: the fields of the other
set (`data_dir`, `dataset`, the source's own fields) are given as for training; fields that change
what the model sees or is (`image_size`, `stain_norm`, `model.*`) are the run's and cannot be
overridden. `prepared_dir` is reset (the other set is prepared beside it, or in
`--config.data.prepared_dir`). Classes are matched by name, in any order; sets whose classes differ
are refused in one line naming both lists.

`score` is the shared path from probabilities to those files: `predict --manifest` and slide
inference call it on a `FoldData` they build themselves.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import ml_collections
import numpy as np

from jattn import data
from jattn.core import config_lib, errors, files
from jattn.core.errors import UserError
from jattn.data import sources
from jattn.data.fold import FoldData
from jattn.evaluation import evaluate, results
from jattn.inference import runs
from jattn.training import compat

FIXED_FIELDS = ("image_size", "stain_norm", "model")  # what the run's model sees and is
CHUNK = 2048  # images read from the memory-mapped cache at a time


STAIN_FLAGS = ("--stain-norm", "--stain_norm")  # what a user may try at scoring time


def stain_norm_asked(argv) -> str | None:
  """The stain normalisation a scoring command's arguments ask for (`--config.stain_norm=V`,
  `--stain-norm V`), or None."""
  overrides, rest = config_lib.split_argv(list(argv))
  for item in overrides:
    if item.partition("=")[0] == "stain_norm":
      return item.partition("=")[2]
  for i, arg in enumerate(rest):
    flag, eq, value = arg.partition("=")
    if flag in STAIN_FLAGS:
      return value if eq else (rest[i + 1] if i + 1 < len(rest) else "")
  return None


def stain_norm_refusal(asked: str, workdir: str | None) -> str:
  """The one line refusing a stain normalisation asked for at scoring time: the run applies the
  one it was trained with, so another needs another run."""
  try:
    trained = runs.load_config(workdir).get("stain_norm", "none") if workdir else None
  except UserError:
    trained = None
  was = f"stain_norm={trained}" if trained else "its own stain_norm"
  if trained is not None and asked == trained:
    return (f"stain normalisation {asked!r}: the run was trained with {was} and applies it when "
            f"scoring already; leave the option out")
  return (f"stain normalisation {asked!r} cannot be chosen when scoring: the run's model was "
          f"trained with {was} and is scored with it; to score with {asked or 'another'} "
          f"normalisation, retrain with `--config.stain_norm={asked or 'macenko'}`")


def match_classes(run_classes, set_classes, what: str) -> np.ndarray:
  """For each of the set's classes, the run's output with the same name (so that
  `probs[:, order]` are in the set's class order); different sets of names are a UserError."""
  run_classes, set_classes = list(run_classes), list(set_classes)
  if sorted(run_classes) != sorted(set_classes) or len(set(set_classes)) != len(set_classes):
    raise UserError(f"{what} has the classes {', '.join(set_classes)}, but the run was trained on "
                    f"{', '.join(run_classes)}: a run can be scored only on a set of the same "
                    f"classes (matched by name)")
  return np.array([run_classes.index(c) for c in set_classes])


def score(config: ml_collections.ConfigDict, fold_data: FoldData, indices, probs: np.ndarray,
          run_classes, *, what: str, normalization: dict | None = None,
          stain_normalization: dict | None = None, external: dict | None = None
          ) -> tuple[dict, list[dict]]:
  """(results, predictions.csv rows) of the images `indices` of `fold_data` whose probabilities
  over the run's classes `run_classes` are `probs` (in the run's output order): the evaluator's
  figures with the config's tie rule and bootstrap, assembled as a run's results.json (with the
  run's `normalization` and `stain_normalization` records, and `external` if given)."""
  order = match_classes(run_classes, fold_data.classes, what)
  probs = np.asarray(probs)[:, order]
  indices = np.asarray(indices)
  figures = evaluate.evaluate(probs, fold_data, indices, tie_rule=config.tie_rule,
                              bootstrap_resamples=config.get("bootstrap_resamples", 0),
                              bootstrap_seed=config.get("bootstrap_seed", 0))
  out = results.build(config, fold_data, figures, stain_normalization=stain_normalization)
  if normalization is not None:
    out["normalization"] = normalization
  if external is not None:
    out["external"] = external
  return out, results.prediction_rows(fold_data, indices, probs)


def evaluation_config(workdir: str, overrides: list[str]) -> ml_collections.ConfigDict:
  """The run's config with the other set's fields (`overrides`, `field=value`) applied."""
  if not overrides:
    raise UserError("give the set to evaluate on, e.g. --config.data.dir=OTHER (and "
                    "--config.data.name=SOURCE if it is not the run's kind of data set)")
  run_config = runs.load_config(workdir)
  overrides = compat.nest_overrides(overrides, run_config)
  for item in overrides:
    key = item.partition("=")[0]
    if key == "stain_norm":
      raise UserError(stain_norm_refusal(item.partition("=")[2], workdir))
    if key.split(".")[0] in FIXED_FIELDS:
      raise UserError(f"--config.{key}: the run's {key} is what its model was trained with and "
                      f"is used as it is; leave it out")
  # The run's config, with the groups of the sources it did not use at their defaults: another kind
  # of data set's own fields start from their defaults, not the run's.
  stored = compat.comparable(json.loads(run_config.to_json()))
  for group, value in json.loads(sources.default_config().to_json()).items():
    if isinstance(value, dict):
      stored["data"].setdefault(group, value)
  stored["data"]["prepared_dir"] = ""
  config = ml_collections.ConfigDict(stored)
  config.lock()
  return config_lib.apply_overrides(config, overrides)


def default_name(config: ml_collections.ConfigDict) -> str:
  """The other set's name: its manifest's file name (without extension) if it has one, else its
  data dir's folder name."""
  manifest = sources.settings(config).get("manifest", "")
  if manifest:
    return os.path.splitext(os.path.basename(os.path.normpath(manifest)))[0]
  return os.path.basename(os.path.normpath(os.path.abspath(os.path.expanduser(config.data.dir))))


def _check_out(out: str) -> None:
  """Refuses an --out that is a file or a folder holding anything but an earlier evaluation."""
  if not os.path.exists(out):
    return
  if not os.path.isdir(out):
    raise UserError(f"--out {out} is a file: give a folder (new, or an earlier external "
                    f"evaluation to replace)")
  names = [n for n in os.listdir(out) if not n.startswith(".")]
  ours = os.path.join(out, "results.json")
  earlier = False
  if os.path.exists(ours):
    with open(ours, encoding="utf-8") as f:
      try:
        earlier = "external" in json.load(f)
      except (json.JSONDecodeError, UnicodeDecodeError):
        earlier = False
  if names and not earlier:
    raise UserError(f"--out {out} holds other files ({len(names)} entries, e.g. "
                    f"{sorted(names)[0]}) and no earlier external evaluation: give a new folder")


def _write(out: str, result: dict, rows: list[dict], fold_data: FoldData, title: str) -> None:
  """The evaluation's files, written into a temporary folder that then replaces `out` whole."""
  parent = os.path.dirname(out)
  with errors.writing(out):
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # as a folder made by os.makedirs, not mkdtemp's 0700
    try:
      files.atomic_write_text(os.path.join(tmp, "predictions.csv"), results.csv_text(rows))
      if fold_data.binary is not None:
        evaluate.write_roc_plot(os.path.join(tmp, "roc.png"), rows,
                                positive=fold_data.binary.positive_name,
                                stratum=fold_data.strata[0].name,
                                order=fold_data.strata[0].values, title=title)
      results.write_json(os.path.join(tmp, "results.json"), result)
      old = None
      if os.path.exists(out):  # an earlier evaluation of this name (`_check_out`)
        old = files.temp_name(out)
        os.replace(out, old)
      os.replace(tmp, out)
    except BaseException:
      files.remove(tmp)
      raise
    if old is not None:
      files.remove(old)


def external_evaluation(workdir: str, overrides: list[str], out: str | None = None,
                        name: str | None = None, batch_size: int | None = None) -> tuple[dict, str]:
  """Scores the finished run in `workdir` on every image of the set `overrides` name; returns
  (results, the folder written)."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  run_config = runs.load_config(workdir)
  run_results_path = os.path.join(workdir, "results.json")
  if not os.path.exists(run_results_path):
    raise UserError(f"{workdir} has not finished (no results.json): external validation scores a "
                    f"finished run; train it to the end first (its jattn train command "
                    f"resumes it)")
  run_results = results.read(run_results_path, "it is the run's own evaluation: evaluate the run "
                                               "again (delete it and rerun its command)")
  config = evaluation_config(workdir, overrides)
  batch_size = batch_size or config.eval_batch_size
  if batch_size < 1:
    raise UserError(f"--batch-size {batch_size}: give a positive number of images per batch")
  source = sources.of(config)
  source.check_config(config)
  if not hasattr(source, "load_all"):
    raise UserError(f"--config.data.name={source.NAME!r} cannot give all its images at once (its "
                    f"source has no load_all), so a run cannot be evaluated on it")
  run_outputs = runs.outputs(run_config)
  what = f"--config.data.dir={config.data.dir}"
  match_classes(run_outputs.classes, source.outputs(config).classes, what)  # before any data
  name = name or default_name(config)
  if not name or name in (".", "..") or os.sep in name:
    raise UserError(f"--name {name!r}: give a plain folder name for RUN/external/<name>")
  out = os.path.abspath(os.path.expanduser(out or os.path.join(workdir, "external", name)))
  _check_out(out)
  source.check_data_dir(config)
  fold_data = data.load_all(config)
  indices = np.asarray(fold_data.test_indices)
  if not len(indices):
    raise UserError(f"{what}: no images to evaluate on")
  _, state = runs.restore(workdir)
  temperature = runs.temperature(workdir)  # the run's fitted one (1.0: none)
  probs = np.concatenate([
      runs.predict_probs(state, np.asarray(fold_data.images[indices[i:i + CHUNK]]), batch_size,
                         config.tta, temperature) for i in range(0, len(indices), CHUNK)])
  fold_data = dataclasses.replace(fold_data, mean=np.asarray(state.image_mean),
                                  std=np.asarray(state.image_std))
  external = {"run": workdir, "run_name": run_config.name, "run_fold": run_config.fold,
              "dataset": fold_data.source, "data_dir": config.data.dir,
              "folds": fold_data.folds_source, "num_images": int(len(indices)),
              "classes": {"run": list(run_outputs.classes), "set": list(fold_data.classes)},
              "preprocessing": "the run's: its normalization and stain_normalization below, its "
                               "image_size, tta as recorded"}
  result, rows = score(config, fold_data, indices, probs, run_outputs.classes, what=what,
                       normalization=run_results.get("normalization"),
                       stain_normalization=run_results.get("stain_normalization"),
                       external=external)
  if "calibration" in result:  # the run's temperature, applied to every probability above
    result["calibration"]["temperature"] = None if temperature == 1.0 else {
        "value": temperature, "fitted_on": "the run's validation split (its temperature.json)"}
  _write(out, result, rows, fold_data, f"{run_config.name} fold {run_config.fold} on {name}")
  return result, out
