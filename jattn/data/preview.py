"""A picture of what a config's augmentation does: a PNG grid of augmented samples.

  jattn data augment-preview --config configs/ours_stain.py --out grid.png [IMAGE...]

Each row is one image (given files, resized as in training, or synthetic H&E-like images): the
original first, then `samples` draws of `jattn.data.augment.augment` with the config's
`augment` fields, exactly as the train step calls it.
"""

from __future__ import annotations

import jax
import numpy as np
from PIL import Image

from jattn.core import files
from jattn.core.errors import UserError
from jattn.data import augment as augment_lib
from jattn.data import prepare
from jattn.data.breakhis import synthetic

GAP = 2  # white pixels between tiles


def augmented_grid(images: np.ndarray, augment: dict, *, samples: int = 7,
                   seed: int = 0) -> np.ndarray:
  """uint8 [R*(S+g), (samples+1)*(S+g), 3]: per row an image of `images` [R, S, S, 3] and its
  augmented versions."""
  columns = [images.astype(np.uint8)]
  for j in range(samples):
    out = augment_lib.augment(jax.random.key(seed * 100_003 + j), images, **augment)
    columns.append(np.clip(np.rint(np.asarray(out)), 0, 255).astype(np.uint8))
  return tile_grid(columns)


def tile_grid(columns, gap: int = GAP) -> np.ndarray:
  """uint8 [R*(S+gap)-gap, C*(S+gap)-gap, 3]: the C `columns` (each R images [S, S, 3]) side by
  side on white, `gap` pixels apart."""
  rows, size = len(columns[0]), columns[0].shape[1]
  step = size + gap
  grid = np.full((rows * step - gap, len(columns) * step - gap, 3), 255, np.uint8)
  for c, column in enumerate(columns):
    for r in range(rows):
      grid[r * step:r * step + size, c * step:c * step + size] = column[r]
  return grid


def _load(path: str, size: int) -> np.ndarray:
  try:
    with open(path, "rb") as f:
      return prepare.decode_resize(f.read(), size)
  except OSError as e:
    raise UserError(f"{path}: cannot read this image ({e.__class__.__name__}: {e})") from None


def write_preview(config, out: str, paths: list[str] | None = None, *, rows: int = 4,
                  samples: int = 7, seed: int = 0) -> tuple[int, int]:
  """Writes the grid of `config`'s augmentation as a PNG at `out`; returns (rows, columns)."""
  size = int(config.image_size)
  if paths:
    images = np.stack([_load(path, size) for path in paths])
  else:
    images = synthetic.sample_images(rows, size, seed)
  grid = augmented_grid(images, config.augment.to_dict(), samples=samples, seed=seed)
  with files.atomic_path(out) as tmp:
    Image.fromarray(grid).save(tmp, format="PNG")
  return len(images), samples + 1
