"""Macenko stain normalisation: the stains of an image built from two known stains by the
Beer-Lambert law, the identity on an image's own reference, another staining mapped back onto the
reference, and a run that fits, records, checkpoints and applies its reference everywhere."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from jattn import cli, main
from jattn.core import config_lib
from jattn.core.errors import UserError
from jattn.data import load_fold, stain
from jattn.inference import predict, runs
from jattn.training import validate
from tests.conftest import small_tree
from tests.runs import DEMO, tiny_overrides

# Two stains' optical density per unit concentration in R, G, B (unit vectors): a purple
# haematoxylin (absorbs red and green) and a pink eosin (mostly green), as synthetic.py's.
H = np.array([0.56, 0.77, 0.31]) / np.linalg.norm([0.56, 0.77, 0.31])
E = np.array([0.16, 0.85, 0.50]) / np.linalg.norm([0.16, 0.85, 0.50])


def two_stain_image(stains=(H, E), scale=(1.0, 1.0), size=64, seed=0):
  """(uint8 image [size, size, 3], concentrations [size * size, 2]): a quarter of the pixels pure
  haematoxylin, a quarter pure eosin, a quarter both, a quarter unstained background; RGB by the
  Beer-Lambert law in jattn's convention, I = 256 exp(-c @ stains) - 1."""
  rng = np.random.default_rng(seed)
  n = size * size
  kind = rng.integers(0, 4, n)
  c = np.zeros((n, 2))
  c[kind == 0, 0] = rng.uniform(0.5, 1.5, np.sum(kind == 0))
  c[kind == 1, 1] = rng.uniform(1.0, 2.0, np.sum(kind == 1))
  c[kind == 2] = rng.uniform(0.3, 1.0, (np.sum(kind == 2), 2))
  c *= np.asarray(scale)
  od = c @ np.stack(stains)
  rgb = np.clip(np.rint(256.0 * np.exp(-od) - 1.0), 0, 255).astype(np.uint8)
  return rgb.reshape(size, size, 3), c


def test_macenko_recovers_two_known_stains_and_their_maximum_concentrations():
  """Guards the estimate: the stain vectors of a Beer-Lambert image of two known stains come out
  as those stains (haematoxylin first), and the maximum concentrations as the 99th percentiles of
  the concentrations it was built from."""
  image, c = two_stain_image()
  ref = stain.fit_reference(image[None])
  np.testing.assert_allclose(ref["stain_matrix"], np.stack([H, E]), atol=0.01)
  np.testing.assert_allclose(ref["max_concentrations"], np.percentile(c, 99, axis=0), rtol=0.02)
  # The estimate ignores where pixels are: the same from a shuffled image.
  shuffled = np.random.default_rng(1).permutation(image.reshape(-1, 3)).reshape(image.shape)
  np.testing.assert_allclose(stain.fit_reference(shuffled[None])["stain_matrix"],
                             ref["stain_matrix"], atol=1e-5)


def test_normalising_an_image_to_its_own_reference_is_close_to_the_identity():
  image, _ = two_stain_image(seed=2)
  ref = stain.fit_reference(image[None])
  out = np.asarray(stain.normalize(image[None], ref["stain_matrix"], ref["max_concentrations"]))
  assert out.dtype == np.float32 and out.shape == (1, *image.shape)
  diff = np.abs(out[0] - image)
  assert diff.mean() < 0.5 and diff.max() < 3, (diff.mean(), diff.max())


def test_another_staining_is_mapped_onto_the_reference():
  """Guards the mapping (concentrations scaled by reference max / own max, then the reference
  stains): the same tissue stained with other stain vectors at other strengths comes back as the
  reference image, within a few grey levels, while it differed by tens before."""
  reference, _ = two_stain_image(seed=3)
  other_h = np.array([0.65, 0.70, 0.29]) / np.linalg.norm([0.65, 0.70, 0.29])
  other_e = np.array([0.27, 0.80, 0.53]) / np.linalg.norm([0.27, 0.80, 0.53])
  other, _ = two_stain_image(stains=(other_h, other_e), scale=(1.4, 0.7), seed=3)
  ref = stain.fit_reference(reference[None])
  out = np.asarray(stain.normalize(other[None], ref["stain_matrix"], ref["max_concentrations"]))
  before = np.abs(other.astype(float) - reference).mean()
  after = np.abs(out[0] - reference).mean()
  assert before > 15 and after < 2.5, (before, after)


def test_an_image_without_tissue_is_left_as_it_is():
  white = np.full((1, 64, 64, 3), 250, np.uint8)  # the size above: programs compiled once
  ref = stain.fit_reference(two_stain_image()[0][None])
  out = np.asarray(stain.normalize(white, ref["stain_matrix"], ref["max_concentrations"]))
  np.testing.assert_array_equal(out, white.astype(np.float32))
  with pytest.raises(UserError, match="no image with enough stained tissue"):
    stain.fit_reference(white, what="the training images of fold 1")


def test_stain_norm_is_validated():
  config = config_lib.load_config(DEMO)
  config.stain_norm = "reinhard"
  with pytest.raises(UserError, match=r"--config.stain_norm='reinhard': use one of \('none', "
                                      r"'macenko'\)"):
    validate.validate_config(config)


