"""Synthetic annotated whole slides for the slide-regions demo and tests: nothing to download.

Each slide is a pyramidal tiled TIFF (tifffile; reduced levels as further top-level pages, which
OpenSlide reads as a generic tiled TIFF) at `MPP` microns per pixel with its resolution tags, on
glass, with regions of two H&E-like textures planted in it: "Tumor", sheets of large dark purple
nuclei, and "Stroma", pink wavy fibres with sparse thin nuclei. Each slide's regions are written as
QuPath 0.5 writes them (File > Export objects as GeoJSON: a FeatureCollection of Features with a
UUID `id`, a Polygon, `objectType` annotation and a classification name and colour): a tumour
polygon and a stroma polygon with a hole. Every slide also holds an unannotated patch of tumour,
for the slide command to find. `slides.csv` lists the slides (`slide,annotations,patient`, two
slides per patient); `heldout.tif` and `heldout.geojson` are a further slide of a further patient,
not listed, to score with `jattn slide --regions`.

  from jattn.data import synthetic_slides
  synthetic_slides.synthesize("~/.cache/jattn/demo_slides")
"""

from __future__ import annotations

import json
import os
import uuid

import numpy as np
import tifffile
from PIL import Image, ImageDraw

from jattn.core import files
from jattn.core.errors import UserError

MPP = 0.5  # level-0 microns per pixel (20x)
SIZE = (1536, 1024)  # level-0 (width, height)
LEVELS = 2  # level k is level 0 / 2^k
GLASS = 240
REGION_COLORS = {"Tumor": (200, 0, 0), "Stroma": (150, 200, 150)}  # QuPath's default colours
HELDOUT = "heldout"


def _texture(rng, kind: str, shape: tuple[int, int], tint: np.ndarray) -> np.ndarray:
  """uint8 [h, w, 3]: tumour (dense large dark nuclei) or stroma (wavy pink fibres)."""
  h, w = shape
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  if kind == "Stroma":
    phase = rng.uniform(0, 2 * np.pi)
    waves = 0.5 + 0.5 * np.sin(xx / 5.0 + 3 * np.sin(yy / 37.0 + phase))
    base = np.stack([235 - 40 * waves, 150 - 50 * waves, 190 - 30 * waves], -1)
    nuclei, radius = 0.0006, (1.5, 2.5)
  else:
    base = np.stack([np.full_like(xx, 215), np.full_like(xx, 160), np.full_like(xx, 205)], -1)
    nuclei, radius = 0.006, (3.0, 5.0)
  image = Image.fromarray(np.clip(base + tint + rng.normal(0, 8, (h, w, 3)), 0, 255)
                          .astype(np.uint8))
  draw = ImageDraw.Draw(image)
  for _ in range(int(nuclei * h * w)):
    x, y = rng.uniform(0, w), rng.uniform(0, h)
    rx = rng.uniform(*radius)
    ry = rx * (rng.uniform(0.3, 0.6) if kind == "Stroma" else rng.uniform(0.7, 1.0))
    shade = tuple(int(v) for v in rng.integers([60, 20, 100], [100, 50, 150]))
    draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=shade)
  return np.asarray(image)


def _polygon(rng, centre, radius, vertices: int) -> list[tuple[float, float]]:
  """A star-shaped simple polygon around `centre` (radii within 70-100% of `radius`)."""
  angles = np.sort(rng.uniform(0, 2 * np.pi, vertices))
  radii = radius * rng.uniform(0.7, 1.0, vertices)
  return [(round(float(centre[0] + r * np.cos(a)), 1), round(float(centre[1] + r * np.sin(a)), 1))
          for a, r in zip(angles, radii, strict=True)]


def _mask(size, rings) -> np.ndarray:
  """bool [h, w]: inside the first ring and outside the others (holes)."""
  image = Image.new("L", size, 0)
  draw = ImageDraw.Draw(image)
  draw.polygon(rings[0], fill=1)
  for hole in rings[1:]:
    draw.polygon(hole, fill=0)
  return np.asarray(image, bool)


