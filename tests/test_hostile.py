"""Hostile and unlucky inputs: no silently wrong data, a corrupt checkpoint falls back,
and every failure the user can fix is one line on stderr, exit status 2, no traceback, with nothing
already written changed.

A full disk and read-only storage cannot be mounted inside the test suite: those tests simulate the
OSError (or the error type the library really raises) with monkeypatch, and say so.
"""

from __future__ import annotations

import builtins
import csv
import errno
import glob
import hashlib
import io
import json
import os
import re
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from PIL import Image

from jattn import main
from jattn.cli import convert as convert_cli
from jattn.cli import data as data_cli
from jattn.cli import inspect as inspect_cli
from jattn.cli import predict as predict_cli
from jattn.cli import sweep as sweep_cli
from jattn.core import files
from jattn.core.errors import UserError
from jattn.data import breakhis, load_fold, prepare
from jattn.data.breakhis import describe, scan
from jattn.inference import runs
from jattn.training import checkpoints
from jattn.training import state as state_lib
from tests.conftest import data_config, small_tree
from tests.runs import DEMO, tiny_overrides

DC = ("BreaKHis_v1", "histology_slides", "breast", "malignant", "SOB", "ductal_carcinoma")
GREY16 = 128 * 257  # a 16-bit sample that is exactly 128 in 8 bits


def snapshot(folder) -> dict[str, str]:
  """Every file under `folder` (hidden ones too) and a hash of its bytes."""
  out = {}
  for path in glob.glob(os.path.join(str(folder), "**"), recursive=True, include_hidden=True):
    if os.path.isfile(path):
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
  return out


def one_line_error(run, capsys, prog: str, pattern: str) -> str:
  """Runs a command-line `main`, asserts exit 2 and one stderr line matching `pattern` (after
  any one-line `jattn: warning:` the run gave before it, e.g. that it trains from scratch)."""
  with pytest.raises(SystemExit) as e:
    run()
  err = "".join(line for line in capsys.readouterr().err.splitlines(keepends=True)
                if not line.startswith("jattn: warning: "))
  assert e.value.code == 2, err
  assert err.count("\n") == 1 and "Traceback" not in err, err
  assert err.startswith(f"{prog}: error: ") and re.search(pattern, err), err
  return err


def train_args(workdir, data_dir, prepared_dir, **kw) -> list[str]:
  overrides = tiny_overrides(data_dir, prepared_dir, **kw)
  return ["--config", DEMO, "--workdir", str(workdir), *[f"--config.{o}" for o in overrides]]


def copy_run(trained_run, target) -> str:
  shutil.copytree(trained_run, target)
  return str(target)


def steps_of(workdir) -> list[int]:
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


# ------------------------------------------------------------------------------------------------
# 1 and 2: linked folders and 16-bit PNGs give the right data.


