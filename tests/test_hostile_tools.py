"""Hostile and unlucky use of the tools that read runs and sweeps: predict, inspect,
tables, the SLURM launcher and the benchmark commands. Every failure the user can fix is one line
on stderr, exit status 2, no traceback, with nothing already written changed.

SLURM cannot run inside the test suite: fake `sbatch`, `srun` and `sacct` scripts on PATH stand in
for it, as in tests/test_sweep.py.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from configs import default as default_config
from experiments import benchmark_loader
from jattn.cli import inspect as inspect_cli
from jattn.cli import predict as predict_cli
from jattn.cli import sweep as sweep_cli
from jattn.cli import tables as tables_cli
from jattn.data.breakhis import published
from jattn.evaluation import report, tables
from jattn.inference import attention_maps as inspect
from jattn.perf import benchmark
from jattn.sweeps import slurm
from tests.runs import DEMO
from tests.test_hostile import copy_run, one_line_error, snapshot, steps_of

MAGS = ("40X", "100X", "200X", "400X")


def some_images(data_dir: str, count: int) -> list[str]:
  """The first `count` PNGs of a BreakHis tree, in sorted order."""
  found = []
  for root, dirs, names in os.walk(os.path.join(data_dir, "BreaKHis_v1")):
    dirs.sort()
    found += [os.path.join(root, n) for n in sorted(names) if n.endswith(".png")]
  return found[:count]


# ------------------------------------------------------------------------------------------------
# 4: inspect never writes two images into one figure; predict and inspect say a run is unfinished.


def test_figure_names_tell_clashing_images_apart():
  """The names inspect gives, derived by hand: parent folders only where stems clash (ignoring
  case), as few as tell them apart (d/ and e/ for the four 'img'), then the extension within one
  folder, then a number; never the same name twice."""
  names = inspect.figure_names(["/r/a/x/one.png", "/r/b/x/one.png", "/r/c/two.png",
                                "/r/d/img.png", "/r/d/img.jpg", "/r/e/Img.png", "/r/e/IMG.png"])
  assert names == ["a_x_one_attention.png", "b_x_one_attention.png", "two_attention.png",
                   "d_img_png_attention.png", "d_img_jpg_attention.png",
                   "e_Img_png_attention.png", "e_IMG_png-2_attention.png"]
  assert inspect.figure_names(["/r/p.png", "/r/q.png"]) == ["p_attention.png", "q_attention.png"]


def test_inspect_writes_one_figure_per_image_when_names_clash(trained_run, synthetic_tree,
                                                               tmp_path, capsys):
  """Bug: a/x/one.png and b/x/one.png both wrote one_attention.png, the second over the first."""
  first, second, third = some_images(synthetic_tree[0], 3)
  for target, source in (("a/x/one.png", first), ("b/x/one.png", second), ("c/two.png", third)):
    os.makedirs(tmp_path / os.path.dirname(target), exist_ok=True)
    shutil.copy(source, tmp_path / target)
  out = tmp_path / "maps"
  out.mkdir()
  (out / "notes.txt").write_text("kept")
  run_before = snapshot(trained_run)
  inspect_cli.main(["--workdir", trained_run, "--out", str(out),
                    str(tmp_path / "a" / "x" / "one.png"), str(tmp_path / "b" / "x" / "one.png"),
                    str(tmp_path / "c")])
  printed = capsys.readouterr().out.split()
  expected = ["a_x_one_attention.png", "b_x_one_attention.png", "two_attention.png"]
  assert printed == [str(out / name) for name in expected]
  assert sorted(os.listdir(out)) == sorted([*expected, "notes.txt"])
  assert (out / "notes.txt").read_text() == "kept" and snapshot(trained_run) == run_before
  with open(out / expected[0], "rb") as a, open(out / expected[1], "rb") as b:
    assert a.read() != b.read()  # two images, two figures


def unfinished_copy(trained_run, target) -> tuple[str, int, int]:
  """A copy of the run as if killed before its last epoch ended: its last checkpoint and its
  results.json gone. Returns the work dir, the step left and the run's total, as its original
  results.json recorded it (independently of the checkpoints' metadata)."""
  workdir = copy_run(trained_run, target)
  with open(os.path.join(workdir, "results.json")) as f:
    train = json.load(f)["train"]
  assert train["steps"] == train["steps_per_epoch"] * train["epochs"]
  os.remove(os.path.join(workdir, "results.json"))
  *_, left, last = steps_of(workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", str(last)))
  return workdir, left, train["steps"]


def test_predict_and_inspect_warn_that_a_run_is_unfinished(trained_run, synthetic_tree, tmp_path,
                                                           capsys):
  """Bug: predict and inspect used a checkpoint of an unfinished run without a word."""
  workdir, step, total = unfinished_copy(trained_run, tmp_path / "run")
  epochs = 2  # tests/runs.py's tiny runs
  before = snapshot(workdir)
  image = some_images(synthetic_tree[0], 1)[0]
  predict_cli.main(["--workdir", workdir, image])
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "Traceback" not in err, err
  assert err == (f"jattn: warning: demo_ours fold 1 has not finished training (no results.json): "
                 f"its latest checkpoint is step {step} of {total} ({step * epochs // total} of "
                 f"{epochs} epochs done); using that partly trained model\n")
  inspect_cli.main(["--workdir", workdir, "--out", str(tmp_path / "maps"), image])
  assert capsys.readouterr().err == err
  assert snapshot(workdir) == before

  # A checkpoint written before the steps per epoch were recorded: the step, without the total.
  metadata = os.path.join(workdir, "checkpoints", str(step), "_CHECKPOINT_METADATA")
  with open(metadata) as f:
    recorded = json.load(f)
  assert recorded["custom_metadata"] == {"steps_per_epoch": total // epochs}
  recorded["custom_metadata"] = {}
  with open(metadata, "w") as f:
    json.dump(recorded, f)
  predict_cli.main(["--workdir", workdir, image])
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and f"latest checkpoint is step {step}, of a run of 2 epochs" in err

  predict_cli.main(["--workdir", trained_run, image])  # a finished run: no warning
  assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------------
# predict's options and folders.


@pytest.mark.parametrize("size", ["0", "-1"])
def test_a_batch_size_below_one_is_one_line(size, trained_run, synthetic_tree, capsys):
  """Bug: --batch-size 0 and -1 were tracebacks (range() step 0; an empty batch)."""
  before = snapshot(trained_run)
  one_line_error(lambda: predict_cli.main(["--workdir", trained_run, "--batch-size", size,
                                       some_images(synthetic_tree[0], 1)[0]]), capsys,
                 "jattn predict", rf"--batch-size {size}: give a positive number of images")
  assert snapshot(trained_run) == before


def test_out_naming_a_folder_is_one_line(trained_run, synthetic_tree, tmp_path, capsys):
  """Bug: --out EXISTING_DIR was an IsADirectoryError traceback, after predicting everything."""
  (tmp_path / "results").mkdir()
  (tmp_path / "results" / "old.csv").write_text("kept")
  before = snapshot(tmp_path)
  one_line_error(lambda: predict_cli.main(["--workdir", trained_run, "--out",
                                           str(tmp_path / "results"),
                                           some_images(synthetic_tree[0], 1)[0]]), capsys,
                 "jattn predict", rf"--out {tmp_path / 'results'} is a folder: give the CSV file")
  assert snapshot(tmp_path) == before


def test_predict_reads_a_folder_for_its_image_files(trained_run, synthetic_tree, tmp_path, capsys):
  """A folder stands for its image files, subfolders included, sorted; junk and other files are
  skipped (the list of what must be read is written out by hand)."""
  sources = some_images(synthetic_tree[0], 4)
  folder = tmp_path / "tiles"
  (folder / "b" / "deeper").mkdir(parents=True)
  (folder / ".hidden").mkdir()
  shutil.copy(sources[0], folder / "z.png")
  shutil.copy(sources[1], folder / "b" / "a.PNG")
  with Image.open(sources[2]) as im:
    im.convert("RGB").save(folder / "b" / "deeper" / "c.jpg")
    im.convert("RGB").save(folder / "b" / "m.tif")
  shutil.copy(sources[3], folder / "b" / "._a.png")  # macOS resource fork: junk
  shutil.copy(sources[3], folder / ".hidden" / "x.png")
  (folder / "Thumbs.db").write_bytes(b"\0" * 16)
  (folder / ".DS_Store").write_bytes(b"\0" * 16)
  (folder / "notes.txt").write_text("not an image")
  expected = [folder / "b" / "a.PNG", folder / "b" / "deeper" / "c.jpg", folder / "b" / "m.tif",
              folder / "z.png"]
  predict_cli.main(["--workdir", trained_run, str(folder)])
  rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
  assert [r["file_name"] for r in rows] == [str(p) for p in expected]
  assert all(0 <= float(r["prob_malignant"]) <= 1 for r in rows)
  (tmp_path / "empty" / "sub").mkdir(parents=True)
  (tmp_path / "empty" / "sub" / "Thumbs.db").write_bytes(b"\0")
  one_line_error(lambda: predict_cli.main(["--workdir", trained_run, str(tmp_path / "empty")]),
                 capsys, "jattn predict", r"empty: a folder without image files \(.png, .jpg")


# ------------------------------------------------------------------------------------------------
# 5 and the tables' rows: non-finite figures, settings that differ from the paper's, folder names.


def results(name, fold, rng, paper_row="Ours", config=None):
  """A finished results.json as jattn.training.train writes it, with random fractions and clinical
  metrics."""
  r = {"schema": "jattn.results/1", "name": name, "paper_row": paper_row, "fold": fold,
       "finished": True,
       **{key: {m: float(rng.uniform(0.8, 1.0)) for m in MAGS}
          for key in ("image_accuracy", "patient_accuracy", "patient_recognition_rate")},
       "clinical": {level: {m: {metric: {"value": float(rng.uniform(0.5, 1))}
                                for metric in tables.CLINICAL_METRICS}
                            for m in (*MAGS, "all")} for level in ("image", "patient")}}
  return r if config is None else {**r, "config": config}


def write_sweep(sweep_dir, runs: dict[tuple[str, int], dict]) -> None:
  for (folder, fold), r in runs.items():
    os.makedirs(sweep_dir / folder / f"fold{fold}", exist_ok=True)
    (sweep_dir / folder / f"fold{fold}" / "results.json").write_text(json.dumps(r))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_clinical_figure_is_one_line(bad, tmp_path, capsys):
  """Bug: NaN and inf in clinical metrics gave cells `nan ± nan`, though accuracies refuse them.
  The tables written before stay as they were."""
  rng = np.random.default_rng(0)
  runs = {("ours", k): results("ours", k, rng) for k in (1, 2)}
  runs[("ours", 2)]["clinical"]["image"]["40X"]["sensitivity"]["value"] = None  # undefined: fine
  write_sweep(tmp_path, runs)
  tables_cli.main([str(tmp_path)])
  capsys.readouterr()
  before = snapshot(tmp_path)
  runs[("ours", 2)]["clinical"]["patient"]["all"]["roc_auc"]["value"] = bad
  write_sweep(tmp_path, runs)  # json.dumps writes NaN, Infinity, -Infinity
  changed = snapshot(tmp_path)
  one_line_error(lambda: tables_cli.main([str(tmp_path)]), capsys, "jattn tables",
                 rf"ours/fold2/results.json: the figure clinical\.patient\.roc_auc \(all\) is "
                 rf"{json.dumps(bad)}, not a fraction in \[0, 1\] or null")
  assert snapshot(tmp_path) == changed
  assert {k: v for k, v in changed.items() if k.startswith("tables")} == {
      k: v for k, v in before.items() if k.startswith("tables")}


def paper_config() -> dict:
  """configs/ours.py's config as results.json records it."""
  from configs import ours

  return json.loads(ours.get_config().to_json())


def test_paper_setting_is_configs_default():
  """The setting the tables compare with is the paper's, as configs/default.py spells it."""
  config = default_config.get_config()
  for key, value in published.PAPER_SETTING.items():
    node = config
    for part in key.split("."):
      node = node[part]
    assert node == value, key
  assert config.pretrained and config.data.breakhis.task == "binary"


def test_rows_of_another_setting_are_labelled_and_shown_without_the_papers_figures(
    trained_run, tmp_path):
  """Bug: a demo sweep's rows (from scratch, small images, few epochs, a narrow model) were shown
  with the paper's figures beside them. A run of the paper's setting, recorded with its config,
  tabulates byte for byte as one written before configs were recorded."""
  rng = np.random.default_rng(1)
  plain = {("ours", k): results("ours", k, rng) for k in (1, 2)}
  write_sweep(tmp_path / "old", plain)
  write_sweep(tmp_path / "new", {key: {**r, "config": paper_config()} for key, r in plain.items()})
  old = report.write(str(tmp_path / "old"))[0]
  assert report.write(str(tmp_path / "new"))[0] == old.replace(str(tmp_path / "old"),
                                                                   str(tmp_path / "new"))
  assert "| *paper: Ours* |" in old
  for name in ("tables.csv",):
    assert (tmp_path / "old" / name).read_bytes() == (tmp_path / "new" / name).read_bytes()

  demo = tmp_path / "demo"  # the tiny demo run, as a demo sweep holds it
  shutil.copytree(trained_run, demo / "demo_ours" / "fold1")
  with open(demo / "demo_ours" / "fold1" / "results.json") as f:
    assert json.load(f)["paper_row"] == "Ours"  # the demo reproduces the paper's row, small
  markdown = report.write(str(demo))[0]
  label = "demo_ours (from scratch, 32x32, 2 epochs, width 1/16, classifier 16)"
  assert f"| {label} |" in markdown and "*paper:" not in markdown
  with open(demo / "tables.csv") as f:
    assert {(r["paper_row"], r["paper_mean"]) for r in csv.DictReader(f)} == {("", "")}


def test_a_folder_named_otherwise_than_its_config_is_read(trained_run, tmp_path, capsys):
  """Bug: a demo config run on other data into sweep/mine/fold1 was refused ('holds name
  demo_ours'). The folder names the row, the config name is shown; folds of one row must be runs
  of one config."""
  shutil.copytree(trained_run, tmp_path / "mine" / "fold1")
  markdown = report.write(str(tmp_path))[0]
  assert ("| mine (config demo_ours; from scratch, 32x32, 2 epochs, width 1/16, classifier 16) |"
          in markdown)
  with open(tmp_path / "mine" / "fold1" / "results.json") as f:
    other = {**json.load(f), "name": "demo_vgg19", "fold": 2}
  (tmp_path / "mine" / "fold2").mkdir()
  (tmp_path / "mine" / "fold2" / "results.json").write_text(json.dumps(other))
  before = snapshot(tmp_path)
  one_line_error(lambda: tables_cli.main([str(tmp_path)]), capsys, "jattn tables",
                 r"mine/fold2/results.json: a run of config 'demo_vgg19', but other folds of "
                 r"'mine' are runs of 'demo_ours'")
  assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------------
# 9: SLURM with sacct missing or silent, and sbatch printing what it should not.


def fake_slurm(bin_dir, sbatch_says="Submitted batch job 4242", sacct=True) -> None:
  """sbatch, srun and (unless not `sacct`) a sacct that prints nothing, each logging its call."""
  bin_dir.mkdir()
  scripts = {"sbatch": f'echo "{sbatch_says}"', "srun": "exit 0", "sacct": "exit 0"}
  for name, body in scripts.items():
    if name == "sacct" and not sacct:
      continue
    (bin_dir / name).write_text(f'#!/bin/sh\necho "$@" >> "{bin_dir}/{name}.calls"\n{body}\n')
    (bin_dir / name).chmod(0o755)


def calls(bin_dir, name) -> int:
  path = bin_dir / f"{name}.calls"
  return len(path.read_text().splitlines()) if path.exists() else 0


SLURM = ["--launcher", "slurm", "--partition", "gpu", "--folds", "1"]


def test_no_sacct_is_one_line_before_submitting(tmp_path, monkeypatch, capsys):
  """Bug: without sacct the sweep submitted, then logged 'Bypassing sacct error' forever."""
  fake_slurm(tmp_path / "bin", sacct=False)
  monkeypatch.setenv("PATH", str(tmp_path / "bin"))
  out = tmp_path / "sweep"
  one_line_error(lambda: sweep_cli.main(["--configs", f"{DEMO}:ours", "--out", str(out), *SLURM]),
                 capsys, "jattn sweep", r"--launcher slurm: no sacct on PATH")
  assert calls(tmp_path / "bin", "sbatch") == 0 and not out.exists()


def test_a_silent_sacct_ends_the_wait_within_its_bound(trained_run, tmp_path, monkeypatch,
                                                       capsys):
  """Bug: a sacct that printed nothing kept the sweep waiting forever. After SACCT_SILENT_CALLS
  silent calls (2 here) it stops with one line; the finished run beside is untouched."""
  fake_slurm(tmp_path / "bin")
  monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setattr(slurm, "SACCT_SILENT_CALLS", 2)
  monkeypatch.setattr(slurm, "POLL_S", 0.1)
  out = tmp_path / "sweep"
  shutil.copytree(trained_run, out / "demo_ours" / "fold1")  # finished: not submitted again
  before = snapshot(out / "demo_ours")
  started = time.monotonic()
  err = one_line_error(
      lambda: sweep_cli.main(["--configs", f"{DEMO}:ours,{DEMO}:vgg19", "--out", str(out), *SLURM]),
      capsys, "jattn sweep", r"sacct has listed none of job 4242 in 2 calls in a row .* the jobs "
                       r"keep running \(squeue --me\)\. Run the same command when they have ended")
  assert time.monotonic() - started < 10  # submitit's second sacct call comes 2-4 s in
  assert f"`jattn tables {out}` for the tables so far" in err
  assert calls(tmp_path / "bin", "sbatch") == 1 and calls(tmp_path / "bin", "sacct") == 2
  assert snapshot(out / "demo_ours") == before


def test_unparsable_sbatch_output_is_reported_as_printed(tmp_path, monkeypatch, capsys):
  """Bug: sbatch output without a job id was reported as 'sbatch refused the job array'."""
  fake_slurm(tmp_path / "bin", sbatch_says="Job accepted by the gateway")
  monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
  one_line_error(lambda: sweep_cli.main(["--configs", f"{DEMO}:ours", "--out", str(tmp_path / "s"),
                                     *SLURM]), capsys, "jattn sweep",
                 r"sbatch printed 'Job accepted by the gateway', not 'Submitted batch job <id>'")


# ------------------------------------------------------------------------------------------------
# The benchmark commands' help.


def test_benchmark_help_is_whole_and_every_option_has_help(capsys):
  """Bug: `jattn benchmark --help` ended mid-sentence ("and what the paper's"), and
  options (the loader benchmark's --threads) had no help."""
  with pytest.raises(SystemExit) as e:
    benchmark.parse_args(["--help"])
  assert e.value.code == 0
  assert "what the paper's protocol would cost here." in " ".join(capsys.readouterr().out.split())
  for parser in (benchmark.make_parser(), benchmark_loader.make_parser()):
    assert [a.dest for a in parser._actions if not a.help] == [], parser.prog
