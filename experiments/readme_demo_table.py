"""Reruns the built-in demo and writes the table it prints into README.md.

  python experiments/readme_demo_table.py            # about 45 s on 2 CPU cores

The README shows what `jattn train --config configs/demo.py` prints at its end. The demo
is deterministic on a given machine, so the table is kept true by regenerating it rather than by
editing it: this runs the demo in a temporary work dir (the demo data stay in their usual cache,
~/.cache/jattn/demo) and replaces the fenced block that follows the `DEMO_TABLE_MARKER` comment in
README.md with the table from the run's results.json, exactly as the demo prints it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from anywhere: find jattn

from jattn.core import files  # noqa: E402
from jattn.evaluation import evaluate  # noqa: E402

DEMO_TABLE_MARKER = "<!-- demo table: python experiments/readme_demo_table.py -->"


def replace_table(readme: str, table: str) -> str:
  """README text with the fenced block after the marker replaced by `table`."""
  pattern = re.compile(re.escape(DEMO_TABLE_MARKER) + r"\n```\n.*?\n```", re.DOTALL)
  if not pattern.search(readme):
    raise SystemExit(f"README.md has no {DEMO_TABLE_MARKER!r} followed by a ``` block")
  return pattern.sub(lambda _: f"{DEMO_TABLE_MARKER}\n```\n{table}\n```", readme, count=1)


def main() -> None:
  with tempfile.TemporaryDirectory(prefix="jattn-demo-") as workdir:
    env = dict(os.environ, PYTHONPATH=REPO)
    subprocess.run([sys.executable, "-m", "jattn.main", "--config", "configs/demo.py",
                    "--workdir", workdir], cwd=REPO, env=env, check=True)
    with open(os.path.join(workdir, "results.json")) as f:
      table = evaluate.format_table(json.load(f))
  path = os.path.join(REPO, "README.md")
  with open(path) as f:
    readme = f.read()
  files.atomic_write_text(path, replace_table(readme, table))
  print(f"wrote into {path}:\n{table}")


if __name__ == "__main__":
  main()
