"""The paper's setting at full size: BraTS 2019 HGG, width-64 U-Net, 30 epochs, TracIn over 5 checkpoints.

Run (from the repository root)::

    python -m experiments.paper_scale --data PATH/TO/MICCAI_BraTS_2019_Data_Training
    python -m experiments.paper_scale --synthetic                  # same size, synthetic data
    python -m experiments.paper_scale --synthetic --epochs 14      # shorter training
    python -m experiments.paper_scale --synthetic --influence-only # reuse the trained workdir
    python -m experiments.paper_scale --small                      # CPU smoke test (tiny run)

The setting (docs/METHOD.md section 2; the ``paper`` config): the 259 BraTS 2019 HGG cases
(``--synthetic``: 259 synthetic cases in the same layout), patient split 80/20 with seed 1234
(207 / 52 patients, 2070 / 520 slices of 192 x 192, the 10 central slices z = 90..99), width-64
U-Net (31.0M parameters), Adam lr 2e-4 b1 0.5, batch 10, 30 epochs, flip + resize-crop
augmentation; class-wise TracIn of every test slice against every training slice over the
checkpoints of epochs 6, 8, 10, 12, 14 (those trained; with ``--epochs`` below 6, every second
epoch ending at the last), for the ``head`` subset (the final 1x1 conv kernel, 256 numbers,
exact) and for ``all`` parameters with a 4096-dimensional random projection.

What it reports (printed, and ``<out>/paper_scale.json``): dataset sizes; training time per
epoch and the final test Dice; for each subset the influence stage's wall time (gradients,
contraction, files) measured on a fresh feature store, training examples per second (engine,
end to end, and the steady-state rate of the gradient program on one batch), FLOPs per example
counted by XLA's cost analysis (``jax.jit(f).lower(*args).compile().cost_analysis()``; for a
projected subset, the exact gradient program plus the projection's 2 x 3 x D x d FLOPs
(dense kinds), since XLA counts a scanned loop body once), the FLOP rate reached and its
fraction of the device's peak (``--peak-tflops``, else a table of dense peaks for known
devices: TF32 tensor-core peak, the ceiling of JAX's default float32 matmul precision on these
GPUs, and plain FP32; 'unknown' on CPU).

Time: not measured here (this machine has no GPU). Expected on one H100 or H200: the synthetic
data a few minutes to write, training seconds to tens of seconds per epoch (the paper reports
30-45 s per epoch on a V100), ``head`` influence under a minute, ``all`` with projection a few
minutes: XLA counts 52.7 GFLOP per example and checkpoint for the ``head`` class gradients and
368 GFLOP for ``all``; the default CountSketch projection adds 2 x 3 x 31.0M FLOP (0.19 GFLOP),
a dense one to 4096 (``--proj-kind rademacher``) 763 GFLOP, more than the gradients themselves:
about 4.8 PFLOP for ``all`` over the 2590 slices x 5 checkpoints (14.6 PFLOP with the dense
projection). On 2 CPU cores the full setting would take days; ``--small`` (6 tiny synthetic
cases, the ``tiny`` config, 2 epochs) runs the same code path in about a minute and is what the
test uses.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from experiments.mislabel import _clean_json, every_second_epoch

PAPER_CHECKPOINTS = (6, 8, 10, 12, 14)
PAPER_SIZES = {"n_train": 2070, "n_test": 520, "train_patients": 207, "test_patients": 52}
SMALL_SHAPE = (80, 80, 48)
SMALL_OVERRIDES = ("data.crop=8,72,8,72", "data.downsample=2", "data.slices=26:30", "train.epochs=2")

# Dense peak TFLOP/s from the vendors' data sheets: (TF32 tensor core, FP32 non-tensor).
PEAK_TFLOPS = {
    "H200": (494.7, 66.9),        # H200 SXM (same compute as H100 SXM)
    "H100 PCIe": (378.0, 51.2),
    "H100 NVL": (417.5, 59.8),
    "H100": (494.7, 66.9),        # H100 SXM5 (device_kind 'NVIDIA H100 80GB HBM3')
    "A100": (156.0, 19.5),
    "V100": (None, 15.7),         # no TF32; 125 TFLOP/s is its FP16 tensor-core peak
    "L4": (60.0, 30.3),
}


def device_peak(device_kind: str) -> tuple[str | None, float | None, float | None]:
    """(matched name, dense TF32 peak, FP32 peak) in TFLOP/s for a jax ``device_kind``."""
    kind = device_kind.upper()
    for name in sorted(PEAK_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if name.upper() in kind:
            tf32, fp32 = PEAK_TFLOPS[name]
            return name, tf32, fp32
    return None, None, None


def paper_checkpoints(epochs: list[int]) -> list[int]:
    """Epochs 6, 8, 10, 12, 14 among those trained; else every second epoch ending at the last."""
    chosen = [e for e in PAPER_CHECKPOINTS if e in epochs]
    return chosen if chosen else every_second_epoch(epochs)


def xla_flops(jitted, *args) -> float | None:
    """FLOPs of one call of a jitted function, from XLA's cost analysis (None if unavailable)."""
    from tracin_jax.flops import compiled_flops

    try:
        compiled = jitted.lower(*args).compile()
    except Exception:  # noqa: BLE001 - cost analysis is best effort
        return None
    return compiled_flops(compiled)


