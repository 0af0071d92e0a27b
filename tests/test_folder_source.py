"""The folder source: one data set through two sources gives the same figures, folds of
a multi-class tree with groups counted by hand, figures recomputed by hand from predictions.csv,
and every bad input one line with nothing written."""

from __future__ import annotations

import csv
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from jattn import main
from jattn.core.errors import UserError
from jattn.data import load_fold
from jattn.data.breakhis import export
from jattn.data.breakhis import folds as breakhis_folds
from tests.conftest import data_config, set_fields
from tests.runs import DEMO, tiny_overrides
from tests.test_hostile import one_line_error, snapshot

# The results.json keys that are figures (or what they were computed on), compared across sources.
FIGURES = ("image_accuracy", "group_accuracy", "group_recognition_rate", "majority_baseline",
           "num_images", "num_groups", "confusion_matrix", "group_confusion_matrix", "per_group",
           "clinical", "group_figures", "normalization", "binary", "group_unit", "classes")


def _read_csv(path) -> list[dict]:
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _write_csv(path, rows: list[dict]) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def _results(workdir) -> dict:
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def test_breakhis_as_a_folder_with_a_manifest_trains_to_the_same_figures(
    synthetic_tree, prepared_dir, trained_run, tmp_path):
  """The session's synthetic BreakHis exported as a folder per class with a manifest (group =
  patient, stratum = magnification) and the BreakHis source's folds, its rows in the order of the
  BreakHis cache: the same seed gives the same results.json figures and the same probabilities."""
  data_dir = synthetic_tree[0]
  folds = breakhis_folds.read_folds_csv(breakhis_folds.generated_folds_path(prepared_dir, 0))
  out = tmp_path / "folder"
  export.to_folder(data_dir, str(out), folds=folds)
  with open(os.path.join(prepared_dir, "cache", "32", "records.json")) as f:
    order = json.load(f)["file_names"]  # the BreakHis cache's order
  rows = {os.path.basename(r["path"]): r for r in _read_csv(out / "manifest.csv")}
  assert sorted(rows) == sorted(order)
  _write_csv(out / "manifest.csv", [rows[name] for name in order])

  workdir = tmp_path / "run"
  overrides = tiny_overrides(str(out), str(tmp_path / "prepared"), dataset="folder",
                             manifest=str(out / "manifest.csv"), group="patient",
                             strata="magnification", positive_class="malignant",
                             folds=str(out / "folds.csv"))
  main.main(["--config", DEMO, "--workdir", str(workdir), *[f"--config.{o}" for o in overrides]])

  # The folder source's cache holds the same pixels in the same order.
  ours = np.load(tmp_path / "prepared" / "cache" / "32" / "images.npy")
  theirs = np.load(os.path.join(prepared_dir, "cache", "32", "images.npy"))
  assert np.array_equal(ours, theirs)
  by_source = _results(trained_run), _results(workdir)
  assert by_source[0]["source"] == "breakhis" and by_source[1]["source"] == "folder"
  for key in FIGURES:
    assert by_source[1][key] == by_source[0][key], key
  for key in ("num_train_images", "num_test_images"):
    assert by_source[1]["data"][key] == by_source[0]["data"][key]
  strata = [r["strata"]["magnification"] for r in by_source]
  assert strata[1]["values"] == strata[0]["values"] and strata[1]["mpp"] == strata[0]["mpp"]
  probs = [{os.path.basename(r["file_name"]): r["prob_malignant"]
            for r in _read_csv(os.path.join(w, "predictions.csv"))} for w in (trained_run, workdir)]
  assert probs[1] == probs[0] and len(probs[0]) == by_source[0]["data"]["num_test_images"]


# ------------------------------------------------------------------------------------------------
# A multi-class tree with groups, made here: 3 classes, 12 patients of one class each, 2 to 4
# images per patient, a centre per image.

CLASSES = ("adipose", "stroma", "tumour")
COLOURS = {"adipose": (230, 220, 210), "stroma": (220, 120, 170), "tumour": (90, 40, 140)}