def png16(values: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(values.astype(np.uint16)).save(buffer, format="PNG")  # mode I;16
  return buffer.getvalue()


@pytest.fixture(scope="module")
def linked_tree(tmp_path_factory):
  """A small tree whose ductal-carcinoma folder lives elsewhere and is linked in, and whose first
  adenosis image is a 16-bit grey PNG (constant GREY16); prepared at 16x16."""
  root = tmp_path_factory.mktemp("linked")
  data_dir = small_tree(root / "data")
  expected = len(scan.scan(data_dir).records)
  dc = os.path.join(data_dir, *DC)
  shutil.move(dc, root / "other_disk")
  os.symlink(root / "other_disk", dc)
  first = next(r for r in scan.scan(data_dir).records if r.subtype == "A")
  with open(os.path.join(data_dir, *first.path.split("/")), "wb") as f:
    f.write(png16(np.full((24, 32), GREY16)))
  fold_data = load_fold(data_config(data_dir, str(root / "prepared")))
  return data_dir, str(root / "prepared"), expected, first.file_name, fold_data


def test_a_linked_subtype_folder_is_scanned(linked_tree):
  """Bug: os.walk did not follow a linked folder, so its images (all ductal carcinoma) were left
  out without a word."""
  data_dir, _, expected, _, fold_data = linked_tree
  described = describe.describe(data_dir, check_images=False)
  assert described["images"] == expected == 64
  assert described["subtypes"]["DC"]["total"] == 8 and described["problems"] == []
  assert fold_data.num_images == 64
  assert sum(s == breakhis.SUBTYPE_CODES.index("DC") for s in fold_data.subclasses.index) == 8


def test_a_link_cycle_is_one_line(tmp_path, capsys):
  """Bug guard: following links must not loop forever on a link back to an ancestor."""
  data_dir = small_tree(tmp_path / "data")
  os.symlink(os.path.join(data_dir, *DC[:4]), os.path.join(data_dir, *DC, "loop"))
  one_line_error(lambda: data_cli.main(["describe", "--source", data_dir, "--no-image-check"]),
                 capsys, "jattn data", r"loop is a link to .*malignant.* link cycle")


def test_a_16_bit_png_is_scaled_not_saturated(linked_tree):
  """Bug: a 16-bit grey PNG (mode I;16) became all white: convert('RGB') clips at 255."""
  _, _, _, name, fold_data = linked_tree
  image = fold_data.images[fold_data.file_names.index(name)]
  assert image.shape == (16, 16, 3) and (image == 128).all()
  square = prepare.decode_resize(png16(np.array([[0, GREY16], [65535, 300]])), 2)
  assert square.tolist() == [[[0] * 3, [128] * 3], [[255] * 3, [1] * 3]]
  values = np.array([[0, 257, GREY16, 65535, 300, 65535 - 128]])
  with Image.open(io.BytesIO(png16(values))) as im:
    assert im.mode == "I;16"
    grey = np.asarray(prepare.to_rgb(im, "x"))[..., 0]
  assert grey.tolist() == [[0, 1, 128, 255, 1, 255]]  # v / 257, rounded
  for mode in ("I;16B", "I"):  # the other 16-bit forms Pillow opens
    raw = values.astype(">u2" if mode == "I;16B" else np.int32)
    im = Image.frombytes(mode, (6, 1), raw.tobytes())
    assert np.asarray(prepare.to_rgb(im, "x"))[..., 0].tolist() == grey.tolist()


def test_a_float_image_is_refused_by_name(trained_run, tmp_path, capsys):
  """Images with no 8-bit form (mode F) are refused by name, not decoded wrongly."""
  path = tmp_path / "float.tif"
  Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(path)
  one_line_error(lambda: predict_cli.main(["--workdir", trained_run, str(path)]), capsys,
                 "jattn predict", rf"{path}: a floating-point image \(mode F\)")


# ------------------------------------------------------------------------------------------------
# 3: checkpoint settings.


@pytest.mark.parametrize("override,message", [
    ("keep_checkpoints=0", r"keep_checkpoints=0: must be at least 1"),
    ("keep_checkpoints=-2", r"keep_checkpoints=-2: must be at least 1"),
    ("checkpoint_every_steps=-5", r"checkpoint_every_steps=-5: must be 0"),
])
def test_bad_checkpoint_settings_are_one_line(override, message, synthetic_tree, prepared_dir,
                                              tmp_path, capsys):
  """Bug: keep_checkpoints=0 finished with no checkpoint at all (predict had nothing to load),
  a negative one crashed in Orbax, checkpoint_every_steps=-5 acted as 5."""
  workdir = tmp_path / "w"
  args = train_args(workdir, synthetic_tree[0], prepared_dir) + [f"--config.{override}"]
  one_line_error(lambda: main.main(args), capsys, "jattn train", message)
  assert not workdir.exists()  # refused before anything is written


# ------------------------------------------------------------------------------------------------
# 4: a corrupt checkpoint.


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(
    trained_run, synthetic_tree, prepared_dir, tmp_path, capsys):
  """Bug: a latest checkpoint whose files were cut short (a storage crash, a full disk) made every
  rerun fail with hundreds of traceback lines; it must resume from the step before, and end with
  the figures of the uninterrupted run."""
  workdir = copy_run(trained_run, tmp_path / "run")
  last, previous = steps_of(workdir)[-1], steps_of(workdir)[-2]
  data = glob.glob(os.path.join(workdir, "checkpoints", str(last), "default", "ocdbt.process_0",
                                "d", "*"))
  assert data
  for path in data:
    os.truncate(path, 10)
  os.remove(os.path.join(workdir, "results.json"))
  os.remove(os.path.join(workdir, "predictions.csv"))
  main.main(train_args(workdir, synthetic_tree[0], prepared_dir))
  out, err = capsys.readouterr()
  assert f"resuming {workdir} from step {previous} of {last}" in out
  aside = os.path.join(workdir, "checkpoints.unreadable", str(last))
  assert [line for line in err.splitlines() if "warning: checkpoint" in line] == [
      f"jattn: warning: checkpoint step {last} does not load ({line_reason(err)}); using step "
      f"{previous} instead; the unreadable step is moved to {aside}"]
  for path in data:  # kept aside as they were, not deleted
    kept = os.path.join(aside, os.path.relpath(path, os.path.join(workdir, "checkpoints",
                                                                  str(last))))
    assert os.path.getsize(kept) == 10
  assert steps_of(workdir)[-1] == last  # written again by the resumed run
  with open(os.path.join(trained_run, "results.json")) as a, \
       open(os.path.join(workdir, "results.json")) as b:
    straight, resumed = json.load(a), json.load(b)
  for r in (straight, resumed):
    r["train"].pop("wall_time_this_session_s")
  assert resumed == straight
  with open(os.path.join(trained_run, "predictions.csv")) as a, \
       open(os.path.join(workdir, "predictions.csv")) as b:
    assert a.read() == b.read()


def line_reason(err: str) -> str:
  return re.search(r"does not load \((.*)\); using", err).group(1)


def test_predict_falls_back_when_the_latest_step_lost_its_items(trained_run, tmp_path, capsys):
  """Bug: a step folder without its `default` item gave Orbax's 'Must provide args of type
  Composite' traceback; predict must use the step before (a fresh manager per try: a failed
  restore leaves an Orbax manager unable to read the other steps)."""
  workdir = copy_run(trained_run, tmp_path / "run")
  last, previous = steps_of(workdir)[-1], steps_of(workdir)[-2]
  shutil.rmtree(os.path.join(workdir, "checkpoints", str(last), "default"))
  _, state = runs.restore(workdir)
  assert int(state.step) == previous
  err = capsys.readouterr().err
  assert f"checkpoint step {last} does not load (ValueError: Must provide" in err
  assert steps_of(workdir)[-1] == previous
  assert os.path.isdir(os.path.join(workdir, "checkpoints.unreadable", str(last)))


def test_after_a_truncated_newest_of_three_checkpoints_the_next_newest_is_restored(
    trained_run, tmp_path, capsys):
  """Guards against a fallback that goes to the oldest readable step instead of the newest: three
  checkpoints (steps 10, 20, 30, each with its own weights) of which 30 is cut short; the restore
  must give step 20 with the weights saved as step 20, and leave 10 and 20 in place."""
  _, state = runs.restore(trained_run)
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  shutil.copy(os.path.join(trained_run, "config.json"), workdir)
  saved = {step: jax.tree_util.tree_map(lambda x, s=step: x + s, state.params)
           for step in (10, 20, 30)}
  with checkpoints.manager(workdir, keep=3) as mngr:
    for step, params in saved.items():
      checkpoints.save(mngr, step, state.replace(step=step, params=params))
      checkpoints.wait(mngr)
  newest = glob.glob(os.path.join(workdir, "checkpoints", "30", "default", "ocdbt.process_0", "d",
                                  "*"))
  assert newest
  for path in newest:
    os.truncate(path, 10)
  _, restored = runs.restore(workdir)
  assert int(restored.step) == 20
  for got, want in zip(jax.tree_util.tree_leaves(restored.params),
                       jax.tree_util.tree_leaves(saved[20]), strict=True):
    np.testing.assert_array_equal(got, want)
  err = capsys.readouterr().err.splitlines()
  aside = os.path.join(workdir, checkpoints.UNREADABLE_SUBDIR, "30")
  assert err[0] == (f"jattn: warning: checkpoint step 30 does not load ({line_reason(err[0])}); "
                    f"using step 20 instead; the unreadable step is moved to {aside}")
  assert len(err) == 2 and "has not finished training" in err[1]  # no results.json here
  assert steps_of(workdir) == [10, 20]


def test_no_loadable_checkpoint_is_one_line_and_moves_nothing(trained_run, tmp_path, capsys):
  workdir = copy_run(trained_run, tmp_path / "run")
  for step in steps_of(workdir):
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(step), "default"))
  before = snapshot(workdir)
  image = os.path.join(workdir, "config.json")  # never read: the checkpoint is restored first
  one_line_error(lambda: predict_cli.main(["--workdir", workdir, image]), capsys, "jattn predict",
                 r"no checkpoint in .*checkpoints loads \(step \d+: ValueError")
  assert snapshot(workdir) == before


