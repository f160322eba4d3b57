"""The quickstart notebook runs headless from top to bottom (toy and MiniLM parts) and draws its plots."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "hrp_quickstart.ipynb"


def test_quickstart_notebook_executes(monkeypatch: pytest.MonkeyPatch) -> None:
    # One BLAS thread: on a small shared CPU, two threads fighting other processes are several times slower.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # the toy's and MiniLM's figures
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "converged loss from HRP's start" in text
    assert "test accuracy after 30 steps" in text
