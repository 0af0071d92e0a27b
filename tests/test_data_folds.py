"""The three forms of folds, and the splits that must be refused."""

from __future__ import annotations

import collections
import csv
import logging
import os
import shutil

import pytest
from conftest import data_config

from jattn.core.errors import UserError
from jattn.data import breakhis, load_fold
from jattn.data.breakhis import folds, scan


@pytest.fixture(scope="module")
def records(synthetic_tree):
  return scan.scan(synthetic_tree[0]).records


def _patients(split, by_name, group):
  return {by_name[n].patient_id for n, g in split.items() if g == group}


def _assert_patient_disjoint(chosen, records):
  by_name = {r.file_name: r for r in records}
  assert sorted(chosen.splits) == list(folds.FOLDS)
  for split in chosen.splits.values():
    assert set(split) == set(by_name)  # every image once per fold
    assert not _patients(split, by_name, "train") & _patients(split, by_name, "test")
  assert folds.check_folds(chosen, records) == ([], [])


def test_three_forms_give_patient_disjoint_splits(synthetic_tree, records):
  data_dir, summary = synthetic_tree
  from_csv = folds.read_folds(summary["folds_csv"])
  from_mkfold = folds.read_folds(summary["mkfold"])
  generated = folds.generate_folds(records, seed=0)
  for chosen in (from_csv, from_mkfold, generated):
    _assert_patient_disjoint(chosen, records)
  # The synthesizer wrote the generated folds of its seed in both file forms.
  assert from_csv.splits == from_mkfold.splits == generated.splits
  assert from_mkfold.source == os.path.join(data_dir, "mkfold")
  # The mkfold tree may be given by the folder that holds it, too.
  assert folds.read_mkfold(data_dir).splits == from_mkfold.splits


def test_generated_folds_are_stratified_70_30_by_patient(records):
  chosen = folds.generate_folds(records, seed=0)
  by_name = {r.file_name: r for r in records}
  patients_of = collections.defaultdict(set)
  for p in breakhis.patients():
    patients_of[p.subtype].add(p.patient_id)
  for split in chosen.splits.values():
    test = _patients(split, by_name, "test")
    for code, ids in patients_of.items():
      expected = max(1, int(0.3 * len(ids) + 0.5))
      assert len(test & ids) == expected, code
    for label in (0, 1):
      members = {p.patient_id for p in breakhis.patients() if p.label == label}
      assert 0.2 < len(test & members) / len(members) < 0.4
    assert 0.25 < len(test) / 82 < 0.35


def test_a_class_of_single_patient_subtypes_still_gets_a_test_patient(records):
  """Guards the class rule of generate_folds: in a data set whose 4 benign patients are each the
  only one of their subtype (no subtype gives them a test patient), every fold still tests one
  benign patient, drawn from the 4, beside round(0.3 * 6) = 2 of the 6 ductal carcinomas."""
  first_of = {}
  for r in records:
    if r.subtype in ("A", "F", "PT", "TA"):
      first_of.setdefault(r.subtype, r.patient_id)
  dc = sorted({r.patient_id for r in records if r.subtype == "DC"})[:6]
  benign = set(first_of.values())
  chosen = folds.generate_folds([r for r in records if r.patient_id in benign | set(dc)], seed=0)
  by_name = {r.file_name: r for r in records}
  tested_benign = set()
  for split in chosen.splits.values():
    test = _patients(split, by_name, "test")
    assert len(test & benign) == 1 and len(test & set(dc)) == 2, test
    tested_benign |= test & benign
  assert len(tested_benign) > 1  # drawn, not always the same patient


def test_generated_folds_depend_only_on_the_seed(records):
  a = folds.generate_folds(records, seed=0)
  b = folds.generate_folds(list(reversed(records)), seed=0)
  c = folds.generate_folds(records, seed=1)
  assert a.splits == b.splits
  assert a.splits != c.splits
  # Each fold is its own random split (like the official ones), not a partition.
  tests = [frozenset(n for n, g in s.items() if g == "test") for s in a.splits.values()]
  assert len(set(tests)) == 5


def test_folds_csv_round_trip(tmp_path, records):
  chosen = folds.generate_folds(records, seed=5)
  path = str(tmp_path / "Folds.csv")
  folds.write_folds_csv(chosen, records, path)
  assert folds.read_folds_csv(path).splits == chosen.splits
  with open(path) as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ["fold", "mag", "grp", "filename"]
  assert len(rows) == 5 * len(records)
  assert rows[0]["filename"].startswith("BreaKHis_v1/histology_slides/breast/")


