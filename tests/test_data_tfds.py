"""The TFDS builder and its preparation: records, corrupt files, missing or changed data."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import data_config, image_file, small_tree
from PIL import Image
from tensorflow_datasets.core import shuffle

from jattn.core.errors import UserError
from jattn.data import breakhis, load_fold
from jattn.data.breakhis import scan, tfds_builder
from tests.runs import REPO


def test_jattn_does_not_import_tensorflow():
  """jattn reads its TFDS data set without TensorFlow, and must work the same whether a user has
  TensorFlow installed or not: no jattn module may import it (directly or through TFDS)."""
  code = ("import importlib, pkgutil, sys, jattn\n"  # every module but the one that runs the CLI
          "for m in pkgutil.walk_packages(jattn.__path__, 'jattn.'):\n"
          "  if m.name != 'jattn.__main__': importlib.import_module(m.name)\n"
          "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow'))")
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
  assert run.returncode == 0, run.stderr
  assert run.stdout.strip() == "[]"


def test_builder_reads_back_every_image_as_written(synthetic_tree, fold_data, prepared_dir):
  data_dir, _ = synthetic_tree
  builder = tfds_builder.make_builder(prepared_dir)
  assert builder.info.version == "1.0.0"
  assert list(builder.info.splits) == [tfds_builder.SPLIT]
  raw = builder.as_data_source(split="all", decoders={"image": tfds.decode.SkipDecoding()})
  records = {r.file_name: r for r in scan.scan(data_dir).records}
  assert len(raw) == len(records)
  seen = set()
  for example in raw:
    name = example["file_name"].decode()
    r = records[name]
    with open(image_file(data_dir, r.path), "rb") as f:
      assert example["image"] == f.read()  # PNG bytes stored as published
    assert example["label"] == r.label
    assert breakhis.SUBTYPE_CODES[example["subtype"]] == r.subtype
    assert example["patient_id"].decode() == r.patient_id
    assert breakhis.MAGNIFICATIONS[example["magnification"]] == r.magnification
    seen.add(name)
  assert seen == set(records)
  # Decoded by TFDS (PIL, no TensorFlow): the pixels of the file, any size.
  decoded = builder.as_data_source(split="full")
  example = decoded[0]
  r = records[example["file_name"].decode()]
  with Image.open(image_file(data_dir, r.path)) as im:
    np.testing.assert_array_equal(example["image"], np.asarray(im.convert("RGB")))
  assert builder.info.metadata["skipped"] == [] and builder.info.metadata["problems"] == []
  assert "breakhis" in tfds_builder.Breakhis.MANUAL_DOWNLOAD_INSTRUCTIONS.lower()


def test_missing_or_empty_data_dir_says_what_to_download(tmp_path):
  for data_dir in (tmp_path / "nowhere", tmp_path):
    with pytest.raises(UserError) as e:
      load_fold(data_config(str(data_dir)))
    message = str(e.value)
    assert str(data_dir) in message and "BreaKHis_v1.tar.gz" in message
    assert breakhis.DOWNLOAD_URL in message
    assert "BreaKHis_v1/histology_slides" in message and "--config.data.dir=DIR" in message
    assert "\n" not in message
  assert os.listdir(tmp_path) == []  # nothing created in a wrong folder


def test_data_dir_inside_the_tree_is_pointed_out(synthetic_tree):
  inner = os.path.join(synthetic_tree[0], "BreaKHis_v1")
  with pytest.raises(UserError, match="set --config.data.dir to the folder that holds BreaKHis_v1"):
    load_fold(data_config(inner))


def _truncate(path):
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])


def test_corrupt_png_stops_or_is_skipped(tmp_path, caplog):
  data_dir = small_tree(tmp_path / "data")
  victim = scan.scan(data_dir).records[5]
  _truncate(image_file(data_dir, victim.path))
  prepared = str(tmp_path / "prepared")
  config = data_config(data_dir, prepared, folds=os.path.join(data_dir, "Folds.csv"))

  with pytest.raises(UserError, match=rf"{victim.path} is not a readable image.*skip_corrupt"):
    load_fold(config)
  tfds_dir = os.path.join(prepared, "tfds", "breakhis")
  assert not os.path.exists(tfds_dir) or os.listdir(tfds_dir) == []  # nothing half-written

  config.data.skip_corrupt = True
  with caplog.at_level(logging.WARNING):
    fold_data = load_fold(config)
  assert fold_data.skipped == (victim.path,)
  assert victim.file_name not in fold_data.file_names
  assert fold_data.num_images == len(scan.scan(data_dir).records) - 1
  assert any("dropped 1 unreadable" in m and victim.file_name in m for m in caplog.messages)
  with open(os.path.join(prepared, "tfds", "breakhis", "1.0.0", "metadata.json")) as f:
    assert victim.path in f.read()

  config.data.skip_corrupt = False
  with pytest.raises(UserError, match=rf"leaves out 1 unreadable image\(s\) \({victim.path}\)"):
    load_fold(config)


def test_archive_is_unpacked_once(tmp_path):
  tree = small_tree(tmp_path / "tree", junk=False)
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  with tarfile.open(data_dir / breakhis.ARCHIVE, "w:gz") as tar:
    tar.add(os.path.join(tree, breakhis.ROOT), arcname=breakhis.ROOT)
  fold_data = load_fold(data_config(str(data_dir)))
  assert fold_data.num_images == len(scan.scan(tree).records)
  assert sorted(os.listdir(data_dir)) == sorted([breakhis.ARCHIVE, breakhis.ROOT, "jattn_prepared"])
  assert scan.extract_archive(str(data_dir)) is False  # already there


def test_changed_tree_is_never_used_with_a_stale_cache(tmp_path):
  data_dir = small_tree(tmp_path / "data", junk=False)
  config = data_config(data_dir)
  first = load_fold(config)
  removed = scan.scan(data_dir).records[0]
  os.remove(image_file(data_dir, removed.path))
  with pytest.raises(UserError, match=rf"changed since .*jattn_prepared.* {removed.path}.*delete"):
    load_fold(config)
  assert first.num_images == len(scan.scan(data_dir).records) + 1


_LOAD = """
import sys
from conftest import data_config
from jattn.data import load_fold
d = load_fold(data_config(sys.argv[1]))
print("indices", d.test_indices.tolist(), d.mean.tolist())
"""


def test_concurrent_runs_prepare_once(tmp_path):
  """Runs of a sweep that start together share one preparation (under the prepared dir's lock)."""
  data_dir = small_tree(tmp_path / "data", junk=False)
  here = os.path.dirname(os.path.abspath(__file__))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.path.dirname(here)])}
  runs = [
      subprocess.Popen(
          [sys.executable, "-c", _LOAD, data_dir], env=env, stdout=subprocess.PIPE, text=True
      )
      for _ in range(3)
  ]
  outputs = [run.communicate(timeout=120)[0] for run in runs]
  assert [run.returncode for run in runs] == [0, 0, 0]
  assert sum(out.count(f"preparing 64 images from {data_dir}") for out in outputs) == 1
  results = {line for out in outputs for line in out.splitlines() if line.startswith("indices")}
  assert len(results) == 1
  leftovers = os.listdir(os.path.join(data_dir, "jattn_prepared", "cache", "16"))
  assert sorted(leftovers) == ["images.npy", "records.json"]


def test_data_larger_than_the_shuffle_buffer_needs_no_tensorflow(tmp_path, monkeypatch):
  """BreakHis' 4 GB pass TFDS' 1 GB in-memory shuffle buffer; its spill files then go through
  tf.io.gfile, which the builder replaces. A tiny buffer forces that path here."""
  monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 10_000)
  data_dir = small_tree(tmp_path / "data", junk=False)
  fold_data = load_fold(data_config(data_dir))
  assert fold_data.num_images == len(scan.scan(data_dir).records)
  builder = tfds_builder.make_builder(os.path.join(data_dir, "jattn_prepared"))
  names = {ex["file_name"].decode() for ex in builder.as_data_source(split="all")}
  assert names == set(fold_data.file_names)
  assert shuffle.tf is not tfds_builder._LOCAL_TF  # put back after preparation
