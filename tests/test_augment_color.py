"""Stain (HED) and colour jitter: identity at zero strength, exact stain scaling, 0-255 output."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jattn.cli import data as data_cli
from jattn.core import config_lib
from jattn.core.errors import UserError
from jattn.data import augment as augment_lib
from jattn.training import validate
from tests.runs import REPO

# Ruifrok & Johnston (2001), Table 1 "H&E DAB": the optical density of each stain in R, G, B.
RUIFROK_JOHNSTON = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105], [0.268, 0.570, 0.776]])


def _concentrations(rgb: np.ndarray) -> np.ndarray:
  """Stain concentrations by the definition, in float64: OD = -log10((I + 1) / 256) = c @ M."""
  od = -np.log10((rgb.astype(np.float64) + 1) / 256)
  return od @ np.linalg.inv(RUIFROK_JOHNSTON)


def _all_colours(step: int = 5) -> np.ndarray:
  """uint8 [1, N, N, 3] holding every colour of a grid over 0-255 that includes 0 and 255."""
  values = np.unique(np.r_[np.arange(0, 256, step), 255])
  rgb = np.stack(np.meshgrid(values, values, values, indexing="ij"), -1).reshape(-1, 3)
  side = int(np.ceil(np.sqrt(len(rgb))))
  rgb = np.concatenate([rgb, np.zeros((side * side - len(rgb), 3), rgb.dtype)])
  return rgb.reshape(1, side, side, 3).astype(np.uint8)


def test_hed_jitter_at_zero_strength_is_the_identity_to_uint8_rounding():
  """Guards the round trip RGB -> HED -> RGB (matrix and its inverse, the +1 offset): with
  alpha = 1 and beta = 0 every colour, black and white included, comes back after rounding."""
  images = _all_colours()
  out = augment_lib.hed_jitter(jnp.asarray(images), jnp.ones((1, 3)), jnp.zeros((1, 3)))
  np.testing.assert_array_equal(np.rint(np.asarray(out)).astype(np.uint8), images)


def test_hed_jitter_scales_and_shifts_each_stain_as_specified():
  """Guards the stain space and the order of scale and shift: the output's concentrations, by
  the definition with Ruifrok & Johnston's matrix, are alpha * c + beta of the input's."""
  rng = np.random.default_rng(0)
  images = rng.integers(90, 200, (2, 6, 6, 3)).astype(np.uint8)  # no clipping at 0 or 255
  alpha = np.array([[1.2, 0.8, 1.0], [0.9, 1.1, 1.05]], np.float32)
  beta = np.array([[0.03, -0.02, 0.0], [-0.01, 0.04, 0.01]], np.float32)
  out = np.asarray(augment_lib.hed_jitter(jnp.asarray(images), alpha, beta), np.float64)
  assert 0 < out.min() and out.max() < 255
  want = _concentrations(images) * alpha[:, None, None] + beta[:, None, None]
  np.testing.assert_allclose(_concentrations(out), want, atol=2e-5)
  np.testing.assert_allclose(augment_lib.RGB_FROM_HED, RUIFROK_JOHNSTON)


def test_strongest_colour_jitter_stays_within_0_255_and_is_reproducible():
  """Guards clipping: at the largest allowed strengths every output is finite, in 0-255, the
  same for the same key, and the jitter really changes the image."""
  images = jnp.asarray(_all_colours(step=15).repeat(4, axis=0))
  strengths = dict(augment_lib.COLOR_RANGES)
  a = np.asarray(augment_lib.augment(jax.random.key(0), images, **strengths))
  b = np.asarray(augment_lib.augment(jax.random.key(0), images, **strengths))
  assert np.isfinite(a).all() and a.min() >= 0 and a.max() <= 255
  assert a.min() == 0 and a.max() == 255  # clipping was needed, and happened
  np.testing.assert_array_equal(a, b)
  plain = np.asarray(augment_lib.augment(jax.random.key(0), images))
  assert np.abs(a - plain).mean() > 5


def test_colour_fields_off_leave_the_paper_augmentation_unchanged():
  """Guards the paper configs: with every colour strength 0 augment() gives exactly the flips and
  rotations it gave before the colour fields existed."""
  images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (4, 8, 8, 3)), jnp.uint8)
  zero = {name: 0.0 for name in augment_lib.COLOR_RANGES}
  np.testing.assert_array_equal(augment_lib.augment(jax.random.key(2), images, **zero),
                                augment_lib.augment(jax.random.key(2), images))


def test_out_of_range_strength_is_one_line_naming_the_field():
  """Guards validate_config: a stain strength outside its documented range is refused."""
  config = config_lib.load_config(f"{REPO}/configs/ours_stain.py")
  validate.validate_config(config)
  config.augment.hed_scale = 0.9
  with pytest.raises(UserError, match=r"^--config.augment.hed_scale=0.9: between 0 \(off\) and "
                     r"0.5$"):
    validate.validate_config(config)


def test_augment_preview_writes_the_grid(tmp_path, capsys):
  """Guards `jattn data augment-preview`: a PNG of rows x (1 + samples) tiles at the
  config's image size, the first column the images as given."""
  image = np.random.default_rng(3).integers(0, 256, (20, 30, 3)).astype(np.uint8)
  Image.fromarray(image).save(tmp_path / "in.png")
  out = tmp_path / "grid.png"
  data_cli.main(["augment-preview", "--config", f"{REPO}/configs/demo.py", "--samples", "3",
                 "--out", str(out), str(tmp_path / "in.png"), str(tmp_path / "in.png")])
  grid = np.asarray(Image.open(out))
  size = 64  # configs/demo.py's image_size
  assert grid.shape == (2 * (size + 2) - 2, 4 * (size + 2) - 2, 3)
  want = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(grid[:size, :size], want)
  assert "2 image(s), each as given and in 3 draws" in capsys.readouterr().out


