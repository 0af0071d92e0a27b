"""The files of one slide's results, and of a cohort's (see `jattn.slides` for the layout).

Each writer writes one file into the slide's temporary folder, which is renamed into place once
every file is there (`jattn.slides.pipeline`), so a reader never sees a part of a slide's results.
The cohort's files are written atomically one by one (`files.atomic_path`).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from jattn.core import files
from jattn.data import annotations
from jattn.data.fold import Outputs

# QuPath's colours (RGB) of a tile's classification: the positive label red, the others below.
POSITIVE_COLOR = (220, 40, 40)
OTHER_COLORS = ((40, 110, 220), (40, 170, 80), (150, 80, 200), (230, 150, 30))


def probability_columns(outputs: Outputs) -> list[str]:
  """`prob_<class>` for each class, then `prob_<positive label>` when the classes are finer."""
  columns = [f"prob_{c}" for c in outputs.classes]
  b = outputs.binary
  if b is not None and f"prob_{b.positive_name}" not in columns:
    columns.append(f"prob_{b.positive_name}")
  return columns


def probability_values(outputs: Outputs, probs: np.ndarray) -> np.ndarray:
  """[n, len(probability_columns)]: each class' probability, then P(positive) if finer."""
  columns = probability_columns(outputs)
  if len(columns) == len(outputs.classes):
    return probs
  return np.concatenate([probs, outputs.binary.positive_probability(probs)[:, None]], 1)


def predictions(outputs: Outputs, probs: np.ndarray) -> list[str]:
  """Each tile's predicted coarse label (the class' coarse label of the most probable class)."""
  k = np.argmax(probs, -1)
  b = outputs.binary
  return [b.names[b.of[int(i)]] if b is not None else outputs.classes[int(i)] for i in k]


def tiles_csv(path: str, tiles, probs: np.ndarray, outputs: Outputs, scale) -> None:
  """tiles.csv: one row per predicted tile: grid row and col, x, y, width, height (level-0
  pixels), the level read, the tissue fraction, the probabilities and the prediction."""
  columns = probability_columns(outputs)
  values = probability_values(outputs, probs)
  labels = predictions(outputs, probs)
  w, h = scale.tile_px
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["row", "col", "x", "y", "width", "height", "level", "tissue_fraction",
                     *columns, "prediction"])
    for i in range(len(tiles)):
      writer.writerow([int(tiles.rows[i]), int(tiles.cols[i]), int(tiles.xs[i]),
                       int(tiles.ys[i]), w, h, scale.level, f"{tiles.fractions[i]:.4f}",
                       *(f"{v:.6f}" for v in values[i]), labels[i]])


def heatmap_array(grid, tiles, positive: np.ndarray) -> np.ndarray:
  """float32 [rows, cols]: P(positive) of the tile in each grid cell, NaN where none was
  predicted (background, too little tissue, unreadable)."""
  heat = np.full((grid.rows, grid.cols), np.nan, np.float32)
  heat[tiles.rows, tiles.cols] = positive
  return heat


def heatmap_png(path: str, thumbnail: np.ndarray, per_pixel: tuple[float, float], mask: np.ndarray,
                grid, heat: np.ndarray, positive_name: str, title: str) -> None:
  """heatmap.png: the thumbnail, each tile's P(positive) over it (a cell of one grid step centred
  on the tile's centre), the tissue mask's outline and a colour bar."""
  fig, ax, extent = _over_thumbnail(thumbnail, per_pixel, grid)
  image = ax.imshow(np.ma.masked_invalid(heat), cmap="RdYlBu_r", vmin=0, vmax=1, alpha=0.55,
                    extent=extent, interpolation="nearest")
  _outline(ax, thumbnail, mask, title)
  fig.colorbar(image, ax=ax, shrink=0.8, label=f"P({positive_name})")
  fig.savefig(path, format="png", dpi=100)


def _over_thumbnail(thumbnail: np.ndarray, per_pixel: tuple[float, float], grid):
  """(figure, axes, extent): the thumbnail drawn, and the extent in its pixels of a [rows, cols]
  map of the grid (a cell of one grid step centred on its tile's centre)."""
  h, w = thumbnail.shape[:2]
  fig = Figure(figsize=(8, 8 * h / w + 0.8), layout="constrained")
  ax = fig.subplots()
  ax.imshow(thumbnail)
  sx, sy = per_pixel
  left = (grid.tile[0] - grid.step[0]) / 2 / sx
  top = (grid.tile[1] - grid.step[1]) / 2 / sy
  extent = (left - 0.5, left + grid.cols * grid.step[0] / sx - 0.5,
            top + grid.rows * grid.step[1] / sy - 0.5, top - 0.5)
  return fig, ax, extent


