"""XLA flags for jattn's steps on XLA's CPU backend, set in XLA_FLAGS before JAX starts.

Measured side by side with PyTorch eager on 2 cores (224x224, batch 8, float32, `python -m
jattn.perf.benchmark --torch`), jaxlib 0.10.2's CPU backend loses where its default pass
`dot-library-rewriter` hands convolutions and dots to YNNPACK together with the work around them:

- It fuses the classifier's batch-8 matrix products with block 5's max-pool into one YNNPACK
  graph, which takes about 1 s per eval step of the paper's model against 35 ms for the same
  products alone (the whole forward pass: 3.9 s, and 2.9 s with a classifier 64 wide).
- Convolution weight gradients (a convolution whose "kernel" is the output gradient) run 3-5x
  slower than PyTorch's in the first blocks (block 1, 64 channels: 0.97 s against 0.23 s).

`--xla_disable_hlo_passes=dot-library-rewriter` turns that pass off, and
`--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution` sends each dot
and each convolution to YNNPACK on its own, nothing fused into it (weight gradients: 0.37 s in
block 1, 0.24 s in block 2, against 0.97 s and 1.36 s by default). With the element-wise max-pool
gradient (jattn/models/pooling.py), the paper's model's train step went from 0.72x to 1.06x
PyTorch's speed and its eval step from 0.66x to 1.08x (README, Performance). The flags touch only
XLA's CPU compiler: GPU and TPU programs compile as before.

A flag XLA does not know aborts the process, and these are experimental, so they are set only
for the jaxlib versions they were measured on (TESTED_JAXLIB). A flag already in XLA_FLAGS is
left as the user set it; `JATTN_XLA_CPU_FLAGS=0` sets none. XLA reads XLA_FLAGS once, when JAX
first starts a backend, so `apply` runs when jattn is imported: import jattn before computing
anything with JAX (every `python -m jattn...` command does).
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Mapping, MutableMapping

FLAGS = (
    ("xla_disable_hlo_passes", "dot-library-rewriter"),
    ("xla_cpu_experimental_ynn_fusion_type", "individual_dot,individual_convolution"),
)
TESTED_JAXLIB = ("0.10.",)  # version prefixes whose XLA knows FLAGS and was measured with them
OPT_OUT = "JATTN_XLA_CPU_FLAGS"


def _jaxlib_version() -> str | None:
  try:
    return importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return None


def flags_for(env: Mapping[str, str], jaxlib_version: str | None) -> list[str]:
  """The flags `apply` would add to `env`'s XLA_FLAGS for `jaxlib_version`."""
  if env.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
    return []
  if jaxlib_version is None or not jaxlib_version.startswith(TESTED_JAXLIB):
    return []
  present = env.get("XLA_FLAGS", "")
  return [f"--{name}={value}" for name, value in FLAGS if f"--{name}=" not in present]


def apply(env: MutableMapping[str, str] | None = None) -> list[str]:
  """Appends the CPU flags to XLA_FLAGS in `env` (os.environ); returns those added."""
  env = os.environ if env is None else env
  added = flags_for(env, _jaxlib_version())
  if added:
    env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", "").strip(), *added]).strip()
  return added
