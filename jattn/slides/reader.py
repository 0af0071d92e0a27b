"""Whole-slide images through OpenSlide: the slide files of a folder, the thumbnail, and (from
`jattn.data.wsi`, their one home, whose docstring states the rules) the scale at which a run's
tiles are read from them."""

from __future__ import annotations

import math
import os

import numpy as np
import openslide
from PIL import Image

from jattn.core.errors import UserError

# The scale rules and the tile reader live one layer down, where the slide-regions data source
# reads its training tiles with them too; they are this module's names as before.
from jattn.data.wsi import (  # noqa: F401
  PLAUSIBLE_MPP,
  TOLERANCE,
  Scale,
  SlideMpp,
  TileReader,
  choose_scale,
  open_slide,
  slide_mpp,
  to_rgb,
)

# What a folder of slides is searched for (OpenSlide's formats; any case).
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide",
                    ".bif", ".dcm", ".czi")


def slide_paths(paths: list[str]) -> list[str]:
  """The slide files `paths` name: a file as given, a folder as the slide files under it
  (SLIDE_EXTENSIONS, hidden files and folders skipped), in sorted order."""
  out = []
  for path in paths:
    if not os.path.isdir(path):
      out.append(path)
      continue
    found = []
    for root, dirs, names in os.walk(path):
      dirs[:] = sorted(d for d in dirs if not d.startswith("."))
      found += [os.path.join(root, n) for n in sorted(names)
                if not n.startswith(".") and n.lower().endswith(SLIDE_EXTENSIONS)]
    if not found:
      raise UserError(f"{path}: a folder without slide files ({', '.join(SLIDE_EXTENSIONS)}, "
                      f"subfolders included); give slide files or a folder that holds some")
    out += found
  return out

THUMBNAIL_BLOCK = 256


def thumbnail(path: str, downsample: float) -> tuple[np.ndarray, tuple[float, float], list[dict]]:
  """uint8 RGB [h, w, 3] of the whole slide at about `downsample` (transparent areas white), its
  exact (x, y) level-0 pixels per thumbnail pixel, and the regions that could not be read (level-0
  x, y, width, height, error), left white: no tissue is found, and no tile predicted, there.

  Read block by block from the best level for `downsample` (OpenSlide's `get_thumbnail` would
  fail as a whole on one damaged tile), each block resized onto its place.
  """
  slide = openslide.OpenSlide(path)
  w, h = slide.dimensions
  tw, th = max(1, math.ceil(w / downsample)), max(1, math.ceil(h / downsample))
  per_pixel = (w / tw, h / th)
  level = slide.get_best_level_for_downsample(max(per_pixel))
  d = slide.level_downsamples[level]
  lw, lh = slide.level_dimensions[level]
  canvas = np.full((th, tw, 3), 255, np.uint8)
  failed = []

  def read(tx, ty, bw, bh):
    nonlocal slide
    x0, y0 = round(tx * per_pixel[0]), round(ty * per_pixel[1])  # level-0 corner
    x1 = min(w, round((tx + bw) * per_pixel[0]))
    y1 = min(h, round((ty + bh) * per_pixel[1]))
    size = (min(lw, max(1, round((x1 - x0) / d))), min(lh, max(1, round((y1 - y0) / d))))
    try:
      region = slide.read_region((x0, y0), level, size)
    except openslide.OpenSlideError as e:
      slide.close()
      slide = openslide.OpenSlide(path)  # a handle that failed stays in error
      return x0, y0, x1, y1, " ".join(str(e).split()) or type(e).__name__
    block = to_rgb(region).resize((bw, bh), Image.Resampling.BILINEAR)
    canvas[ty:ty + bh, tx:tx + bw] = np.asarray(block)
    return None

  try:
    step = THUMBNAIL_BLOCK
    for ty in range(0, th, step):
      for tx in range(0, tw, step):
        bw, bh = min(step, tw - tx), min(step, th - ty)
        if read(tx, ty, bw, bh) is None:
          continue
        quarter = max(1, step // 4)
        for qy in range(ty, ty + bh, quarter):
          for qx in range(tx, tx + bw, quarter):
            bad = read(qx, qy, min(quarter, tx + bw - qx), min(quarter, ty + bh - qy))
            if bad is not None:
              x0, y0, x1, y1, why = bad
              failed.append({"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0,
                             "error": why})
  finally:
    slide.close()
  return canvas, per_pixel, failed
