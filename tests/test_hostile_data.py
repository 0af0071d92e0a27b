"""Hostile data, downloads and preparation: synthetic data never lands beside a user's
files, a fake archive is refused before it is kept or vouched for, a cache too large for the disk
is refused before it is started, a preparation whose worker dies says so and reruns, and the
messages of a redirect loop, of TFDS and of `describe` say what is true.

Every failure is one line on stderr, exit status 2, no traceback, with nothing already written
changed. A dying worker cannot be produced reliably without exhausting the test machine's memory:
that test raises the errors a dead worker gives its parent (a real EOFError from a multiprocessing
pipe whose other end is gone, BrokenProcessPool, MemoryError) inside the preparation's workers.
"""

from __future__ import annotations

import concurrent.futures.process
import csv
import gzip
import hashlib
import http.server
import io
import json
import multiprocessing
import os
import re
import shutil
import tarfile
import threading

import numpy as np
import pytest
from PIL import Image

from jattn import main
from jattn.cli import data as data_cli
from jattn.core.errors import UserError
from jattn.data import breakhis, load_fold, prepare
from jattn.data.breakhis import fetch, scan, synthetic
from tests.conftest import SMALL_PATIENTS, data_config, small_tree
from tests.runs import DEMO, tiny_overrides
from tests.test_hostile import snapshot


def one_line(run, capsys, prog: str, pattern: str) -> tuple[str, str]:
  """Runs a command-line `main`; asserts exit 2 and one stderr line matching `pattern` (after the
  progress bars that were drawing, if any); returns stdout and that line."""
  with pytest.raises(SystemExit) as e:
    run()
  out, err = capsys.readouterr()
  assert e.value.code == 2, err
  lines = [line for line in err.split("\n") if line.strip()]  # progress bars may come first
  assert "Traceback" not in err and [line for line in lines if "error:" in line] == lines[-1:], err
  assert lines[-1].startswith(f"{prog}: error: ") and re.search(pattern, lines[-1]), err
  return out, lines[-1]


def listing(folder) -> set[str]:
  """Every path under `folder`, folders (empty ones too) and hidden files included."""
  return {os.path.relpath(os.path.join(root, n), folder)
          for root, dirs, names in os.walk(folder) for n in [*dirs, *names]}


def png_files(data_dir: str) -> list[str]:
  """The images of a tree's BreaKHis_v1/, found by walking it (not by jattn's scan)."""
  root_dir = os.path.join(data_dir, "BreaKHis_v1")
  return sorted(os.path.join(root, n) for root, _, names in os.walk(root_dir)
                for n in names if n.endswith(".png") and not n.startswith("."))


# ------------------------------------------------------------------------------------------------
# Item 1: the demo config generates synthetic data only into its own folder or an empty one.


def test_demo_refuses_to_fill_a_folder_that_holds_other_files(tmp_path, capsys):
  """Guards a user's folder: `--config demo.py --config.data.dir=MY_PATCHES` is one line, exit 2,
  and MY_PATCHES is left byte for byte as it was (no BreaKHis_v1, Folds.csv, mkfold/,
  jattn_prepared/ or lock added)."""
  patches = tmp_path / "MY_PATCHES"
  (patches / "colon").mkdir(parents=True)
  (patches / "colon" / "tile_001.png").write_bytes(b"\x89PNG not really")
  (patches / "notes.txt").write_text("my own tiles\n")
  (patches / "empty_folder").mkdir()
  before, paths = snapshot(patches), listing(patches)
  one_line(lambda: main.main(["--config", DEMO, "--workdir", str(tmp_path / "run"),
                              f"--config.data.dir={patches}"]), capsys, "jattn train",
           rf"data_dir {re.escape(str(patches))} holds no BreaKHis_v1 but other files \(3 entries, "
           r"e\.g\. colon\): a synthetic data set is generated only into ~/\.cache/jattn/demo or a "
           r"new or empty folder.*set --config\.data\.dir to such a folder")
  assert snapshot(patches) == before and listing(patches) == paths