def _outline(ax, thumbnail: np.ndarray, mask: np.ndarray, title: str) -> None:
  """The tissue mask's outline, the thumbnail's limits, no ticks, the title."""
  h, w = thumbnail.shape[:2]
  if mask.any() and not mask.all():
    ax.contour(mask.astype(np.float32), levels=[0.5], colors="black", linewidths=0.6)
  ax.set_xlim(-0.5, w - 0.5)
  ax.set_ylim(h - 0.5, -0.5)
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_title(title, fontsize=9)


def class_colors(n: int) -> list[tuple[int, int, int]]:
  """RGB colours of `n` classes, one each, in class order: matplotlib's qualitative `tab10` (up to
  10 classes), `tab20` (up to 20), else hues around the colour wheel."""
  if n <= 20:
    table = colormaps["tab10" if n <= 10 else "tab20"].colors
  else:
    table = [colormaps["hsv"](k / n)[:3] for k in range(n)]
  return [tuple(round(255 * v) for v in table[k][:3]) for k in range(n)]


def class_probability_array(grid, tiles, probs: np.ndarray) -> np.ndarray:
  """float32 [rows, cols, classes]: the tile's probability of each class in each grid cell, NaN
  where none was predicted (background, too little tissue, unreadable)."""
  heat = np.full((grid.rows, grid.cols, probs.shape[-1]), np.nan, np.float32)
  heat[tiles.rows, tiles.cols] = probs
  return heat


def class_map_array(grid, tiles, probs: np.ndarray) -> np.ndarray:
  """int16 [rows, cols]: the most probable class (an index into the classes) of the tile in each
  grid cell, -1 where none was predicted."""
  classes = np.full((grid.rows, grid.cols), -1, np.int16)
  classes[tiles.rows, tiles.cols] = np.argmax(probs, -1) if len(probs) else []
  return classes


def class_map_png(path: str, thumbnail: np.ndarray, per_pixel: tuple[float, float],
                  mask: np.ndarray, grid, classes: np.ndarray, names: Sequence[str],
                  title: str) -> None:
  """heatmap.png of a run without a positive label: the thumbnail, each tile coloured by its most
  probable class (`class_colors`; the thumbnail shows through where no tile was predicted), the
  tissue mask's outline and a legend of every class with its tile count. The PNG's text chunk
  `legend` holds the legend as JSON ({class: [R, G, B]})."""
  colors = class_colors(len(names))
  fig, ax, extent = _over_thumbnail(thumbnail, per_pixel, grid)
  cmap = ListedColormap([np.asarray(c) / 255 for c in colors])
  ax.imshow(np.ma.masked_less(classes, 0), cmap=cmap, vmin=-0.5, vmax=len(names) - 0.5,
            alpha=0.6, extent=extent, interpolation="nearest")
  _outline(ax, thumbnail, mask, title)
  counts = np.bincount(classes[classes >= 0].astype(np.int64), minlength=len(names))
  handles = [Patch(facecolor=np.asarray(c) / 255, edgecolor="black", linewidth=0.5,
                   label=f"{name} ({n})") for name, c, n in zip(names, colors, counts, strict=True)]
  fig.legend(handles=handles, loc="outside right upper", fontsize=8, title="predicted class",
             title_fontsize=8)
  legend = {name: list(c) for name, c in zip(names, colors, strict=True)}
  fig.savefig(path, format="png", dpi=100, metadata={"legend": json.dumps(legend)})


