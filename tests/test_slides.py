"""Whole-slide inference (jattn.cli.slide, jattn.slides) on a generated pyramid of known layout,
small generated slides and a real Aperio slide, with the shared tiny demo run (a run of all four
BreakHis magnifications, hence --stratum, or its BreakHis alias --magnification).

Independent computations: OpenSlide cutting each tile's region for `predict`, the level and tile
size from the MPPs by hand, scikit-learn's figures of hand-computed slide scores.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image
from sklearn import metrics as skm

from jattn.cli import slide
from jattn.inference import predict
from jattn.slides import cohort, pipeline, tissue, writers
from tests.runs import REPO

REAL_SLIDE = os.path.join(REPO, "tests", "data", "slides", "CMU-1-Small-Region.svs")
REAL_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"

# The generated pyramid: level 0 at 0.2 um/px, levels 1 and 2 at 0.4 and 0.8. A 40X field of the
# demo run (BreakHis: 700 x 460 px at 0.4924 um/px, results.json) needs 0.4924 um/px: the
# coarsest level within 10% of that is level 1 (0.8 > 0.4924 * 1.1), read as 700 * 0.4924 / 0.4
# by 460 * 0.4924 / 0.4 pixels.
MPP0 = 0.2
MPP_40X = 0.4924
READ = (round(700 * MPP_40X / 0.4), round(460 * MPP_40X / 0.4))  # at level 1
TILE = (2 * READ[0], 2 * READ[1])  # level-0 pixels
COLS, ROWS = 3, 2
SIZE = (COLS * TILE[0] + 76, ROWS * TILE[1] + 40)  # (w, h); a strip right and below is no tile
TISSUE = {(0, 0), (1, 1), (0, 2)}  # (row, col) tiles fully covered by tissue
QUARTER = (1, 0)  # a tile a quarter covered: below --min-tissue 0.5
GLASS = 242


def _tissue(rng, shape):
  """H&E-like pink and purple texture."""
  base = np.array([200, 110, 170], np.float64) + rng.normal(0, 25, (*shape, 3))
  nuclei = rng.random(shape) < 0.08
  base[nuclei] = [90, 50, 140]
  return np.clip(base, 0, 255).astype(np.uint8)


def _write_pyramid(path, image, mpp, levels=3, compression=None):
  """A tiled TIFF of `levels` top-level pages (reduced ones subfiletype=1), with resolution tags
  (pixels per centimeter) when `mpp` is given."""
  with tifffile.TiffWriter(path) as tif:
    for k in range(levels):
      extra = ({"resolution": (1e4 / (mpp * 2 ** k),) * 2, "resolutionunit": "CENTIMETER"}
               if mpp else {})
      tif.write(image[::2 ** k, ::2 ** k], tile=(256, 256), photometric="rgb",
                subfiletype=1 if k else 0, compression=compression, **extra)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
  rng = np.random.default_rng(0)
  w, h = SIZE
  image = np.full((h, w, 3), GLASS, np.uint8)
  image += rng.integers(0, 4, image.shape, dtype=np.uint8)  # glass is not perfectly flat
  for r, c in TISSUE:
    image[r * TILE[1]:(r + 1) * TILE[1], c * TILE[0]:(c + 1) * TILE[0]] = _tissue(rng, TILE[::-1])
  r, c = QUARTER
  image[r * TILE[1]:r * TILE[1] + TILE[1] // 2, c * TILE[0]:c * TILE[0] + TILE[0] // 2] = (
      _tissue(rng, (TILE[1] // 2, TILE[0] // 2)))
  image[:, COLS * TILE[0]:] = _tissue(rng, (h, w - COLS * TILE[0]))  # beyond the last whole tile
  path = str(tmp_path_factory.mktemp("pyramid") / "pyramid.tif")
  _write_pyramid(path, image, MPP0)
  return path


@pytest.fixture(scope="module")
def pyramid_out(pyramid, trained_run, tmp_path_factory):
  out = tmp_path_factory.mktemp("pyramid_out") / "out"
  slide.main(["--workdir", trained_run, pyramid, "--out", str(out), "--magnification", "40X",
              "--top-k", "2"])
  return out / "pyramid"


def _rows(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_pyramid_is_read_by_openslide_as_three_levels_at_its_resolution(pyramid):
  """Guards the test data itself: OpenSlide sees the 3 levels and the resolution tags."""
  s = openslide.OpenSlide(pyramid)
  assert s.level_count == 3 and s.level_downsamples == (1.0, 2.0, 4.0)
  assert float(s.properties["openslide.mpp-x"]) == pytest.approx(MPP0)


def test_tiles_are_the_tissue_tiles_at_the_right_level_and_size(pyramid_out):
  rows = _rows(pyramid_out / "tiles.csv")
  assert {(int(r["row"]), int(r["col"])) for r in rows} == TISSUE
  for r in rows:
    x, y, w, h = (int(r[k]) for k in ("x", "y", "width", "height"))
    assert (w, h) == TILE and int(r["level"]) == 1
    assert (x, y) == (int(r["col"]) * TILE[0], int(r["row"]) * TILE[1])
    assert 0 <= x and x + w <= SIZE[0] and 0 <= y and y + h <= SIZE[1]
    assert float(r["tissue_fraction"]) > 0.95
  record = json.loads((pyramid_out / "slide.json").read_text())
  scale = record["scale"]
  assert scale["level"] == 1 and scale["read_px"] == list(READ)
  assert scale["training_mpp"] == MPP_40X and scale["field_px"] == [700, 460]
  assert scale["slide_mpp"] == [pytest.approx(MPP0)] * 2
  assert "TIFF resolution tags" in scale["slide_mpp_source"]
  assert record["tiles"]["on_grid"] == ROWS * COLS and record["tiles"]["predicted"] == len(TISSUE)


def test_tile_probabilities_equal_predict_on_regions_cut_with_openslide(pyramid, pyramid_out,
                                                                        trained_run, tmp_path):
  rows = _rows(pyramid_out / "tiles.csv")
  s = openslide.OpenSlide(pyramid)
  paths = []
  for i, r in enumerate(rows):
    level = int(r["level"])
    d = s.level_downsamples[level]
    region = s.read_region((int(r["x"]), int(r["y"])), level,
                           (round(int(r["width"]) / d), round(int(r["height"]) / d)))
    paths.append(str(tmp_path / f"tile{i}.png"))
    region.convert("RGB").save(paths[-1])
  want = [float(p["prob_malignant"]) for p in predict.predict(trained_run, paths)]
  np.testing.assert_allclose([float(r["prob_malignant"]) for r in rows], want, rtol=0, atol=2e-6)
  heat = np.load(pyramid_out / "heatmap.npy")
  assert heat.shape == (ROWS, COLS)
  assert {tuple(int(v) for v in rc) for rc in np.argwhere(np.isfinite(heat))} == TISSUE
  for r in rows:
    assert heat[int(r["row"]), int(r["col"])] == pytest.approx(float(r["prob_malignant"]),
                                                                abs=1e-6)


def test_slide_scores_are_those_of_its_tiles(pyramid_out):
  rows = _rows(pyramid_out / "tiles.csv")
  record = json.loads((pyramid_out / "slide.json").read_text())
  p = np.array([float(r["prob_malignant"]) for r in rows])
  scores = record["scores"]
  assert scores["mean"] == pytest.approx(p.mean(), abs=1e-6)
  assert scores["top_k"] == 2
  assert scores["top_k_mean"] == pytest.approx(np.sort(p)[-2:].mean(), abs=1e-6)
  assert scores["fraction_positive"] == pytest.approx(
      np.mean([r["prediction"] == "malignant" for r in rows]))
  assert record["run"]["step"] > 0 and {"jattn", "jax", "openslide"} <= set(record["versions"])
  top = record["top_tiles"]
  assert [t["prob_malignant"] for t in top] == pytest.approx(np.sort(p)[::-1][:2], abs=1e-6)
  for t in top:
    with Image.open(pyramid_out / t["file"]) as im:
      assert im.format == "PNG" and im.size[0] > 300  # inspect's figure, not the bare tile
  assert sorted(os.listdir(pyramid_out)) == ["heatmap.npy", "heatmap.png", "slide.json",
                                             "tiles.csv", "tiles.geojson", "top_tiles"]


def test_geojson_is_one_qupath_detection_per_tile(pyramid_out):
  rows = _rows(pyramid_out / "tiles.csv")
  collection = json.loads((pyramid_out / "tiles.geojson").read_text())
  assert collection["type"] == "FeatureCollection"
  features = collection["features"]
  assert len(features) == len(rows)
  for feature, r in zip(features, rows, strict=True):
    assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
    ring = np.array(feature["geometry"]["coordinates"][0])
    x, y, w, h = (int(r[k]) for k in ("x", "y", "width", "height"))
    assert ring.tolist() == [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]
    assert ring[:, 0].min() >= 0 and ring[:, 0].max() <= SIZE[0]
    assert ring[:, 1].min() >= 0 and ring[:, 1].max() <= SIZE[1]
    props = feature["properties"]
    assert props["objectType"] == "detection"
    assert props["classification"]["name"] == r["prediction"]
    color = props["classification"]["color"]
    assert len(color) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in color)
    for key in ("prob_benign", "prob_malignant"):
      assert props["measurements"][key] == pytest.approx(float(r[key]), abs=1e-6)


def test_level_and_tile_size_follow_the_training_scale(pyramid, trained_run):
  """100X (0.197 um/px) on level 0's 0.2: 1.5% coarser, within the tolerance, so level 0
  resampled; 200X (0.0985) needs twice level 0's resolution: refused (below)."""
  run = pipeline.load_run(trained_run, pipeline.Options(stratum="100X"))
  plan = pipeline.plan_slide(run, pyramid, "p", pipeline.Options(stratum="100X"))
  assert plan.scale.level == 0
  assert plan.scale.read_px == (round(700 * 0.197 / MPP0), round(460 * 0.197 / MPP0))
  assert plan.scale.tile_px == plan.scale.read_px


