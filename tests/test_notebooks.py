"""Executes every notebook in notebooks/, so a notebook that breaks fails the build.

The kernel is this interpreter (the project's .venv): a kernelspec named ``python3`` pointing at
``sys.executable`` is written to a temporary directory placed first on ``JUPYTER_PATH``, so a
``python3`` kernelspec installed elsewhere on the machine cannot take its place.
"""

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")  # the notebook extra; make test installs it
NotebookClient = pytest.importorskip("nbclient").NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))


@pytest.fixture(scope="module")
def kernel_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (jsample .venv)",
        "language": "python",
    }))
    return root


def test_the_expected_notebooks_exist():
    assert {"quickstart.ipynb", "decode.ipynb"} <= {p.name for p in PATHS}


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_runs(path, kernel_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_path))
    monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device, as for a reader; conftest asks for 8
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.get("kernelspec", {}).get("name", "python3") == "python3"
    NotebookClient(nb, kernel_name="python3", timeout=300,
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.output_type == "error"]
    assert not errors
