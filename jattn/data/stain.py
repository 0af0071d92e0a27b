"""Stain normalisation of H&E images (Macenko et al., 2009), per image, inside the jitted step.

Macenko's method: an RGB pixel's optical density is OD = -ln((I + 1) / 256) per channel (0 for
white; the convention of `jattn.data.augment`'s HED conversion, exactly inverted by
`rgb_from_od`); pixels whose OD exceeds `BETA` in every channel are tissue; the plane of the two
largest principal directions of the tissue ODs holds both stains; each tissue pixel's angle in
that plane is taken, and the directions at the `ALPHA`-th and (100 - `ALPHA`)-th percentile
angles are the two stain vectors (haematoxylin the one with the larger red OD, first); each
pixel's stain concentrations are the least-squares solution of OD = c @ stains, and an image's
maximum concentrations their `MAX_PERCENTILE`-th percentiles over its pixels. Normalising an
image to a reference (a stain matrix and maximum concentrations) scales its concentrations by
reference max / own max and maps them back through the reference stains. An image without
enough tissue, or whose two stains cannot be told apart, is left as it is.

A run with `config.stain_norm='macenko'` fits its reference once, on its fold's training images
(`fit_reference`: the median of their estimates), keeps it in its train state (`state.TrainState`,
so in every checkpoint) and in results.json (`stain_normalization`);
`jattn.training.state.normalize_stains` applies it to every image in the train step (before
augmentation), in the eval step (before test-time flips), in `predict`, external evaluation and
slides alike, in float32.

Vahadane et al. (2016) is not offered: its sparse non-negative factorisation is an iterative
dictionary-learning fit per image (SPAMS, scikit-learn's `DictionaryLearning`), which does not fit
a fixed-cost jitted step on the accelerator.

  jattn stain --out grid.png [--workdir RUN | --reference IMAGE] [IMAGE...]

writes a picture of it (`preview`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jattn.core.errors import UserError
from jattn.data import augment
from jattn.data import preview as preview_lib

METHODS = ("none", "macenko")  # config.stain_norm
BETA = 0.15  # OD a tissue pixel exceeds in every channel (Macenko et al.)
ALPHA = 1.0  # percentile of the extreme angles taken as the pure stains, for robustness
MAX_PERCENTILE = 99.0  # an image's maximum concentration of each stain
MIN_TISSUE = 0.01  # fewer tissue pixels than this fraction (or than 8): the image is left as is
REFERENCE_PIXELS = 8192  # pixels of each training image (at most) a run's reference is fitted on


def optical_density(rgb: jax.Array) -> jax.Array:
  """OD = -ln((I + 1) / 256) of RGB values on the 0-255 scale, float32."""
  return -jnp.log((jnp.asarray(rgb, jnp.float32) + 1.0) / 256.0)


def rgb_from_od(od: jax.Array) -> jax.Array:
  """The inverse of `optical_density` (not clipped)."""
  return 256.0 * jnp.exp(-od) - 1.0


def _percentile(x: jax.Array, q: float, mask: jax.Array) -> jax.Array:
  """NumPy's linear-interpolation percentile of the entries of `x` [N] where `mask`."""
  return jnp.nanpercentile(jnp.where(mask, x, jnp.nan), q)