def test_benchmark_reports_reading_and_inference_and_writes_nothing(pyramid, trained_run,
                                                                     tmp_path, capsys):
  out = tmp_path / "out"
  capsys.readouterr()
  slide.main(["--workdir", trained_run, pyramid, "--out", str(out), "--magnification", "40X",
              "--benchmark"])
  figures = json.loads(capsys.readouterr().out)
  assert figures["tiles"] == len(TISSUE) and figures["level"] == 1
  for key in ("read_tiles_per_s", "inference_tiles_per_s", "end_to_end_tiles_per_s"):
    assert figures[key] > 0
  assert not out.exists()


def test_tile_fractions_equal_a_direct_count():
  """The fraction of the mask pixels whose centres lie in the tile, counted pixel by pixel."""
  rng = np.random.default_rng(1)
  mask = rng.random((40, 60)) < 0.3
  xs, ys = np.array([0, 31, 95]), np.array([0, 40, 13])
  sx, sy = 2.0, 2.5  # level-0 pixels per mask pixel
  got = tissue.tile_fractions(mask, xs, ys, (50, 30), (sx, sy))
  cx, cy = (np.arange(60) + 0.5) * sx, (np.arange(40) + 0.5) * sy
  for x, y, g in zip(xs, ys, got, strict=True):
    inside = ((cy[:, None] >= y) & (cy[:, None] < y + 30)) & ((cx >= x) & (cx < x + 50))
    assert g == pytest.approx(mask[inside].mean())


