"""Training from annotated slides (jattn.data.slide_regions, jattn.data.annotations) and back to
QuPath (jattn slide --regions, --annotations).

Independent computations: every grid tile's overlap with the hand-written regions by shapely, the
tile size from the slide's MPP (written here, 0.499 um/px, as its facts file gives it) by hand,
each tile's pixels cut by OpenSlide's read_region and resized with PIL's bilinear filter as the
slide command resizes; the predicted tiles of tiles.csv against the labels read back.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import shutil

import numpy as np
import openslide
import pytest
import shapely
from PIL import Image
from shapely import geometry

from jattn import cli, data
from jattn.core.errors import UserError
from jattn.data import annotations, slide_regions, synthetic_slides, wsi
from jattn.training import compat
from tests.runs import REPO

REAL_SLIDE = os.path.join(REPO, "tests", "data", "slides", "CMU-1-Small-Region.svs")
REAL_MPP = 0.499  # openslide.mpp-x and -y of the real slide (tests/data/slides/README.md)
REAL_SIZE = (2220, 2967)
DEMO_SLIDES = os.path.join(REPO, "configs", "demo_slides.py")

# Two regions on the real slide, in level-0 pixels: a tumour polygon with a square hole, and a
# stroma MultiPolygon of two parts.
OUTER = [(200, 300), (1100, 250), (1200, 1100), (300, 1200)]
HOLE = [(500, 550), (850, 550), (850, 900), (500, 900)]
STROMA = [[(1300, 1500), (2100, 1450), (2000, 2400), (1400, 2300)],
          [(300, 2000), (900, 2100), (500, 2800)]]
IMAGE_SIZE, TILE_MPP, FRACTION = 16, 2.0, 0.75


def _ring(points):
  return [list(p) for p in [*points, points[0]]]


def qupath_feature(geometry_json, name, color, id_="", objectType="annotation"):
  """A feature exactly as QuPath 0.5's File > Export objects as GeoJSON writes one."""
  feature = {"type": "Feature", "geometry": geometry_json,
             "properties": {"objectType": objectType,
                            "classification": {"name": name, "color": list(color)}}}
  if id_:
    feature = {"type": "Feature", "id": id_, **{k: v for k, v in feature.items() if k != "type"}}
  return feature


def real_features():
  return [
      qupath_feature({"type": "Polygon", "coordinates": [_ring(OUTER), _ring(HOLE)]}, "Tumor",
                     (200, 0, 0), "6f1d3c9e-0c8b-4b9f-9a52-1e0c7d1b2a01"),
      qupath_feature({"type": "MultiPolygon", "coordinates": [[_ring(p)] for p in STROMA]},
                     "Stroma", (150, 200, 150), "a2b7c0de-5f14-4e44-8d1b-7b3b0a9c4e02"),
  ]


def write_json(path, value):
  with open(path, "w") as f:
    json.dump(value, f, indent=2)
  return str(path)


def source_config(manifest, prepared, **fields):
  config = compat.load_config(DEMO_SLIDES)
  config.data.slides.manifest = str(manifest)
  config.data.slides.synthetic = False
  config.data.prepared_dir = str(prepared)
  config.data.slides.tile_mpp = TILE_MPP
  config.data.slides.min_region_fraction = FRACTION
  config.image_size = IMAGE_SIZE
  config.loader_threads = 2
  for key, value in fields.items():
    node = config
    *parents, last = key.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  return config


@pytest.fixture(scope="module")
def real(tmp_path_factory):
  """(config, folder) of the real slide with the two hand-written regions, as a CSV."""
  folder = tmp_path_factory.mktemp("real")
  write_json(folder / "regions.geojson", {"type": "FeatureCollection", "features": real_features()})
  (folder / "slides.csv").write_text(f"slide,annotations,patient\n{REAL_SLIDE},regions.geojson,"
                                     f"p1\n")
  return source_config(folder / "slides.csv", folder / "prepared"), folder


