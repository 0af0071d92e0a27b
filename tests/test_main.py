"""The main job end to end on a tiny synthetic BreakHis: results, resuming, bad input, predict."""

from __future__ import annotations

import collections
import csv
import inspect
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jattn.cli import predict as predict_cli
from jattn.core.errors import UserError
from jattn.data import augment as augment_lib
from jattn.data.breakhis import MAGNIFICATIONS
from jattn.inference import runs
from jattn.training import compat, train, workdirs
from tests.runs import DEMO, REPO, tiny_config, tiny_overrides


def test_results_json_schema(trained_run, synthetic_tree, prepared_dir):
  with open(os.path.join(trained_run, "results.json")) as f:
    results = json.load(f)
  assert results["schema"] == "jattn.results/2" and results["finished"] is True
  assert (results["name"], results["paper_row"], results["fold"]) == ("demo_ours", "Ours", 1)
  for key in ("image_accuracy", "group_accuracy", "group_recognition_rate"):
    assert set(results[key]) == set(MAGNIFICATIONS)
    assert all(0.0 <= v <= 1.0 for v in results[key].values())
  fold_data = train.data.load_fold(tiny_config(synthetic_tree[0], prepared_dir))
  mags = fold_data.strata[0].index[fold_data.test_indices]
  assert results["num_images"] == {m: int(np.sum(mags == i)) for i, m in enumerate(MAGNIFICATIONS)}
  assert results["data"]["num_test_images"] == len(fold_data.test_indices)
  for m in MAGNIFICATIONS:
    cm = np.array(results["confusion_matrix"][m])
    assert cm.sum() == results["num_images"][m]
    assert results["image_accuracy"][m] == pytest.approx(np.trace(cm) / cm.sum())
    assert np.array(results["group_confusion_matrix"][m]).sum() == results["num_groups"][m]
  assert results["normalization"]["mean"] == pytest.approx(fold_data.mean.tolist())
  assert results["config"]["image_size"] == 32 and results["train"]["steps"] == 2 * (
      len(fold_data.train_indices) // 16)
  with open(os.path.join(trained_run, "predictions.csv")) as f:
    rows = list(csv.DictReader(f))
  assert sorted(r["file_name"] for r in rows) == sorted(
      fold_data.file_names[i] for i in fold_data.test_indices)  # every test image exactly once
  # the per-image predictions give back the reported figures, patient votes (with the run's tie
  # rule) included
  for m in MAGNIFICATIONS:
    sel = [r for r in rows if r["magnification"] == m]
    assert np.mean([r["prediction"] == r["label"] for r in sel]) == pytest.approx(
        results["image_accuracy"][m])
    by_patient = collections.defaultdict(list)
    for r in sel:
      by_patient[r["patient_id"]].append(r)
    right, rates = [], []
    for images in by_patient.values():
      malignant = sum(r["prediction"] == "malignant" for r in images)
      benign = len(images) - malignant
      vote = ("malignant" if malignant > benign else "benign" if benign > malignant
              else results["tie_rule"])
      right.append(vote == images[0]["label"])
      rates.append(np.mean([r["prediction"] == r["label"] for r in images]))
    assert results["num_groups"][m] == len(by_patient)
    assert results["group_accuracy"][m] == pytest.approx(np.mean(right))
    assert results["group_recognition_rate"][m] == pytest.approx(np.mean(rates))
  with open(os.path.join(trained_run, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  assert logged[-1]["step"] == results["train"]["steps"]
  assert all(np.isfinite(x["loss"]) for x in logged)
  assert os.listdir(os.path.join(trained_run, "tensorboard"))


class _Stop(Exception):
  pass


def test_training_augments_as_the_config_says(synthetic_tree, prepared_dir, tmp_path,
                                              monkeypatch):
  """Guards against the training loop ignoring `config.augment` (the paper's flips and rotations
  silently off, or other ones on): the first train step traced augments its batch with exactly
  the config's fields, and with those a batch comes out as itself or mirrored left-right."""
  calls, signature = [], inspect.signature(augment_lib.augment)

  def record(rng, images, **kwargs):
    calls.append(signature.bind(rng, images, **kwargs))
    raise _Stop  # the first traced step is all this test needs

  monkeypatch.setattr(augment_lib, "augment", record)
  config = tiny_config(synthetic_tree[0], prepared_dir, **{
      "augment.flip": "horizontal", "augment.rotation": "none", "augment.max_angle": 12.0})
  with pytest.raises(_Stop):
    train.train_and_evaluate(config, str(tmp_path))
  assert len(calls) == 1
  calls[0].apply_defaults()
  given = {k: v for k, v in calls[0].arguments.items() if k not in ("rng", "images")}
  assert given == {**config.augment.to_dict(), "flip": "horizontal", "rotation": "none",
                   "max_angle": 12.0}

  monkeypatch.undo()
  images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
  out = np.asarray(augment_lib.augment(jax.random.key(0), images, **given)).astype(np.uint8)
  flipped = [bool(np.array_equal(o, np.fliplr(i))) for i, o in zip(images, out, strict=True)]
  assert all(f or np.array_equal(o, i) for f, o, i in zip(flipped, out, images, strict=True))
  assert 0 < sum(flipped) < 16


def test_trained_run_is_not_trained_again(trained_run, synthetic_tree, prepared_dir, capsys):
  metrics = os.path.join(trained_run, "metrics.jsonl")
  before = (os.path.getmtime(metrics), os.path.getsize(metrics))
  results = train.train_and_evaluate(tiny_config(synthetic_tree[0], prepared_dir), trained_run)
  assert "has finished" in capsys.readouterr().out
  assert (os.path.getmtime(metrics), os.path.getsize(metrics)) == before
  assert results["fold"] == 1


def test_workdir_with_another_config_is_refused(trained_run, synthetic_tree, prepared_dir):
  other = tiny_config(synthetic_tree[0], prepared_dir, learning_rate=0.5)
  with pytest.raises(UserError, match="different config.*learning_rate.*--overwrite"):
    train.train_and_evaluate(other, trained_run)
  assert os.path.exists(os.path.join(trained_run, "results.json"))  # nothing was lost


def test_predict_matches_the_evaluation(trained_run, synthetic_tree, tmp_path):
  with open(os.path.join(trained_run, "predictions.csv")) as f:
    evaluated = {r["file_name"]: r for r in csv.DictReader(f)}
  names = sorted(evaluated)[:5]
  data_dir = synthetic_tree[0]
  paths = []
  for root, _, files in os.walk(data_dir):
    paths += [os.path.join(root, n) for n in files if n in names and "mkfold" not in root]
  out = tmp_path / "pred.csv"
  predict_cli.main(["--workdir", trained_run, "--out", str(out), *paths])
  with open(out) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(paths) == 5
  for row in rows:
    want = evaluated[os.path.basename(row["file_name"])]
    assert float(row["prob_malignant"]) == pytest.approx(float(want["prob_malignant"]), abs=1e-5)
    assert row["prediction"] == want["prediction"]
    assert row["patient_id"] == want["patient_id"] and row["magnification"] == want["magnification"]
    assert row["patient_vote"] in ("benign", "malignant")


def test_kill_and_resume_gives_the_same_results(trained_run, synthetic_tree, prepared_dir,
                                                tmp_path):
  """A run killed with SIGKILL after a checkpoint, then resumed, ends as the uninterrupted run."""
  workdir = str(tmp_path / "killed")
  overrides = tiny_overrides(synthetic_tree[0], prepared_dir, checkpoint_every_steps=3)
  cmd = [sys.executable, "-m", "jattn.main", "--config", DEMO,
         "--workdir", workdir, *[f"--config.{o}" for o in overrides]]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          env=dict(os.environ, PYTHONPATH=REPO))
  checkpoints = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    done = [d for d in os.listdir(checkpoints) if d.isdigit()] if os.path.isdir(checkpoints) else []
    if done and int(max(done, key=int)) >= 3:
      break
    time.sleep(0.05)
  assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()}"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(workdir, "results.json"))

  config = tiny_config(synthetic_tree[0], prepared_dir, checkpoint_every_steps=3)
  resumed = train.train_and_evaluate(config, workdir)
  with open(os.path.join(trained_run, "results.json")) as f:
    straight = json.load(f)
  for key in ("image_accuracy", "group_accuracy", "group_recognition_rate",
              "confusion_matrix", "normalization"):
    assert resumed[key] == straight[key], key
  with open(os.path.join(trained_run, "predictions.csv")) as a, open(
      os.path.join(workdir, "predictions.csv")) as b:
    assert a.read() == b.read()
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == sorted(set(steps))  # lines logged after the last checkpoint were dropped


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(synthetic_tree, prepared_dir,
                                                                 tmp_path):
  config = tiny_config(synthetic_tree[0], prepared_dir, learning_rate=1e6, log_every_steps=1,
                       checkpoint_every_steps=1)
  with pytest.raises(UserError, match="NaN or infinite"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "results.json")
  # Step 1 starts from the initial weights, so its loss is finite and its checkpoint is written;
  # the huge step it takes makes a later loss non-finite, and nothing after that is saved.
  steps = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
  assert 1 in steps
  _, state = runs.restore(str(tmp_path))
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state.params))