# --------------------------------------------------------------------------------------------
# Small generated slides: a cohort, an unreadable region, a kill during writing.

SMALL = (1024, 768)  # (w, h) at --mpp 0.5 with --tile-um 128: 4 x 3 tiles of 256 px
SMALL_OPTIONS = ["--mpp", "0.5", "--tile-um", "128", "--stratum", "40X", "--top-k", "1",
                 "--bootstrap-resamples", "200"]


def _small_slide(path, tiles, seed, compression=None):
  """A one-level tiled TIFF without resolution tags, tissue in the given (row, col) tiles."""
  rng = np.random.default_rng(seed)
  image = np.full((SMALL[1], SMALL[0], 3), GLASS, np.uint8)
  for r, c in tiles:
    image[r * 256:(r + 1) * 256, c * 256:(c + 1) * 256] = _tissue(rng, (256, 256))
  _write_pyramid(path, image, None, levels=1, compression=compression)
  return path


@pytest.fixture(scope="module")
def small_slides(tmp_path_factory):
  folder = tmp_path_factory.mktemp("cohort")
  layouts = [{(0, 0), (1, 1)}, {(0, 1), (2, 3), (1, 2)}, {(1, 0)}, {(2, 1), (0, 3)}]
  return [_small_slide(str(folder / f"s{i}.tif"), t, i) for i, t in enumerate(layouts)]


def test_cohort_figures_equal_a_computation_by_hand_and_a_rerun_skips_finished_slides(
    small_slides, trained_run, tmp_path, monkeypatch, capsys):
  out = tmp_path / "out"
  labels = tmp_path / "labels.csv"
  labels.write_text("slide,label\ns0,malignant\ns1.tif,benign\n"
                    f"{small_slides[2]},1\ns3,0\nnot_in_cohort,benign\n")
  folder = os.path.dirname(small_slides[0])
  slide.main(["--workdir", trained_run, folder, "--out", str(out), "--labels", str(labels),
              *SMALL_OPTIONS])
  names = ["s0", "s1", "s2", "s3"]
  y = np.array([1, 0, 1, 0])
  scores = np.array([np.mean([float(r["prob_malignant"]) for r in _rows(out / n / "tiles.csv")])
                     for n in names])
  record = json.loads((out / "s0" / "slide.json").read_text())
  assert record["scale"]["slide_mpp_source"] == "--mpp" and record["scale"]["read_px"] == [256,
                                                                                           256]
  # Rerun with a threshold between the scores: every slide is finished, none is predicted again,
  # except one whose folder a kill removed before its rename (a stale temporary folder beside).
  threshold = float(np.sort(scores)[1] + np.sort(scores)[2]) / 2
  shutil.rmtree(out / "s2")
  os.makedirs(out / ".s2.tmp-killed")
  (out / ".s2.tmp-killed" / "tiles.csv").write_text("x,y\n1,")
  predicted = []
  real = pipeline.predict_slide
  monkeypatch.setattr(pipeline, "predict_slide",
                      lambda run, plan, *a: predicted.append(plan.name) or real(run, plan, *a))
  capsys.readouterr()
  slide.main(["--workdir", trained_run, folder, "--out", str(out), "--labels", str(labels),
              "--threshold", str(threshold), *SMALL_OPTIONS])
  assert predicted == ["s2"]
  assert capsys.readouterr().out.count("finished before") == 3
  assert sorted(os.listdir(out)) == [".lock", "cohort.csv", "cohort_figures.json", *names]
  figures = json.loads((out / "cohort_figures.json").read_text())
  m = figures["metrics"]
  called = scores >= threshold
  assert figures["slides"] == 4 and figures["threshold"] == threshold
  assert m["roc_auc"]["value"] == pytest.approx(skm.roc_auc_score(y, scores))
  assert m["sensitivity"]["value"] == pytest.approx(np.sum(called & (y == 1)) / 2)
  assert m["specificity"]["value"] == pytest.approx(np.sum(~called & (y == 0)) / 2)
  # The intervals: each resample of slides (drawn within each label) scored by scikit-learn.
  weights = _stratified_bootstrap_by_hand(y, 200, 0)
  aucs = [skm.roc_auc_score(y, scores, sample_weight=w) for w in weights]
  sens = [skm.recall_score(y, called, sample_weight=w) for w in weights]
  assert m["roc_auc"]["ci95"] == pytest.approx(list(np.percentile(aucs, [2.5, 97.5])))
  assert m["sensitivity"]["ci95"] == pytest.approx(list(np.percentile(sens, [2.5, 97.5])))
  # Calibration of the slide score as P(malignant): scikit-learn's Brier, and its interval over
  # the same resamples; 4 slides in 15 equal-width bins.
  c = figures["calibration"]
  # (tiles.csv's probabilities have 6 decimals: a slide's mean is known to about 1e-6)
  assert c["brier"]["value"] == pytest.approx(skm.brier_score_loss(y, scores), abs=1e-5)
  briers = [skm.brier_score_loss(y, scores, sample_weight=w) for w in weights]
  assert c["brier"]["ci95"] == pytest.approx(list(np.percentile(briers, [2.5, 97.5])), abs=1e-5)
  which = np.clip(np.ceil(scores * 15).astype(int) - 1, 0, 14)
  assert c["ece"]["value"] == pytest.approx(sum(
      np.sum(which == b) / 4 * abs(np.mean(y[which == b]) - np.mean(scores[which == b]))
      for b in set(which)), abs=1e-5)
  rows = _rows(out / "cohort.csv")
  assert [r["name"] for r in rows] == names and [int(r["label"]) for r in rows] == list(y)
  np.testing.assert_allclose([float(r["mean_prob_malignant"]) for r in rows], scores, atol=1e-6)


