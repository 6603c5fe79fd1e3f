"""Ground-truth retraining of a run with ``--workers 1`` against ``--workers N`` (default 2).

    python -m benchmarks.evaluate_workers --workdir runs/demo/run --influence runs/demo/influence
    python -m benchmarks.evaluate_workers --workdir W --influence I --subsets 4 --workers 1,2

For each worker count, copies the run into a fresh folder without its ``ground_truth/`` (so
nothing is cached) and times, as a separate process, ``tracin-jax evaluate --worker --workers N
--leave-out-queries 0`` with the given ``--subsets``/``--fraction``/``--seeds``/``--seed`` (the
same subsets for every count): the ground truth's models only, process start and compilation
included. The persistent compilation cache is off, so no measurement reuses another's programs.
Prints one JSON line per measurement (wall seconds, models, seconds per model, the machine and
its load average before the run) and a last line with the ratio of each to the first.

Checks that the workers train the same models. XLA's thread pool follows the cores a process
may use and some reductions are split over it, so float rounding, and after many steps the
models, depend on the number of cores of the training process. Unless ``--no-check``, one more
run, ``--workers 1`` pinned to one core (as each worker is), is the reference: every count above
1 must give bit for bit its unit outputs. The last line also reports how far the all-core
``--workers 1`` models are from it (largest absolute difference per output). Exits 1 when the
check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

OUTPUTS = ("dice_loss", "ce_loss", "dice")


def _units(workdir: Path) -> dict[str, dict]:
    found = {}
    for f in sorted((workdir / "ground_truth").glob("*/units/*.npz")):
        with np.load(f) as z:
            found[f"{f.parent.parent.name}/{f.name}"] = {k: z[k] for k in OUTPUTS}
    return found


def measure(workdir: Path, influence: Path, scratch: Path, workers: int, settings: list[str],
            env: dict, cpus: list[int] | None = None) -> dict:
    """Times the ground truth of a fresh copy of ``workdir`` with ``workers`` processes."""
    scratch.mkdir(parents=True, exist_ok=True)
    work = scratch / f"run-workers{workers}"
    shutil.copytree(workdir, work, ignore=shutil.ignore_patterns("ground_truth"))
    cmd = [sys.executable, "-m", "tracin_jax.cli", "evaluate", "--workdir", str(work),
           "--influence", str(influence), "--out", str(scratch / f"eval-{workers}"),
           "--leave-out-queries", "0", "--no-randomisation", "--no-baseline", *settings,
           "--worker", "--workers", str(workers)]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None  # this process has no threads
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=pin)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"workers {workers}: exit status {proc.returncode}: "
                 f"{(proc.stderr.strip().splitlines() or ['no message'])[-1]}")
    units = _units(work)
    return {"workers": workers, "wall_s": round(wall, 2), "models": len(units),
            "s_per_model": round(wall / max(len(units), 1), 3), "load_before": round(load, 2),
            "cpus": len(cpus or os.sched_getaffinity(0)), "machine": platform.node(),
            "_units": units, "_work": str(work)}


def compare(a: dict, b: dict) -> dict:
    """Two runs' unit outputs: bit for bit identical, and the largest absolute difference of
    each output."""
    if sorted(a) != sorted(b):
        return {"identical": False, "max_abs_diff": None, "units": [len(a), len(b)]}
    same, diff = True, {k: 0.0 for k in OUTPUTS}
    for name in a:
        for k in OUTPUTS:
            x, y = np.asarray(a[name][k], np.float64), np.asarray(b[name][k], np.float64)
            same &= bool(np.array_equal(x, y, equal_nan=True))
            d = np.abs(x - y)
            if d.size and not np.isnan(d).all():
                diff[k] = max(diff[k], float(np.nanmax(d)))
    return {"identical": same, "max_abs_diff": diff}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a trained run")
    p.add_argument("--influence", required=True, help="an influence folder of that run")
    p.add_argument("--workers", default="1,2", help="worker counts to time, e.g. 1,2")
    p.add_argument("--subsets", type=int, default=4)
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", action="store_true",
                   help="skip the one-core reference run and the identity check")
    p.add_argument("--keep", action="store_true", help="keep the copies of the run")
    args = p.parse_args(argv)

    counts = [int(x) for x in args.workers.split(",") if x.strip()]
    settings = ["--subsets", str(args.subsets), "--fraction", str(args.fraction),
                "--seeds", str(args.seeds), "--seed", str(args.seed)]
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(TRACIN_JAX_XLA_CACHE="off", TRACIN_JAX_QUIET="1")
    scratch = Path(tempfile.mkdtemp(prefix="tracin-jax-workers-bench-"))
    workdir, influence = Path(args.workdir), Path(args.influence)
    try:
        rows = []
        for n in counts:
            rows.append(measure(workdir, influence, scratch, n, settings, env))
            print(json.dumps(_public(rows[-1])), flush=True)
        summary: dict = {"speedup_vs": f"workers {rows[0]['workers']}", "speedup": {
            str(r["workers"]): round(rows[0]["wall_s"] / r["wall_s"], 3) for r in rows[1:]}}
        ok = True
        if not args.no_check:
            ref = measure(workdir, influence, scratch / "one-core", 1, settings, env,
                          cpus=sorted(os.sched_getaffinity(0))[:1])
            print(json.dumps({**_public(ref), "reference": "one core"}), flush=True)
            summary["vs_one_core_reference"] = {}
            for r in rows:
                c = compare(ref["_units"], r["_units"])
                summary["vs_one_core_reference"][str(r["workers"])] = c
                if r["workers"] > 1:
                    ok &= c["identical"]
            summary["passed"] = ok
        print(json.dumps(summary), flush=True)
        return 0 if ok else 1
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)


def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


if __name__ == "__main__":
    sys.exit(main())