def _luma(rgb: np.ndarray) -> np.ndarray:
  return rgb @ np.array([0.299, 0.587, 0.114])


def _read_back_factor(out: np.ndarray, x: np.ndarray, centre: np.ndarray) -> np.ndarray:
  """Each image's f in out = centre + (x - centre) * f, from channel 0 of its first pixel."""
  first = (slice(None), 0, 0, 0)
  return (out[first] - centre[first]) / (x[first] - centre[first])


def test_brightness_contrast_and_saturation_follow_their_definitions_over_the_whole_range():
  """Guards the colour steps against factors drawn from another range than U(1 - s, 1 + s) (e.g.
  one that only brightens) and against the wrong centre (contrast about each pixel's grey instead
  of the image's mean grey): on 2000 copies of a 2 x 2 image, each output is recomputed in NumPy
  from the docstring's formula (torchvision's ColorJitter) with the factor read back from one
  pixel, and the factors must fill [1 - s, 1 + s] evenly."""
  s, n = 0.5, 2000
  pixels = np.array([[[160, 60, 40], [40, 90, 150]], [[120, 150, 70], [90, 90, 90]]], np.float64)
  x = np.broadcast_to(pixels, (n, 2, 2, 3))
  images = jnp.asarray(x.astype(np.uint8))
  centres = {"brightness": np.zeros((n, 1, 1, 1)),
             "contrast": np.broadcast_to(_luma(pixels).mean(), (n, 1, 1, 1)),
             "saturation": np.broadcast_to(_luma(pixels)[..., None], x.shape)}
  for name, centre in centres.items():
    out = np.asarray(augment_lib.color_jitter(jax.random.key(5), images, **{name: s}), np.float64)
    assert 0 < out.min() and out.max() < 255, name  # no clipping: the formula holds exactly
    f = _read_back_factor(out, x, np.broadcast_to(centre, x.shape))
    np.testing.assert_allclose(out, centre + (x - centre) * f[:, None, None, None], atol=1e-3,
                               err_msg=name)
    assert 1 - s <= f.min() < 1 - s + 0.01 and 1 + s - 0.01 < f.max() <= 1 + s, name
    assert abs(f.mean() - 1) < 0.03 and abs(np.mean(f < 1) - 0.5) < 0.05, name
