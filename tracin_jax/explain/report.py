"""The offline HTML report and ``metrics.json``, written atomically.

The report is a folder: ``index.html`` (no scripts, no external resources), the PNG figures it
references by relative path, and ``metrics.json`` with every number shown. It is built in a
temporary folder next to ``out`` and renamed into place once complete, so an interrupted run
leaves any previous report untouched.
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from tracin_jax.errors import InputError

REPORT_MARKERS = ("index.html", "metrics.json")


def jsonable(obj: Any) -> Any:
    """numpy arrays/scalars -> lists/numbers; NaN and inf -> None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def start(out: str | os.PathLike) -> Path:
    """Checks ``out`` and returns a fresh temporary folder beside it to build the report in.

    ``out`` may be absent, an empty folder, or a previous report (a folder holding index.html or
    metrics.json); anything else raises InputError, so no unrelated folder is ever replaced.
    """
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise InputError(f"--out {out}: exists and is not a folder")
        if any(out.iterdir()) and not any((out / m).exists() for m in REPORT_MARKERS):
            raise InputError(f"--out {out}: exists, is not empty and holds no previous report; "
                             "choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def finish(tmp: Path, out: str | os.PathLike) -> Path:
    """Moves the complete report ``tmp`` to ``out``, replacing a previous report there."""
    out = Path(out)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rmdir(old)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def abandon(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def write_metrics(folder: Path, metrics: dict) -> None:
    (folder / "metrics.json").write_text(json.dumps(jsonable(metrics), indent=1, allow_nan=False))


# ---------------------------------------------------------------------------------------------
# HTML helpers

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1250px; color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
h3 { margin-top: 1.4em; }
table { border-collapse: collapse; margin: .6em 0 1em; font-size: .88em; }
th, td { border: 1px solid #d0d0d0; padding: .25em .6em; text-align: right; vertical-align: top; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
img { max-width: 100%; border: 1px solid #e4e4e4; margin: .4em 0; }
.note { color: #555; font-size: .9em; } .verdict { background: #f6f6ee; padding: .6em 1em;
        border-left: 4px solid #999; }
code { background: #f3f3f3; padding: 0 .25em; }
.swatch { display: inline-block; width: .9em; height: .9em; vertical-align: -0.1em;
          margin-right: .3em; border: 1px solid #666; }
"""


def esc(x: Any) -> str:
    return html.escape(str(x))


def fmt(v: Any, digits: int = 4) -> str:
    """Compact number formatting for tables; None/NaN -> 'n/a'."""
    if v is None:
        return "n/a"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(float(v)):
            return "n/a"
        return f"{float(v):.{digits}g}"
    return str(v)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], left: int = 1) -> str:
    """An HTML table; the first ``left`` columns are left-aligned text, the rest numbers."""
    h = "".join(f'<th class="{"l" if n < left else ""}">{esc(c)}</th>' for n, c in enumerate(header))
    body = []
    for row in rows:
        cells = []
        for n, c in enumerate(row):
            cls = ' class="l"' if n < left else ""
            cells.append(f"<td{cls}>{c if isinstance(c, Raw) else esc(fmt(c))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{h}</tr>{''.join(body)}</table>"


class Raw(str):
    """A table cell that is already HTML."""


def figure(name: str, alt: str) -> str:
    return f'<p><img src="{esc(name)}" alt="{esc(alt)}"></p>'


def page(title: str, sections: Sequence[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(sections) + "\n</body></html>\n")