def estimate(od: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Macenko's estimate from pixels' optical densities `od` [N, 3] (float32).

  Returns (stain matrix [2, 3], rows unit haematoxylin then eosin OD vectors; maximum
  concentrations [2]; concentrations [N, 2]; ok: a scalar bool, False when there is too little
  tissue or the two stains coincide, in which case the others are not to be used).
  """
  od = jnp.asarray(od, jnp.float32)
  n = od.shape[0]
  tissue = jnp.all(od > BETA, axis=-1)
  count = jnp.sum(tissue)
  weight = tissue.astype(jnp.float32)[:, None]
  mean = jnp.sum(od * weight, 0) / jnp.maximum(count, 1)
  centred = (od - mean) * weight
  cov = centred.T @ centred / jnp.maximum(count - 1, 1)
  _, vectors = jnp.linalg.eigh(cov)  # eigenvalues ascending
  first, second = vectors[:, 2], vectors[:, 1]
  first = first * jnp.where(jnp.sum(first) < 0, -1.0, 1.0)  # along the ODs, which are positive
  angle = jnp.arctan2(od @ second, od @ first)
  lo, hi = (_percentile(angle, q, tissue) for q in (ALPHA, 100.0 - ALPHA))
  v_lo = first * jnp.cos(lo) + second * jnp.sin(lo)
  v_hi = first * jnp.cos(hi) + second * jnp.sin(hi)
  matrix = jnp.where(v_lo[0] > v_hi[0], jnp.stack([v_lo, v_hi]), jnp.stack([v_hi, v_lo]))
  gram = matrix @ matrix.T
  det = gram[0, 0] * gram[1, 1] - gram[0, 1] * gram[1, 0]
  conc = concentrations(od, matrix)
  max_c = jnp.percentile(conc, MAX_PERCENTILE, axis=0)
  ok = ((count >= jnp.maximum(8, MIN_TISSUE * n)) & (det > 1e-4) & jnp.all(max_c > 1e-3)
        & jnp.all(jnp.isfinite(matrix)) & jnp.all(jnp.isfinite(max_c)))
  return matrix, max_c, conc, ok


def concentrations(od: jax.Array, matrix: jax.Array) -> jax.Array:
  """The least-squares stain concentrations [N, 2] of `od` [N, 3] for a stain matrix [2, 3]."""
  gram = matrix @ matrix.T
  inverse = jnp.array([[gram[1, 1], -gram[0, 1]], [-gram[1, 0], gram[0, 0]]]) / (
      gram[0, 0] * gram[1, 1] - gram[0, 1] * gram[1, 0])
  return od @ matrix.T @ inverse


@jax.jit
def normalize(images: jax.Array, matrix: jax.Array, max_c: jax.Array) -> jax.Array:
  """Each image of [B, H, W, 3] (0-255) normalised to the reference (`matrix` [2, 3], `max_c`
  [2]); float32 on the 0-255 scale, clipped. An image Macenko cannot estimate is returned as is."""
  matrix = jnp.asarray(matrix, jnp.float32)
  max_c = jnp.asarray(max_c, jnp.float32)

  def one(image):
    od = optical_density(image).reshape(-1, 3)
    _, own_max, conc, ok = estimate(od)
    mapped = (conc * (max_c / jnp.where(ok, own_max, 1.0))) @ matrix
    out = jnp.clip(rgb_from_od(mapped), 0.0, 255.0).reshape(image.shape)
    return jnp.where(ok, out, image.astype(jnp.float32))

  return jax.vmap(one)(jnp.asarray(images))


@jax.jit
def _estimate_each(od: jax.Array):
  """`estimate` of each image's pixels od [B, N, 3]: matrices [B, 2, 3], maxima [B, 2], ok [B]."""
  matrix, max_c, _, ok = jax.vmap(estimate)(od)
  return matrix, max_c, ok


def fit_reference(images: np.ndarray, indices=None, *, pixels: int = REFERENCE_PIXELS,
                  seed: int = 0, what: str = "the training images") -> dict[str, np.ndarray]:
  """A reference {'stain_matrix' [2, 3], 'max_concentrations' [2]} (float32) fitted on
  `images[indices]` ([N, S, S, 3] uint8, e.g. a memory-mapped cache): Macenko's estimate of each
  image (from all its pixels, or a random `pixels` of them), then the median over the images of
  each stain vector (renormalised to unit length) and of each maximum concentration. Images
  Macenko cannot estimate are left out; a set with none that it can is a UserError naming
  `what`. (Pooling the pixels of differently stained images instead mixes their stains up.)"""
  indices = np.arange(len(images)) if indices is None else np.asarray(indices)
  per_image = int(np.prod(images.shape[1:3]))
  share = min(per_image, pixels)
  rng = np.random.default_rng(seed)
  matrices, maxima = [], []
  for start in range(0, len(indices), 256):
    chunk = np.asarray(images[indices[start:start + 256]]).reshape(-1, per_image, 3)
    if share < per_image:
      chunk = np.take_along_axis(
          chunk, rng.random((len(chunk), per_image)).argsort(1)[:, :share, None], 1)
    matrix, max_c, ok = (np.asarray(x) for x in _estimate_each(optical_density(chunk)))
    matrices.append(matrix[ok])
    maxima.append(max_c[ok])
  matrices, maxima = np.concatenate(matrices or [np.zeros((0, 2, 3))]), np.concatenate(
      maxima or [np.zeros((0, 2))])
  if not len(matrices):
    raise UserError(f"{what}: no image with enough stained tissue for Macenko's stain estimate "
                    f"(at least {MIN_TISSUE:.0%} of its pixels with an optical density above "
                    f"{BETA} in every channel, and two distinct stains); train with "
                    f"--config.stain_norm=none")
  matrix = np.median(matrices, axis=0)
  matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
  return {"stain_matrix": matrix.astype(np.float32),
          "max_concentrations": np.median(maxima, axis=0).astype(np.float32)}


def placeholder_reference() -> dict[str, np.ndarray]:
  """A reference of the right shapes for a state that is never stepped (a finished fold)."""
  return {"stain_matrix": np.eye(2, 3, dtype=np.float32),
          "max_concentrations": np.ones(2, np.float32)}


def describe(matrix, max_c, computed_on: str) -> dict:
  """The results.json record of a reference (`stain_normalization`)."""
  return {"method": "macenko",
          "stain_matrix": {"hematoxylin": [round(float(x), 6) for x in np.asarray(matrix)[0]],
                           "eosin": [round(float(x), 6) for x in np.asarray(matrix)[1]]},
          "max_concentrations": {"hematoxylin": round(float(np.asarray(max_c)[0]), 6),
                                 "eosin": round(float(np.asarray(max_c)[1]), 6)},
          "computed_on": computed_on,
          "parameters": {"od": "-ln((I + 1) / 256)", "beta": BETA, "alpha": ALPHA,
                         "max_percentile": MAX_PERCENTILE}}


# --------------------------------------------------------------------------------------------
# A picture of it.


def preview(images: np.ndarray, reference: dict, *, gap: int = 2) -> np.ndarray:
  """uint8 grid: per row an image of `images` [R, S, S, 3], then the same image recoloured as a
  stronger and a weaker staining (another centre: `jattn.data.augment.hed_jitter`), each followed
  by its normalisation to `reference` (as `fit_reference` returns)."""
  images = np.asarray(images, np.uint8)
  n = len(images)
  columns = []
  for alpha, beta in ((1.0, 0.0), (1.3, 0.04), (0.75, 0.0)):
    shown = images if alpha == 1.0 else np.clip(np.rint(np.asarray(augment.hed_jitter(
        jnp.asarray(images, jnp.float32), jnp.full((n, 3), alpha), jnp.full((n, 3), beta)))),
        0, 255).astype(np.uint8)
    done = normalize(shown, reference["stain_matrix"], reference["max_concentrations"])
    columns += [shown, np.clip(np.rint(np.asarray(done)), 0, 255).astype(np.uint8)]
  return preview_lib.tile_grid(columns, gap)
