"""`jattn sweep [...]`: the same as `jattn sweep [...]` (jattn.cli.sweep), kept for
the command lines of earlier sweeps."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jattn.cli.sweep import main  # noqa: E402

if __name__ == "__main__":
  main()