def steady_rate(fn, args, reps: int = 3) -> float:
    """Examples per second of ``fn(*args)`` (batch = len(args[1])) after one warm-up call."""
    import jax

    jax.block_until_ready(fn(*args))
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return len(args[1]) / best


def gradient_cost(run, subset_name: str, proj_dim: int | None, proj_seed: int, proj_kind: str,
                  batch_size: int) -> dict:
    """FLOPs per example of the class-gradient stage and its steady-state rate on one batch.

    The gradient program is the engine's (same subset, loss and projector). FLOPs: the exact
    gradient program's XLA count per example (compiled, not run, for a projected subset) plus
    the projection's 2 * C * D * d (dense kinds) or 2 * C * D (countsketch).
    """
    import jax
    import jax.numpy as jnp

    from tracin_jax.influence import run_grad_fn

    variables = run.checkpoints[-1].variables
    fn = run_grad_fn(run, subset_name, proj_dim=proj_dim, proj_seed=proj_seed, proj_kind=proj_kind)
    subset, projector = fn.subset, fn.projector
    b = min(batch_size, len(run.train.images))
    xb = jnp.asarray(run.train.images[:b])
    yb = jnp.asarray(run.train.labels[:b], jnp.int32)
    c = 3
    if projector is None:
        grad_flops = xla_flops(fn.fn, variables, xb, yb)
        proj_flops = 0.0
    else:
        exact = run_grad_fn(run, subset_name, proj_dim=0)
        nb = min(b, 2)  # compile only; a small batch keeps compilation cheap (FLOPs are per example)
        g = xla_flops(exact.fn, variables, xb[:nb], yb[:nb])
        grad_flops = g * b / nb if g is not None else None
        per = 2.0 * c * subset.size * (projector.dim if projector.kind != "countsketch" else 1)
        proj_flops = per * b
    rate = steady_rate(fn, (variables, xb, yb))
    per_example = ((grad_flops or 0.0) + proj_flops) / b if grad_flops is not None else None
    return {
        "subset": subset_name, "param_count": subset.size,
        "method": "head" if fn.tag.split("|")[1:2] == ["head"] else "vjp",
        "projection": projector.describe() if projector is not None else None,
        "batch": b,
        "gflop_per_example_gradients": grad_flops / b / 1e9 if grad_flops is not None else None,
        "gflop_per_example_projection": proj_flops / b / 1e9,
        "gflop_per_example": per_example / 1e9 if per_example is not None else None,
        "steady_examples_per_s": rate,
        "steady_tflops_per_s": per_example * rate / 1e12 if per_example is not None else None,
        "backend": jax.default_backend(),
    }