def test_a_stain_normalised_run_fits_records_and_applies_its_reference(tmp_path):
  """Guards the run: the reference is fitted on the fold's training images (as fit_reference on
  them by hand), recorded in results.json and in the checkpoint (predict reads it without the
  data), and applied identically in the evaluation and in predict, where it changes the
  probabilities (the same state without it gives others)."""
  data_dir = small_tree(tmp_path / "tree")
  workdir = str(tmp_path / "run")
  overrides = tiny_overrides(data_dir, str(tmp_path / "prepared"), num_epochs=1, batch_size=8,
                             eval_batch_size=32, stain_norm="macenko", bootstrap_resamples=0)
  # The demo's plain VGG19 row (no attention: the quickest to compile) on 16 patients.
  main.main(["--config", f"{DEMO}:vgg19", "--workdir", workdir,
             *[f"--config.{o}" for o in overrides]])
  with open(os.path.join(workdir, "results.json")) as f:
    recorded = json.load(f)["stain_normalization"]
  config, state = runs.restore(workdir)
  fold = load_fold(config)
  by_hand = stain.fit_reference(fold.images, fold.train_indices)
  np.testing.assert_allclose(state.stain_matrix, by_hand["stain_matrix"], atol=1e-6)
  np.testing.assert_allclose(state.stain_max, by_hand["max_concentrations"], atol=1e-6)
  assert recorded["method"] == "macenko"
  np.testing.assert_allclose([recorded["stain_matrix"]["hematoxylin"],
                              recorded["stain_matrix"]["eosin"]], by_hand["stain_matrix"],
                             atol=1e-5)
  with open(os.path.join(workdir, "predictions.csv")) as f:
    evaluated = {r["file_name"]: float(r["prob_malignant"]) for r in csv.DictReader(f)}
  paths = sorted(os.path.join(root, n) for root, _, names in os.walk(data_dir)
                 for n in names if n in evaluated and "mkfold" not in root)
  rows = predict.predict(workdir, paths)
  got = [float(r["prob_malignant"]) for r in rows]
  np.testing.assert_allclose(got, [evaluated[os.path.basename(p)] for p in paths], atol=2e-6)
  # The same weights without the reference see other inputs: float32 results that differ (the
  # tiny model's outputs are all near 0.5, so the differences are small but far above rounding).
  images = predict.load_images(paths, config.image_size)
  exact = runs.predict_probs(state, images)[:, 1]
  without = runs.predict_probs(state.replace(stain_matrix=None, stain_max=None), images)[:, 1]
  np.testing.assert_allclose(exact, got, atol=1e-6)
  assert np.abs(without - exact).max() > 5e-6


def test_the_preview_grid_shows_each_image_and_its_normalisation(tmp_path):
  """`jattn stain`'s grid: per row the image as given, then its normalisation to the
  reference, then two recolourings each followed by theirs, `gap` white pixels apart; the
  normalised tiles are `normalize`'s output rounded, computed here on their own."""
  image, _ = two_stain_image(seed=4)
  images = np.stack([image, image[::-1]])
  ref = stain.fit_reference(images)
  grid = stain.preview(images, ref, gap=3)
  size = image.shape[0]
  step = size + 3
  assert grid.shape == (2 * step - 3, 6 * step - 3, 3) and grid.dtype == np.uint8
  assert (grid[size:step] == 255).all() and (grid[:, size:step] == 255).all()
  want = np.clip(np.rint(np.asarray(stain.normalize(images, ref["stain_matrix"],
                                                    ref["max_concentrations"]))), 0, 255)
  for r in range(2):
    np.testing.assert_array_equal(grid[r * step:r * step + size, :size], images[r])
    np.testing.assert_array_equal(grid[r * step:r * step + size, step:step + size], want[r])


@pytest.mark.parametrize("command", ["predict", "slide", "validate-external"])
def test_macenko_asked_at_scoring_time_says_to_retrain_with_it(tmp_path, capsys, command):
  """A run trained without stain normalisation (its config.json says stain_norm none): asking
  predict, slide or external validation for Macenko is refused in one line (exit 2, nothing
  written) that names the run's stain_norm and the training option that gives it."""
  from tests.test_hostile import one_line_error, snapshot

  workdir = tmp_path / "run"
  workdir.mkdir()
  config = config_lib.load_config(DEMO)
  assert config.stain_norm == "none"
  (workdir / "config.json").write_text(config.to_json())
  argv = {"predict": ["--workdir", str(workdir), "--stain-norm", "macenko", "a.png"],
          "slide": ["--workdir", str(workdir), "--out", str(tmp_path / "out"),
                    "--config.stain_norm=macenko", "a.svs"],
          "validate-external": ["--workdir", str(workdir), "--config.data.dir=/nowhere",
                                "--config.stain_norm=macenko"]}
  before = snapshot(tmp_path)
  err = one_line_error(lambda: cli.main([command, *argv[command]]), capsys, f"jattn {command}",
                       "")
  assert err.rstrip("\n").endswith(
      "stain normalisation 'macenko' cannot be chosen when scoring: the run's model was trained "
      "with stain_norm=none and is scored with it; to score with macenko normalisation, retrain "
      "with `--config.stain_norm=macenko`"), err
  assert snapshot(tmp_path) == before
