"""How far the report's scores can be trusted: the evaluation of its influence folder, if any.

``tracin-jax evaluate --out E`` writes ``E/evaluation.json``: per influence folder (a
*variant*, keyed by folder name, recording the folder's path under ``"folder"``) its class-wise
LDS against retraining with a 95% bootstrap interval, its paired difference with the
model-free baseline (``vs_baseline``) and its leave-top-k-out changes. :func:`trust_section`
reads the entry of the report's influence folder and returns the ``"trust"`` part of the
report's metrics; :mod:`.page` shows it.

Which evaluation (:func:`find_evaluation`):

- ``evaluation`` given (``explain --evaluation E``; ``E`` the ``evaluate --out`` folder or its
  ``evaluation.json``): it must be an evaluation of the same run that scored this influence
  folder, else one-line :class:`~tracin_jax.errors.InputError`;
- otherwise the newest (by modification time) ``evaluation.json`` among ``W/*/``, ``W/*/*/``
  (``W`` the run's workdir) and the folders beside the influence folder (``DIR/../*/``) that
  scored this influence folder of this run; evaluations of other runs or other folders are
  ignored. None found: the section says the scores have not been checked against retraining
  and gives the two commands that do it.

A variant is this influence folder when its recorded ``folder`` resolves to the same folder
(paths relative to where ``evaluate`` ran are tried from the current folder), else when its
name is the influence folder's name. The evaluation's run is the ``run_identity`` (the run hash
of :mod:`tracin_jax.identity`) recorded in ``evaluation.json`` or in its ground truth's
``meta.json``; without one, its ``workdir`` when that folder exists; an evaluation recording
neither is taken as this run's.

Only the JSON file is read: nothing is imported from :mod:`tracin_jax.evaluate`.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

from tracin_jax.errors import InputError

EVALUATION_FILE = "evaluation.json"
SIDES = ("proponents", "random", "opponents")
PAIRED = ("proponents_minus_random", "proponents_minus_opponents")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _same_folder(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _load(path: Path, option: str | None) -> dict | None:
    """evaluation.json at ``path`` (a file or the folder holding it); with ``option`` a problem
    is a one-line InputError, without it None."""
    file = path / EVALUATION_FILE if path.is_dir() else path
    if not file.is_file():
        if option is None:
            return None
        raise InputError(f"{option} {path}: no {EVALUATION_FILE} there (give the --out folder "
                         "of `tracin-jax evaluate`)")
    ev = _read_json(file)
    if not isinstance(ev, dict) or not isinstance(ev.get("variants"), dict):
        if option is None:
            return None
        raise InputError(f"{option} {file}: not an evaluation written by `tracin-jax evaluate` "
                         "(unreadable, or no variants)")
    return {**ev, "_file": file}


def recorded_run(ev: dict) -> tuple[str | None, str | None]:
    """(run identity, workdir) an evaluation records: its own ``run_identity``/``workdir``,
    completed from its ground truth's ``meta.json`` when that folder can be read."""
    rid, wd = ev.get("run_identity"), None
    gt_path = (ev.get("ground_truth") or {}).get("path")
    if isinstance(gt_path, str) and gt_path:
        meta = _read_json(Path(gt_path) / "meta.json")
        if isinstance(meta, dict):
            rid = rid or meta.get("run_identity")
            wd = meta.get("workdir")
    wd = wd or ev.get("workdir")
    return (rid if isinstance(rid, str) else None), (wd if isinstance(wd, str) else None)


def _run_hash(run) -> str | None:
    """The run hash of a loaded Run (None for run-like objects without a config and checkpoints)."""
    if not (hasattr(run, "config") and hasattr(run, "checkpoint")):
        return None
    from tracin_jax import identity

    return identity.describe(run, [])["run"]


def same_run(ev: dict, run) -> bool:
    """Whether evaluation ``ev`` was computed from ``run`` (module docstring)."""
    rid, wd = recorded_run(ev)
    mine = _run_hash(run)
    if rid is not None and mine is not None:
        return rid == mine
    workdir = getattr(run, "workdir", None)
    if wd is not None and workdir is not None and Path(wd).is_dir():
        return _same_folder(wd, workdir)
    return True


def matching_variant(ev: dict, influence_dir: str | os.PathLike) -> str | None:
    """Name of the variant of ``ev`` that is ``influence_dir`` (resolved path, else name)."""
    variants = ev.get("variants") or {}
    for name, v in variants.items():
        folder = v.get("folder") if isinstance(v, dict) else None
        if isinstance(folder, str) and folder and _same_folder(folder, influence_dir):
            return name
    name = Path(influence_dir).resolve().name
    return name if isinstance(variants.get(name), dict) else None


def candidates(workdir: str | os.PathLike, influence_dir: str | os.PathLike) -> list[Path]:
    """The ``evaluation.json`` files looked at without ``--evaluation``, newest first."""
    w, beside = Path(workdir), Path(influence_dir).resolve().parent
    found = {p.resolve() for pattern in (f"*/{EVALUATION_FILE}", f"*/*/{EVALUATION_FILE}")
             for p in w.glob(pattern) if p.is_file()}
    found |= {p.resolve() for p in beside.glob(f"*/{EVALUATION_FILE}") if p.is_file()}

    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return float("-inf")

    return sorted(found, key=lambda p: (-mtime(p), str(p)))


