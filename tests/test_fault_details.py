"""Smaller promises: the synthetic dataset's modes, one-line NegativeVoxelsWarning, and XLA's
workspace in the influence memory estimate."""

import os
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from tracin_jax.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def test_synth_folders_and_files_follow_the_umask(tmp_path):
    from tracin_jax.data import write_synthetic_dataset
    from tracin_jax.data.synth import DATASET_DIR, PARTIAL

    stale = tmp_path / f"{PARTIAL}999999999-0badc0de"  # a killed run's (no such process)
    stale.mkdir(parents=True)
    (stale / "half.nii.gz").write_bytes(b"x")
    old = os.umask(0o022)
    try:
        write_synthetic_dataset(tmp_path, cases=1, seed=0, progress=False, shape=(16, 16, 16))
    finally:
        os.umask(old)
    root = tmp_path / DATASET_DIR
    folders = [root, *(p for p in root.rglob("*") if p.is_dir())]
    files = [p for p in root.rglob("*") if p.is_file()]
    assert len(folders) >= 3 and len(files) >= 5
    assert {stat.S_IMODE(p.stat().st_mode) for p in folders} == {0o755}
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}
    assert sorted(p.name for p in tmp_path.iterdir()) == [DATASET_DIR]  # stale one removed


def test_negative_voxels_warning_is_one_line():
    from tracin_jax.data.loader import NegativeVoxelsWarning, one_line_warnings, warn_negative

    one_line_warnings(NegativeVoxelsWarning)
    one_line_warnings(NegativeVoxelsWarning)  # idempotent: one wrapper
    text = warnings.formatwarning("case X: negative voxels", NegativeVoxelsWarning, __file__, 1)
    assert text == "NegativeVoxelsWarning: case X: negative voxels\n"
    other = warnings.formatwarning("x", UserWarning, __file__, 1)
    assert other.startswith(f"{__file__}:1: UserWarning: x")  # others keep Python's format
    with pytest.warns(NegativeVoxelsWarning, match="case C1: negative voxels in C1_flair.nii.gz"):
        warn_negative("C1", {"/d/C1/C1_flair.nii.gz": -4.0})

    # As a user sees it: stderr of a process that loads such a case.
    script = ("from tracin_jax.data.loader import warn_negative\n"
              "warn_negative('C1', {'/d/C1/C1_flair.nii.gz': -4.0, '/d/C1/C1_t1.nii.gz': -2.5})\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        "NegativeVoxelsWarning: case C1: negative voxels in C1_flair.nii.gz (min -4), "
        "C1_t1.nii.gz (min -2.5); paper normalisation 2x/max(x)-1 maps them below -1 "
        "(kept as they are)"]


def test_memory_estimate_includes_the_gradient_programs_workspace(toy, tmp_path):
    from tracin_jax.influence import checks, engine, sharding
    from tracin_jax.influence.grads import make_class_grad_fn
    from tracin_jax.influence.subsets import resolve_subset

    variables = toy.checkpoints[0].variables
    fn = make_class_grad_fn(toy.model, resolve_subset(variables["params"], "all"))
    mesh = sharding.train_mesh()
    workspace = checks.gradient_workspace(fn, variables, toy.train.images, toy.train.labels, 2,
                                          mesh)
    # The same program the stage runs, compiled ahead of time.
    spec = lambda s, d: jax.ShapeDtypeStruct(s, d)  # noqa: E731
    compiled = fn.fn.lower(jax.tree.map(lambda x: spec(np.shape(x), x.dtype), variables),
                           spec((2, *toy.train.images.shape[1:]), np.float32),
                           spec((2, *toy.train.labels.shape[1:]), np.int32)).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip("this backend reports no memory analysis")
    assert workspace == analysis.temp_size_in_bytes > 0

    sizes = dict(n_test=3, n_train=7, num_classes=3, dim=fn.dim, n_checkpoints=2, chunk_size=3,
                 batch_size=2, grad_params=fn.subset.size, split="test")
    without = checks.memory_estimate(**sizes)
    with_ws = checks.memory_estimate(**sizes, workspace_bytes=workspace)
    assert with_ws["total"] - without["total"] == workspace == with_ws["gradient_workspace"]

    kw = dict(store_dir=tmp_path / "store", chunk_size=3, batch_size=2, progress=False)
    meta = engine.compute_influence(fn, toy.checkpoints, toy.train, toy.test, tmp_path / "out",
                                    **kw)
    assert meta["memory_estimate"]["gradient_workspace"] == workspace
    assert meta["memory_estimate"]["total"] == with_ws["total"]
    # A budget that the estimate without the workspace would meet is refused, naming it.
    budget = (without["total"] + workspace // 2) / 2**30
    with pytest.raises(InputError, match="gradient workspace"):
        engine.compute_influence(fn, toy.checkpoints, toy.train, toy.test, tmp_path / "small",
                                 memory_budget_gb=budget, **kw)
    assert not (tmp_path / "small").exists()

    # No ahead-of-time compilation (a plain Python function): the part is 0, as before.
    plain = lambda v, x, y: fn(v, x, y)  # noqa: E731
    assert checks.gradient_workspace(plain, variables, toy.train.images, toy.train.labels, 2,
                                     mesh) is None
