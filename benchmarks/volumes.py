"""Per-volume cost of class gradients on a 3D U-Net against one training step of the same model.

    python -m benchmarks.volumes                   # width 8, depth 3, 64^3, 2 channels, 5 outputs
    python -m benchmarks.volumes --quick           # 16^3, width 4, depth 2: every code path
    python -m benchmarks.volumes --size 32 --batch 4 --out volumes.jsonl

Measures, on random volumes f32[B,S,S,S,Cin] with labels int[B,S,S,S] holding every class, and
random weights (the cost does not depend on the values):

- ``train_step``: one jitted training step (forward and backward in training mode, Adam update)
  of a batch of B volumes;
- ``head``: class gradients of the head kernel from the last hidden features (no backward pass);
- ``logra``: class gradients of every parameter, LoGra rank ``--logra-rank`` per layer (one
  batched forward and C output-gradient passes, no weight gradients);
- ``countsketch``: class gradients of every parameter, CountSketch to ``--proj-dim`` numbers
  (one per-example backward pass per class, unrolled over the batch on a CPU).

The class gradients are those of the per-class soft Dice of the foreground classes (C = outputs
- 1), in inference mode, as ``tracin-jax influence`` computes them. Each function is compiled
ahead of time (its compile time and XLA's temporary buffer size are reported), run once to warm
up, then ``--reps`` times; the median over the repetitions divided by B is the per-volume time,
and ``ratio_to_train_step`` divides it by the training step's per-volume time. One JSON line per
function, then one summary line; every line carries the machine and the 1-minute load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from tracin_jax.config import ModelConfig, TrainConfig
from tracin_jax.influence import make_class_grad_fn, make_projector, resolve_subset
from tracin_jax.models import build_model, count_params
from tracin_jax.training.train import init_variables, make_optimizer, make_train_step


def machine() -> dict:
    cpu = platform.processor() or ""
    if not cpu and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {"cpu": cpu or platform.machine(), "cpus_usable": cores, "jax": jax.__version__,
            "backend": jax.default_backend(), "device": jax.devices()[0].device_kind}


def load_1m() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def volumes(n: int, size: int, channels: int, classes: int, seed: int = 0):
    """f32[n,S,S,S,channels] normal noise and int32[n,S,S,S] labels in which every class occurs
    (a random label per voxel)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, size, size, size, channels)).astype(np.float32)
    y = rng.integers(0, classes, size=(n, size, size, size)).astype(np.int32)
    return jnp.asarray(x), jnp.asarray(y)


def timed(compiled, args, reps: int, donate=None):
    """(median seconds of ``reps`` calls after one warm-up call, every time). ``donate``: a
    function giving fresh copies of donated arguments before each call."""
    def call():
        a = donate(args) if donate else args
        t = time.perf_counter()
        jax.block_until_ready(compiled(*a))
        return time.perf_counter() - t

    call()
    times = [call() for _ in range(reps)]
    return float(np.median(times)), times


def aot(fn, args):
    """(compiled, compile seconds, XLA temporary bytes) of a jitted function for ``args``."""
    t = time.perf_counter()
    compiled = fn.lower(*args).compile()
    seconds = time.perf_counter() - t
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    return compiled, seconds, temp


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--size", type=int, default=64, help="volume side S (S^3 voxels)")
    p.add_argument("--channels", type=int, default=2)
    p.add_argument("--outputs", type=int, default=5, help="model outputs, background included")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--proj-dim", type=int, default=4096)
    p.add_argument("--logra-rank", type=int, default=16)
    p.add_argument("--only", default="train_step,head,logra,countsketch")
    p.add_argument("--quick", action="store_true", help="16^3, width 4, depth 2, 1 repetition")
    p.add_argument("--out", help="append the JSON lines to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.width, args.depth, args.reps = 16, 4, 2, 1

    cfg = ModelConfig(width=args.width, depth=args.depth, num_classes=args.outputs, dims=3,
                      bn_momentum=0.9)
    model = build_model(cfg)
    space = (args.size,) * 3
    variables = init_variables(model, jax.random.key(0), (*space, args.channels))
    x, y = volumes(args.batch, args.size, args.channels, args.outputs)
    n_params = count_params(variables["params"])
    common = {"model": "unet", "dims": 3, "width": args.width, "depth": args.depth,
              "volume": list(space), "channels": args.channels, "outputs": args.outputs,
              "classes": args.outputs - 1, "batch": args.batch, "params": n_params,
              "reps": args.reps, "machine": machine()}
    labels = tuple(range(1, args.outputs))
    rows, lines = {}, []

    def emit(what, compiled, compile_s, temp, run_args, extra, donate=None):
        median, times = timed(compiled, run_args, args.reps, donate)
        rows[what] = median / args.batch
        line = {"what": what, **extra, "per_volume_s": round(median / args.batch, 4),
                "batch_s_median": round(median, 4), "batch_s_all": [round(t, 4) for t in times],
                "compile_s": round(compile_s, 2),
                "xla_temp_mib": None if temp is None else round(temp / 2**20, 1),
                "load_1m": load_1m(), **common}
        if "train_step" in rows and what != "train_step":
            line["ratio_to_train_step"] = round(rows[what] / rows["train_step"], 3)
        lines.append(line)
        print(json.dumps(line), flush=True)

    only = set(args.only.split(","))
    if "train_step" in only:
        tcfg = TrainConfig(batch_size=args.batch, lr=1e-3, b1=0.9, loss="dice+ce")
        tx = make_optimizer(tcfg)
        step = make_train_step(model, tx, tcfg, space[1:])
        opt = tx.init(variables["params"])
        copy = lambda a: (jax.tree.map(jnp.copy, a[0]), jax.tree.map(jnp.copy, a[1]),  # noqa: E731
                          *a[2:])
        step_args = (variables, opt, x, y, jax.random.key(1))
        compiled, cs, temp = aot(step, copy(step_args))
        emit("train_step", compiled, cs, temp, step_args, {"loss": tcfg.loss}, donate=copy)

    full = resolve_subset(variables["params"], "all")
    fns = {
        "head": (lambda: make_class_grad_fn(model, resolve_subset(variables["params"], "head"),
                                            class_labels=labels),
                 {"subset": "head"}),
        "logra": (lambda: make_class_grad_fn(
            model, full, projector=make_projector(full, args.logra_rank, 0, "logra"),
            class_labels=labels), {"subset": "all", "projection": f"logra{args.logra_rank}"}),
        "countsketch": (lambda: make_class_grad_fn(
            model, full, projector=make_projector(full, args.proj_dim, 0, "countsketch"),
            class_labels=labels), {"subset": "all", "projection": f"countsketch{args.proj_dim}"}),
    }
    for what, (make, extra) in fns.items():
        if what not in only:
            continue
        fn = make()
        compiled, cs, temp = aot(fn.fn, (variables, x, y))
        emit(what, compiled, cs, temp, (variables, x, y), {**extra, "feature_dim": fn.dim})

    if "train_step" in rows:
        summary = {"what": "summary", "per_volume_s": {k: round(v, 4) for k, v in rows.items()},
                   "ratio_to_train_step": {k: round(v / rows["train_step"], 3)
                                           for k, v in rows.items() if k != "train_step"},
                   "load_1m": load_1m(), **common}
        lines.append(summary)
        print(json.dumps(summary), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(l) + "\n" for l in lines)
    return lines


if __name__ == "__main__":
    main()
