"""The teaching notebooks (notebooks/0*.ipynb) run top to bottom without an error, as a reader runs them.

Each notebook is executed with nbclient in a fresh kernel of *this* interpreter (a kernel spec written
to a temporary folder points at sys.executable, so no installed `python3` kernel of another environment
can be picked up), with notebooks/ as the working directory. Nothing in the repository is changed,
unless GR_SAVE_NOTEBOOKS=1 is set: then each executed notebook, outputs included, is written back, which
is how the committed outputs are refreshed:

    GR_SAVE_NOTEBOOKS=1 python -m pytest -q tests/test_notebooks.py
"""

import json
import os
import sys
import time

import nbformat
import pytest
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

from conftest import ROOT

NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
KERNEL = "gr-notebook-tests"
CELL_TIMEOUT = 600  # seconds; every notebook takes well under two minutes on a 2-core CPU
MAX_BYTES = 400_000  # committed notebooks stay readable on GitHub


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory):
    """A kernel spec manager that knows one kernel: ipykernel in the interpreter running the tests."""
    folder = tmp_path_factory.mktemp("kernels")
    (folder / KERNEL).mkdir()
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python (gr tests)", "language": "python"}
    (folder / KERNEL / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(folder)])


def test_the_five_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == ["01_model.ipynb", "02_rsft.ipynb", "03_mining.ipynb",
                                           "04_hsdpo.ipynb", "05_evaluation.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_has_its_outputs(path):
    """Saved with the outputs of a real run (plots included, no error), and small."""
    nb = nbformat.read(path, as_version=4)
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert outputs, f"{path.name} was saved without outputs: run it and save it (see this file's docstring)"
    assert not [o for o in outputs if o.output_type == "error"], f"{path.name} was saved with an error output"
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} has no plot"
    assert path.stat().st_size < MAX_BYTES, f"{path.name} is {path.stat().st_size} bytes; keep figures small"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, kernel_specs):
    nb = nbformat.read(path, as_version=4)
    km = AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=kernel_specs)
    client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT, startup_timeout=120,
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    started = time.perf_counter()
    # Raises CellExecutionError, with the cell and its traceback, on any error; cleanup_kc: shut the
    # kernel down at the end although we made its manager.
    client.execute(cleanup_kc=True)
    print(f"{path.name}: {time.perf_counter() - started:.1f} s")
    if os.environ.get("GR_SAVE_NOTEBOOKS") == "1":
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, path)
