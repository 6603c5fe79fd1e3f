"""User-facing errors.

Anything a user can cause (a bad folder, a corrupt file, an unknown config key, a full disk)
raises :class:`InputError` with one line that names the file or value and what is wrong. The
CLI prints that line and exits with status 2; no traceback.
"""

from __future__ import annotations

import errno
import os

# OSError numbers that mean "this output cannot be written here" (not a bug): a full disk, a
# full quota, a read-only file system, no permission. They become one-line InputErrors.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


class InputError(ValueError):
    """A problem with the user's input: printed as one line, exit status 2."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def cannot_write(path, error: OSError) -> InputError:
    """The one-line error for an output that could not be written: ``<path>: cannot be
    written: no space left on device`` (the OS's own words for ``error.errno``)."""
    reason = os.strerror(error.errno).lower() if error.errno else str(error)
    return InputError(f"{path}: cannot be written: {reason}")


def write_error(error: BaseException, path=None) -> InputError | None:
    """``error`` as a one-line :class:`InputError` when it is an OSError of
    :data:`WRITE_ERRNOS`, naming the file the OS names, else ``path``; None otherwise.

    A full disk, quota or read-only file system reads ``<path>: cannot be written: <reason>``;
    a refused permission (which may also come from reading) ``<path>: permission denied``."""
    if not isinstance(error, OSError) or error.errno not in WRITE_ERRNOS:
        return None
    where = error.filename if error.filename is not None else path
    if where is None:
        where = "output"
    if error.errno in (errno.EACCES, errno.EPERM):
        return InputError(f"{where}: {os.strerror(error.errno).lower()}")
    return cannot_write(where, error)
