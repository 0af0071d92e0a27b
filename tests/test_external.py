"""External validation and predict with a manifest: the shared demo run scored on a second
synthetic set equals its images put through `predict` and the evaluator by hand, and bad input is
one line that writes nothing."""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest

from jattn.cli import predict as predict_cli
from jattn.cli import validate_external as evaluate_cli
from jattn.cli import validate_external as external_cli
from jattn.evaluation import evaluate
from jattn.inference import predict
from tests.conftest import small_tree
from tests.runs import breakhis_fold
from tests.test_hostile import one_line_error, snapshot


@pytest.fixture(scope="module")
def other_tree(tmp_path_factory):
  """A second synthetic set: 16 patients, other images (seed 1) than the session tree's."""
  return small_tree(tmp_path_factory.mktemp("other") / "centre2", seed=1)


def tree_images(data_dir: str) -> list[str]:
  """The tree's image files, junk (Thumbs.db, ._* and the like) left out, by hand."""
  out = []
  for root, _, names in os.walk(os.path.join(data_dir, "BreaKHis_v1")):
    out += [os.path.join(root, n) for n in names if n.endswith(".png") and n.startswith("SOB_")]
  return sorted(out)


def described(path: str) -> tuple[int, str, str, str]:
  """(label, patient, magnification, subtype) read off a BreakHis file name by hand:
  SOB_<B|M>_<subtype>-<year>-<slide>-<mag>-<seq>.png."""
  _, kind, rest = os.path.basename(path).split("_", 2)
  subtype, year, slide, mag, _ = rest[:-len(".png")].split("-")
  return int(kind == "M"), f"{subtype}-{year}-{slide}", f"{mag}X", subtype


def test_external_validation_equals_predict_and_the_evaluator_by_hand(trained_run, other_tree,
                                                                      tmp_path, capsys):
  run = str(tmp_path / "run")
  shutil.copytree(trained_run, run)  # the shared run stays as it is
  external_cli.main(["--workdir", run, f"--config.data.dir={other_tree}"])
  out = os.path.join(run, "external", "centre2")
  assert f"results in {out}" in capsys.readouterr().out
  assert sorted(os.listdir(out)) == ["predictions.csv", "results.json", "roc.png"]
  with open(os.path.join(out, "results.json")) as f:
    got = json.load(f)

  # By hand: every image of the other set through predict, the names parsed here, the figures
  # from the evaluator on a fold description made by hand.
  paths = tree_images(other_tree)
  rows = predict.predict(run, paths)
  p = np.array([float(r["prob_malignant"]) for r in rows])
  labels, patients, mags, subtypes = zip(*map(described, paths), strict=True)
  ids = sorted(set(patients))
  fold = breakhis_fold(labels, [ids.index(x) for x in patients],
                       [["40X", "100X", "200X", "400X"].index(m) for m in mags],
                       [["A", "F", "PT", "TA", "DC", "LC", "MC", "PC"].index(s) for s in subtypes],
                       patient_ids=tuple(ids))
  with open(os.path.join(trained_run, "results.json")) as f:
    own = json.load(f)
  want = evaluate.evaluate(np.stack([1 - p, p], 1), fold, fold.test_indices,
                           tie_rule=own["tie_rule"],
                           bootstrap_resamples=own["config"]["bootstrap_resamples"],
                           bootstrap_seed=own["config"]["bootstrap_seed"])
  assert got["num_images"] == want["num_images"] == {m: 16 for m in ("40X", "100X", "200X",
                                                                      "400X")}
  for key in ("confusion_matrix", "group_confusion_matrix", "num_groups", "per_group"):
    assert got[key] == want[key], key
  for key in ("image_accuracy", "group_accuracy", "group_recognition_rate"):
    assert got[key] == pytest.approx(want[key]), key
  for key in ("majority_baseline", "subclass_accuracy"):
    for col, figures in want[key].items():
      assert got[key][col] == pytest.approx(figures), (key, col)
  for level in ("image", "group"):
    for col, metrics in want["clinical"][level].items():
      for name, figure in metrics.items():
        assert got["clinical"][level][col][name]["value"] == pytest.approx(
            figure["value"], abs=1e-4), (level, col, name)
  # The run's preprocessing, not the other set's: its own normalisation statistics.
  assert got["normalization"] == own["normalization"]
  assert got["external"]["num_images"] == len(paths) == 64
  assert got["data"]["num_train_images"] == 0 and got["fold"] == own["fold"]
  with open(os.path.join(out, "predictions.csv")) as f:
    written = {r["file_name"]: float(r["prob_malignant"]) for r in csv.DictReader(f)}
  # Both files round to 6 decimals, and predict batches the images otherwise (XLA's CPU
  # convolutions sum in another order for another batch): a few 1e-6 apart at most.
  assert written == pytest.approx({os.path.basename(x): v for x, v in zip(paths, p, strict=True)},
                                  abs=1e-5)

  # A second evaluation of the same name replaces the folder whole.
  os.remove(os.path.join(out, "roc.png"))
  external_cli.main(["--workdir", run, f"--config.data.dir={other_tree}"])
  assert sorted(os.listdir(out)) == ["predictions.csv", "results.json", "roc.png"]
  assert [n for n in os.listdir(os.path.join(run, "external")) if n != "centre2"] == []


