"""Whether the models take their CPU-only paths, and a way to lower them without.

On XLA's CPU backend the models compute some ops another way, for speed (`conv.py`: the
patch-matmul and Winograd convolutions; `pooling.py`: the element-wise max-pool gradient;
`attention.py`: 16-bit attention logits widened to float32). Inside `off()` they lower as on any
other backend, so that a program lowered on the CPU is the one a GPU compiles: its FLOPs and bytes
can then be counted (`jattn.perf.roofline`), which the CPU-only paths would change (Winograd's fewer
products) and a GPU cannot report (its convolutions are opaque library calls to XLA's cost
analysis).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax

_off = contextvars.ContextVar("jattn_cpu_paths_off", default=False)


def active() -> bool:
  """True where the CPU-only paths apply: on the CPU backend, outside `off()`."""
  return jax.default_backend() == "cpu" and not _off.get()


@contextlib.contextmanager
def off() -> Iterator[None]:
  """Within this block (in this thread), models lower as they do off the CPU. Trace a fresh
  function inside it: a function `jax.jit` has already traced keeps the program it traced."""
  token = _off.set(True)
  try:
    yield
  finally:
    _off.reset(token)
