"""Whole-slide inference: a trained run over whole-slide images (the command: `jattn slide`).

  from jattn import slides
  result = slides.run_cohort("runs/ours/fold1", ["slides/"], "slides_out",
                             slides.Options(stratum="40X"))

A slide is tiled at the training images' physical field (`reader`: its MPP, the pyramid level,
the tile size), its tissue found on the thumbnail (`tissue`), its tissue tiles streamed through
the run's eval step (`tiler`, `pipeline`), and its results written into OUT/<slide name>/
(`writers`): tiles.csv, heatmap.png, heatmap.npy, tiles.geojson (QuPath detections), slide.json
and top_tiles/*.png (class_map.npy too, and class maps for heatmaps, for a run without a
positive label; annotations.geojson with --annotations, regions.csv with --regions: QuPath's
annotations back and forth, docs/annotated-slides.md); a cohort adds OUT/cohort.csv and,
against labels, cohort_figures.json (`cohort`). docs/slides.md describes every file and option.
"""

from jattn.slides.cohort import run_cohort
from jattn.slides.pipeline import Options, benchmark, load_run, plan_slide, predict_slide

__all__ = ["Options", "benchmark", "load_run", "plan_slide", "predict_slide", "run_cohort"]