# ------------------------------------------------------------------------------------------------
# 5 and 7: a full disk and read-only storage (simulated: no real mount in a test suite).


def tensorstore_enospc():
  """What TensorStore raises under Orbax when a checkpoint write meets a full disk (seen on a
  real 2.5 MB tmpfs): a ValueError carrying the errno in its text."""
  raise ValueError('RESOURCE_EXHAUSTED: Error writing "params/0" in OCDBT database: Failed to '
                   "write 68970 bytes to file 20: No space left on device [os_error_code='28']")


@pytest.mark.parametrize("method", ["save", "wait_until_finished"])
def test_a_full_disk_while_checkpointing_is_one_line(method, trained_run, synthetic_tree,
                                                     prepared_dir, tmp_path, monkeypatch, capsys):
  """Bug: a full disk while saving a checkpoint printed ~290 traceback lines. Simulated: the
  manager's save (or, Orbax saving asynchronously, its wait) raises TensorStore's error."""
  workdir = copy_run(trained_run, tmp_path / "run")
  shutil.rmtree(os.path.join(workdir, "checkpoints", str(steps_of(workdir)[-1])))
  os.remove(os.path.join(workdir, "results.json"))
  before = snapshot(workdir)
  real_save, real_wait = ocp.CheckpointManager.save, ocp.CheckpointManager.wait_until_finished

  def save(self, *args, **kwargs):
    self.started_a_save = True
    if method == "save":
      tensorstore_enospc()
    return real_save(self, *args, **kwargs)

  def wait(self):
    real_wait(self)
    if getattr(self, "started_a_save", False):  # the save being waited for met a full disk
      tensorstore_enospc()

  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", wait)
  one_line_error(lambda: main.main(train_args(workdir, synthetic_tree[0], prepared_dir)), capsys,
                 "jattn train", rf"cannot write {workdir}/checkpoints: no space left on device "
                               r"\(errno ENOSPC\); free some space .* everything written before")
  after = snapshot(workdir)
  kept = [k for k in before if k != "metrics.jsonl"]  # the training log may grow
  assert {k: after.get(k) for k in kept} == {k: before[k] for k in kept}
  assert not os.path.exists(os.path.join(workdir, "results.json"))