def test_the_same_set_as_a_folder_with_a_manifest_scores_alike(trained_run, other_tree,
                                                                tmp_path, capsys):
  """The folder source's fold-free mode: the other set exported as a folder per class with a
  manifest (group = patient, stratum = magnification) gives the figures of the BreakHis source
  on the same images, so external validation does not depend on the source's form."""
  from jattn.data.breakhis import export

  run = str(tmp_path / "run")
  shutil.copytree(trained_run, run)
  folder = export.to_folder(other_tree, str(tmp_path / "as_folder"))
  external_cli.main(["--workdir", run, f"--config.data.dir={other_tree}"])
  external_cli.main(["--workdir", run, "--config.data.name=folder",
                     f"--config.data.dir={folder['out']}",
                     f"--config.data.folder.manifest={folder['manifest']}",
                     "--config.data.folder.group=patient",
                     "--config.data.folder.strata=magnification",
                     "--config.data.folder.positive_class=malignant", "--name", "folder"])
  capsys.readouterr()
  got = {}
  for name in ("centre2", "folder"):
    with open(os.path.join(run, "external", name, "results.json")) as f:
      got[name] = json.load(f)
  a, b = got["centre2"], got["folder"]
  assert b["external"]["num_images"] == a["external"]["num_images"] == 64
  assert b["data"]["num_train_images"] == 0
  for key in ("num_images", "confusion_matrix", "group_confusion_matrix", "num_groups"):
    assert b[key] == a[key], key
  for key in ("image_accuracy", "group_accuracy"):
    assert b[key] == pytest.approx(a[key], abs=1e-6), key
  with open(os.path.join(run, "external", "folder", "predictions.csv")) as f:
    by_folder = {os.path.basename(r["file_name"]): float(r["prob_malignant"])
                 for r in csv.DictReader(f)}
  with open(os.path.join(run, "external", "centre2", "predictions.csv")) as f:
    by_breakhis = {r["file_name"]: float(r["prob_malignant"]) for r in csv.DictReader(f)}
  assert by_folder == pytest.approx(by_breakhis, abs=2e-6)


def test_a_class_mismatch_is_one_line_and_writes_nothing(trained_run, other_tree, tmp_path,
                                                         capsys):
  before = snapshot(os.path.dirname(other_tree)), snapshot(trained_run)
  one_line_error(lambda: evaluate_cli.main(  # jattn validate-external
      ["--workdir", trained_run, f"--config.data.dir={other_tree}",
       "--config.data.breakhis.task=subtype", "--out", str(tmp_path / "out")]), capsys,
      "jattn validate-external",
      r"has the classes A, F, PT, TA, DC, LC, MC, PC, but the run was trained on benign, "
      r"malignant: a run can be scored only on a set of the same classes")
  assert (snapshot(os.path.dirname(other_tree)), snapshot(trained_run)) == before
  assert not (tmp_path / "out").exists()