def time_influence(workdir: Path, out: Path, subset: str, checkpoints, proj_dim, proj_seed,
                   proj_kind, batch_size: int, keep_store: bool, progress: bool) -> dict:
    """Runs the engine (test vs train) on a fresh feature store and returns its timings."""
    from tracin_jax.influence import run_influence

    store = out / "features"
    if store.exists() and not keep_store:
        shutil.rmtree(store)
    t = time.perf_counter()
    meta = run_influence(workdir, out, checkpoints=checkpoints, params=subset,
                         proj_dim=proj_dim if subset != "head" else None, proj_seed=proj_seed,
                         proj_kind=proj_kind, split="test", batch_size=batch_size,
                         store_dir=store, progress=progress)
    wall = time.perf_counter() - t
    tf = meta["timings"].get("train_features", {})
    n_grad = meta["n_train"] * len(checkpoints) + meta["n_test"] * len(checkpoints)
    return {
        "wall_s": wall, "timings": meta["timings"], "n_train": meta["n_train"], "n_test": meta["n_test"],
        "checkpoints": [c["epoch"] for c in meta["checkpoints"]],
        "projection": meta["projection"], "param_count": meta["params"].get("size"),
        "train_examples_per_s": tf.get("examples_per_s"),
        "gradient_examples_per_s_overall": n_grad / meta["timings"]["features_s"]
        if meta["timings"].get("features_s") else None,
        "store_reused": bool(tf.get("chunks_reused")),
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.paper_scale",
                                description="The paper's setting at full size, with timings.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="BraTS 2019 training data (MICCAI_BraTS_2019_Data_Training)")
    src.add_argument("--synthetic", action="store_true", help="259 synthetic cases of the same layout")
    src.add_argument("--small", action="store_true", help="tiny CPU smoke test of the same code path")
    p.add_argument("--workdir", default=None, help="training workdir (default runs/paper or runs/paper-small)")
    p.add_argument("--out", default=None, help="influence outputs and report (default <workdir>/paper-scale)")
    p.add_argument("--cases", type=int, default=259, help="synthetic cases")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (paper: 30)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--influence-only", action="store_true", help="skip training; use the workdir's checkpoints")
    p.add_argument("--checkpoints", default=None, help="epochs, e.g. 6,8,10,12,14 (default: the paper's)")
    p.add_argument("--subsets", default="head,all")
    p.add_argument("--proj-dim", type=int, default=4096)
    p.add_argument("--proj-seed", type=int, default=0)
    p.add_argument("--proj-kind", default="countsketch")
    p.add_argument("--batch-size", type=int, default=16, help="influence gradient batch")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak TFLOP/s")
    p.add_argument("--keep-store", action="store_true", help="reuse stored features (timings then skip them)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def run(args) -> dict:
    import jax

    import tracin_jax
    from tracin_jax.config import apply_overrides, get_config
    from tracin_jax.data import write_synthetic_dataset
    from tracin_jax.errors import InputError
    from tracin_jax.training.train import train_and_evaluate

    progress = not args.no_progress
    workdir = Path(args.workdir or ("runs/paper-small" if args.small else "runs/paper"))
    out = Path(args.out) if args.out else workdir / "paper-scale"
    overrides = list(SMALL_OVERRIDES) if args.small else []
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    config = apply_overrides(get_config("tiny" if args.small else "paper"), overrides + list(args.set or []))
    report: dict = {"setting": "small" if args.small else ("synthetic" if args.synthetic else "brats2019"),
                    "config": config.to_dict(), "device": jax.devices()[0].device_kind,
                    "backend": jax.default_backend(), "device_count": jax.device_count()}

    if args.data:
        data_dir = Path(args.data)
    else:
        data_dir = workdir.parent / (workdir.name + "-data")
        t = time.perf_counter()
        cases = 6 if args.small else args.cases
        shape = SMALL_SHAPE if args.small else (240, 240, 155)
        write_synthetic_dataset(data_dir, cases=cases, seed=0, progress=progress, shape=shape)
        report["synthetic_data_s"] = time.perf_counter() - t

    if args.influence_only:
        if not (workdir / "config.json").exists():
            raise InputError(f"--influence-only: {workdir} holds no trained run")
    else:
        t = time.perf_counter()
        train_and_evaluate(config, data_dir, workdir, progress=progress,
                           log=lambda s: print(s, file=sys.stderr))
        report["training_wall_s"] = time.perf_counter() - t
    metrics = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    if metrics:
        report["training"] = {"epochs": len(metrics), "last": metrics[-1],
                              "median_epoch_s": float(np.median([m["epoch_time_s"] for m in metrics]))}

    run_ = tracin_jax.load_run(workdir, data_dir if not args.influence_only else None)
    epochs = [c.epoch for c in run_.checkpoints]
    ckpts = [int(e) for e in args.checkpoints.split(",")] if args.checkpoints else paper_checkpoints(epochs)
    n_train, n_test = len(run_.train), len(run_.test)
    report["dataset"] = {"n_train": n_train, "n_test": n_test,
                         "train_patients": len(set(run_.train.cases)), "test_patients": len(set(run_.test.cases)),
                         "image_shape": list(run_.image_shape)}
    if not args.small:
        report["dataset"]["matches_paper"] = all(report["dataset"][k] == v for k, v in PAPER_SIZES.items())
    report["checkpoints"] = ckpts

    name, tf32, fp32 = device_peak(report["device"])
    peak = args.peak_tflops if args.peak_tflops is not None else tf32
    report["peak"] = {"tflops": peak if peak is not None else "unknown",
                      "source": "--peak-tflops" if args.peak_tflops is not None else (
                          f"table: {name} dense TF32 tensor core" if tf32 else "unknown"),
                      "fp32_tflops": fp32}

    report["subsets"] = {}
    for subset in [s.strip() for s in args.subsets.split(",") if s.strip()]:
        timing = time_influence(workdir, out / f"influence-{subset}", subset, ckpts, args.proj_dim,
                                args.proj_seed, args.proj_kind, args.batch_size, args.keep_store, progress)
        cost = gradient_cost(run_, subset, args.proj_dim if subset != "head" else None, args.proj_seed,
                             args.proj_kind, args.batch_size)
        per_ex = cost["gflop_per_example"]
        rate = timing["train_examples_per_s"]
        engine_tflops = per_ex * rate / 1e3 if per_ex is not None and rate else None
        entry = {**timing, "cost": cost, "engine_tflops_per_s": engine_tflops}
        for label, value in (("engine", engine_tflops), ("steady", cost["steady_tflops_per_s"])):
            entry[f"{label}_fraction_of_peak"] = (value / peak if value is not None and peak else "unknown")
            entry[f"{label}_fraction_of_fp32_peak"] = (value / fp32 if value is not None and fp32 else "unknown")
        report["subsets"][subset] = entry
    out.mkdir(parents=True, exist_ok=True)
    (out / "paper_scale.json").write_text(json.dumps(_clean_json(report), indent=1) + "\n")
    text = summary_text(report)
    (out / "summary.md").write_text(text)
    print(text)
    return report


def _f(v, fmt="{:.3g}"):
    if v is None or v == "unknown":
        return "unknown" if v == "unknown" else "-"
    return fmt.format(v)


def summary_text(r: dict) -> str:
    d = r["dataset"]
    lines = [f"Setting: {r['setting']}; device {r['device']} ({r['backend']}); "
             f"{d['n_train']} training / {d['n_test']} test slices of {d['image_shape'][0]}x{d['image_shape'][1]} "
             f"({d['train_patients']} / {d['test_patients']} patients); checkpoints {r['checkpoints']}; "
             f"peak {_f(r['peak']['tflops'])} TFLOP/s ({r['peak']['source']}).", ""]
    if "training" in r:
        t = r["training"]
        dice = t["last"].get("test_dice", {})
        lines.append(f"Training: {t['epochs']} epochs, median {t['median_epoch_s']:.1f} s/epoch; final test Dice "
                     + ", ".join(f"{k} {_f(v, '{:.3f}')}" for k, v in dice.items()))
        lines.append("")
    lines += ["| subset | params | projection | influence wall s | gradients s | scores s | train ex/s (engine) "
              "| ex/s (steady, 1 batch) | GFLOP/example | TFLOP/s (engine) | fraction of peak (engine) "
              "| fraction of FP32 peak |", "|---" * 12 + "|"]
    for name, s in r["subsets"].items():
        proj = s["projection"]
        proj_s = f"{proj['kind']} d={proj['dim']}" if proj else "exact"
        lines.append(
            f"| {name} | {s['param_count']} | {proj_s} | {s['wall_s']:.1f} | {_f(s['timings'].get('features_s'))} | "
            f"{_f(s['timings'].get('scores_s'))} | {_f(s['train_examples_per_s'])} | "
            f"{_f(s['cost']['steady_examples_per_s'])} | {_f(s['cost']['gflop_per_example'])} | "
            f"{_f(s['engine_tflops_per_s'])} | {_f(s['engine_fraction_of_peak'])} | "
            f"{_f(s['engine_fraction_of_fp32_peak'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from experiments._cli import run_main

    return run_main("experiments.paper_scale", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