def test_a_full_disk_while_preparing_is_one_line(linked_tree, tmp_path, monkeypatch, capsys):
  """Bug: a full disk while decoding the image cache was a traceback (or a SIGBUS from the memory
  map). Simulated: reserving the cache file's space raises ENOSPC, as it does on a full disk."""
  _, prepared_dir, _, _, _ = linked_tree
  prepared = shutil.copytree(prepared_dir, tmp_path / "prepared")
  before = snapshot(prepared)

  def full(fd, offset, length):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(os, "posix_fallocate", full)
  config = data_config(linked_tree[0], str(prepared), image_size=8)
  with pytest.raises(UserError, match=r"cannot write .*cache/8/images.npy: no space left"):
    load_fold(config)
  assert snapshot(prepared) == before  # no partial cache, no temporary file left


def readonly(monkeypatch, root) -> None:
  """Simulates a read-only mount at `root`: creating, opening for writing or renaming anything
  under it raises EROFS, as the kernel does."""
  root = os.path.abspath(root)

  def inside(path) -> bool:
    return os.path.abspath(os.fspath(path)).startswith(root)

  def refuse(path):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

  real_open, real_makedirs, real_replace = builtins.open, os.makedirs, os.replace

  def ro_open(path, mode="r", *args, **kwargs):
    if isinstance(path, (str, os.PathLike)) and inside(path) and set(mode) & set("wax+"):
      refuse(path)
    return real_open(path, mode, *args, **kwargs)

  def ro_makedirs(path, mode=0o777, exist_ok=False):
    if inside(path) and not (exist_ok and os.path.isdir(path)):
      refuse(path)
    return real_makedirs(path, mode, exist_ok)

  def ro_replace(src, dst, **kwargs):
    if inside(src) or inside(dst):
      refuse(dst)
    return real_replace(src, dst, **kwargs)

  monkeypatch.setattr(builtins, "open", ro_open)
  monkeypatch.setattr(os, "makedirs", ro_makedirs)
  monkeypatch.setattr(os, "replace", ro_replace)