def test_an_unreadable_region_is_skipped_counted_and_listed(trained_run, tmp_path, capsys):
  """A damaged TIFF tile under tissue tile (1, 1) of level 0, which tiles are read from: that tile
  is skipped; one under tile (0, 6) of level 1, which the thumbnail is read from: its tissue is
  not seen. Both listed; the rest predicted."""
  rng = np.random.default_rng(7)
  image = np.full((768, 2048, 3), GLASS, np.uint8)
  for r, c in [(0, 0), (1, 1), (2, 2), (0, 6)]:
    image[r * 256:(r + 1) * 256, c * 256:(c + 1) * 256] = _tissue(rng, (256, 256))
  path = str(tmp_path / "damaged.tif")
  _write_pyramid(path, image, None, levels=2, compression="zlib")
  with tifffile.TiffFile(path) as tif:  # TIFF tiles of 256 px: 8 per row on level 0, 4 on 1
    offsets = [tif.pages[0].dataoffsets[1 * 8 + 1], tif.pages[1].dataoffsets[3]]
  with open(path, "r+b") as f:
    for offset in offsets:
      f.seek(offset + 10)
      f.write(b"\xff" * 200)
  out = tmp_path / "out"
  slide.main(["--workdir", trained_run, path, "--out", str(out), *SMALL_OPTIONS])
  record = json.loads((out / "damaged" / "slide.json").read_text())
  tiles = record["tiles"]
  assert tiles["over_tissue"] == 3 and tiles["predicted"] == 2 and tiles["unreadable"] == 1
  assert [(r["x"], r["y"]) for r in tiles["unreadable_regions"]] == [(256, 256)]
  assert {(int(r["x"]), int(r["y"])) for r in _rows(out / "damaged" / "tiles.csv")} == {
      (0, 0), (512, 512)}
  lost = tiles["thumbnail_unreadable_regions"]
  assert (min(r["x"] for r in lost), min(r["y"] for r in lost)) == (1536, 0)
  assert max(r["x"] + r["width"] for r in lost) == 2048
  err = capsys.readouterr().err
  assert "1 unreadable region(s) skipped" in err and "of the thumbnail unreadable" in err


def test_a_failure_while_writing_leaves_no_part_of_the_slide(small_slides, trained_run, tmp_path,
                                                             monkeypatch):
  out = tmp_path / "out"

  def broken(path, *args):
    open(path, "w").write('{"type": "Feat')
    raise RuntimeError("killed while writing")

  monkeypatch.setattr(writers, "geojson", broken)
  with pytest.raises(RuntimeError, match="killed while writing"):
    slide.main(["--workdir", trained_run, small_slides[0], "--out", str(out), *SMALL_OPTIONS])
  assert not out.exists()  # nor a temporary folder beside: the folder it created is gone


# --------------------------------------------------------------------------------------------
# The real slide, through the notebook (tests/test_notebook.py style), and one-line failures.


def test_real_slide_through_the_notebook(trained_run, tmp_path, monkeypatch):
  import nbformat
  from nbclient import NotebookClient

  with open(REAL_SLIDE, "rb") as f:
    assert hashlib.sha256(f.read()).hexdigest() == REAL_SHA256
  nb = nbformat.read(os.path.join(REPO, "experiments", "slide_heatmap.ipynb"), as_version=4)
  monkeypatch.setenv("JATTN_RUN", trained_run)
  monkeypatch.setenv("JATTN_SLIDE_OUT", str(tmp_path / "out"))
  monkeypatch.setenv("PYTHONPATH", REPO)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": REPO}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  assert len([o for o in outputs if "image/png" in o.get("data", {})]) >= 2
  out = tmp_path / "out" / "CMU-1-Small-Region"
  record = json.loads((out / "slide.json").read_text())
  assert record["tiles"]["predicted"] >= 3  # tissue found
  assert 0.1 < record["tissue"]["fraction_of_thumbnail"] < 0.6
  scale = record["scale"]
  assert scale["slide_mpp"] == [0.499, 0.499] and "aperio" in scale["slide_mpp_source"]
  assert scale["level"] == 0 and scale["read_px"] == [round(700 * MPP_40X / 0.499),
                                                      round(460 * MPP_40X / 0.499)]
  for name in ("tiles.csv", "heatmap.png", "heatmap.npy", "tiles.geojson"):
    assert (out / name).stat().st_size > 0


