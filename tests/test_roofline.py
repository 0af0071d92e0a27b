"""jattn.perf.roofline's counts against hand computations: the FLOPs of VGG19's training step, the
bytes of products, reductions, scans and Adam's update, the bound and the device table."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.core import config_lib
from jattn.models import conv, cpu_paths, vgg
from jattn.perf import roofline
from tests.runs import REPO


def _vgg19_by_hand(image_size: int, classes: int) -> tuple[float, int]:
  """(FLOPs of one training image, parameters) of VGG19 with a `classes`-way head, by hand. A 3x3
  'same' convolution on an H x H map multiplies (3H - 2)^2 kernel taps per channel pair (the
  border's padded taps are no products); its input and weight gradients take as many, and the
  first conv needs no input gradient. The classifier is 25,088 -> 4,096 -> 4,096 -> classes."""
  flops, params, first, side, c_in = 0, 0, None, image_size, 3
  for block in vgg.block_widths(1.0):
    for c_out in block:
      f = 2 * (3 * side - 2) ** 2 * c_in * c_out
      first = f if first is None else first
      flops += 3 * f
      params += 9 * c_in * c_out + c_out
      c_in = c_out
    side //= 2
  dense = [(512 * 7 * 7, 4096), (4096, 4096), (4096, classes)]
  flops += sum(3 * 2 * a * b for a, b in dense) - first
  params += sum(a * b + b for a, b in dense)
  return flops, params


def test_vgg19_training_step_counts_match_a_hand_count():
  """configs/vgg19.py at 224 x 224, batch 8, float32, counted as a GPU runs it: XLA's FLOPs are the
  convolutions' and products' by hand to 0.5% (the rest is element-wise work), the parameters are
  torchvision's VGG19 with a 2-class head (143,667,240 - 4,096 x 998 - 998), and Adam's update moves
  7 float32 values per parameter (gradient, parameter and two moments read; parameter and two
  moments written)."""
  config = config_lib.load_config(f"{REPO}/configs/vgg19.py")
  with config.unlocked():
    config.model.dtype = "float32"
  counts = roofline.count_step(config, 224, 8)
  flops, params = _vgg19_by_hand(224, 2)
  assert params == 143_667_240 - 4096 * 998 - 998 == counts["parameters"]
  assert flops * 8 <= counts["flops"] <= flops * 8 * 1.005
  assert counts["bytes_by_part"]["parameters and optimiser"] == 7 * 4 * params
  # The largest tensor is the first classifier weight, read in the forward pass and by its
  # gradient's product.
  assert counts["largest_tensor"] == {"shape": [25088, 4096], "dtype": "float32",
                                      "bytes": 25088 * 4096 * 4, "touches": 2}


def test_cpu_paths_off_counts_the_direct_convolution():
  """A block-3 convolution (56 x 56 x 256 -> 256, float32) lowered on the CPU takes the Winograd
  path, which XLA counts as fewer FLOPs; inside `cpu_paths.off()` it is the direct convolution,
  2 x (3 x 56 - 2)^2 x 256^2 FLOPs by hand."""
  x = jax.ShapeDtypeStruct((1, 56, 56, 256), jnp.float32)
  w = jax.ShapeDtypeStruct((3, 3, 256, 256), jnp.float32)

  def f(x, w):
    return conv.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=conv.NHWC)

  direct = 2 * (3 * 56 - 2) ** 2 * 256 * 256
  with cpu_paths.off():
    assert not cpu_paths.active()
    assert roofline.xla_flops(lambda x, w: f(x, w), x, w) == direct
  assert cpu_paths.active() == (jax.default_backend() == "cpu")
  if cpu_paths.active():
    assert roofline.xla_flops(lambda x, w: f(x, w), x, w) < 0.8 * direct


def test_memory_traffic_counts_products_reductions_and_scans_by_hand():
  """sum(relu(x @ w)) over x [32, 64] and w [64, 16] float32: the product reads 8,192 + 4,096
  bytes and writes 2,048, the sum reads 2,048 and writes 4; the ReLU is fused (not counted). In a
  scan of 3 steps it counts 3 times; the largest tensor is x, touched once (per step)."""
  x = jnp.zeros((32, 64), jnp.float32)
  w = jnp.zeros((64, 16), jnp.float32)
  once = 32 * 64 * 4 + 64 * 16 * 4 + 32 * 16 * 4 + 32 * 16 * 4 + 4
  f = lambda x, w: jnp.sum(jax.nn.relu(x @ w))  # noqa: E731
  traffic = roofline.memory_traffic(jax.make_jaxpr(f)(x, w))
  assert traffic["total"] == once and traffic["by_scope"] == {"other": once}
  assert traffic["largest"] == {"shape": [32, 64], "dtype": "float32", "bytes": 8192,
                                "touches": 1}

  def scanned(x, w):
    return jax.lax.scan(lambda c, _: (c + f(x, w), None), 0.0, None, length=3)[0]

  with jax.named_scope("head"):
    jaxpr = jax.make_jaxpr(scanned)(x, w)
  traffic = roofline.memory_traffic(jaxpr, scopes=["head"])
  assert traffic["total"] == 3 * once and traffic["largest"]["touches"] == 3


def test_optimizer_traffic_is_seven_float32_accesses_per_parameter():
  import optax

  params = {"a": jnp.zeros((3, 5)), "b": jnp.zeros((7,))}
  opt_state = optax.adam(1e-3).init(params)
  assert roofline.optimizer_traffic(params, opt_state) == 7 * 4 * 22


def test_bound_and_achieved_fraction_by_hand():
  """1 TFLOP and 2 GB at 100 TFLOP/s and 1,000 GB/s: compute 10 ms, memory 2 ms, bound 10 ms by
  compute; a 40 ms step reaches 25% of it. Without a bandwidth there is no bound."""
  b = roofline.bound({"flops": 1e12, "bytes": 2e9}, 100.0, 1000.0, 0.04)
  assert b["compute_s"] == pytest.approx(0.01) and b["memory_s"] == pytest.approx(0.002)
  assert b["bound_s"] == pytest.approx(0.01) and b["bound_by"] == "compute"
  assert b["achieved"] == pytest.approx(0.25)
  b = roofline.bound({"flops": 1e9, "bytes": 2e9}, 100.0, 1000.0, 0.004)
  assert b["bound_by"] == "memory" and b["achieved"] == pytest.approx(0.5)
  none = roofline.bound({"flops": 1e12, "bytes": 2e9}, 100.0, None, 0.04)
  assert none["bound_s"] is None and none["achieved"] is None


def test_device_table_picks_the_specific_part():
  """An H200 NVL or a GH200 is not taken for the H200 SXM (nor a GH200 for an H100), a 40 GB A100
  not for the 80 GB one; a CPU has no peaks."""
  assert roofline.bandwidth_gbps("NVIDIA H200") == 4800.0
  assert roofline.bandwidth_gbps("NVIDIA H200 NVL") == 4800.0
  assert roofline.peak_tflops("NVIDIA H200 NVL", "bfloat16") == 835.0
  assert roofline.bandwidth_gbps("NVIDIA GH200 480GB") == 4000.0
  assert roofline.bandwidth_gbps("NVIDIA H100 80GB HBM3") == 3350.0
  assert roofline.bandwidth_gbps("NVIDIA A100-SXM4-80GB") == 2039.0
  assert roofline.bandwidth_gbps("NVIDIA A100-SXM4-40GB") == 1555.0
  assert roofline.peak_tflops("cpu", "float32") is None and roofline.bandwidth_gbps("cpu") is None
  assert np.isfinite(roofline.peak_tflops("Tesla T4", "float32"))
