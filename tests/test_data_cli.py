"""`jattn data`: describe (text and --json), synthesize, and one-line errors."""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys

from jattn.data import breakhis
from jattn.data.breakhis import scan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {
    "source", "images", "patients", "classes", "subtypes", "magnifications", "ignored",
    "unreadable", "folds_source", "folds", "problems", "warnings", "release",
}  # fmt: skip


def _run(*args):
  return subprocess.run(
      [sys.executable, "-m", "jattn", "data", *args], cwd=REPO, capture_output=True, text=True
  )


def test_describe_json_has_the_documented_keys_and_counts(synthetic_tree):
  data_dir, summary = synthetic_tree
  result = _run("describe", "--source", data_dir, "--folds", summary["folds_csv"], "--json")
  assert result.returncode == 0, result.stderr
  d = json.loads(result.stdout)
  assert set(d) == KEYS
  # The documented keys are those of the module docstring.
  from jattn.data.breakhis import describe

  for key in KEYS:
    assert f"\n  {key} " in describe.__doc__
  records = scan.scan(data_dir).records
  assert d["images"] == len(records) and d["patients"] == 82
  assert d["problems"] == [] and d["unreadable"] == [] and d["folds_source"] == summary["folds_csv"]
  for code in breakhis.SUBTYPE_CODES:
    for mag in breakhis.MAGNIFICATIONS:
      assert d["subtypes"][code][mag] == summary["by_subtype"][code][mag]
  by_class = collections.Counter(r.label for r in records)
  assert [d["classes"][c]["images"] for c in breakhis.CLASSES] == [by_class[0], by_class[1]]
  assert set(d["ignored"]) == {j for j in summary["junk"] if j.startswith(breakhis.SLIDES)}
  assert sorted(d["folds"]) == ["1", "2", "3", "4", "5"]
  for entry in d["folds"].values():
    assert entry["leaked_patients"] == [] and entry["left_out"] == 0
    total = entry["train"]["all"]["images"]["total"] + entry["test"]["all"]["images"]["total"]
    assert total == len(records)
    for mag in breakhis.MAGNIFICATIONS:
      # 1 image per patient and magnification: images == patients on each side.
      for group in ("train", "test"):
        assert entry[group][mag]["images"] == entry[group][mag]["patients"]


def test_describe_lists_problems(tmp_path, synthetic_tree):
  data_dir, summary = synthetic_tree
  folds_csv = tmp_path / "Folds.csv"
  lines = open(summary["folds_csv"]).read().splitlines()
  # Fold 1: put one test image on the train side (a leak) and list a file that does not exist.
  i = next(k for k, line in enumerate(lines) if line.startswith("1,") and ",test," in line)
  lines[i] = lines[i].replace(",test,", ",train,")
  lines.append("1,40,test," + breakhis.image_path("A-14-22549AB", "40X", 77))
  folds_csv.write_text("\n".join(lines) + "\n")
  result = _run("describe", "--source", data_dir, "--folds", str(folds_csv), "--no-image-check")
  assert result.returncode == 0, result.stderr
  assert "problems (2):" in result.stdout
  assert "leaks patient(s)" in result.stdout and "SOB_B_A-14-22549AB-40-077.png" in result.stdout
  assert "fold" in result.stdout and "train" in result.stdout and "400X" in result.stdout


def test_errors_are_one_line_without_traceback(tmp_path):
  result = _run("describe", "--source", str(tmp_path / "missing"), "--json")
  assert result.returncode == 2
  assert result.stdout == ""
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in result.stderr
  assert lines[0].startswith("jattn data: error: data_dir ")
  assert "BreaKHis_v1.tar.gz" in lines[0]


def test_synthesize_command(tmp_path):
  out = tmp_path / "syn"
  result = _run(
      "synthesize", "--out", str(out), "--images-per-patient", "1", "--width", "24",
      "--height", "16", "--no-folds", "--seed", "2",
  )  # fmt: skip
  assert result.returncode == 0, result.stderr
  summary = json.loads(result.stdout)
  assert summary["images"] == 82 * 4 and summary["folds_csv"] is None
  assert len(scan.scan(str(out)).records) == 82 * 4
  again = _run("synthesize", "--out", str(out))
  assert again.returncode == 2 and "already exists" in again.stderr
  assert len(again.stderr.strip().splitlines()) == 1


def test_describe_folds_generated_is_the_default(synthetic_tree):
  """Guards against `--folds generated` being refused although the help names it the default
 ."""
  data_dir, _ = synthetic_tree
  default = _run("describe", "--source", data_dir, "--json", "--no-image-check")
  named = _run("describe", "--source", data_dir, "--folds", "generated", "--json",
               "--no-image-check")
  assert (default.returncode, named.returncode) == (0, 0), named.stderr
  assert json.loads(named.stdout) == json.loads(default.stdout)
  assert json.loads(named.stdout)["folds_source"] == "generated (seed 0)"


def test_describe_lists_missing_folds(tmp_path):
  """Guards against `describe` reporting `problems (0)` for an mkfold tree missing fold 3 and a
  Folds.csv without fold 5, which training refuses."""
  from conftest import small_tree

  data_dir = small_tree(tmp_path / "data", junk=False, odd_sizes=0)
  shutil.rmtree(os.path.join(data_dir, "mkfold", "fold3"))
  result = _run("describe", "--source", data_dir, "--folds", "mkfold", "--no-image-check")
  assert result.returncode == 0, result.stderr
  mkfold = os.path.join(data_dir, "mkfold")
  assert "problems (1):" in result.stdout
  assert f"  - {mkfold} has no fold 3 (it has folds 1, 2, 4, 5)" in result.stdout.splitlines()
  lines = open(os.path.join(data_dir, "Folds.csv")).read().splitlines()
  no_five = tmp_path / "Folds.csv"
  no_five.write_text("\n".join(line for line in lines if not line.startswith("5,")) + "\n")
  result = _run("describe", "--source", data_dir, "--folds", str(no_five), "--json",
                "--no-image-check")
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout)["problems"] == [f"{no_five} has no fold 5 (it has folds 1, 2, "
                                                   f"3, 4)"]