def _rewrite(source, target, change):
  """Copies a Folds.csv, passing each row (a dict) through `change` (None drops it)."""
  with open(source) as f:
    reader = csv.DictReader(f)
    rows = [change(dict(r)) for r in reader]
    columns = reader.fieldnames
  with open(target, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=[c for c in columns if any(c in r for r in rows if r)])
    writer.writeheader()
    writer.writerows(r for r in rows if r is not None)
  return str(target)


def test_missing_column(tmp_path, synthetic_tree):
  def drop_grp(row):
    row.pop("grp")
    return row

  path = _rewrite(synthetic_tree[1]["folds_csv"], tmp_path / "Folds.csv", drop_grp)
  with pytest.raises(UserError, match=r"lacks the column\(s\) grp.*fold,mag,grp,filename"):
    folds.read_folds_csv(path)


@pytest.mark.parametrize("bad", ["0", "6", "x", ""])
def test_bad_fold_number(tmp_path, synthetic_tree, bad):
  path = _rewrite(
      synthetic_tree[1]["folds_csv"], tmp_path / "Folds.csv", lambda r: {**r, "fold": bad}
  )
  with pytest.raises(UserError, match=rf"line 2: fold '{bad}' is not a fold number 1\.\.5"):
    folds.read_folds_csv(path)


def test_bad_grp_and_mag(tmp_path, synthetic_tree):
  source = synthetic_tree[1]["folds_csv"]
  path = _rewrite(source, tmp_path / "a.csv", lambda r: {**r, "grp": "val"})
  with pytest.raises(UserError, match="line 2: grp 'val' is neither 'train' nor 'test'"):
    folds.read_folds_csv(path)
  wrong = {"40": "100", "100": "200", "200": "400", "400": "40"}
  path = _rewrite(source, tmp_path / "b.csv", lambda r: {**r, "mag": wrong[r["mag"]]})
  with pytest.raises(UserError, match="line 2: mag .* disagrees with the file name SOB_"):
    folds.read_folds_csv(path)


def test_file_not_on_disk_is_refused_by_load_fold(tmp_path, synthetic_tree, prepared_dir):
  data_dir, summary = synthetic_tree
  ghost = "SOB_B_A-14-22549AB-40-999.png"

  def rename_first(row):
    if row["filename"].endswith("SOB_B_A-14-22549AB-40-001.png"):
      row["filename"] = row["filename"].replace("40-001.png", "40-999.png")
    return row

  path = _rewrite(summary["folds_csv"], tmp_path / "Folds.csv", rename_first)
  config = data_config(data_dir, prepared_dir, folds=path)
  with pytest.raises(UserError, match=rf"file\(s\) not in the data set.*{ghost}"):
    load_fold(config)


def test_leaking_split_is_refused(tmp_path, synthetic_tree, prepared_dir, records, caplog):
  """Guards against a leak passing silently, and against it blocking the other folds' runs."""
  data_dir, summary = synthetic_tree
  by_name = {r.file_name: r for r in records}
  chosen = folds.read_folds(summary["folds_csv"])
  patient = next(by_name[n].patient_id for n, g in chosen.splits[2].items() if g == "test")
  leaked_name = next(
      n for n in chosen.splits[2] if by_name[n].patient_id == patient and n.endswith("-40-001.png")
  )

  def leak(row):
    if row["fold"] == "2" and row["filename"].endswith(leaked_name):
      row["grp"] = "train"
    return row

  path = _rewrite(summary["folds_csv"], tmp_path / "Folds.csv", leak)
  with pytest.raises(UserError, match=rf"fold 2 of .* leaks patient\(s\) {patient}"):
    load_fold(data_config(data_dir, prepared_dir, folds=path, fold=2))
  # Another fold of the same file is usable: the leak of fold 2 is only a warning for it.
  with caplog.at_level(logging.WARNING, logger="jattn.data.pipeline"):
    fold_data = load_fold(data_config(data_dir, prepared_dir, folds=path, fold=1))
  assert len(fold_data.test_indices) > 0
  assert any(f"fold 2 of {path} leaks patient(s) {patient}" in r.getMessage()
             and "fold 1, the one being run, is not affected" in r.getMessage()
             for r in caplog.records)


