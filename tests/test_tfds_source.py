"""The TFDS source on small builders defined here, prepared as array_record and read
back from their files alone: labels, groups, strata, splits and generated folds checked against
what the builders generated, and the bad inputs one line."""

from __future__ import annotations

import io
import json
import os
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from jattn import main
from jattn.data import load_fold
from tests.conftest import data_config
from tests.runs import DEMO, tiny_overrides
from tests.test_hostile import one_line_error, snapshot

SIZE = 20  # the generated images' size: the cache holds them as generated, no resizing
CLASSES = ("normal", "stroma", "tumour")


def _png(pixels: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format="PNG")
  return out.getvalue()


def _image(split: str, i: int) -> np.ndarray:
  return np.random.default_rng([len(split), i]).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def patient(split: str, i: int) -> str:
  return f"{split}-p{i // 3}"


class TinyPatches(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """3 classes, a patient and a centre per image; a train and a test split."""

  VERSION = tfds.core.Version("1.0.0")
  SPLITS = {"train": 24, "test": 9}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)  # TFDS 4.9.10 cannot find it for a builder outside a package

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(SIZE, SIZE, 3), encoding_format="png"),
        "label": tfds.features.ClassLabel(names=CLASSES),
        "patient_id": tfds.features.Text(),
        "centre": tfds.features.ClassLabel(names=["A", "B"]),
    }), supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    return {s: self._generate_examples(s) for s in self.SPLITS}

  def _generate_examples(self, split):
    for i in range(self.SPLITS[split]):
      yield f"{split}{i}", {"image": _png(_image(split, i)), "label": (i // 3) % 3,
                            "patient_id": patient(split, i), "centre": i % 2}


class Unnamed(TinyPatches, skip_registration=True):
  """Like patch_camelyon: a label with numbered classes only, no group; one split."""

  SPLITS = {"train": 12}

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "image": tfds.features.Image(shape=(SIZE, SIZE, 3), encoding_format="png"),
        "label": tfds.features.ClassLabel(num_classes=2),
    }), supervised_keys=("image", "label"))

  def _generate_examples(self, split):
    for i in range(self.SPLITS[split]):
      yield str(i), {"id": f"{split}_{i}", "image": _png(_image(split, i)), "label": i % 2}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("tfds"))
  for cls in (TinyPatches, Unnamed):
    cls(data_dir=folder, file_format="array_record").download_and_prepare()
  return folder


def _config(tfds_dir, prepared, name="tiny_patches", **kw):
  return data_config(tfds_dir, str(prepared), dataset=f"tfds:{name}", image_size=SIZE, **kw)


