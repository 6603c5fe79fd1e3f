"""Checks on output locations, run by every stage before any work.

:func:`check_writable_folder` refuses an output folder that cannot exist or cannot be written
(a file in its place or above it, a read-only folder or file system) and
:func:`check_free_space` one whose file system has less room than the stage will write; both
raise one-line :class:`~tracin_jax.errors.InputError` naming the path and create nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from tracin_jax.errors import InputError


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` itself when it exists, else its nearest existing parent."""
    probe = Path(path)
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    return probe


def check_writable_folder(path: str | os.PathLike, what: str) -> None:
    """Raises a one-line InputError unless folder ``path`` exists and is writable or can be
    created (its nearest existing parent is a writable folder). Creates nothing.

    ``what`` names the path in the message (e.g. ``--out``). Permission bits are read with
    ``os.access``; a real probe (an empty folder made and removed at once) then also finds
    what ``os.access`` does not show, as root included: a read-only file system.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {path}: exists and is not a folder")
    probe = nearest_existing(path)
    if probe.exists() and not probe.is_dir():
        raise InputError(f"{what} {path}: cannot be created, {probe} is a file")
    detail = "is not writable" if probe == path else f"cannot be created, {probe} is not writable"
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{what} {path}: {detail}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".tracin-jax-probe-", dir=probe))
    except OSError as e:
        reason = os.strerror(e.errno).lower() if e.errno else type(e).__name__
        raise InputError(f"{what} {path}: {detail} ({reason})") from None


def size_text(n: float) -> str:
    """Bytes for a message: ``512 KB``, ``3.4 MB``, ``1.25 GB``."""
    for unit, scale in (("GB", 2**30), ("MB", 2**20)):
        if n >= scale:
            return f"{n / scale:.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{max(0, n) / 2**10:.0f} KB"


def check_free_space(needs: Sequence[tuple[str, str | os.PathLike, int]],
                     margin: int = 1 << 20) -> None:
    """Refuses (one-line InputError) to start when a file system has less free space than the
    stage will write to it.

    ``needs``: ``(what, path, bytes)`` entries, e.g. ``("--out", out, 4 * 10**9)``; entries on the
    same file system (paths not created yet count on their nearest existing parent's) are
    added up, plus ``margin`` per file system (small files, e.g. meta.json). The message names
    the paths, the bytes needed (margin included) and the bytes free.
    """
    groups: dict[int, list[tuple[str, Path, int]]] = {}
    anchor: dict[int, Path] = {}
    for what, path, nbytes in needs:
        probe = nearest_existing(path)
        try:
            dev = os.stat(probe).st_dev
        except OSError:
            continue
        groups.setdefault(dev, []).append((what, Path(path), int(nbytes)))
        anchor.setdefault(dev, probe)
    for dev, entries in groups.items():
        need = sum(n for _, _, n in entries)
        if need <= 0:
            continue
        try:
            free = shutil.disk_usage(anchor[dev]).free
        except OSError:
            continue
        need += margin
        if free >= need:
            continue
        names = " and ".join(f"{what} {path}" for what, path, _ in entries)
        parts = ", ".join(f"{size_text(n)} for {what}" for what, _, n in entries) \
            if len(entries) > 1 else None
        raise InputError(f"{names}: needs about {size_text(need)} of disk space"
                         f"{f' ({parts})' if parts else ''}, only {size_text(free)} free on "
                         f"its file system; free some space or choose another location")