def test_a_finished_run_on_read_only_storage_prints_its_results(
    trained_run, synthetic_tree, prepared_dir, tmp_path, monkeypatch, capsys):
  """Bug: rerunning a finished run rewrote config.json although nothing changed, so on a full or
  read-only disk it failed instead of printing its results. Read-only is simulated."""
  workdir = copy_run(trained_run, tmp_path / "run")
  before = snapshot(workdir)
  readonly(monkeypatch, workdir)
  main.main(train_args(workdir, synthetic_tree[0], prepared_dir))
  assert "has finished (results.json); not training again" in capsys.readouterr().out
  assert snapshot(workdir) == before


def test_read_only_work_dirs_and_outputs_are_one_line(trained_run, synthetic_tree, prepared_dir,
                                                      tmp_path, monkeypatch, capsys):
  """Bug: a read-only work dir, and predict --out on read-only storage, were tracebacks.
  Read-only is simulated."""
  readonly(monkeypatch, tmp_path / "ro")
  workdir = tmp_path / "ro" / "run"
  one_line_error(lambda: main.main(train_args(workdir, synthetic_tree[0], prepared_dir)), capsys,
                 "jattn train", rf"cannot write {workdir}: read-only file system \(errno EROFS\)")
  image = sorted(glob.glob(os.path.join(synthetic_tree[0], "BreaKHis_v1", "**", "*.png"),
                           recursive=True))[0]
  out = tmp_path / "ro" / "p.csv"
  one_line_error(lambda: predict_cli.main(["--workdir", trained_run, "--out", str(out), image]),
                 capsys, "jattn predict", rf"cannot write {out}: read-only file system")
  assert not os.path.exists(tmp_path / "ro")


def test_a_full_disk_for_predictions_is_one_line(trained_run, synthetic_tree, tmp_path,
                                                 monkeypatch, capsys):
  """Bug: predict --out on a full disk was a traceback. Simulated: the write raises ENOSPC."""
  real_open = builtins.open
  out = tmp_path / "p.csv"

  def full_open(path, mode="r", *args, **kwargs):
    f = real_open(path, mode, *args, **kwargs)
    if "w" in mode and str(path).startswith(str(tmp_path)):
      f.close()
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return f

  image = sorted(glob.glob(os.path.join(synthetic_tree[0], "BreaKHis_v1", "**", "*.png"),
                           recursive=True))[0]
  monkeypatch.setattr(builtins, "open", full_open)
  one_line_error(lambda: predict_cli.main(["--workdir", trained_run, "--out", str(out), image]),
                 capsys, "jattn predict", rf"cannot write {out}: no space left on device")
  assert os.listdir(tmp_path) == []  # no temporary file left behind


# ------------------------------------------------------------------------------------------------
# 6: a read-only data dir.


def test_a_read_only_data_dir_is_prepared_in_the_user_cache(tmp_path, monkeypatch, caplog):
  """Bug: a read-only data dir without --config.data.prepared_dir was `OSError: [Errno 30]`. Now the
  prepared data go under ~/.cache/jattn/prepared/<hash>, said in one log line. Read-only is
  simulated (os.access, and every write under the data dir refused)."""
  data_dir = small_tree(tmp_path / "data")
  before = snapshot(data_dir)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  real_access = os.access
  monkeypatch.setattr(os, "access", lambda p, m, **kw: False if os.path.abspath(p) == data_dir
                      and m == os.W_OK else real_access(p, m, **kw))
  readonly(monkeypatch, data_dir)
  fold_data = load_fold(data_config(data_dir))
  assert fold_data.num_images == 64
  cached = glob.glob(str(tmp_path / "cache" / "jattn" / "prepared" / "*"))
  assert len(cached) == 1 and os.path.isfile(os.path.join(cached[0], "cache", "16", "images.npy"))
  said = [r.getMessage() for r in caplog.records if "read-only" in r.getMessage()]
  assert said == [f"data_dir {data_dir} is read-only: preparing into {cached[0]} (set "
                  f"--config.data.prepared_dir to choose another folder)"]
  assert snapshot(data_dir) == before


# ------------------------------------------------------------------------------------------------
# 8: a file where a folder is expected.