def _one_line(capsys, argv, pattern, code=2):
  import re

  with pytest.raises(SystemExit) as e:
    slide.main(argv)
  assert e.value.code == code
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "Traceback" not in err, err
  assert re.search(pattern, err), err


def test_one_line_failures_write_nothing(pyramid, small_slides, trained_run, tmp_path, capsys):
  out = tmp_path / "out"
  run = ["--workdir", trained_run, "--out", str(out)]
  no_mpp = small_slides[0]
  _one_line(capsys, [*run, no_mpp, "--magnification", "40X"],
            r"s0.tif: no microns per pixel .*pass the scan's resolution with --mpp")
  not_slide = str(tmp_path / "plain.tif")
  tifffile.imwrite(not_slide, np.zeros((64, 64, 3), np.uint8))  # striped, not tiled
  _one_line(capsys, [*run, not_slide, "--magnification", "40X"],
            r"plain.tif: not a whole-slide image OpenSlide reads")
  _one_line(capsys, [*run, str(tmp_path / "gone.svs"), "--magnification", "40X"],
            r"gone.svs: no such slide file")
  _one_line(capsys, [*run, pyramid], r"was trained on 4 magnifications at different scales .*"
                                     r"--stratum")
  _one_line(capsys, [*run, pyramid, "--magnification", "200X"],
            r"pyramid.tif: the 200X field .* needs 0.0985 um per pixel, but the slide's finest "
            r"level \(level 0\) has 0.2 um per pixel, 2.03x coarser, beyond the 10% tolerance")
  unfinished = tmp_path / "unfinished"
  unfinished.mkdir()
  shutil.copy(os.path.join(trained_run, "config.json"), unfinished)
  _one_line(capsys, ["--workdir", str(unfinished), "--out", str(out), pyramid],
            r"is not a finished run \(no results.json\)")
  _one_line(capsys, ["--workdir", str(tmp_path), "--out", str(out), pyramid],
            r"is not a jattn run \(no config.json\)")
  assert not out.exists()


def test_a_slide_without_tissue_gives_empty_outputs_and_says_so(trained_run, tmp_path, capsys):
  path = _small_slide(str(tmp_path / "glass.tif"), set(), 3)
  out = tmp_path / "out"
  slide.main(["--workdir", trained_run, path, "--out", str(out), *SMALL_OPTIONS])
  assert "no tissue found" in capsys.readouterr().out
  record = json.loads((out / "glass" / "slide.json").read_text())
  assert record["tiles"]["predicted"] == 0 and record["scores"]["mean"] is None
  assert _rows(out / "glass" / "tiles.csv") == []
  assert json.loads((out / "glass" / "tiles.geojson").read_text())["features"] == []
  assert np.isnan(np.load(out / "glass" / "heatmap.npy")).all()
  assert os.listdir(out / "glass" / "top_tiles") == []


def test_a_run_of_one_magnification_needs_no_magnification(trained_run, tmp_path):
  """A run that selected one magnification (its results.json says so) takes that one's scale;
  another is refused; a run whose results record no scale needs --tile-um."""
  from jattn.core.errors import UserError

  def run_with(strata):
    workdir = tmp_path / f"run{len(os.listdir(tmp_path))}"
    workdir.mkdir()
    shutil.copy(os.path.join(trained_run, "config.json"), workdir)
    with open(os.path.join(trained_run, "results.json")) as f:
      figures = json.load(f)
    figures["strata"] = strata
    (workdir / "results.json").write_text(json.dumps(figures))
    return str(workdir)

  with open(os.path.join(trained_run, "results.json")) as f:
    strata = json.load(f)["strata"]
  one = run_with({"magnification": {**strata["magnification"], "selected": ["100X"]}})
  field = pipeline.load_run(one, pipeline.Options()).field
  assert field.stratum == {"axis": "magnification", "value": "100X"}
  assert field.needed_mpp == 0.197
  assert field.field_um == pytest.approx((700 * 0.197, 460 * 0.197))
  with pytest.raises(UserError, match=r"--stratum 40X: .* was not trained on it"):
    pipeline.load_run(one, pipeline.Options(stratum="40X"))
  unscaled = run_with({"magnification": {**strata["magnification"], "mpp": {}}})
  with pytest.raises(UserError, match=r"record no microns per pixel.*--tile-um"):
    pipeline.load_run(unscaled, pipeline.Options())
  field = pipeline.load_run(unscaled, pipeline.Options(tile_um=(100.0, 50.0))).field
  assert field.field_um == (100.0, 50.0) and field.field_source == "--tile-um"
  with open(os.path.join(trained_run, "config.json")) as f:
    image_size = json.load(f)["image_size"]
  assert field.needed_mpp == pytest.approx(50.0 / image_size)  # the network input's pixels


def test_a_second_cohort_call_keeps_the_first_calls_rows(small_slides, trained_run, tmp_path):
  """Two calls into one --out: cohort.csv lists the first call's slides with the rows it wrote
  (read back by content) and the second call's slide after them."""
  out = tmp_path / "out"
  slide.main(["--workdir", trained_run, *small_slides[:2], "--out", str(out), *SMALL_OPTIONS])
  first = _rows(out / "cohort.csv")
  assert [r["name"] for r in first] == ["s0", "s1"]
  slide.main(["--workdir", trained_run, small_slides[2], "--out", str(out), *SMALL_OPTIONS])
  rows = _rows(out / "cohort.csv")
  assert [r["name"] for r in rows] == ["s0", "s1", "s2"] and rows[:2] == first
  mean = np.mean([float(r["prob_malignant"]) for r in _rows(out / "s2" / "tiles.csv")])
  assert float(rows[2]["mean_prob_malignant"]) == pytest.approx(mean, abs=1e-6)


