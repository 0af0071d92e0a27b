"""The package's floor plan: the layers of pyproject.toml's import-linter contract hold, nothing
imports inside a function but an optional heavy dependency, and the one `jattn` command reaches
every subcommand."""

from __future__ import annotations

import ast
import contextlib
import importlib.metadata
import io
import os
import subprocess
import sys

import pytest
from importlinter import api as importlinter_api

from jattn import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a function may import on first use: the optional dependencies a user may not have installed
# (PyTorch, OpenSlide's native library, TensorFlow Datasets, submitit, timm: the ViT's PyTorch peer)
# and the two jattn modules that import one of them at their top.
LAZY_ALLOWED = {"torch", "openslide", "tensorflow_datasets", "submitit", "jattn.sweeps.slurm",
                "jattn.perf.torch_reference", "timm"}


def test_the_layers_contract_is_kept():
  """lint-imports on pyproject.toml's contract: no import cycle between the layers, no import from
  a lower layer up."""
  report = importlinter_api.read_configuration(os.path.join(REPO, "pyproject.toml"))
  assert [c["name"] for c in report["contracts_options"]] == ["jattn's layers"]
  out = subprocess.run(["lint-imports", "--config", os.path.join(REPO, "pyproject.toml")],
                       cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": REPO})
  assert out.returncode == 0, out.stdout[-2000:]
  assert "Contracts: 1 kept, 0 broken." in out.stdout


def _function_imports() -> list[tuple[str, int, str]]:
  found = []
  for root, _, names in os.walk(os.path.join(REPO, "jattn")):
    for name in sorted(names):
      if not name.endswith(".py"):
        continue
      path = os.path.join(root, name)
      tree = ast.parse(open(path).read())
      for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
          for node in ast.walk(fn):
            if isinstance(node, ast.Import):
              found += [(os.path.relpath(path, REPO), node.lineno, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):  # jattn modules by name: from jattn.x import y
              module = node.module or ""
              found += [(os.path.relpath(path, REPO), node.lineno,
                         f"{module}.{a.name}" if module.startswith("jattn") else module)
                        for a in node.names]
  return found


def test_only_optional_heavy_dependencies_are_imported_inside_functions():
  found = _function_imports()
  lazy = [(path, line, m) for path, line, m in found
          if m not in LAZY_ALLOWED and m.split(".")[0] not in LAZY_ALLOWED]
  assert not lazy, lazy
  # Counted: each is one of the optional dependencies above (a change here is a change of design).
  assert {m.split(".")[0] if not m.startswith("jattn") else m for _, _, m in found} <= LAZY_ALLOWED
  assert len(found) == 16, found


def test_the_command_is_installed_and_lists_every_subcommand():
  scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
  assert scripts.get("jattn") == "jattn.cli:main"
  out = subprocess.run([sys.executable, "-m", "jattn", "--help"], cwd=REPO, capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": REPO}, check=True).stdout
  listed = [line.split()[0] for line in out.split("commands:\n")[1].splitlines() if line.strip()]
  assert listed == list(cli.COMMANDS) == [
      "train", "sweep", "tables", "predict", "inspect", "validate-external", "slide", "stain",
      "convert", "data", "benchmark", "models", "features"]
  # The design card's command keeps working, as the same command.
  main_help = subprocess.run([sys.executable, "-m", "jattn.main", "--help"], cwd=REPO,
                             capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": REPO}).stdout
  assert main_help.startswith("usage: jattn train ") and "--config" in main_help


def test_an_unknown_command_is_one_line(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["trian"])
  assert e.value.code == 2
  assert capsys.readouterr().err == ("jattn: error: unknown command 'trian': choose one of "
                                     f"{', '.join(cli.COMMANDS)}\n")


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_subcommand_has_help(command):
  text = io.StringIO()
  with contextlib.redirect_stdout(text), pytest.raises(SystemExit) as e:
    cli.main([command, "--help"])
  assert e.value.code == 0
  assert text.getvalue().startswith(f"usage: jattn {command}")


def test_a_real_small_command_of_each_group(trained_run, synthetic_tree, tmp_path, capsys):
  """Through `jattn <command>` as a user types it (in this process): the demo run's predictions,
  attention figures and tables, a model's parameter table, a data tree's description and a stain
  grid. (train, sweep, validate-external, slide, convert and benchmark run through the same
  dispatcher in their own tests: the trained run of every test is `jattn train`'s.)"""
  image = next(os.path.join(d, f) for d, _, fs in os.walk(synthetic_tree[0]) for f in sorted(fs)
               if f.endswith(".png"))
  cli.main(["predict", "--workdir", trained_run, image])
  rows = capsys.readouterr().out.splitlines()
  assert len(rows) == 2 and rows[1].split(",")[0] == image
  cli.main(["inspect", "--workdir", trained_run, "--out", str(tmp_path / "maps"), image])
  assert os.listdir(tmp_path / "maps") == [os.path.basename(image)[:-4] + "_attention.png"]
  sweep = tmp_path / "sweep" / "demo_ours"
  sweep.mkdir(parents=True)
  os.symlink(trained_run, sweep / "fold1")
  cli.main(["tables", str(tmp_path / "sweep")])
  assert (tmp_path / "sweep" / "tables.md").read_text() in capsys.readouterr().out
  cli.main(["models", "--config", os.path.join(REPO, "configs", "demo.py")])
  assert "block1 C-Attn" in capsys.readouterr().out
  cli.main(["data", "describe", "--source", synthetic_tree[0], "--no-image-check"])
  assert "82 patients" in capsys.readouterr().out
  cli.main(["stain", "--out", str(tmp_path / "grid.png"), "--rows", "1", "--size", "16"])
  assert capsys.readouterr().out == f"wrote {tmp_path / 'grid.png'}: 1 rows of 6 tiles\n"
