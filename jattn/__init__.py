"""jattn: VGG19 with C-Attn and S-Attn for BreakHis, after Wu et al., ISBI 2019."""

__version__ = "0.1.0"