def find_evaluation(run, influence_dir: str | os.PathLike,
                    evaluation: str | os.PathLike | None = None) -> tuple[dict, str] | None:
    """(evaluation dict, variant name) of the evaluation that scored ``influence_dir`` of
    ``run``, or None (module docstring). ``evaluation`` given: InputError (one line) when it is
    unreadable, of another run, or did not score this folder."""
    if evaluation is not None:
        option = "--evaluation"
        ev = _load(Path(evaluation), option)
        if not same_run(ev, run):
            rid, wd = recorded_run(ev)
            raise InputError(f"{option} {evaluation} evaluated another run ({wd or rid}) than "
                             f"--workdir {getattr(run, 'workdir', '?')}; evaluate this run's "
                             "influence folder instead")
        name = matching_variant(ev, influence_dir)
        if name is None:
            have = ", ".join(sorted(ev["variants"])) or "none"
            raise InputError(f"{option} {evaluation} did not score --influence {influence_dir} "
                             f"(it scored: {have}); run `tracin-jax evaluate` with this folder")
        return ev, name
    for file in candidates(getattr(run, "workdir", "."), influence_dir):
        ev = _load(file, None)
        if ev is None or not same_run(ev, run):
            continue
        name = matching_variant(ev, influence_dir)
        if name is not None:
            return ev, name
    return None


def _lds(entry: dict | None) -> dict | None:
    """An LDS dict without its per-target list."""
    if not isinstance(entry, dict):
        return None
    return {k: v for k, v in entry.items() if k != "per_target"}


def _leave_out(entry: dict | None) -> dict | None:
    """{k: {side: {"mean", "ci", "n"}, paired: {"mean", "ci", "n", "wins", "wilcoxon_p"}}},
    per-query lists left out."""
    if not isinstance(entry, dict) or not entry:
        return None
    out = {}
    for k, row in sorted(entry.items(), key=lambda kv: int(kv[0])):
        out[str(k)] = {key: {f: v for f, v in row[key].items() if f != "per_query"}
                       for key in (*SIDES, *PAIRED) if isinstance(row.get(key), dict)}
    return out


def commands(run, influence_dir: str | os.PathLike, out: str | os.PathLike | None) -> list[str]:
    """The two commands that check this influence folder: evaluate, then explain with it."""
    w = shlex.quote(str(getattr(run, "workdir", "W")))
    d = shlex.quote(str(influence_dir))
    e = shlex.quote(str(Path(influence_dir).parent / "evaluation"))
    r = shlex.quote(str(out)) if out is not None else "R"
    return [f"tracin-jax evaluate --workdir {w} --influence {d} --out {e}",
            f"tracin-jax explain --workdir {w} --influence {d} --out {r} --evaluation {e}"]


def trust_section(run, influence_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                  evaluation: str | os.PathLike | None = None) -> dict:
    """The report's ``"trust"`` metrics.

    With an evaluation (:func:`find_evaluation`): ``{"checked": True, "evaluation": path of
    evaluation.json, "given": bool (``evaluation`` was passed), "variant", "gradient", "loss",
    "lds": {"mean", "ci", "n_targets", "per_class": {name: {"mean", "ci", "n_targets"}}},
    "vs_baseline": {"mean", "ci"} | None, "baseline": {"name", "lds"} | None, "leave_out": {k:
    {side: {"mean", "ci", "n"}, "proponents_minus_random" | "proponents_minus_opponents":
    {"mean", "ci", "n", "wins", "wilcoxon_p"}}} | None, "leave_out_queries", "subsets",
    "seeds", "fraction", "level", "resamples", "noise_ceiling"}``. Without: ``{"checked":
    False, "commands": [evaluate, explain]}``. LDS and its intervals as in
    :mod:`tracin_jax.evaluate.lds`; leave-out loss changes are positive when the loss rises.
    """
    found = find_evaluation(run, influence_dir, evaluation)
    if found is None:
        return {"checked": False, "commands": commands(run, influence_dir, out)}
    ev, name = found
    v = ev["variants"][name]
    gt = ev.get("ground_truth") or {}
    boot = ev.get("bootstrap") or {}
    baselines = ev.get("baselines") or {}
    base_name = next(iter(baselines), None)
    ceiling = (gt.get("noise_ceiling") or {}).get(v.get("loss"))
    lo = _leave_out(v.get("leave_out"))
    return {
        "checked": True, "evaluation": str(ev["_file"]), "given": evaluation is not None,
        "variant": name, "gradient": v.get("gradient"), "loss": v.get("loss"),
        "lds": _lds(v.get("lds")), "vs_baseline": v.get("vs_baseline"),
        "baseline": ({"name": base_name, "lds": _lds((baselines[base_name] or {}).get("lds"))}
                     if base_name is not None else None),
        "leave_out": lo,
        "leave_out_queries": (ev.get("leave_out") or {}).get("queries_n") if lo else None,
        "subsets": gt.get("subsets"), "seeds": gt.get("seeds"), "fraction": gt.get("fraction"),
        "level": boot.get("level", 0.95), "resamples": boot.get("resamples"),
        "noise_ceiling": ceiling.get("mean") if isinstance(ceiling, dict) else None,
    }
