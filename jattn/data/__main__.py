"""`python -m jattn.data`: download, synthesize and describe BreakHis, preview the augmentation
(jattn.data.breakhis.cli)."""

from jattn.data.breakhis.cli import main

if __name__ == "__main__":
  main()