def expected_tiles():
  """{(x, y): label} by hand: tiles of round(16 * 2.0 / 0.499) = 64 level-0 px (level 0, the
  slide's only one), side by side from (0, 0), at least 3/4 inside a region."""
  tile = round(IMAGE_SIZE * TILE_MPP / REAL_MPP)
  assert tile == 64
  tumour = geometry.Polygon(OUTER, [HOLE])
  stroma = geometry.MultiPolygon([geometry.Polygon(p) for p in STROMA])
  out = {}
  for y in range(0, REAL_SIZE[1] - tile + 1, tile):
    for x in range(0, REAL_SIZE[0] - tile + 1, tile):
      box = geometry.box(x, y, x + tile, y + tile)
      for label, region in (("Tumor", tumour), ("Stroma", stroma)):
        if box.intersection(region).area / tile**2 >= FRACTION:
          out[x, y] = label
  return out, tile


def test_real_slide_tiles_are_the_grid_tiles_inside_the_regions_and_none_in_the_hole(real):
  config, _ = real
  read = slide_regions.read_table(config)
  expected, tile = expected_tiles()
  got = {(int(x), int(y)): read.table.classes[k]
         for x, y, k in zip(read.xs, read.ys, read.table.labels, strict=True)}
  assert got == expected and len(got) > 100
  assert set(got.values()) == {"Tumor", "Stroma"}
  (slide,) = read.slides
  assert slide.scale.tile_px == (tile, tile) and slide.scale.level == 0
  assert slide.scale.mpp.x == pytest.approx(REAL_MPP)
  hole = geometry.Polygon(HOLE)
  tumour = geometry.Polygon(OUTER, [HOLE])
  inside_hole = [(x, y) for y in range(0, REAL_SIZE[1] - tile + 1, tile)
                 for x in range(0, REAL_SIZE[0] - tile + 1, tile)
                 if hole.contains(geometry.box(x, y, x + tile, y + tile))]
  assert len(inside_hole) >= 9  # the hole is big enough to hold whole tiles ...
  for (x, y), label in got.items():  # ... none of which is taken, and none lies in it by more
    box = geometry.box(x, y, x + tile, y + tile)  # than the fraction allows
    assert (x, y) not in inside_hole
    assert box.intersection(hole).area / tile**2 <= 1 - FRACTION
    if label == "Tumor":
      assert box.intersection(tumour).area / tile**2 >= FRACTION
  assert read.table.names[0] == f"{os.path.normpath(REAL_SLIDE)}/x{read.xs[0]}_y{read.ys[0]}"
  assert set(read.table.groups) == {"p1"} and read.table.group_unit == "patient"
  # Without a patient column each slide is its own group.
  (tmp := real[1] / "no_patient.csv").write_text(f"slide,annotations\n{REAL_SLIDE},"
                                                 f"regions.geojson\n")
  alone = slide_regions.read_table(source_config(tmp, real[1] / "p3", **{"data.slides.group": ""}))
  assert set(alone.table.groups) == {os.path.normpath(REAL_SLIDE)}
  assert alone.table.group_unit == "slide"


