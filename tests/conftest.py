"""Shared fixtures: a tiny synthetic BraTS dataset and a tiny trained run, built once per session.

Volumes are 80 x 80 x 48 (the synthetic generator keeps the 240 x 240 x 155 mm field of view with
larger voxels), cropped to 64 x 64, downsampled 2x to 32 x 32, four axial slices per case.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# One persistent XLA compilation cache per test session, shared with the subprocesses the tests
# start (they inherit the environment): the suite builds the same tiny-model programs many times
# (every test makes its own jitted functions, every CLI test is a new process), and a cached
# program is loaded instead of compiled again. Set before JAX is imported; a fresh folder per
# session, removed at its end.
_XLA_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = tempfile.mkdtemp(prefix="tracin-jax-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# The test programs are tiny: compiling them costs far more than running them. LLVM's
# optimisation level 0 for XLA's CPU code halves the compile time (the unrolled 'all' gradient
# program of the tiny run at batch 4: 10.7 -> 5.2 CPU s; training the tiny run for 3 epochs:
# 17.5 -> 10.7 CPU s, on the project's 2-core machine). IEEE float semantics are unchanged, but
# results are not bit-identical to optimised code, so every comparison stays inside one
# session. Inherited by the subprocesses; a user's own level in XLA_FLAGS is kept.
# XLA's older elemental emitters for fusions compile the same programs faster again (backend
# compilation of the tiny run's train step and its head and 'all' class gradients: 4.7-5.2 s ->
# 2.9-3.1 s).
for _flag in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

TINY_SHAPE = (80, 80, 48)
TINY_OVERRIDES = ["data.crop=8,72,8,72", "data.downsample=2", "data.slices=26:30", "train.epochs=3"]


# The toy influence problem shared by the store and semantics tests (a depth-1 U-Net on 8 x 8
# images, 7 training and 3 test examples, 2 checkpoints).
TOY = dict(n_train=7, n_test=3, size=8, n_checkpoints=2, seed=3, depth=1)


@pytest.fixture(scope="session")
def toy():
    from tracin_jax.influence.reference import toy_problem

    return toy_problem(**TOY)


def pytest_sessionfinish(session, exitstatus):
    if _XLA_CACHE is not None:
        shutil.rmtree(_XLA_CACHE, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Preprocessing cache in a temporary folder, never the user's ~/.cache."""
    old = os.environ.get("TRACIN_JAX_CACHE")
    os.environ["TRACIN_JAX_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("TRACIN_JAX_CACHE", None)
    else:
        os.environ["TRACIN_JAX_CACHE"] = old


def tiny_config(*extra: str):
    from tracin_jax.config import apply_overrides, get_config

    return apply_overrides(get_config("tiny"), [*TINY_OVERRIDES, *extra])


def _built_once(tmp_path_factory, name: str, build) -> Path:
    """``build(folder)`` once per test session, whatever the number of xdist workers.

    Under xdist every worker is its own process with its own session fixtures; the first to ask
    builds the folder in the session's shared temporary root, under a file lock, and the others
    wait for it and reuse it. Treat the folder as read-only (copy it to write into it).
    """
    import fcntl

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-N/: shared by this session's workers only
    folder = root / f"shared-{name}"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / f"shared-{name}.done").exists():
            shutil.rmtree(folder, ignore_errors=True)
            build(folder)
            (root / f"shared-{name}.done").touch()
    return folder


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A 6-case synthetic BraTS 2019 tree (seed 0)."""
    from tracin_jax.data import write_synthetic_dataset

    return _built_once(tmp_path_factory, "tiny_data", lambda root: write_synthetic_dataset(
        root, cases=6, seed=0, progress=False, shape=TINY_SHAPE))


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """Workdir of the `tiny` config trained for 3 epochs on `tiny_data` (checkpoints 1, 2, 3)."""
    from tracin_jax.training.train import train_and_evaluate

    shared = _built_once(tmp_path_factory, "tiny_run", lambda root: train_and_evaluate(
        tiny_config(), tiny_data, root, progress=False, log=lambda s: None))
    workdir = tmp_path_factory.mktemp("tiny_run") / "run"
    shutil.copytree(shared, workdir)  # each worker's own: tests may write into a run
    return workdir


@pytest.fixture(scope="session")
def tiny_influence(tiny_run, tmp_path_factory) -> Path:
    """Influence folder (head subset, all 3 checkpoints) of `tiny_run`."""
    from tracin_jax.influence import run_influence

    out = tmp_path_factory.mktemp("tiny_influence") / "influence"
    run_influence(tiny_run, out, params="head", progress=False)
    return out


# Scheduling only: pytest-xdist hands whole files to the workers in collection order (`make test`
# passes --no-loadscope-reorder), so the files that take longest start first and the short ones
# fill the gaps at the end (longest-first balances two workers). Seconds measured on the
# project's 2-core machine; a file not listed counts as short. Stale numbers cost time, never
# correctness.
FILE_SECONDS = {
    "test_models_arch.py": 109, "test_distributed_influence.py": 95, "test_evaluate_workers.py": 50,
    "test_distributed_train.py": 30, "test_compile_cache.py": 40, "test_gpu_check.py": 35, "test_evaluate_cli.py": 46, "test_influence_ekfac.py": 38,
    "test_explain_report.py": 37, "test_experiments_consistency.py": 34, "test_notebooks.py": 30,
    "test_training.py": 31, "test_influence_logra.py": 30, "test_evaluate_retrain.py": 29,
    "test_influence_grads.py": 28, "test_influence_engine.py": 28, "test_influence_methods.py": 30,
    "test_experiments_mislabel.py": 26, "test_influence_trak.py": 25, "test_data_real.py": 22,
    "test_influence_precondition.py": 22, "test_experiments_paper_scale.py": 21,
    "test_influence_semantics.py": 18, "test_explain_figures.py": 15,
    "test_explain_output.py": 14, "test_influence_sharding.py": 13, "test_influence_store.py": 12,
    "test_influence_faults.py": 12, "test_influence_projection.py": 11, "test_model.py": 11,
    "test_explain_classes.py": 10, "test_losses.py": 9, "test_train_guards.py": 12,
    "test_output_faults.py": 10, "test_task_classes.py": 22,
}


def pytest_collection_modifyitems(session, config, items):
    order = {}
    for item in items:
        order.setdefault(item.path.name, len(order))
    items.sort(key=lambda it: (-FILE_SECONDS.get(it.path.name, 0), order[it.path.name]))


def cli_in_process(capsys, *args) -> tuple[int, str]:
    """(exit status, stderr) of the command line run in this process (no JAX start-up cost);
    argparse's own refusals (SystemExit) give their status too."""
    from tracin_jax.cli import main

    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def check_conv_layer_pieces(model, variables, x, layers, loss) -> None:
    """Asserts that EK-FAC's Kronecker pieces rebuild every layer of ``layers`` (2D or 3D):
    patches @ W + b is the layer's output, sum_p x_p delta_p^T its weight gradient (against
    ``jax.grad`` of the summed ``loss(logits)``), and the kernel matrix maps back to the
    kernel. One jitted program computes every piece (run eagerly, each primitive would
    compile alone)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import traverse_util

    from tracin_jax.influence import ekfac as E

    def layer_outputs(v):
        got = {}

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            path = "/".join(context.module.scope.path)
            if context.method_name == "__call__" and path in {l.name for l in layers}:
                got[path] = out
            return out

        with nn.intercept_methods(interceptor):
            model.apply(v, x, train=False)
        return got

    @jax.jit
    def pieces(v):
        inputs, grads = E.capture(model, v, x, layers, loss)
        flat = traverse_util.flatten_dict(v["params"], sep="/")
        full = traverse_util.flatten_dict(jax.grad(
            lambda p: jnp.sum(loss(model.apply(dict(v, params=p), x, train=False))))(v["params"]),
            sep="/")
        outs = layer_outputs(v)
        res = {}
        for l in layers:
            p = E.patches(l, inputs[l.name])
            w = E.kernel_matrix(l, flat[f"{l.name}/kernel"], flat.get(f"{l.name}/bias"))
            d = grads[l.name].reshape(len(x), -1, l.out_dim)
            res[l.name] = {
                "pw": p @ w, "out": outs[l.name].reshape(len(x), -1, l.out_dim),
                "g": jnp.einsum("bpi,bpo->io", p, d),
                "want": E.kernel_matrix(l, full[f"{l.name}/kernel"], full.get(f"{l.name}/bias")),
                "back": E.matrix_to_leaves(l, w)[0]}
        return res

    got = pieces(variables)
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    for l in layers:
        r = got[l.name]
        np.testing.assert_allclose(r["pw"], r["out"], atol=1e-5, err_msg=l.name)
        np.testing.assert_allclose(r["g"], r["want"], rtol=1e-4, atol=1e-6, err_msg=l.name)
        np.testing.assert_array_equal(r["back"], np.float32(flat[f"{l.name}/kernel"]))


@pytest.fixture
def drawn(monkeypatch):
    """Captures each figure of ``tracin_jax.explain.figures`` at save time, after a full draw,
    instead of writing it: one record per figure, {"bbox": the figure's box, "texts": [(text,
    window extent, gid)] of the visible texts that are drawn, "axes": its axes}."""
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from tracin_jax.explain import figures

    seen = []

    def save(fig, path):
        fig.set_dpi(figures.DPI)
        fig.canvas.draw()
        undrawn = set()  # labels of ticks outside the axis limits, which matplotlib skips
        for ax in fig.axes:
            for axis in (ax.xaxis, ax.yaxis):
                lo, hi = sorted(axis.get_view_interval())
                for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                    if not lo - 1e-9 * (hi - lo) <= tick.get_loc() <= hi + 1e-9 * (hi - lo):
                        undrawn |= {id(tick.label1), id(tick.label2)}
        texts = [(t.get_text(), t.get_window_extent(fig.canvas.get_renderer()), t.get_gid())
                 for t in fig.findobj(Text)
                 if t.get_visible() and t.get_text().strip() and id(t) not in undrawn]
        seen.append({"bbox": fig.bbox.frozen(), "texts": texts, "axes": list(fig.axes)})
        plt.close(fig)
        return Path(path).name

    monkeypatch.setattr(figures, "_save", save)
    return seen
