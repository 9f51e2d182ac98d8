"""The quickstart notebook runs top to bottom on a tiny run."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "quickstart.ipynb"


def test_quickstart_notebook_executes(tiny_run, tiny_results, monkeypatch):
    results, _ = tiny_results
    monkeypatch.setenv("FORK_PROBES_RUN", str(tiny_run))
    monkeypatch.setenv("FORK_PROBES_RESULTS", str(results))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tiny_run)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    # the lens table has one row per layer and a column per branch
    lens_cell = nb.cells[9]
    assert "share" in lens_cell.source and lens_cell.outputs
