"""BreakHis file names, and how the scan of a tree reports names and folders that break them."""

from __future__ import annotations

import os
import shutil

import pytest
from conftest import image_file, small_tree

from jattn.data import breakhis
from jattn.data.breakhis import scan


@pytest.mark.parametrize(
    "name, label, subtype, patient_id, magnification, sequence",
    [
        ("SOB_B_TA-14-4659-40-001.png", 0, "TA", "TA-14-4659", "40X", 1),
        ("SOB_M_DC-14-2523-400-012.png", 1, "DC", "DC-14-2523", "400X", 12),
        ("SOB_B_A-14-22549AB-100-005.png", 0, "A", "A-14-22549AB", "100X", 5),
        ("SOB_B_A-14-22549CD-200-031.png", 0, "A", "A-14-22549CD", "200X", 31),
        ("SOB_B_A-14-22549G-40-002.png", 0, "A", "A-14-22549G", "40X", 2),
        ("SOB_B_PT-14-21998AB-40-010.png", 0, "PT", "PT-14-21998AB", "40X", 10),
        ("SOB_M_PC-14-15687B-100-003.png", 1, "PC", "PC-14-15687B", "100X", 3),
    ],
)
def test_parse_real_names(name, label, subtype, patient_id, magnification, sequence):
  parsed = breakhis.parse_file_name(name)
  assert (parsed.label, parsed.subtype, parsed.patient_id) == (label, subtype, patient_id)
  assert (parsed.magnification, parsed.sequence) == (magnification, sequence)


def test_ids_sharing_digits_are_different_patients():
  names = [
      "SOB_B_A-14-22549AB-40-001.png",
      "SOB_B_A-14-22549CD-40-001.png",
      "SOB_B_A-14-22549G-40-001.png",
  ]
  ids = [breakhis.parse_file_name(n).patient_id for n in names]
  assert ids == ["A-14-22549AB", "A-14-22549CD", "A-14-22549G"]
  folders = [breakhis.patient_folder(i) for i in ids]
  assert folders == ["SOB_B_A_14-22549AB", "SOB_B_A_14-22549CD", "SOB_B_A_14-22549G"]


def test_image_path_round_trips_for_every_patient():
  for patient in breakhis.patients():
    path = breakhis.image_path(patient.patient_id, "200X", 7)
    record = breakhis.record(path)
    assert record.patient_id == patient.patient_id
    assert record.label == patient.label and record.subtype == patient.subtype
    assert path.split("/")[-2] == "200X" and record.sequence == 7


@pytest.mark.parametrize(
    "name",
    [
        "SOB_B_TA-14-4659-40.png",  # no sequence number
        "SOB_B_TA-14-4659-50-001.png",  # no such magnification
        "SOB_M_TA-14-4659-40-001.png",  # malignant class, benign subtype
        "SOB_B_XX-14-4659-40-001.png",  # unknown subtype
        "sob_b_ta-14-4659-40-001.png",  # lower case
        "SOB_B_TA-14-4659-40-001.jpg",
        "image.png",
    ],
)
def test_bad_names_raise_naming_the_file(name):
  with pytest.raises(ValueError, match=name.replace(".", r"\.")):
    breakhis.parse_file_name(name)


def test_counts_table_sums_to_the_release():
  assert sum(sum(c) for c in breakhis.COUNTS.values()) == breakhis.NUM_IMAGES
  assert set(breakhis.COUNTS) == set(breakhis.SUBTYPE_CODES)
  assert len(breakhis.patients()) == 82


def test_scan_reports_bad_names_junk_and_folder_disagreement(tmp_path):
  data_dir = small_tree(tmp_path, junk=True)
  before = scan.scan(data_dir)
  assert not before.problems
  good = before.records[0]
  folder = os.path.dirname(image_file(data_dir, good.path))
  # A misnamed PNG, junk of every kind, and a well-named file in another patient's folder.
  shutil.copy(image_file(data_dir, good.path), os.path.join(folder, "scan 0001.png"))
  for junk in ("Thumbs.db", ".DS_Store", "._" + good.file_name, "notes.txt", "x.PNG.txt"):
    with open(os.path.join(folder, junk), "wb") as f:
      f.write(b"\x00junk")
  stray = next(r for r in before.records if r.patient_id != good.patient_id)
  shutil.move(image_file(data_dir, stray.path), os.path.join(folder, stray.file_name))

  after = scan.scan(data_dir)
  problems = "\n".join(after.problems)
  assert "scan 0001.png" in problems and "unparseable" in problems
  assert f"folder disagrees with name: {os.path.dirname(good.path)}/{stray.file_name}" in problems
  assert len(after.problems) == 2
  # The misnamed file is left out; the stray one is kept (its name decides); junk is ignored.
  assert {r.file_name for r in after.records} == {r.file_name for r in before.records}
  for junk in ("Thumbs.db", ".DS_Store", "._" + good.file_name, "notes.txt"):
    assert f"{os.path.dirname(good.path)}/{junk}" in after.ignored


def test_scan_reports_duplicate_names(tmp_path):
  data_dir = small_tree(tmp_path, junk=False)
  before = scan.scan(data_dir)
  first = before.records[0]
  other = next(r for r in before.records if r.patient_id != first.patient_id)
  copy = os.path.join(os.path.dirname(image_file(data_dir, other.path)), first.file_name)
  shutil.copy(image_file(data_dir, first.path), copy)
  after = scan.scan(data_dir)
  assert [r.file_name for r in after.records] == [r.file_name for r in before.records]
  assert len(after.problems) == 1
  assert "duplicate file name" in after.problems[0] and first.file_name in after.problems[0]
