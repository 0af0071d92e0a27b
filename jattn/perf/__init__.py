"""How fast jattn runs: the benchmark, its profile and roofline, several runs per device, the
PyTorch peers."""
