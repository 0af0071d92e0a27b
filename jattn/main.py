"""`python -m jattn.main --config CONFIG [...]`: the same as `jattn train` (jattn.cli.train)."""

from jattn.cli.train import main

if __name__ == "__main__":
  main()
