"""Predicts whole-slide images with a trained run: heatmaps, QuPath detections, slide scores.

  jattn slide --workdir runs/ours/fold1 SLIDE_OR_FOLDER... --out DIR \\
      [--stratum 40X] [--mpp UM] [--mpp-csv slides.csv] [--tile-um W[,H]] \\
      [--min-tissue 0.5] [--stride 1] \\
      [--tissue saturation|od] [--tta none|dihedral] [--top-k 8] [--batch-size 32] \\
      [--threads N] [--labels slides.csv [--score mean] [--threshold 0.5] \\
      [--bootstrap-resamples 1000] [--bootstrap-seed 0]] \\
      [--regions FILE.geojson|slides.csv [--min-region-fraction 0.5]] [--annotations] \\
      [--overwrite] [--benchmark]

Each slide's results go into DIR/<slide name>/ (tiles.csv, heatmap.png, heatmap.npy,
tiles.geojson, slide.json, top_tiles/; a run without a positive label adds class_map.npy, and its
heatmaps are class maps); DIR/cohort.csv lists every slide, and with --labels
DIR/cohort_figures.json holds slide-level AUC, sensitivity and specificity with bootstrap
intervals. --regions predicts only the tiles inside a slide's annotated regions (QuPath's
GeoJSON) and adds regions.csv, a row per region; --annotations adds annotations.geojson, the
predicted classes' merged regions as QuPath annotations. A finished slide is skipped when the
command runs again. --benchmark times one slide's tiles instead (reading, inference, both) and
writes nothing. The library: `jattn.slides`.
"""

from __future__ import annotations

import argparse
import json
import sys

from jattn.cli import common
from jattn.core.errors import UserError, exit_on_user_error
from jattn.slides import cohort, pipeline, reader, tissue
from jattn.training import state as state_lib

PROG = "jattn slide"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog=PROG,
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a finished run's work dir")
  parser.add_argument("--out", required=True, help="folder for the results (one folder per slide)")
  parser.add_argument("--stratum", "--magnification", dest="stratum",
                      help="the stratum whose scale tiles are read at (--magnification is its "
                           "BreakHis alias); required for a run trained on strata at several "
                           "scales")
  parser.add_argument("--mpp", type=float, help="the slide's microns per pixel at level 0, "
                      "overriding its metadata (needed when it has none)")
  parser.add_argument("--mpp-csv", help="CSV slide,mpp: a slide's level-0 microns per pixel, "
                      "over --mpp and its metadata (other columns ignored: the --labels CSV may "
                      "carry an mpp column; an empty cell leaves the slide to --mpp or its "
                      "metadata)")
  parser.add_argument("--tile-um", type=common.field_um, help="the field a tile covers, W,H in um "
                      "(default: a training image's)")
  parser.add_argument("--min-tissue", type=float, default=0.5,
                      help="fraction of a tile that must be tissue to predict it (default 0.5)")
  parser.add_argument("--stride", type=float, default=1.0,
                      help="step between tiles as a fraction of the tile (default 1: no overlap)")
  parser.add_argument("--tissue", choices=tissue.METHODS, default="saturation",
                      help="what Otsu's threshold is drawn on (default saturation)")
  parser.add_argument("--tta", choices=state_lib.TTA_MODES,
                      help="test-time augmentation (default: the run's config.tta)")
  parser.add_argument("--top-k", type=int, default=8,
                      help="tiles in the top-k score and drawn with their attention (default 8)")
  parser.add_argument("--batch-size", type=int, default=32, help="tiles per batch (default 32)")
  parser.add_argument("--threads", type=int, default=pipeline.DEFAULT_THREADS,
                      help=f"threads reading tiles (default {pipeline.DEFAULT_THREADS})")
  parser.add_argument("--labels", help="CSV slide,label: slide-level figures of the cohort")
  parser.add_argument("--score", choices=cohort.SCORES, default="mean",
                      help="the slide score the figures judge (default mean)")
  parser.add_argument("--threshold", type=float, default=0.5,
                      help="a slide is called positive at score >= this (default 0.5)")
  parser.add_argument("--bootstrap-resamples", type=int, default=1000,
                      help="bootstrap resamples of slides for 95%% intervals (default 1000; "
                           "0: none)")
  parser.add_argument("--bootstrap-seed", type=int, default=0)
  parser.add_argument("--regions", help="QuPath GeoJSON of the slide's annotated regions (or a "
                      "CSV slide,annotations for several slides): predict only the tiles inside "
                      "them and score each region (regions.csv)")
  parser.add_argument("--min-region-fraction", type=float, default=0.5,
                      help="with --regions: fraction of a tile that must lie inside a region "
                           "(default 0.5)")
  parser.add_argument("--annotations", action="store_true",
                      help="also write annotations.geojson: each predicted class's tiles merged "
                           "into QuPath annotations")
  parser.add_argument("--overwrite", action="store_true",
                      help="predict slides again whose results in --out were made otherwise")
  parser.add_argument("--benchmark", action="store_true",
                      help="time the first slide's tiles (reading, inference, both); write nothing")
  parser.add_argument("slides", nargs="+", help="slide files, or folders of them (searched "
                      "recursively)")
  common.refuse_stain_norm(sys.argv[1:] if argv is None else argv, PROG)
  args = parser.parse_args(argv)
  with exit_on_user_error(PROG):
    options = pipeline.Options(
        stratum=args.stratum, mpp=args.mpp, tile_um=args.tile_um,
        min_tissue=args.min_tissue, stride=args.stride, tissue=args.tissue, tta=args.tta,
        top_k=args.top_k, batch_size=args.batch_size, threads=args.threads,
        overwrite=args.overwrite, regions=args.regions,
        min_region_fraction=args.min_region_fraction, annotations=args.annotations)
    if args.benchmark:
      run = pipeline.load_run(args.workdir, options)
      path = reader.slide_paths(args.slides)[0]
      plan = pipeline.plan_slide(run, path, "benchmark", options)
      print(json.dumps(pipeline.benchmark(run, plan, options), indent=1))
      return
    if args.labels is None and (args.score, args.threshold) != ("mean", 0.5):
      raise UserError("--score and --threshold judge slides against --labels: give --labels too")
    cohort.run_cohort(args.workdir, args.slides, args.out, options, labels=args.labels,
                      score=args.score, threshold=args.threshold,
                      resamples=args.bootstrap_resamples, seed=args.bootstrap_seed,
                      mpp_csv=args.mpp_csv)


