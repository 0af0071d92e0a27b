"""The synthetic BreakHis tree: real layout and patients, right counts, determinism, learnable."""

from __future__ import annotations

import collections
import io
import os

import numpy as np
import pytest
from conftest import SMALL_PATIENTS, image_file, small_tree
from PIL import Image

from jattn.core.errors import UserError
from jattn.data import breakhis
from jattn.data.breakhis import scan, synthetic


def test_counts_by_class_subtype_and_magnification(synthetic_tree):
  data_dir, summary = synthetic_tree
  found = scan.scan(data_dir)
  assert not found.problems
  assert len(found.records) == summary["images"] == 82 * 4
  by_subtype = collections.Counter((r.subtype, r.magnification) for r in found.records)
  for code in breakhis.SUBTYPE_CODES:
    for mag in breakhis.MAGNIFICATIONS:
      assert by_subtype[code, mag] == summary["by_subtype"][code][mag]
  patients = {r.patient_id: (r.subtype, r.label) for r in found.records}
  assert patients == {p.patient_id: (p.subtype, p.label) for p in breakhis.patients()}
  by_class = collections.Counter(r.label for r in found.records)
  real = collections.Counter(p.label for p in breakhis.patients())
  assert by_class == {label: 4 * n for label, n in real.items()}
  for patient_id in patients:
    mags = {r.magnification for r in found.records if r.patient_id == patient_id}
    assert mags == set(breakhis.MAGNIFICATIONS)


def test_junk_is_written_and_ignored(synthetic_tree):
  data_dir, summary = synthetic_tree
  found = scan.scan(data_dir)
  under_slides = {j for j in summary["junk"] if j.startswith(breakhis.SLIDES)}
  assert {os.path.basename(j) for j in summary["junk"]} >= {"Thumbs.db", ".DS_Store", "README.txt"}
  assert any(os.path.basename(j).startswith("._") for j in under_slides)
  assert set(found.ignored) == under_slides
  for junk in summary["junk"]:
    assert os.path.isfile(image_file(data_dir, junk))


def test_images_are_rgb_pngs_and_a_few_have_odd_sizes(synthetic_tree):
  data_dir, summary = synthetic_tree
  odd = set(summary["odd_sized"])
  assert len(odd) == 3
  for record in scan.scan(data_dir).records[::7] + tuple(
      r for r in scan.scan(data_dir).records if r.path in odd
  ):
    with Image.open(image_file(data_dir, record.path)) as im:
      assert im.format == "PNG" and im.mode == "RGB"
      assert (im.size != (64, 42)) == (record.path in odd)


def test_deterministic_for_a_seed(tmp_path):
  a = small_tree(tmp_path / "a", seed=3)
  b = small_tree(tmp_path / "b", seed=3)
  c = small_tree(tmp_path / "c", seed=4)
  records = scan.scan(a).records
  assert len(records) == len(SMALL_PATIENTS) * 4
  same, different = 0, 0
  for r in records:
    data = [open(image_file(d, r.path), "rb").read() for d in (a, b, c)]
    same += data[0] == data[1]
    different += data[0] != data[2]
  assert same == len(records) and different == len(records)
  assert open(os.path.join(a, "Folds.csv")).read() == open(os.path.join(b, "Folds.csv")).read()


def test_real_counts_match_the_release():
  counts = synthetic.real_counts(seed=0)
  assert set(counts) == {p.patient_id for p in breakhis.patients()}
  for code in breakhis.SUBTYPE_CODES:
    ids = [p.patient_id for p in breakhis.patients() if p.subtype == code]
    for m, mag in enumerate(breakhis.MAGNIFICATIONS):
      assert sum(counts[i][mag] for i in ids) == breakhis.COUNTS[code][m]
      assert min(counts[i][mag] for i in ids) >= 1
  assert sum(sum(c.values()) for c in counts.values()) == breakhis.NUM_IMAGES
  assert synthetic.real_counts(seed=0) == counts != synthetic.real_counts(seed=1)


def _auc(scores, labels):
  pos, neg = scores[labels == 1], scores[labels == 0]
  return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


def test_classes_differ_at_low_resolution_but_overlap(synthetic_tree):
  """At 48 px a single crude feature (spread of the red channel: dark nuclei on pink) ranks
  malignant above benign most of the time, but not always: learnable, not trivial."""
  data_dir, _ = synthetic_tree
  records = scan.scan(data_dir).records
  spread, labels = [], []
  for r in records:
    with Image.open(image_file(data_dir, r.path)) as im:
      small = np.asarray(im.convert("RGB").resize((48, 48), Image.Resampling.BILINEAR), float)
    spread.append(small[..., 0].std())
    labels.append(r.label)
  auc = _auc(np.array(spread), np.array(labels))
  assert 0.75 < auc < 0.99


def test_refuses_to_write_over_an_existing_tree(synthetic_tree):
  with pytest.raises(UserError, match="BreaKHis_v1 already exists"):
    synthetic.synthesize(synthetic_tree[0], images_per_patient=1)


def test_encode_png_round_trips():
  image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  with Image.open(io.BytesIO(synthetic.encode_png(image))) as im:
    np.testing.assert_array_equal(np.asarray(im), image)