def _multiclass_tree(root, patients_per_class: int = 4, seed: int = 0) -> str:
  """Writes root/<class>/<patient>/<i>.png and root/manifest.csv (path,label,patient,centre);
  returns the manifest's path."""
  rng = np.random.default_rng(seed)
  rows = []
  for c, name in enumerate(CLASSES):
    for p in range(patients_per_class):
      patient = f"{name[:3]}{p}"
      folder = os.path.join(root, name, patient)
      os.makedirs(folder)
      for i in range(2 + (p + c) % 3):
        pixels = np.clip(np.asarray(COLOURS[name]) + rng.normal(0, 25, (12, 12, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, f"{i}.png"))
        rows.append({"path": f"{name}/{patient}/{i}.png", "label": name, "patient": patient,
                     "centre": f"centre{1 + (i + p) % 2}"})
  _write_csv(os.path.join(root, "manifest.csv"), rows)
  return os.path.join(root, "manifest.csv")


def _folder_config(manifest, prepared, **kw):
  config = data_config("unused", str(prepared), dataset="folder", manifest=str(manifest),
                       group="patient", strata="centre", num_folds=4)
  return set_fields(config, **kw)


@pytest.fixture(scope="module")
def multiclass(tmp_path_factory):
  root = tmp_path_factory.mktemp("multiclass")
  return _multiclass_tree(str(root)), root


def test_generated_folds_of_a_multiclass_tree_with_groups(multiclass, tmp_path):
  manifest, root = multiclass
  rows = _read_csv(manifest)
  datas = [load_fold(_folder_config(manifest, tmp_path / "a", fold=k)) for k in (1, 2, 3, 4)]
  folder = tmp_path / "a" / "folds"
  written = [os.path.join(folder, n) for n in os.listdir(folder)]
  assert len(written) == 1 and datas[0].folds_source == written[0]
  folds = _read_csv(written[0])
  patient_of = {r["path"]: r["patient"] for r in rows}
  label_of = {r["path"]: r["label"] for r in rows}
  tested = []
  for k, d in enumerate(datas, start=1):
    assert d.classes == CLASSES and d.group_unit == "patient" and d.strata[0].name == "centre"
    sides = {r["path"]: r["split"] for r in folds if int(r["fold"]) == k}
    assert sorted(sides) == sorted(patient_of)  # every image on one side of every fold
    for side, indices in (("train", d.train_indices), ("test", d.test_indices)):
      names = {d.file_names[i] for i in indices}
      assert names == {p for p, s in sides.items() if s == side}
      for c in CLASSES:  # per-fold counts per class, counted from the manifest by hand
        by_hand = sum(1 for p, s in sides.items() if s == side and label_of[p] == c)
        assert int(np.sum(d.targets[indices] == CLASSES.index(c))) == by_hand
    train_patients = {patient_of[p] for p, s in sides.items() if s == "train"}
    test_patients = {patient_of[p] for p, s in sides.items() if s == "test"}
    assert not train_patients & test_patients  # no patient on both sides
    assert {d.group_ids[g] for g in d.groups[d.test_indices]} == test_patients
    tested += sorted(test_patients)
  assert sorted(tested) == sorted(set(patient_of.values()))  # each patient tested in one fold

  # The same seed draws the same folds into another prepared dir; another seed others.
  # (StratifiedGroupKFold's seed orders the groups of equal class counts: on a tree this small
  # seeds 0 and 1 happen to draw the same folds, seed 3 others.)
  load_fold(_folder_config(manifest, tmp_path / "b"))
  load_fold(_folder_config(manifest, tmp_path / "c", folds_seed=3))
  text = {name: open(os.path.join(tmp_path / name / "folds", os.listdir(tmp_path / name / "folds")
                                  [0])).read() for name in "abc"}
  assert text["b"] == text["a"] and text["c"] != text["a"]


def _vote(rows, classes):
  """A group's plurality vote, a tie going to the highest mean probability, then the first."""
  counts = {c: sum(r["prediction"] == c for r in rows) for c in classes}
  top = [c for c in classes if counts[c] == max(counts.values())]
  means = {c: np.mean([float(r[f"prob_{c}"]) for r in rows]) for c in top}
  return [c for c in top if means[c] == max(means.values())][0]


def test_figures_of_a_multiclass_run_recomputed_from_its_predictions(multiclass, tmp_path):
  manifest, _ = multiclass
  workdir = tmp_path / "run"
  overrides = tiny_overrides("unused", str(tmp_path / "prepared"), dataset="folder",
                             manifest=manifest, group="patient", strata="centre", num_folds=4,
                             **{"model.num_classes": 3, "num_epochs": 1, "batch_size": 8})
  # The plain VGG19 row: the figures do not depend on the model, and it compiles in seconds.
  main.main(["--config", f"{DEMO}:vgg19", "--workdir", str(workdir),
             *[f"--config.{o}" for o in overrides]])
  r = _results(workdir)
  rows = _read_csv(workdir / "predictions.csv")
  assert r["classes"] == list(CLASSES) and r["group_unit"] == "patient" and r["binary"] is None
  assert set(rows[0]) == {"file_name", "centre", "patient_id", "label", "prediction",
                          *(f"prob_{c}" for c in CLASSES)}
  for row in rows:  # the prediction is the most probable class
    assert row["prediction"] == max(CLASSES, key=lambda c: float(row[f"prob_{c}"]))
  for centre in sorted({row["centre"] for row in rows}):
    mine = [row for row in rows if row["centre"] == centre]
    right = [row["label"] == row["prediction"] for row in mine]
    assert r["image_accuracy"][centre] == pytest.approx(np.mean(right))
    assert r["num_images"][centre] == len(mine)
    patients = sorted({row["patient_id"] for row in mine})
    assert r["num_groups"][centre] == len(patients)
    of = {p: [row for row in mine if row["patient_id"] == p] for p in patients}
    votes = {p: _vote(of[p], CLASSES) for p in patients}
    truth = {p: of[p][0]["label"] for p in patients}
    assert r["group_accuracy"][centre] == pytest.approx(
        np.mean([votes[p] == truth[p] for p in patients]))
    assert r["group_recognition_rate"][centre] == pytest.approx(
        np.mean([np.mean([x["label"] == x["prediction"] for x in of[p]]) for p in patients]))
    assert r["confusion_matrix"][centre] == [
        [sum(1 for x in mine if x["label"] == a and x["prediction"] == b) for b in CLASSES]
        for a in CLASSES]
    for c in CLASSES:
      support = sum(x["label"] == c for x in mine)
      hits = sum(x["label"] == c and x["prediction"] == c for x in mine)
      predicted = sum(x["prediction"] == c for x in mine)
      got = r["per_class"][centre][c]
      assert got["support"] == support
      assert got["recall"] == (pytest.approx(hits / support) if support else None)
      assert got["precision"] == (pytest.approx(hits / predicted) if predicted else None)
    present = [c for c in CLASSES if any(x["label"] == c for x in mine)]
    recalls = [np.mean([x["prediction"] == c for x in mine if x["label"] == c]) for c in present]
    assert r["multiclass"][centre]["image"]["balanced_accuracy"] == pytest.approx(
        np.mean(recalls))
    assert r["majority_baseline"][centre]["image"] == pytest.approx(
        max(sum(x["label"] == c for x in mine) for c in CLASSES) / len(mine))


def test_a_folder_per_class_without_a_manifest(multiclass, tmp_path, capsys):
  """ImageFolder: the class folders (sorted) are the classes, sub-folders included, every image
  its own group with a warning, the folder's name the one strata value."""
  _, root = multiclass
  d = load_fold(data_config(str(root), str(tmp_path / "p"), dataset="folder", num_folds=3))
  err = capsys.readouterr().err
  assert re.search(r"jattn: warning: .* gives no group of each image: every image is its own "
                   r"group, so splits are image-level", err), err
  rows = _read_csv(os.path.join(root, "manifest.csv"))
  assert d.classes == CLASSES
  assert sorted(d.file_names) == sorted(r["path"] for r in rows)
  assert [d.classes[t] for t in d.targets] == [n.split("/")[0] for n in d.file_names]
  assert d.group_ids == tuple(sorted(d.file_names)) and d.strata[0].values == (root.name,)
  assert len(d.test_indices) + len(d.train_indices) == len(rows)


# ------------------------------------------------------------------------------------------------
# Bad input: one line naming the file, field or value, exit 2, nothing written.


def _small(root, rows=None, folders=CLASSES) -> str:
  """A manifest of `rows` [(path, label, patient)] (default: 2 classes x 3 patients x 2 images),
  its images written; returns the manifest's path."""
  if rows is None:
    rows = [(f"{c}/{c}{p}_{i}.png", c, f"{c}{p}") for c in folders[:2] for p in range(3)
            for i in range(2)]
  for path, _, _ in rows:
    full = os.path.join(root, *path.split("/"))
    if not os.path.exists(full):
      os.makedirs(os.path.dirname(full), exist_ok=True)
      Image.new("RGB", (8, 8), (100, 50, 150)).save(full)
  _write_csv(os.path.join(root, "manifest.csv"),
             [{"path": p, "label": lab, "patient": g} for p, lab, g in rows])
  return os.path.join(root, "manifest.csv")


def _refused(tmp_path, capsys, pattern, *, manifest="", data_dir="unused", **kw):
  kw = {"dataset": "folder", "tie_rule": "adipose", **kw}  # a class of the manifests here
  args = ["--config", DEMO, "--workdir", str(tmp_path / "run"),
          *[f"--config.{o}" for o in tiny_overrides(data_dir, "", manifest=manifest, **kw)]]
  before = snapshot(tmp_path)
  err = one_line_error(lambda: main.main(args), capsys, "jattn train", pattern)
  assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()
  return err


def test_a_class_folder_without_images(tmp_path, capsys):
  _small(str(tmp_path / "data"))
  (tmp_path / "data" / "tumour" / "notes").mkdir(parents=True)
  (tmp_path / "data" / "tumour" / "notes" / "readme.txt").write_text("x")
  _refused(tmp_path, capsys, rf"class folder {re.escape(str(tmp_path / 'data' / 'tumour'))} holds "
           r"no images \(\.png, \.jpg, \.jpeg, \.tif, \.tiff\)", data_dir=str(tmp_path / "data"))


def test_a_manifest_row_naming_a_missing_file(tmp_path, capsys):
  manifest = _small(str(tmp_path))
  os.remove(tmp_path / "adipose" / "adipose1_0.png")
  _refused(tmp_path, capsys, rf"{re.escape(manifest)} line 4: "
           rf"{re.escape(str(tmp_path / 'adipose' / 'adipose1_0.png'))} does not exist",
           manifest=manifest, group="patient")


def test_a_label_not_among_the_classes(tmp_path, capsys):
  manifest = _small(str(tmp_path))
  _refused(tmp_path, capsys, rf"{re.escape(manifest)} line 8: label 'stroma' is not one of "
           r"--config\.data\.folder\.classes=adipose,tumour", manifest=manifest,
           classes="adipose,tumour")


def test_duplicate_paths(tmp_path, capsys):
  rows = [(f"a/{i}.png", "adipose" if i % 2 else "stroma", str(i)) for i in range(6)]
  manifest = _small(str(tmp_path), rows + [("./a/../a/3.png", "adipose", "3")])
  _refused(tmp_path, capsys, rf"{re.escape(manifest)} line 8: a/3\.png is listed again \(first "
           r"on line 5\)", manifest=manifest)


def test_a_group_on_both_sides_of_a_given_fold(tmp_path, capsys):
  manifest = _small(str(tmp_path))
  rows = _read_csv(manifest)
  folds = [{"fold": 1, "split": "test" if r["patient"] in ("adipose0", "stroma0") else "train",
            "path": r["path"]} for r in rows]
  folds[1]["split"] = "train"  # adipose0's second image
  _write_csv(tmp_path / "folds.csv", folds)
  _refused(tmp_path, capsys, r"fold 1 of .*folds\.csv puts patient\(s\) adipose0 on both sides",
           manifest=manifest, group="patient", folds=str(tmp_path / "folds.csv"))


def test_fewer_groups_than_folds(tmp_path, capsys):
  manifest = _small(str(tmp_path))
  _refused(tmp_path, capsys, rf"{re.escape(manifest)} has 6 patient\(s\), fewer than the "
           r"--config\.data\.num_folds=7 folds", manifest=manifest, group="patient", num_folds=7)


def test_a_single_class(tmp_path, capsys):
  manifest = _small(str(tmp_path), [(f"a/{i}.png", "tumour", str(i)) for i in range(6)])
  _refused(tmp_path, capsys, rf"{re.escape(manifest)} has a single class \(tumour\)",
           manifest=manifest)


def test_a_fold_whose_training_split_lacks_a_class(tmp_path, capsys):
  manifest = _small(str(tmp_path))
  rows = _read_csv(manifest)
  _write_csv(tmp_path / "folds.csv", [
      {"fold": 1, "split": "test" if r["label"] == "stroma" or r["patient"] == "adipose0"
       else "train", "path": r["path"]} for r in rows])
  _refused(tmp_path, capsys, r"fold 1 of .*folds\.csv has no training images of the class\(es\) "
           r"stroma", manifest=manifest, group="patient", folds=str(tmp_path / "folds.csv"))


def test_a_class_with_fewer_groups_than_folds_is_a_warning(tmp_path, capsys):
  rows = [(f"a/{c}{p}_{i}.png", c, f"{c}{p}") for c, n in (("adipose", 2), ("tumour", 5))
          for p in range(n) for i in range(2)]
  manifest = _small(str(tmp_path), rows)
  d = load_fold(_folder_config(manifest, tmp_path / "p", strata="", num_folds=3, fold=1))
  err = capsys.readouterr().err
  assert re.search(r"jattn: warning: class 'adipose' of .*manifest\.csv has 2 patient\(s\), "
                   r"fewer than the 3 folds: some folds test no adipose images", err), err
  assert "class 'tumour'" not in err and set(d.targets[d.train_indices].tolist()) == {0, 1}


def test_an_unknown_dataset(tmp_path, capsys):
  err = _refused(tmp_path, capsys, r"--config\.data\.name='folders' is not a data source: use one "
                                   r"of "
                 r"breakhis, folder, slides, bags, tfds:NAME \(a prepared TFDS data set\); "
                 r"did you mean 'folder'\?", dataset="folders")
  assert "Traceback" not in err


def test_a_changed_tree_is_refused_not_used_stale(tmp_path, capsys):
  manifest = _small(str(tmp_path / "data"))
  load_fold(_folder_config(manifest, tmp_path / "data" / "prepared", num_folds=2, strata=""))
  Image.new("RGB", (9, 8)).save(tmp_path / "data" / "adipose" / "adipose0_0.png")  # resized
  config = ["--config", DEMO, "--workdir", str(tmp_path / "run"),
            *[f"--config.{o}" for o in tiny_overrides(
                "unused", str(tmp_path / "data" / "prepared"), dataset="folder",
                manifest=manifest, group="patient", num_folds=2, tie_rule="adipose")]]
  before = snapshot(tmp_path)
  capsys.readouterr()  # what preparing printed
  one_line_error(lambda: main.main(config), capsys, "jattn train",
                 rf"the images of {re.escape(manifest)} changed since "
                 rf"{re.escape(str(tmp_path / 'data' / 'prepared'))} was prepared from them \(1 "
                 r"added or resized, 1 removed or resized, e\.g\. adipose/adipose0_0\.png\): "
                 r"delete .* to prepare again")
  assert snapshot(tmp_path) == before


def test_the_folder_demo_data_from_the_command_line(tmp_path, capsys):
  """`synthesize --format folder` writes what configs/demo_folder.py reads: a folder per class,
  a manifest whose patients and magnifications are those the BreakHis file names say, and the
  BreakHis-style folds, every patient on one side of each."""
  from jattn.cli import data as cli
  from jattn.core import config_lib
  from jattn.data.breakhis import naming
  from jattn.data.breakhis import source as breakhis_source

  out = tmp_path / "demo"
  cli.main(["synthesize", "--format", "folder", "--out", str(out), "--images-per-patient", "1",
            "--width", "32", "--height", "24"])
  assert json.loads(capsys.readouterr().out)["images"] == 328
  assert sorted(os.listdir(out)) == ["benign", "folds.csv", "malignant", "manifest.csv"]
  rows = _read_csv(out / "manifest.csv")
  for r in rows:
    parsed = naming.parse_file_name(os.path.basename(r["path"]))
    assert (r["patient"], r["magnification"]) == (parsed.patient_id, parsed.magnification)
    assert r["path"].split("/")[0] == r["label"] == naming.CLASSES[parsed.label]
  config = config_lib.load_config(os.path.join(os.path.dirname(DEMO), "demo_folder.py"))
  config = config_lib.apply_overrides(config, [
      f"data.folder.manifest={out / 'manifest.csv'}", f"data.prepared_dir={tmp_path / 'p'}",
      "image_size=16", f"data.folds={out / 'folds.csv'}"])
  d = load_fold(config)
  assert d.classes == ("benign", "malignant") and d.binary.positive_name == "malignant"
  assert d.group_unit == "patient" and len(d.group_ids) == 82
  (strata,) = d.strata
  assert strata.values == naming.MAGNIFICATIONS and strata.mpp == breakhis_source.MPP
  sides = {r["path"]: r["split"] for r in _read_csv(out / "folds.csv") if r["fold"] == "1"}
  assert {d.file_names[i] for i in d.test_indices} == {p for p, s in sides.items() if s == "test"}
  patient_of = {r["path"]: r["patient"] for r in rows}
  train = {patient_of[p] for p, s in sides.items() if s == "train"}
  assert not train & {patient_of[p] for p, s in sides.items() if s == "test"}


def test_a_class_with_too_few_groups_is_refused_with_why_and_what_to_do(tmp_path, capsys):
  """One adipose patient for 3 folds: the fold that tests it trains on no adipose; the refusal
  says that adipose has 1 patient for 3 folds and that a class needs 2. With 2 adipose patients
  the warning names --config.data.num_folds=2, and 2 folds do train on and test both classes."""
  rows = [(f"a/{c}{p}_{i}.png", c, f"{c}{p}") for c, n in (("adipose", 1), ("tumour", 5))
          for p in range(n) for i in range(2)]
  manifest = _small(str(tmp_path), rows)
  config = lambda fold, k, prepared: _folder_config(manifest, tmp_path / prepared, strata="",
                                                    num_folds=k, fold=fold)
  refusals = []
  for fold in (1, 2, 3):  # the one fold whose test side holds adipose0
    try:
      d = load_fold(config(fold, 3, "p"))
      assert set(d.targets[d.train_indices].tolist()) == {0, 1}
    except UserError as e:
      refusals.append((fold, str(e)))
  assert len(refusals) == 1, refusals
  fold, line = refusals[0]
  assert re.fullmatch(
      rf"fold {fold} of .*\.csv has no training images of the class\(es\) adipose: the model "
      r"could never predict them; adipose has only 1 patient\(s\) for 3 folds: a class needs at "
      r"least 2 patients \(one to train on, one to test\), which adipose lack\(s\): add patients "
      r"of adipose or leave the class out of --config\.data\.folder\.classes", line), line
  capsys.readouterr()

  rows += [(f"a/adipose1_{i}.png", "adipose", "adipose1") for i in range(2)]
  manifest = _small(str(tmp_path / "two"), rows)
  tested = {}
  for fold in (1, 2, 3):
    load_fold(config(fold, 3, "p3"))
  err = capsys.readouterr().err
  assert "adipose has only 2 patient(s) for 3 folds: with --config.data.num_folds=2 or fewer" in err
  assert "(--config.data.num_folds=2 or fewer can test it in every fold)" in err
  for fold in (1, 2):  # the advice taken: both folds train on and test both classes
    d = load_fold(config(fold, 2, "p2"))
    tested[fold] = (set(d.targets[d.train_indices].tolist()),
                    set(d.targets[d.test_indices].tolist()))
  assert tested == {1: ({0, 1}, {0, 1}), 2: ({0, 1}, {0, 1})}


def test_the_prepared_cache_is_never_written_into_the_data(tmp_path, monkeypatch):
  """Without --config.data.prepared_dir a manifest is prepared into the user's cache,
  `manifest-<stem>-<sha256 of its absolute path, NUL, its bytes>[:16]`, and its read-only data
  folder gains no file; a run prepared in the old place beside the data keeps using it."""
  import hashlib
  import stat

  from tests.test_hostile import snapshot

  cache = tmp_path / "cache"
  monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
  data = tmp_path / "data"
  manifest = _small(str(data))
  before = snapshot(data)
  modes = {}
  for folder, dirs, _ in os.walk(data):
    for d in [folder, *[os.path.join(folder, x) for x in dirs]]:
      modes[d] = os.stat(d).st_mode
  try:
    for d in modes:
      os.chmod(d, stat.S_IRUSR | stat.S_IXUSR)
    fold = load_fold(_folder_config(manifest, "", strata="", num_folds=3, fold=1))
  finally:
    for d, mode in modes.items():
      os.chmod(d, mode)
  assert snapshot(data) == before and not (data / "jattn_prepared").exists()
  with open(manifest, "rb") as f:
    digest = hashlib.sha256(os.path.abspath(manifest).encode() + b"\0" + f.read()).hexdigest()
  assert os.listdir(cache / "jattn" / "prepared") == [f"manifest-manifest-{digest[:16]}"]
  assert len(fold.train_indices) + len(fold.test_indices) == 12

  old = data / "jattn_prepared" / "manifest-manifest.csv"  # where jattn used to prepare
  again = load_fold(_folder_config(manifest, str(old), strata="", num_folds=3, fold=1))
  assert old.is_dir()
  resumed = load_fold(_folder_config(manifest, "", strata="", num_folds=3, fold=1))
  assert os.listdir(cache / "jattn" / "prepared") == [f"manifest-manifest-{digest[:16]}"]
  np.testing.assert_array_equal(resumed.images, again.images)
  from jattn.data import folder
  assert folder.prepared_dir(_folder_config(manifest, "", strata="")) == str(old)
