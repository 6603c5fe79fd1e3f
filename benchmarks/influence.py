"""Benchmark of class-wise TracIn: tracin_jax's engine against its baselines, in one process.

    python -m benchmarks.influence                     # default cases (10-25 min on 2 CPU cores)
    python -m benchmarks.influence --quick             # ~1 minute smoke run
    python -m benchmarks.influence --cases w16-96,w64-96 --no-naive
    python -m benchmarks.influence --xla-sweep         # XLA settings, one subprocess each

One JSON line per (case, parameter subset) on stdout; a summary table on stderr at the end.
Every line carries the machine, the case, and each measurement together with the baselines it
is compared against, all measured in the same process:

(a) ``train_step``: a plain batched forward + backward of the same model on the same examples
    (the practical FLOP rate of this machine), and ``classgrad``: the engine's per-example class
    gradients on the same batch, with their FLOP rate and the ratio of the two;
(b) ``naive``: one jitted ``jax.grad`` call per example and class, then dot products;
(c) ``captum``: Captum's ``TracInCP`` on the same U-Net in PyTorch (:mod:`benchmarks.torch_unet`),
    class-wise scores obtained through its API (see :func:`run_captum`);
(d) ``engine``: tracin_jax's ``compute_influence`` end to end (checkpoints read from disk,
    per-example class gradients, feature store, blocked contraction, scores file).

Checks in every line: PyTorch vs Flax logits, and the maximum relative difference of the score
tensors of the naive loop and of Captum against the engine (exact subsets), or the relative
error of the projected engine against them (projected subsets). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from tracin_jax import checkpoints as ckpt_io
from tracin_jax import influence as inf
from tracin_jax.influence.grads import default_examples_mode
from tracin_jax.flops import compiled_flops
from tracin_jax.models import UNet
from tracin_jax.training.losses import tumour_dice_loss
from tracin_jax.training.train import init_variables

NUM_CLASSES = 3  # tumour classes NCR/NET, ED, ET

# -- cases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One benchmark case: a U-Net width, an image size, examples and checkpoints.

    ``subsets``: ``head`` | ``all:exact`` | ``all:<kind><dim>`` (e.g. ``all:countsketch1024``,
    or ``all:logra16``: LoGra at per-layer rank 16). A LoGra subset listed after a CountSketch
    one of the same feature dimension is compared with it (``classgrad_vs_countsketch_same_dim``).
    ``batch``: examples per gradient call (engine, training step, Captum head batches).
    """

    name: str
    width: int
    size: int
    n_train: int
    n_test: int
    checkpoints: int = 2
    subsets: tuple[str, ...] = ("head", "all:countsketch1024")
    batch: int = 8
    depth: int = 4
    naive: bool = True
    captum: bool = True


CASES = {c.name: c for c in (
    Case("w16-96", 16, 96, 32, 8, subsets=("head", "all:countsketch1024", "all:exact")),
    Case("w16-192", 16, 192, 12, 4, subsets=("head", "all:countsketch1024", "all:logra16")),
    Case("w64-96", 64, 96, 8, 2, batch=4, subsets=("head", "all:countsketch1024", "all:logra16")),
    # Realistic set sizes: CountSketch at LoGra-16's feature dimension (8884 numbers), then LoGra.
    Case("w16-96-large", 16, 96, 256, 64, subsets=("all:countsketch8884", "all:logra16"),
         batch=16, naive=False),
    Case("w64-192", 64, 192, 4, 2, subsets=("head",), batch=2),
)}
DEFAULT_CASES = ("w16-96", "w16-192", "w64-96", "w64-192")
QUICK_CASES = {c.name: c for c in (
    Case("quick-w8-32", 8, 32, 8, 4, subsets=("head", "all:countsketch1024", "all:exact",
                                               "all:logra8"), batch=4, depth=3),
)}

