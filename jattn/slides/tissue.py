"""Where the tissue is: a mask from the slide's thumbnail, and each tile's tissue fraction.

Glass is bright and grey, H&E-stained tissue coloured: Otsu's threshold (scikit-image) on the
thumbnail's saturation (HSV), slightly smoothed, or on its optical density (the mean over channels
of -log10((I + 1) / 256), for stains that are dark rather than coloured), separates the two. A floor
under the threshold keeps the faint noise of an empty slide from being split in two and called
tissue. A tile is predicted when the mask covers at least `--min-tissue` of it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from skimage import filters

METHODS = ("saturation", "od")
# The lowest threshold Otsu's may give per method: glass and scanner noise stay below it.
FLOORS = {"saturation": 0.05, "od": 0.05}
SMOOTH_PX = 1.5  # the Gaussian's sigma, thumbnail pixels: scanner noise and JPEG blocks smoothed


@dataclasses.dataclass(frozen=True)
class Mask:
  """The tissue mask of a thumbnail: True where tissue, and how it was drawn."""

  mask: np.ndarray  # bool [h, w], thumbnail pixels
  method: str
  threshold: float

  @property
  def fraction(self) -> float:
    return float(self.mask.mean()) if self.mask.size else 0.0


def channel(rgb: np.ndarray, method: str) -> np.ndarray:
  """The float image the threshold is drawn on: saturation in [0, 1] or mean optical density."""
  if method == "saturation":  # HSV's S, (max - min) / max, without the hue skimage computes too
    high, low = rgb.max(-1).astype(np.float32), rgb.min(-1).astype(np.float32)
    return np.divide(high - low, high, out=np.zeros_like(high), where=high > 0)
  if method == "od":
    return -np.log10((rgb.astype(np.float32) + 1) / 256).mean(-1)
  raise ValueError(f"tissue method {method!r}: use one of {METHODS}")


def tissue_mask(rgb: np.ndarray, method: str = "saturation") -> Mask:
  """Otsu's threshold on `channel(rgb, method)` smoothed over SMOOTH_PX thumbnail pixels, at
  least FLOORS[method]; tissue lies above it."""
  values = filters.gaussian(channel(rgb, method), sigma=SMOOTH_PX)
  threshold = FLOORS[method]
  if values.size and values.max() - values.min() > 1e-6:
    threshold = max(threshold, float(filters.threshold_otsu(values)))
  return Mask(values > threshold, method, threshold)


def tile_fractions(mask: np.ndarray, xs: np.ndarray, ys: np.ndarray, size: tuple[int, int],
                   per_pixel: tuple[float, float]) -> np.ndarray:
  """The fraction of each tile (level-0 top-left corners xs, ys; `size` (w, h) level-0 pixels)
  that the mask covers; `per_pixel` is the level-0 pixels per mask pixel, (x, y).

  A tile covers the mask pixels whose centres lie inside it (at least one per axis); sums come
  from an integral image, so a slide of 100,000 tiles costs one pass over the mask.
  """
  h, w = mask.shape
  integral = np.zeros((h + 1, w + 1), np.int64)
  integral[1:, 1:] = np.cumsum(np.cumsum(mask, 0, dtype=np.int64), 1)

  def span(start, length, scale, limit):  # pixels c with start <= (c + 0.5) * scale < end
    lo = np.clip(np.ceil(np.asarray(start) / scale - 0.5), 0, limit - 1).astype(np.int64)
    hi = np.clip(np.ceil((np.asarray(start) + length) / scale - 0.5), 0, limit).astype(np.int64)
    return lo, np.maximum(hi, lo + 1)

  c0, c1 = span(xs, size[0], per_pixel[0], w)
  r0, r1 = span(ys, size[1], per_pixel[1], h)
  covered = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
  return covered / ((r1 - r0) * (c1 - c0))
