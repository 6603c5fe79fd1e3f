"""The shared entry point of the experiment scripts: one-line errors and exit status 2."""

from __future__ import annotations

import sys
from typing import Callable


def run_main(name: str, run: Callable, args) -> int:
    """Runs ``run(args)``; an InputError prints ``<name>: error: ...`` and returns 2."""
    from tracin_jax.errors import InputError

    try:
        run(args)
    except InputError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    return 0
