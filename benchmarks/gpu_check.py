"""Speed checks for a machine with a GPU in one process, each against a baseline of the same run.

    python -m benchmarks.gpu_check --size full --out gpu.jsonl   # the sizes below (a few minutes)
    python -m benchmarks.gpu_check --size tiny                    # the same code at tiny shapes

One JSON line per measurement on stdout (and appended to ``--out``). Every line carries
``check``, ``size``, ``backend``, ``device_kind``, ``device_count``, ``jax`` and ``elapsed_s``
(seconds since the script started), absolute seconds, and ratios against a baseline measured in
the same process. The checks, in the order they run (the longest last, so that a run stopped by
a time limit has already printed the others):

- ``environment``: Python, the versions of jax, jaxlib, flax, optax, orbax-checkpoint, chex,
  numpy, torch (and whether it sees a GPU), captum, nibabel; the device's memory.
- ``matmul_baseline``: a square float32 matrix product at JAX's default precision (n = 8192;
  tiny: 256): seconds (minimum of repetitions) and GFLOP/s, the machine's practical FLOP rate.
- ``paper_train_step``: one training step of the ``paper`` config (width-64 U-Net, 192 x 192,
  batch 10, Adam, flip + resize-crop augmentation) on random inputs: ``compile_s`` (lower +
  compile), ``first_step_s``, the median, minimum and all of the following steps' seconds,
  examples/s, GFLOP (XLA's cost analysis) and GFLOP/s, ``vs_matmul`` (its FLOP rate over the
  baseline's), ``compile_over_step`` and ``epoch_s_estimate`` (2070 training slices, the
  paper's). Tiny: the same config at width 4, depth 2, 32 x 32.
- ``retrain_vmap_vs_sequential``: one line per K (1, 8, 32; tiny: 2): K models trained from
  scratch by :func:`tracin_jax.training.multi.train_models` on random halves of the patients
  of a synthetic training set (16 patients x 10 slices at 96 x 96, the ``demo`` config, as in
  the retraining studies, for 3 epochs; tiny: 4 patients x 4 slices, the ``tiny`` config),
  once with ``mode="vmap"`` (the K models stacked, one vmapped step) and once with
  ``mode="sequential"`` (one model after the other). For each: wall seconds, initialisation,
  the first step (compilation included), the other steps; ``s_excl_compile`` (initialisation +
  every step, the first counted at the mean of the others), ``models_per_s`` (K /
  s_excl_compile) and ``models_per_s_incl_compile``; then ``speedup_vmap_vs_sequential`` (ratio
  of the two ``s_excl_compile``), the same with compilation, and ``max_abs_param_diff`` /
  ``max_rel_param_diff`` (over the max |parameter|) between the two modes' models: the same
  models up to float rounding, which Adam's first steps can magnify to about the learning rate
  for parameters whose gradient is near zero.
- ``influence_vs_captum``: one line per parameter subset (``head``; ``all`` with the LoGra
  projection at per-layer rank 16; tiny: rank 8) of class-wise TracIn on a width-64 U-Net at
  192 x 192 (32 training and 8 test slices, 2 checkpoints, batch 8; tiny: width 4, depth 2,
  32 x 32, 4 and 2 slices, batch 2), measured by :func:`benchmarks.influence.run_case`: the
  engine end to end (``engine_s``, its warm-up ``engine_compile_s``), Captum's ``TracInCP`` on
  the PyTorch twin of the U-Net (on the GPU when PyTorch sees one), ``engine_over_captum``
  (engine seconds / Captum seconds), the same with the engine's compilation, the agreement of
  the scores, and the engine's class gradients against a plain training step of the same batch.
  Without Captum the engine still runs and the line says ``"skipped": "captum not installed"``.
  The whole benchmark line is kept under ``detail``.

``--size tiny`` adds the test suite's compile-speed XLA flags (LLVM optimisation level 0): it
checks that every path runs, its figures measure nothing.

A check that fails (out of memory, say) prints ``{"check": ..., "error": "<one line>"}`` (the
traceback goes to stderr) and the next one runs; the exit status is 0 only if no check failed.

The project imports nibabel when its training code is imported, but nothing here reads NIfTI
files: where nibabel is not installed, a placeholder module stands in for it (any use of it
raises), and the ``environment`` line says so.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import math
import os
import platform
import sys
import time
import traceback
import types
from dataclasses import dataclass, field
from importlib import metadata
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

CHECKS = ("matmul_baseline", "paper_train_step", "retrain_vmap_vs_sequential",
          "influence_vs_captum")
PAPER_TRAIN_SLICES = 2070  # training slices of the paper's split (epoch estimate)
# --size tiny only checks that every code path runs: XLA compiles faster with these (the test
# suite's settings; the figures of a tiny run are not measurements of anything).
TINY_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


@dataclass(frozen=True)
class Size:
    """The shapes of every check at one ``--size``."""

    matmul_n: int
    matmul_reps: int
    paper_overrides: tuple[str, ...]
    paper_steps: int
    retrain_config: str
    retrain_overrides: tuple[str, ...]
    retrain_patients: int
    retrain_slices_per_patient: int
    retrain_image: int
    retrain_k: tuple[int, ...]
    influence_case: dict = field(default_factory=dict)  # benchmarks.influence.Case arguments
    influence_reps: int = 3


SIZES = {
    "full": Size(
        matmul_n=8192, matmul_reps=10,
        paper_overrides=(), paper_steps=10,
        retrain_config="demo", retrain_overrides=("train.epochs=3",),
        retrain_patients=16, retrain_slices_per_patient=10, retrain_image=96,
        retrain_k=(1, 8, 32),
        influence_case=dict(name="gpu-w64-192", width=64, size=192, n_train=32, n_test=8,
                            checkpoints=2, subsets=("head", "all:logra16"), batch=8, depth=4),
        influence_reps=3,
    ),
    "tiny": Size(
        matmul_n=256, matmul_reps=3,
        paper_overrides=("model.width=4", "model.depth=2", "data.downsample=6"), paper_steps=3,
        retrain_config="tiny", retrain_overrides=("train.epochs=1",),
        retrain_patients=4, retrain_slices_per_patient=4, retrain_image=32,
        retrain_k=(2,),
        influence_case=dict(name="tiny-w4-32", width=4, size=32, n_train=4, n_test=2,
                            checkpoints=2, subsets=("head", "all:logra8"), batch=2, depth=2),
        influence_reps=1,
    ),
}


def _r(x, nd=4):
    return None if x is None else round(float(x), nd)


# -- environment -------------------------------------------------------------------------------


def ensure_nibabel() -> str | None:
    """nibabel's version, or None after putting a placeholder module in its place.

    ``tracin_jax.training.train`` imports the data package, which imports nibabel at module
    level (only its functions use it). No check here reads a NIfTI file, so where nibabel is
    missing a placeholder lets those imports complete; any attribute of it raises.
    """
    try:
        import nibabel
    except ImportError:
        pass
    else:
        return str(getattr(nibabel, "__version__", "unknown"))

    mod = types.ModuleType("nibabel", "placeholder: nibabel is not installed")
    mod.__spec__ = importlib.machinery.ModuleSpec("nibabel", None)

    def __getattr__(name):
        raise AttributeError(f"nibabel is not installed (a placeholder stands in for it): "
                             f"nibabel.{name} is not available")

    mod.__getattr__ = __getattr__
    sys.modules["nibabel"] = mod
    return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment(nibabel_version: str | None) -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy", "torch",
                 "captum", "matplotlib", "tqdm"):
        out[dist] = _version(dist)
    out["nibabel"] = nibabel_version or "placeholder (not installed)"
    try:
        import torch

        out["torch_cuda"] = bool(torch.cuda.is_available())
        out["torch_cuda_version"] = torch.version.cuda
    except ImportError:
        out["torch_cuda"] = None
    except Exception as e:  # noqa: BLE001 - a broken PyTorch install: say so, go on
        out["torch_cuda"] = None
        out["torch_error"] = " ".join(f"{type(e).__name__}: {e}".split())[:300]
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        out["device_memory_gb"] = _r(stats["bytes_limit"] / 2**30, 1)
    out["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    out["matmul_precision"] = matmul_precision()
    return out


def matmul_precision() -> str:
    return str(getattr(jax.config, "jax_default_matmul_precision", None))


def resolve_torch_device(choice: str) -> str:
    """``auto``: ``cuda`` when JAX runs on a GPU and PyTorch sees one, else ``cpu``."""
    if choice != "auto":
        return choice
    if jax.default_backend() != "gpu":
        return "cpu"
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


# -- matmul baseline -------------------------------------------------------------------------


def check_matmul(size: Size) -> dict:
    n = size.matmul_n
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32)
    b = jax.random.normal(kb, (n, n), jnp.float32)
    t = time.perf_counter()
    f = jax.jit(jnp.matmul).lower(a, b).compile()
    compile_s = time.perf_counter() - t
    jax.block_until_ready(f(a, b))
    times = []
    for _ in range(size.matmul_reps):
        t = time.perf_counter()
        jax.block_until_ready(f(a, b))
        times.append(time.perf_counter() - t)
    s = min(times)
    flop = 2.0 * n**3
    return {"n": n, "dtype": "float32", "precision": matmul_precision(),
            "s": _r(s, 6), "s_median": _r(np.median(times), 6), "compile_s": _r(compile_s, 3),
            "gflop": _r(flop / 1e9, 2), "gflops_per_s": _r(flop / s / 1e9, 1)}


# -- one training step of the paper's config ----------------------------------------------------


def check_paper_step(size: Size, matmul_gflops: float | None) -> dict:
    from tracin_jax.config import apply_overrides, get_config
    from tracin_jax.flops import compiled_flops
    from tracin_jax.models import build_model, count_params
    from tracin_jax.training.train import init_variables, make_optimizer, make_train_step

    cfg = apply_overrides(get_config("paper"), list(size.paper_overrides))
    d = cfg.data
    h, w = (d.crop[1] - d.crop[0]) // d.downsample, (d.crop[3] - d.crop[2]) // d.downsample
    model = build_model(cfg.model)
    t = time.perf_counter()
    variables = init_variables(model, jax.random.key(0), (h, w, 4))
    tx = make_optimizer(cfg.train)
    opt_state = tx.init(variables["params"])
    init_s = time.perf_counter() - t
    step = make_train_step(model, tx, cfg.train, (h, w), d.downsample)
    bs = cfg.train.batch_size
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(bs, h, w, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, size=(bs, h, w)), jnp.int32)
    params = count_params(variables["params"])

    t = time.perf_counter()
    compiled = step.lower(variables, opt_state, x, y, jax.random.key(1)).compile()
    compile_s = time.perf_counter() - t
    flop = compiled_flops(compiled)
    t = time.perf_counter()
    variables, opt_state, loss = compiled(variables, opt_state, x, y, jax.random.key(1))
    jax.block_until_ready(loss)
    first_s = time.perf_counter() - t
    times = []
    for i in range(size.paper_steps):
        t = time.perf_counter()
        variables, opt_state, loss = compiled(variables, opt_state, x, y, jax.random.key(2 + i))
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t)
    med = float(np.median(times))
    rate = flop / med / 1e9 if flop else None
    return {
        "config": cfg.name, "overrides": list(size.paper_overrides), "width": cfg.model.width,
        "depth": cfg.model.depth, "image": [h, w], "batch": bs, "params": params,
        "augment": {"flip": cfg.train.augment_flip, "resize_crop": cfg.train.augment_resize_crop},
        "init_s": _r(init_s, 3), "compile_s": _r(compile_s, 3), "first_step_s": _r(first_s, 4),
        "step_s_median": _r(med, 5), "step_s_min": _r(min(times), 5),
        "step_s_all": [_r(v, 5) for v in times], "examples_per_s": _r(bs / med, 2),
        "gflop": _r(flop / 1e9 if flop else None, 2), "gflops_per_s": _r(rate, 1),
        "vs_matmul": _r(rate / matmul_gflops if rate and matmul_gflops else None, 4),
        "compile_over_step": _r(compile_s / med, 1),
        "epoch_slices": PAPER_TRAIN_SLICES,
        "epoch_s_estimate": _r(med * math.ceil(PAPER_TRAIN_SLICES / bs), 2),
        "loss_finite": bool(np.isfinite(float(loss))),
    }


# -- K retrained models: vmapped against sequential ------------------------------------------------


def synthetic_run(config, patients: int, slices_per_patient: int, image: int) -> SimpleNamespace:
    """What :func:`~tracin_jax.training.multi.train_models` reads of a run: its config and
    its training split (images f32[n, H, W, 4], labels u8[n, H, W], a case id per slice)."""
    from benchmarks.influence import synthetic_examples

    n = patients * slices_per_patient
    ex = synthetic_examples(n, image, seed=5)
    cases = [f"P{i // slices_per_patient:03d}" for i in range(n)]
    train = SimpleNamespace(images=ex.images, labels=ex.labels.astype(np.uint8), cases=cases,
                            ids=[f"{c}-{i}" for i, c in enumerate(cases)])
    return SimpleNamespace(config=config, train=train)


def _train(run, masks, seeds, mode: str) -> tuple[dict, object]:
    from tracin_jax.training.multi import train_models

    timings: dict = {}
    t = time.perf_counter()
    out = train_models(run, masks, seeds, mode=mode, progress=False, timings=timings)
    jax.block_until_ready(out)
    wall = time.perf_counter() - t
    n = timings["n_steps"]
    # The first step at the others' mean (with one step call only, nothing to tell it by).
    per_step = timings["steps"] / n if n else None
    work = timings["init"] + timings["steps"] + per_step if n else None
    k = len(seeds)
    return {"wall_s": _r(wall, 3), "init_s": _r(timings["init"], 3),
            "first_step_s": _r(timings["first_step"], 3), "steps_s": _r(timings["steps"], 3),
            "step_calls": n + 1, "step_s_mean": _r(per_step, 5),
            "s_excl_compile": _r(work, 3), "models_per_s": _r(k / work if work else None, 3),
            "models_per_s_incl_compile": _r(k / wall, 3)}, out


def check_retrain(size: Size, emit_k) -> None:
    from tracin_jax.config import apply_overrides, get_config
    from tracin_jax.evaluate.retrain import patient_subsets

    cfg = apply_overrides(get_config(size.retrain_config), list(size.retrain_overrides))
    run = synthetic_run(cfg, size.retrain_patients, size.retrain_slices_per_patient,
                        size.retrain_image)
    for k in size.retrain_k:
        masks = patient_subsets(size.retrain_patients, k, 0.5, seed=k)
        seeds = list(range(k))
        vm, out_v = _train(run, masks, seeds, "vmap")
        sq, out_s = _train(run, masks, seeds, "sequential")
        diff = max(float(v) for v in jax.tree.leaves(jax.tree.map(
            lambda a, b: jnp.max(jnp.abs(a - b)), out_v["params"], out_s["params"])))
        scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(out_s["params"]))
        ratio = (sq["s_excl_compile"] / vm["s_excl_compile"]
                 if sq["s_excl_compile"] and vm["s_excl_compile"] else None)
        del out_v, out_s
        emit_k({
            "k": k, "config": cfg.name, "overrides": list(size.retrain_overrides),
            "width": cfg.model.width, "depth": cfg.model.depth,
            "image": [size.retrain_image, size.retrain_image], "batch": cfg.train.batch_size,
            "epochs": cfg.train.epochs, "patients": size.retrain_patients,
            "train_slices": size.retrain_patients * size.retrain_slices_per_patient,
            "patients_per_model": int(masks[0].sum()),
            "vmap": vm, "sequential": sq,
            "speedup_vmap_vs_sequential": _r(ratio, 3),
            "speedup_vmap_vs_sequential_incl_compile": _r(sq["wall_s"] / vm["wall_s"], 3),
            "max_abs_param_diff": _r(diff, 8),
            "max_rel_param_diff": _r(diff / max(scale, 1e-30), 8),
        })


# -- class-wise TracIn: the engine against Captum -----------------------------------------------


def influence_line(line: dict, captum: bool) -> dict:
    """The figures of one :func:`benchmarks.influence.run_case` line; the line under ``detail``."""
    eng, cg, step = line["engine"], line["classgrad"], line["train_step"]
    out = {k: line.get(k) for k in ("case", "subset", "projection", "width", "depth", "image",
                                     "subset_params", "feature_dim", "n_train", "n_test",
                                     "checkpoints", "batch")}
    out.update({
        "engine_s": eng["s"], "engine_compile_s": eng.get("compile_s"),
        "engine_examples_per_s": eng.get("examples_per_s"),
        "train_step_s": step["s"], "train_step_gflops_per_s": step.get("gflops_per_s"),
        "classgrad_method": cg["method"], "classgrad_s": cg["s"],
        "classgrad_time_vs_train_step": cg.get("time_vs_train_step"),
        "classgrad_flop_rate_vs_train_step": cg.get("flop_rate_vs_train_step"),
        "torch_train_step_s": (line.get("torch_train_step") or {}).get("s"),
    })
    cp = line.get("captum")
    if cp:
        out.update({
            "captum_s": cp["s"], "captum_device": cp.get("torch_device"),
            "engine_over_captum": _r(eng["s"] / cp["s"], 4),
            "engine_incl_compile_over_captum": _r((eng["s"] + (eng.get("compile_s") or 0))
                                                  / cp["s"], 4),
            "speedup_vs_captum": line.get("speedup_vs_captum"),
        })
    elif not captum:
        out["skipped"] = "captum not installed"
    if "naive" in line:
        out["naive_s"] = line["naive"]["s"]
        out["engine_over_naive"] = _r(eng["s"] / line["naive"]["s"], 4)
    out["checks"] = line.get("checks", {})
    out["detail"] = line
    return out


def check_influence(size: Size, args, emit_subset) -> None:
    from benchmarks import influence as bench

    captum = bench.have_captum()
    overrides = {k: v for k, v in (("n_train", args.n_train), ("n_test", args.n_test)) if v}
    case = bench.Case(**{**size.influence_case, **overrides})
    device = resolve_torch_device(args.torch_device)
    if captum:
        import torch

        torch.set_num_threads(bench.machine_cpus())
    ns = SimpleNamespace(torch_threads="auto", torch_device=device, reps=size.influence_reps,
                         no_captum=not captum, no_naive=not args.naive, rate_only=False,
                         max_exact_params=5_000_000)
    bench.run_case(case, ns, bench.machine_info(),
                   lambda line: emit_subset(influence_line(line, captum)))


# -- CLI ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check",
                                description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--only", default=None,
                   help=f"comma-separated checks to run (default all: {', '.join(CHECKS)})")
    p.add_argument("--torch-device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="PyTorch device of the Captum baseline (auto: cuda when JAX runs on a "
                        "GPU and PyTorch sees one)")
    p.add_argument("--n-train", type=int, default=None, help="influence: training slices")
    p.add_argument("--n-test", type=int, default=None, help="influence: test slices")
    p.add_argument("--naive", action="store_true",
                   help="influence: also the naive baseline (one jax.grad call per example, "
                        "class and checkpoint)")
    args = p.parse_args(argv)
    only = CHECKS if not args.only else tuple(c.strip() for c in args.only.split(",") if c.strip())
    unknown = [c for c in only if c not in CHECKS]
    if unknown:
        p.error(f"unknown check(s) {', '.join(unknown)}; known: {', '.join(CHECKS)}")
    size = SIZES[args.size]
    t0 = time.perf_counter()
    out_f = open(args.out, "a") if args.out else None
    failed: list[str] = []

    def base(check: str) -> dict:
        dev = jax.devices()[0]
        return {"check": check, "size": args.size, "backend": jax.default_backend(),
                "device_kind": dev.device_kind, "device_count": jax.device_count(),
                "jax": jax.__version__, "elapsed_s": _r(time.perf_counter() - t0, 1)}

    def emit(check: str, fields: dict) -> None:
        text = json.dumps({**base(check), **fields}, default=str)
        print(text, flush=True)
        if out_f:
            out_f.write(text + "\n")
            out_f.flush()

    def guarded(check: str, fn) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - every failure becomes an error line
            traceback.print_exc(file=sys.stderr)
            msg = " ".join(f"{type(e).__name__}: {e}".split())
            emit(check, {"error": msg[:500]})
            failed.append(check)

    if args.size == "tiny":  # before the backend starts: XLA reads its flags then
        for flag in TINY_XLA_FLAGS:
            if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
                os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    jax.devices()  # the JAX backend starts before PyTorch is imported
    nib = ensure_nibabel()
    guarded("environment", lambda: emit("environment", environment(nib)))
    rates: dict = {}

    def matmul():
        m = check_matmul(size)
        rates["matmul"] = m["gflops_per_s"]
        emit("matmul_baseline", m)

    if "matmul_baseline" in only:
        guarded("matmul_baseline", matmul)
    if "paper_train_step" in only:
        guarded("paper_train_step", lambda: emit(
            "paper_train_step", check_paper_step(size, rates.get("matmul"))))
    if "retrain_vmap_vs_sequential" in only:
        guarded("retrain_vmap_vs_sequential", lambda: check_retrain(
            size, lambda line: emit("retrain_vmap_vs_sequential", line)))
    if "influence_vs_captum" in only:
        guarded("influence_vs_captum", lambda: check_influence(
            size, args, lambda line: emit("influence_vs_captum", line)))
    print(f"total {time.perf_counter() - t0:.1f} s; "
          f"{'failed: ' + ', '.join(failed) if failed else 'no check failed'}", file=sys.stderr)
    if out_f:
        out_f.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
