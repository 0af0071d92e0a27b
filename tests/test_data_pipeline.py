"""load_fold, the decoded-image cache, the normalisation stats, and the train and test batches."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import data_config, image_file
from PIL import Image

from jattn.core.errors import UserError
from jattn.data import FoldData, load_fold, prepare, steps_per_epoch, test_batches, train_batches
from jattn.data.breakhis import MAGNIFICATIONS, SUBTYPE_CODES, scan


def test_fold_data_holds_every_image_and_a_patient_disjoint_split(synthetic_tree, fold_data):
  data_dir, _ = synthetic_tree
  records = {r.file_name: r for r in scan.scan(data_dir).records}
  d = fold_data
  assert isinstance(d, FoldData) and d.fold == 1
  assert isinstance(d.images, np.memmap) and d.images.dtype == np.uint8
  assert d.images.shape == (len(records), 16, 16, 3)
  assert sorted(d.file_names) == sorted(records)
  for i, name in enumerate(d.file_names):
    r = records[name]
    assert d.targets[i] == r.label
    assert SUBTYPE_CODES[d.subclasses.index[i]] == r.subtype
    assert MAGNIFICATIONS[d.strata[0].index[i]] == r.magnification
    assert d.group_ids[d.groups[i]] == r.patient_id
  for a in (d.targets, d.subclasses.index, d.strata[0].index, d.groups):
    assert a.dtype == np.int32
  train, test = d.train_indices, d.test_indices
  assert train.dtype == test.dtype == np.int64
  assert (np.diff(train) > 0).all() and (np.diff(test) > 0).all()
  assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(records)))
  assert not set(d.groups[train].tolist()) & set(d.groups[test].tolist())
  assert set(d.strata[0].index[test].tolist()) == {0, 1, 2, 3}
  assert d.skipped == () and d.folds_source.endswith("Folds_generated_seed0.csv")


def test_cache_holds_the_resized_images(synthetic_tree, fold_data):
  data_dir, summary = synthetic_tree
  paths = {r.file_name: r.path for r in scan.scan(data_dir).records}
  odd = {p.rsplit("/", 1)[-1] for p in summary["odd_sized"]}
  names = [n for n in fold_data.file_names if n in odd] + list(fold_data.file_names[:5])
  for name in names:
    i = fold_data.file_names.index(name)
    with open(image_file(data_dir, paths[name]), "rb") as f:
      expected = prepare.decode_resize(f.read(), 16)
    np.testing.assert_array_equal(fold_data.images[i], expected)


def test_mean_and_std_are_those_of_the_training_images(fold_data, prepared_dir):
  pixels = np.asarray(fold_data.images[fold_data.train_indices], np.float64).reshape(-1, 3)
  np.testing.assert_allclose(fold_data.mean, pixels.mean(axis=0), rtol=1e-5)
  np.testing.assert_allclose(fold_data.std, pixels.std(axis=0), rtol=1e-5)
  assert fold_data.mean.dtype == fold_data.std.dtype == np.float32
  stats = os.listdir(os.path.join(prepared_dir, "stats"))
  assert any(s.startswith("Folds_generated_seed0-") and s.endswith("_fold1_16.json") for s in stats)


def test_second_load_reuses_everything(synthetic_tree, fold_data, prepared_dir):
  cache = os.path.join(prepare.cache_dir(prepared_dir, 16), "images.npy")
  before = os.stat(cache).st_mtime_ns
  again = load_fold(data_config(synthetic_tree[0], prepared_dir))
  assert os.stat(cache).st_mtime_ns == before
  np.testing.assert_array_equal(again.images, fold_data.images)
  np.testing.assert_array_equal(again.test_indices, fold_data.test_indices)
  np.testing.assert_array_equal(again.mean, fold_data.mean)


@pytest.mark.parametrize("batch_size", [1, 7, 20, 25, 1000])
def test_test_batches_yield_every_test_image_once(fold_data, batch_size):
  n = len(fold_data.test_indices)
  batches = list(test_batches(fold_data, batch_size))
  assert len(batches) == -(-n // batch_size)
  seen = []
  for b in batches:
    assert b["image"].shape == (batch_size, 16, 16, 3) and b["image"].dtype == np.uint8
    for key in ("label", "group", "index"):
      assert b[key].shape == (batch_size,) and b[key].dtype == np.int32
    assert b["mask"].dtype == bool
    index = b["index"]
    np.testing.assert_array_equal(b["image"], fold_data.images[index])
    np.testing.assert_array_equal(b["label"], fold_data.targets[index])
    np.testing.assert_array_equal(b["group"], fold_data.groups[index])
    seen.extend(index[b["mask"]].tolist())
  assert seen == fold_data.test_indices.tolist()  # each once, in a fixed (sorted) order
  padding = sum(int((~b["mask"]).sum()) for b in batches)
  assert padding == (-n) % batch_size
  assert all(b["mask"][: batch_size - padding].all() for b in batches[-1:])


def test_test_batches_of_chosen_indices(fold_data):
  chosen = fold_data.train_indices[::9]
  seen = [i for b in test_batches(fold_data, 4, indices=chosen) for i in b["index"][b["mask"]]]
  assert seen == sorted(chosen.tolist())
  assert list(test_batches(fold_data, 4, indices=np.array([], np.int64))) == []


def _epoch(fold_data, batch_size, **kwargs):
  return [b for b in train_batches(fold_data, batch_size, **kwargs)]


def test_train_batches_are_a_pure_function_of_seed_and_epoch(fold_data):
  batch_size = 16
  steps = steps_per_epoch(fold_data, batch_size)
  assert steps == len(fold_data.train_indices) // batch_size
  first = _epoch(fold_data, batch_size, seed=0, epoch=0)
  assert len(first) == steps
  for b in first:
    assert b["image"].shape == (batch_size, 16, 16, 3) and b["image"].dtype == np.uint8
    assert b["label"].shape == (batch_size,) and b["label"].dtype == np.int32
  again = _epoch(fold_data, batch_size, seed=0, epoch=0, num_threads=1)
  for a, b in zip(first, again, strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])

  def order(batches):
    return np.concatenate([b["image"].reshape(len(b["image"]), -1) for b in batches])

  # One epoch: distinct training images (the last partial batch dropped), a fresh permutation.
  train_pixels = {fold_data.images[i].tobytes() for i in fold_data.train_indices}
  epoch0 = [row.tobytes() for row in order(first)]
  assert len(set(epoch0)) == steps * batch_size and set(epoch0) <= train_pixels
  epoch1 = [row.tobytes() for row in order(_epoch(fold_data, batch_size, seed=0, epoch=1))]
  other_seed = [row.tobytes() for row in order(_epoch(fold_data, batch_size, seed=1, epoch=0))]
  assert epoch1 != epoch0 and other_seed != epoch0 and other_seed != epoch1


def test_start_step_resumes_exactly(fold_data):
  full = _epoch(fold_data, 8, seed=3, epoch=2)
  for start in (0, 1, 5, len(full) - 1, len(full)):
    resumed = _epoch(fold_data, 8, seed=3, epoch=2, start_step=start)
    assert len(resumed) == len(full) - start
    for a, b in zip(full[start:], resumed, strict=True):
      np.testing.assert_array_equal(a["image"], b["image"])
      np.testing.assert_array_equal(a["label"], b["label"])


def test_batch_larger_than_the_training_set(fold_data):
  too_big = len(fold_data.train_indices) + 1
  assert steps_per_epoch(fold_data, too_big) == 0
  with pytest.raises(UserError, match=f"batch_size {too_big} exceeds the"):
    train_batches(fold_data, too_big, seed=0, epoch=0)


def test_demo_generates_its_data_set_once(tmp_path):
  """Guards against a broken demo (`configs/demo.py`, the README's first command): with
  `synthetic.enabled` an empty data dir gets a synthetic BreakHis tree of the 82 patients and the
  configured size, which the fold is then read from; a second run generates nothing."""
  config = data_config(str(tmp_path / "demo"))
  config.data.breakhis.synthetic.update(enabled=True, images_per_patient=1, width=24, height=16,
                                        seed=0)
  d = load_fold(config)
  assert len(d.group_ids) == 82 and len(d.file_names) == 82 * len(MAGNIFICATIONS)
  assert len(d.train_indices) + len(d.test_indices) == len(d.file_names)
  assert set(d.strata[0].index.tolist()) == set(range(len(MAGNIFICATIONS)))
  records = scan.scan(str(tmp_path / "demo")).records
  assert sorted(r.file_name for r in records) == sorted(d.file_names)
  with Image.open(image_file(str(tmp_path / "demo"), records[0].path)) as image:
    assert abs(image.size[0] - 24) <= 12 and abs(image.size[1] - 16) <= 10  # a few are odd-sized
  written = [os.path.join(root, n) for root, _, names in os.walk(tmp_path / "demo") for n in names]
  stamps = {p: os.path.getmtime(p) for p in written if "BreaKHis_v1" in p}
  load_fold(config)
  assert {p: os.path.getmtime(p) for p in stamps} == stamps
