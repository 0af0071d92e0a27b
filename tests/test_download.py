"""Downloads of BreakHis and torchvision weights from a local HTTP server (no internet needed)."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import sys
import tarfile
import threading
from collections import namedtuple

import numpy as np
import pytest

from jattn.cli import convert as convert_cli
from jattn.cli import data as data_cli
from jattn.core import download
from jattn.core.errors import UserError
from jattn.data import breakhis
from jattn.data.breakhis import fetch
from jattn.models import weights as convert
from tests.conftest import data_config, small_tree


class _Handler(http.server.BaseHTTPRequestHandler):
  """Serves `server.files` with HTTP Range (206) support (unless `server.ranges[0]` is False);
  `server.cut[path] = n` sends only the first n bytes of the next response to `path` (with the
  full Content-Length), then hangs up."""

  def do_GET(self):  # noqa: N802 -- http.server's name
    server = self.server
    asked = self.headers.get("Range")
    server.log.append((self.path, asked))
    body = server.files.get(self.path)
    if body is None:
      self.send_error(404)
      return
    asked = asked if server.ranges[0] else None
    start = int(asked.removeprefix("bytes=").split("-")[0]) if asked else 0
    if start >= len(body):
      self.send_response(416)
      self.send_header("Content-Range", f"bytes */{len(body)}")
      self.send_header("Content-Length", "0")
      self.end_headers()
      return
    self.send_response(206 if asked else 200)
    if asked:
      self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
    self.send_header("Content-Length", str(len(body) - start))
    self.end_headers()
    data = body[start:]
    cut = server.cut.pop(self.path, None)
    self.wfile.write(data if cut is None else data[:cut])
    self.wfile.flush()
    self.close_connection = True

  def log_message(self, *args):
    pass


Server = namedtuple("Server", "url files cut log ranges")


@pytest.fixture
def server(monkeypatch):
  monkeypatch.setenv("NO_PROXY", "127.0.0.1")
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  httpd.files, httpd.cut, httpd.log, httpd.ranges = {}, {}, [], [True]
  thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
  thread.start()
  yield Server(f"http://127.0.0.1:{httpd.server_address[1]}", httpd.files, httpd.cut, httpd.log,
               httpd.ranges)
  httpd.shutdown()
  httpd.server_close()


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
  """(bytes of a BreaKHis_v1.tar.gz holding a 16-patient synthetic tree, the tree's folder)."""
  tree = small_tree(tmp_path_factory.mktemp("tree"), junk=False, folds_csv=False, mkfold=False)
  path = os.path.join(str(tmp_path_factory.mktemp("archive")), breakhis.ARCHIVE)
  with tarfile.open(path, "w:gz") as tar:
    tar.add(os.path.join(tree, breakhis.ROOT), arcname=breakhis.ROOT)
  with open(path, "rb") as f:
    return f.read(), tree


def _listing(folder: str) -> dict[str, bytes]:
  out = {}
  for root, _, names in os.walk(folder):
    for name in names:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        out[os.path.relpath(full, folder)] = f.read()
  return out


def _serve_archive(server, archive) -> str:
  server.files["/BreaKHis_v1.tar.gz"] = archive[0]
  return server.url + "/BreaKHis_v1.tar.gz"


def test_download_unpacks_records_checksum_describes_and_never_overwrites(
    server, archive, tmp_path, capsys):
  """Guards the whole command: the tree unpacked byte for byte where config.data.dir expects it,
  the SHA-256 recorded, the archive and .part gone, `describe` run, and a second run that
  downloads nothing."""
  url = _serve_archive(server, archive)
  data_dir = str(tmp_path / "data")
  data_cli.main(["download", "--data-dir", data_dir, "--url", url, "--no-image-check"])
  out = capsys.readouterr().out
  assert f"BreakHis at {data_dir}: 64 images of 16 patients" in out
  root = os.path.join(data_dir, breakhis.ROOT)
  assert _listing(root) == _listing(os.path.join(archive[1], breakhis.ROOT))
  with open(os.path.join(data_dir, fetch.CHECKSUMS)) as f:
    entry = json.load(f)[breakhis.ARCHIVE]
  assert entry["sha256"] == hashlib.sha256(archive[0]).hexdigest()
  assert entry["bytes"] == len(archive[0]) and entry["url"] == url
  assert sorted(os.listdir(data_dir)) == [".lock", breakhis.ROOT, fetch.CHECKSUMS]

  requests_before = len(server.log)
  data_cli.main(["download", "--data-dir", data_dir, "--url", url, "--no-image-check"])
  assert "already holds BreaKHis_v1: nothing downloaded" in capsys.readouterr().out
  assert len(server.log) == requests_before


@pytest.mark.parametrize("ranges", [True, False], ids=["range", "server-ignores-range"])
def test_cut_connection_keeps_the_part_and_the_next_run_resumes(server, archive, tmp_path,
                                                                ranges):
  """Guards resume: a cut download is never unpacked, and the next run asks only for the
  missing bytes (HTTP Range) and ends with the same file as an uncut download, also when the
  server answers a Range request with the whole file."""
  server.ranges[0] = ranges
  url = _serve_archive(server, archive)
  data_dir = str(tmp_path)
  cut = len(archive[0]) // 3
  server.cut["/BreaKHis_v1.tar.gz"] = cut
  with pytest.raises(UserError, match=rf"was cut at {cut:,} of {len(archive[0]):,} bytes.*run "
                     r"the same command again to resume"):
    fetch.ensure_breakhis(data_dir, url=url, keep_archive=True)
  part = download.part_path(os.path.join(data_dir, breakhis.ARCHIVE))
  assert os.path.getsize(part) == cut
  assert sorted(os.listdir(data_dir)) == [".lock", os.path.basename(part)]  # nothing unpacked

  assert fetch.ensure_breakhis(data_dir, url=url, keep_archive=True) == "downloaded"
  assert server.log[-1] == ("/BreaKHis_v1.tar.gz", f"bytes={cut}-")  # what the client asked
  with open(os.path.join(data_dir, breakhis.ARCHIVE), "rb") as f:
    assert f.read() == archive[0]
  assert not os.path.exists(part)
  assert os.path.isdir(os.path.join(data_dir, breakhis.ROOT, "histology_slides"))


def test_checksum_mismatch_is_refused_and_leaves_nothing(server, archive, tmp_path):
  """Guards verification: an archive that differs from the recorded SHA-256 is deleted, never
  unpacked, and the record is not overwritten."""
  url = _serve_archive(server, archive)
  record = {breakhis.ARCHIVE: {"url": url, "bytes": 1, "sha256": "ab" * 32, "recorded": "x"}}
  (tmp_path / fetch.CHECKSUMS).write_text(json.dumps(record))
  with pytest.raises(UserError, match=r"checksum mismatch .*expected abab.*the file was "
                     r"discarded.*download http://www.inf.ufpr.br/vri/databases/BreaKHis_v1"):
    fetch.ensure_breakhis(str(tmp_path), url=url)
  assert sorted(os.listdir(tmp_path)) == [".lock", fetch.CHECKSUMS]
  assert json.loads((tmp_path / fetch.CHECKSUMS).read_text()) == record


def test_a_resumed_download_is_checked_against_the_sha256(server, tmp_path):
  """Guards against skipping the SHA-256 check after a resume: a server that serves other bytes
  on the Range request (the file changed, a corrupt mirror) gives a .part whose digest is not the
  known one; it is discarded, never renamed into place. A faithful resume gives the known file."""
  good = np.random.default_rng(0).bytes(50_000)
  known = hashlib.sha256(good).hexdigest()
  dest = str(tmp_path / "file.bin")
  for resumed_with, ok in ((bytes(50_000), False), (good, True)):
    server.files["/file.bin"] = good
    server.cut["/file.bin"] = 20_000
    with pytest.raises(UserError, match="was cut at 20,000 of 50,000 bytes"):
      download.fetch(server.url + "/file.bin", dest, sha256=known, hint="get it by hand")
    server.files["/file.bin"] = resumed_with
    if not ok:
      with pytest.raises(UserError, match=rf"checksum mismatch \(SHA-256 [0-9a-f]{{16}}\.\.\., "
                         rf"expected {known}\); the file was discarded"):
        download.fetch(server.url + "/file.bin", dest, sha256=known, hint="get it by hand")
      assert os.listdir(tmp_path) == []
      continue
    assert download.fetch(server.url + "/file.bin", dest, sha256=known, hint="x") == known
    assert server.log[-1] == ("/file.bin", "bytes=20000-")  # it was a resume
    with open(dest, "rb") as f:
      assert f.read() == good
  assert os.listdir(tmp_path) == ["file.bin"]


def test_a_download_that_does_not_unpack_is_not_kept(server, tmp_path):
  """Guards against keeping (and vouching for) a broken or foreign archive: it is deleted with
  its checksum record, so the next run downloads afresh instead of failing on it again."""
  server.files["/BreaKHis_v1.tar.gz"] = b"<html>moved</html>"
  with pytest.raises(UserError, match="cannot unpack .*BreaKHis_v1.tar.gz"):
    fetch.ensure_breakhis(str(tmp_path), url=server.url + "/BreaKHis_v1.tar.gz")
  assert sorted(os.listdir(tmp_path)) == [".lock"]


def test_failures_are_one_line_naming_what_to_download_by_hand(server, tmp_path, monkeypatch):
  """Guards the messages for a 404, no network and a full disk: each says what failed and what
  to download by hand into which folder, and leaves no file behind."""
  hint = f"download {breakhis.ARCHIVE_URL} (linked from {breakhis.DOWNLOAD_URL}) and unpack it " \
         f"into {tmp_path}"
  with pytest.raises(UserError, match="answered HTTP 404") as e:
    fetch.ensure_breakhis(str(tmp_path), url=server.url + "/missing.tar.gz")
  assert hint in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(UserError, match=r"cannot reach 127.0.0.1:1 \(offline\? \[Errno") as e:
    fetch.ensure_breakhis(str(tmp_path), url="http://127.0.0.1:1/BreaKHis_v1.tar.gz")
  assert hint in str(e.value)
  server.files["/big"] = b"x" * 4096
  with monkeypatch.context() as m:  # the disk fills up while writing (/dev/full: ENOSPC)
    m.setattr(download, "part_path", lambda dest: "/dev/full")
    with pytest.raises(UserError, match="disk full while writing /dev/full; free some space and "
                       "run the same command again to resume it, or download http"):
      fetch.ensure_breakhis(str(tmp_path), url=server.url + "/big")
  monkeypatch.setattr(download.shutil, "disk_usage", lambda _: namedtuple("U", "free")(100))
  with pytest.raises(UserError, match="not enough disk space.*free some space and run again"):
    fetch.ensure_breakhis(str(tmp_path), url=server.url + "/big")
  assert sorted(os.listdir(tmp_path)) == [".lock"]


def test_config_download_fetches_on_first_use(server, archive, tmp_path, monkeypatch):
  """Guards the hook in load_fold: with config.data.breakhis.download a run on an empty data dir
  downloads, unpacks and prepares the data set from $JATTN_BREAKHIS_URL."""
  from jattn.data import load_fold

  monkeypatch.setenv(fetch.URL_ENV, _serve_archive(server, archive))
  data_dir = str(tmp_path / "data")
  fold = load_fold(data_config(data_dir, str(tmp_path / "prepared"), download=True))
  assert fold.num_images == 64 and len(server.log) == 1
  assert not os.path.exists(os.path.join(data_dir, breakhis.ARCHIVE))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """(bytes, state dict) of a narrow random VGG19 in torchvision's layout, saved by torch."""
  torch = pytest.importorskip("torch")
  from tests.test_convert import NARROW
  from tests.torch_models import TorchVGG, randomize_

  model = randomize_(TorchVGG(NARROW, num_classes=10, hidden=32))
  path = str(tmp_path_factory.mktemp("pth") / "model.pth")
  torch.save(model.state_dict(), path)
  with open(path, "rb") as f:
    return f.read(), model.state_dict()


def test_convert_download_fetches_checks_converts_and_removes_the_pth(
    server, checkpoint, tmp_path, monkeypatch):
  """Guards `convert --download`: the file named with its SHA-256 prefix is fetched, converted
  into --out exactly as a direct conversion, and deleted afterwards."""
  name = f"vgg19-{hashlib.sha256(checkpoint[0]).hexdigest()[:8]}.pth"
  server.files["/models/" + name] = checkpoint[0]
  monkeypatch.setitem(convert.TORCHVISION_FILES, "vgg19", name)
  monkeypatch.setenv(convert.TORCHVISION_URL_ENV, server.url + "/models/")
  out = tmp_path / "pretrained" / "vgg19"
  convert_cli.main(["--download", "vgg19", "--out", str(out)])
  got = convert.load_weights(str(out))
  mc = convert.torchvision_model_config("vgg19", 10)
  mc.width, mc.classifier_width = 0.125, 32
  want = convert.torch_to_flax(checkpoint[1], mc, "torchvision")
  np.testing.assert_array_equal(got["params"]["block5"]["conv4"]["kernel"],
                                want["params"]["block5"]["conv4"]["kernel"])
  np.testing.assert_array_equal(got["params"]["classifier"]["head"]["kernel"],
                                want["params"]["classifier"]["head"]["kernel"])
  assert sorted(os.listdir(tmp_path / "pretrained")) == ["vgg19"]  # the .pth is gone
  info = json.loads((out / convert.INFO_FILE).read_text())
  assert info["sha256"] == hashlib.sha256(checkpoint[0]).hexdigest()


def test_convert_download_refuses_a_wrong_prefix_and_needs_torch(
    server, checkpoint, tmp_path, monkeypatch, capsys):
  """Guards the prefix check (a file whose SHA-256 does not start as its name says is deleted,
  nothing converted) and the one pip command named when PyTorch is missing."""
  server.files["/vgg19-00000000.pth"] = checkpoint[0]
  monkeypatch.setitem(convert.TORCHVISION_FILES, "vgg19", "vgg19-00000000.pth")
  monkeypatch.setenv(convert.TORCHVISION_URL_ENV, server.url)
  out = tmp_path / "pretrained" / "vgg19"
  with pytest.raises(SystemExit):
    convert_cli.main(["--download", "vgg19", "--out", str(out)])
  err = capsys.readouterr().err
  assert "checksum mismatch" in err and "expected 00000000" in err
  assert os.listdir(tmp_path / "pretrained") == []

  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(SystemExit):
    convert_cli.main(["--download", "vgg19", "--out", str(out)])
  assert capsys.readouterr().err.strip() == (
      'jattn convert: error: reading the checkpoint needs PyTorch: pip install -e ".[convert]"')
