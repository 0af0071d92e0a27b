"""The seams between the data sources, the evaluator and the results: results of schema 1 read
as schema 2 with every figure unchanged, an old sweep tabulated byte for byte, the tools beside
the training loop, and no BreakHis name outside its source.

The fixtures in tests/data were written by jattn before data sources existed (schema 1): a demo run
of each task, the tables the old `jattn.evaluation.tables` wrote for a small sweep, and the tables
the old `jattn.main` printed.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys

import pytest

from jattn.data import breakhis
from jattn.evaluation import evaluate, report, results
from tests.runs import DEMO, REPO

DATA = os.path.join(REPO, "tests", "data")


def _v1(name: str) -> dict:
  with open(os.path.join(DATA, name)) as f:
    return json.load(f)


@pytest.mark.parametrize("task", ["binary", "subtype"])
def test_schema_1_results_are_read_as_schema_2_with_the_figures_unchanged(task):
  old = _v1(f"results_v1_{task}.json")
  new = results.read(os.path.join(DATA, f"results_v1_{task}.json"))
  assert old["schema"] == results.V1 and new["schema"] == results.SCHEMA
  renamed = {"patient_accuracy": "group_accuracy", "num_patients": "num_groups",
             "patient_recognition_rate": "group_recognition_rate",
             "patient_confusion_matrix": "group_confusion_matrix",
             "subtype_accuracy": "subclass_accuracy"}
  for v1, v2 in renamed.items():
    assert new[v2] == old[v1], v1
  for key in ("image_accuracy", "num_images", "confusion_matrix", "tie_rule", "config"):
    assert new[key] == old[key], key
  for m in breakhis.MAGNIFICATIONS:
    assert new["majority_baseline"][m] == {"image": old["majority_baseline"][m]["image"],
                                           "group": old["majority_baseline"][m]["patient"]}
    assert [{"patient_id" if k == "group" else k: v for k, v in row.items()}
            for row in new["per_group"][m]] == old["patients"][m]
  assert new["strata"]["magnification"]["selected"] == old["magnifications"]["selected"]
  assert new["group_unit"] == "patient" and new["source"] == "breakhis"
  assert new["classes"] == list(breakhis.TASKS[task])
  if task == "binary":
    assert new["clinical"]["group"] == old["clinical"]["patient"]
    assert new["clinical"]["image"] == old["clinical"]["image"]
    assert new["binary"]["positive"] == "malignant"
  else:
    assert new["group_per_class"] == old["patient_per_class"]
    assert new["per_class"] == old["per_class"]
    assert new["binary"]["of"]["DC"] == "malignant" and new["binary"]["of"]["F"] == "benign"
    for m in breakhis.MAGNIFICATIONS:
      assert new["multiclass"][m]["group"] == old["multiclass"][m]["patient"]
  # The table a finished run prints is the one the old code printed for it, line for line.
  with open(os.path.join(DATA, f"results_v1_{task}_table.txt")) as f:
    printed = f.read().rstrip("\n")
  assert evaluate.format_table(new) == printed


def test_a_sweep_of_schema_1_results_tabulates_byte_for_byte(tmp_path):
  """tables.md and tables.csv as the old jattn.evaluation.tables wrote them for the same results:
  the paper's figures beside the row of its setting, labels of the others, clinical tables."""
  sweep = tmp_path / "sweep"
  shutil.copytree(os.path.join(DATA, "sweep_v1"), sweep)
  want_md, want_csv = (open(sweep / name).read() for name in ("tables.md", "tables.csv"))
  for name in ("tables.md", "tables.csv"):
    os.remove(sweep / name)
  markdown = report.write(str(sweep))[0]
  assert markdown == (sweep / "tables.md").read_text()
  got_md = (sweep / "tables.md").read_text().split("\n", 1)
  assert got_md[0] == f"# Results of {sweep}"
  assert got_md[1] == want_md.split("\n", 1)[1]
  assert (sweep / "tables.csv").read_text() == want_csv
  assert "*paper: Ours*" in markdown and "demo_vgg19 (from scratch" in markdown