def test_a_file_given_as_a_folder_is_one_line(trained_run, synthetic_tree, prepared_dir,
                                              tmp_path, capsys):
  """Bug: --workdir FILE, convert --out FILE and inspect --out FILE were FileExistsError."""
  path = tmp_path / "a_file"
  path.write_text("keep me")
  one_line_error(lambda: main.main(train_args(path, synthetic_tree[0], prepared_dir)), capsys,
                 "jattn train", rf"--workdir {path} is a file, not a folder")
  pth = tmp_path / "w.pth"
  torch.save({"x": torch.zeros(1)}, pth)
  one_line_error(lambda: convert_cli.main(["--source", "torchvision", "--arch", "vgg19", "--pth",
                                       str(pth), "--out", str(path)]),
                 capsys, "jattn convert", rf"--out {path} is a file, not a folder")
  one_line_error(lambda: inspect_cli.main(["--workdir", trained_run, "--out", str(path), str(pth)]),
                 capsys, "jattn inspect", rf"--out {path} is a file, not a folder")
  assert path.read_text() == "keep me"


# ------------------------------------------------------------------------------------------------
# 9: the archive given as data_dir.


def test_the_archive_path_stands_for_its_folder(linked_tree, capsys):
  """Bug: --config.data.dir=.../BreaKHis_v1.tar.gz was NotADirectoryError, and describe --source
  on it said the file did not exist. The archive stands for the folder that holds it."""
  data_dir, prepared_dir, _, _, fold_data = linked_tree
  archive = os.path.join(data_dir, breakhis.ARCHIVE)
  open(archive, "wb").close()  # BreaKHis_v1 is unpacked already: the archive is not read
  try:
    data_cli.main(["describe", "--source", archive, "--no-image-check", "--json"])
    assert json.loads(capsys.readouterr().out)["images"] == 64
    assert load_fold(data_config(archive, prepared_dir)).file_names == fold_data.file_names
  finally:
    os.remove(archive)
  other = os.path.join(data_dir, "Folds.csv")
  one_line_error(lambda: data_cli.main(["describe", "--source", other]), capsys,
                 "jattn data", rf"data_dir {other} is a file: set it to the folder")


# ------------------------------------------------------------------------------------------------
# 10: damaged files of the user's.


def test_a_config_file_with_a_syntax_error_is_one_line(tmp_path, capsys):
  path = tmp_path / "bad.py"
  path.write_text("def get_config(:\n  pass\n")
  one_line_error(lambda: main.main(["--config", str(path), "--workdir", str(tmp_path / "w")]),
                 capsys, "jattn train", rf"config file {path}, line 1: invalid syntax")
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("name", ["config.json", "results.json"])
def test_a_truncated_json_in_a_work_dir_is_one_line(name, trained_run, synthetic_tree,
                                                    prepared_dir, tmp_path, capsys):
  """Bug: a config.json or results.json cut short (a crash of the storage) was a JSONDecodeError
  traceback, in the main job and in predict."""
  workdir = copy_run(trained_run, tmp_path / "run")
  path = os.path.join(workdir, name)
  with open(path, "r+") as f:
    f.truncate(40)
  before = snapshot(workdir)
  one_line_error(lambda: main.main(train_args(workdir, synthetic_tree[0], prepared_dir)), capsys,
                 "jattn train", rf"{path} is not valid JSON \(truncated or damaged")
  if name == "config.json":
    one_line_error(lambda: predict_cli.main(["--workdir", workdir, path]), capsys, "jattn predict",
                   rf"{path} is not valid JSON")
  assert snapshot(workdir) == before


def test_convert_refuses_text_and_code_carrying_pickles_in_one_line(tmp_path, capsys):
  """Bugs: a text file given as --pth was `KeyError: 101`; a pickle that carries code was refused
  with PyTorch's advice to load it with weights_only=False, which would run that code."""
  text = tmp_path / "notes.pth"
  text.write_text("hello world\n")
  args = ["--source", "torchvision", "--arch", "vgg19", "--out", str(tmp_path / "out")]
  one_line_error(lambda: convert_cli.main([*args, "--pth", str(text)]), capsys, "jattn convert",
                 rf"{text}: not a readable PyTorch checkpoint \(KeyError")

  class Payload:
    def __reduce__(self):
      return (os.system, ("echo pwned",))

  evil = tmp_path / "evil.pth"
  torch.save({"x": Payload()}, evil)
  err = one_line_error(lambda: convert_cli.main([*args, "--pth", str(evil)]), capsys,
                       "jattn convert",
                       rf"{evil}: refused, because unpickling it would run code \(it calls "
                       r"\w+\.system\).*convert only checkpoints from a trusted source")
  assert "weights_only" not in err
  assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# Smaller.


