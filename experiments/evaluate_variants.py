"""Which influence variant holds up under retraining? The demo-size evaluation study.

Run (from the repository root)::

    python -m experiments.evaluate_variants                 # demo size -> runs/evaluate/
    python -m experiments.evaluate_variants --seeds 2       # also measures the noise ceiling
    python -m experiments.evaluate_variants --small         # tiny smoke run (test suite size)

Every stage is resumable (rerun the same command after an interruption): the synthetic data,
the trained run, each influence folder (skipped when its meta.json exists; the feature stores
resume), the ground truth (one unit per retrained model) and the leave-out retrainings (one
cached file per removal set).

What it does:

1. writes ``--cases`` synthetic BraTS-2019-layout cases (default 40: 32 training patients, so
   a half subset holds 16 patients; with the demo's 12 training patients a half holds 6 and the
   ground truth is mostly noise) and trains the ``demo`` config on them;
2. computes class-wise influence (test split) for every variant: the ``presets`` of every
   method in the registry (``tracin_jax.influence.methods.METHODS``; each method's presets are
   in its own file, so a new method brings its own), e.g. ``head-dice``, the paper (decoder
   head, Dice class gradients, all checkpoints). ``--list`` prints them with their options;
   ``--variants`` chooses some;
3. runs ``tracin-jax evaluate`` on all of them: class-wise LDS against ``--subsets`` retrainings
   on random halves of the training patients x ``--seeds`` training seeds, leave-top-k-out for
   ``--leave-out-variants`` (by default the paper's and cosine head; every variant multiplies
   its retrainings), model randomisation, and prints the table (``runs/evaluate/eval/
   evaluation.md``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# The order of the study's earlier tables (results are keyed by variant name; this only keeps
# the rows where they were). Presets not listed follow in registry order.
EARLIER_ORDER = ("head-dice", "all-proj-dice", "head-ce", "head-cos", "all-proj-cos",
                 "head-dice-last", "head-trak", "ekfac-dice", "head-ekfac-cos", "head-adam",
                 "head-adam-cos", "head-relatif", "head-adam-relatif", "all-proj-adam",
                 "all-logra-dice", "all-logra-cos")


def study_variants() -> dict[str, dict]:
    """{variant name: run_influence keywords (with ``method``)}: every registered method's
    presets, those of :data:`EARLIER_ORDER` first in that order."""
    from tracin_jax.influence.methods import presets

    found = presets()
    first = [n for n in EARLIER_ORDER if n in found]
    return {n: found[n] for n in first + [n for n in found if n not in first]}


VARIANTS = study_variants()
DEFAULT_CASES = 40
SMALL_SHAPE = (80, 80, 48)
SMALL_OVERRIDES = ("data.crop=8,72,8,72", "data.downsample=2", "data.slices=26:30",
                   "train.epochs=3")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/evaluate")
    p.add_argument("--cases", type=int, default=None, help=f"synthetic cases (default {DEFAULT_CASES})")
    p.add_argument("--seed", type=int, default=0, help="data, subsets, queries")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--subsets", type=int, default=None)
    p.add_argument("--fraction", type=float, default=None)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--leave-out-queries", type=int, default=None,
                   help="default 8 (the --small preset: 2)")
    p.add_argument("--leave-out-k", default=None, help="default 1,3 (the --small preset: 1)")
    p.add_argument("--leave-out-random", type=int, default=None)
    p.add_argument("--leave-out-variants", default="head-dice,head-cos")
    p.add_argument("--leave-out-steps", default="epochs",
                   help="epochs | matched (leave-out models train as many steps as on all patients)")
    p.add_argument("--no-randomisation", action="store_true")
    p.add_argument("--mislabel", default=None, help="results.json of experiments.mislabel")
    p.add_argument("--mode", default="auto")
    p.add_argument("--small", action="store_true", help="tiny data and config (smoke test)")
    p.add_argument("--list", action="store_true", help="print the variants and their options")
    return p.parse_args(argv)


def run(args) -> dict:
    from tracin_jax import load_run
    from tracin_jax.config import apply_overrides, get_config
    from tracin_jax.data import write_synthetic_dataset
    from tracin_jax.errors import InputError
    from tracin_jax.evaluate.api import run_evaluate
    from tracin_jax.influence import run_influence
    from tracin_jax.training.train import train_and_evaluate

    if args.list:
        for name, kw in VARIANTS.items():
            print(f"{name:20s} " + " ".join(f"{k}={v}" for k, v in kw.items()))
        return {"variants": VARIANTS}
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise InputError(f"--variants {unknown[0]!r}: not one of {', '.join(VARIANTS)}")
    root = Path(args.out)
    cases = args.cases or (6 if args.small else DEFAULT_CASES)
    t0 = time.perf_counter()
    timings = {}

    print(f"[1/4] {cases} synthetic cases -> {root / 'data'}", file=sys.stderr)
    if args.small:
        write_synthetic_dataset(root / "data", cases=cases, seed=args.seed, shape=SMALL_SHAPE)
        config = apply_overrides(get_config("tiny"), list(SMALL_OVERRIDES))
    else:
        write_synthetic_dataset(root / "data", cases=cases, seed=args.seed)
        config = get_config("demo")
    print(f"[2/4] training the '{config.name}' config -> {root / 'run'}", file=sys.stderr)
    t = time.perf_counter()
    train_and_evaluate(config, root / "data", root / "run")
    timings["train_s"] = time.perf_counter() - t
    last = str(load_run(root / "run").checkpoints[-1].epoch)

    folders = []
    for name in names:
        kw = dict(VARIANTS[name])
        if kw.get("checkpoints") == "last":
            kw["checkpoints"] = last
        folder = root / "influence" / name
        folders.append(folder)
        if (folder / "meta.json").exists():
            continue
        print(f"[3/4] influence '{name}' -> {folder}", file=sys.stderr)
        t = time.perf_counter()
        run_influence(root / "run", folder, **kw)
        timings[f"influence_{name}_s"] = time.perf_counter() - t

    from tracin_jax.evaluate.baselines import CLASS_VOXELS

    # the attribution-free baseline too: at most two removal sets per class and k
    lo_variants = [n for n in args.leave_out_variants.split(",") if n.strip() in names]
    lo_variants += [CLASS_VOXELS] if lo_variants else []
    print(f"[4/4] evaluation -> {root / 'eval'}", file=sys.stderr)
    t = time.perf_counter()
    result = run_evaluate(
        root / "run", folders, root / "eval", subsets=args.subsets, fraction=args.fraction,
        seeds=args.seeds, seed=args.seed,
        leave_out_queries=(args.leave_out_queries if args.leave_out_queries is not None or args.small
                           else 8),
        leave_out_k=args.leave_out_k if args.leave_out_k or args.small else "1,3", leave_out_random=args.leave_out_random,
        leave_out_variants=lo_variants, leave_out_steps=args.leave_out_steps,
        randomisation=not args.no_randomisation,
        mislabel=args.mislabel, mode=args.mode, small=args.small,
        log=lambda s: print(s, file=sys.stderr))
    timings["evaluate_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    print((root / "eval" / "evaluation.md").read_text())
    print("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()), file=sys.stderr)
    return result


def main(argv=None) -> int:
    from experiments._cli import run_main

    return run_main("evaluate_variants", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
