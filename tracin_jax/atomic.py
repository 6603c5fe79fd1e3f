"""Atomic file writes: a temporary file in the same folder, flushed and fsynced, then renamed.

A reader (or a resumed run after SIGKILL) therefore sees either the old file or the complete new
one, never a partial write.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def fsync_dir(path: str | os.PathLike) -> None:
    """Makes a rename inside ``path`` durable (best effort; not every file system allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    """Writes ``array`` as ``.npy`` through a memory-mapped temporary file, then renames it."""
    path = Path(path)
    array = np.asarray(array)
    tmp = path.with_name(path.name + ".tmp")
    mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=array.dtype, shape=array.shape)
    mm[...] = array
    mm.flush()
    del mm
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def save_npz_atomic(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Writes ``arrays`` as one ``.npz`` to a temporary file, fsyncs it, then renames it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