def _generated(split: str) -> dict[bytes, tuple]:
  """Each generated image's bytes -> (label, patient, centre), as the builder wrote them."""
  return {_image(split, i).tobytes(): ((i // 3) % 3, patient(split, i), "AB"[i % 2])
          for i in range(TinyPatches.SPLITS[split])}


def test_the_train_and_test_splits_of_a_prepared_builder(tfds_dir, tmp_path):
  d = load_fold(_config(tfds_dir, tmp_path, folds="splits", strata="centre"))
  assert d.source == "tfds:tiny_patches" and d.classes == CLASSES and d.group_unit == "patient"
  assert d.strata[0].name == "centre" and d.strata[0].values == ("A", "B")
  for split, indices in (("train", d.train_indices), ("test", d.test_indices)):
    truth = _generated(split)
    assert len(indices) == len(truth)
    seen = set()
    for i in indices:
      assert d.file_names[i].startswith(f"{split}/")
      image = np.asarray(d.images[i]).tobytes()
      label, group, centre = truth[image]  # the pixels as generated, with their features
      assert d.targets[i] == label and d.group_ids[d.groups[i]] == group
      assert d.strata[0].values[d.strata[0].index[i]] == centre
      seen.add(image)
    assert seen == set(truth)


def test_generated_folds_over_the_train_split(tfds_dir, tmp_path):
  folds = [load_fold(_config(tfds_dir, tmp_path, folds="generated", num_folds=4, fold=k))
           for k in (1, 2, 3, 4)]
  truth = _generated("train")
  tested = []
  for d in folds:
    assert len(d.train_indices) + len(d.test_indices) == len(truth)  # the test split not read
    sides = [{d.group_ids[g] for g in d.groups[idx]} for idx in (d.train_indices, d.test_indices)]
    assert not sides[0] & sides[1]
    assert {truth[np.asarray(d.images[i]).tobytes()][1] for i in d.test_indices} == sides[1]
    tested += sorted(sides[1])
  assert sorted(tested) == sorted({p for _, p, _ in truth.values()})  # each patient tested once


def test_numbered_classes_and_no_group(tfds_dir, tmp_path, capsys):
  d = load_fold(_config(tfds_dir, tmp_path, name="unnamed", num_folds=3,
                        positive_class="1", tie_rule="0"))
  assert d.classes == ("0", "1") and d.binary.positive_name == "1"
  assert d.group_ids == tuple(sorted(d.file_names)) and d.strata[0].values == ("unnamed",)
  assert re.search(r"jattn: warning: tfds:unnamed .* has no group feature "
                   r"\(--config\.data\.tfds\.group\): "
                   r"every image is its own group", capsys.readouterr().err)


def test_a_run_on_a_prepared_builder(tfds_dir, tmp_path):
  """Trained and evaluated through the command line (the plain VGG19 row of the demo)."""
  workdir = tmp_path / "run"
  overrides = tiny_overrides(tfds_dir, str(tmp_path / "prepared"), dataset="tfds:tiny_patches",
                             folds="splits", strata="centre",
                             **{"model.num_classes": 3, "num_epochs": 1, "batch_size": 8})
  main.main(["--config", f"{DEMO}:vgg19", "--workdir", str(workdir),
             *[f"--config.{o}" for o in overrides]])
  with open(workdir / "results.json") as f:
    r = json.load(f)
  assert r["source"] == "tfds:tiny_patches" and r["classes"] == list(CLASSES)
  assert r["num_images"] == {"A": 5, "B": 4} and r["num_groups"] == {"A": 3, "B": 3}
  assert r["data"]["num_train_images"] == 24


def _refused(tmp_path, capsys, pattern, data_dir, **kw):
  args = ["--config", DEMO, "--workdir", str(tmp_path / "run"),
          *[f"--config.{o}" for o in tiny_overrides(data_dir, "", **kw)]]
  before = snapshot(data_dir)
  one_line_error(lambda: main.main(args), capsys, "jattn train", pattern)
  assert snapshot(data_dir) == before and not (tmp_path / "run").exists()


def test_a_data_set_that_is_not_prepared(tfds_dir, tmp_path, capsys):
  _refused(tmp_path, capsys, rf"--config\.data\.name=tfds:colorectal_histology: no prepared TFDS "
           rf"data set colorectal_histology in --config\.data\.dir={re.escape(tfds_dir)}; prepare "
           r"it once \(this needs TensorFlow and, for most data sets, internet\): `tfds build "
           rf"colorectal_histology --data_dir={re.escape(tfds_dir)} --file_format=array_record`",
           tfds_dir, dataset="tfds:colorectal_histology")


def test_splits_of_a_data_set_without_a_test_split(tfds_dir, tmp_path, capsys):
  _refused(tmp_path, capsys, r"--config\.data\.folds=splits: tfds:unnamed has no test split \(its "
           r"splits: train\); use --config\.data\.folds=generated", tfds_dir,
           dataset="tfds:unnamed", folds="splits", tie_rule="0")


def test_a_data_set_prepared_again_differently_is_refused(tfds_dir, tmp_path):
  from jattn.core.errors import UserError

  config = _config(tfds_dir, tmp_path / "p", name="unnamed", num_folds=3, tie_rule="0")
  load_fold(config)
  info_path = os.path.join(tfds_dir, "unnamed", "1.0.0", "dataset_info.json")
  with open(info_path) as f:
    original = f.read()
  info = json.loads(original)
  info["splits"][0]["numBytes"] = str(int(info["splits"][0]["numBytes"]) + 1)
  try:
    with open(info_path, "w") as f:
      json.dump(info, f)
    with pytest.raises(UserError, match=r"the images of tfds:unnamed .* changed since .* was "
                       r"prepared from them .*: delete .* to prepare again"):
      load_fold(config)
  finally:
    with open(info_path, "w") as f:
      f.write(original)
