"""XLA flags for jattn's steps on XLA's CPU backend, set in XLA_FLAGS before JAX starts.

By default jaxlib's CPU backend, in its pass `dot-library-rewriter`, hands convolutions and dots
to YNNPACK together with the work around them: the classifier's matrix products fused with block
5's max-pool into one YNNPACK graph, convolution weight gradients (a convolution whose "kernel" is
the output gradient) fused with their neighbours.

`--xla_disable_hlo_passes=dot-library-rewriter` turns that pass off, and
`--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution` sends each dot
and each convolution to YNNPACK on its own, nothing fused into it. What they were measured to
change is in docs/performance.md. The flags touch only XLA's CPU compiler: GPU and TPU programs
compile as before.

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
