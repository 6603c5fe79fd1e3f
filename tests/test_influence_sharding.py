"""8 fake CPU devices give the same influence as 1 (the training axis is sharded)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np

from tracin_jax.influence import (compute_influence, make_class_grad_fn, make_projector,
                                  resolve_subset)
from tracin_jax.influence.sharding import train_mesh
from tracin_jax.influence.reference import toy_problem

REPO = Path(__file__).resolve().parents[1]
TOY = dict(n_train=7, n_test=3, size=8, n_checkpoints=2, seed=5, depth=1)
SETTINGS = {"proj": ("dec0/.*|head/kernel", 64)}  # backward pass, projection, top-K

SCRIPT = textwrap.dedent("""
    import sys
    import jax
    from tracin_jax.influence import compute_influence, make_class_grad_fn, make_projector, resolve_subset
    from tracin_jax.influence.reference import toy_problem

    assert jax.device_count() == 8, jax.devices()
    toy = toy_problem(**{toy})
    for name, (spec, dim) in {settings}.items():
        subset = resolve_subset(toy.checkpoints[0].variables["params"], spec)
        fn = make_class_grad_fn(toy.model, subset, projector=make_projector(subset, dim, seed=1))
        compute_influence(fn, toy.checkpoints, toy.train, toy.test, sys.argv[1] + "/" + name,
                          store_dir=sys.argv[1] + "/store-" + name, chunk_size=3, batch_size=3,
                          topk=2, progress=False)
""")


def _compute(out: Path, mesh):
    toy = toy_problem(**TOY)
    for name, (spec, dim) in SETTINGS.items():
        subset = resolve_subset(toy.checkpoints[0].variables["params"], spec)
        fn = make_class_grad_fn(toy.model, subset, projector=make_projector(subset, dim, seed=1))
        compute_influence(fn, toy.checkpoints, toy.train, toy.test, out / name,
                          store_dir=out / f"store-{name}", chunk_size=3, batch_size=3, topk=2,
                          progress=False, mesh=mesh)


def test_eight_devices_agree_with_one(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8")
    script = SCRIPT.format(toy=TOY, settings=SETTINGS)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "eight")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _compute(tmp_path / "one", train_mesh(jax.devices()[:1]))
    for name in SETTINGS:
        eight, one = tmp_path / "eight" / name, tmp_path / "one" / name
        assert json.loads((eight / "meta.json").read_text())["device_count"] == 8
        for f in ("scores.npy", "self_influence.npy", "patient_scores.npy"):
            want = np.load(one / f)
            np.testing.assert_allclose(np.load(eight / f), want, rtol=1e-5,
                                       atol=1e-6 * np.abs(want).max())
        for f in ("topk_proponents_indices.npy", "topk_opponents_indices.npy"):
            np.testing.assert_array_equal(np.load(eight / f), np.load(one / f))