def test_a_run_that_has_not_finished_is_one_line(trained_run, other_tree, tmp_path, capsys):
  run = tmp_path / "run"
  shutil.copytree(trained_run, run)
  os.remove(run / "results.json")
  before = snapshot(run)
  one_line_error(lambda: external_cli.main(["--workdir", str(run),
                                            f"--config.data.dir={other_tree}"]),
                 capsys, "jattn validate-external",
                 r"has not finished \(no results.json\): external validation scores a finished run")
  assert snapshot(run) == before


def test_a_field_of_the_model_cannot_be_overridden(trained_run, capsys):
  one_line_error(lambda: external_cli.main(["--workdir", trained_run, "--config.image_size=64"]),
                 capsys, "jattn validate-external",
                 r"--config.image_size: the run's image_size is what its model was trained with")


def write_manifest(path, rows, header="path,label,group,magnification") -> str:
  with open(path, "w") as f:
    f.write(header + "\n" + "".join(",".join(r) + "\n" for r in rows))
  return str(path)


def test_predict_with_a_manifest_gives_labels_correctness_and_group_figures(trained_run,
                                                                            other_tree, tmp_path,
                                                                            capsys):
  """Guards the manifest's labels and groups: each row's correctness and its group's vote scored
  by hand, and the figures of --results recomputed from the rows. Its groups are made up (two
  patients' images pooled into one group), so they cannot have come from the file names."""
  paths = tree_images(other_tree)[:24]
  rows = []
  for path in paths:
    label, patient, mag, _ = described(path)
    group = f"g{sorted({described(p)[1] for p in paths}).index(patient) // 2}"
    rows.append([os.path.relpath(path, tmp_path), ["benign", "malignant"][label], group, mag])
  manifest = write_manifest(tmp_path / "set.csv", rows)  # paths relative to its folder
  out, figures = tmp_path / "pred.csv", tmp_path / "figures.json"
  predict_cli.main(["--workdir", trained_run, "--manifest", manifest, "--out", str(out),
                "--results", str(figures)])
  assert "image accuracy" in capsys.readouterr().err
  with open(out) as f:
    got = list(csv.DictReader(f))
  assert [r["file_name"] for r in got] == [r[0] for r in rows]
  assert [r["label"] for r in got] == [r[1] for r in rows]
  assert [r["patient_id"] for r in got] == [r[2] for r in rows]
  assert all(r["correct"] == str(r["prediction"] == r["label"]).lower() for r in got)
  for r in got:  # the vote of the row's group at its magnification, by hand
    mates = [m for m in got if (m["patient_id"], m["magnification"]) == (r["patient_id"],
                                                                          r["magnification"])]
    malignant = sum(m["prediction"] == "malignant" for m in mates)
    vote = "malignant" if 2 * malignant > len(mates) else "benign"  # a tie: the run's tie rule
    assert r["patient_vote"] == vote
    single = len({m["label"] for m in mates}) == 1
    assert r["patient_vote_correct"] == (str(vote == r["label"]).lower() if single else "")
  with open(figures) as f:
    result = json.load(f)
  for mag in ("40X", "100X"):
    sel = [r for r in got if r["magnification"] == mag]
    assert result["image_accuracy"][mag] == pytest.approx(
        np.mean([r["correct"] == "true" for r in sel]))
    assert result["num_groups"][mag] == len({r["patient_id"] for r in sel})