def feature(rng, rings, label: str) -> dict:
  """A region as QuPath 0.5 exports it."""
  closed = [[*map(list, ring), list(ring[0])] for ring in rings]
  return {"type": "Feature", "id": str(uuid.UUID(int=int(rng.integers(0, 2**62)) << 64 | 1)),
          "geometry": {"type": "Polygon", "coordinates": closed},
          "properties": {"objectType": "annotation",
                         "classification": {"name": label, "color": list(REGION_COLORS[label])}}}


def write_pyramid(path: str, image: np.ndarray, mpp: float, levels: int = LEVELS) -> None:
  """A tiled pyramidal TIFF with resolution tags (pixels per centimetre), atomically."""
  with files.atomic_path(path) as tmp, tifffile.TiffWriter(tmp) as tif:
    for k in range(levels):
      tif.write(np.ascontiguousarray(image[::2 ** k, ::2 ** k]), tile=(256, 256),
                photometric="rgb", subfiletype=1 if k else 0, compression="zlib",
                resolution=(1e4 / (mpp * 2 ** k),) * 2, resolutionunit="CENTIMETER")


def slide(rng, size=SIZE) -> tuple[np.ndarray, list[dict]]:
  """(the slide's level-0 RGB, its QuPath features)."""
  w, h = size
  image = np.full((h, w, 3), GLASS, np.uint8) + rng.integers(0, 4, (h, w, 3), dtype=np.uint8)
  tint = rng.normal(0, 8, 3)
  tumour = [_polygon(rng, (w * rng.uniform(0.2, 0.3), h * rng.uniform(0.35, 0.45)),
                     min(w, h) * 0.27, 10)]
  centre = (w * rng.uniform(0.68, 0.72), h * 0.5)
  stroma = [_polygon(rng, centre, min(w, h) * 0.42, 12),
            _polygon(rng, centre, min(w, h) * 0.12, 6)[::-1]]  # a hole of glass in it
  patch = [_polygon(rng, (w * 0.25, h * 0.86), min(w, h) * 0.1, 8)]  # unannotated tumour
  for rings, kind in ((tumour, "Tumor"), (stroma, "Stroma"), (patch, "Tumor")):
    inside = _mask(size, rings)
    image[inside] = _texture(rng, kind, (h, w), tint)[inside]
  return image, [feature(rng, tumour, "Tumor"), feature(rng, stroma, "Stroma")]


def synthesize(out: str, slides: int = 6, slides_per_patient: int = 2, seed: int = 0,
               manifest: str = "slides.csv", size=SIZE) -> str:
  """Writes `slides` annotated slides, their GeoJSON and the CSV (`manifest`) listing them, and the
  held-out slide, into `out` (created; a folder holding other files is refused); returns the CSV's
  path. Deterministic for a seed."""
  out = os.path.abspath(os.path.expanduser(out))
  if os.path.isdir(out) and set(os.listdir(out)) - {".lock"}:
    raise UserError(f"{out} is not empty: synthetic slides are written into a new or empty folder")
  os.makedirs(out, exist_ok=True)
  rows = ["slide,annotations,patient"]
  for k in range(slides + 1):
    rng = np.random.default_rng([seed, k])
    image, features = slide(rng, size)
    name = HELDOUT if k == slides else f"slide_{k + 1}"
    write_pyramid(os.path.join(out, f"{name}.tif"), image, MPP)
    files.atomic_write_text(os.path.join(out, f"{name}.geojson"),
                            json.dumps({"type": "FeatureCollection", "features": features},
                                       indent=2) + "\n")
    if k < slides:
      rows.append(f"{name}.tif,{name}.geojson,patient_{k // slides_per_patient + 1}")
  path = os.path.join(out, manifest)
  files.atomic_write_text(path, "\n".join(rows) + "\n")
  return path