def test_synthetic_targets_the_demo_folder_and_folders_jattn_left(tmp_path, monkeypatch):
  """Guards what stays allowed: the demo's own ~/.cache/jattn/demo whatever it holds, an absent
  folder, and one holding only what an interrupted run of jattn left (locks, a synthesis' or a
  preparation's temporaries); a prepared dir holding real files is someone's data."""
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  demo = tmp_path / "home" / ".cache" / "jattn" / "demo"
  demo.mkdir(parents=True)
  (demo / "something.txt").write_text("x")
  synthetic.check_target(str(demo), str(demo / "jattn_prepared"))
  synthetic.check_target(str(tmp_path / "new"), str(tmp_path / "new" / "jattn_prepared"))
  left = tmp_path / "left"
  (left / "jattn_prepared" / "tfds" / "incomplete.AB12_1.0.0").mkdir(parents=True)
  (left / "jattn_prepared" / ".lock").write_text("")
  (left / ".BreaKHis_v1.synthesizing-x1y2" / "BreaKHis_v1").mkdir(parents=True)
  (left / ".lock").write_text("")
  synthetic.check_target(str(left), str(left / "jattn_prepared"))
  (left / "jattn_prepared" / "tfds" / "dataset_info.json").write_text("{}")
  with pytest.raises(UserError, match=r"holds no BreaKHis_v1 but other files \(1 entries, e\.g\. "
                     r"jattn_prepared\)"):
    synthetic.check_target(str(left), str(left / "jattn_prepared"))


# ------------------------------------------------------------------------------------------------
# Item 2 and the redirect loop: downloads from a local HTTP server.


class _Handler(http.server.BaseHTTPRequestHandler):
  """Serves `server.files` (path -> bytes); `server.redirects[path]` answers 302 to a location."""

  def do_GET(self):  # noqa: N802 -- http.server's name
    if self.path in self.server.redirects:
      self.send_response(302)
      self.send_header("Location", self.server.redirects[self.path])
      self.send_header("Content-Length", "0")
      self.end_headers()
      return
    body = self.server.files.get(self.path)
    if body is None:
      self.send_error(404)
      return
    self.send_response(200)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, *args):
    pass


@pytest.fixture
def server(monkeypatch):
  monkeypatch.setenv("NO_PROXY", "127.0.0.1")
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  httpd.files, httpd.redirects = {}, {}
  thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
  thread.start()
  yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
  httpd.shutdown()
  httpd.server_close()


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  """A 16-patient tree (64 images, no junk, no folds files)."""
  return small_tree(tmp_path_factory.mktemp("tree"), junk=False, folds_csv=False, mkfold=False)


def tar_gz(add, mtime: int = 0) -> bytes:
  """A .tar.gz made by `add(tar)`; `mtime` changes the gzip header, so the bytes, not the tree."""
  raw = io.BytesIO()
  with tarfile.open(fileobj=raw, mode="w") as tar:
    add(tar)
  return gzip.compress(raw.getvalue(), mtime=mtime)


def _file(tar, name: str, data: bytes = b"x") -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _link(tar, name: str, target: str, kind=tarfile.SYMTYPE) -> None:
  info = tarfile.TarInfo(name)
  info.type, info.linkname = kind, target
  tar.addfile(info)


@pytest.fixture(scope="module")
def genuine(tree):
  """BreaKHis_v1.tar.gz of the module's tree."""
  return tar_gz(lambda tar: tar.add(os.path.join(tree, breakhis.ROOT), arcname=breakhis.ROOT))


BREAST = breakhis.SLIDES
PNG = f"{BREAST}/benign/SOB/adenosis/SOB_B_A_14-22549AB/40X/SOB_B_A-14-22549AB-40-001.png"
FAKES = {  # what each fake archive holds besides (or instead of) BreakHis' layout
    "no-breast-folder": lambda tar, real: _file(tar, f"{breakhis.ROOT}/histology_slides/x.png"),
    "no-image": lambda tar, real: _file(tar, f"{BREAST}/benign/readme.txt"),
    "absolute-member": lambda tar, real: (real(tar), _file(tar, "/" + PNG)),
    "dotdot-member": lambda tar, real: (real(tar), _file(tar, f"{breakhis.ROOT}/../../evil.txt")),
    "root-is-a-symlink": lambda tar, real: (_file(tar, "sub/histology_slides/breast/a.png"),
                                            _link(tar, breakhis.ROOT, "sub")),
    "symlink-escapes": lambda tar, real: (real(tar), _link(tar, f"{BREAST}/up", "../../../..")),
    "hardlink-escapes": lambda tar, real: (_file(tar, "outside.txt"), real(tar),
                                           _link(tar, f"{BREAST}/h.png", "outside.txt",
                                                 tarfile.LNKTYPE)),
    "too-many-members": lambda tar, real: [_file(tar, f"{BREAST}/{i:06d}.png", b"")
                                           for i in range(201)],
}
REFUSED = {
    "no-breast-folder": r"it holds no BreaKHis_v1/histology_slides/breast/ folder",
    "no-image": r"it holds no PNG image under BreaKHis_v1/histology_slides/breast/",
    "absolute-member": r"member '/BreaKHis_v1/.*' has an absolute path",
    "dotdot-member": r"member 'BreaKHis_v1/\.\./\.\./evil\.txt' climbs out with '\.\.'",
    "root-is-a-symlink": r"member BreaKHis_v1 is a link, not the folder of BreakHis' images",
    "symlink-escapes": r"link BreaKHis_v1/histology_slides/breast/up -> \.\./\.\./\.\./\.\. points "
                       r"out of BreaKHis_v1",
    "hardlink-escapes": r"link .*/h\.png -> outside\.txt points out of BreaKHis_v1",
    "too-many-members": r"it holds more than 200 members; BreakHis' has about 8,300",
}


