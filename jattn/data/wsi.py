"""A whole slide's scale and its tiles: what both the slide command (`jattn.slides`) and the
slide-regions data source (`jattn.data.slide_regions`) read slides with, so that a tile trained on
is a tile predicted.

A tile covers the physical field of a training image: for a source that publishes its images'
size (`FIELD_PIXELS`) and microns per pixel per stratum (`Strata.mpp`, results.json
`strata.<axis>.mpp`), W x H pixels at the stratum's MPP, e.g. 700 x 460 px at 0.49 um/px. The
slide's own MPP comes from its metadata (`openslide.mpp-x/y`, which OpenSlide also derives from
TIFF resolution tags) or `--mpp`; never guessed. Each tile is read from the coarsest pyramid level
whose pixels are still at least as fine as the training images' (within `TOLERANCE`), then resized
to the run's input with the training pipeline's own resize (`prepare.resize_rgb`). A field that
needs pixels clearly finer than level 0 is refused: upsampling would invent the detail the model
was trained on. Tiles lie on a grid from level-0 (0, 0) (`Grid`).
"""

from __future__ import annotations

import dataclasses
import os
import threading

import numpy as np
import openslide
from PIL import Image

from jattn.core.errors import UserError
from jattn.data.prepare import resize_rgb

# A level may be this much coarser than the training images' pixels and still be used (resampled
# to the field); beyond it, a coarser level is not used, and level 0 is refused.
TOLERANCE = 0.10
# Metadata MPPs outside this range are no microscope scan's (72 dpi is 352.8 um/px): not usable.
PLAUSIBLE_MPP = (0.01, 20.0)

def open_slide(path: str) -> openslide.OpenSlide:
  """The slide at `path`; a missing file or one OpenSlide cannot read is a one-line UserError."""
  if not os.path.isfile(path):
    raise UserError(f"{path}: no such slide file")
  try:
    return openslide.OpenSlide(path)
  except openslide.OpenSlideUnsupportedFormatError:
    raise UserError(f"{path}: not a whole-slide image OpenSlide reads (Aperio .svs, Hamamatsu "
                    f".ndpi, MIRAX .mrxs, tiled pyramidal TIFF, ...); a plain image goes through "
                    f"jattn predict instead") from None
  except openslide.OpenSlideError as e:
    raise UserError(f"{path}: OpenSlide cannot open this slide ({e}); is the file complete?"
                    ) from None


@dataclasses.dataclass(frozen=True)
class SlideMpp:
  """A slide's microns per pixel at level 0 and where the figures came from."""

  x: float
  y: float
  source: str


def slide_mpp(slide: openslide.OpenSlide, path: str, override: float | None = None,
              override_source: str = "--mpp") -> SlideMpp:
  """The slide's level-0 MPP: `override` (--mpp, or the slide's --mpp-csv row, which
  `override_source` names) if given, else its metadata; none usable is a one-line UserError saying
  how to pass it."""
  if override is not None:
    if not override > 0:
      raise UserError(f"{override_source} {override}: give the scan's microns per pixel, a "
                      f"positive number (e.g. 0.25 for a 40x scan, 0.5 for 20x)")
    return SlideMpp(float(override), float(override), override_source)
  props = slide.properties
  hint = ("pass the scan's resolution with --mpp UM_PER_PIXEL (from the scanner's report; e.g. "
          "--mpp 0.25 for a 40x scan, 0.5 for 20x), or per slide with --mpp-csv")
  try:
    x, y = float(props[openslide.PROPERTY_NAME_MPP_X]), float(props[openslide.PROPERTY_NAME_MPP_Y])
  except (KeyError, ValueError):
    unit = props.get("tiff.ResolutionUnit")
    why = (f"; its TIFF resolution unit is {unit!r}, not inch or centimeter"
           if unit not in (None, "inch", "centimeter") else ", no TIFF resolution tags")
    raise UserError(f"{path}: no microns per pixel in its metadata (no openslide.mpp-x/y{why}); "
                    f"{hint}") from None
  if "tiff.XResolution" in props and props.get(openslide.PROPERTY_NAME_VENDOR) == "generic-tiff":
    source = (f"TIFF resolution tags (XResolution {props['tiff.XResolution']}, YResolution "
              f"{props.get('tiff.YResolution')} per {props.get('tiff.ResolutionUnit')}), as "
              f"openslide.mpp-x/y")
  else:
    source = (f"openslide.mpp-x/y from the slide's metadata "
              f"({props.get(openslide.PROPERTY_NAME_VENDOR, 'unknown vendor')})")
  low, high = PLAUSIBLE_MPP
  if not (low <= x <= high and low <= y <= high):
    raise UserError(f"{path}: its metadata gives {x:g} x {y:g} um per pixel ({source}), which is "
                    f"no microscope scan's (a screen or print resolution?); {hint}")
  return SlideMpp(x, y, source)


@dataclasses.dataclass(frozen=True)
class Scale:
  """Where and how big the tiles of one slide are read (see the module docstring).

  Level-0 pixel sizes are those of the region read: `read_px` pixels of `level` times its
  downsample.
  """

  field_um: tuple[float, float]  # (width, height) of the field a tile covers
  needed_mpp: float  # the pixels the field needs (the training images')
  mpp: SlideMpp  # of the slide's level 0
  level: int
  downsample: float
  level_mpp: tuple[float, float]
  read_px: tuple[int, int]  # (width, height) read at `level`
  tile_px: tuple[int, int]  # (width, height) in level-0 pixels
  input_px: int  # the run's image_size: every tile is resized to this square

  @property
  def coarser_by(self) -> float:
    """How much coarser than the needed pixels the level's are (1.0: as fine; < 1: finer)."""
    return max(self.level_mpp) / self.needed_mpp

  def to_json(self) -> dict:
    return {"field_um": [round(v, 4) for v in self.field_um], "needed_mpp": self.needed_mpp,
            "slide_mpp": [self.mpp.x, self.mpp.y], "slide_mpp_source": self.mpp.source,
            "level": self.level, "level_downsample": self.downsample,
            "level_mpp": [round(v, 6) for v in self.level_mpp],
            "read_px": list(self.read_px), "tile_level0_px": list(self.tile_px),
            "input_px": self.input_px, "level_coarser_than_needed": round(self.coarser_by, 4),
            "tolerance": TOLERANCE}


