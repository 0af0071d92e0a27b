"""jattn: VGG19 with C-Attn and S-Attn for BreakHis, after Wu et al., ISBI 2019."""

from jattn.core import xla_cpu

__version__ = "0.1.0"

# Before JAX starts a backend: XLA reads XLA_FLAGS once (see jattn/xla_cpu.py).
xla_cpu.apply()
