"""The test evaluation at the end of training: every test image predicted once, the evaluator's
figures and the rows of predictions.csv."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from tensorboardX import SummaryWriter

from jattn import data
from jattn.core import files
from jattn.data import stain
from jattn.evaluation import calibration, evaluate, results
from jattn.training import holdout, parallel
from jattn.training.fold_run import FoldRun

TEMPERATURE_FILE = "temperature.json"  # a run's fitted temperature (config.validation_fraction)
LONG_BOOTSTRAP = 1_000_000  # resamples x test groups from which evaluation says it bootstraps


def predict(config, state, fold_data, plan, p_eval, indices=None) -> tuple[np.ndarray, np.ndarray]:
  """(image indices, class probabilities) of every image of `indices` (default: the test
  images), each predicted once."""
  if indices is not None:
    fold_data = dataclasses.replace(fold_data, test_indices=np.asarray(indices))
  batch_size = plan.eval_batch_size(config.eval_batch_size)  # a multiple of the device count
  index, probs = [], []
  for batch in data.test_batches(fold_data, batch_size, num_threads=config.loader_threads,
                                 process_rows=parallel.process_rows(plan)):
    mask = np.asarray(batch["mask"])
    out = p_eval(state, {"image": parallel.eval_images(plan, batch["image"], batch_size)})
    probs.append(np.asarray(out["probs"])[mask])
    index.append(np.asarray(batch["index"])[mask])
  index, probs = np.concatenate(index), np.concatenate(probs)
  if sorted(index.tolist()) != sorted(np.asarray(fold_data.test_indices).tolist()):
    raise AssertionError("the test loader did not yield every test image exactly once")
  return index, probs


def fit_temperature(config, state, fold_data, plan, p_eval, validation) -> dict:
  """The temperature fitted on the validation split's log-probabilities (the eval step gives
  probabilities; log p is the logits up to a shift, which softmax ignores), and what it did
  there."""
  index, probs = predict(config, state, fold_data, plan, p_eval, validation)
  labels = fold_data.targets[index]
  logits = np.log(np.clip(np.asarray(probs, np.float64), calibration.EPS, 1.0))
  t = calibration.fit_temperature(logits, labels)
  return {"value": t, "fitted_on": "the validation split (never the test split)",
          "method": "minimum NLL over log T (SciPy's bounded scalar minimiser), logits = log p",
          "validation_nll": {"before": calibration.temperature_nll(logits, labels, 1.0),
                             "after": calibration.temperature_nll(logits, labels, t)},
          "split": holdout.describe(fold_data, validation, config.validation_fraction,
                                    config.seed)}


def evaluate_fold(config, state, fold_data, plan, p_eval,
                  validation=None) -> tuple[dict, list[dict]]:
  """Predicts every test image once; returns the results' figures and one row per image. With a
  validation split (`validation`, its indices), one temperature is fitted on it first and every
  test probability is scaled by it; the calibration block then holds the temperature and the
  figures before scaling (`uncalibrated`)."""
  index, probs = predict(config, state, fold_data, plan, p_eval)
  temperature = None
  raw = probs
  if validation is not None:
    temperature = fit_temperature(config, state, fold_data, plan, p_eval, validation)
    probs = calibration.apply_temperature(probs, temperature["value"])
  resamples = config.get("bootstrap_resamples", 0)
  num_groups = len(np.unique(fold_data.groups[index]))
  if len(fold_data.classes) == 2 and resamples * num_groups >= LONG_BOOTSTRAP:
    print(f"fold {config.fold}: 95% intervals of the clinical metrics from {resamples:,} "
          f"bootstrap resamples of the {num_groups} test {fold_data.group_unit}s, per "
          f"{' and '.join(x.name for x in fold_data.strata)} and level ...", flush=True)
  bins = config.get("calibration", {}).get("bins", calibration.BINS)
  figures = evaluate.evaluate(probs, fold_data, index, tie_rule=config.tie_rule,
                              bootstrap_resamples=resamples,
                              bootstrap_seed=config.get("bootstrap_seed", 0),
                              calibration_bins=bins)
  figures["calibration"]["temperature"] = temperature
  if temperature is not None:
    figures["calibration"]["uncalibrated"] = evaluate.calibration_figures(
        raw, fold_data, index, bootstrap_resamples=resamples,
        bootstrap_seed=config.get("bootstrap_seed", 0), bins=bins)
  reference = None
  if state.stain_matrix is not None:
    reference = stain.describe(
        state.stain_matrix, state.stain_max,
        f"the median of the estimates of the {len(fold_data.train_indices)} training images of "
        f"fold {config.fold} (at most {stain.REFERENCE_PIXELS} pixels each), at "
        f"{config.image_size}x{config.image_size}")
  return (results.build(config, fold_data, figures, stain_normalization=reference),
          results.prediction_rows(fold_data, index, probs))


def write(fold: FoldRun, rows: list[dict]) -> None:
  """Writes the fold's predictions.csv, roc.png (two classes), reliability.png, test accuracies to
  TensorBoard and results.json (last: a run is finished once it exists), and prints its
  table."""
  files.atomic_write_text(os.path.join(fold.workdir, "predictions.csv"), results.csv_text(rows))
  if fold.data.binary is not None:
    evaluate.write_roc_plot(os.path.join(fold.workdir, "roc.png"), rows,
                            positive=fold.data.binary.positive_name,
                            stratum=fold.data.strata[0].name, order=fold.data.strata[0].values,
                            title=fold.name)
  if "calibration" in fold.results:
    evaluate.write_reliability_plot(os.path.join(fold.workdir, "reliability.png"),
                                    fold.results["calibration"], title=fold.name)
  with SummaryWriter(os.path.join(fold.workdir, "tensorboard")) as writer:
    for m, v in fold.results["image_accuracy"].items():
      writer.add_scalar(f"test/image_accuracy_{m}", v, fold.step)
  temperature = fold.results.get("calibration", {}).get("temperature")
  if temperature is not None:  # read by predict, slide and external validation
    results.write_json(os.path.join(fold.workdir, TEMPERATURE_FILE), {
        "temperature": temperature["value"], "fitted_on": temperature["fitted_on"],
        "applied_to": "softmax(log p / temperature) of every probability the run gives"})
  results_path = os.path.join(fold.workdir, "results.json")
  results.write_json(results_path, fold.results)
  print(f"{fold.name}: results in {results_path}\n{evaluate.format_table(fold.results)}")
  if temperature is not None:
    block = fold.results["calibration"]
    before, after = (b["image"][evaluate.ALL] for b in (block["uncalibrated"], block))
    print(f"temperature {temperature['value']:.3f}, fitted on the "
          f"{temperature['split']['images']} validation images: test image-level ECE "
          f"{before['ece']['value']:.3f} -> {after['ece']['value']:.3f}, Brier "
          f"{before['brier']['value']:.3f} -> {after['brier']['value']:.3f}, NLL "
          f"{before['nll']['value']:.3f} -> {after['nll']['value']:.3f}")
