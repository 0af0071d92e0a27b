"""A slide's tissue tiles through a backbone, one HDF5 file per slide (CLAM's and TRIDENT's
layout; docs/features.md).

  features.write_slides(backbone, ["slides/"], "features/", pipeline.Options())

The tiles are exactly those `jattn slide` predicts: the same scale (`pipeline.plan_slide`: a run's
training field and MPP from its results.json, or `--tile-um` and the network input's pixels for a
config), grid, tissue mask and tiler (`pipeline.locate`), read and resized by the same
`reader.TileReader`. Each slide's file is OUT/<slide name>.h5, written to a temporary name and
renamed; a finished slide's file (the same backbone and settings) is skipped when the command
runs again, so a killed cohort resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
import openslide

from jattn.core.errors import UserError, warn
from jattn.inference import attention_maps
from jattn.inference import features as features_lib
from jattn.slides import pipeline, reader, tiler
from jattn.training import features as compute_lib


@dataclasses.dataclass(frozen=True)
class Scaled:
  """What `pipeline.plan_slide` reads of a run: the field a tile covers and the input size."""

  field: pipeline.Field
  config: object


def scaled(backbone: features_lib.Backbone, options: pipeline.Options) -> Scaled:
  """The field of the backbone's tiles: a finished run's training field (as `jattn slide`), or
  for a config the `--tile-um` field at the network input's pixels."""
  if backbone.source == "run":
    run = pipeline.load_run(backbone.workdir, options)
    return Scaled(run.field, run.config)
  options.check()
  if options.tile_um is None:
    raise UserError("--config has no training scale: give the field a tile covers with "
                    "--tile-um W,H (um), or a trained run's --workdir")
  field_um = tuple(float(v) for v in options.tile_um)
  size = backbone.config.image_size
  field = pipeline.Field(field_um, min(field_um) / size, "--tile-um",
                         f"the network input's {size} px across the field", None, None, None,
                         f"the --tile-um field of {backbone.name}")
  return Scaled(field, backbone.config)


def slide_settings(backbone, options: pipeline.Options, plan: pipeline.Plan, dtype: str) -> dict:
  return {**backbone.attrs(), "dtype": dtype, "slide": os.path.abspath(plan.path),
          "settings": json.dumps({k: v for k, v in options.settings().items()
                                  if k not in ("tta", "top_k")}, sort_keys=True),
          "slide_mpp": np.asarray([plan.scale.mpp.x, plan.scale.mpp.y], np.float64)}


def write_slides(backbone: features_lib.Backbone, paths: list[str], out: str,
                 options: pipeline.Options, dtype: str = "float32") -> list[str]:
  """OUT/<name>.h5 of every slide `paths` names (files or folders); every slide is opened and
  scaled before the first tile is read; finished slides are skipped. Returns the files."""
  features_lib.check_dtype(dtype)
  from_files = reader.slide_paths(list(paths))
  if not from_files:
    raise UserError("give at least one slide (or a folder of slides)")
  scale = scaled(backbone, options)
  names = attention_maps.distinct_names(from_files)
  plans = [pipeline.plan_slide(scale, p, n, options) for p, n in zip(from_files, names,
                                                                       strict=True)]
  os.makedirs(out, exist_ok=True)
  written = []
  for plan in plans:
    path = os.path.join(out, f"{plan.name}.h5")
    settings = slide_settings(backbone, options, plan, dtype)
    if features_lib.finished(path, settings, options.overwrite):
      print(f"{plan.path}: finished ({path}); skipped")
    else:
      write_slide(backbone, scale, plan, path, options, dtype, settings)
    written.append(path)
  return written


def _objective_power(path: str, mpp: float) -> float:
  """The level-0 objective power: the slide's metadata, else 10 / MPP (TRIDENT's rule)."""
  slide = openslide.OpenSlide(path)
  try:
    value = slide.properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
  finally:
    slide.close()
  try:
    return float(value)
  except (TypeError, ValueError):
    return 10.0 / mpp


def write_slide(backbone, scale: Scaled, plan: pipeline.Plan, path: str,
                options: pipeline.Options, dtype: str, settings: dict) -> None:
  """The features of one slide's readable tissue tiles into `path`."""
  started = time.perf_counter()
  grid, _, _, mask, candidates, _ = pipeline.locate(plan, options)
  s = plan.scale
  stats = tiler.Stats()
  tile_reader = reader.TileReader(plan.path, s)
  feats, kept = [], []
  try:
    for index, images in tiler.stream(
        lambda i: tile_reader.tile(candidates.xs[i], candidates.ys[i]), len(candidates),
        options.batch_size, options.threads, stats):
      n = len(images)
      if n < options.batch_size:  # one shape for every batch
        images = np.concatenate([images, np.repeat(images[:1], options.batch_size - n, 0)])
      feats.append(compute_lib.compute(backbone.state, images, options.batch_size)[:n])
      kept.append(index)
  finally:
    tile_reader.close()
  keep = np.concatenate(kept) if kept else np.zeros(0, np.int64)
  feats = (np.concatenate(feats) if feats else np.zeros((0, backbone.dim), np.float32))
  coords = np.stack([candidates.xs[keep], candidates.ys[keep]], 1).astype(np.int64).reshape(-1, 2)
  if stats.failures:
    warn(f"{plan.path}: {len(stats.failures)} unreadable region(s) left out, first at "
         f"x={int(candidates.xs[stats.failures[0][0]])}, "
         f"y={int(candidates.ys[stats.failures[0][0]])}: {stats.failures[0][1]}")
  level0_power = _objective_power(plan.path, max(s.mpp.x, s.mpp.y))
  patch_size = max(1, round(s.field_um[0] / s.needed_mpp))  # at the target scale (TRIDENT)
  field = scale.field
  attrs = {**settings, "kind": "slide", "name": plan.name, "num_tiles": len(keep),
           "mpp": s.needed_mpp, "stratum": json.dumps(field.stratum) if field.stratum else "None",
           "scale": json.dumps({**field.to_json(), **s.to_json(), "stride": options.stride,
                                "stride_level0_px": list(grid.step)}),
           "tissue": json.dumps({"method": mask.method, "threshold": mask.threshold,
                                 "min_tissue": options.min_tissue}),
           "tiles_over_tissue": len(candidates), "unreadable_tiles": len(stats.failures)}
  coords_attrs = {
      # TRIDENT's: patch_size at the target scale, patch_size_level0 in level-0 pixels
      "patch_size": patch_size, "patch_size_level0": int(s.tile_px[0]),
      "patch_size_level0_wh": np.asarray(s.tile_px, np.int64),
      "level0_magnification": level0_power,
      "target_magnification": level0_power * patch_size / s.tile_px[0],
      "overlap": int(s.tile_px[0] - grid.step[0]), "name": plan.name,
      "level0_width": int(plan.dimensions[0]), "level0_height": int(plan.dimensions[1]),
      # CLAM's: the pyramid level read and its downsample
      "patch_level": int(s.level), "downsample": float(s.downsample),
      "read_px": np.asarray(s.read_px, np.int64)}
  features_lib.write_h5(path, feats.astype(np.dtype(dtype)), attrs, {"coords": coords},
                        coords_attrs=coords_attrs, features_attrs={"name": plan.name})
  print(f"{plan.path}: {len(keep)} tissue tiles of {s.tile_px[0]}x{s.tile_px[1]} level-0 px "
        f"(level {s.level}) -> {backbone.dim}-dimensional {backbone.name} features in {path} "
        f"({time.perf_counter() - started:.1f} s)", flush=True)
