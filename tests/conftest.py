"""Shared fixtures: one small synthetic BreakHis tree of all 82 patients, prepared once, and one
tiny trained run on it."""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest

# Compiled XLA programs are cached on disk for the session and for the subprocesses tests start:
# the same tiny model is compiled once, not once per test and process. The workers of one
# pytest-xdist run share it (PYTEST_XDIST_TESTRUNUID names the run).
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"jattn-xla-cache-{os.environ['PYTEST_XDIST_TESTRUNUID']}")
    if "PYTEST_XDIST_TESTRUNUID" in os.environ else tempfile.mkdtemp(prefix="jattn-xla-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

from configs import default
from jattn.data import breakhis, load_fold
from jattn.data.breakhis.synthetic import synthesize
from jattn.training import compat

# Two patients of each subtype: a tree small enough to prepare again in a test that changes it.
SMALL_PATIENTS = tuple(
    p.patient_id
    for code in breakhis.SUBTYPE_CODES
    for p in [q for q in breakhis.patients() if q.subtype == code][:2]
)


def set_fields(config, **values):
  """Sets config fields by name, a data field also as configs before `config.data` named it
  (`dataset`, `manifest`: `compat.nested_key`), in place; returns the config."""
  name = values.get("dataset", values.get("data.name", config.data.name))
  for key, value in values.items():
    *parents, field = compat.nested_key(key, name).split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[field] = value
  return config


def data_config(data_dir: str, prepared_dir: str = "", **overrides):
  """configs/default.py pointed at a synthetic tree, with a small image size for speed."""
  config = default.get_config()
  config.data.dir = data_dir
  config.data.prepared_dir = prepared_dir
  config.image_size = 16
  config.loader_threads = 2
  return set_fields(config, **overrides)


def small_tree(folder, **options) -> str:
  """A 16-patient tree (1 image per patient and magnification, 32x24 px) in `folder`."""
  kwargs = dict(images_per_patient=1, width=32, height=24, seed=0, patients=SMALL_PATIENTS)
  synthesize(str(folder), **{**kwargs, **options})
  return str(folder)


def shared(tmp_path_factory, name: str, build) -> pathlib.Path:
  """A session fixture's folder, built by `build(folder)` once per test run: under pytest-xdist
  the first worker to ask builds it under a lock and the others wait for it and read it (the
  fixtures below are read-only for tests); without xdist, a new folder of this session."""
  if os.environ.get("PYTEST_XDIST_WORKER") is None:
    out = tmp_path_factory.mktemp(name)
    build(out)
    return out
  root = tmp_path_factory.getbasetemp().parent  # shared by the workers of one run
  out, done = root / name, root / f"{name}.done"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      shutil.rmtree(out, ignore_errors=True)  # a worker that failed to build it left this
      out.mkdir()
      build(out)
      done.touch()
  return out


@pytest.fixture(scope="session")
def synthetic_tree(tmp_path_factory):
  """(data_dir, summary) of an 82-patient tree: 1 image per patient and magnification, 64x42 px,
  with junk files, odd sizes, a Folds.csv and an mkfold tree. Tests must not change it."""
  def build(out):
    summary = synthesize(str(out), images_per_patient=1, width=64, height=42, seed=0)
    with open(out / "summary.json", "w") as f:
      json.dump(summary, f)

  out = shared(tmp_path_factory, "breakhis", build)
  with open(out / "summary.json") as f:
    return str(out), json.load(f)


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory):
  """The prepared cache of the session's runs (its builds take a lock of their own)."""
  return str(shared(tmp_path_factory, "prepared", lambda out: None))


@pytest.fixture(scope="session")
def fold_data(synthetic_tree, prepared_dir):
  """Fold 1 of the generated folds (seed 0) of the session tree, at 16x16."""
  return load_fold(data_config(synthetic_tree[0], prepared_dir))


def image_file(data_dir: str, path: str) -> str:
  return os.path.join(data_dir, *path.split("/"))


@pytest.fixture(scope="session")
def trained_run(synthetic_tree, prepared_dir, tmp_path_factory):
  """The work dir of a tiny run of configs/demo.py, trained and evaluated through the command line.
  Tests must not change it."""
  from jattn import main
  from tests.runs import DEMO, tiny_overrides

  def build(workdir):
    args = ["--config", DEMO, "--workdir", str(workdir)]
    main.main(args + [f"--config.{o}" for o in tiny_overrides(synthetic_tree[0], prepared_dir)])

  return str(shared(tmp_path_factory, "run", build))


# Runs in a process that sees 4 CPU devices (the flag must be set before jax starts): the same
# global batch of 32 on one device, sharded over four, and two parallel folds over four. A
# checkpoint every 3 steps, so that tests can resume them from a step within the epoch.
DEVICES_SETTINGS = dict(log_every_steps=1, num_epochs=1, learning_rate=1e-6, batch_size=32,
                        checkpoint_every_steps=3)
_DEVICES_SCRIPT = """
import sys
from jattn.training import train
from jattn.core.errors import UserError
from tests.conftest import DEVICES_SETTINGS as settings
from tests.runs import tiny_config
data_dir, prepared_dir, out = sys.argv[1:4]
for name, extra in [("one", dict(num_devices=1)), ("four", dict(num_devices=4, eval_batch_size=10)),
                    ("folds", dict(parallel_folds=2))]:
  config = tiny_config(data_dir, prepared_dir, **settings, **extra)
  train.train_and_evaluate(config, f"{out}/{name}/fold{{fold}}")
try:
  train.train_and_evaluate(tiny_config(data_dir, prepared_dir, batch_size=30), f"{out}/odd")
except UserError as e:
  print(e, file=open(f"{out}/odd.txt", "w"))
"""


@pytest.fixture(scope="session")
def four_devices(synthetic_tree, prepared_dir, tmp_path_factory):
  """The folder of the runs of _DEVICES_SCRIPT (one/, four/, folds/: fold1/, fold2/ each), trained
  in a process with 4 CPU devices. Tests must not change it."""
  from tests.runs import REPO

  def build(out):
    run = subprocess.run(
        [sys.executable, "-c", _DEVICES_SCRIPT, synthetic_tree[0], prepared_dir, str(out)],
        cwd=REPO, capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    assert run.returncode == 0, run.stderr[-3000:]

  return shared(tmp_path_factory, "devices", build)
