"""A MIL run end to end (jattn/training/mil_train.py) on a small planted cohort of bags written
here: its slide-level AUC against scikit-learn's from its own predictions.csv, the planted tiles'
attention against the rest, and a run killed mid-epoch resuming to the same predictions."""

from __future__ import annotations

import csv
import json
import os

import h5py
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from jattn import main
from jattn.cli import tables
from jattn.core.errors import UserError
from jattn.inference import runs
from jattn.training import mil_train
from tests.runs import REPO
from tests.test_bags import write_clam_h5

D = 8


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  """24 slides of 16 patients; a tumour slide has a quarter of its tiles shifted by +1.5 on four
  features (the planted region), a normal slide none."""
  folder = tmp_path_factory.mktemp("bags")
  rng = np.random.default_rng(0)
  rows, planted = [], {}
  for i in range(24):
    slide, tumour, patient = f"S{i:02d}", i % 2 == 1, f"P{i % 16:02d}"
    n = int(rng.integers(12, 40))
    feats = rng.normal(size=(n, D))
    inside = np.zeros(n, bool)
    if tumour:
      inside[rng.choice(n, n // 4, replace=False)] = True
      feats[inside, :4] += 1.5
    planted[slide] = inside
    write_clam_h5(folder / f"{slide}.h5", feats)
    rows.append([slide, "tumour" if tumour else "normal", patient])
  with open(folder / "slides.csv", "w", newline="") as f:
    csv.writer(f).writerows([["slide", "label", "patient"], *rows])
  return folder, planted


def _args(folder, workdir, epochs=10):
  return ["--config", os.path.join(REPO, "configs", "mil_abmil.py"), "--workdir", str(workdir),
          f"--config.data.bags.manifest={folder / 'slides.csv'}",
          f"--config.data.prepared_dir={folder.parent / 'prepared'}",
          "--config.data.num_folds=2", "--config.data.bags.positive_class=tumour",
          "--config.data.bags.train_max_tiles=24", "--config.model.mil.hidden=16",
          "--config.model.mil.attention_dim=8", "--config.learning_rate=0.005",
          "--config.model.dropout_rate=0.0", f"--config.num_epochs={epochs}",
          "--config.batch_size=2", "--config.bootstrap_resamples=200"]


def _predictions(workdir):
  with open(os.path.join(workdir, "predictions.csv")) as f:
    return list(csv.DictReader(f))


@pytest.mark.slow
def test_abmil_learns_the_planted_cohort_attends_to_the_planted_tiles_and_resumes(
    cohort, tmp_path, monkeypatch):
  folder, planted = cohort
  workdir = tmp_path / "run"
  main.main(_args(folder, workdir))
  with open(workdir / "results.json") as f:
    r = json.load(f)
  rows = _predictions(workdir)
  labels = [int(row["label"] == "tumour") for row in rows]
  scores = [float(row["prob_tumour"]) for row in rows]
  auc = r["clinical"]["image"]["all"]["roc_auc"]
  assert auc["value"] == pytest.approx(roc_auc_score(labels, scores))
  print(f"test slide AUC {auc['value']:.3f}, 95% CI {auc['ci95']}")
  assert auc["value"] >= 0.8 and 0.5 < auc["ci95"][0] <= auc["value"] <= auc["ci95"][1]
  assert r["group_unit"] == "patient"
  assert set(r["mil"]["buckets_this_session"]) <= {16, 32}  # bags sampled to 24 tiles
  assert "group_accuracy" in r  # patient-level votes
  inside, outside = [], []
  with h5py.File(workdir / "attention.h5") as f:
    assert sorted(f) == sorted(row["file_name"] for row in rows)
    for name in f:
      a = f[name]["attention"][:]
      assert a.sum() == pytest.approx(1.0, abs=1e-5)
      if planted[name].any():
        inside.append(a[planted[name]].mean())
        outside.append(a[~planted[name]].mean())
  # the mean attention of a planted tile over that of another tile of the same tumour slide
  ratio = float(np.mean(inside) / np.mean(outside))
  print(f"planted / other tiles' mean attention on the test tumour slides: {ratio:.2f}")
  assert ratio > 2.0

  # killed in the middle of epoch 4, then run again: the same predictions
  killed = tmp_path / "killed"
  real = mil_train.sample_tiles
  calls = {"n": 0}

  def dies(n, limit, seed, epoch, index):
    if epoch == 3:
      calls["n"] += 1
      if calls["n"] == 3:
        raise KeyboardInterrupt
    return real(n, limit, seed, epoch, index)

  monkeypatch.setattr(mil_train, "sample_tiles", dies)
  with pytest.raises(KeyboardInterrupt):
    main.main(_args(folder, killed))
  assert not (killed / "results.json").exists()
  monkeypatch.setattr(mil_train, "sample_tiles", real)
  main.main(_args(folder, killed))
  assert _predictions(killed) == rows
  # what acts on images is refused, in one line
  with pytest.raises(SystemExit):
    main.main([*_args(folder, tmp_path / "other"), "--config.validation_fraction=0.2"])
  assert not (tmp_path / "other").exists()
  # the image commands refuse a MIL run in one line
  with pytest.raises(UserError, match=r"is a MIL run \(config.model.name=abmil\): it scores "):
    runs.restore(str(workdir))


@pytest.mark.slow
def test_tables_and_a_paired_comparison_read_mil_runs(cohort, tmp_path):
  """ABMIL and CLAM-SB over both folds, tabulated and compared as any sweep's rows."""
  folder, _ = cohort
  sweep = tmp_path / "sweep"
  accuracy = {}
  for config, name in (("mil_abmil.py", "mil_abmil"), ("mil_clam.py", "mil_clam_sb")):
    for fold in (1, 2):
      args = _args(folder, sweep / name / f"fold{fold}", epochs=2)
      args[1] = os.path.join(REPO, "configs", config)
      main.main([*args, f"--config.fold={fold}", "--config.model.mil.instance_k=4"])
      with open(sweep / name / f"fold{fold}" / "results.json") as f:
        accuracy[name, fold] = json.load(f)["image_accuracy"]["slides"]
  tables.main([str(sweep), "--compare", "mil_abmil:mil_clam_sb"])
  with open(sweep / "tables.csv") as f:
    rows = list(csv.DictReader(f))
  for name in ("mil_abmil", "mil_clam_sb"):
    (row,) = [r for r in rows if r["table"] == "image_accuracy" and r["name"] == name]
    assert float(row["mean"]) == pytest.approx(
        100 * np.mean([accuracy[name, 1], accuracy[name, 2]]))
    assert row["n_folds"] == "2"
  with open(sweep / "compare.csv") as f:
    compared = list(csv.DictReader(f))
  assert compared and all({"mil_abmil", "mil_clam_sb"} <= set(r.values()) for r in compared)