def test_the_tools_that_read_a_run_do_not_import_the_training_loop():
  """predict, inspect and slides share the test evaluation's sharded eval path
  (jattn.training.parallel), never the training loop."""
  code = ("import sys; import jattn.inference.runs, jattn.inference.predict, "
          "jattn.inference.attention_maps, jattn.evaluation.tables, jattn.evaluation.evaluate, "
          "jattn.training.state, jattn.cli.slide, jattn.slides; "
          "print('jattn.training.train' in sys.modules, 'jattn.training.parallel' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": REPO}, check=True).stdout.split()
  assert out == ["False", "True"]


# What only the BreakHis source may name: its magnifications, classes and subtypes.
BREAKHIS_NAMES = {*breakhis.MAGNIFICATIONS, *breakhis.CLASSES,
                  *(folder for folder, _ in breakhis.SUBTYPES.values())}
BREAKHIS_CONSTANTS = {"MAGNIFICATIONS", "CLASSES", "SUBTYPES", "SUBTYPE_CODES", "TASKS"}
# Outside its folder, the registry names the source and the data command line runs it.
MAY_IMPORT_BREAKHIS = {"jattn/data/sources.py", "jattn/cli/data.py", "jattn/data/preview.py"}
# The generic word for a BreakHis magnification is a stratum: the slide command keeps the word only
# in its option's BreakHis alias, slides read it from slide.json files written before the option's
# generic name, old configs name the field of before, and the BreakHis data command names it in
# its help; feature files carry TRIDENT's attribute names for a slide's objective power.
MAY_SAY_MAGNIFICATION = {"jattn/cli/slide.py": "--magnification",
                         "jattn/slides/features.py": "_magnification",
                         "jattn/slides/pipeline.py": "magnification",
                         "jattn/training/compat.py": "magnifications",
                         "jattn/cli/data.py": "per magnification"}


def _modules():
  for root, _, names in os.walk(os.path.join(REPO, "jattn")):
    for name in names:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, REPO)
      if name.endswith(".py") and not rel.startswith(os.path.join("jattn", "data", "breakhis")):
        yield rel, path


def _docstrings(tree) -> set[int]:
  ids = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
      body = node.body
      if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        ids.add(id(body[0].value))
  return ids


def test_no_module_outside_the_breakhis_source_names_its_magnifications_or_classes():
  found = []
  for rel, path in _modules():
    with open(path) as f:
      tree = ast.parse(f.read())
    docs = _docstrings(tree)
    for node in ast.walk(tree):
      if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
        words = {w.strip(".,:;()'\"") for w in node.value.split()}
        found += [f"{rel}:{node.lineno} {w!r}" for w in words & BREAKHIS_NAMES]
        if "magnification" in node.value.lower() and not (
            rel in MAY_SAY_MAGNIFICATION and MAY_SAY_MAGNIFICATION[rel] in node.value):
          found.append(f"{rel}:{node.lineno} {node.value!r}")
      elif isinstance(node, (ast.Name, ast.Attribute, ast.arg, ast.keyword)):
        name = {ast.Name: "id", ast.Attribute: "attr", ast.arg: "arg", ast.keyword: "arg"}[
            type(node)]
        name = getattr(node, name) or ""
        if name in BREAKHIS_CONSTANTS or "magnification" in name.lower():
          found.append(f"{rel}:{node.lineno} {name}")
      elif isinstance(node, (ast.Import, ast.ImportFrom)) and rel not in MAY_IMPORT_BREAKHIS:
        modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
        found += [f"{rel}:{node.lineno} imports {m}" for m in modules
                  if m and m.startswith("jattn.data.breakhis")]
  assert not found, found


@pytest.mark.parametrize(("field", "value", "message"), [
    ("dataset", "breakhys", r"--config\.data\.name='breakhys' is not a data source: use one of "
                            r"breakhis, folder, slides, bags, tfds:NAME \(a prepared TFDS data "
                            r"set\); did you mean 'breakhis'\?"),
    ("model.name", "vgg16", r"--config\.model\.name='vgg16' is not a model: use one of vgg19"),
])
def test_an_unknown_source_or_model_is_one_line(tmp_path, capsys, field, value, message):
  from jattn import main
  from tests.test_hostile import one_line_error, snapshot

  before = snapshot(tmp_path)
  one_line_error(lambda: main.main(["--config", DEMO, "--workdir", str(tmp_path / "run"),
                                    f"--config.{field}={value}"]),
                 capsys, "jattn train", message)
  assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()
