"""Regions annotated on whole slides as a jattn data source (`--config.data.name=slides`).

The slides and their annotations are listed in a CSV, `--config.data.slides.manifest=FILE.csv`,
read by `files.read_csv`: columns `slide,annotations` (paths relative to the CSV's folder, or
absolute), optionally a group column (`patient`, or the one `--config.data.slides.group` names;
without one each slide is its own group), the stratum columns `--config.data.slides.strata` names
and an `mpp` column (the slide's level-0 microns per pixel, over its metadata; an empty cell
leaves it to the metadata). Each slide is listed once.

The annotations are QuPath's GeoJSON export (`jattn.data.annotations`: the regions, their classes,
how overlaps are resolved). A training image is a tile of the field `config.image_size` pixels at
`--config.data.slides.tile_mpp` microns per pixel, read from the slide exactly as `jattn slide`
reads its tiles (`jattn.data.wsi`: the slide's MPP, the pyramid level within the tolerance, the
refusals, the resize), on the slide's grid from level-0 (0, 0) with a step of `stride` tiles; a
tile is taken where at least `--config.data.slides.min_region_fraction` of it lies inside a region,
and labelled by that region's class. Tiles are named `<slide>/x<X>_y<Y>` (level-0 pixels), in the
order slide (the CSV's rows), then row, then column.

The tiles are read once into the shared decoded-image cache (`jattn.data.prepare`) under the
prepared dir's lock. The prepared dir records each slide's size and modification time and each
annotations file's sha256: one that changed since (a re-exported GeoJSON, a replaced slide) is
refused in one line naming it, never used stale. Folds are group-disjoint (patients, or slides),
as the folder source's (`jattn.data.labelled`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os

import numpy as np

from jattn.core import files
from jattn.core.errors import UserError
from jattn.data import annotations, labelled, prepare, synthetic_slides, wsi
from jattn.data.fold import FoldData, Outputs

NAME = "slides"
GROUP_UNIT = "slide"
# This source's group of config fields, config.data.slides, with their defaults.
DEFAULTS = {
    "manifest": "",  # a CSV of slide,annotations[,patient][,<strata>][,mpp] rows
    "classes": "",  # the classes in output order ('': the annotations' classes, sorted)
    "group": "",  # the column of each slide's group ('': 'patient' where there is one, else slide)
    "strata": "",  # columns reported separately, e.g. 'centre,scanner' ('': none)
    "positive_class": "",  # two classes: the positive one (sensitivity, ROC); '' for none
    "tile_mpp": 0.5,  # microns per pixel of the training tiles: a tile is image_size px at it
    "min_region_fraction": 0.5,  # of a tile that must lie inside a region to be taken
    "stride": 1.0,  # grid step, a fraction of the tile (1: side by side, 0.5: half overlapping)
    # The demo: when the manifest does not exist, synthetic slides with planted regions are
    # written into its folder first (jattn.data.synthetic_slides).
    "synthetic": False,
}
COLUMNS = ("slide", "annotations")

log = logging.getLogger(__name__)


def _settings(config):
  return config.data.slides


def _manifest(config) -> str:
  path = labelled.manifest_path(_settings(config).manifest, config.data.dir)
  if not path:
    raise UserError("--config.data.slides.manifest: give the CSV of slide,annotations rows that "
                    "lists the annotated slides")
  return path


def _root(config) -> str:
  return os.path.dirname(_manifest(config))


def _synthesize_if_asked(config) -> None:
  path = _manifest(config)
  if _settings(config).synthetic and not os.path.exists(path):
    log.warning("%s does not exist: writing the synthetic demo slides there", path)
    synthetic_slides.synthesize(os.path.dirname(path), manifest=os.path.basename(path))


def prepared_dir(config) -> str:
  """`--config.data.prepared_dir`, else `~/.cache/jattn/prepared/slides-<the CSV's stem>-<hash of
  its absolute path and bytes>` (an edited CSV is prepared anew)."""
  if config.data.prepared_dir:
    return os.path.abspath(os.path.expanduser(config.data.prepared_dir))
  where = _manifest(config)
  try:
    with open(where, "rb") as f:
      content = f.read()
  except OSError:
    content = b""  # reading the manifest says what is wrong with it
  return prepare.user_cache_dir(f"slides-{os.path.splitext(os.path.basename(where))[0]}",
                                where.encode(), content)


@dataclasses.dataclass(frozen=True)
class Slide:
  """One row of the CSV, opened and scaled."""

  name: str  # the CSV's slide path, normalised ('/'-separated)
  path: str
  annotations: str
  scale: wsi.Scale
  grid: wsi.Grid
  regions: tuple[annotations.Region, ...]
  tiles: annotations.RegionTiles


@dataclasses.dataclass(frozen=True)
class Read:
  table: labelled.Table
  slides: tuple[Slide, ...]
  slide_of: np.ndarray  # int64 [N]: each tile's slide, an index into `slides`
  xs: np.ndarray
  ys: np.ndarray
  entries: list  # per slide [name, size, mtime_ns, annotations, sha256]: what source.json records


def _mpp_cell(text: str, where: str) -> float | None:
  if not text.strip():
    return None
  try:
    value = float(text)
  except ValueError:
    value = float("nan")
  if not (math.isfinite(value) and value > 0):
    raise UserError(f"{where}: mpp {text!r} is not a positive number of microns per pixel at "
                    f"level 0 (leave it empty to use the slide's metadata)")
  return value


def _field(config) -> float:
  return config.image_size * float(_settings(config).tile_mpp)


def read_table(config) -> Read:
  """Every tile the CSV's slides and annotations give (no pixel is read): a missing column or
  file, a bad mpp, a slide without MPP, a field finer than level 0, a bad annotation, a label
  outside --config.data.slides.classes or a slide without tiles is one line."""
  _synthesize_if_asked(config)
  s = _settings(config)
  path = _manifest(config)
  if not os.path.isfile(path):
    raise UserError(f"--config.data.slides.manifest={s.manifest}: {path} does not exist; give a "
                    f"CSV of {','.join(COLUMNS)}[,patient][,<strata>...][,mpp] rows")
  root = os.path.dirname(path)
  read = files.read_csv(path)
  header = list(read.header)
  group_column = s.group or "patient"
  strata = labelled.names_of(s.strata)
  named = {**({group_column: "--config.data.slides.group"} if s.group else {}),
           **dict.fromkeys(strata, "--config.data.slides.strata")}
  missing = [c for c in [*COLUMNS, *named] if c not in header]
  if missing:
    by = f" (named by {named[missing[0]]})" if missing[0] in named else ""
    raise UserError(f"{path} has no column {missing[0]!r}{by}: its columns are "
                    f"{','.join(header) or 'none'}{files.separator_hint(header)}; the CSV has the "
                    f"columns {','.join(COLUMNS)}, optionally a patient, strata and mpp")
  has_group = group_column in header
  requested = labelled.names_of(s.classes)
  field = _field(config)
  what = (f"a tile of {config.image_size} px at --config.data.slides.tile_mpp={s.tile_mpp:g} "
          f"({field:g} um)")
  slides, first, entries, axes, groups = [], {}, [], {a: [] for a in strata}, []
  for line, row in read.records():
    name = labelled.normalise_path(row["slide"])
    ann_name = labelled.normalise_path(row["annotations"])
    if not name or not ann_name:
      raise UserError(f"{path} line {line}: empty {'slide' if not name else 'annotations'}")
    slide_path = os.path.normpath(os.path.join(root, name))
    if slide_path in first:
      raise UserError(f"{path} line {line}: {name} is listed again (first on line "
                      f"{first[slide_path]}); list each slide once")
    first[slide_path] = line
    if not os.path.isfile(slide_path):
      raise UserError(f"{path} line {line}: slide {slide_path} does not exist (paths are relative "
                      f"to the CSV's folder {root}, or absolute)")
    ann_path = ann_name if os.path.isabs(ann_name) else os.path.join(root, ann_name)
    if not os.path.isfile(ann_path):
      raise UserError(f"{path} line {line}: annotations {ann_path} does not exist (paths are "
                      f"relative to the CSV's folder {root}, or absolute)")
    for a in strata:
      if not row[a].strip():
        raise UserError(f"{path} line {line}: empty {a} (a stratum column, "
                        f"--config.data.slides.strata)")
    if has_group and not row[group_column].strip():
      raise UserError(f"{path} line {line}: empty {group_column}")
    slide = wsi.open_slide(slide_path)
    try:
      override = _mpp_cell(row.get("mpp", ""), f"{path} line {line}")
      mpp = wsi.slide_mpp(slide, slide_path, override, f"{path} line {line} mpp")
      scale = wsi.choose_scale(slide, slide_path, mpp, (field, field), float(s.tile_mpp),
                               config.image_size, what)
      dimensions = tuple(slide.dimensions)
    finally:
      slide.close()
    grid = wsi.Grid.of(dimensions, scale.tile_px, float(s.stride))
    regions = tuple(annotations.read_regions(ann_path, dimensions))
    for r in regions:
      if requested and r.label not in requested:
        raise UserError(f"{ann_path}: {r.key} is labelled {r.label!r}, not one of "
                        f"--config.data.slides.classes={','.join(requested)}")
    tiles = annotations.region_tiles(regions, grid, float(s.min_region_fraction))
    if not len(tiles):
      raise UserError(f"{path} line {line}: no tile of {name} lies at least "
                      f"--config.data.slides.min_region_fraction={s.min_region_fraction:g} inside "
                      f"a region of {ann_path} (tiles of {scale.tile_px[0]} x {scale.tile_px[1]} "
                      f"level-0 px); lower it, or a smaller --config.image_size or tile_mpp")
    slides.append(Slide(name, slide_path, ann_path, scale, grid, regions, tiles))
    stat = os.stat(slide_path)
    entries.append([name, stat.st_size, stat.st_mtime_ns, ann_name,
                    annotations.file_digest(ann_path)])
    for a in strata:
      axes[a] += [row[a].strip()] * len(tiles)
    groups += [row[group_column].strip() if has_group else name] * len(tiles)
  if not slides:
    raise UserError(f"{path} has a header but no rows")
  labels = [sl.regions[i].label for sl in slides for i in sl.tiles.regions.tolist()]
  classes = labelled.classes_of(requested, labels, path, "data.slides")
  index = {c: i for i, c in enumerate(classes)}
  names = tuple(f"{sl.name}/x{x}_y{y}" for sl in slides
                for x, y in zip(sl.tiles.xs.tolist(), sl.tiles.ys.tolist(), strict=True))
  n = len(names)
  table = labelled.Table(
      names=names, labels=np.asarray([index[c] for c in labels], np.int32), classes=classes,
      groups=tuple(groups),
      strata=labelled.make_strata(axes, [float(s.tile_mpp)] * n, "--config.data.slides.tile_mpp",
                                  os.path.splitext(os.path.basename(path))[0]),
      where=path, group_unit=(group_column.removesuffix("_id") or "group") if has_group
      else GROUP_UNIT)
  slide_of = np.concatenate([np.full(len(sl.tiles), k, np.int64) for k, sl in enumerate(slides)])
  xs = np.concatenate([sl.tiles.xs for sl in slides])
  ys = np.concatenate([sl.tiles.ys for sl in slides])
  return Read(table, tuple(slides), slide_of, xs, ys, entries)


def check_unchanged(prepared: str, entries: list) -> None:
  """Refuses a prepared dir made from other slides or annotations than `entries`, naming the
  first that changed, as its source.json recorded them."""
  path = os.path.join(prepared, "source.json")
  if not os.path.isfile(path):
    return
  recorded = files.read_json(path, f"delete {prepared} to prepare again")
  old = {e[0]: e for e in recorded["entries"]}
  todo = (f"delete {prepared} to prepare again, or set --config.data.prepared_dir to a new "
          f"folder")
  for entry in entries:
    was = old.pop(entry[0], None)
    if was is None:
      raise UserError(f"the slides changed since {prepared} was prepared: {entry[0]} was not "
                      f"listed then; {todo}")
    if list(was[1:3]) != list(entry[1:3]):
      raise UserError(f"slide {entry[0]} changed since {prepared} was prepared from it (its size "
                      f"or modification time): {todo}")
    if list(was[3:]) != list(entry[3:]):
      raise UserError(f"annotations {entry[3]} of slide {entry[0]} changed since {prepared} was "
                      f"prepared from them (their content, sha256): {todo}")
  if old:
    raise UserError(f"the slides changed since {prepared} was prepared: {next(iter(old))} is no "
                    f"longer listed; {todo}")


def _fingerprint(config, read: Read) -> str:
  s = _settings(config)
  return labelled.fingerprint_of([*read.entries,
                                  [float(s.tile_mpp), float(s.stride),
                                   float(s.min_region_fraction), config.image_size],
                                  list(read.table.names), read.table.labels.tolist()])


# ------------------------------------------------------------------------------------------------
# The source's functions (jattn/data/sources.py).


def check_config(config) -> None:
  """This source's fields: the CSV, tile_mpp, min_region_fraction, stride, folds."""
  s = _settings(config)
  folds, k = config.data.folds, config.data.num_folds
  if folds == "generated" and not (isinstance(k, int) and k >= 2):
    raise UserError(f"--config.data.num_folds={k!r}: the number of folds to generate, at least 2")
  if not s.manifest:
    raise UserError("--config.data.slides.manifest: give the CSV of slide,annotations rows that "
                    "lists the annotated slides")
  if not (isinstance(s.tile_mpp, (int, float)) and s.tile_mpp > 0):
    raise UserError(f"--config.data.slides.tile_mpp={s.tile_mpp!r}: the training tiles' microns "
                    f"per pixel, > 0 (e.g. 0.5 for 20x)")
  if not (isinstance(s.min_region_fraction, (int, float)) and 0 < s.min_region_fraction <= 1):
    raise UserError(f"--config.data.slides.min_region_fraction={s.min_region_fraction!r}: the "
                    f"fraction of a tile that must lie inside a region, above 0 and at most 1")
  if not (isinstance(s.stride, (int, float)) and 0 < s.stride <= 1):
    raise UserError(f"--config.data.slides.stride={s.stride!r}: the grid step as a fraction of "
                    f"the tile, above 0 and at most 1")