def test_real_slide_tiles_are_openslides_regions_resized_as_the_slide_command_does(real):
  config, _ = real
  every = data.load_all(config)
  expected, tile = expected_tiles()
  slide = openslide.OpenSlide(REAL_SLIDE)
  try:
    for i, name in enumerate(every.file_names):
      x, y = (int(v[1:]) for v in name.rsplit("/", 1)[1].split("_"))
      rgba = slide.read_region((x, y), 0, (tile, tile))
      white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
      want = Image.alpha_composite(white, rgba).convert("RGB").resize(
          (IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
      np.testing.assert_array_equal(every.images[i], np.asarray(want))
      assert every.classes[every.targets[i]] == expected[x, y]
  finally:
    slide.close()
  assert len(every.file_names) == len(expected)
  assert every.strata[0].mpp == (TILE_MPP,)  # what results.json records for jattn slide


def test_a_plain_list_of_features_reads_as_the_feature_collection(tmp_path):
  listed = annotations.read_regions(write_json(tmp_path / "list.geojson", real_features()),
                                    REAL_SIZE)
  collected = annotations.read_regions(
      write_json(tmp_path / "fc.geojson", {"type": "FeatureCollection",
                                           "features": real_features()}), REAL_SIZE)
  assert [(r.label, r.id, r.geometry.wkt) for r in listed] == [
      (r.label, r.id, r.geometry.wkt) for r in collected]
  assert collected[0].geometry.equals(geometry.Polygon(OUTER, [HOLE]))
  assert collected[1].geometry.geom_type == "MultiPolygon"
  assert collected[0].key == "6f1d3c9e-0c8b-4b9f-9a52-1e0c7d1b2a01"


@pytest.mark.parametrize("change, expected", [
    (lambda f: f[1].update(geometry={"type": "LineString", "coordinates": [[0, 0], [9, 9]]}),
     "feature 2 (id 'a2b7c0de-5f14-4e44-8d1b-7b3b0a9c4e02') has geometry type 'LineString', not "
     "a region"),
    (lambda f: f[0]["geometry"]["coordinates"][0].__setitem__(1, [2300, 250]),
     "feature 1 (id '6f1d3c9e-0c8b-4b9f-9a52-1e0c7d1b2a01') reaches outside the slide: its "
     "bounds x 200..2300"),
    (lambda f: f[1]["properties"].pop("classification"),
     "feature 2 (id 'a2b7c0de-5f14-4e44-8d1b-7b3b0a9c4e02') has no classification"),
], ids=["geometry type", "outside the slide", "no classification"])
def test_a_bad_feature_is_one_line_naming_it(tmp_path, change, expected):
  features = copy.deepcopy(real_features())
  change(features)
  path = write_json(tmp_path / "bad.geojson", features)
  with pytest.raises(UserError) as e:
    annotations.read_regions(path, REAL_SIZE)
  assert str(e.value).startswith(f"{path}: {expected}") and "\n" not in str(e.value)


def test_a_bad_feature_stops_jattn_train_with_exit_2(tmp_path, capsys):
  features = real_features()
  features[1]["properties"].pop("classification")
  write_json(tmp_path / "regions.geojson", features)
  (tmp_path / "slides.csv").write_text(f"slide,annotations,patient\n{REAL_SLIDE},"
                                       f"regions.geojson,p1\n")
  with pytest.raises(SystemExit) as e:
    cli.main(["train", "--config", DEMO_SLIDES, "--workdir", str(tmp_path / "run"),
              f"--config.data.slides.manifest={tmp_path / 'slides.csv'}",
              "--config.data.slides.synthetic=False",
              f"--config.data.prepared_dir={tmp_path / 'prepared'}"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1] == (f"jattn train: error: {tmp_path / 'regions.geojson'}: feature 2 (id "
                     f"'a2b7c0de-5f14-4e44-8d1b-7b3b0a9c4e02') has no classification "
                     f"(properties.classification.name): set its class in QuPath (right click > "
                     f"Set classification) and export again")
  assert not os.path.exists(tmp_path / "prepared")  # nothing written


def test_overlapping_regions_of_two_classes_go_to_the_smaller(tmp_path):
  """A tumour drawn inside a stroma region: its tiles are tumour, none of the stroma's lies in it
  by more than the fraction allows; computed by hand with shapely on the stated rule."""
  big = [(0, 0), (640, 0), (640, 640), (0, 640)]
  small = [(130, 130), (420, 150), (400, 430), (140, 400)]
  path = write_json(tmp_path / "nested.geojson", [
      qupath_feature({"type": "Polygon", "coordinates": [_ring(big)]}, "Stroma", (0, 255, 0)),
      qupath_feature({"type": "Polygon", "coordinates": [_ring(small)]}, "Tumor", (255, 0, 0))])
  regions = annotations.read_regions(path, (700, 700))
  grid = wsi.Grid.of((700, 700), (64, 64), 0.5)
  tiles = annotations.region_tiles(regions, grid, 0.6)
  stroma_left = geometry.Polygon(big).difference(geometry.Polygon(small))
  want = {}
  for r in range(grid.rows):
    for c in range(grid.cols):
      box = geometry.box(c * 32, r * 32, c * 32 + 64, r * 32 + 64)
      fractions = [box.intersection(stroma_left).area / 4096,
                   box.intersection(geometry.Polygon(small)).area / 4096]
      k = int(np.argmax(fractions))
      if fractions[k] >= 0.6:
        want[c * 32, r * 32] = k
  got = dict(zip(zip(tiles.xs.tolist(), tiles.ys.tolist(), strict=True), tiles.regions.tolist(),
                 strict=True))
  assert got == want and 0 in got.values() and 1 in got.values()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  """Four small synthetic slides (one per patient) and the held-out one."""
  folder = tmp_path_factory.mktemp("synthetic") / "slides"
  synthetic_slides.synthesize(str(folder), slides=4, slides_per_patient=1, size=(640, 448))
  return folder


def test_a_changed_annotations_file_or_slide_is_refused_not_used_stale(synthetic, tmp_path):
  folder = tmp_path / "slides"
  shutil.copytree(synthetic, folder)
  config = source_config(folder / "slides.csv", tmp_path / "prepared", **{"data.num_folds": 2})
  first = data.load_fold(config)
  assert data.load_fold(config).num_images == first.num_images  # unchanged: the cache is used
  patient = {r["slide"]: r["patient"] for r in _rows(folder / "slides.csv")}  # the CSV's own
  sides = [{patient[first.file_names[i].split("/")[0]] for i in side}
           for side in (first.train_indices, first.test_indices)]
  assert sides[0] and sides[1] and not sides[0] & sides[1]  # patient-disjoint folds
  geojson = json.loads((folder / "slide_2.geojson").read_text())
  geojson["features"][0]["geometry"]["coordinates"][0][0][0] += 1.0
  write_json(folder / "slide_2.geojson", geojson)
  with pytest.raises(UserError, match=r"annotations slide_2.geojson of slide slide_2.tif changed "
                     r"since .* was prepared from them \(their content, sha256\): delete"):
    data.load_fold(config)
  shutil.copy(synthetic / "slide_2.geojson", folder / "slide_2.geojson")
  assert data.load_fold(config).num_images == first.num_images  # restored: used again
  stat = os.stat(folder / "slide_3.tif")
  os.utime(folder / "slide_3.tif", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  with pytest.raises(UserError, match=r"slide slide_3.tif changed since .* \(its size or "
                     r"modification time\)"):
    data.load_fold(config)


def _rows(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


@pytest.mark.slow
def test_round_trip_annotations_in_a_run_annotations_out_read_back_as_labels(
    synthetic, tmp_path, capsys):
  """Annotated slides in, a tiny run, the held-out slide scored per annotated region (--regions,
  by a CSV as the source's) with its predictions written as annotations (--annotations); those,
  read back by the same source, label every predicted tile with its prediction."""
  from jattn import main

  workdir = str(tmp_path / "run")
  overrides = {"data.slides.manifest": synthetic / "slides.csv",
               "data.slides.synthetic": False, "data.prepared_dir": tmp_path / "prepared",
               "data.num_folds": 2, "data.slides.tile_mpp": 1.0, "image_size": 32,
               "data.slides.stride": 0.5, "data.slides.min_region_fraction": 0.5,
               "num_epochs": 2, "batch_size": 16, "eval_batch_size": 64, "keep_checkpoints": 1,
               "bootstrap_resamples": 0,
               # A narrow ResNet-18 without attention: learns the two textures in two epochs and
               # compiles faster than the demo's VGG with attention.
               "model.name": "resnet18", "model.c_attn_stages": "()", "model.s_attn_stages": "()"}
  main.main(["--config", DEMO_SLIDES, "--workdir", workdir,
             *[f"--config.{k}={v}" for k, v in overrides.items()]])
  heldout = str(synthetic / "heldout.tif")
  # A GeoJSON is one slide's regions: with two slides, one line before anything is predicted.
  with pytest.raises(SystemExit) as e:
    cli.main(["slide", "--workdir", workdir, heldout, str(synthetic / "slide_1.tif"), "--out",
              str(tmp_path / "two"), "--regions", str(synthetic / "heldout.geojson")])
  assert e.value.code == 2 and not os.path.exists(tmp_path / "two" / "heldout")
  assert capsys.readouterr().err.splitlines()[-1] == (
      f"jattn slide: error: --regions {synthetic / 'heldout.geojson'}: a GeoJSON file is the "
      f"regions of one slide, and 2 slides are given; give one slide, or a CSV of "
      f"slide,annotations rows")

  (tmp_path / "regions.csv").write_text(f"slide,annotations\n{heldout},"
                                        f"{synthetic / 'heldout.geojson'}\n")
  out = tmp_path / "out" / "heldout"
  cli.main(["slide", "--workdir", workdir, heldout, "--out", str(tmp_path / "out"),
            "--regions", str(tmp_path / "regions.csv"), "--min-region-fraction", "0.5",
            "--annotations", "--top-k", "1"])
  record = json.loads((out / "slide.json").read_text())
  tile = round(32 * 1.0 / synthetic_slides.MPP)  # 64 level-0 px, read as 32 from level 1
  assert record["scale"]["tile_level0_px"] == [tile, tile] and record["scale"]["level"] == 1
  assert record["scale"]["field_px"] == [32, 32] and record["scale"]["read_px"] == [32, 32]

  # Scored per region: the grid tiles half inside a region by shapely (the two do not overlap),
  # each region's mean probabilities over its own.
  tiles = _rows(out / "tiles.csv")
  features = json.loads((synthetic / "heldout.geojson").read_text())["features"]
  shapes = [geometry.shape(f["geometry"]) for f in features]
  assert shapes[0].intersection(shapes[1]).area == 0
  with openslide.OpenSlide(heldout) as handle:
    w, h = handle.dimensions
  inside = [[(x, y) for y in range(0, h - tile + 1, tile) for x in range(0, w - tile + 1, tile)
             if shapely.box(x, y, x + tile, y + tile).intersection(shape).area >= 0.5 * tile**2]
            for shape in shapes]
  assert {(int(t["x"]), int(t["y"])) for t in tiles} == set(inside[0]) | set(inside[1])
  rows = _rows(out / "regions.csv")
  assert [r["region"] for r in rows] == [f["id"] for f in features]
  for row, feature, cells in zip(rows, features, inside, strict=True):
    mine = [t for t in tiles if (int(t["x"]), int(t["y"])) in cells]
    assert row["label"] == feature["properties"]["classification"]["name"]
    assert int(row["tiles"]) == len(mine) > 0
    for c in ("Stroma", "Tumor"):
      assert float(row[f"mean_prob_{c}"]) == pytest.approx(
          np.mean([float(t[f"prob_{c}"]) for t in mine]), abs=2e-6)
    means = {c: float(row[f"mean_prob_{c}"]) for c in ("Stroma", "Tumor")}
    assert row["predicted"] == max(means, key=means.get)

  # Predictions out as QuPath annotations, read back by the source as the same slide's labels.
  written = json.loads((out / "annotations.geojson").read_text())
  for f in written["features"]:
    assert f["type"] == "Feature" and f["properties"]["objectType"] == "annotation"
    assert set(f["properties"]["classification"]) == {"name", "color"}
  (tmp_path / "back.csv").write_text(
      f"slide,annotations,patient\n{heldout},{out / 'annotations.geojson'},p9\n")
  back = slide_regions.read_table(source_config(tmp_path / "back.csv", tmp_path / "p2",
                                                image_size=32, **{"data.slides.tile_mpp": 1.0}))
  labels = {(int(x), int(y)): back.table.classes[k]
            for x, y, k in zip(back.xs, back.ys, back.table.labels, strict=True)}
  predicted = {(int(t["x"]), int(t["y"])): t["prediction"] for t in tiles}
  assert labels == predicted and len(labels) >= 20
  assert set(labels.values()) == {"Stroma", "Tumor"}  # both classes predicted and read back
  capsys.readouterr()


def test_the_flat_names_of_earlier_configs_reach_the_slides_group():
  """`--config.dataset=slides --config.manifest=... --config.min_region_fraction=...` as configs
  before `config.data` named them; a folder source's manifest stays the folder's."""
  config = compat.load_config(os.path.join(REPO, "configs", "demo.py"), [
      "dataset=slides", "manifest=slides.csv", "min_region_fraction=0.8", "classes=a,b"])
  assert (config.data.name, config.data.slides.manifest, config.data.slides.min_region_fraction,
          config.data.slides.classes) == ("slides", "slides.csv", 0.8, "a,b")
  assert config.data.folder.manifest == ""
  folder = compat.load_config(os.path.join(REPO, "configs", "demo.py"),
                              ["dataset=folder", "manifest=m.csv"])
  assert (folder.data.folder.manifest, folder.data.slides.manifest) == ("m.csv", "")