def test_ours_without_breakhis_says_what_to_download(tmp_path):
  """The real config with no data: one line naming the archive, the folder and the flag."""
  run = subprocess.run(
      [sys.executable, "-m", "jattn.main", "--config", "configs/ours.py",
       "--workdir", str(tmp_path / "w"), f"--config.data.dir={tmp_path / 'empty'}"],
      cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO))
  assert run.returncode == 2 and "Traceback" not in run.stderr
  assert run.stderr.count("\n") == 1, run.stderr
  assert "BreaKHis_v1.tar.gz" in run.stderr and "--config.data.dir" in run.stderr


def test_missing_pretrained_weights_name_the_convert_command(synthetic_tree, prepared_dir,
                                                             tmp_path):
  config = tiny_config(synthetic_tree[0], prepared_dir, pretrained=str(tmp_path / "vgg19"))
  with pytest.raises(UserError, match="jattn convert --source torchvision"):
    train.train_and_evaluate(config, str(tmp_path / "w"))



def _claim(workdir: str, config, overwrite: bool) -> None:
  """Claims `workdir` for `config` as the training loop does: refused, kept or rewritten."""
  workdirs.claim(workdir, config, workdirs.action(workdir, config, overwrite))


def test_overwrite_discards_a_run_with_another_config(trained_run, synthetic_tree, prepared_dir,
                                                      tmp_path):
  workdir = tmp_path / "old"
  workdir.mkdir()
  old = runs.load_config(trained_run)
  (workdir / "config.json").write_text(old.to_json())
  (workdir / "results.json").write_text("{}")
  new = tiny_config(synthetic_tree[0], prepared_dir, seed=5)
  with pytest.raises(UserError, match=r"different config \(fields: seed\)"):
    _claim(str(workdir), new, overwrite=False)
  assert (workdir / "results.json").exists()
  _claim(str(workdir), new, overwrite=True)
  assert not (workdir / "results.json").exists()
  assert runs.load_config(str(workdir)).seed == 5
  # fields that only change logging may differ when a run is resumed
  relogged = tiny_config(synthetic_tree[0], prepared_dir, seed=5, log_every_steps=7)
  _claim(str(workdir), relogged, overwrite=False)


