"""On-disk cache of preprocessed datasets.

A cache file ``<cache_dir>/brats-<key>.npz`` holds the arrays of one :class:`Dataset`. The key
hashes the resolved data folder, every input file's path relative to it with its size and
``mtime_ns`` (``dataset.json`` included where the dataset has one), the DataConfig as JSON, the
examples' dimensionality (2: slices, 3: volumes) and ``CACHE_VERSION``, so editing, touching,
adding or removing a used file, changing any data setting, or asking for volumes instead of
slices gives a new key. Files are written
atomically (temporary file in the same folder, fsync, ``os.replace``); an unreadable or
inconsistent cache file is ignored and rebuilt.

Several processes loading the same data at once (the processes of one data-parallel run) may
each build and write the same file: each writes its own temporary file and the replacements
are atomic, so a reader sees either no file or a complete one, and the contents are the same
whichever replacement comes last.

Default folder: ``$TRACIN_JAX_CACHE`` if set, else ``~/.cache/tracin_jax``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

# 2: crop and slices in stored indices by default (data.crop_space), info gains class_slices and
# negative_minima; files of version 1 are never read.
# 3: info gains the task (channels, classes, label values), the split kind and data_auto;
# MSD and nnU-Net keys include dataset.json.
# 4: 3D runs' volume examples (images of rank 5); the key includes the dimensionality.
CACHE_VERSION = 4
CACHE_ENV = "TRACIN_JAX_CACHE"


def default_cache_dir() -> Path:
    """``$TRACIN_JAX_CACHE`` if set, else ``~/.cache/tracin_jax``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tracin_jax"


def file_signature(path: Path, data_dir: Path) -> list:
    """[path relative to ``data_dir``, size, mtime_ns] of one input file (stat follows links)."""
    st = Path(path).stat()
    return [Path(os.path.relpath(path, data_dir)).as_posix(), st.st_size, st.st_mtime_ns]


def cache_key(data_dir: Path, files: list[Path], cfg, dims: int = 2) -> str:
    """Hex sha256 of (resolved data dir, file signatures, DataConfig JSON, dims, CACHE_VERSION).

    ``files`` are paths found under ``data_dir`` as given; ``cfg`` is a DataConfig; ``dims`` 2
    for slice examples, 3 for volume examples.
    """
    payload = {
        "version": CACHE_VERSION,
        "dims": int(dims),
        "data_dir": Path(data_dir).resolve().as_posix(),
        "files": [file_signature(p, data_dir) for p in files],
        "config": dataclasses.asdict(cfg),
    }
    text = json.dumps(payload, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()


def cache_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"brats-{key[:24]}.npz"


def save_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Writes an uncompressed .npz atomically: temp file in the same folder, fsync, replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_arrays(path: Path) -> dict[str, np.ndarray] | None:
    """All arrays of an .npz file, or None if it is missing or unreadable (corrupt, truncated)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None