@pytest.mark.parametrize("kind", sorted(FAKES))
def test_a_fake_archive_is_refused_unrecorded_and_the_genuine_one_then_downloads(
    server, tree, genuine, tmp_path, capsys, monkeypatch, kind):
  """Guards against vouching for a fake: each fake archive is refused in one line before anything
  is unpacked into place or recorded (the data dir as it was, but for its lock), so the genuine
  archive served next at the same URL downloads, unpacks byte for byte and is the one recorded.
  The member cap is lowered to 200 here (the genuine archive has 159 members); its default of
  20,000 is checked against BreakHis' real count."""
  assert scan.MAX_ARCHIVE_MEMBERS >= 2 * (breakhis.NUM_IMAGES + 82 * 5)
  monkeypatch.setattr(scan, "MAX_ARCHIVE_MEMBERS", 200)
  real = lambda tar: tar.add(os.path.join(tree, breakhis.ROOT), arcname=breakhis.ROOT)  # noqa: E731
  httpd, url = server
  httpd.files["/BreaKHis_v1.tar.gz"] = tar_gz(lambda tar: FAKES[kind](tar, real))
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  (data_dir / "notes.txt").write_text("kept\n")
  before = snapshot(data_dir)
  args = ["download", "--data-dir", str(data_dir), "--url", url + "/BreaKHis_v1.tar.gz",
          "--no-image-check"]
  one_line(lambda: data_cli.main(args), capsys, "jattn data",
           rf"BreaKHis_v1\.tar\.gz is not the BreakHis archive \({REFUSED[kind]}\): nothing was "
           rf"unpacked; download it again from {re.escape(breakhis.ARCHIVE_URL)}")
  assert sorted(os.listdir(data_dir)) == [".lock", "notes.txt"]
  assert {k: v for k, v in snapshot(data_dir).items() if k != ".lock"} == before
  assert not os.path.exists(tmp_path / "evil.txt")

  httpd.files["/BreaKHis_v1.tar.gz"] = genuine
  data_cli.main(args)
  assert f"BreakHis at {data_dir}: 64 images of 16 patients" in capsys.readouterr().out
  got = snapshot(data_dir / breakhis.ROOT)
  assert got == snapshot(os.path.join(tree, breakhis.ROOT)) and len(got) == 64
  recorded = json.loads((data_dir / fetch.CHECKSUMS).read_text())[breakhis.ARCHIVE]
  assert recorded["sha256"] == hashlib.sha256(genuine).hexdigest()