@pytest.mark.parametrize(("row", "message"), [
    (["missing.png", "benign", "g0", "40X"], r"line 3: path 'missing.png' is not a file"),
    (["{first}", "benign", "g0", "40X"], r"line 3: path '.*' is listed again \(first on line 2\)"),
    (["{second}", "adenosis", "g0", "40X"], r"line 3: label 'adenosis' is not one of the run's "
                                            r"classes benign, malignant"),
    (["{second}", "benign", "", "40X"], r"line 3: empty 'group'"),
])
def test_a_bad_manifest_row_is_one_line_and_writes_nothing(trained_run, other_tree, tmp_path,
                                                           capsys, row, message):
  first, second = (os.path.relpath(p, tmp_path) for p in tree_images(other_tree)[:2])
  row = [v.format(first=first, second=second) for v in row]
  manifest = write_manifest(tmp_path / "bad.csv", [[first, "benign", "g0", "40X"], row])
  out = tmp_path / "pred.csv"
  one_line_error(lambda: predict_cli.main(["--workdir", trained_run, "--manifest", manifest,
                                           "--out", str(out)]),
                 capsys, "jattn predict", rf"--manifest {manifest}, {message}")
  assert not out.exists()


def test_a_manifest_without_its_columns_is_one_line(trained_run, tmp_path, capsys):
  manifest = write_manifest(tmp_path / "m.csv", [["a.png", "benign"]], header="file,class")
  one_line_error(lambda: predict_cli.main(["--workdir", trained_run, "--manifest", manifest]),
                 capsys, "jattn predict", r"no 'path' column \(its header is file,class\); give "
                                          r"columns path,label\[,group\]")


def test_a_set_of_the_same_classes_in_another_order_is_matched_by_name(trained_run, other_tree,
                                                                       tmp_path, capsys):
  """The other set as a folder source whose classes are named malignant,benign (the run's are
  benign,malignant): its figures are those of the run's per-image probabilities and the images'
  true classes, counted here in the set's order, not the run's outputs taken by position."""
  from jattn.data.breakhis import export

  run = str(tmp_path / "run")
  shutil.copytree(trained_run, run)
  folder = export.to_folder(other_tree, str(tmp_path / "as_folder"))
  external_cli.main(["--workdir", run, "--config.data.name=folder",
                     f"--config.data.dir={folder['out']}",
                     f"--config.data.folder.manifest={folder['manifest']}",
                     "--config.data.folder.classes=malignant,benign",
                     "--config.data.folder.group=patient",
                     "--config.data.folder.strata=magnification",
                     "--config.data.folder.positive_class=malignant", "--name", "reversed"])
  capsys.readouterr()
  with open(os.path.join(run, "external", "reversed", "results.json")) as f:
    got = json.load(f)
  assert got["external"]["classes"] == {"run": ["benign", "malignant"],
                                        "set": ["malignant", "benign"]}
  paths = tree_images(other_tree)
  p = {os.path.basename(x): float(r["prob_malignant"])
       for x, r in zip(paths, predict.predict(run, paths), strict=True)}
  truth = {os.path.basename(x): described(x)[0] for x in paths}  # 1: malignant
  mag = {os.path.basename(x): described(x)[2] for x in paths}
  # Rows: the true class, columns: the predicted one, both in the set's order (malignant first),
  # per magnification.
  want = {m: np.zeros((2, 2), np.int64) for m in ("40X", "100X", "200X", "400X")}
  for name, prob in p.items():
    want[mag[name]][1 - truth[name], 0 if prob > 0.5 else 1] += 1
  right = sum(np.trace(w) for w in want.values())
  assert 0 < right < len(p)  # neither all right nor all wrong: the order shows
  assert got["confusion_matrix"] == {m: w.tolist() for m, w in want.items()}
  assert got["image_accuracy"] == pytest.approx({m: np.trace(w) / w.sum()
                                                 for m, w in want.items()})
  with open(os.path.join(run, "external", "reversed", "predictions.csv")) as f:
    rows = list(csv.DictReader(f))
  assert {os.path.basename(r["file_name"]): float(r["prob_malignant"]) for r in rows} == (
      pytest.approx(p, abs=1e-5))
  assert all(r["label"] == ("malignant" if truth[os.path.basename(r["file_name"])] else "benign")
             for r in rows)