def test_per_slide_mpp_from_a_csv_in_a_cohort_mixing_slides_with_and_without_metadata(
    small_slides, trained_run, tmp_path, capsys):
  """One command without --mpp: a slide without MPP metadata takes its --mpp-csv row's MPP (the
  tile size in level-0 pixels follows it: 128 um / 0.46 um/px), one with resolution tags (0.5
  um/px) keeps them (its row's cell empty); the --labels CSV may carry the mpp column."""
  tagged = str(tmp_path / "tagged.tif")
  rng = np.random.default_rng(5)
  image = np.full((SMALL[1], SMALL[0], 3), GLASS, np.uint8)
  image[:256, :256] = _tissue(rng, (256, 256))
  _write_pyramid(tagged, image, 0.5, levels=1)
  table = tmp_path / "slides.csv"
  table.write_text("slide,label,mpp\ns0.tif,malignant,0.46\ntagged,benign,\n")
  out = tmp_path / "out"
  options = ["--tile-um", "128", "--magnification", "40X", "--top-k", "1"]
  slide.main(["--workdir", trained_run, small_slides[0], tagged, "--out", str(out),
              "--mpp-csv", str(table), *options])
  s0 = json.loads((out / "s0" / "slide.json").read_text())["scale"]
  assert s0["slide_mpp"] == [0.46, 0.46]
  assert s0["slide_mpp_source"] == f"--mpp-csv {table}, line 2"
  assert s0["read_px"] == [round(128 / 0.46)] * 2 and s0["level"] == 0
  assert {int(r["width"]) for r in _rows(out / "s0" / "tiles.csv")} == {round(128 / 0.46)}
  t = json.loads((out / "tagged" / "slide.json").read_text())["scale"]
  assert t["slide_mpp"] == [pytest.approx(0.5)] * 2 and "TIFF resolution tags" in t[
      "slide_mpp_source"] and t["read_px"] == [256, 256]
  # --mpp applies to the slides the CSV gives none; the CSV's value wins over it. Another MPP
  # than the finished results' is another setting: refused without --overwrite.
  table.write_text("slide,mpp\ns0,0.47\n")
  _one_line(capsys, ["--workdir", trained_run, small_slides[0], "--out", str(out), "--mpp-csv",
                     str(table), *options], r"out/s0 holds results of another setting \(slide_mpp "
                                            r"\[0.46, 0.46\] -> \[0.47, 0.47\]\)")
  out2 = tmp_path / "out2"
  slide.main(["--workdir", trained_run, small_slides[0], small_slides[2], "--out", str(out2),
              "--mpp", "0.48", "--mpp-csv", str(table), *options])
  s0 = json.loads((out2 / "s0" / "slide.json").read_text())["scale"]
  s2 = json.loads((out2 / "s2" / "slide.json").read_text())["scale"]
  assert (s0["slide_mpp"], s2["slide_mpp"]) == ([0.47, 0.47], [0.48, 0.48])
  assert s2["slide_mpp_source"] == "--mpp"


@pytest.mark.parametrize("cell", ["abc", "0", "-0.5", "nan", ""])
def test_a_bad_per_slide_mpp_is_one_line_naming_the_csv_row_and_value(
    cell, small_slides, trained_run, tmp_path, capsys):
  table = tmp_path / "slides.csv"
  table.write_text(f"slide,mpp\ns1,0.5\ns0,{cell}\n")
  out = tmp_path / "out"
  argv = ["--workdir", trained_run, *small_slides[:2], "--out", str(out), "--mpp-csv",
          str(table), "--tile-um", "128", "--magnification", "40X"]
  if cell:
    _one_line(capsys, argv, rf"--mpp-csv {re.escape(str(table))}, line 3: mpp '{cell}' of slide "
                            rf"'s0' is no positive number; give the scan's microns per pixel")
  else:  # an empty cell: the slide's metadata, of which s0 has none
    _one_line(capsys, argv, r"s0.tif: no microns per pixel .*or per slide with --mpp-csv")
  assert not out.exists()


def _stratified_bootstrap_by_hand(y, resamples, seed):
  """[resamples, n] counts of each slide: within label 0, then label 1, as many slides as the
  label has drawn with replacement (numpy's Generator.integers, one [resamples, n_label] draw per
  label)."""
  rng = np.random.default_rng(seed)
  weights = np.zeros((resamples, len(y)))
  for label in (0, 1):
    members = np.flatnonzero(y == label)
    draws = rng.integers(0, len(members), (resamples, len(members)))
    for b in range(resamples):
      for d in draws[b]:
        weights[b, members[d]] += 1
  return weights