def test_a_checksum_mismatch_names_downloads_json_and_forget_checksum_forgets_it(
    server, tree, genuine, tmp_path, capsys):
  """Guards the way out of a recorded checksum: a different archive is refused in one line that
  names downloads.json and `--forget-checksum`, changing nothing; with `--forget-checksum` it
  downloads, unpacks and becomes the recorded one."""
  httpd, url = server
  url += "/BreaKHis_v1.tar.gz"
  data_dir = tmp_path / "data"
  args = ["download", "--data-dir", str(data_dir), "--url", url, "--no-image-check"]
  httpd.files["/BreaKHis_v1.tar.gz"] = genuine
  data_cli.main(args)
  shutil.rmtree(data_dir / breakhis.ROOT)
  other = tar_gz(lambda tar: tar.add(os.path.join(tree, breakhis.ROOT), arcname=breakhis.ROOT),
                 mtime=12345)
  assert other != genuine
  httpd.files["/BreaKHis_v1.tar.gz"] = other
  capsys.readouterr()
  before = snapshot(data_dir)
  checksums = re.escape(str(data_dir / fetch.CHECKSUMS))
  one_line(lambda: data_cli.main(args), capsys, "jattn data",
           rf"checksum mismatch \(SHA-256 {hashlib.sha256(other).hexdigest()[:16]}\.\.\., expected "
           rf"{hashlib.sha256(genuine).hexdigest()}\); the file was discarded\. The expected "
           rf"SHA-256 is that of the first download into .*, recorded in {checksums}; .*`jattn "
           rf"data "
           rf"download --data-dir {re.escape(str(data_dir))} --forget-checksum`")
  assert snapshot(data_dir) == before

  data_cli.main([*args, "--forget-checksum"])
  out = capsys.readouterr().out
  assert f"forgot the SHA-256 {hashlib.sha256(genuine).hexdigest()[:16]}..." in out
  assert f"BreakHis at {data_dir}: 64 images of 16 patients" in out
  recorded = json.loads((data_dir / fetch.CHECKSUMS).read_text())[breakhis.ARCHIVE]
  assert recorded["sha256"] == hashlib.sha256(other).hexdigest()


def test_a_redirect_loop_is_named_as_such(server, tmp_path, capsys):
  """Guards the message: a server that redirects to itself is a misconfigured mirror, not an
  offline machine; nothing is left in the data dir but its lock."""
  httpd, url = server
  httpd.redirects["/loop"] = url + "/loop"
  args = ["download", "--data-dir", str(tmp_path), "--url", url + "/loop"]
  _, err = one_line(lambda: data_cli.main(args), capsys, "jattn data",
                    rf"too many redirects from {re.escape(url)}/loop \(more than 30, a redirect "
                    r"loop\): that server or mirror is misconfigured, the network is fine; use "
                    r"another URL, or download http")
  assert "offline" not in err and os.listdir(tmp_path) == [".lock"]


# ------------------------------------------------------------------------------------------------
# Item 7: a decoded-image cache larger than the disk is refused before anything is written.


def test_an_image_size_too_large_for_the_disk_is_refused_before_writing(
    synthetic_tree, prepared_dir, fold_data, tmp_path, capsys):
  """Guards the disk: --config.image_size=1000000 would need about 1 PB of cache for the session
  tree. The real free space of the prepared dir's file system is compared (no monkeypatch): one
  line with the bytes needed and free, and the data dir and the shared prepared dir unchanged."""
  data_dir = synthetic_tree[0]
  before = {d: (snapshot(d), listing(d)) for d in (data_dir, prepared_dir)}
  n, size = len(png_files(data_dir)), 1_000_000
  needed = n * size * size * 3
  assert needed > 100 * shutil.disk_usage(prepared_dir).free
  args = ["--config", DEMO, "--workdir", str(tmp_path / "run"),
          *[f"--config.{o}" for o in tiny_overrides(data_dir, prepared_dir, image_size=size)]]
  one_line(lambda: main.main(args), capsys, "jattn train",
           rf"--config\.image_size=1000000 needs a decoded-image cache of "
           rf"{needed / 2**30:,.1f} GiB \({n} images x 1000000 x 1000000 x 3 bytes\) in "
           rf"{re.escape(os.path.join(prepared_dir, 'cache', '1000000'))}, but its file system has "
           r"[\d,.]+ [GM]iB free: set --config\.image_size lower")
  assert {d: (snapshot(d), listing(d)) for d in (data_dir, prepared_dir)} == before


# ------------------------------------------------------------------------------------------------
# Item 11: a worker of the preparation that dies is one line, and the rerun just works.


def _eof_from_a_dead_pipe(*args, **kwargs):
  reader, writer = multiprocessing.Pipe(duplex=False)
  writer.close()  # the worker at the other end is gone
  reader.recv_bytes()  # raises EOFError inside multiprocessing/connection.py


def _broken_pool(*args, **kwargs):
  raise concurrent.futures.process.BrokenProcessPool(
      "A process in the process pool was terminated abruptly while the future was running or "
      "pending.")


def _out_of_memory(*args, **kwargs):
  raise MemoryError


