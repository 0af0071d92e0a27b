"""`python -m jattn.data`: download, synthesize and describe BreakHis, preview the augmentation
(jattn.cli.data)."""

from jattn.cli.data import main

if __name__ == "__main__":
  main()
