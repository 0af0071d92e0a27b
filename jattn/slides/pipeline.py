"""One trained run over whole-slide images: the training scale, each slide's plan, its inference.

  run = pipeline.load_run(workdir, options)   # a finished run and the field its tiles cover
  plan = pipeline.plan_slide(run, path, name, options)  # the slide opened: MPP, level, tile size
  record = pipeline.predict_slide(run, plan, out, options)  # OUT/<name>/; returns its slide.json

Everything that can be refused (a run that is not finished, a run of strata at several scales
without --stratum, a file that is not a slide, no MPP, a field finer than level 0) is refused by
`load_run` and `plan_slide`, which read no pixels, before any slide is predicted or any file is
written. Tiles go through the run's eval step sharded over the local devices (`runs.Predictor`, the
path of the training's test evaluation and of `predict`), which applies the run's stain
normalisation (`config.stain_norm`), channel statistics and TTA as its test evaluation did.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import jax
import numpy as np
import openslide
from tqdm import tqdm

import jattn
from jattn import models
from jattn.core import files
from jattn.core.errors import UserError
from jattn.data import annotations, sources
from jattn.evaluation import results
from jattn.inference import attention_maps as inspect
from jattn.inference import runs
from jattn.slides import reader, tiler, tissue, writers
from jattn.training import state as state_lib

SCHEMA = "jattn.slide/1"
# The thumbnail the tissue mask is drawn on (and the heatmap over): its longer side at least
# THUMBNAIL_SIDE pixels (or the slide's), or more so that a grid step spans THUMBNAIL_PER_STEP
# pixels (a tile's tissue fraction is counted on them), but at most THUMBNAIL_MAX_SIDE.
THUMBNAIL_SIDE = 1024
THUMBNAIL_PER_STEP = 16
THUMBNAIL_MAX_SIDE = 4096
DEFAULT_THREADS = max(1, min(4, os.cpu_count() or 1))


@dataclasses.dataclass(frozen=True)
class Options:
  """How slides are tiled and predicted (the command's options; `check` refuses bad values)."""

  stratum: str | None = None  # the strata value whose scale to use (--stratum)
  mpp: float | None = None  # overrides the slide's level-0 um per pixel
  tile_um: tuple[float, float] | None = None  # overrides the field (width, height), um
  min_tissue: float = 0.5
  stride: float = 1.0
  tissue: str = "saturation"
  tta: str | None = None  # None: the run's config.tta
  top_k: int = 8
  batch_size: int = 32
  threads: int = DEFAULT_THREADS
  overwrite: bool = False
  progress: bool = True
  # Annotated regions (a QuPath GeoJSON, or a CSV slide,annotations for several slides): only
  # the tiles at least `min_region_fraction` inside one are predicted, and scored per region.
  regions: str | None = None
  min_region_fraction: float = 0.5
  annotations: bool = False  # also annotations.geojson: the predicted labels' merged regions

  def check(self) -> None:
    if not 0 <= self.min_tissue <= 1:
      raise UserError(f"--min-tissue {self.min_tissue}: give a fraction of the tile between 0 and "
                      f"1 (default 0.5)")
    if not 0 < self.min_region_fraction <= 1:
      raise UserError(f"--min-region-fraction {self.min_region_fraction}: give the fraction of a "
                      f"tile that must lie inside a region, above 0 and at most 1 (default 0.5)")
    if not 0 < self.stride <= 1:
      raise UserError(f"--stride {self.stride}: give the step between tiles as a fraction of the "
                      f"tile, above 0 and at most 1 (1: side by side, 0.5: half overlapping)")
    if self.tissue not in tissue.METHODS:
      raise UserError(f"--tissue {self.tissue!r}: use one of {', '.join(tissue.METHODS)}")
    if self.tta is not None and self.tta not in state_lib.TTA_MODES:
      raise UserError(f"--tta {self.tta!r}: use one of {', '.join(state_lib.TTA_MODES)}")
    if self.tile_um is not None and not all(v > 0 for v in self.tile_um):
      raise UserError(f"--tile-um {self.tile_um}: give the field's width and height in um, "
                      f"positive (e.g. 345,227)")
    for name, value in (("--top-k", self.top_k), ("--batch-size", self.batch_size),
                        ("--threads", self.threads)):
      if value < 1:
        raise UserError(f"{name} {value}: give a positive number")

  def settings(self) -> dict:
    """What decides a slide's results (a finished slide is reused only under the same)."""
    return {"stratum": self.stratum, "mpp": self.mpp,
            "tile_um": list(self.tile_um) if self.tile_um else None,
            "min_tissue": self.min_tissue, "stride": self.stride, "tissue": self.tissue,
            "tta": self.tta, "top_k": self.top_k,
            **({"min_region_fraction": self.min_region_fraction} if self.regions else {}),
            **({"annotations": True} if self.annotations else {})}


@dataclasses.dataclass(frozen=True)
class Field:
  """The physical field a tile covers and the pixels it needs, with where they came from."""

  field_um: tuple[float, float]
  needed_mpp: float
  field_source: str
  mpp_source: str
  stratum: dict | None  # {"axis", "value"} whose scale is used
  training_mpp: float | None
  field_px: tuple[int, int] | None
  what: str  # names the field in messages

  def to_json(self) -> dict:
    return {"stratum": self.stratum, "training_mpp": self.training_mpp,
            "training_mpp_source": self.mpp_source,
            "field_px": list(self.field_px) if self.field_px else None,
            "field_source": self.field_source}


def training_field(workdir: str, config, figures: dict, options: Options) -> Field:
  """The field of one training image: the source's image size (`FIELD_PIXELS`, or its
  `field_pixels(config)`: the slide-regions source's `config.image_size`) at the MPP that
  results.json records for the chosen stratum (`strata.<axis>.mpp`), or `--tile-um`."""
  with_mpp = {axis: s for axis, s in (figures.get("strata") or {}).items() if s.get("mpp")}
  value = options.stratum
  training_mpp, stratum, mpp_source = None, None, "none recorded"
  if with_mpp:
    axis, s = next(iter(with_mpp.items()))
    selected = [v for v in (s.get("selected") or s["values"]) if s["mpp"].get(v)]
    if value is None:
      if len({s["mpp"][v] for v in selected}) > 1:
        scales = ", ".join(f"{v}: {s['mpp'][v]:g} um/px" for v in selected)
        raise UserError(
            f"{workdir} was trained on {len(selected)} {axis}s at different scales ({scales}): "
            f"choose the scale tiles are read at with --stratum, e.g. --stratum "
            f"{selected[0]}")
      value = selected[0] if selected else None
    elif value not in s["values"]:
      raise UserError(f"--stratum {value}: not a {axis} of this run's data; use one of "
                      f"{', '.join(selected)}")
    elif value not in selected:
      raise UserError(f"--stratum {value}: {workdir} was not trained on it (its {axis}s: "
                      f"{', '.join(selected)}); use one of those, or a run trained on {value}")
    if value is not None:
      training_mpp = float(s["mpp"][value])
      stratum = {"axis": axis, "value": value}
      mpp_source = (f"results.json strata.{axis}.mpp[{value}]"
                    + (f" ({s['mpp_note']})" if s.get("mpp_note") else ""))
  elif value is not None:
    raise UserError(f"--stratum {value}: {workdir}'s results record no strata with a scale "
                    f"(microns per pixel); leave it out and give the field with --tile-um W,H")
  source = sources.of(config)
  field_px = (source.field_pixels(config) if hasattr(source, "field_pixels") else
              getattr(source, "FIELD_PIXELS", None))
  what = f"the {value + ' ' if value else ''}field of {workdir}"
  if options.tile_um is not None:
    field_um = tuple(float(v) for v in options.tile_um)
    field_source = "--tile-um"
  elif training_mpp is not None and field_px is not None:
    field_um = (field_px[0] * training_mpp, field_px[1] * training_mpp)
    field_source = (f"the {source.NAME} images' size, {field_px[0]}x{field_px[1]} px, at the "
                    f"training images' {training_mpp:g} um/px")
  else:
    why = ("no microns per pixel" if training_mpp is None else
           f"no image size of the {source.NAME} source")
    raise UserError(f"{workdir}: its results record {why}, so the field of a training image is "
                    f"unknown; give it in um with --tile-um W,H")
  # The pixels the field needs: the training images' own; without them, the network input's.
  needed = training_mpp if training_mpp is not None else min(field_um) / config.image_size
  return Field(field_um, needed, field_source, mpp_source, stratum, training_mpp,
               tuple(field_px) if field_px else None, what)


@dataclasses.dataclass
class Run:
  """A finished run read for slide inference; its state is restored on first use."""

  workdir: str
  config: object
  outputs: object
  field: Field
  results_path: str
  options: Options
  _predictor: runs.Predictor | None = None
  _state: object = None

  @property
  def state(self) -> state_lib.TrainState:
    if self._state is None:
      self._state = runs.restore(self.workdir)[1]
    return self._state

  @property
  def predictor(self) -> runs.Predictor:
    if self._predictor is None:
      self._predictor = runs.Predictor(self.state, self.options.batch_size, self.tta,
                                       runs.temperature(self.workdir))
    return self._predictor

  @property
  def tta(self) -> str:
    return self.options.tta or self.config.get("tta", "none")

  def to_json(self) -> dict:
    return {"workdir": self.workdir, "name": self.config.name, "fold": self.config.get("fold"),
            "step": int(self.state.step), "results": self.results_path, "tta": self.tta,
            "stain_norm": self.config.get("stain_norm", "none"),
            "image_size": self.config.image_size, "classes": list(self.outputs.classes)}


def load_run(workdir: str, options: Options) -> Run:
  """A finished run (with results.json) and the field its tiles cover; refuses in one line a
  folder that is not a finished run, a bad option. A run without a positive label (more than two
  classes, none positive) gets class maps instead of P(positive) heatmaps (`predict_slide`)."""
  options.check()
  config = runs.load_config(workdir)
  path = os.path.abspath(os.path.expanduser(workdir))
  results_path = os.path.join(path, "results.json")
  if not os.path.exists(results_path):
    raise UserError(f"{workdir} is not a finished run (no results.json): slide inference takes the "
                    f"training scale from a finished run's results; run its jattn train "
                    f"command again to finish it")
  figures = results.read(results_path, "train the run again to rewrite it")
  outputs = runs.outputs(config)
  return Run(path, config, outputs, training_field(workdir, config, figures, options),
             results_path, options)


@dataclasses.dataclass(frozen=True)
class Plan:
  """One slide, checked and scaled, before any pixel is read."""

  path: str
  name: str  # of its output folder
  scale: reader.Scale
  dimensions: tuple[int, int]
  regions: str | None = None  # its annotated regions' GeoJSON (--regions): only they are predicted
  regions_sha256: str | None = None


def plan_slide(run: Run, path: str, name: str, options: Options,
               slide_mpp: tuple[float, str] | None = None, regions: str | None = None) -> Plan:
  """Opens the slide and fixes the scale; not a slide, no MPP and a field finer than level 0 are
  one-line UserErrors. `slide_mpp` (MPP, where it comes from: a --mpp-csv row) is this slide's
  level-0 MPP, which wins over --mpp and the metadata. `regions` is the GeoJSON of its annotated
  regions (read and checked against the slide here: a bad feature is one line)."""
  slide = reader.open_slide(path)
  try:
    if slide_mpp is not None:
      mpp = reader.slide_mpp(slide, path, *slide_mpp)
    else:
      mpp = reader.slide_mpp(slide, path, options.mpp)
    scale = reader.choose_scale(slide, path, mpp, run.field.field_um, run.field.needed_mpp,
                                run.config.image_size, run.field.what)
    if regions is not None:
      annotations.read_regions(regions, tuple(slide.dimensions))
      return Plan(path, name, scale, tuple(slide.dimensions), os.path.abspath(regions),
                  annotations.file_digest(regions))
    return Plan(path, name, scale, tuple(slide.dimensions))
  finally:
    slide.close()


def finished(out: str, plan: Plan, run: Run, options: Options) -> dict | None:
  """The slide.json of the slide's finished results in `out`, or None when there are none;
  results made under other settings are refused (or None with --overwrite)."""
  target = os.path.join(out, plan.name)
  path = os.path.join(target, "slide.json")
  if not os.path.exists(target):
    return None
  if not os.path.exists(path):
    raise UserError(f"{target} exists but holds no slide results (no slide.json); remove it or "
                    f"use another --out")
  record = files.read_json(path, f"remove {target} to predict the slide again")
  want = {"run": run.workdir, "slide": os.path.abspath(plan.path), **options.settings(),
          "slide_mpp": [plan.scale.mpp.x, plan.scale.mpp.y], "regions_sha256": plan.regions_sha256}
  settings = dict(record.get("settings", {}))
  if "magnification" in settings:  # slide.json written before the option's generic name
    settings["stratum"] = settings.pop("magnification")
  have = {"run": record.get("run", {}).get("workdir"), "slide": record.get("slide"), **settings,
          "slide_mpp": record.get("scale", {}).get("slide_mpp"),
          "regions_sha256": (record.get("regions") or {}).get("sha256")}
  changed = [f"{k} {have.get(k)!r} -> {v!r}" for k, v in want.items() if have.get(k) != v]
  if changed and not options.overwrite:
    raise UserError(f"{target} holds results of another setting ({'; '.join(changed)}); pass "
                    f"--overwrite to predict it again, or use another --out")
  return None if changed or options.overwrite else record


def predict_slide(run: Run, plan: Plan, out: str, options: Options) -> dict:
  """Tiles the slide, predicts its tissue tiles and writes OUT/<name>/ (all files at once, by
  renaming a temporary folder); returns its slide.json."""
  started = time.perf_counter()
  scale = plan.scale
  grid, thumb, per_pixel, mask, candidates, thumb_unreadable = locate(plan, options)
  print(f"{plan.path}: level {scale.level} (x{scale.downsample:g}), tiles of "
        f"{scale.tile_px[0]}x{scale.tile_px[1]} level-0 px read as {scale.read_px[0]}x"
        f"{scale.read_px[1]} and resized to {scale.input_px}x{scale.input_px}; {len(candidates)} "
        f"of {grid.rows * grid.cols} tiles "
        f"{'inside its regions' if plan.regions else 'over tissue'}", flush=True)

  read = tiler.Stats()
  tile_reader = reader.TileReader(plan.path, scale)
  keep, probs, infer_s, done = [], [], 0.0, 0
  streamed = time.perf_counter()
  try:
    with tqdm(total=len(candidates), unit="tile", disable=None if options.progress else True,
              desc=plan.name, leave=False) as bar:
      for index, images in tiler.stream(
          lambda i: tile_reader.tile(candidates.xs[i], candidates.ys[i]), len(candidates),
          run.predictor.batch_size, options.threads, read):
        start = time.perf_counter()
        probs.append(run.predictor(images))
        infer_s += time.perf_counter() - start
        keep.append(index)
        done += len(index)
        bar.update(done + len(read.failures) - bar.n)
  finally:
    tile_reader.close()
  streamed = time.perf_counter() - streamed
  keep = np.concatenate(keep) if keep else np.zeros(0, np.int64)
  probs = (np.concatenate(probs) if probs else
           np.zeros((0, len(run.outputs.classes)), np.float32))
  tiles = tiler.Tiles(*(a[keep] for a in (candidates.rows, candidates.cols, candidates.xs,
                                          candidates.ys, candidates.fractions)),
                      regions=None if candidates.regions is None else candidates.regions[keep])
  b = run.outputs.binary
  # What the top tiles are ranked by: P(positive), or without a positive label the probability
  # of the tile's predicted class.
  p_pos = b.positive_probability(probs) if b is not None else (
      probs.max(-1) if len(probs) else np.zeros(0, np.float32))
  unreadable = [{"x": int(candidates.xs[i]), "y": int(candidates.ys[i]), "error": why}
                for i, why in read.failures]
  if unreadable:
    print(f"jattn: warning: {plan.path}: {len(unreadable)} unreadable region(s) skipped (listed "
          f"in slide.json), first at x={unreadable[0]['x']}, y={unreadable[0]['y']}: "
          f"{unreadable[0]['error']}", file=sys.stderr, flush=True)
  wall = time.perf_counter() - started
  timing = {"wall_s": round(wall, 3), "stream_s": round(streamed, 3),
            "inference_s": round(infer_s, 3), "read_thread_s": round(read.read_s, 3),
            "waited_for_tiles_s": round(read.wait_s, 3), "threads": options.threads,
            "batch_size": run.predictor.batch_size,
            "tiles_per_s": round(len(tiles) / streamed, 2) if len(tiles) else None}
  record = _record(run, plan, options, grid, mask, thumb, candidates, tiles, probs, p_pos,
                   unreadable, thumb_unreadable, timing)
  _write(run, plan, out, options, record, grid, mask, thumb, per_pixel, tiles, probs, p_pos)
  scores = record["scores"]
  if not len(tiles):
    print(f"{plan.path}: no tissue found (tissue mask: Otsu on {mask.method}, threshold "
          f"{mask.threshold:.3f}, {mask.fraction:.1%} of the thumbnail; --min-tissue "
          f"{options.min_tissue}): empty outputs in {os.path.join(out, plan.name)}", flush=True)
  elif b is None:
    counts = ", ".join(f"{c} {n}" for c, n in scores["predicted_classes"].items())
    print(f"{plan.path}: {len(tiles)} tiles predicted ({len(unreadable)} unreadable), by "
          f"predicted class: {counts}; {record['timing']['tiles_per_s']} tiles/s -> "
          f"{os.path.join(out, plan.name)}", flush=True)
  else:
    positive = b.positive_name
    print(f"{plan.path}: {len(tiles)} tiles predicted ({len(unreadable)} unreadable), mean "
          f"P({positive}) {scores['mean']:.3f}, top-{scores['top_k']} mean "
          f"{scores['top_k_mean']:.3f}, {scores['fraction_positive']:.1%} called {positive}; "
          f"{record['timing']['tiles_per_s']} tiles/s -> {os.path.join(out, plan.name)}",
          flush=True)
  return record


def locate(plan: Plan, options: Options):
  """(grid, thumbnail, its level-0 px per pixel, tissue mask, tissue tiles, the thumbnail's
  unreadable regions) of a planned slide. With annotated regions (`plan.regions`) the tiles are
  those at least `--min-region-fraction` inside a region, each with its region
  (`jattn.data.annotations.region_tiles`, the slide-regions source's rule), tissue or not."""
  grid = tiler.Grid.of(plan.dimensions, plan.scale.tile_px, options.stride)
  longest = max(plan.dimensions)
  downsample = max(1.0, longest / THUMBNAIL_MAX_SIDE,
                   min(min(grid.step) / THUMBNAIL_PER_STEP, longest / THUMBNAIL_SIDE))
  thumb, per_pixel, unreadable = reader.thumbnail(plan.path, downsample)
  if unreadable:
    print(f"jattn: warning: {plan.path}: {len(unreadable)} region(s) of the thumbnail unreadable, "
          f"taken as background (listed in slide.json), first at x={unreadable[0]['x']}, "
          f"y={unreadable[0]['y']}: {unreadable[0]['error']}", file=sys.stderr, flush=True)
  mask = tissue.tissue_mask(thumb, options.tissue)
  if plan.regions is not None:
    inside = annotations.region_tiles(annotations.read_regions(plan.regions, plan.dimensions),
                                      grid, options.min_region_fraction)
    return (grid, thumb, per_pixel, mask,
            tiler.Tiles(inside.rows, inside.cols, inside.xs, inside.ys, inside.fractions,
                        inside.regions), unreadable)
  return (grid, thumb, per_pixel, mask,
          tiler.tissue_tiles(grid, mask.mask, per_pixel, options.min_tissue), unreadable)


def benchmark(run: Run, plan: Plan, options: Options, repeats: int = 5) -> dict:
  """Tiles/s of one slide's tissue tiles, split: reading alone (the thread pool reading and
  resizing every tile), inference alone (one batch of them through the eval step `repeats` times,
  after a compiling call), and both streamed together as `predict_slide` does (without writing);
  `waited_for_tiles_s` is how long the device loop waited for the reader."""
  candidates = locate(plan, options)[4]
  if not len(candidates):
    raise UserError(f"{plan.path}: no tissue tiles to time")
  tile_reader = reader.TileReader(plan.path, plan.scale)
  read_tile = lambda i: tile_reader.tile(candidates.xs[i], candidates.ys[i])  # noqa: E731
  predictor = run.predictor
  out = {"slide": plan.path, "tiles": len(candidates), "threads": options.threads,
         "batch_size": predictor.batch_size, "input_px": plan.scale.input_px,
         "read_px": list(plan.scale.read_px), "level": plan.scale.level,
         "devices": [str(d) for d in predictor.plan.mesh.devices.flat]}
  try:
    stats = tiler.Stats()
    start = time.perf_counter()
    first = None
    for _, images in tiler.stream(read_tile, len(candidates), predictor.batch_size,
                                  options.threads, stats):
      first = images if first is None else first
    out["read_tiles_per_s"] = round(len(candidates) / (time.perf_counter() - start), 2)
    predictor(first)  # compiles
    start = time.perf_counter()
    for _ in range(repeats):
      predictor(first)
    out["inference_tiles_per_s"] = round(repeats * len(first) / (time.perf_counter() - start), 2)
    stats = tiler.Stats()
    start = time.perf_counter()
    for _, images in tiler.stream(read_tile, len(candidates), predictor.batch_size,
                                  options.threads, stats):
      predictor(images)
    wall = time.perf_counter() - start
    out.update(end_to_end_tiles_per_s=round(len(candidates) / wall, 2),
               waited_for_tiles_s=round(stats.wait_s, 3), end_to_end_s=round(wall, 3))
  finally:
    tile_reader.close()
  return out


def slide_scores(p_pos: np.ndarray, called_positive: np.ndarray, top_k: int) -> dict:
  """Slide-level scores of its tiles' P(positive): the mean, the mean of the `top_k` highest and
  the fraction of tiles whose predicted label is the positive one (None without tiles)."""
  if not len(p_pos):
    return {"mean": None, "top_k_mean": None, "top_k": top_k, "fraction_positive": None}
  k = min(top_k, len(p_pos))
  return {"mean": float(np.mean(p_pos)), "top_k_mean": float(np.mean(np.sort(p_pos)[-k:])),
          "top_k": top_k, "fraction_positive": float(np.mean(called_positive))}


def class_scores(probs: np.ndarray, classes: tuple[str, ...]) -> dict:
  """Slide-level figures of a run without a positive label: how many of its tiles, and what
  fraction, each class is the most probable one of (None fractions without tiles)."""
  counts = np.bincount(np.argmax(probs, -1), minlength=len(classes)) if len(probs) else (
      np.zeros(len(classes), np.int64))
  return {"predicted_classes": {c: int(n) for c, n in zip(classes, counts, strict=True)},
          "predicted_fractions": {c: float(n / len(probs)) if len(probs) else None
                                  for c, n in zip(classes, counts, strict=True)}}


def _record(run, plan, options, grid, mask, thumb, candidates, tiles, probs, p_pos, unreadable,
            thumb_unreadable, timing) -> dict:
  b = run.outputs.binary
  if b is not None:
    called = b.coarse(np.argmax(probs, -1)) == b.positive if len(probs) else np.zeros(0, bool)
    scores = slide_scores(p_pos, called, options.top_k)
  else:
    scores = class_scores(probs, run.outputs.classes)
  scale = plan.scale
  return {
      "schema": SCHEMA, "slide": os.path.abspath(plan.path), "name": plan.name,
      "dimensions": list(plan.dimensions),
      "positive": b.positive_name if b is not None else None,
      "scores": scores,
      "class_means": {c: float(np.mean(probs[:, j])) if len(probs) else None
                      for j, c in enumerate(run.outputs.classes)},
      "tiles": {"grid": grid.to_json(), "on_grid": grid.rows * grid.cols,
                "over_tissue": len(candidates), "predicted": len(tiles),
                "unreadable": len(unreadable), "unreadable_regions": unreadable,
                "thumbnail_unreadable_regions": thumb_unreadable},
      "scale": {**run.field.to_json(), **scale.to_json(),
                "stride": options.stride, "stride_level0_px": list(grid.step)},
      "tissue": {"method": mask.method, "threshold": mask.threshold,
                 "fraction_of_thumbnail": mask.fraction, "min_tissue": options.min_tissue,
                 "thumbnail_px": [int(thumb.shape[1]), int(thumb.shape[0])]},
      "run": run.to_json(), "settings": options.settings(), "timing": timing,
      **({"regions": {"file": plan.regions, "sha256": plan.regions_sha256,
                      "min_region_fraction": options.min_region_fraction}}
         if plan.regions else {}),
      "versions": {"jattn": jattn.__version__, "jax": jax.__version__,
                   "openslide": openslide.__library_version__,
                   "openslide-python": openslide.__version__,
                   "devices": [str(d) for d in run.predictor.plan.mesh.devices.flat]},
      "finished": True,
  }


def _write(run, plan, out, options, record, grid, mask, thumb, per_pixel, tiles, probs,
           p_pos) -> None:
  """Every file of the slide into a temporary folder, then renamed to OUT/<name>."""
  target = os.path.join(out, plan.name)
  b = run.outputs.binary
  with files.atomic_folder(target) as tmp:
    writers.tiles_csv(os.path.join(tmp, "tiles.csv"), tiles, probs, run.outputs, plan.scale)
    if b is None:
      np.save(os.path.join(tmp, "heatmap.npy"), writers.class_probability_array(grid, tiles, probs))
      classes = writers.class_map_array(grid, tiles, probs)
      np.save(os.path.join(tmp, "class_map.npy"), classes)
      title = (f"{os.path.basename(plan.path)}: most probable class of {len(tiles)} tiles"
               if len(tiles) else f"{os.path.basename(plan.path)}: no tissue found")
      writers.class_map_png(os.path.join(tmp, "heatmap.png"), thumb, per_pixel, mask.mask, grid,
                            classes, run.outputs.classes, f"{title}  ({run.config.name})")
    else:
      heat = writers.heatmap_array(grid, tiles, p_pos)
      np.save(os.path.join(tmp, "heatmap.npy"), heat)
      title = (f"{os.path.basename(plan.path)}: P({b.positive_name}) of {len(tiles)} tiles"
               if len(tiles) else f"{os.path.basename(plan.path)}: no tissue found")
      writers.heatmap_png(os.path.join(tmp, "heatmap.png"), thumb, per_pixel, mask.mask, grid,
                          heat, b.positive_name, f"{title}  ({run.config.name})")
    writers.geojson(os.path.join(tmp, "tiles.geojson"), tiles, probs, run.outputs, plan.scale)
    if options.annotations:
      writers.annotations_geojson(os.path.join(tmp, "annotations.geojson"), tiles, probs,
                                  run.outputs, grid)
    if plan.regions is not None:
      writers.regions_csv(os.path.join(tmp, "regions.csv"),
                          annotations.read_regions(plan.regions, plan.dimensions), tiles, probs,
                          run.outputs)
    record["top_tiles"] = _top_tiles(run, plan, os.path.join(tmp, "top_tiles"), tiles, p_pos,
                                     options.top_k, probs)
    writers.json_file(os.path.join(tmp, "slide.json"), record)
    if os.path.exists(target):  # --overwrite: the old results make way only now
      old = files.temp_name(target).replace(".tmp-", ".old-")
      os.replace(target, old)
      files.remove(old)


def _top_tiles(run, plan, folder, tiles, p_pos, k, probs) -> list[dict]:
  """The k tiles of highest P(positive) as inspect's attention figures; their list. Without a
  positive label `p_pos` is each tile's probability of its most probable class: the k tiles the
  model is surest of, whatever their class."""
  os.makedirs(folder)
  order = list(np.argsort(-p_pos, kind="stable")[:k])
  if not order:
    return []
  tile_reader = reader.TileReader(plan.path, plan.scale)
  try:
    images = np.stack([tile_reader.tile(tiles.xs[i], tiles.ys[i]) for i in order])
  finally:
    tile_reader.close()
  sites = models.attention_sites(run.config.model)
  _, maps = inspect.attention_maps(run.state, images, sites)
  b = run.outputs.binary
  listed = []
  for j, (i, name) in enumerate(zip(order, writers.top_tile_names(tiles, order), strict=True)):
    where = f"{plan.name} x={int(tiles.xs[i])} y={int(tiles.ys[i])}"
    if b is None:
      predicted = run.outputs.classes[int(np.argmax(probs[i]))]
      what = f"P({predicted}) = {p_pos[i]:.3f}"
      entry = {"prediction": predicted, f"prob_{predicted}": float(p_pos[i])}
    else:
      what = f"P({b.positive_name}) = {p_pos[i]:.3f}"
      entry = {f"prob_{b.positive_name}": float(p_pos[i])}
    fig = inspect.figure(images[j], maps, j, (0.5, 0.5), f"{where}  {what}  ({run.config.name})")
    fig.savefig(os.path.join(folder, name), format="png", dpi=100)
    listed.append({"file": f"top_tiles/{name}", "x": int(tiles.xs[i]), "y": int(tiles.ys[i]),
                   **entry})
  return listed