def test_cohort_intervals_are_a_bootstrap_stratified_by_label_scored_by_scikit_learn():
  """Slide-level intervals of 30 slides (9 positive): each resample keeps 9 positive and 21
  negative slides, scored by scikit-learn; a bootstrap over all slides at once would give other
  intervals (and resamples with one label only)."""
  rng = np.random.default_rng(3)
  y = np.array([1] * 9 + [0] * 21)
  rng.shuffle(y)
  scores = np.clip(0.35 * y + rng.uniform(0, 0.65, len(y)), 0, 1)
  got = cohort.figures(y, scores, 0.5, resamples=300, seed=5)
  weights = _stratified_bootstrap_by_hand(y, 300, 5)
  assert (weights[:, y == 1].sum(1) == 9).all() and (weights[:, y == 0].sum(1) == 21).all()
  called = (scores >= 0.5).astype(int)
  by_hand = {
      "roc_auc": [skm.roc_auc_score(y, scores, sample_weight=w) for w in weights],
      "sensitivity": [skm.recall_score(y, called, sample_weight=w) for w in weights],
      "specificity": [skm.recall_score(1 - y, 1 - called, sample_weight=w) for w in weights],
      "f1": [skm.f1_score(y, called, sample_weight=w) for w in weights]}
  for name, values in by_hand.items():
    assert got[name]["ci95"] == pytest.approx(list(np.percentile(values, [2.5, 97.5]))), name
  assert got["roc_auc"]["value"] == pytest.approx(skm.roc_auc_score(y, scores))


def test_a_slide_scoring_exactly_the_threshold_is_called_positive():
  """`--threshold`: a slide is called positive when its score is at least the threshold, in the
  figures and in cohort.csv; the slide counts are those of the labels used, by hand."""
  y, scores = np.array([1, 1, 0, 0]), np.array([0.5, 0.8, 0.2, 0.5])
  got = cohort.figures(y, scores, 0.5, resamples=0, seed=0)
  assert got["sensitivity"]["value"] == 1.0 and got["specificity"]["value"] == 0.5
  records = [{"name": f"s{i}", "slide": f"s{i}.tif", "tiles": {"predicted": 3, "unreadable": 0},
              "scores": {"mean": s, "top_k": 1, "top_k_mean": s, "fraction_positive": s}}
             for i, s in enumerate(scores)]
  row = cohort._row(records[0], "malignant", {"s0": 1}, "mean", 0.5)
  assert (row["called"], row["label"], row["score"]) == (1, 1, "0.500000")
  labels = {"s0": 1, "s1": 1, "s2": 0}  # s3 unlabelled: left out
  figures = cohort._figures(records, labels, "malignant", "mean", 0.5, 0, 0, "run")
  assert (figures["slides"], figures["positive_slides"], figures["negative_slides"],
          figures["left_out"]) == (3, 2, 1, ["s3"])


def test_slide_labels_are_read_whatever_their_case(tmp_path):
  """A labels CSV written by hand or a spreadsheet: 'Malignant', 'BENIGN' are the run's labels."""
  from types import SimpleNamespace

  path = tmp_path / "labels.csv"
  path.write_text("slide,label\ns0,Malignant\ns1.tif,BENIGN\n")
  plans = [SimpleNamespace(name=f"s{i}", path=str(tmp_path / f"s{i}.tif")) for i in range(2)]
  got = cohort.read_labels(str(path), plans, ("benign", "malignant"), "malignant")
  assert got == {"s0": 1, "s1": 0}


# --------------------------------------------------------------------------------------------
# A run of three classes without a positive label (a folder-source run, tests/test_folder_source):
# class maps instead of P(positive) heatmaps.

CLASS_TILES = {(0, 0): "stroma", (0, 1): "tumour", (1, 1): "stroma", (1, 2): "tumour",
               (2, 3): "stroma"}
CLASS_OPTIONS = ["--mpp", "0.5", "--tile-um", "128", "--top-k", "2"]


@pytest.fixture(scope="module")
def multiclass_slide(tmp_path_factory):
  """(the work dir of a 1-epoch 3-class folder run at 32x32, a 4 x 3-tile slide of tissue in two
  of its classes' colours, the slide's results folder of one `slide` call)."""
  from jattn import main
  from tests.runs import DEMO, tiny_overrides
  from tests.test_folder_source import COLOURS, _multiclass_tree

  root = tmp_path_factory.mktemp("classes")
  manifest = _multiclass_tree(str(root / "data"))
  workdir = str(root / "run")
  overrides = tiny_overrides("unused", str(root / "prepared"), dataset="folder",
                             manifest=manifest, group="patient", strata="centre", num_folds=4,
                             **{"model.num_classes": 3, "num_epochs": 1,
                                               "batch_size": 8})
  main.main(["--config", f"{DEMO}:vgg19", "--workdir", workdir,
             *[f"--config.{o}" for o in overrides]])
  rng = np.random.default_rng(3)
  image = np.full((SMALL[1], SMALL[0], 3), GLASS, np.uint8)
  for (r, c), name in CLASS_TILES.items():
    pixels = np.asarray(COLOURS[name]) + rng.normal(0, 25, (256, 256, 3))
    image[r * 256:(r + 1) * 256, c * 256:(c + 1) * 256] = np.clip(pixels, 0, 255)
  path = str(root / "classes.tif")
  _write_pyramid(path, image, None, levels=1)
  out = root / "out"
  slide.main(["--workdir", workdir, path, "--out", str(out), *CLASS_OPTIONS])
  return workdir, path, out / "classes"