def test_magnification_without_test_images_is_a_warning(
    tmp_path, synthetic_tree, prepared_dir, records
):
  """Guards against a magnification missing from one fold's test split stopping that fold's run
  (it is reported, and absent from the results) or going unreported."""
  data_dir, summary = synthetic_tree

  def no_400x_test_in_fold_3(row):
    if row["fold"] == "3" and row["mag"] == "400" and row["grp"] == "test":
      return None
    return row

  path = _rewrite(summary["folds_csv"], tmp_path / "Folds.csv", no_400x_test_in_fold_3)
  problems, warnings = folds.check_folds(folds.read_folds(path), records)
  assert problems == []
  assert warnings[0] == (f"fold 3 of {path} has no test images at 400X: that magnification is "
                         f"absent from its results")
  assert len(warnings) == 2 and "leaves out" in warnings[1]
  fold_data = load_fold(data_config(data_dir, prepared_dir, folds=path, fold=3))
  mags = fold_data.strata[0]
  test_mags = {mags.values[m] for m in mags.index[fold_data.test_indices]}
  assert test_mags == {"40X", "100X", "200X"}
  # A magnification-specific run of 400X has nothing to test in fold 3: that is an error.
  with pytest.raises(UserError, match=rf"^fold 3 of {path} has no test images;"):
    load_fold(data_config(data_dir, prepared_dir, folds=path, fold=3, magnifications=("400X",)))


def test_fold_without_training_images_or_a_class_is_refused(records):
  """Guards against training without images, or without a class (a subtype) the model outputs."""
  whole = {r.file_name: "test" for r in records}
  chosen = folds.Folds("x.csv", {k: whole for k in folds.FOLDS})
  by_fold = folds.check_by_fold(chosen, records)
  assert by_fold[1][0] == ["fold 1 of x.csv has no training images"]
  # Fold 1 trains on every image but those of lobular carcinoma (test) and of phyllodes tumour
  # (left out); binary still has both classes, the subtype task lacks two classes.
  split = {r.file_name: "test" if r.subtype == "LC" else "train" for r in records
           if r.subtype != "PT"}
  chosen = folds.Folds("x.csv", {k: split for k in folds.FOLDS})
  assert folds.check_by_fold(chosen, records)[1][0] == []
  assert folds.check_by_fold(chosen, records, task="subtype")[1][0] == [
      "fold 1 of x.csv has no training images of the subtype(s) PT, LC"]
  no_benign = {r.file_name: "test" if r.label == 0 else "train" for r in records}
  with pytest.raises(UserError, match="^fold 2 of y.csv has no training images of the class"
                     r"\(es\) benign; list them with"):
    folds.validate_folds(folds.Folds("y.csv", {k: no_benign for k in folds.FOLDS}), records,
                         fold=2)


def test_missing_folds_are_problems_of_describe_and_of_their_own_runs(records):
  """Guards against `describe` reporting no problem for folds that a run of them refuses
  (an mkfold tree missing fold 3, a Folds.csv without fold 5)."""
  split = {r.file_name: "train" for r in records}
  chosen = folds.Folds("x.csv", {1: split, 2: split, 4: split, 5: split})
  problems, _ = folds.check_folds(chosen, records)
  assert "x.csv has no fold 3 (it has folds 1, 2, 4, 5)" in problems
  with pytest.raises(UserError, match=r"^x.csv has no fold 3 \(it has folds 1, 2, 4, 5\)"):
    folds.validate_folds(chosen, records, fold=3)


def test_mkfold_errors(tmp_path, synthetic_tree):
  source = synthetic_tree[1]["mkfold"]
  bad = tmp_path / "mkfold"
  shutil.copytree(source, bad)
  os.rename(bad / "fold5", bad / "fold6")
  with pytest.raises(UserError, match="expected fold folders fold1..fold5"):
    folds.read_mkfold(str(bad))
  os.rename(bad / "fold6", bad / "fold5")
  moved = next((bad / "fold1" / "train" / "40X").iterdir())
  os.rename(moved, bad / "fold1" / "train" / "100X" / moved.name)
  with pytest.raises(UserError, match=f"{moved.name} sits in 100X/ but its name says 40X"):
    folds.read_mkfold(str(bad))


def test_load_fold_with_each_form_uses_the_same_split(synthetic_tree, prepared_dir):
  data_dir, summary = synthetic_tree
  loaded = [
      load_fold(data_config(data_dir, prepared_dir, folds=spec, fold=2))
      for spec in (summary["folds_csv"], "mkfold", "generated")
  ]
  assert loaded[0].folds_source == summary["folds_csv"]
  assert loaded[1].folds_source == summary["mkfold"]
  assert loaded[2].folds_source.endswith("folds/Folds_generated_seed0.csv")
  for other in loaded[1:]:
    assert (other.train_indices == loaded[0].train_indices).all()
    assert (other.test_indices == loaded[0].test_indices).all()
    assert (other.mean == loaded[0].mean).all()