def test_a_run_written_before_later_config_fields_is_not_refused(trained_run, synthetic_tree,
                                                                 prepared_dir, tmp_path, capsys):
  """Guards against refusing (or, with --overwrite, deleting) every run whose config.json predates
  a newly added field, or the model.dtype default 'auto': the field's behaviour-preserving value
  fills the gap, and 'auto' compares as the dtype it computes in."""
  old = tmp_path / "old"
  old.mkdir()
  stored = json.loads(open(os.path.join(trained_run, "config.json")).read())
  for key in compat.later_fields("breakhis"):
    *parents, field = key.split(".")
    node = stored
    for parent in parents:
      node = node[parent]
    del node[field]
  stored["model"]["dtype"] = "float32"  # the default before 'auto', which is float32 on CPU
  (old / "config.json").write_text(json.dumps(stored))
  results = open(os.path.join(trained_run, "results.json")).read()
  (old / "results.json").write_text(results)
  # The one later field whose default changed: the demo's batch-norm VGG computed with Flax's
  # running variance before it, so its old runs resume with the value they computed with, said.
  config = tiny_config(synthetic_tree[0], prepared_dir)
  assert config.model.batch_norm and config.model.bn_unbiased_running_var
  train.train_and_evaluate(config, str(old))
  out = capsys.readouterr().out
  assert (f"{old} was written before the default of model.bn_unbiased_running_var changed: it "
          f"resumes as it was trained, with model.bn_unbiased_running_var=False") in out
  assert "has finished" in out
  assert json.loads((old / "config.json").read_text()) == stored  # nothing rewritten
  assert (old / "results.json").read_text() == results


