"""Attention maps of a trained run: the equations' normalisation holds, and the CLI writes PNGs."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from jattn import models
from jattn.cli import inspect as inspect_cli
from jattn.core.errors import UserError
from jattn.inference import attention_maps as inspect
from jattn.inference import runs


@pytest.fixture(scope="module")
def maps_and_images(trained_run, synthetic_tree):
  config, state = runs.restore(trained_run)
  images = np.random.default_rng(0).integers(0, 256, (3, config.image_size, config.image_size, 3),
                                             dtype=np.uint8)
  return inspect.attention_maps(state, images, models.attention_sites(config.model))


def test_every_module_is_mapped(maps_and_images, trained_run):
  probs, maps = maps_and_images
  assert list(maps) == ["block1/c_attn", "block2/c_attn", "block3/s_attn", "block4/s_attn",
                        "block5/s_attn"]  # the demo config is the paper's model, in order
  assert [m["label"] for m in maps.values()] == [
      "C-Attn after block 1", "C-Attn after block 2", "S-Attn after block 3",
      "S-Attn after block 4", "S-Attn after block 5"]
  assert probs.shape == (3, 2)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
  # 32x32 input: block b's feature map is 32 / 2^(b-1) on a side
  assert maps["block3/s_attn"]["grid"] == (8, 8) and maps["block3/s_attn"]["e_prime"].shape == (
      3, 64, 64)
  assert maps["block1/c_attn"]["a_c_norm"].shape == (3, 32, 32)
  assert maps["block2/c_attn"]["d_prime"].shape == (3, 8, 8)


def test_columns_sum_to_one_as_eqs_4_and_10(maps_and_images):
  _, maps = maps_and_images
  for m in maps.values():
    if m["kind"] == "s_attn":  # eq. (10): each column of E' sums to 1 over positions
      np.testing.assert_allclose(m["e_prime"].sum(axis=1), 1.0, atol=1e-5)
      query = inspect.query_map(m["e_prime"], m["grid"], (0.5, 0.5))
      np.testing.assert_allclose(query.sum(axis=(-2, -1)), 1.0, atol=1e-5)
      # total attention received over all positions equals the number of positions
      np.testing.assert_allclose(inspect.received(m["e_prime"], m["grid"]).sum(axis=(-2, -1)),
                                 np.prod(m["grid"]), rtol=1e-5)
    else:  # C-Attn, eq. (4): each column of D' sums to 1 over channels
      np.testing.assert_allclose(m["d_prime"].sum(axis=1), 1.0, atol=1e-5)


def test_query_map_picks_the_column_of_the_position():
  e_prime = np.zeros((4 * 6, 4 * 6))
  e_prime[5, 2 * 6 + 3] = 1.0  # position (row 2, col 3) attends to position 5 = (row 0, col 5)
  query = inspect.query_map(e_prime, (4, 6), (0.5 + 0.01, 0.5 + 0.01))
  assert query.shape == (4, 6) and query[0, 5] == 1.0 and query.sum() == 1.0


def test_cli_writes_one_overlay_per_image(trained_run, synthetic_tree, tmp_path):
  paths = []
  for root, _, files in os.walk(os.path.join(synthetic_tree[0], "BreaKHis_v1")):
    paths += [os.path.join(root, f) for f in sorted(files) if f.endswith(".png")][:1]
    if len(paths) == 2:
      break
  inspect_cli.main(["--workdir", trained_run, "--out", str(tmp_path / "maps"), "--position",
                "0.25,0.75", *paths])
  written = sorted(os.listdir(tmp_path / "maps"))
  assert written == sorted(os.path.basename(p)[:-4] + "_attention.png" for p in paths)
  with Image.open(tmp_path / "maps" / written[0]) as im:
    assert im.size[0] > 600 and im.mode in ("RGB", "RGBA")


def test_model_without_attention_is_refused(trained_run, tmp_path):
  config = runs.load_config(trained_run)
  config.model.c_attn_blocks, config.model.s_attn_blocks = [], []
  (tmp_path / "config.json").write_text(config.to_json())
  with pytest.raises(UserError, match="has no attention modules"):
    inspect.inspect_images(str(tmp_path), ["x.png"], str(tmp_path / "o"))