def test_class_maps_are_the_argmax_of_predict_on_regions_cut_with_openslide(multiclass_slide,
                                                                              tmp_path):
  from tests.test_folder_source import CLASSES

  workdir, path, result = multiclass_slide
  rows = _rows(result / "tiles.csv")
  assert {(int(r["row"]), int(r["col"])) for r in rows} == set(CLASS_TILES)
  s = openslide.OpenSlide(path)
  paths = []
  for i, r in enumerate(rows):
    region = s.read_region((int(r["x"]), int(r["y"])), 0, (int(r["width"]), int(r["height"])))
    paths.append(str(tmp_path / f"tile{i}.png"))
    region.convert("RGB").save(paths[-1])
  want = np.array([[float(p[f"prob_{c}"]) for c in CLASSES]
                   for p in predict.predict(workdir, paths)])
  got = np.array([[float(r[f"prob_{c}"]) for c in CLASSES] for r in rows])
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
  assert [r["prediction"] for r in rows] == [CLASSES[k] for k in np.argmax(want, -1)]
  heat = np.load(result / "heatmap.npy")  # one channel per class, in the run's class order
  classes = np.load(result / "class_map.npy")
  assert heat.shape == (3, 4, 3) and classes.shape == (3, 4)
  cells = tuple(np.array([(int(r["row"]), int(r["col"])) for r in rows]).T)
  np.testing.assert_allclose(heat[cells], want, atol=2e-6)
  np.testing.assert_allclose(heat[cells].sum(-1), 1.0, atol=1e-5)  # per tissue tile
  assert np.isnan(heat).sum() == 3 * (12 - len(rows)) and np.isnan(heat[cells]).sum() == 0
  assert list(classes[cells]) == list(np.argmax(want, -1))
  assert (classes == -1).sum() == 12 - len(rows)
  record = json.loads((result / "slide.json").read_text())
  counts = {c: sum(r["prediction"] == c for r in rows) for c in CLASSES}
  assert record["positive"] is None and record["scores"]["predicted_classes"] == counts
  assert record["scores"]["predicted_fractions"] == {
      c: pytest.approx(n / len(rows)) for c, n in counts.items()}
  # The top tiles: the two whose most probable class is the most probable (near-ties of an
  # untrained model aside: compared by value), each with its predicted class and probability.
  by_xy = {(int(r["x"]), int(r["y"])): (r, p) for r, p in zip(rows, want, strict=True)}
  top = record["top_tiles"]
  assert [t[f"prob_{t['prediction']}"] for t in top] == pytest.approx(
      np.sort(want.max(-1))[::-1][:2], abs=2e-6)
  for t in top:
    row, p = by_xy[(t["x"], t["y"])]
    assert t["prediction"] == row["prediction"] == CLASSES[int(np.argmax(p))]
  cohort = _rows(result.parent / "cohort.csv")
  assert [{c: int(row[f"tiles_{c}"]) for c in CLASSES} for row in cohort] == [counts]


def test_class_geojson_and_legend_name_every_tile_and_class(multiclass_slide):
  from tests.test_folder_source import CLASSES

  _, _, result = multiclass_slide
  rows = _rows(result / "tiles.csv")
  features = json.loads((result / "tiles.geojson").read_text())["features"]
  assert [f["properties"]["classification"]["name"] for f in features] == [
      r["prediction"] for r in rows]
  with Image.open(result / "heatmap.png") as im:
    legend = json.loads(im.text["legend"])
    pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
  assert list(legend) == list(CLASSES) and len({tuple(c) for c in legend.values()}) == 3
  present = {tuple(p) for p in np.unique(pixels, axis=0)}
  for name, color in legend.items():  # its legend patch, drawn opaque in the class' colour
    assert tuple(color) in present, name
  for f, r in zip(features, rows, strict=True):
    p = f["properties"]
    assert p["objectType"] == "detection"
    assert p["classification"]["color"] == legend[r["prediction"]]
    assert p["measurements"] == {**{f"prob_{c}": pytest.approx(float(r[f"prob_{c}"]), abs=1e-6)
                                    for c in CLASSES},
                                 "tissue_fraction": pytest.approx(float(r["tissue_fraction"]))}


def test_a_run_without_a_positive_label_refuses_labels_in_one_line(multiclass_slide, tmp_path,
                                                                    capsys):
  workdir, path, _ = multiclass_slide
  labels = tmp_path / "labels.csv"
  labels.write_text("slide,label\nclasses,tumour\n")
  out = tmp_path / "out"
  _one_line(capsys, ["--workdir", workdir, path, "--out", str(out), "--labels", str(labels),
                     *CLASS_OPTIONS],
            r"--labels .*labels.csv: slide-level figures are of a positive label, which .* "
            r"classes \(adipose, stroma, tumour\) have none of; leave out --labels")
  assert not out.exists()


def test_a_cohort_of_a_binary_run_is_not_mixed_with_a_class_map_run(
    multiclass_slide, small_slides, trained_run, tmp_path, capsys):
  """cohort.csv's columns differ between the kinds of run: a call of the other kind into an --out
  is refused in one line, the earlier cohort.csv left as it was."""
  workdir, path, _ = multiclass_slide
  out = tmp_path / "out"
  slide.main(["--workdir", trained_run, small_slides[0], "--out", str(out), *SMALL_OPTIONS])
  before = (out / "cohort.csv").read_text()
  _one_line(capsys, ["--workdir", workdir, path, "--out", str(out), *CLASS_OPTIONS],
            r"out/cohort.csv lists slides of a run with a positive label \(s0\), whose columns "
            r"differ from this run's; use another --out")
  assert (out / "cohort.csv").read_text() == before and not (out / "classes").exists()