def choose_scale(slide: openslide.OpenSlide, path: str, mpp: SlideMpp,
                 field_um: tuple[float, float], needed_mpp: float, input_px: int,
                 what: str) -> Scale:
  """The coarsest level whose pixels are at most TOLERANCE coarser than `needed_mpp`, and the
  region a tile reads there; a field needing pixels clearly finer than level 0 is refused in one
  line (`what` names the field in it, e.g. 'the 40X field of runs/x')."""
  finest = max(mpp.x, mpp.y)
  if finest > needed_mpp * (1 + TOLERANCE):
    raise UserError(
        f"{path}: {what} needs {needed_mpp:g} um per pixel, but the slide's finest level (level "
        f"0) has {finest:g} um per pixel, {finest / needed_mpp:.2f}x coarser, beyond the "
        f"{TOLERANCE:.0%} tolerance (upsampling would invent the detail the model was trained "
        f"on); use a run of a coarser stratum (or --stratum with a coarser one), or a "
        f"finer scan")
  level = 0
  for k, d in enumerate(slide.level_downsamples):
    if finest * d <= needed_mpp * (1 + TOLERANCE):
      level = k  # level_downsamples increase with k
  d = float(slide.level_downsamples[level])
  level_mpp = (mpp.x * d, mpp.y * d)
  read = (max(1, round(field_um[0] / level_mpp[0])), max(1, round(field_um[1] / level_mpp[1])))
  tile = (round(read[0] * d), round(read[1] * d))
  w, h = slide.dimensions
  if tile[0] > w or tile[1] > h:
    raise UserError(f"{path}: {what} ({field_um[0]:g} x {field_um[1]:g} um, {tile[0]} x {tile[1]} "
                    f"level-0 pixels) is larger than the slide ({w} x {h} pixels); check --mpp or "
                    f"--tile-um")
  return Scale(field_um, needed_mpp, mpp, level, d, level_mpp, read, tile, input_px)


class TileReader:
  """Reads tiles of one slide at one `Scale` from any number of threads: RGB (transparent areas,
  outside the scanned region, composited onto white), resized to the run's input.

  OpenSlide is thread-safe, but a handle that hit a read error stays in error; each thread
  therefore holds its own handle and opens a new one after an error.
  """

  def __init__(self, path: str, scale: Scale):
    self.path, self.scale = path, scale
    self._local = threading.local()
    self._handles: list[openslide.OpenSlide] = []
    self._lock = threading.Lock()

  def _slide(self) -> openslide.OpenSlide:
    slide = getattr(self._local, "slide", None)
    if slide is None:
      slide = self._local.slide = openslide.OpenSlide(self.path)
      with self._lock:
        self._handles.append(slide)
    return slide

  def region(self, x: int, y: int) -> Image.Image:
    """The RGB tile at level-0 (x, y), at its level's resolution; an unreadable region raises
    `openslide.OpenSlideError` (and this thread's handle is replaced)."""
    try:
      rgba = self._slide().read_region((int(x), int(y)), self.scale.level, self.scale.read_px)
    except openslide.OpenSlideError:
      self._local.slide = None  # the next read opens a fresh handle
      raise
    return to_rgb(rgba)

  def tile(self, x: int, y: int) -> np.ndarray:
    """uint8 [S, S, 3]: the region resized as a training image is."""
    return resize_rgb(self.region(x, y), self.scale.input_px)

  def close(self) -> None:
    with self._lock:
      for slide in self._handles:
        slide.close()
      self._handles.clear()


def to_rgb(rgba: Image.Image) -> Image.Image:
  """OpenSlide's RGBA (not premultiplied) composited onto white: opaque pixels unchanged,
  transparent ones (outside the scanned area) white."""
  if rgba.getextrema()[3][0] == 255:
    return rgba.convert("RGB")
  return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)),
                               rgba).convert("RGB")


# The thumbnail is read in blocks of this many thumbnail pixels; a block OpenSlide cannot read
# is read again as quarters, and the quarters that still fail are left as background.


@dataclasses.dataclass(frozen=True)
class Grid:
  """Tile positions: cell (row, col) is the tile with level-0 top-left (col * step_x,
  row * step_y) and size `tile` (w, h). Tiles start at level-0 (0, 0) and step by `stride` times
  the tile (1: side by side, 0.5: half overlapping); only whole tiles inside the slide are on it."""

  tile: tuple[int, int]
  step: tuple[int, int]
  cols: int
  rows: int

  @classmethod
  def of(cls, dimensions: tuple[int, int], tile: tuple[int, int], stride: float) -> Grid:
    step = (max(1, round(tile[0] * stride)), max(1, round(tile[1] * stride)))
    cols, rows = ((d - t) // s + 1 if d >= t else 0
                  for d, t, s in zip(dimensions, tile, step, strict=True))
    return cls(tuple(tile), step, cols, rows)

  def to_json(self) -> dict:
    return {"rows": self.rows, "cols": self.cols, "step_level0_px": list(self.step)}
