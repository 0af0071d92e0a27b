"""jattn.core.xla_cpu: the XLA flags jattn sets for XLA's CPU backend, and that they reach XLA."""

from __future__ import annotations

import os
import subprocess
import sys

from jattn.core import xla_cpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADDED = ["--xla_disable_hlo_passes=dot-library-rewriter",
         "--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution"]


def test_flags_only_for_measured_jaxlib_and_never_over_the_users():
  """Guards against an experimental flag sent to a jaxlib that does not know it (XLA aborts on
  an unknown flag), against overriding a flag the user set, and against an ignored opt-out."""
  assert xla_cpu.flags_for({}, "0.10.2") == ADDED
  assert xla_cpu.flags_for({}, "0.9.0") == []
  assert xla_cpu.flags_for({}, "0.11.0") == []
  assert xla_cpu.flags_for({}, None) == []
  assert xla_cpu.flags_for({"JATTN_XLA_CPU_FLAGS": "0"}, "0.10.2") == []
  assert xla_cpu.flags_for({"JATTN_XLA_CPU_FLAGS": "off"}, "0.10.2") == []
  users = {"XLA_FLAGS": "--xla_disable_hlo_passes=foo --xla_force_host_platform_device_count=4"}
  assert xla_cpu.flags_for(users, "0.10.2") == ADDED[1:]
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  assert xla_cpu.apply(env) == ADDED  # this jaxlib is a measured one (else: measure, extend)
  assert env["XLA_FLAGS"] == " ".join(["--xla_force_host_platform_device_count=4", *ADDED])
  assert xla_cpu.apply(env) == [] and env["XLA_FLAGS"].count("ynn_fusion_type") == 1


PROBE = """
import re, jattn, jax, jax.numpy as jnp
from flax import linen as nn
def head(x, w):  # VGG's last max-pool, then the classifier's first product, at batch 8
  return jax.nn.relu(nn.max_pool(x, (2, 2), strides=(2, 2)).reshape(8, -1) @ w)
x = jax.ShapeDtypeStruct((8, 14, 14, 512), jnp.float32)  # compiled, never run
w = jax.ShapeDtypeStruct((25088, 4096), jnp.float32)
text = jax.jit(head).lower(x, w).compile().as_text()
ynn = re.findall(r"calls=(%[\\w.-]+)[^\\n]*__ynn_fusion", text)
bodies = [re.search(re.escape(c) + r" \\(.*?\\n}", text, re.S).group(0) for c in ynn]
print("max-pool fused into YNNPACK:", any("reduce-window" in b for b in bodies))
"""


def _probe(**env) -> str:
  run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                       env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", **env))
  return run.stdout.strip()


def test_importing_jattn_keeps_the_classifier_out_of_a_ynnpack_graph():
  """The flags reach XLA when jattn is imported before JAX starts (as every jattn command
  does): block 5's max-pool is not fused with the classifier's product into one YNNPACK graph
  (by default it is, and the eval step takes ~1 s longer); JATTN_XLA_CPU_FLAGS=0 gives XLA's
  default back. Guards against the flags set too late (after JAX read XLA_FLAGS) or not at all."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if not xla_cpu.flags_for(env, xla_cpu._jaxlib_version()):
    raise AssertionError(f"jaxlib {xla_cpu._jaxlib_version()} is not one the flags were "
                         f"measured on ({xla_cpu.TESTED_JAXLIB}): measure and extend it")
  assert _probe(XLA_FLAGS="") == "max-pool fused into YNNPACK: False"
  assert _probe(XLA_FLAGS="", JATTN_XLA_CPU_FLAGS="0") == "max-pool fused into YNNPACK: True"
