"""The notebooks: committed without outputs, and each runs top to bottom (``tiny`` size).

Each notebook is executed by nbclient in a ``python3`` kernel of this interpreter, with
``TRACIN_JAX_NOTEBOOK_SIZE=tiny`` and a temporary ``TRACIN_JAX_NOTEBOOK_DIR``; a first cell added
in memory checks that the kernel runs this interpreter. The work folder reuses the session's
tiny dataset and run (``tiny_data``, ``tiny_run``) when their config is the notebooks' ``tiny``
one, so the run is trained once for the whole suite.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from conftest import TINY_SHAPE, tiny_config

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
CELL_TIMEOUT_S = 600

KERNEL_CHECK = f"""\
import os, sys
assert sys.prefix == {sys.prefix!r}, "kernel runs " + sys.executable + ", not " + {sys.executable!r}
assert os.path.realpath(sys.executable) == {os.path.realpath(sys.executable)!r}, sys.executable
assert os.environ["TRACIN_JAX_NOTEBOOK_SIZE"] == "tiny"
"""


def _notebook_runs():
    sys.path.insert(0, str(NOTEBOOKS))
    try:
        import notebook_runs
    finally:
        sys.path.remove(str(NOTEBOOKS))
    return notebook_runs


def test_notebooks_exist():
    assert NAMES == ["01_quickstart.ipynb", "02_gradient_variants.ipynb", "03_your_data.ipynb"]


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    dirty = [n for n, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and (cell.get("outputs") or cell.get("execution_count") is not None
                  or "execution" in cell.metadata)]
    assert not dirty, (f"{name}: code cells {dirty} have outputs, execution counts or timings; "
                       "clear them (python notebooks/strip_outputs.py) before committing")
    first_code = next(cell for cell in nb.cells if cell.cell_type == "code")
    assert "TRACIN_JAX_NOTEBOOK_SIZE" in first_code.source
    assert "TRACIN_JAX_NOTEBOOK_DIR" in first_code.source


def test_tiny_size_matches_the_test_fixtures():
    """The notebooks' ``tiny`` run is the suite's tiny run (so it can be shared)."""
    nr = _notebook_runs()
    assert nr.size_config("tiny") == tiny_config()
    assert nr.SIZES["tiny"][:2] == (6, TINY_SHAPE)


@pytest.fixture(scope="module")
def notebook_env(tiny_data, tiny_run, tmp_path_factory):
    """Environment of the notebook kernels: tiny size, a temporary work folder, isolated
    Jupyter/IPython user folders (no user kernelspec or startup file can interfere)."""
    work = tmp_path_factory.mktemp("notebooks")
    if _notebook_runs().size_config("tiny") == tiny_config():
        (work / "data-tiny").symlink_to(tiny_data, target_is_directory=True)
        (work / "run-tiny").symlink_to(tiny_run, target_is_directory=True)
    home = tmp_path_factory.mktemp("jupyter-home")
    env = {"TRACIN_JAX_NOTEBOOK_SIZE": "tiny", "TRACIN_JAX_NOTEBOOK_DIR": str(work),
           "JUPYTER_DATA_DIR": str(home / "data"), "JUPYTER_CONFIG_DIR": str(home / "config"),
           "IPYTHONDIR": str(home / "ipython"), "PYTHONDONTWRITEBYTECODE": "1"}
    return env


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, notebook_env, monkeypatch):
    for key, value in notebook_env.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(KERNEL_CHECK))
    client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    try:
        client.execute()
    except CellExecutionError as err:
        pytest.fail(f"{name} failed:\n{err}", pytrace=False)
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
              if o.get("output_type") == "error"]
    assert not errors