def field_pixels(config) -> tuple[int, int]:
  """The training field in pixels at the strata's MPP (`tile_mpp`): `config.image_size` square;
  `jattn slide` reads a run's tiles at it."""
  return (config.image_size, config.image_size)


def outputs(config) -> Outputs:
  s = _settings(config)
  if labelled.names_of(s.classes):
    classes = labelled.classes_of(s.classes, (), "--config.data.slides.classes", "data.slides")
    decided_by = "--config.data.slides.classes"
  else:
    classes = read_table(config).table.classes
    decided_by = f"the annotations' classes of {_manifest(config)}"
  strata = labelled.names_of(s.strata) or (labelled.DATASET_AXIS,)
  if s.group:
    unit = s.group.removesuffix("_id") or "group"
  else:
    path = _manifest(config)
    header = files.read_csv(path).header if os.path.isfile(path) else ()
    unit = "patient" if "patient" in header else GROUP_UNIT
  return Outputs(classes, "class", labelled.class_map(s.positive_class, classes, "data.slides"),
                 unit, strata, decided_by)


def num_folds(config) -> int:
  if config.data.folds == "generated":
    return config.data.num_folds
  return labelled.count_folds(labelled.folds_path(config.data.folds, _root(config)))


def describe_file(path: str) -> dict | None:
  del path  # a tile's file says nothing of its group: the CSV does
  return None