# XLA settings tried by --xla-sweep: (label, extra environment).
XLA_SETTINGS = (
    ("default", {}),
    ("no_multi_thread_eigen", {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"}),
    ("fast_math", {"XLA_FLAGS": "--xla_cpu_enable_fast_math=true"}),
    ("xnnpack", {"XLA_FLAGS": "--xla_cpu_use_xnnpack=true"}),
    ("onednn", {"XLA_FLAGS": "--xla_cpu_use_onednn=true"}),
    ("matmul_precision_bf16", {"JAX_DEFAULT_MATMUL_PRECISION": "bfloat16"}),
)


def parse_subset(spec: str) -> tuple[str, str | None, int]:
    """``head`` -> ("head", None, 0); ``all:exact`` -> ("all", None, 0);
    ``all:countsketch1024`` -> ("all", "countsketch", 1024); ``all:logra16`` -> ("all",
    "logra", 16) (16 is the per-layer rank)."""
    name, _, proj = spec.partition(":")
    if not proj or proj == "exact":
        return name, None, 0
    kind = proj.rstrip("0123456789")
    return name, kind, int(proj[len(kind):])


def parse_scaling(spec: str) -> list[dict]:
    """``"32x8,256x64"`` -> [{"n_train": 32, "n_test": 8}, {"n_train": 256, "n_test": 64}]."""
    out = []
    for pair in spec.split(","):
        parts = pair.strip().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--scaling {spec!r}: expected n_train x n_test pairs, e.g. 32x8,64x16")
        out.append({"n_train": int(parts[0]), "n_test": int(parts[1])})
    return out


# -- machine and memory ----------------------------------------------------------------------


def machine_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_info() -> dict:
    cpu = platform.processor() or ""
    if not cpu and os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    dev = jax.devices()[0]
    cores = machine_cpus()
    info = {
        "cpu": cpu or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": cores,
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["torch"] = None
    return info


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Host peak RSS of a region (Linux: VmHWM reset through /proc/self/clear_refs; elsewhere
    the growth of ru_maxrss), and on accelerators the device's peak bytes in use."""

    def __enter__(self):
        self.reset = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset = True
        except OSError:
            pass
        self.rss0 = _status_kb("VmRSS")
        self.maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc):
        hwm = _status_kb("VmHWM") if self.reset else None
        if hwm is not None:
            self.peak_mb = hwm / 1024
            self.delta_mb = (hwm - (self.rss0 or 0)) / 1024
        else:  # ru_maxrss is a high-water mark: only growth above the earlier peak is visible
            m = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
            self.peak_mb = m * scale
            self.delta_mb = (m - self.maxrss0) * scale
        self.device_peak_mb = None
        if jax.default_backend() != "cpu":
            stats = jax.devices()[0].memory_stats() or {}
            if "peak_bytes_in_use" in stats:
                self.device_peak_mb = stats["peak_bytes_in_use"] / 2**20
        return False

    def asdict(self) -> dict:
        out = {"peak_rss_mb": round(self.peak_mb, 1), "rss_growth_mb": round(self.delta_mb, 1)}
        if self.device_peak_mb is not None:
            out["device_peak_mb_so_far"] = round(self.device_peak_mb, 1)
        return out


def measure(fn: Callable[[], Any]) -> tuple[Any, dict]:
    """Runs fn once: (result, {"s", "peak_rss_mb", "rss_growth_mb", ...})."""
    with PeakMemory() as mem:
        t = time.perf_counter()
        out = fn()
        out = jax.block_until_ready(out) if isinstance(out, jax.Array) else out
        s = time.perf_counter() - t
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    return out, dict(s=round(s, 3), **mem.asdict(), load_avg_1m=load)


def _r(x, nd=3):
    return None if x is None else round(float(x), nd)


# -- synthetic data and checkpoints ----------------------------------------------------------


def synthetic_examples(n: int, size: int, seed: int) -> SimpleNamespace:
    """Images f32[n,size,size,4] and labels int32[n,size,size] with blocky regions of all four
    classes (background, NCR/NET, ED, ET); ids/cases one per slice."""
    rng = np.random.default_rng(seed)
    cells = 6
    coarse = rng.integers(0, 4, (n, cells, cells))
    rep = -(-size // cells)
    labels = np.repeat(np.repeat(coarse, rep, 1), rep, 2)[:, :size, :size].astype(np.int32)
    images = (rng.standard_normal((n, size, size, 4)) + 0.5 * labels[..., None]).astype(np.float32)
    ids = [f"s{seed}-{i}" for i in range(n)]
    return SimpleNamespace(images=images, labels=labels, ids=ids, cases=ids)


def checkpoint_variables(model: UNet, size: int, t: int) -> dict:
    """Variables of 'checkpoint' t, drawn with NumPy (seed t) on the model's shapes: conv kernels
    N(0, 1/fan_in), small biases, BatchNorm scale/bias and running statistics away from their
    defaults, so that the conversion to PyTorch and inference-mode BatchNorm are exercised.
    (Shapes come from ``jax.eval_shape``: compiling Flax's initialisers costs more than this.)"""
    shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), (size, size, 4)))
    rng = np.random.default_rng(1000 + t)

    def draw(path, leaf):
        name = getattr(path[-1], "key", str(path[-1]))
        shape = leaf.shape
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            a = rng.standard_normal(shape) / np.sqrt(fan_in)
        elif name == "scale":
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name == "bias":
            a = 0.05 * rng.standard_normal(shape)
        elif name == "mean":
            a = 0.1 * rng.standard_normal(shape)
        elif name == "var":
            a = rng.uniform(0.5, 1.5, shape)
        else:
            raise ValueError(f"unexpected variable {jax.tree_util.keystr(path)}")
        return jnp.asarray(a, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def save_orbax_checkpoints(workdir: Path, variables: list[dict], lrs: list[float]) -> None:
    for e, (v, lr) in enumerate(zip(variables, lrs), start=1):
        ckpt_io.save_checkpoint(workdir, e, v, {"count": np.zeros((), np.int32)},
                                {"step": e, "lr": lr})


# -- (a) FLOP rate: batched training step vs per-example class gradients -------------------------


def _time_min(fn, reps: int) -> float:
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best


def make_step_fns(model: UNet):
    """Forward and a plain batched training step (forward + backward of the summed class-wise
    Dice loss w.r.t. every parameter), BatchNorm in inference mode as in the class gradients."""

    def forward(variables, x):
        return model.apply(variables, x, train=False)

    def step(variables, x, y):
        def loss(params):
            v = {"params": params, "batch_stats": variables["batch_stats"]}
            return jnp.sum(tumour_dice_loss(model.apply(v, x, train=False), y))

        return jax.grad(loss)(variables["params"])

    return jax.jit(forward), jax.jit(step)


def torch_device(ctx) -> str:
    """The PyTorch device of the Captum baseline: ``ctx.torch_device`` (``cpu`` unless set;
    ``cuda`` puts the PyTorch model, its batches and Captum's computation on the GPU)."""
    return getattr(ctx, "torch_device", None) or "cpu"


def _torch_sync(device: str) -> None:
    if device != "cpu":
        import torch

        torch.cuda.synchronize()


def torch_step_rate(ctx, reps: int) -> dict | None:
    """The same batched forward + backward in PyTorch (context for the Captum comparison), with
    1 thread and with every usable CPU (minimum over ``reps`` each); ``s`` is the faster.
    On a GPU (``torch_device(ctx)`` not ``cpu``) the threads are not varied."""
    try:
        import torch

        from benchmarks import torch_unet
    except ImportError:
        return None
    dev = torch_device(ctx)
    model = torch_unet.load_flax_variables(
        torch_unet.TorchUNet(ctx.case.width, ctx.case.depth), ctx.variables[0]).eval().to(dev)
    x = torch.from_numpy(np.ascontiguousarray(np.asarray(ctx.xb).transpose(0, 3, 1, 2))).to(dev)
    y = torch.from_numpy(np.asarray(ctx.yb).astype(np.int64)).to(dev)

    def run():
        model.zero_grad(set_to_none=True)
        torch_unet.tumour_dice_loss(model(x), y).sum().backward()
        _torch_sync(dev)

    by_threads = {}
    threads = sorted({machine_cpus(), 1}, reverse=True) if dev == "cpu" else [machine_cpus()]
    for n in threads:
        torch.set_num_threads(n)
        run()
        best = math.inf
        for _ in range(reps):
            t = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t)
        by_threads[n] = best
    torch.set_num_threads(machine_cpus())
    threads = min(by_threads, key=by_threads.get)
    best = by_threads[threads]
    return {"s": _r(best, 4), "examples_per_s": _r(len(x) / best, 2), "threads": threads,
            "s_by_threads": {n: _r(v, 4) for n, v in by_threads.items()}, "device": dev}


