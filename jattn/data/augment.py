"""Random flips, rotations and stain colours of a training batch, on the accelerator in the step.

Each example draws its own transform from `rng`, so a batch is augmented by pure JAX with static
shapes. A transform is a 2x2 matrix that maps each output pixel, in coordinates centred on the
image, to the source pixel it takes its value from:

* flips and quarter turns (the dihedral group) are integer matrices: one exact gather of source
  pixels per example, no interpolation;
* a rotation by any angle ('uniform') is a float matrix with the flips folded in: one bilinear
  gather per example, where source points outside the image are filled by reflection about the
  image border (half-sample symmetric, `d c b a | a b c d | d c b a`, scipy's mode='reflect'),
  so that no blank corners appear.

Positive angles and k turn the image counter-clockwise, as `np.rot90`. Then, optionally, colours:
H&E stain jitter in optical density space (Tellez et al., 2018, with Ruifrok and Johnston's stain
matrix) and brightness, contrast and saturation jitter (`color_jitter`). Output is float32 on the
input's 0-255 scale: normalisation comes after, in the train step. `dihedral_stack` gives the 8
flips and right-angle turns that test-time augmentation averages over.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

FLIPS = ("none", "horizontal", "horizontal_vertical")
ROTATIONS = ("none", "right_angles", "uniform")
# Upper bounds of the colour-jitter strengths (0 turns each off); see `color_jitter`.
COLOR_RANGES = {"hed_scale": 0.5, "hed_shift": 0.5, "brightness": 0.5, "contrast": 0.5,
                "saturation": 1.0}
# Ruifrok & Johnston (2001): optical density of unit haematoxylin, eosin and DAB stain (rows),
# in R, G, B. An RGB pixel's optical densities are the stain concentrations times this matrix.
RGB_FROM_HED = np.array([[0.650, 0.704, 0.286],
                         [0.072, 0.990, 0.105],
                         [0.268, 0.570, 0.776]], np.float32)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED).astype(np.float32)

# QUARTER_TURNS[k] maps an output pixel (y, x) to its source when the image turns k * 90 degrees
# counter-clockwise (rows point down, so one turn takes its value from (x, -y)).
QUARTER_TURNS = np.array([[[1, 0], [0, 1]], [[0, 1], [-1, 0]],
                          [[-1, 0], [0, -1]], [[0, -1], [1, 0]]], np.int32)


def augment(rng: jax.Array, images: jax.Array, *, flip: str = "horizontal_vertical",
            rotation: str = "right_angles", max_angle: float = 180.0, hed_scale: float = 0.0,
            hed_shift: float = 0.0, brightness: float = 0.0, contrast: float = 0.0,
            saturation: float = 0.0) -> jax.Array:
  """Randomly flips, rotates and recolours each image of [B, H, W, C]; float32 out, 0-255 scale.

  flip: 'none'; 'horizontal' (mirror left-right with p=0.5); 'horizontal_vertical' (also
    upside down with p=0.5, independently).
  rotation: 'none'; 'right_angles' (k * 90 degrees, k uniform in {0, 1, 2, 3}; square images
    only); 'uniform' (an angle uniform in [-max_angle, max_angle] degrees, bilinear, points
    outside the image filled by reflection).
  hed_scale, hed_shift, brightness, contrast, saturation: colour jitter after the geometry (see
    `color_jitter`; RGB images on the 0-255 scale); all 0 (the default) leaves colours untouched
    and draws nothing, so the flips and rotations are those drawn without them.
  The same `rng` gives the same output.
  """
  _check_option("flip", flip, FLIPS)
  _check_option("rotation", rotation, ROTATIONS)
  if images.ndim != 4:
    raise ValueError(f"augment expects images of shape [B, H, W, C]; got shape {images.shape}")
  if rotation == "right_angles" and images.shape[1] != images.shape[2]:
    raise ValueError(f"rotation='right_angles' needs square images; got shape {images.shape}: "
                     f"resize them square, or use rotation='uniform' or 'none'")
  if (rotation == "uniform" and isinstance(max_angle, (int, float))
      and not (math.isfinite(max_angle) and max_angle >= 0)):
    raise ValueError(f"max_angle={max_angle!r}: give a finite number of degrees >= 0")
  strengths = dict(hed_scale=hed_scale, hed_shift=hed_shift, brightness=brightness,
                   contrast=contrast, saturation=saturation)
  for name, value in strengths.items():
    if not (isinstance(value, (int, float)) and 0 <= value <= COLOR_RANGES[name]):
      raise ValueError(f"{name}={value!r}: give a number between 0 and {COLOR_RANGES[name]}")
  out = _augment(rng, images, max_angle, flip=flip, rotation=rotation)
  if any(strengths.values()):  # a separate stream: the geometry draws the same with colours on
    out = color_jitter(jax.random.fold_in(rng, 1), out, **strengths)
  return out


@functools.partial(jax.jit, static_argnames=("flip", "rotation"))
def _augment(rng, images, max_angle, *, flip, rotation):
  """`augment` once its options are checked (jitted: fast also when called outside a jit)."""
  batch = images.shape[0]
  h_rng, v_rng, rot_rng = jax.random.split(rng, 3)
  no_flip = jnp.ones((batch,), jnp.int32)
  mirror = lambda key: jnp.where(jax.random.bernoulli(key, 0.5, (batch,)), -1, 1)
  sign_x = mirror(h_rng) if flip in ("horizontal", "horizontal_vertical") else no_flip
  sign_y = mirror(v_rng) if flip == "horizontal_vertical" else no_flip
  signs = jnp.stack([sign_y, sign_x], axis=-1)[:, :, None]  # [B, 2, 1]: diag(sign_y, sign_x) @ M

  if rotation == "uniform":
    degrees = jax.random.uniform(rot_rng, (batch,), minval=-max_angle, maxval=max_angle)
    return _bilinear_warp(images, signs * _rotation_matrices(degrees))
  if flip == "none" and rotation == "none":
    return images.astype(jnp.float32)
  k = (jax.random.randint(rot_rng, (batch,), 0, 4) if rotation == "right_angles"
       else jnp.zeros((batch,), jnp.int32))
  return _integer_warp(images, signs * jnp.asarray(QUARTER_TURNS)[k]).astype(jnp.float32)


def rotate90(images: jax.Array, k: jax.Array | int) -> jax.Array:
  """Turns [B, H, W, C] images counter-clockwise by k * 90 degrees, exactly; dtype kept.

  A Python int turns every image (any shape, as `np.rot90(images, k, axes=(1, 2))`); an array
  k of shape [] or [B] turns each image by its own k, which needs square images.
  """
  if isinstance(k, (int, np.integer)):
    return jnp.rot90(images, int(k), axes=(1, 2))
  if images.ndim != 4 or images.shape[1] != images.shape[2]:
    raise ValueError(f"rotate90 with an array k needs square images [B, S, S, C]; got shape "
                     f"{images.shape}")
  k = jnp.broadcast_to(jnp.mod(jnp.asarray(k, jnp.int32), 4), images.shape[:1])
  return _integer_warp(images, jnp.asarray(QUARTER_TURNS)[k])


def dihedral(images: jax.Array, i: int) -> jax.Array:
  """The i-th of the 8 flips and right-angle turns of [B, H, W, C] images (0 is the identity).

  i = 0-3 turns by i * 90 degrees counter-clockwise; i = 4-7 mirrors left-right, then turns by
  (i - 4) * 90 degrees. Exact, dtype kept.
  """
  return jnp.rot90(images if i < 4 else jnp.flip(images, axis=2), i % 4, axes=(1, 2))


def dihedral_stack(images: jax.Array) -> jax.Array:
  """[8, B, H, W, C]: the 8 images `dihedral(images, i)`, for test-time augmentation."""
  return jnp.stack([dihedral(images, i) for i in range(8)])


def rgb_to_hed(images: jax.Array) -> jax.Array:
  """Stain concentrations (haematoxylin, eosin, DAB) of 0-255 RGB pixels, float32 [..., 3].

  Optical density OD = -log10((I + 1) / 256) per channel (the +1 keeps black finite), unmixed by
  the inverse of Ruifrok & Johnston's stain matrix: OD = c @ RGB_FROM_HED.
  """
  od = jnp.log((images.astype(jnp.float32) + 1.0) / 256.0) * -_LOG10_E
  return _mix(od, HED_FROM_RGB)


def hed_to_rgb(hed: jax.Array) -> jax.Array:
  """The inverse of `rgb_to_hed`: 0-255 RGB (float32, not clipped) of stain concentrations."""
  return 256.0 * jnp.exp(_mix(hed, RGB_FROM_HED) * -_LN_10) - 1.0


_LN_10 = float(np.log(10.0))
_LOG10_E = 1.0 / _LN_10


def _mix(x: jax.Array, matrix: np.ndarray) -> jax.Array:
  """x @ matrix over the last axis (3 x 3), written out: exact float32 on GPUs too (no TF32
  matmul), and 5x faster on CPUs than a broadcast-and-reduce."""
  c = [x[..., i] for i in range(3)]
  return jnp.stack([sum(c[i] * float(matrix[i, j]) for i in range(3)) for j in range(3)], -1)


def hed_jitter(images: jax.Array, alpha: jax.Array, beta: jax.Array) -> jax.Array:
  """Tellez et al. (2018)'s stain jitter with given factors: c -> alpha * c + beta per stain.

  images [B, H, W, 3] on the 0-255 scale; alpha, beta [B, 3] (one per image and stain, in the
  order haematoxylin, eosin, DAB). Returns float32 RGB clipped to 0-255.
  """
  hed = rgb_to_hed(images) * alpha[:, None, None, :] + beta[:, None, None, :]
  return jnp.clip(hed_to_rgb(hed), 0.0, 255.0)


@functools.partial(jax.jit, static_argnames=tuple(COLOR_RANGES))
def color_jitter(rng: jax.Array, images: jax.Array, *, hed_scale: float = 0.0,
                 hed_shift: float = 0.0, brightness: float = 0.0, contrast: float = 0.0,
                 saturation: float = 0.0) -> jax.Array:
  """Random stain (HED) jitter, then brightness, contrast and saturation jitter, per image.

  HED: alpha ~ U(1 - hed_scale, 1 + hed_scale) and beta ~ U(-hed_shift, hed_shift) per image and
  stain (`hed_jitter`; beta in optical density units, where a stained pixel has about 0.1-1).
  Then, each with its own f ~ U(1 - s, 1 + s) per image, as torchvision's ColorJitter:
  brightness x * f; contrast m + (x - m) * f about the image's mean grey m; saturation
  g + (x - g) * f about each pixel's grey g (ITU-R 601 luma); each clipped to 0-255. A strength
  of 0 skips its step. RGB in, float32 out, 0-255 scale.
  """
  batch = images.shape[0]
  keys = jax.random.split(rng, 5)
  x = images.astype(jnp.float32)

  def factor(key, strength, shape=(batch,)):
    return jax.random.uniform(key, shape, minval=1.0 - strength, maxval=1.0 + strength)

  def per_image(f):
    return f[:, None, None, None]

  if hed_scale or hed_shift:
    beta = jax.random.uniform(keys[1], (batch, 3), minval=-hed_shift, maxval=hed_shift)
    x = hed_jitter(x, factor(keys[0], hed_scale, (batch, 3)), beta)
  if brightness:
    x = jnp.clip(x * per_image(factor(keys[2], brightness)), 0.0, 255.0)
  if contrast:
    mean = jnp.mean(_grey(x), axis=(1, 2, 3), keepdims=True)
    x = jnp.clip(mean + (x - mean) * per_image(factor(keys[3], contrast)), 0.0, 255.0)
  if saturation:
    grey = _grey(x)
    x = jnp.clip(grey + (x - grey) * per_image(factor(keys[4], saturation)), 0.0, 255.0)
  return x


def _grey(x: jax.Array) -> jax.Array:
  """ITU-R 601 luma of RGB [..., 3], kept as [..., 1]."""
  return 0.299 * x[..., :1] + 0.587 * x[..., 1:2] + 0.114 * x[..., 2:]


def _check_option(field: str, value: str, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ValueError(f"{field}={value!r}: use one of {', '.join(map(repr, allowed))}")


def _rotation_matrices(degrees: jax.Array) -> jax.Array:
  """[B, 2, 2] maps from output (y, x) to source, for counter-clockwise turns by `degrees`."""
  theta = jnp.deg2rad(degrees.astype(jnp.float32))
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  return jnp.stack([jnp.stack([cos, sin], -1), jnp.stack([-sin, cos], -1)], -2)


@jax.jit
def _integer_warp(images: jax.Array, matrices: jax.Array) -> jax.Array:
  """images[b] sampled at matrices[b] @ (y, x): integer [B, 2, 2] matrices of the dihedral group."""
  _, height, width, _ = images.shape
  # Doubled centred coordinates are integers whatever the parity of H and W.
  y2, x2 = jnp.meshgrid(2 * jnp.arange(height) - (height - 1), 2 * jnp.arange(width) - (width - 1),
                        indexing="ij")

  def one(image, m):
    rows = (m[0, 0] * y2 + m[0, 1] * x2 + (height - 1)) // 2
    cols = (m[1, 0] * y2 + m[1, 1] * x2 + (width - 1)) // 2
    return image.at[rows, cols].get(mode="promise_in_bounds")

  return jax.vmap(one)(images, matrices)


@jax.jit
def _bilinear_warp(images: jax.Array, matrices: jax.Array) -> jax.Array:
  """images[b] sampled bilinearly at matrices[b] @ (y, x), reflected at the borders; float32."""
  _, height, width, _ = images.shape
  cy, cx = (height - 1) / 2, (width - 1) / 2
  y, x = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32) - cy,
                      jnp.arange(width, dtype=jnp.float32) - cx, indexing="ij")

  def one(image, m):
    src_y = m[0, 0] * y + m[0, 1] * x + cy
    src_x = m[1, 0] * y + m[1, 1] * x + cx
    y0, x0 = jnp.floor(src_y), jnp.floor(src_x)
    wy, wx = src_y - y0, src_x - x0
    y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
    # The four neighbours of every output pixel, gathered at once: [4, H, W, C].
    rows = _reflect(jnp.stack([y0, y0, y0 + 1, y0 + 1]), height)
    cols = _reflect(jnp.stack([x0, x0 + 1, x0, x0 + 1]), width)
    weights = jnp.stack([(1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx])
    corners = image.at[rows, cols].get(mode="promise_in_bounds").astype(jnp.float32)
    return jnp.sum(weights[..., None] * corners, axis=0)  # not einsum: no reduced-precision matmul

  return jax.vmap(one)(images, matrices)


def _reflect(index: jax.Array, size: int) -> jax.Array:
  """Folds any integer index into [0, size) by half-sample symmetric reflection."""
  index = jnp.mod(index, 2 * size)
  return jnp.where(index < size, index, 2 * size - 1 - index)