def check_data_dir(config) -> None:
  """Reads the CSV, slides and annotations and checks the fold being run; nothing is written."""
  read = read_table(config)
  labelled.class_map(_settings(config).positive_class, read.table.classes, "data.slides")
  check_unchanged(prepared_dir(config), read.entries)
  labelled.resolve_folds(config, read.table, prepared_dir(config), root=_root(config))


class _Tiles:
  """The tiles of a table as the examples `prepare.build_cache` reads (`decode`)."""

  def __init__(self, read: Read):
    self.read = read
    self.readers = [wsi.TileReader(sl.path, sl.scale) for sl in read.slides]

  def __len__(self) -> int:
    return len(self.read.table.names)

  def __getitems__(self, indices):
    return [{"name": self.read.table.names[i], "index": i} for i in indices]

  def decode(self, example) -> np.ndarray:
    i = example["index"]
    return self.readers[self.read.slide_of[i]].tile(self.read.xs[i], self.read.ys[i])

  def close(self) -> None:
    for r in self.readers:
      r.close()


def load_fold(config) -> FoldData:
  """Fold `config.fold` of the annotated slides: checked first (nothing written on a problem),
  then, under the prepared dir's lock and each only once, the tile cache, the generated folds and
  the fold's normalisation statistics."""
  return _load(config, every_image=False)