def rate_section(ctx, grad_fn, method: str, reps: int, step_s: float) -> dict:
    """Per-example class gradients (engine) on the training-step batch: FLOP rate vs the step.

    Counted FLOPs: for the ``vjp`` method 1 forward + 3 backward passes per example, from the
    XLA cost analysis of the forward and of the step (backward = step - forward); for the
    ``head`` method (no backward through the network) the XLA count of its own program.
    """
    v, xb, yb = ctx.variables[0], ctx.xb, ctx.yb
    t = time.perf_counter()
    compiled = grad_fn.fn.lower(v, xb, yb).compile()
    compile_s = time.perf_counter() - t
    xla_flops = compiled_flops(compiled)
    jax.block_until_ready(grad_fn(v, xb, yb))  # warm (the jit cache, not only the AOT one)
    # Interleaved with the training step, minimum of each: both see the same machine load.
    s = math.inf
    for _ in range(reps):
        step_s = min(step_s, _time_min(lambda: ctx.step(v, xb, yb), 1))
        s = min(s, _time_min(lambda: grad_fn(v, xb, yb), 1))
    ctx.step_s = step_s
    b = len(xb)
    if method == "vjp" and ctx.fwd_flops and ctx.step_flops:
        counted = ctx.fwd_flops + 3 * (ctx.step_flops - ctx.fwd_flops)
        basis = "1 forward + 3 backward per example (XLA cost analysis of forward and step)"
    else:
        counted = xla_flops
        basis = "XLA cost analysis of the class-gradient program"
    step_rate = ctx.step_flops / step_s if ctx.step_flops else None
    rate = counted / s if counted else None
    return {
        "method": method,
        "s": _r(s, 4),
        "examples_per_s": _r(b / s, 2),
        "compile_s": _r(compile_s, 2),
        "gflop_counted": _r(counted / 1e9 if counted else None, 2),
        "gflop_xla": _r(xla_flops / 1e9 if xla_flops else None, 2),
        "flop_basis": basis,
        "gflops_per_s": _r(rate / 1e9 if rate else None, 2),
        "flop_rate_vs_train_step": _r(rate / step_rate if rate and step_rate else None, 3),
        "time_vs_train_step": _r(s / step_s, 3),
    }


# -- (b) naive: one jitted jax.grad call per example and class -------------------------------------


def run_naive(ctx, subset) -> tuple[np.ndarray, dict]:
    """scores[a, i, b, j] = sum_t lr_t <grad D_j(train b), grad D_i(test a)>, exact, with one
    jitted ``jax.grad`` call per (example, class, checkpoint); test gradients kept per checkpoint,
    every training gradient dotted with them as soon as it is computed."""
    model = ctx.model

    @jax.jit
    def grad_one(variables, x, y, c):
        params = variables["params"]

        def loss(leaves):
            v = {"params": subset.insert(params, leaves), "batch_stats": variables["batch_stats"]}
            return tumour_dice_loss(model.apply(v, x[None], train=False), y[None])[0, c]

        g = jax.grad(loss)(subset.select(params))
        return jnp.concatenate([leaf.ravel() for leaf in g])

    @jax.jit
    def dots(test_g, g):
        return jnp.einsum("aid,d->ai", test_g, g, precision=jax.lax.Precision.HIGHEST)

    tr, te = ctx.train, ctx.test
    # Compilation (not timed with the run): one call of each jitted function.
    t = time.perf_counter()
    v0 = ckpt_io.load_variables(ctx.workdir, ctx.epochs[0], ctx.like)
    g0 = grad_one(v0, tr.images[0], tr.labels[0], 0)
    jax.block_until_ready(dots(jnp.zeros((len(te.images), NUM_CLASSES, g0.shape[0])), g0))
    compile_s = time.perf_counter() - t

    def run():
        scores = np.zeros((len(te.images), NUM_CLASSES, len(tr.images), NUM_CLASSES), np.float64)
        for e, lr in zip(ctx.epochs, ctx.lrs):
            v = ckpt_io.load_variables(ctx.workdir, e, ctx.like)
            test_g = jnp.stack([jnp.stack([grad_one(v, te.images[a], te.labels[a], i)
                                           for i in range(NUM_CLASSES)])
                                for a in range(len(te.images))])
            for b in range(len(tr.images)):
                for j in range(NUM_CLASSES):
                    g = grad_one(v, tr.images[b], tr.labels[b], j)
                    scores[:, :, b, j] += lr * np.asarray(dots(test_g, g), np.float64)
            del test_g
        return scores.astype(np.float32)

    scores, m = measure(run)
    m["compile_s"] = _r(compile_s, 2)
    m["grad_calls"] = (len(tr.images) + len(te.images)) * NUM_CLASSES * len(ctx.epochs)
    return scores, m