def label_colors(outputs: Outputs) -> dict[str, list[int]]:
  """{predicted label: QuPath RGB colour}: the class map's colours, or for a run with a positive
  label that one red and the others from OTHER_COLORS."""
  if outputs.binary is None:  # the class map's colours
    return {c: list(rgb) for c, rgb in zip(outputs.classes, class_colors(len(outputs.classes)),
                                           strict=True)}
  names = outputs.binary.names
  colors, others = {}, iter(OTHER_COLORS * (len(names) // len(OTHER_COLORS) + 1))
  for name in names:
    positive = name == outputs.binary.positive_name
    colors[name] = list(POSITIVE_COLOR if positive else next(others))
  return colors


def cells(tiles, grid) -> np.ndarray:
  """float64 [n, 4]: each tile's cell (x0, y0, x1, y1), one grid step centred on the tile's centre
  (the tile itself at stride 1): the cells of a grid tile each point of the slide once."""
  (tw, th), (sx, sy) = grid.tile, grid.step
  cx = np.asarray(tiles.xs, np.float64) + tw / 2
  cy = np.asarray(tiles.ys, np.float64) + th / 2
  return np.stack([cx - sx / 2, cy - sy / 2, cx + sx / 2, cy + sy / 2], 1)


def annotations_geojson(path: str, tiles, probs: np.ndarray, outputs: Outputs, grid) -> None:
  """annotations.geojson: one QuPath annotation per predicted label, the union of its tiles' cells
  (`cells`; shapely's `union_all`) in level-0 pixels, classified by the label with its colour
  (as tiles.geojson) and measured by its tile count. QuPath imports it with File > Import objects;
  the slide-regions source reads it back as labelled regions."""
  labels = np.asarray(predictions(outputs, probs), dtype=object)
  colors = label_colors(outputs)
  boxes = cells(tiles, grid)
  merged = annotations.merged_regions({name: boxes[labels == name] for name in colors})
  features = [annotations.annotation_feature(shape, name, colors[name],
                                             {"tiles": int(np.sum(labels == name))})
              for name, shape in merged.items()]
  with open(path, "w", encoding="utf-8") as f:
    json.dump({"type": "FeatureCollection", "features": features}, f)
    f.write("\n")


def regions_csv(path: str, regions, tiles, probs: np.ndarray, outputs: Outputs) -> None:
  """regions.csv: one row per annotated region (`jattn slide --regions`): its key (QuPath's id,
  else its position in the file), name and label, the class of highest mean probability over its
  tiles, those means and its tile count (a region without tiles has empty scores)."""
  columns = probability_columns(outputs)
  values = probability_values(outputs, probs)
  names = list(outputs.binary.names) if outputs.binary is not None else list(outputs.classes)
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["region", "name", "label", "predicted", *[f"mean_{c}" for c in columns],
                     "tiles"])
    for k, region in enumerate(regions):
      mine = np.flatnonzero(np.asarray(tiles.regions) == k)
      if not len(mine):
        writer.writerow([region.key, region.name, region.label, "", *[""] * len(columns), 0])
        continue
      means = values[mine].mean(0)
      class_means = probs[mine].mean(0)
      b = outputs.binary
      predicted = (names[b.of[int(np.argmax(class_means))]] if b is not None else
                   names[int(np.argmax(class_means))])
      writer.writerow([region.key, region.name, region.label, predicted,
                       *(f"{v:.6f}" for v in means), len(mine)])


def geojson(path: str, tiles, probs: np.ndarray, outputs: Outputs, scale) -> None:
  """tiles.geojson: a FeatureCollection with one polygon per tile in level-0 pixel coordinates,
  which QuPath imports as detections (`objectType`), classified by the predicted coarse label
  (`classification`: name, RGB color) and measured by the probabilities and tissue fraction
  (`measurements`). Written feature by feature: a slide of 100,000 tiles is not one string."""
  columns = probability_columns(outputs)
  values = probability_values(outputs, probs)
  labels = predictions(outputs, probs)
  colors = label_colors(outputs)
  w, h = scale.tile_px
  with open(path, "w", encoding="utf-8") as f:
    f.write('{"type": "FeatureCollection", "features": [')
    for i in range(len(tiles)):
      x, y = int(tiles.xs[i]), int(tiles.ys[i])
      feature = {
          "type": "Feature",
          "geometry": {"type": "Polygon",
                       "coordinates": [[[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]]},
          "properties": {
              "objectType": "detection",
              "classification": {"name": labels[i], "color": colors[labels[i]]},
              "measurements": {**{c: round(float(v), 6) for c, v in zip(columns, values[i],
                                                                       strict=True)},
                               "tissue_fraction": round(float(tiles.fractions[i]), 4)}}}
      f.write(("\n" if i == 0 else ",\n") + json.dumps(feature))
    f.write("\n]}\n")


def json_file(path: str, value) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=1)
    f.write("\n")


def top_tile_names(tiles, order: Sequence[int]) -> list[str]:
  """`top_tiles/<rank>_x<X>_y<Y>.png` for the tiles at `order` (best first)."""
  return [f"{rank:02d}_x{int(tiles.xs[i])}_y{int(tiles.ys[i])}.png"
          for rank, i in enumerate(order, 1)]


def cohort_csv(path: str, rows: list[dict]) -> None:
  """The cohort's CSV (one row per slide, the columns of the first row), atomically."""
  text = io.StringIO()
  if rows:
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  files.atomic_write_text(path, text.getvalue())


def cohort_json(path: str, value) -> None:
  files.atomic_write_text(path, json.dumps(value, indent=1) + "\n")


def remove_stale(folder: str) -> None:
  """Removes the temporary folders and files a killed run left in `folder` (`.<name>.tmp-*`,
  `.<name>.old-*`)."""
  for name in os.listdir(folder):
    if name.startswith(".") and (".tmp-" in name or ".old-" in name):
      files.remove(os.path.join(folder, name))
