"""A cohort of slides through one run, slide after slide, and slide-level figures against labels.

Every slide is opened and scaled before the first is predicted (`pipeline.plan_slide`), so a bad
file stops the cohort in one line before any work. A slide whose results are already in OUT (from an
earlier, perhaps killed, run of the same command) is skipped; `OUT/cohort.csv` lists every slide's
scores. With labels (a CSV with columns `slide,label`; the slide by its output name, file name or
path, the label one of the run's coarse labels or 1/0 for positive/negative),
`OUT/cohort_figures.json` holds the slide-level ROC-AUC of a slide score and the sensitivity and
specificity of calling a slide positive when its score is at least a threshold, and the
calibration of the score read as P(positive) (ECE, Brier, NLL, AURC:
`jattn.evaluation.calibration`), with 95% intervals from a bootstrap over slides stratified by
label (`jattn.evaluation.metrics`, scikit-learn's figures).
"""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np

from jattn.core import errors, files
from jattn.core.errors import UserError
from jattn.evaluation import calibration, metrics
from jattn.inference import attention_maps as inspect
from jattn.slides import pipeline, reader, writers

SCORES = ("mean", "top_k_mean", "fraction_positive")  # slide.json `scores` a cohort is judged by


def read_labels(path: str, plans: list[pipeline.Plan], names: tuple[str, ...],
                positive: str) -> dict[str, int]:
  """{output name: 1 if positive else 0} of the slides `path` labels; an unknown label or slide
  column is one line, slides it does not name are left out of the figures (one warning)."""
  read = _read_slide_csv(path, "--labels", "label", "label")
  keys = _slide_keys([(plan.path, plan.name) for plan in plans])
  known = {n.casefold(): n for n in names}
  out, unmatched = {}, []
  for line, row in read.records():
    label = row["label"].strip()
    value = {"1": 1, "0": 0}.get(label)
    if value is None and label.casefold() in known:
      value = int(known[label.casefold()] == positive)
    if value is None:
      raise UserError(f"--labels {path}, line {line}: label {label!r} is none of "
                      f"{', '.join(names)} (or 1/0 for {positive}/not)")
    slide = row["slide"].strip()
    name = keys.get(slide) or keys.get(os.path.normpath(slide))
    if name is None:
      unmatched.append(slide)
    else:
      out[name] = value
  if unmatched:
    errors.warn(f"--labels {path}: {len(unmatched)} labelled slide(s) not in this cohort, left "
                f"out: {', '.join(unmatched[:5])}{' ...' if len(unmatched) > 5 else ''}")
  missing = [p.name for p in plans if p.name not in out]
  if missing:
    errors.warn(f"--labels {path}: no label for {len(missing)} slide(s), left out of the figures: "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
  return out


def _read_slide_csv(path: str, flag: str, column: str, what: str) -> files.Csv:
  """The CSV of `flag` with a `slide` and a `column` column (`what` names the latter in the
  refusal); a missing file or header is one line."""
  if not os.path.isfile(path):
    raise UserError(f"{flag} {path}: no such file; give a CSV with columns slide,{column}")
  read = files.read_csv(path, f"{flag} ")
  if not read.rows or not {"slide", column} <= set(read.header):
    raise UserError(f"{flag} {path}: expected a CSV with a header row naming the columns slide "
                    f"and {what}, and one row per slide (its header: "
                    f"{','.join(read.header) or 'none'}){files.separator_hint(read.header)}")
  return read


def _slide_keys(slides: list[tuple[str, str]]) -> dict[str, str]:
  """{what a CSV may call a slide: its output name} of (path, output name) pairs: the output
  name, the file name with or without its extension, the path as given or absolute."""
  keys = {}
  for path, name in slides:
    base = os.path.basename(path)
    for key in (name, base, os.path.splitext(base)[0], os.path.normpath(path),
                os.path.abspath(path)):
      keys.setdefault(key, name)
  return keys


def read_mpps(path: str, slides: list[tuple[str, str]]) -> dict[str, tuple[float, str]]:
  """{output name: (level-0 MPP, where it comes from)} of the (path, output name) `slides` that
  the CSV at `path` gives a value in its `mpp` column (the slide named as in --labels; other
  columns ignored, so the --labels CSV may carry it). An empty cell leaves the slide to --mpp or
  its metadata; a value that is no positive number, or a CSV without the columns, is one line."""
  read = _read_slide_csv(path, "--mpp-csv", "mpp", "mpp (microns per pixel at level 0)")
  keys = _slide_keys(slides)
  out, unmatched = {}, []
  for line, row in read.records():
    slide = row["slide"].strip()
    text = row["mpp"].strip()
    if not text:
      continue
    try:
      value = float(text)
    except ValueError:
      value = float("nan")
    if not (math.isfinite(value) and value > 0):
      raise UserError(f"--mpp-csv {path}, line {line}: mpp {text!r} of slide {slide!r} is no "
                      f"positive number; give the scan's microns per pixel at level 0 (e.g. 0.25 "
                      f"for a 40x scan, 0.5 for 20x), or leave the cell empty for --mpp or the "
                      f"slide's metadata")
    name = keys.get(slide) or keys.get(os.path.normpath(slide))
    if name is None:
      unmatched.append(slide)
    else:
      out[name] = (value, f"--mpp-csv {path}, line {line}")
  if unmatched:
    errors.warn(f"--mpp-csv {path}: {len(unmatched)} slide(s) not in this cohort, ignored: "
                f"{', '.join(unmatched[:5])}{' ...' if len(unmatched) > 5 else ''}")
  return out


def read_regions_of(path: str, slides: list[tuple[str, str]]) -> dict[str, str]:
  """{output name: its annotations' GeoJSON} of the (path, output name) `slides` for --regions:
  a GeoJSON file is the one slide's (several slides are refused), a CSV with the columns slide
  and annotations (the slide-regions source's CSV; paths relative to its folder) names each
  slide's; a slide it does not name is one line."""
  if not path.lower().endswith(".csv"):
    if len(slides) != 1:
      raise UserError(f"--regions {path}: a GeoJSON file is the regions of one slide, and "
                      f"{len(slides)} slides are given; give one slide, or a CSV of "
                      f"slide,annotations rows")
    return {slides[0][1]: path}
  read = _read_slide_csv(path, "--regions", "annotations", "annotations (a GeoJSON per slide)")
  keys = _slide_keys(slides)
  root = os.path.dirname(os.path.abspath(path))
  out = {}
  for _, row in read.records():
    slide = row["slide"].strip()
    name = keys.get(slide) or keys.get(os.path.normpath(slide)) or keys.get(
        os.path.normpath(os.path.join(root, slide)))
    if name is not None:
      out[name] = os.path.join(root, os.path.expanduser(row["annotations"].strip()))
  missing = [name for _, name in slides if name not in out]
  if missing:
    raise UserError(f"--regions {path} names no annotations of slide {missing[0]}: add a row "
                    f"for it, or leave it out of this command")
  return out


def figures(labels: np.ndarray, scores: np.ndarray, threshold: float, resamples: int,
            seed: int) -> dict:
  """Slide-level metrics.BINARY_METRICS of 0/1 labels and scores, a slide called positive at
  score >= threshold; intervals from `resamples` bootstrap resamples of slides, by label."""
  labels, scores = np.asarray(labels, np.int64), np.asarray(scores, np.float64)
  called = (scores >= threshold).astype(np.int64)
  point = metrics.binary_metrics(labels, scores, called)
  ci = {}
  if resamples and len(labels):
    statistic = metrics.WeightedBinaryMetrics(labels, scores, called, np.arange(len(labels)),
                                              len(labels))
    ci = metrics.group_bootstrap(statistic, labels, resamples=resamples, seed=seed)
  return {name: {"value": point[name], "ci95": ci.get(name)} for name in metrics.BINARY_METRICS}


def calibration_figures(labels: np.ndarray, scores: np.ndarray, resamples: int,
                        seed: int) -> dict:
  """The calibration of slide scores read as P(positive) against 0/1 labels
  (`calibration.figures`, positive-class convention), with intervals from `resamples` bootstrap
  resamples of slides, by label; {} without slides."""
  labels, scores = np.asarray(labels, np.int64), np.asarray(scores, np.float64)
  if not len(labels):
    return {}
  probs = np.stack([1 - scores, scores], axis=1)
  point = calibration.figures(probs, labels, positive=1)
  ci = {}
  if resamples:
    statistic = calibration.WeightedCalibration(probs, labels, np.arange(len(labels)),
                                                len(labels), positive=1)
    ci = metrics.group_bootstrap(statistic, labels, resamples=resamples, seed=seed)
  return {name: {"value": value, "ci95": ci.get(name)} for name, value in point.items()}


def run_cohort(workdir: str, paths: list[str], out: str,
               options: pipeline.Options | None = None, labels: str | None = None,
               score: str = "mean", threshold: float = 0.5, resamples: int = 1000,
               seed: int = 0, mpp_csv: str | None = None) -> dict:
  """Predicts every slide `paths` name (files or folders) into OUT/<name>/ and writes
  OUT/cohort.csv (and OUT/cohort_figures.json with `labels`); returns {"slides": [slide.json
  records], "figures": ... or None}. Finished slides are read back, not predicted again.
  `mpp_csv` gives slides their level-0 MPP (`read_mpps`), over --mpp and their metadata."""
  options = options or pipeline.Options()
  if score not in SCORES:
    raise UserError(f"--score {score!r}: use one of {', '.join(SCORES)}")
  if not 0 <= threshold <= 1:
    raise UserError(f"--threshold {threshold}: give a score between 0 and 1")
  if not 0 <= resamples <= metrics.MAX_RESAMPLES:
    raise UserError(f"--bootstrap-resamples {resamples}: give 0 (none) to "
                    f"{metrics.MAX_RESAMPLES:,}")
  files.require_folder(out, "--out")
  paths = reader.slide_paths(list(paths))
  if not paths:
    raise UserError("give at least one slide (or a folder of slides)")
  unique = {}
  for path in paths:  # a slide given twice is predicted once
    unique.setdefault(os.path.realpath(path), path)
  paths = list(unique.values())
  run = pipeline.load_run(workdir, options)
  names = inspect.distinct_names(paths)
  mpps = read_mpps(mpp_csv, list(zip(paths, names, strict=True))) if mpp_csv else {}
  regions = (read_regions_of(options.regions, list(zip(paths, names, strict=True)))
             if options.regions else {})
  plans = [pipeline.plan_slide(run, p, n, options, mpps.get(n), regions.get(n))
           for p, n in zip(paths, names, strict=True)]
  b = run.outputs.binary
  if labels and b is None:
    raise UserError(f"--labels {labels}: slide-level figures are of a positive label, which "
                    f"{workdir}'s classes ({', '.join(run.outputs.classes)}) have none of; leave "
                    f"out --labels (cohort.csv lists each slide's tiles by predicted class)")
  slide_labels = read_labels(labels, plans, b.names, b.positive_name) if labels else None
  done = {plan.name: pipeline.finished(out, plan, run, options) for plan in plans}
  records = []
  with files.locked_or_refuse(out, "--out folder", remove_unused=True):
    writers.remove_stale(out)
    earlier = _earlier(out, {plan.name for plan in plans})
    other = [r["name"] for r in earlier if (r.get("positive") is None) != (b is None)]
    if other:
      kind = "with" if b is None else "without"
      raise UserError(f"{os.path.join(out, 'cohort.csv')} lists slides of a run {kind} a positive "
                      f"label ({', '.join(other[:3])}{' ...' if len(other) > 3 else ''}), whose "
                      f"columns differ from this run's; use another --out")
    for plan in plans:
      if done[plan.name] is not None:
        print(f"{plan.path}: finished before, results in {os.path.join(out, plan.name)}",
              flush=True)
        records.append(done[plan.name])
      else:
        records.append(pipeline.predict_slide(run, plan, out, options))
    records = earlier + records
    rows = [_row(r, b.positive_name, slide_labels, score, threshold) if b is not None else
            _class_row(r, run.outputs.classes) for r in records]
    writers.cohort_csv(os.path.join(out, "cohort.csv"), rows)
    result = {"slides": records, "figures": None}
    if slide_labels is not None:
      result["figures"] = _figures(records, slide_labels, b.positive_name, score, threshold,
                                   resamples, seed, run.workdir)
      writers.cohort_json(os.path.join(out, "cohort_figures.json"), result["figures"])
      print(format_figures(result["figures"]), flush=True)
  print(f"{len(records)} slide(s): {os.path.join(out, 'cohort.csv')}", flush=True)
  return result


def _earlier(out: str, names: set[str]) -> list[dict]:
  """The slide.json records of the slides an earlier call listed in OUT/cohort.csv and this call
  does not score again (a slide scored again replaces its row), in their order there."""
  path = os.path.join(out, "cohort.csv")
  if not os.path.isfile(path):
    return []
  with open(path, newline="") as f:
    listed = [row["name"] for row in csv.DictReader(f) if row.get("name")]
  kept = []
  for name in listed:
    record = os.path.join(out, name, "slide.json")
    if name not in names and os.path.isfile(record):
      with open(record) as f:
        kept.append(json.load(f))
  return kept


def _row(record: dict, positive: str, labels: dict | None, score: str, threshold: float) -> dict:
  s = record["scores"]
  row = {"name": record["name"], "slide": record["slide"],
         "tiles": record["tiles"]["predicted"], "unreadable": record["tiles"]["unreadable"],
         f"mean_prob_{positive}": _fmt(s["mean"]),
         f"top_{s['top_k']}_mean_prob_{positive}": _fmt(s["top_k_mean"]),
         f"fraction_{positive}": _fmt(s["fraction_positive"])}
  if labels is not None:
    label = labels.get(record["name"])
    row.update(label="" if label is None else label, score=_fmt(s[score]),
               called="" if s[score] is None else int(s[score] >= threshold))
  return row


def _class_row(record: dict, classes: tuple[str, ...]) -> dict:
  """A slide of a run without a positive label: its tiles by predicted class, counts and
  fractions."""
  s = record["scores"]
  return {"name": record["name"], "slide": record["slide"],
          "tiles": record["tiles"]["predicted"], "unreadable": record["tiles"]["unreadable"],
          **{f"tiles_{c}": s["predicted_classes"][c] for c in classes},
          **{f"fraction_{c}": _fmt(s["predicted_fractions"][c]) for c in classes}}


def _fmt(value) -> str:
  return "" if value is None else f"{value:.6f}"


def _figures(records, labels, positive, score, threshold, resamples, seed, workdir) -> dict:
  used = [r for r in records if r["name"] in labels and r["scores"][score] is not None]
  left_out = sorted({r["name"] for r in records} - {r["name"] for r in used})
  y = np.array([labels[r["name"]] for r in used], np.int64)
  s = np.array([r["scores"][score] for r in used], np.float64)
  return {"run": workdir, "positive": positive, "score": score,
          "score_meaning": {"mean": f"mean P({positive}) of the slide's tiles",
                            "top_k_mean": f"mean P({positive}) of its top-k tiles",
                            "fraction_positive": f"fraction of its tiles called {positive}"
                            }[score],
          "threshold": threshold, "slides": len(used), "positive_slides": int(y.sum()),
          "negative_slides": int(len(y) - y.sum()), "left_out": left_out,
          "metrics": figures(y, s, threshold, resamples, seed),
          "calibration": {"bins": calibration.BINS, "convention": "positive_class",
                          **calibration_figures(y, s, resamples, seed)},
          "bootstrap": {"resamples": resamples, "seed": seed, "level": metrics.LEVEL,
                        "unit": "slide", "stratified_by": "label"}}


def format_figures(f: dict) -> str:
  """The slide-level figures as a few lines of text."""
  lines = [f"slide level, {f['slides']} slides ({f['positive_slides']} {f['positive']}), score "
           f"{f['score']} ({f['score_meaning']}), called {f['positive']} at >= {f['threshold']}:"]
  for name, m in f["metrics"].items():
    value = "undefined" if m["value"] is None else f"{m['value']:.3f}"
    ci = f"  (95% CI {m['ci95'][0]:.3f}-{m['ci95'][1]:.3f})" if m["ci95"] else ""
    lines.append(f"  {name:18s} {value}{ci}")
  for name, m in f.get("calibration", {}).items():
    if isinstance(m, dict):
      ci = f"  (95% CI {m['ci95'][0]:.3f}-{m['ci95'][1]:.3f})" if m["ci95"] else ""
      lines.append(f"  {name:18s} {m['value']:.3f}{ci}")
  return "\n".join(lines)