# -- (c) Captum TracInCP -----------------------------------------------------------------------------


def torch_checkpoints(ctx, folder: Path) -> list[str]:
    """One file per checkpoint: {"state_dict": ..., "learning_rate": lr} (torch.save)."""
    import torch

    from benchmarks import torch_unet

    paths = []
    for e, (v, lr) in enumerate(zip(ctx.variables, ctx.lrs), start=1):
        path = folder / f"epoch{e}.pt"
        torch.save({"state_dict": torch_unet.flax_to_state_dict(v, ctx.case.depth),
                    "learning_rate": float(lr)}, path)
        paths.append(str(path))
    return paths


def load_torch_checkpoint(model, path: str) -> float:
    """Captum's ``checkpoints_load_func`` contract: load the file into ``model``, return its lr.

    (Captum's default loader expects the file to be the bare state_dict, so that its
    ``learning_rate`` entry would break a strict load; this keeps the two apart.)
    """
    import torch

    ckpt = torch.load(path, weights_only=True)
    model.load_state_dict(ckpt["state_dict"])
    return float(ckpt["learning_rate"])


def class_expanded(images: np.ndarray, labels: np.ndarray, device: str = "cpu"):
    """Captum scores one scalar loss per item, so each example becomes 3 items, one per class:
    item 3*n + c is (image n, labels n + 4*c); the loss decodes c and returns D_c. The tensors
    live on ``device``."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)
    y = torch.from_numpy(labels.astype(np.int64)).to(device)
    x3 = x.repeat_interleave(NUM_CLASSES, dim=0)
    c = torch.arange(NUM_CLASSES, device=x.device).repeat(len(x))
    y3 = y.repeat_interleave(NUM_CLASSES, dim=0) + 4 * c[:, None, None]
    return torch.utils.data.TensorDataset(x3, y3)


def class_loss(logits, target):
    """Per-item loss D_c (reduction 'none'): target = labels + 4 * c."""
    import torch

    from benchmarks import torch_unet

    c = torch.div(target[:, 0, 0], 4, rounding_mode="floor")
    d = torch_unet.tumour_dice_loss(logits, target % 4)
    return d.gather(1, c[:, None])[:, 0]


class_loss.reduction = "none"  # tells Captum it is a per-example loss


def run_captum(ctx, subset_name: str, paths: list[str]) -> tuple[np.ndarray, dict]:
    """Captum TracInCP, class-wise, the cheapest way its API allows for this model.

    - Every (example, class) pair is one item (:func:`class_expanded`), so ONE ``influence``
      call on the expanded test set returns all 3 x 3 class pairs: scores[3a+i, 3b+j].
      (Captum's losses are scalars per item, so each class costs its own forward + backward.)
    - ``head``: ``layers=["head"]`` (the bias-free head conv) and every other parameter frozen
      (``requires_grad=False``), so autograd stops at the head; ``sample_wise_grads_per_batch``
      would backpropagate to the inputs through the whole network, so the per-item
      ``autograd.grad`` loop is used, on batches of ``case.batch`` items.
    - ``all``: every parameter; Captum's per-sample trick supports only Linear/Conv2d (not
      BatchNorm or ConvTranspose2d), so its per-item loop is used, with batches of 1 item (each
      ``autograd.grad`` of one item backpropagates through the whole batch).
    - Checkpoints are files read by ``load_torch_checkpoint`` whenever Captum asks (it reloads
      every checkpoint for every training batch). Weighting: Captum multiplies each
      checkpoint's gradient dot product by its learning rate once, as the engine does.
    - Warm-up calls on one batch of each set run first (``warmup_s``, not part of ``s``); they
      also choose PyTorch's intra-op threads (see below in the code).
    - Device: :func:`torch_device` (``cpu`` unless ``ctx.torch_device`` says ``cuda``: the model,
      the items and Captum's computation on the GPU; the checkpoint files are still read from
      disk and copied to the GPU at every load).
    """
    import torch
    from captum.influence import TracInCP

    from benchmarks import torch_unet

    case = ctx.case
    dev = torch_device(ctx)
    model = torch_unet.TorchUNet(case.width, case.depth).eval().to(dev)
    if subset_name == "head":
        for name, p in model.named_parameters():
            p.requires_grad_(name == "head.weight")
        layers, bs = ["head"], case.batch
    else:
        layers, bs = None, 1
    train_ds = class_expanded(ctx.train.images, ctx.train.labels, dev)
    test_ds = class_expanded(ctx.test.images, ctx.test.labels, dev)
    train_dl = torch.utils.data.DataLoader(train_ds, batch_size=bs, shuffle=False)
    test_dl = torch.utils.data.DataLoader(test_ds, batch_size=bs, shuffle=False)

    def run(train_dl, test_dl):
        tracin = TracInCP(model, train_dl, checkpoints=paths,
                          checkpoints_load_func=load_torch_checkpoint, layers=layers,
                          loss_fn=class_loss, batch_size=bs, sample_wise_grads_per_batch=False)
        s = tracin.influence(test_dl)  # [3 * n_test, 3 * n_train]
        return s.detach().cpu().numpy()

    # Warm-up (PyTorch's first calls for new shapes are slow) on one batch of each set; it also
    # chooses the intra-op threads: on a machine shared with other processes, PyTorch's OpenMP
    # pool with one thread per core can stall at every small operator (per-item loops ran
    # 5-30x slower), so unless --torch-threads fixes it, the faster of 1 thread and every CPU
    # on this warm-up (best of two alternating rounds) is used for the run.
    sub = lambda ds: torch.utils.data.Subset(ds, range(bs))  # noqa: E731
    warm_train = torch.utils.data.DataLoader(sub(train_ds), batch_size=bs)
    warm_test = torch.utils.data.DataLoader(sub(test_ds), batch_size=bs)
    choice = ctx.torch_threads
    candidates = [int(choice)] if choice not in (None, "auto") else sorted({1, machine_cpus()})
    if dev != "cpu":  # the threads hardly matter with the work on the GPU: no probing
        candidates = [torch.get_num_threads()]
    probe: dict[int, float] = {}
    for _ in range(2 if len(candidates) > 1 else 1):
        for n in candidates:
            torch.set_num_threads(n)
            _, w = measure(lambda: run(warm_train, warm_test))
            probe[n] = min(probe.get(n, math.inf), w["s"])
    threads = min(probe, key=probe.get)
    torch.set_num_threads(threads)
    flat, m = measure(lambda: run(train_dl, test_dl))
    torch.set_num_threads(machine_cpus())
    m["warmup_s"] = round(sum(probe.values()), 3)
    m["torch_threads"] = {"used": threads, "warmup_s_by_threads": probe}
    n_te, n_tr = len(ctx.test.images), len(ctx.train.images)
    scores = flat.reshape(n_te, NUM_CLASSES, n_tr, NUM_CLASSES)
    m["mode"] = (f"layers={layers}, per-item autograd loop, batch {bs} items, "
                 f"{'other parameters frozen' if layers else 'all parameters'}")
    m["checkpoint_loads"] = len(paths) * (1 + math.ceil(len(train_ds) / bs))
    m["torch_device"] = dev
    return scores, m


# -- (d) the engine end to end -----------------------------------------------------------------------


def _subset_examples(ex: SimpleNamespace, n: int) -> SimpleNamespace:
    return SimpleNamespace(images=ex.images[:n], labels=ex.labels[:n], ids=ex.ids[:n],
                           cases=ex.cases[:n])


# The engine's memory guard (default 2 GB) refuses the width-64 cases' batch gradients (w64-96
# with CountSketch at batch 4: about 2.8 GB); the benchmark measures speed and reports peak RSS.
ENGINE_MEMORY_BUDGET_GB = 16.0


def run_engine(ctx, grad_fn) -> tuple[np.ndarray, dict]:
    """``compute_influence`` on checkpoints read from disk (Orbax), fresh store and output.

    A warm-up run on one batch of training and test examples compiles what the engine
    needs for these shapes (gradient batches placed on the device mesh, scaling, contraction);
    its time is reported as ``compile_s`` and is not part of ``s``.
    """

    def run(train, test):
        with tempfile.TemporaryDirectory(dir=ctx.tmp) as d:
            ckpts = [SimpleNamespace(epoch=e, lr=lr,
                                     variables=ckpt_io.load_variables(ctx.workdir, e, ctx.like))
                     for e, lr in zip(ctx.epochs, ctx.lrs)]
            meta = inf.compute_influence(grad_fn, ckpts, train, test, Path(d) / "out",
                                         store_dir=Path(d) / "store", batch_size=ctx.case.batch,
                                         memory_budget_gb=ENGINE_MEMORY_BUDGET_GB, progress=False)
            scores = np.load(Path(d) / "out" / "scores.npy")
        return scores, meta

    b = ctx.case.batch
    _, warm = measure(lambda: run(_subset_examples(ctx.train, b), _subset_examples(ctx.test, b)))
    (scores, meta), m = measure(lambda: run(ctx.train, ctx.test))
    m["compile_s"] = warm["s"]
    m["timings"] = meta.get("timings", {})
    return scores, m


# -- one case ---------------------------------------------------------------------------------------


def max_rel_diff(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a - ref| / max |ref| (over the whole score tensor)."""
    return float(np.max(np.abs(a.astype(np.float64) - ref)) / max(np.max(np.abs(ref)), 1e-30))


