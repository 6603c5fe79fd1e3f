"""The offline HTML report and ``metrics.json``, written so that nothing else is lost.

The report is a folder: ``index.html`` (no scripts, no external resources), the PNG figures it
references by relative path, ``metrics.json`` with every number shown, and
``report_manifest.json`` listing the files the report wrote. It is built in a temporary folder
``.<out>.tmp-<pid>-<random>`` next to ``out``:

- ``out`` absent: the finished folder is renamed into place (one atomic step);
- ``out`` an earlier report: each file of the new report replaces its namesake atomically
  (figures first, ``index.html`` last), then the earlier report's files that the new one does
  not write are removed. Only files listed in the earlier manifest (or, for a report written
  before manifests existed, its ``index.html``, ``metrics.json`` and the images it shows) are
  ever replaced or removed: a user's own files in the folder stay;
- ``out`` any other folder: the report is added to it and nothing is removed; a file there
  with the name of a report file refuses the run (one-line error) before anything is written.

An interrupted run leaves the previous report readable; its temporary folder is removed by
the next run for the same ``out`` (only folders with that prefix whose process is gone).
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from tracin_jax.atomic import fsync_dir, write_json_atomic
from tracin_jax.errors import InputError

MANIFEST = "report_manifest.json"
FIXED_FILES = ("index.html", "metrics.json", MANIFEST)
TMP_MARK = ".tmp-"


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


def _plain(name: Any) -> bool:
    """A bare file name (no folder part), as every report file is."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def report_files(out: Path) -> set[str]:
    """Names of the files an earlier report in ``out`` wrote (empty set: not a report folder).

    Read from ``report_manifest.json``; a report written before manifests existed (``index.html``
    and a ``metrics.json`` with the report's sections, no manifest) wrote exactly
    ``index.html``, ``metrics.json`` and the images its page shows.
    """
    man = out / MANIFEST
    if man.is_file():
        try:
            files = json.loads(man.read_text()).get("files", [])
        except (OSError, ValueError, AttributeError):
            raise InputError(f"{man}: unreadable report manifest; remove it or choose another "
                             "--out") from None
        return {f for f in files if _plain(f)} | {MANIFEST}
    try:
        old = json.loads((out / "metrics.json").read_text())
        page_text = (out / "index.html").read_text(encoding="utf-8")
    except (OSError, ValueError):
        return set()
    if not (isinstance(old, dict) and {"local", "global", "influence"} <= set(old)):
        return set()
    shown = {n for n in re.findall(r'<img src="([^"]+)"', page_text) if _plain(n)}
    return {"index.html", "metrics.json"} | shown


def _clashes(out: Path, names: Iterable[str], ours: set[str]) -> list[str]:
    return sorted(n for n in names if n not in ours and os.path.lexists(out / n))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale(out: Path) -> list[Path]:
    """Removes temporary folders of earlier, killed runs for ``out``; returns them.

    Only ``.<out name>.tmp-*`` (and ``.<out name>.old-*`` from older versions) beside ``out``,
    and of those only ones whose ``<pid>`` part names no running process (folders without a pid
    are from older versions and removed).
    """
    gone = []
    if not out.parent.is_dir():
        return gone
    for kind in ("tmp", "old"):
        prefix = f".{out.name}.{kind}-"
        for p in out.parent.iterdir():
            if not p.name.startswith(prefix) or not p.is_dir() or p.is_symlink():
                continue
            m = re.match(r"(\d+)-[0-9a-f]+$", p.name[len(prefix):])
            if m and (int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1)))):
                continue  # a report being built right now
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    if out.is_dir():
        (out / (MANIFEST + ".tmp")).unlink(missing_ok=True)  # write_json_atomic's, if killed
    return gone


def start(out: str | os.PathLike) -> Path:
    """Checks ``out``, removes stale temporary folders of it, returns a fresh one to build in.

    The temporary folder gets the ordinary mode (0o777 minus the umask, 0755 under umask 022),
    which the report keeps when renamed into place. Raises InputError when ``out`` is a file or
    holds files of its own with the names ``index.html``, ``metrics.json`` or the manifest.
    """
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise InputError(f"--out {out}: exists and is not a folder")
        clash = _clashes(out, FIXED_FILES, report_files(out))
        if clash:
            raise InputError(f"--out {out}: holds {clash[0]!r}, which is not from an earlier report "
                             "and would be overwritten; move it or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    while True:
        tmp = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(tmp)
            return tmp
        except FileExistsError:
            continue


def _order(names: Iterable[str]) -> list[str]:
    """Figures and data first, ``index.html`` last: a page never shows files not yet in place."""
    return sorted(names, key=lambda n: (n == "index.html", n == "metrics.json", n))


def finish(tmp: Path, out: str | os.PathLike) -> Path:
    """Moves the complete report ``tmp`` to ``out`` (see the module docstring); removes ``tmp``."""
    out = Path(out)
    new = sorted(p.name for p in tmp.iterdir() if p.name != MANIFEST)
    manifest = {"format": 1, "written_by": "tracin_jax explain", "files": new + [MANIFEST]}
    if not out.exists():
        write_json_atomic(tmp / MANIFEST, manifest)
        os.replace(tmp, out)
        fsync_dir(out.parent)
        return out
    if not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    ours = report_files(out)
    clash = _clashes(out, new + [MANIFEST], ours)
    if clash:
        raise InputError(f"--out {out}: holds {clash[0]!r}, which is not from an earlier report "
                         "and would be overwritten; move it or choose another folder")
    # List every file that may be ours during the swap, so a kill in between loses track of none.
    union = sorted((ours - {MANIFEST}) | set(new))
    write_json_atomic(out / MANIFEST, {**manifest, "files": union + [MANIFEST]})
    for name in _order(new):
        os.replace(tmp / name, out / name)
    for name in sorted(ours - set(new) - {MANIFEST}):
        p = out / name
        if p.is_file() or p.is_symlink():
            p.unlink()
    write_json_atomic(out / MANIFEST, manifest)
    fsync_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)
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
