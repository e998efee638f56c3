"""Every notebook in `notebooks/` runs top to bottom without error, and is committed executed.

The glob picks up every notebook, including ones added later. The kernel is this
interpreter's own (ipykernel's `python3` resolves to `sys.executable`), and it inherits
this process's environment, so it sees the 8 virtual CPU devices that conftest sets.

One kernel per test worker runs them, one after another (starting a kernel and importing
JAX, Flax and the rest costs 8 s a notebook): before each, its namespace is emptied
(`%reset -f`) and its working folder set, so a notebook that uses a name it does not
define fails as in a fresh kernel; only imported modules stay loaded.
"""

import copy
from pathlib import Path

import ipykernel  # noqa: F401  (the kernel; a test dependency, so a missing one fails loudly)
import jupyter_client
import nbclient
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))

# End-to-end: `pytest -m "not slow"` leaves these out for a quick loop.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def kernel():
    manager = jupyter_client.KernelManager(kernel_name="python3")
    manager.start_kernel(cwd=str(NOTEBOOKS))
    try:
        yield manager
    finally:
        manager.shutdown_kernel(now=True)


def test_notebooks_exist():
    names = {p.name for p in PATHS}
    assert {"quickstart.ipynb", "from_flax.ipynb", "inference.ipynb"} <= names


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_is_committed_with_its_outputs(path):
    nb = nbformat.read(path, as_version=4)
    cells = _code_cells(nb)
    assert cells, f"{path.name} has no code"
    # Executed in one run, top to bottom: counts 1, 2, 3, ... and no errors saved.
    counts = [c.get("execution_count") for c in cells]
    assert counts == list(range(1, len(cells) + 1)), (
        f"{path.name} is not committed freshly executed top to bottom (execution counts "
        f"{counts}); run it with nbclient and commit the result")
    errors = [o for c in cells for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name} is committed with an error: {errors[0].get('ename')}"


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_executes(path, kernel):
    nb = nbformat.read(path, as_version=4)
    committed_images = sum("image/png" in o.get("data", {}) for c in _code_cells(nb)
                           for o in c.outputs)
    fresh = copy.deepcopy(nb)
    for cell in _code_cells(fresh):
        cell.outputs, cell.execution_count = [], None
    # A fresh namespace in the shared kernel, in the notebooks' folder.
    fresh.cells.insert(0, nbformat.v4.new_code_cell(
        f"%reset -f\nimport os\nos.chdir({str(NOTEBOOKS)!r})\ndel os"))
    client = nbclient.NotebookClient(fresh, timeout=600, km=kernel)
    client.execute()  # raises CellExecutionError, with the cell and traceback, on failure
    fresh.cells.pop(0)
    fresh_images = sum("image/png" in o.get("data", {}) for c in _code_cells(fresh)
                       for o in c.outputs)
    # The plots the committed copy shows are still produced.
    assert fresh_images == committed_images