def rel_error(a: np.ndarray, ref: np.ndarray) -> float:
    """|a - ref|_F / |ref|_F (for projected scores, whose entries carry projection noise)."""
    ref = ref.astype(np.float64)
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-30))


def topk_agreement(scores: np.ndarray, ref: np.ndarray, k: int = 10) -> float:
    """Mean over (test example, test class, train class) of |top-k(scores) & top-k(ref)| / k,
    the top-k training examples of f[n_test, C, n_train, C] score tensors."""
    top = lambda s: np.argsort(-np.moveaxis(s, 2, -1), axis=-1)[..., :k]  # noqa: E731
    a, b = top(np.asarray(scores, np.float64)), top(np.asarray(ref, np.float64))
    hits = (a[..., :, None] == b[..., None, :]).any(-1).sum(-1)
    return float(hits.mean() / k)


def prepare_case(case: Case, tmp: Path) -> SimpleNamespace:
    model = UNet(width=case.width, depth=case.depth)
    n_ck = case.checkpoints
    variables = [checkpoint_variables(model, case.size, t) for t in range(n_ck)]
    lrs = [2e-4 / (t + 1) for t in range(n_ck)]  # distinct per checkpoint: tests the weighting
    workdir = tmp / f"{case.name}-run"
    save_orbax_checkpoints(workdir, variables, lrs)
    train = synthetic_examples(case.n_train, case.size, 1)
    test = synthetic_examples(case.n_test, case.size, 2)
    b = case.batch
    xb = jnp.asarray(train.images[:b])
    yb = jnp.asarray(train.labels[:b])
    forward, step = make_step_fns(model)
    like = jax.tree.map(np.asarray, variables[0])
    return SimpleNamespace(case=case, model=model, variables=variables, lrs=lrs,
                           epochs=list(range(1, n_ck + 1)), workdir=workdir, like=like,
                           train=train, test=test, xb=xb, yb=yb, forward=forward, step=step,
                           tmp=tmp)


