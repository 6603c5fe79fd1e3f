"""JAX's persistent compilation cache for command-line runs.

A stage compiles the same programs every time it runs on the same shapes (the gradient program
of an influence run, the training step). :func:`enable` points JAX's own persistent cache
(``jax_compilation_cache_dir``) at ``$TRACIN_JAX_CACHE/xla`` (default ``~/.cache/tracin_jax/xla``)
so a second run loads them instead of compiling again.

``TRACIN_JAX_XLA_CACHE`` chooses: unset (that default folder), ``off`` (no cache), or a folder.
A cache folder already chosen through JAX's own ``JAX_COMPILATION_CACHE_DIR`` (or
``jax.config``) is left as it is. The command line also takes ``--no-compile-cache``.
"""

from __future__ import annotations

import os
from pathlib import Path

from tracin_jax.data.cache import default_cache_dir

ENV = "TRACIN_JAX_XLA_CACHE"


def cache_dir() -> Path | None:
    """The folder :func:`enable` would use, or None when the cache is off."""
    raw = os.environ.get(ENV, "").strip()
    if raw.lower() in ("off", "0", "false", "no", "none"):
        return None
    return Path(raw).expanduser() if raw else default_cache_dir() / "xla"


def enable(on: bool = True) -> str | None:
    """Turns the persistent compilation cache on (see the module docstring); returns the folder
    in use, or None. Programs that compile in under a second are not stored (JAX's default
    threshold)."""
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:
        return str(current)
    folder = cache_dir() if on else None
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # an unwritable cache folder only costs compile time
    if not os.access(folder, os.W_OK | os.X_OK):
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    return str(folder)