def test_later_fields_hold_the_defaults():
  """Guards against a LATER_FIELDS value that differs from configs/default.py: an old run would
  then be resumed under a setting it never had."""
  from configs import default

  defaults = json.loads(default.get_config().to_json())
  for key, value in compat.later_fields("breakhis").items():
    node = defaults
    for part in key.split("."):
      node = node[part]
    if key in compat.CHANGED_DEFAULTS:  # new runs keep PyTorch's statistics
      assert (key, node, value) == ("model.bn_unbiased_running_var", True, False)
    else:
      assert node == value, key


def test_predict_writes_file_name_and_warns_about_the_runs_own_training_images(
    trained_run, synthetic_tree, tmp_path, capsys):
  """A manifest of 3 of the run's training images (in the tree, absent from its predictions.csv,
  which lists every test image) and 2 of its test images: one warning line counting 3, and rows
  whose first column is `file_name`, as in predictions.csv. Its test images alone: no warning."""
  with open(os.path.join(trained_run, "predictions.csv")) as f:
    evaluated = csv.DictReader(f)
    header, tested = evaluated.fieldnames, {r["file_name"] for r in evaluated}
  images = sorted(os.path.join(root, n) for root, _, files in os.walk(synthetic_tree[0])
                  for n in files if n.endswith(".png") and "mkfold" not in root)
  train = [p for p in images if os.path.basename(p) not in tested][:3]
  test = [p for p in images if os.path.basename(p) in tested][:2]
  assert len(train) == 3 and len(test) == 2

  def manifest(paths, name):
    path = tmp_path / name
    label = lambda p: "malignant" if os.path.basename(p).startswith("SOB_M_") else "benign"
    path.write_text("path,label\n" + "".join(f"{p},{label(p)}\n" for p in paths))
    return str(path)

  out = tmp_path / "pred.csv"
  capsys.readouterr()
  predict_cli.main(["--workdir", trained_run, "--manifest", manifest(train + test, "m.csv"),
                "--out", str(out)])
  warned = [line for line in capsys.readouterr().err.splitlines() if "training split" in line]
  assert warned == [f"jattn: warning: 3 of the 5 images of --manifest {tmp_path / 'm.csv'} are in "
                    f"the run's training split (fold 1): the figures below count images the "
                    f"model was trained on"]
  with open(out) as f:
    rows = list(csv.DictReader(f))
  assert header[0] == "file_name" and list(rows[0])[0] == "file_name"
  assert [r["file_name"] for r in rows] == train + test
  predict_cli.main(["--workdir", trained_run, "--manifest", manifest(test, "t.csv"), "--out",
                str(out)])
  assert "training split" not in capsys.readouterr().err
