"""Scale-out measurements on one machine, as the command line runs them.

``python -m benchmarks.scale_out --workdir runs/demo/run [--processes 2] [--params all]
[--proj-kind logra] [--reps 1]``

1. ``compile-cache``: ``tracin-jax influence`` twice on the same run with an empty persistent
   compilation cache folder; the second run loads the compiled programs. Reports both wall times
   and their ratio, and the entries the cache gained.
2. ``processes``: ``tracin-jax influence`` in one process, then under ``tracin-jax launch -n N``
   (N processes pinned to their own share of the cores), each on a fresh feature store and with
   a warm compilation cache (so compilation is not what is compared); reports the wall times,
   their ratio, the stages' own timings (gradients, contraction; compilation included) and the
   largest relative difference of the scores.

One JSON line per measurement on stdout. Every figure is a ratio of runs made by this script, one
after the other, on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _influence(workdir: Path, out: Path, flags: list[str], env: dict, processes: int = 1) -> float:
    cmd = [sys.executable, "-m", "tracin_jax.cli"]
    if processes > 1:
        cmd += ["launch", "-n", str(processes), "--"]
    cmd += ["influence", "--workdir", str(workdir), "--out", str(out), *flags]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return seconds


def _max_rel_diff(a: Path, b: Path) -> float:
    worst = 0.0
    for name in ("scores.npy", "self_influence.npy", "patient_scores.npy"):
        if (a / name).exists():
            x, y = np.load(a / name), np.load(b / name)
            worst = max(worst, float(np.abs(x - y).max() / max(np.abs(x).max(), 1e-30)))
    return worst


def _stage_seconds(out: Path) -> dict:
    """The influence folder's own timings (process 0's): gradients and contraction."""
    t = json.loads((out / "meta.json").read_text())["timings"]
    return {"features_s": t.get("features_s"), "scores_s": t.get("scores_s")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a trained run")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--params", default="all")
    p.add_argument("--proj-kind", default="logra")
    p.add_argument("--chunk-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=1)
    a = p.parse_args(argv)
    workdir = Path(a.workdir)
    flags = ["--params", a.params, "--proj-kind", a.proj_kind, "--chunk-size", str(a.chunk_size)]
    machine = {"cpus": len(os.sched_getaffinity(0)), "load_1min": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory(prefix="tracin-jax-scale-out-") as tmp:
        tmp = Path(tmp)
        env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
        env["TRACIN_JAX_XLA_CACHE"] = str(tmp / "xla")
        run = tmp / "run"
        shutil.copytree(workdir, run, ignore=shutil.ignore_patterns("features", "ground_truth"))
        times = []
        for k in range(2):
            shutil.rmtree(run / "features", ignore_errors=True)
            times.append(_influence(run, tmp / f"cache{k}", flags, env))
            if k == 0:
                entries = len(list((tmp / "xla").iterdir()))
        print(json.dumps({"check": "compile-cache", "flags": flags, "first_s": round(times[0], 2),
                          "second_s": round(times[1], 2),
                          "ratio_first_over_second": round(times[0] / times[1], 2),
                          "cache_entries": entries, **machine}), flush=True)
        for rep in range(a.reps):
            res = {}
            for n in (1, a.processes):
                shutil.rmtree(run / "features", ignore_errors=True)
                res[n] = _influence(run, tmp / f"p{n}-{rep}", flags, env, processes=n)
            print(json.dumps({
                "check": "processes", "flags": flags, "processes": a.processes,
                "one_s": round(res[1], 2), "n_s": round(res[a.processes], 2),
                "speedup": round(res[1] / res[a.processes], 2),
                "max_rel_diff": _max_rel_diff(tmp / f"p1-{rep}", tmp / f"p{a.processes}-{rep}"),
                "one_stages": _stage_seconds(tmp / f"p1-{rep}"),
                "n_stages": _stage_seconds(tmp / f"p{a.processes}-{rep}"),
                **machine}), flush=True)


if __name__ == "__main__":
    main()
