"""`python -m jattn <command> [options]`: the same as `jattn <command>` (jattn.cli)."""

from jattn.cli import main

main()
