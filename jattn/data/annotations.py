"""Regions drawn on a slide in QuPath, as GeoJSON: read as labelled shapely geometries, the grid
tiles inside them, and predicted classes written back as QuPath annotations.

QuPath's "Export objects as GeoJSON" writes a `FeatureCollection` (or, unticked, a plain list of
features) in level-0 pixel coordinates; each region is a Feature whose `geometry` is a Polygon or
a MultiPolygon (holes as further rings) and whose `properties.classification.name` is its class
(QuPath 0.5 writes `{"objectType": "annotation", "classification": {"name": "Tumor", "color":
[200, 0, 0]}}`; earlier versions `colorRGB`). A feature of another geometry type (a point or a
line annotation), without a classification, with coordinates outside the slide or with a geometry
that is not a valid area is refused in one line naming the feature (its position in the file, its
`id` and `name`).

Where regions of different classes overlap, the overlap belongs to the smaller region (by area; of
two equal ones, the later in the file): a region drawn inside another is the more specific label,
as QuPath's hierarchy makes it the other's child. Regions of one class may overlap freely. A grid
tile (`jattn.data.wsi.Grid`) belongs to the region that covers the largest part of it, when that
part is at least the minimum fraction (ties: the earlier region); after the rule above, regions of
different classes never share area, so a tile's label is that of the class covering it most. The
geometry is shapely's (GEOS).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence

import numpy as np
import shapely
from shapely import geometry as geometry_lib
from shapely.validation import explain_validity

from jattn.core import files
from jattn.core.errors import UserError

REGION_TYPES = ("Polygon", "MultiPolygon")


@dataclasses.dataclass(frozen=True)
class Region:
  """One annotated region of a slide."""

  index: int  # 0-based position among the file's features
  id: str  # the feature's `id` (QuPath's UUID), or '' when it has none
  name: str  # its `properties.name`, or ''
  label: str  # `properties.classification.name`
  geometry: shapely.Geometry  # Polygon or MultiPolygon, level-0 pixels

  @property
  def key(self) -> str:
    """How a CSV names the region: its id, else 'feature <n>' (1-based)."""
    return self.id or f"feature {self.index + 1}"


def _feature_name(k: int, feature) -> str:
  """'feature 3 (id "...", name "...")' for messages."""
  parts = []
  if isinstance(feature, dict):
    if feature.get("id") not in (None, ""):
      parts.append(f"id {str(feature['id'])!r}")
    props = feature.get("properties")
    if isinstance(props, dict) and props.get("name"):
      parts.append(f"name {str(props['name'])!r}")
  return f"feature {k + 1}" + (f" ({', '.join(parts)})" if parts else "")


def _features(path: str) -> list:
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except FileNotFoundError:
    raise UserError(f"{path}: no such annotations file") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"{path}: not a GeoJSON file ({type(e).__name__}: {e}); export the "
                    f"annotations from QuPath with File > Export objects as GeoJSON") from None
  if isinstance(value, dict) and value.get("type") == "FeatureCollection":
    value = value.get("features")
  elif isinstance(value, dict) and value.get("type") == "Feature":
    value = [value]
  if not isinstance(value, list):
    raise UserError(f"{path}: neither a GeoJSON FeatureCollection nor a list of features (QuPath's "
                    f"File > Export objects as GeoJSON writes either)")
  return value


def read_regions(path: str, dimensions: tuple[int, int] | None = None) -> list[Region]:
  """The labelled regions of the GeoJSON file at `path` in file order; with the slide's level-0
  `dimensions` (w, h), a region reaching outside it is refused. Every problem is one line naming
  the file and the feature."""
  out = []
  for k, feature in enumerate(_features(path)):
    what = f"{path}: {_feature_name(k, feature)}"
    if not isinstance(feature, dict) or feature.get("type") != "Feature":
      raise UserError(f"{what} is not a GeoJSON Feature (an object with \"type\": \"Feature\")")
    geom = feature.get("geometry")
    kind = geom.get("type") if isinstance(geom, dict) else None
    if kind not in REGION_TYPES:
      raise UserError(f"{what} has geometry type {kind!r}, not a region (Polygon or "
                      f"MultiPolygon): export only area annotations (rectangles, ellipses, "
                      f"polygons, brush), not points or lines")
    props = feature.get("properties") if isinstance(feature.get("properties"), dict) else {}
    classification = props.get("classification")
    label = classification.get("name") if isinstance(classification, dict) else None
    if not isinstance(label, str) or not label.strip():
      raise UserError(f"{what} has no classification (properties.classification.name): set its "
                      f"class in QuPath (right click > Set classification) and export again")
    try:
      shape = geometry_lib.shape(geom)
    except Exception as e:  # noqa: BLE001 -- shapely raises several types for bad coordinates
      raise UserError(f"{what}: its coordinates are not a {kind} ({type(e).__name__}: {e})"
                      ) from None
    if shape.is_empty or not shape.area > 0:
      raise UserError(f"{what}: its {kind} has no area")
    if not shape.is_valid:
      raise UserError(f"{what}: its {kind} is not a valid area ({explain_validity(shape)}); "
                      f"mend it in QuPath (e.g. Objects > Annotations > Simplify shape) and "
                      f"export again")
    if dimensions is not None:
      x0, y0, x1, y1 = shape.bounds
      w, h = dimensions
      if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
        raise UserError(f"{what} reaches outside the slide: its bounds x {x0:g}..{x1:g}, y "
                        f"{y0:g}..{y1:g} against the slide's {w} x {h} level-0 pixels (the "
                        f"annotations of another slide, or not in level-0 pixels?)")
    name = props.get("name")
    out.append(Region(k, "" if feature.get("id") is None else str(feature["id"]),
                      name if isinstance(name, str) else "", label.strip(), shape))
  if not out:
    raise UserError(f"{path} holds no annotations: draw and classify regions in QuPath, then "
                    f"File > Export objects as GeoJSON")
  return out


def resolved(regions: Sequence[Region]) -> list[shapely.Geometry]:
  """Each region's geometry less the regions of other classes it yields to (the module's rule:
  the smaller region keeps an overlap; of equal areas, the later one)."""
  geoms = [r.geometry for r in regions]
  areas = [g.area for g in geoms]
  tree = shapely.STRtree(geoms)
  out = []
  for i, region in enumerate(regions):
    yields = [j for j in tree.query(geoms[i], predicate="intersects").tolist()
              if j != i and regions[j].label != region.label
              and (areas[j] < areas[i] or (areas[j] == areas[i] and j > i))]
    out.append(geoms[i].difference(shapely.union_all([geoms[j] for j in yields]))
               if yields else geoms[i])
  return out


@dataclasses.dataclass(frozen=True)
class RegionTiles:
  """The grid tiles inside regions, in row-major order."""

  rows: np.ndarray  # int64 [n]
  cols: np.ndarray
  xs: np.ndarray  # level-0 top-left corners
  ys: np.ndarray
  fractions: np.ndarray  # float64 [n]: of the tile inside its region
  regions: np.ndarray  # int64 [n]: index into the regions

  def __len__(self) -> int:
    return len(self.xs)


def region_tiles(regions: Sequence[Region], grid, min_fraction: float) -> RegionTiles:
  """The tiles of `grid` (a `jattn.data.wsi.Grid`) at least `min_fraction` (and some) inside a
  region once overlaps are resolved (`resolved`), each with the region covering most of it."""
  tw, th = grid.tile
  (sx, sy), area = grid.step, float(tw * th)
  best: dict[tuple[int, int], tuple[float, int]] = {}
  for i, shape in enumerate(resolved(regions)):
    if shape.is_empty:
      continue
    x0, y0, x1, y1 = shape.bounds
    # Cells whose tile [c*sx, c*sx + tw) meets [x0, x1]: c from ceil((x0 - tw) / sx) to x1 / sx.
    c0, c1 = max(0, int(np.ceil((x0 - tw) / sx))), min(grid.cols - 1, int(np.floor(x1 / sx)))
    r0, r1 = max(0, int(np.ceil((y0 - th) / sy))), min(grid.rows - 1, int(np.floor(y1 / sy)))
    if c1 < c0 or r1 < r0:
      continue
    rows, cols = (a.ravel() for a in np.meshgrid(np.arange(r0, r1 + 1), np.arange(c0, c1 + 1),
                                                 indexing="ij"))
    xs, ys = cols * sx, rows * sy
    boxes = shapely.box(xs, ys, xs + tw, ys + th)
    shapely.prepare(shape)
    fractions = shapely.area(shapely.intersection(boxes, shape)) / area
    for r, c, f in zip(rows.tolist(), cols.tolist(), fractions.tolist(), strict=True):
      if f > 0 and f >= min_fraction and f > best.get((r, c), (0.0, -1))[0]:
        best[r, c] = (f, i)
  cells = sorted(best)
  rows = np.asarray([r for r, _ in cells], np.int64)
  cols = np.asarray([c for _, c in cells], np.int64)
  return RegionTiles(rows, cols, cols * sx, rows * sy,
                     np.asarray([best[c][0] for c in cells], np.float64),
                     np.asarray([best[c][1] for c in cells], np.int64))


def annotation_feature(shape, label: str, color: Sequence[int],
                       measurements: Mapping[str, float] | None = None) -> dict:
  """A QuPath 0.5 annotation: the geometry, `objectType` annotation and its classification."""
  properties = {"objectType": "annotation",
                "classification": {"name": label, "color": [int(v) for v in color]}}
  if measurements:
    properties["measurements"] = dict(measurements)
  return {"type": "Feature", "geometry": geometry_lib.mapping(shape), "properties": properties}


def merged_regions(boxes_by_label: Mapping[str, Sequence[tuple[float, float, float, float]]]
                   ) -> dict[str, shapely.Geometry]:
  """{label: the union of its (x0, y0, x1, y1) boxes} (shapely's `union_all`), labels with none
  left out."""
  out = {}
  for label, boxes in boxes_by_label.items():
    if len(boxes):
      b = np.asarray(boxes, np.float64)
      out[label] = shapely.union_all(shapely.box(b[:, 0], b[:, 1], b[:, 2], b[:, 3])).simplify(0)
  return out


def write_annotations(path: str, features: Sequence[dict]) -> None:
  """A FeatureCollection of `features`, as QuPath's File > Import objects reads it."""
  files.atomic_write_text(path, json.dumps({"type": "FeatureCollection",
                                            "features": list(features)}) + "\n")


def file_digest(path: str) -> str:
  """sha256 of the file's bytes (what a changed annotations file is told by)."""
  return files.sha256(path)