def measure_step(ctx, reps: int) -> dict:
    v = ctx.variables[0]
    t = time.perf_counter()
    step_c = ctx.step.lower(v, ctx.xb, ctx.yb).compile()
    fwd_c = ctx.forward.lower(v, ctx.xb).compile()
    compile_s = time.perf_counter() - t
    ctx.step_flops, ctx.fwd_flops = compiled_flops(step_c), compiled_flops(fwd_c)
    jax.block_until_ready(ctx.step(v, ctx.xb, ctx.yb))
    ctx.step_s = _time_min(lambda: ctx.step(v, ctx.xb, ctx.yb), reps)
    return {"compile_s": _r(compile_s, 2)}


def step_section(ctx) -> dict:
    b = len(ctx.xb)
    rate = ctx.step_flops / ctx.step_s if ctx.step_flops else None
    return {"batch": b, "s": _r(ctx.step_s, 4), "examples_per_s": _r(b / ctx.step_s, 2),
            "gflop": _r(ctx.step_flops / 1e9 if ctx.step_flops else None, 2),
            "gflop_forward": _r(ctx.fwd_flops / 1e9 if ctx.fwd_flops else None, 2),
            "gflops_per_s": _r(rate / 1e9 if rate else None, 2)}


def have_captum() -> bool:
    try:
        import captum  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def run_case(case: Case, args, machine: dict, emit: Callable[[dict], None]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f"tracin-bench-{case.name}-"))
    try:
        _run_case(case, args, machine, emit, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_case(case: Case, args, machine: dict, emit, tmp: Path) -> None:
    ctx = prepare_case(case, tmp)
    ctx.torch_threads = args.torch_threads
    ctx.torch_device = getattr(args, "torch_device", "cpu")
    step_compile = measure_step(ctx, args.reps)
    use_captum = case.captum and not args.no_captum and not args.rate_only and have_captum()
    torch_rate = torch_step_rate(ctx, min(args.reps, 2)) if have_captum() else None
    equiv = None
    paths = None
    if use_captum:
        from benchmarks import torch_unet

        equiv = torch_unet.check_equivalence(ctx.model, ctx.variables[-1], (case.size, case.size))
        (tmp / "torch").mkdir()
        paths = torch_checkpoints(ctx, tmp / "torch")
    n_items = (case.n_train + case.n_test) * case.checkpoints  # example-checkpoint pairs

    for spec in case.subsets:
        name, kind, dim = parse_subset(spec)
        subset = inf.resolve_subset(ctx.variables[0]["params"], name)
        projector = inf.make_projector(subset, dim, 0, kind) if kind else None
        if projector is None and subset.size > args.max_exact_params:
            continue
        grad_fn = inf.make_class_grad_fn(ctx.model, subset, tumour_dice_loss, projector)
        method = ("logra" if kind == "logra" else "head" if inf.is_head_subset(ctx.model, subset)
                  else "vjp")
        line: dict[str, Any] = {
            "case": case.name, "width": case.width, "depth": case.depth, "image": case.size,
            "subset": name, "projection": (f"{kind}{dim}" if kind else "exact"),
            "subset_params": subset.size, "feature_dim": grad_fn.dim,
            "n_train": case.n_train, "n_test": case.n_test, "checkpoints": case.checkpoints,
            "batch": case.batch, "machine": machine,
        }
        classgrad = rate_section(ctx, grad_fn, method, args.reps, ctx.step_s)
        line["train_step"] = dict(step_section(ctx), compile_s=step_compile["compile_s"])
        line["classgrad"] = classgrad
        same_dim = ctx.__dict__.setdefault("countsketch_classgrad_s", {})
        if kind == "countsketch":
            same_dim[grad_fn.dim] = classgrad["s"]
        elif kind == "logra" and grad_fn.dim in same_dim:
            line["classgrad_vs_countsketch_same_dim"] = _r(same_dim[grad_fn.dim] / classgrad["s"], 2)
        if torch_rate:
            step_gf = line["train_step"]["gflop"]
            line["torch_train_step"] = dict(torch_rate, gflops_per_s=_r(
                step_gf / torch_rate["s"] if step_gf else None, 2))
        if args.rate_only and method == "vjp" and projector is None:
            line["classgrad_per_example_loop"] = per_example_loop_rate(ctx, subset, args.reps)
            other = "vmap" if default_examples_mode() == "unroll" else "unroll"
            alt = inf.make_class_grad_fn(ctx.model, subset, tumour_dice_loss, projector,
                                         examples=other)
            line[f"classgrad_examples_{other}"] = rate_section(ctx, alt, method, args.reps,
                                                               ctx.step_s)
        if args.rate_only:
            emit(line)
            continue

        scores, eng = run_engine(ctx, grad_fn)
        eng["examples_per_s"] = _r(n_items / eng["s"], 2)
        line["engine"] = eng
        checks: dict[str, Any] = {}
        if use_captum:
            checks["torch_vs_flax_logits_max_rel"] = _r(equiv, 9)
        exact = projector is None
        if case.naive and not args.no_naive:
            naive_scores, nv = _cached(ctx, ("naive", name), lambda: run_naive(ctx, subset))
            nv["examples_per_s"] = _r(n_items / nv["s"], 2)
            line["naive"] = nv
            line["speedup_vs_naive"] = _r(nv["s"] / eng["s"], 2)
            key = "naive_vs_engine_max_rel" if exact else "engine_projected_vs_naive_rel_fro"
            checks[key] = _r(max_rel_diff(naive_scores, scores) if exact
                             else rel_error(scores, naive_scores), 7)
            if not exact and case.n_train >= 20:
                checks["top10_agreement_vs_exact"] = _r(topk_agreement(scores, naive_scores), 4)
        if use_captum:
            captum_scores, cp = _cached(ctx, ("captum", name), lambda: run_captum(ctx, name, paths))
            cp["examples_per_s"] = _r(n_items / cp["s"], 2)
            line["captum"] = cp
            line["speedup_vs_captum"] = _r(cp["s"] / eng["s"], 2)
            line["speedup_vs_captum_incl_compile"] = _r(cp["s"] / (eng["s"] + eng["compile_s"]), 2)
            if exact:
                checks["captum_vs_engine_max_rel"] = _r(max_rel_diff(captum_scores, scores), 7)
            else:
                checks["engine_projected_vs_captum_rel_fro"] = _r(rel_error(scores, captum_scores), 5)
                if case.n_train >= 20:
                    checks["top10_agreement_vs_exact"] = _r(topk_agreement(scores, captum_scores), 4)
            checks["lr_weighting"] = ("both: sum_t lr_t <g_train, g_test> (Captum multiplies each "
                                      "checkpoint's dot product by lr once; the engine scales "
                                      "both sides by sqrt(lr))")
        line["checks"] = checks
        gpu = jax.default_backend() == "gpu"
        line["targets"] = {
            "flop_rate_vs_train_step>=0.7": (None if method != "vjp"
                                             or classgrad["flop_rate_vs_train_step"] is None
                                             else classgrad["flop_rate_vs_train_step"] >= 0.7),
            f"speedup_vs_captum>={20 if gpu else 1.5}": (
                None if "speedup_vs_captum" not in line
                else line["speedup_vs_captum"] >= (20 if gpu else 1.5)),
        }
        emit(line)


def _cached(ctx, key, fn):
    """The baselines compute exact scores whatever the engine's projection: an exact and a
    projected subset of the same parameters share one baseline run (marked ``reused``)."""
    cache = ctx.__dict__.setdefault("baselines", {})
    if key in cache:
        scores, m = cache[key]
        return scores, dict(m, reused=True)
    cache[key] = fn()
    return cache[key]


def per_example_loop_rate(ctx, subset, reps: int) -> dict:
    """For comparison with the engine's per-example VJP (unrolled in one program on CPU): a
    Python loop over the examples, each one jitted call of 1 forward + 3 backward passes (VJP
    vmapped over classes)."""
    model = ctx.model

    @jax.jit
    def one(variables, x, y):
        params = variables["params"]

        def losses(leaves):
            v = {"params": subset.insert(params, leaves), "batch_stats": variables["batch_stats"]}
            return tumour_dice_loss(model.apply(v, x[None], train=False), y[None])[0]

        out, vjp = jax.vjp(losses, subset.select(params))
        (g,) = jax.vmap(vjp)(jnp.eye(NUM_CLASSES, dtype=out.dtype))
        return jnp.concatenate([leaf.reshape(NUM_CLASSES, -1) for leaf in g], -1)

    v = ctx.variables[0]
    run = lambda: [one(v, ctx.xb[i], ctx.yb[i]) for i in range(len(ctx.xb))]  # noqa: E731
    jax.block_until_ready(run())
    s = _time_min(run, reps)
    counted = ctx.fwd_flops + 3 * (ctx.step_flops - ctx.fwd_flops) if ctx.step_flops else None
    step_rate = ctx.step_flops / ctx.step_s if ctx.step_flops else None
    return {"s": _r(s, 4), "examples_per_s": _r(len(ctx.xb) / s, 2),
            "gflops_per_s": _r(counted / s / 1e9 if counted else None, 2),
            "flop_rate_vs_train_step": _r(counted / s / step_rate if counted and step_rate else None, 3)}


# -- XLA settings sweep -----------------------------------------------------------------------------


def xla_sweep(args, emit) -> None:
    """Runs ``--rate-only`` on one case in a subprocess per XLA setting (flags are read when the
    backend starts, so each needs its own process); subsets ``head,all:exact`` unless given."""
    case = args.sweep_case
    for label, env in XLA_SETTINGS:
        full_env = dict(os.environ, **env)
        cmd = [sys.executable, "-m", "benchmarks.influence", "--rate-only", "--cases", case,
               "--reps", str(args.reps), "--subsets", args.subsets or "head,all:exact"]
        if args.batch:
            cmd += ["--batch", str(args.batch)]
        proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1])
        lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
        if proc.returncode != 0 or not lines:
            emit({"xla_setting": label, "env": env, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        for line in lines:
            emit({"xla_setting": label, "env": env, "case": line["case"], "subset": line["subset"],
                  "projection": line["projection"],
                  "train_step_gflops_per_s": line["train_step"]["gflops_per_s"],
                  "classgrad_gflops_per_s": line["classgrad"]["gflops_per_s"],
                  "flop_rate_vs_train_step": line["classgrad"]["flop_rate_vs_train_step"],
                  "classgrad_examples_per_s": line["classgrad"]["examples_per_s"],
                  "per_example_loop": line.get("classgrad_per_example_loop"),
                  "torch_train_step_gflops_per_s": (line.get("torch_train_step") or {}).get(
                      "gflops_per_s"),
                  "load_avg_1m": line["machine"]["load_avg_1m"]})


# -- summary table ----------------------------------------------------------------------------------


def summary_table(lines: list[dict]) -> str:
    cols = ["case", "n_train/test", "subset", "proj", "step GF/s", "cgrad GF/s", "rate ratio",
            "cgrad s", "engine s", "+compile", "naive s", "captum s", "x naive", "x captum",
            "x captum incl", "agree", "top10"]
    rows = []
    for l in lines:
        if "case" not in l or "engine" not in l:
            continue
        ch = l.get("checks", {})
        agree = ch.get("captum_vs_engine_max_rel", ch.get("engine_projected_vs_captum_rel_fro"))
        rows.append([l["case"], f"{l.get('n_train')}/{l.get('n_test')}", l["subset"],
                     l["projection"], l["train_step"]["gflops_per_s"],
                     l["classgrad"]["gflops_per_s"], l["classgrad"]["flop_rate_vs_train_step"],
                     l["classgrad"].get("s"),
                     l["engine"]["s"], l["engine"].get("compile_s"),
                     (l.get("naive") or {}).get("s"), (l.get("captum") or {}).get("s"),
                     l.get("speedup_vs_naive"), l.get("speedup_vs_captum"),
                     l.get("speedup_vs_captum_incl_compile"), agree,
                     ch.get("top10_agreement_vs_exact")])
    rows = [[("-" if v is None else str(v)) for v in r] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*cols)] + [fmt.format(*r) for r in rows])


