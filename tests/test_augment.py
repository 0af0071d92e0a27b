"""Flips and rotations against NumPy, their invariants, and the options' errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy import ndimage

from jattn.data import augment as augment_lib
from jattn.data.augment import augment, rotate90


def _images(shape=(16, 9, 9, 3), dtype=np.uint8, seed=0):
  """Random images: no two of an image's 8 dihedral copies are equal."""
  return np.random.default_rng(seed).integers(0, 256, shape).astype(dtype)


def _dihedral(image):
  """The 8 flips and quarter turns of one [H, W, C] image."""
  return [np.rot90(m, k) for m in (image, np.fliplr(image)) for k in range(4)]


def _index_of(image, candidates):
  hits = [i for i, c in enumerate(candidates)
          if c.shape == image.shape and np.array_equal(c, image)]
  assert len(hits) == 1, "the output is not exactly one of the allowed images"
  return hits[0]


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("rotation", ["none", "right_angles", "uniform"])
def test_shape_kept_and_float32_out(dtype, rotation):
  images = _images(dtype=dtype)
  out = augment(jax.random.key(0), jnp.asarray(images), rotation=rotation)
  assert out.shape == images.shape and out.dtype == jnp.float32
  assert 0 <= float(out.min()) and float(out.max()) <= 255  # still on the 0-255 scale


@pytest.mark.parametrize("rotation", ["right_angles", "uniform"])
def test_same_seed_same_output_other_seed_other_output(rotation):
  images = jnp.asarray(_images())
  a = augment(jax.random.key(1), images, rotation=rotation)
  b = augment(jax.random.key(1), images, rotation=rotation)
  c = augment(jax.random.key(2), images, rotation=rotation)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_rotate90_matches_np_rot90():
  images = _images((4, 6, 6, 2))
  k = np.array([0, 1, 2, 3])
  out = np.asarray(rotate90(jnp.asarray(images), jnp.asarray(k)))
  assert out.dtype == np.uint8
  for b in range(4):
    np.testing.assert_array_equal(out[b], np.rot90(images[b], k[b]))
  # A Python int turns the whole batch, and works on non-square images too.
  wide = _images((2, 4, 7, 3))
  for turns in (-1, 1, 2, 5):
    np.testing.assert_array_equal(rotate90(jnp.asarray(wide), turns),
                                  np.rot90(wide, turns, axes=(1, 2)))
  with pytest.raises(ValueError, match=r"square images .*\(2, 4, 7, 3\)"):
    rotate90(jnp.asarray(wide), jnp.array([1, 2]))


def test_rotation_then_inverse_is_identity():
  images = jnp.asarray(_images((8, 10, 10, 3), np.float32))
  k = jnp.array([0, 1, 2, 3, -1, -2, 5, 7])
  np.testing.assert_array_equal(rotate90(rotate90(images, k), -k), images)
  np.testing.assert_array_equal(rotate90(rotate90(images, k), 4 - k), images)


@pytest.mark.parametrize("shape", [(32, 6, 10, 3), (32, 7, 7, 1)])
def test_flips_only_never_rotate(shape):
  images = _images(shape)
  seen = {"horizontal": set(), "horizontal_vertical": set()}
  for flip in seen:
    out = np.asarray(augment(jax.random.key(3), jnp.asarray(images), flip=flip, rotation="none"))
    for image, result in zip(images, out, strict=True):
      allowed = [image, np.fliplr(image)]
      if flip == "horizontal_vertical":
        allowed += [np.flipud(image), np.flipud(np.fliplr(image))]
      seen[flip].add(_index_of(result.astype(np.uint8), allowed))
  assert seen == {"horizontal": {0, 1}, "horizontal_vertical": {0, 1, 2, 3}}
  np.testing.assert_array_equal(  # nothing to do: the input, as float32
      augment(jax.random.key(3), jnp.asarray(images), flip="none", rotation="none"), images)


def test_right_angles_give_the_dihedral_images():
  images = _images((64, 9, 9, 3))
  out = np.asarray(augment(jax.random.key(0), jnp.asarray(images))).astype(np.uint8)
  seen = {_index_of(result, _dihedral(image)) for image, result in zip(images, out, strict=True)}
  assert seen == set(range(8))  # all 8 drawn, from 64 independent examples
  # Without flips only the 4 turns remain.
  out = np.asarray(augment(jax.random.key(0), jnp.asarray(images), flip="none")).astype(np.uint8)
  turns = {_index_of(result, _dihedral(image)) for image, result in zip(images, out, strict=True)}
  assert turns == {0, 1, 2, 3}


