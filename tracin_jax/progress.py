"""Progress bars: tqdm on a terminal (or in a notebook), plain timed lines on a file or pipe.

tqdm redraws its bar with carriage returns, which a log file or a pipe (``tracin-jax ... |
tee log``, a batch scheduler's output file) only shows once a bar finishes. On such a stream
:func:`tqdm` here prints one plain line at most every ``TRACIN_JAX_PROGRESS_INTERVAL`` seconds
(default 30) and one when the bar closes::

    train gradients: 120/600 (20%) [00:41<02:45, 2.91ex/s, epoch=2]

Every bar in the project is made by this function; it takes tqdm's arguments. With
``TRACIN_JAX_QUIET=1`` (set in every JAX process but process 0, see
:mod:`tracin_jax.distributed`) every bar is disabled.
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm as _plain_tqdm
from tqdm.auto import tqdm as _auto_tqdm

DEFAULT_INTERVAL = 30.0
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
LINE_FORMAT_NO_TOTAL = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("TRACIN_JAX_PROGRESS_INTERVAL", DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    ip = getattr(shell, "get_ipython", lambda: None)() if shell else None
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class LineBar(_plain_tqdm):
    """A tqdm that writes a whole line per update (no carriage return), at most one per
    ``mininterval`` seconds, plus a final line when it closes."""

    def __init__(self, *args, interval: float | None = None, **kwargs):
        interval = _interval() if interval is None else interval
        for key in ("dynamic_ncols", "ncols", "ascii", "position"):
            kwargs.pop(key, None)
        kwargs.update(mininterval=interval, maxinterval=max(interval, 10.0), miniters=1)
        self._last_line, self._last_time, self._force = None, None, False
        super().__init__(*args, **kwargs)

    def __str__(self) -> str:
        d = self.format_dict
        d["bar_format"] = LINE_FORMAT if d.get("total") else LINE_FORMAT_NO_TOTAL
        d["desc"] = d.get("prefix") or "progress"
        return self.format_meter(**d)

    def display(self, msg=None, pos=None):
        if msg is None:
            msg = str(self)
        if not msg.strip() or msg == self._last_line:  # tqdm clears with '' when closing
            return True
        now = self._time()
        # set_postfix and friends refresh on every call; a line is due once per interval.
        if (not self._force and self._last_time is not None
                and now - self._last_time < self.mininterval):
            return True
        self._last_line, self._last_time = msg, now
        self.fp.write(msg + "\n")
        self.fp.flush()
        return True

    def close(self):
        if not self.disable and self._last_line != str(self):
            self._force = True
            self.display()
        self.leave = False  # the final line is written; nothing to clear or redraw
        super().close()


def tqdm(*args, **kwargs):
    """``tqdm.auto.tqdm(*args, **kwargs)`` when its stream (``file``, default stderr) is a
    terminal or this runs in a notebook; otherwise a :class:`LineBar` printing plain lines."""
    stream = kwargs.get("file") or sys.stderr
    if os.environ.get("TRACIN_JAX_QUIET") == "1":
        kwargs["disable"] = True
    if kwargs.get("disable") or is_terminal(stream) or _in_notebook():
        return _auto_tqdm(*args, **kwargs)
    return LineBar(*args, **kwargs)


__all__ = ["DEFAULT_INTERVAL", "LineBar", "is_terminal", "tqdm"]
