"""The bag source (jattn/data/bags.py): features files written here by hand with h5py in CLAM's
layout load as written; folds keep patients apart; each bad file is one line naming its slide."""

from __future__ import annotations

import csv
import os

import h5py
import numpy as np
import pytest

from configs import default
from jattn.core.errors import UserError
from jattn.data import bags as bags_source
from jattn.inference import features
from jattn.training import validate

D = 5
# 10 slides of 7 patients (P1, P2 and P3 have two slides each), two classes
SLIDES = [("S01", "tumour", "P1"), ("S02", "tumour", "P1"), ("S03", "normal", "P2"),
          ("S04", "normal", "P2"), ("S05", "tumour", "P3"), ("S06", "tumour", "P3"),
          ("S07", "normal", "P4"), ("S08", "tumour", "P5"), ("S09", "normal", "P6"),
          ("S10", "normal", "P7")]


def write_clam_h5(path, feats, attrs=None):
  """CLAM's layout (its create_patches_fp / extract_features_fp): `features` [N, D] float32 and
  `coords` [N, 2] int with the attributes patch_level and patch_size."""
  with h5py.File(path, "w") as f:
    f.create_dataset("features", data=feats.astype(np.float32))
    c = f.create_dataset("coords", data=np.stack([np.arange(len(feats)) * 256,
                                                  np.zeros(len(feats), int)], 1))
    c.attrs["patch_level"] = 0
    c.attrs["patch_size"] = 256
    for k, v in (attrs or {}).items():
      f.attrs[k] = v


def cohort(folder, *, width=None, attrs=None, lengths=None):
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  written = {}
  for i, (slide, _, _) in enumerate(SLIDES):
    n = (lengths or {}).get(slide, 3 + i)
    feats = rng.normal(size=(n, (width or {}).get(slide, D)))
    write_clam_h5(folder / f"{slide}.h5", feats, (attrs or {}).get(slide))
    written[slide] = feats.astype(np.float32)
  with open(folder / "slides.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["slide", "label", "patient"])
    w.writerows(SLIDES)
  return written


def config_for(folder, prepared, **fields):
  config = default.get_config()
  config.data.name = "bags"
  config.data.bags.manifest = str(folder / "slides.csv")
  config.data.prepared_dir = str(prepared)
  config.data.num_folds = 3
  config.model.name = "abmil"
  config.pretrained = ""
  config.tie_rule = ""
  for k, v in fields.items():
    node = config
    *parents, last = k.split(".")
    for p in parents:
      node = node[p]
    node[last] = v
  return config


def test_clam_layout_files_load_as_written_and_folds_keep_patients_apart(tmp_path):
  written = cohort(tmp_path / "c")
  seen_test = []
  for fold in (1, 2, 3):
    config = config_for(tmp_path / "c", tmp_path / "p", fold=fold)
    validate.validate_config(config)
    b = bags_source.load_bags(config)
    fd = b.fold
    assert fd.classes == ("normal", "tumour") and fd.group_unit == "patient"
    patient = {s: p for s, _, p in SLIDES}
    train = {patient[fd.file_names[i]] for i in fd.train_indices}
    test = {patient[fd.file_names[i]] for i in fd.test_indices}
    assert not train & test and len(fd.train_indices) + len(fd.test_indices) == len(SLIDES)
    seen_test += [fd.file_names[i] for i in fd.test_indices]
    assert b.dim == D and b.backbone == {"backbone": None, "weights_sha256": None}
    for i, slide in enumerate(fd.file_names):
      np.testing.assert_array_equal(b.features(i), written[slide])
      assert b.coords(i).shape == (len(written[slide]), 2)
    label = dict((s, lab) for s, lab, _ in SLIDES)
    assert [fd.classes[t] for t in fd.targets] == [label[s] for s in fd.file_names]
  assert sorted(seen_test) == sorted(s for s, _, _ in SLIDES)  # each slide tested once
  # the folds were written for reuse under the prepared dir
  assert len(os.listdir(tmp_path / "p" / "folds")) == 1


def test_a_folds_csv_gives_the_split(tmp_path):
  cohort(tmp_path / "c")
  folds = tmp_path / "folds.csv"
  with open(folds, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["fold", "split", "path"])
    for fold, test in ((1, {"P1", "P2"}), (2, {"P3", "P4", "P5", "P6", "P7"})):
      w.writerows([fold, "test" if p in test else "train", s] for s, _, p in SLIDES)
  config = config_for(tmp_path / "c", tmp_path / "p", fold=1, **{"data.folds": str(folds)})
  fd = bags_source.load_fold(config)
  assert [fd.file_names[i] for i in fd.test_indices] == ["S01", "S02", "S03", "S04"]
  config.data.folds_seed = 9  # unused with a folds CSV
  assert bags_source.num_folds(config) == 2


@pytest.mark.parametrize("problem, message", [
    ("missing", r"^slide S04: its features file .*S04\.h5 does not exist"),
    ("empty", r"^slide S04: .*S04\.h5 holds no tiles \(features of shape \(0, 5\)\)"),
    ("width", r"^slide S04: .*S04\.h5 has features of width 7; the other 9 of 10 slides have "
              r"features of width 5"),
    ("backbone", r"^slide S04: .*S04\.h5 has backbone virchow2 \(weights_sha256 bbbbbbbbbbbb\); "
                 r"the other 9 of 10 slides have backbone uni \(weights_sha256 aaaaaaaaaaaa\)"),
    ("not_hdf5", r"^slide S04: .*S04\.h5 is not a readable HDF5 file"),
    ("no_coords", r"^slide S04: .*S04\.h5 has no dataset 'coords'"),
])
def test_a_bad_slide_file_is_one_line_naming_it(tmp_path, problem, message):
  kw = {}
  if problem == "width":
    kw["width"] = {"S04": 7}
  if problem == "backbone":
    kw["attrs"] = {s: {"backbone": "uni", "weights_sha256": "a" * 64} for s, _, _ in SLIDES}
    kw["attrs"]["S04"] = {"backbone": "virchow2", "weights_sha256": "b" * 64}
  if problem == "empty":
    kw["lengths"] = {"S04": 0}
  cohort(tmp_path / "c", **kw)
  path = tmp_path / "c" / "S04.h5"
  if problem == "missing":
    path.unlink()
  if problem == "not_hdf5":
    path.write_text("slide,label\n")
  if problem == "no_coords":
    with h5py.File(path, "a") as f:
      del f["coords"]
  config = config_for(tmp_path / "c", tmp_path / "p")
  with pytest.raises(UserError, match=message) as e:
    bags_source.check_data_dir(config)
  assert "\n" not in str(e.value)
  assert not (tmp_path / "p").exists()  # nothing written


def test_files_written_by_jattn_features_writer_load_with_their_backbone(tmp_path):
  """The writer of `jattn features --slides` (float16 features, the backbone attributes)."""
  folder = tmp_path / "c"
  written = cohort(folder)
  for slide, feats in written.items():
    features.write_h5(str(folder / f"{slide}.h5"), feats.astype(np.float16),
                      {"backbone": "uni", "weights_sha256": "c" * 64, "feature_dim": D},
                      {"coords": np.zeros((len(feats), 2), np.int64)},
                      coords_attrs={"patch_size_level0": 224})
  b = bags_source.load_bags(config_for(folder, tmp_path / "p"))
  assert b.backbone == {"backbone": "uni", "weights_sha256": "c" * 64}
  i = b.fold.file_names.index("S03")
  np.testing.assert_array_equal(b.features(i), written["S03"].astype(np.float16))
  assert b.features(i).dtype == np.float32