def test_uniform_with_zero_angle_is_exact():
  images = _images((8, 6, 10, 3))
  out = augment(jax.random.key(0), jnp.asarray(images), flip="none", rotation="uniform",
                max_angle=0.0)
  np.testing.assert_array_equal(out, images)
  # With flips folded in, still exact: each output is the input or one of its mirrors.
  out = np.asarray(augment(jax.random.key(0), jnp.asarray(images), rotation="uniform",
                           max_angle=0.0))
  for image, result in zip(images, out, strict=True):
    _index_of(result.astype(np.uint8), [image, np.fliplr(image), np.flipud(image),
                                        np.flipud(np.fliplr(image))])


def rotate(images, degrees):
  """The uniform rotation path of `augment` (rotation='uniform') at given angles: bilinear,
  counter-clockwise about the centre, reflected at the borders."""
  degrees = jnp.broadcast_to(jnp.asarray(degrees, jnp.float32), images.shape[:1])
  return augment_lib._bilinear_warp(images, augment_lib._rotation_matrices(degrees))


def test_rotate_by_90_degrees_matches_rotate90():
  images = _images((4, 12, 12, 3), np.float32)
  out = np.asarray(rotate(jnp.asarray(images), jnp.array([90.0, -90.0, 180.0, 270.0])))
  for b, k in enumerate([1, -1, 2, 3]):
    np.testing.assert_allclose(out[b, 1:-1, 1:-1], np.rot90(images[b], k)[1:-1, 1:-1], atol=1e-3)


def test_bilinear_with_reflection_matches_scipy_map_coordinates():
  """An arbitrary angle against jax.scipy's order-1 map_coordinates, mode='reflect'."""
  image = _images((1, 9, 14, 2), np.float32)
  degrees = 33.0
  out = np.asarray(rotate(jnp.asarray(image), degrees))[0]
  theta = np.deg2rad(degrees)
  y, x = np.meshgrid(np.arange(9) - 4.0, np.arange(14) - 6.5, indexing="ij")
  src = [np.cos(theta) * y + np.sin(theta) * x + 4.0, -np.sin(theta) * y + np.cos(theta) * x + 6.5]
  for c in range(2):
    expected = ndimage.map_coordinates(jnp.asarray(image[0, ..., c]), src, order=1, mode="reflect")
    np.testing.assert_allclose(out[..., c], expected, atol=1e-3)


def test_uniform_rotation_stays_within_the_input_range():
  images = _images((16, 10, 10, 3))
  out = np.asarray(augment(jax.random.key(5), jnp.asarray(images), rotation="uniform"))
  assert out.min() >= images.min() and out.max() <= images.max()  # bilinear: convex weights
  # Almost every angle in [-180, 180] is not a quarter turn: the outputs are interpolated.
  assert not np.array_equal(out, np.round(out))


def test_augment_under_jit_matches_eager():
  images = jnp.asarray(_images((4, 8, 8, 3)))
  for rotation in ("right_angles", "uniform"):
    fn = functools.partial(augment, flip="horizontal", rotation=rotation, max_angle=30.0)
    np.testing.assert_allclose(jax.jit(fn)(jax.random.key(7), images),
                               fn(jax.random.key(7), images), atol=1e-4)
  # The raw uint32 keys of jax.random.PRNGKey work too.
  assert jax.jit(augment)(jax.random.PRNGKey(0), images).shape == images.shape


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"flip": "diagonal"},
     r"flip='diagonal': use one of 'none', 'horizontal', 'horizontal_vertical'"),
    ({"rotation": "any"}, r"rotation='any': use one of 'none', 'right_angles', 'uniform'"),
    ({"rotation": "uniform", "max_angle": -5.0}, r"max_angle=-5.0"),
    ({"rotation": "uniform", "max_angle": float("nan")}, r"max_angle=nan"),
])
def test_bad_options_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    augment(jax.random.key(0), jnp.zeros((1, 8, 8, 3), jnp.uint8), **kwargs)


def test_right_angles_on_non_square_images_raise():
  with pytest.raises(ValueError, match=r"square images; got shape \(2, 6, 8, 3\)"):
    augment(jax.random.key(0), jnp.zeros((2, 6, 8, 3)), rotation="right_angles")
