"""Clears outputs, execution counts and timings of notebooks before committing them.

    python notebooks/strip_outputs.py                  # every notebook in this folder
    python notebooks/strip_outputs.py path/to/a.ipynb  # the ones named
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat


def strip(path: Path) -> bool:
    """Clears ``path`` in place; returns whether anything changed."""
    nb = nbformat.read(path, as_version=4)
    changed = False
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if cell.get("outputs") or cell.get("execution_count") is not None:
            cell.outputs, cell.execution_count, changed = [], None, True
        if "execution" in cell.metadata:  # execution timestamps
            del cell.metadata["execution"]
            changed = True
    if changed:
        nbformat.write(nb, path)
    return changed


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or sorted(Path(__file__).resolve().parent.glob("*.ipynb"))
    for path in paths:
        print(f"{path}: {'cleared' if strip(path) else 'clean'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