def test_leftovers_of_a_killed_preparation_are_removed(linked_tree, tmp_path):
  """Bug: a kill during preparation left `.images.npy.tmp-*` (16 MB in the issue) and TFDS
  `incomplete.*` folders forever. They are created here as the kill leaves them."""
  data_dir, prepared_dir, _, _, _ = linked_tree
  prepared = shutil.copytree(prepared_dir, tmp_path / "prepared")
  before = snapshot(prepared)
  stale = [os.path.join(prepared, "cache", "16", ".images.npy.tmp-123-0a1b2c3d"),
           os.path.join(prepared, "tfds", "breakhis", "incomplete.AB12CD_1.0.0", "x.array_record"),
           os.path.join(prepared, "stats", ".fold.json.tmp-5-ffff0000")]
  for path in stale:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(b"\0" * 1000)
  load_fold(data_config(data_dir, str(prepared)))
  assert snapshot(prepared) == before
  assert not os.path.exists(os.path.dirname(stale[1]))


def test_an_empty_or_unknown_image_is_named_once(trained_run, tmp_path, capsys):
  """Bugs: a zero-byte PNG's path was printed twice in one line; predict and inspect named
  `<_io.BytesIO object at 0x...>` instead of the file."""
  empty = tmp_path / "SOB_B_A-14-22549AB-40-001.png"
  empty.write_bytes(b"")
  assert scan.check_image(str(empty)) == "an empty file"
  text = tmp_path / "notes.png"
  text.write_text("not an image")
  assert str(text) not in scan.check_image(str(text))
  for path in (empty, text):
    err = one_line_error(lambda p=path: predict_cli.main(["--workdir", trained_run, str(p)]),
                         capsys, "jattn predict", rf"{path}: cannot decode it")
    assert err.count(str(path)) == 1 and "BytesIO" not in err
    err = one_line_error(
        lambda p=path: inspect_cli.main(["--workdir", trained_run, "--out", str(tmp_path / "o"),
                                     str(p)]), capsys, "jattn inspect", rf"{path}: cannot decode")
    assert "BytesIO" not in err


def test_sweep_checks_folds_and_results_before_saying_all_is_well(tmp_path, capsys):
  """Bugs: `--folds 7` created fold7/ before refusing it; a corrupt results.json was reported
  after 'all 1 runs finished'."""
  out = tmp_path / "sweep"
  one_line_error(lambda: sweep_cli.main(["--configs", "configs/demo.py:ours", "--folds", "7",
                                     "--out", str(out)]), capsys, "jattn sweep",
                 r"--folds 7: configs/demo.py:ours.s folds are numbered 1 to 5")
  assert not out.exists()
  results = out / "demo_ours" / "fold1" / "results.json"
  results.parent.mkdir(parents=True)
  results.write_text('{"schema": "jattn.res')
  with pytest.raises(SystemExit) as e:
    sweep_cli.main(["--configs", "configs/demo.py:ours", "--folds", "1", "--out", str(out)])
  printed = capsys.readouterr()
  assert e.value.code == 2 and "all 1 runs finished" not in printed.out
  assert re.search(rf"jattn sweep: error: {results} is not valid JSON", printed.err), printed.err


def test_a_second_run_on_the_same_work_dir_is_refused(trained_run, synthetic_tree, prepared_dir,
                                                      tmp_path, capsys):
  """Bug: two runs started on one work dir both trained in full. The first holds the work dir's
  lock for its whole run (held here by this test); the second is refused in one line."""
  workdir = copy_run(trained_run, tmp_path / "run")
  os.remove(os.path.join(workdir, "results.json"))
  before = snapshot(workdir)
  with files.locked_or_refuse(workdir):
    one_line_error(lambda: main.main(train_args(workdir, synthetic_tree[0], prepared_dir)),
                   capsys, "jattn train", rf"--workdir {workdir} is in use by another process")
  assert snapshot(workdir) == before


def test_checkpoints_module_restores_the_newest_step(trained_run):
  """restore_latest with every step intact gives the last one and moves nothing."""
  config = runs.load_config(trained_run)
  with checkpoints.manager(trained_run, create=False) as mngr:
    state = checkpoints.restore_latest(mngr, state_lib.abstract_state(config))
  assert int(state.step) == steps_of(trained_run)[-1]
  assert not os.path.exists(os.path.join(trained_run, checkpoints.UNREADABLE_SUBDIR))
  with open(os.path.join(trained_run, "predictions.csv")) as f:
    assert len(list(csv.DictReader(f))) > 0
