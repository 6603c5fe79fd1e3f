"""Atomic file writes: a temporary file in the same folder, flushed and fsynced, then renamed.

A reader (or a resumed run after SIGKILL) therefore sees either the old file or the complete new
one, never a partial write.

A write that the file system refuses (no space left, quota exceeded, read-only, no permission:
:data:`~tracin_jax.errors.WRITE_ERRNOS`) removes its temporary file and raises a one-line
:class:`~tracin_jax.errors.InputError` ``<path>: cannot be written: no space left on device``;
the earlier file at ``path``, if any, stays as it was. Memory-mapped files get their disk blocks
allocated when created (:func:`open_memmap`), so a full disk is an error there and then, not a
SIGBUS at the first page that cannot be stored.

:class:`StagedFiles` extends this to a set of files replaced together (an output folder).
"""

from __future__ import annotations

import errno
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from tracin_jax.errors import WRITE_ERRNOS, cannot_write


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


@contextmanager
def writing(tmp: Path, path: Path) -> Iterator[Path]:
    """Around the writing of ``tmp`` (the temporary file of ``path``): on any failure ``tmp`` is
    removed; a refused write (:data:`~tracin_jax.errors.WRITE_ERRNOS`) becomes the one-line
    InputError naming ``path``."""
    try:
        yield tmp
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            raise cannot_write(path, e) from None
        raise


def _reserve(path: str | os.PathLike) -> None:
    """Allocates the disk blocks of the whole file at ``path`` (``posix_fallocate``); a file
    system that cannot (or a platform without it) is left as it is."""
    if not hasattr(os, "posix_fallocate"):
        return
    size = os.path.getsize(path)
    if size == 0:
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, errno.ENODEV):
            raise
    finally:
        os.close(fd)


def open_memmap(path: str | os.PathLike, dtype: Any, shape: tuple[int, ...]) -> np.memmap:
    """``np.lib.format.open_memmap(path, mode="w+")`` with the file's disk blocks allocated
    up front, so a disk too small for it raises OSError (ENOSPC) here instead of killing the
    process with SIGBUS when a page is written back. On failure the file is removed."""
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))
    try:
        _reserve(path)
    except BaseException:
        del mm
        Path(path).unlink(missing_ok=True)
        raise
    return mm


def _write_json(tmp: Path, obj: Any, indent: int) -> None:
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _write_npy(tmp: Path, array: np.ndarray) -> None:
    mm = open_memmap(tmp, array.dtype, array.shape)
    mm[...] = array
    mm.flush()
    del mm
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    path = Path(path)
    with writing(path.with_name(path.name + ".tmp"), path) as tmp:
        _write_json(tmp, obj, indent)
        os.replace(tmp, path)


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    """Writes ``array`` as ``.npy`` through a memory-mapped temporary file, then renames it."""
    path = Path(path)
    array = np.asarray(array)
    with writing(path.with_name(path.name + ".tmp"), path) as tmp:
        _write_npy(tmp, array)
        os.replace(tmp, path)
    fsync_dir(path.parent)


def save_npz_atomic(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Writes ``arrays`` as one ``.npz`` to a temporary file, fsyncs it, then renames it."""
    path = Path(path)
    with writing(path.with_name(path.name + ".tmp"), path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    fsync_dir(path.parent)


class StagedFiles:
    """Files of one folder written under temporary names, then put in place together.

    Each file is written completely (and fsynced) as ``<name>.tmp`` beside its final name;
    :meth:`commit` renames them all, which cannot run out of space. Everything that can fail
    (a full disk, a refused write, an interruption) therefore happens before the first rename
    and leaves the folder's earlier files as they were; :meth:`discard` removes the temporary
    files (an interrupted run's are overwritten by the next one, which uses the same names).
    A refused write raises the one-line InputError of :func:`writing`.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.names: list[str] = []

    def path(self, name: str) -> Path:
        """The temporary file of ``name``."""
        return self.folder / f"{name}.tmp"

    def _add(self, name: str) -> None:
        if name not in self.names:
            self.names.append(name)

    def npy(self, name: str, array: np.ndarray) -> None:
        with writing(self.path(name), self.folder / name) as tmp:
            _write_npy(tmp, np.asarray(array))
        self._add(name)

    def json(self, name: str, obj: Any, indent: int = 2) -> None:
        with writing(self.path(name), self.folder / name) as tmp:
            _write_json(tmp, obj, indent)
        self._add(name)

    def adopt(self, name: str) -> None:
        """Takes ``self.path(name)``, written completely by the caller, as the file ``name``."""
        self._add(name)

    def discard(self) -> None:
        """Removes every temporary file staged so far."""
        for name in self.names:
            try:
                self.path(name).unlink(missing_ok=True)
            except OSError:
                pass
        self.names = []

    def commit(self, *, first: Iterable[str] = (), remove: Iterable[str] = (),
               last: str | None = None) -> list[str]:
        """Puts the staged files in place: removes the files ``first`` (e.g. the marker of a
        complete folder), renames every staged file but ``last``, removes the files ``remove``
        that were not staged (stale outputs of an earlier run), then renames ``last``.
        Returns the names put in place."""
        for name in first:
            (self.folder / name).unlink(missing_ok=True)
        order = [n for n in self.names if n != last] + ([last] if last in self.names else [])
        for name in order[:-1] if last in self.names else order:
            os.replace(self.path(name), self.folder / name)
        for stale in remove:
            if stale not in self.names:
                (self.folder / stale).unlink(missing_ok=True)
        if last in self.names:
            os.replace(self.path(last), self.folder / last)
        fsync_dir(self.folder)
        done, self.names = order, []
        return done