DIED = ("a worker of the preparation", "died")
WORKERS = {  # (module, worker function, its replacement, the error named, what is said of it)
    "pipe-eof-while-decoding": (prepare, "decode_resize", _eof_from_a_dead_pipe, "EOFError", DIED),
    "broken-pool-while-checking": (scan, "check_image", _broken_pool, "BrokenProcessPool: A "
                                   "process in the process pool was terminated abruptly", DIED),
    "memory-error-while-decoding": (prepare, "decode_resize", _out_of_memory, "MemoryError",
                                    ("the preparation", "ran out of memory")),
}


@pytest.mark.parametrize("case", sorted(WORKERS))
def test_a_worker_that_dies_is_one_line_and_the_rerun_prepares(
    tree, tmp_path, capsys, monkeypatch, case):
  """Guards a preparation under memory pressure: a dead worker (while TFDS checks the images or
  while the cache is decoded) is one line naming it and what preparation needs in memory (at least
  the PNGs, which TFDS' shuffle buffer holds here); the data dir is unchanged and the same
  preparation run again completes, with the images decoded as PIL decodes them. Also guards the
  log line that replaces TFDS' "Downloading and preparing dataset Unknown size"."""
  module, name, replacement, named, (lead, verb) = WORKERS[case]
  prepared = str(tmp_path / "prepared")
  before = snapshot(tree)
  args = ["--config", DEMO, "--workdir", str(tmp_path / "run"),
          *[f"--config.{o}" for o in tiny_overrides(tree, prepared)]]
  with monkeypatch.context() as m:
    m.setattr(module, name, replacement)
    out, err = one_line(lambda: main.main(args), capsys, "jattn train",
                        rf"{re.escape(lead)} of {re.escape(tree)} into {re.escape(prepared)} "
                        rf"{re.escape(verb)} \({re.escape(named)}.*\)(, most likely for lack of "
                        r"memory)?: preparing 64 images \([\d.]+ MiB of PNGs\) at 32x32 with "
                        r"2 thread\(s\) needs about [\d.]+ MiB of memory besides the process "
                        r"itself; .*run the same command again")
  assert f"preparing 64 images from {tree} into {prepared}" in out
  assert "Downloading and preparing dataset" not in out and "Unknown size" not in out
  need = float(re.search(r"needs about ([\d.]+) MiB", err).group(1)) * 2**20
  assert need >= sum(os.path.getsize(p) for p in png_files(tree))
  assert snapshot(tree) == before

  fold = load_fold(data_config(tree, prepared, image_size=32))
  assert fold.num_images == 64
  assert not [p for p in listing(prepared) if "incomplete." in p or ".tmp-" in p]
  path = png_files(tree)[0]
  with Image.open(path) as im:
    expected = im.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)
  np.testing.assert_array_equal(fold.images[fold.file_names.index(os.path.basename(path))],
                                np.asarray(expected))


# ------------------------------------------------------------------------------------------------
# describe: how a copy differs from the full BreakHis.


def test_describe_says_how_the_copy_differs_from_the_full_release(tree, capsys):
  """Guards the comparison with the release: the 16-patient tree is 64 of 7,909 images and 16 of
  82 patients, the missing ones being the release's others (read from the package's patient list
  here, not from jattn), in the text and under `release` in --json."""
  with open(os.path.join(os.path.dirname(breakhis.__file__), "patients.tsv")) as f:
    release = [row["patient_id"] for row in csv.DictReader(f, delimiter="\t")]
  missing = [p for p in release if p not in SMALL_PATIENTS]
  n = len(png_files(tree))
  data_cli.main(["describe", "--source", tree, "--no-image-check"])
  out = capsys.readouterr().out.splitlines()
  assert out[1] == (f"not the full BreakHis release: {n} of 7,909 images, 16 of {len(release)} "
                    f"patients ({len(missing)} missing: {', '.join(missing[:3])} and "
                    f"{len(missing) - 3} more)")
  data_cli.main(["describe", "--source", tree, "--no-image-check", "--json"])
  d = json.loads(capsys.readouterr().out)["release"]
  assert (d["images"], d["of_images"], d["patients"], d["of_patients"]) == (n, 7909, 16, 82)
  assert d["missing_patients"] == missing and d["other_patients"] == [] and not d["complete"]
  assert d["differing"]["DC"]["40X"] == [2, 864]  # 2 DC patients, 1 image each at 40X