def load_all(config) -> FoldData:
  """Every tile of the annotated slides as a test image, no folds and no statistics (external
  validation, `jattn.data.sources`)."""
  return _load(config, every_image=True)


def _load(config, every_image: bool) -> FoldData:
  read = read_table(config)
  table = read.table
  binary = labelled.class_map(_settings(config).positive_class, table.classes, "data.slides")
  root, prepared = _root(config), prepared_dir(config)
  check_unchanged(prepared, read.entries)
  folds, notes = (None, []) if every_image else labelled.resolve_folds(
      config, table, prepared, root=root)
  threads = max(1, int(config.loader_threads))
  fingerprint = _fingerprint(config, read)
  with files.locked(prepared):
    prepare.remove_stale(prepared)
    check_unchanged(prepared, read.entries)
    if not prepare.has_cache(prepared, config.image_size):
      print(f"preparing {len(table.names):,} tiles of {len(read.slides)} slide(s) of "
            f"{table.where} into {prepared} (once: a decoded-image cache, normalisation "
            f"statistics)", flush=True)
    tiles = _Tiles(read)
    try:
      cache = prepare.build_cache(tiles, prepared, config.image_size, fingerprint=fingerprint,
                                  record_of=lambda e: {"file_names": e["name"]},
                                  where=table.where, threads=threads, decode=tiles.decode)
    finally:
      tiles.close()
    labelled.record_source(prepared, labelled.fingerprint_of(read.entries), read.entries)
    if folds is not None:
      folds = labelled.save_generated(config, table, prepared, folds)
    data = labelled.fold_data(config, source=NAME, table=table, cache=cache, folds=folds,
                              prepared_dir=prepared, binary=binary)
  labelled.warn_all(notes)
  return data
