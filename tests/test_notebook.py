"""experiments/attention_maps.ipynb runs end to end against a tiny trained run."""

from __future__ import annotations

import os

import nbformat
from nbclient import NotebookClient

from tests.runs import REPO


def test_attention_notebook_executes(trained_run, monkeypatch):
  nb = nbformat.read(os.path.join(REPO, "experiments", "attention_maps.ipynb"), as_version=4)
  monkeypatch.setenv("JATTN_RUN", trained_run)
  monkeypatch.setenv("PYTHONPATH", REPO)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": REPO}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  figures = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(figures) >= 3  # overview, query maps, channel affinities
  text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
  assert "S-Attn after block 3" in text and "P(malignant)" in text
  assert "WARNING" not in text  # no library noise in what a reader sees