# -- CLI ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.influence", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a ~1 minute smoke run (tiny case)")
    p.add_argument("--cases", default=None,
                   help=f"comma-separated case names (default {','.join(DEFAULT_CASES)}; "
                        f"known: {', '.join([*CASES, *QUICK_CASES])})")
    p.add_argument("--subsets", default=None,
                   help="override the subsets of every case, e.g. head,all:countsketch1024,all:exact")
    p.add_argument("--n-train", type=int, default=None, help="override n_train of every case")
    p.add_argument("--n-test", type=int, default=None, help="override n_test of every case")
    p.add_argument("--checkpoints", type=int, default=None, help="override the checkpoint count")
    p.add_argument("--scaling", default=None, metavar="NxM,...",
                   help="scaling sweep: run every selected case once per n_train x n_test pair, "
                        "e.g. 32x8,64x16,128x32,256x64")
    p.add_argument("--batch", type=int, default=None, help="override the gradient batch size")
    p.add_argument("--reps", type=int, default=3, help="repetitions of the rate timings (min)")
    p.add_argument("--no-captum", action="store_true", help="skip the Captum baseline")
    p.add_argument("--no-naive", action="store_true", help="skip the naive jax.grad baseline")
    p.add_argument("--rate-only", action="store_true",
                   help="only (a): training step vs per-example class gradients")
    p.add_argument("--xla-sweep", action="store_true",
                   help="(a) under each XLA setting, one subprocess each")
    p.add_argument("--sweep-case", default="w16-96", help="case of --xla-sweep")
    p.add_argument("--max-exact-params", type=int, default=5_000_000,
                   help="skip exact subsets larger than this (their features go to disk)")
    p.add_argument("--torch-threads", default="auto",
                   help="PyTorch intra-op threads of the Captum runs: a number, or auto (the "
                        "faster of 1 and all CPUs, probed before each run)")
    p.add_argument("--torch-device", default="cpu",
                   help="PyTorch device of the Captum baseline and its training step: cpu or cuda")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = p.parse_args(argv)

    out_f = open(args.out, "a") if args.out else None
    lines: list[dict] = []

    def emit(line: dict) -> None:
        lines.append(line)
        text = json.dumps(line)
        print(text, flush=True)
        if out_f:
            out_f.write(text + "\n")
            out_f.flush()

    if args.xla_sweep:
        xla_sweep(args, emit)
        return 0

    known = {**CASES, **QUICK_CASES}
    if args.cases:
        names = [c.strip() for c in args.cases.split(",") if c.strip()]
    else:
        names = list(QUICK_CASES) if args.quick else list(DEFAULT_CASES)
    unknown = [n for n in names if n not in known]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(known)}")
    overrides = {k: v for k, v in (("n_train", args.n_train), ("n_test", args.n_test),
                                   ("checkpoints", args.checkpoints), ("batch", args.batch))
                 if v is not None}
    if args.subsets:
        overrides["subsets"] = tuple(s.strip() for s in args.subsets.split(",") if s.strip())
    try:
        sizes = parse_scaling(args.scaling) if args.scaling else [{}]
    except ValueError as e:
        p.error(str(e))
    if have_captum():
        import torch

        # Explicitly sized intra-op pool: left to its lazy default, PyTorch's OpenMP pool was
        # seen to run per-example loops 10-30x slower on a shared machine.
        torch.set_num_threads(machine_cpus())
    machine = machine_info()
    if not have_captum() and not args.no_captum:
        print("torch/captum not installed (pip install -e '.[bench]'): Captum baseline skipped",
              file=sys.stderr)
    t0 = time.perf_counter()
    for n in names:
        for size in sizes:
            case = Case(**{**asdict(known[n]), **overrides, **size})
            machine["load_avg_1m"] = (round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg")
                                      else None)
            run_case(case, args, dict(machine), emit)
    print(summary_table(lines), file=sys.stderr)
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if out_f:
        out_f.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
