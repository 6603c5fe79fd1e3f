"""Class-wise TRAK: the region output and Q by hand, the closed form on a linear model (through
the shared pipeline), the method end to end on the tiny run (checkpoints and retrained seeds,
resume, the shared store), and CLI errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracin_jax.cli import main
from tracin_jax.errors import InputError
from tracin_jax.influence import resolve_subset, run_influence
from tracin_jax.influence.methods import Common, Method
from tracin_jax.influence.methods.trak import Trak, TrakOptions
from tracin_jax.influence.trak import (TrakModel, out_to_loss, region_margin, trak_grad_fn,
                                       trak_scores)


class Linear1x1(nn.Module):
    """logits = x @ W + b pixel by pixel (a 1x1 conv named ``head``); its features are x."""

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        logits = nn.Conv(4, (1, 1), name="head")(x)
        return (logits, x) if return_features else logits


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_region_margin_and_out_to_loss_by_hand():
    logits = np.zeros((1, 1, 2, 4), np.float32)
    logits[0, 0, 0] = [0.0, 2.0, 0.0, 0.0]  # pixel of label 1
    logits[0, 0, 1] = [1.0, 0.0, 3.0, -1.0]  # pixel of label 2
    labels = np.array([[[1, 2]]], np.int32)  # label 3 absent
    # jitted: one small program each rather than one per eager operation
    m = np.asarray(jax.jit(region_margin)(jnp.asarray(logits), jnp.asarray(labels)))
    want1 = 2.0 - np.log(3.0)  # logit_1 - log(e^0 + e^0 + e^0)
    want2 = 3.0 - np.log(np.exp(1.0) + 1.0 + np.exp(-1.0))
    np.testing.assert_allclose(m, [[want1, want2, 0.0]], rtol=1e-5)
    q = np.asarray(jax.jit(out_to_loss)(jnp.asarray(logits), jnp.asarray(labels)))
    p = _softmax(logits[0, 0].astype(np.float64))
    np.testing.assert_allclose(q, [[1 - p[0, 1], 1 - p[1, 2], 0.0]], rtol=1e-5)


def _linear_problem(n_train=6, n_test=3, size=4, n_models=2, seed=0):
    rng = np.random.default_rng(seed)

    def examples(n, prefix):
        labels = rng.integers(0, 4, (n, size, size)).astype(np.int32)
        labels[0][labels[0] == 3] = 0  # one slice without ET
        return SimpleNamespace(images=rng.normal(size=(n, size, size, 4)).astype(np.float32),
                               labels=labels, ids=[f"{prefix}{k}" for k in range(n)],
                               cases=[f"{prefix}case{k // 2}" for k in range(n)])

    model = Linear1x1()
    models = [TrakModel(k, f"m{k}", None, {"params": {"head": {
        "kernel": jnp.asarray(rng.normal(size=(1, 1, 4, 4)), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}}}) for k in range(n_models)]
    return model, models, examples(n_train, "tr"), examples(n_test, "te")


def _analytic_features(variables, ex):
    """phi[n, C, 16]: d(region margin)/dW of the linear model, by hand (no autodiff).

    margin_c(x) = logit_c - logsumexp_{k != c} logit_k, so d/dlogits = e_c - softmax over the
    other classes (0 at c), and d/dW[f, k] = x_f * that, summed over the region."""
    w = np.asarray(variables["params"]["head"]["kernel"], np.float64)[0, 0]
    b = np.asarray(variables["params"]["head"]["bias"], np.float64)
    x = ex.images.astype(np.float64)
    logits = x @ w + b
    out = np.zeros((len(x), 3, 16))
    for ci, c in enumerate((1, 2, 3)):
        others = [k for k in range(4) if k != c]
        q = np.zeros_like(logits)
        q[..., others] = _softmax(logits[..., others])
        d = np.eye(4)[c] - q  # [n, H, W, 4]
        d = d * (ex.labels == c)[..., None]
        out[:, ci] = np.einsum("nhwf,nhwk->nfk", x, d).reshape(len(x), 16)
    return out


def _analytic_q(variables, ex):
    w = np.asarray(variables["params"]["head"]["kernel"], np.float64)[0, 0]
    b = np.asarray(variables["params"]["head"]["bias"], np.float64)
    p = _softmax(ex.images.astype(np.float64) @ w + b)
    q = np.zeros((len(p), 3))
    for ci, c in enumerate((1, 2, 3)):
        region = ex.labels == c
        n = region.sum(axis=(1, 2))
        q[:, ci] = np.where(n > 0, ((1 - p[..., c]) * region).sum(axis=(1, 2)) / np.maximum(n, 1), 0)
    return q


def _closed_form(models, train, test, damping):
    total = 0.0
    for mdl in models:
        phi = _analytic_features(mdl.variables, train)
        rows = phi.reshape(-1, 16)
        gram = rows.T @ rows
        lam = damping * np.trace(gram) / 16
        kinv = np.linalg.inv(gram + lam * np.eye(16))
        total = total + np.einsum("aid,de,bje->aibj", _analytic_features(mdl.variables, test),
                                  kinv, phi)
    qbar = np.mean([_analytic_q(m.variables, train) for m in models], axis=0)
    return total / len(models) * qbar[None, None]


def _compute(models, train, test, out, damping, model, **common):
    """TRAK of the given models (the ensemble as they are) through Method.compute."""
    run = SimpleNamespace(model=model, image_shape=train.images.shape[1:], train=train,
                          test=test)
    subset = resolve_subset(models[0].variables["params"], "head")
    method = Trak(TrakOptions(damping=damping, models_from="checkpoints"))
    return method.compute(run, models, out, Common(**{"progress": False, **common}),
                          grad_fn=trak_grad_fn(model, subset))


def test_trak_goes_through_the_shared_pipeline():
    from tracin_jax.influence.store import key_folder

    assert Trak.run is Method.run and Trak.compute is Method.compute
    # a store "checkpoint" is an epoch or a model's name (TRAK's retrained seeds)
    assert key_folder(3) == "epoch_0003" and key_folder("seed1") == "model_seed1"
    with pytest.raises(ValueError, match="starts with a letter"):
        key_folder("1")


def test_trak_equals_closed_form_on_linear_model(tmp_path):
    model, models, train, test = _linear_problem()
    damping = 0.05
    meta = _compute(models, train, test, tmp_path / "out", damping, model,
                    store_dir=tmp_path / "store", batch_size=2, chunk_size=2)  # 3 chunks
    want = _closed_form(models, train, test, damping)
    scores = np.load(tmp_path / "out" / "scores.npy")
    np.testing.assert_allclose(scores, want, rtol=2e-3, atol=1e-5 * np.abs(want).max())
    # patients: the sum over each patient's slices (sorted case ids)
    pat = np.load(tmp_path / "out" / "patient_scores.npy")
    np.testing.assert_allclose(pat, want.reshape(3, 3, 3, 2, 3).sum(axis=3), rtol=2e-3,
                               atol=1e-5 * np.abs(want).max())
    # self-score: phi^T K^-1 phi Q, averaged over the models
    lev = []
    for mdl in models:
        phi = _analytic_features(mdl.variables, train)
        rows = phi.reshape(-1, 16)
        gram = rows.T @ rows
        kinv = np.linalg.inv(gram + damping * np.trace(gram) / 16 * np.eye(16))
        lev.append(np.einsum("bjd,de,bje->bj", phi, kinv, phi))
    qbar = np.mean([_analytic_q(m.variables, train) for m in models], axis=0)
    np.testing.assert_allclose(np.load(tmp_path / "out" / "self_influence.npy"),
                               np.mean(lev, axis=0) * qbar, rtol=2e-3, atol=1e-6)
    assert meta["method"] == "trak" and meta["trak"]["damping"] == damping
    assert len(meta["trak"]["lambda"]) == 2 and meta["checkpoints"] == []  # no run epochs
    assert meta["spec"]["options"] == {"damping": damping, "models": 2,
                                       "models_from": "checkpoints"}
    # the shared pipeline's folder: its fields, one store "checkpoint" per model (the keys)
    assert meta["relatif"] is False and meta["batch_size"] == 2 and "memory_estimate" in meta
    assert {p.name for p in (tmp_path / "store").glob("epoch_*")} == {"epoch_0000",
                                                                      "epoch_0001"}
    assert not np.load(tmp_path / "out" / "train_present.npy")[0, 2]  # no ET in slice 0
    np.testing.assert_array_equal(scores[:, :, 0, 2], 0.0)  # an absent class scores 0
    # the in-memory function gives the same numbers from the same features
    tr = [_analytic_features(m.variables, train) for m in models]
    te = [_analytic_features(m.variables, test) for m in models]
    q = [_analytic_q(m.variables, train) for m in models]
    np.testing.assert_allclose(trak_scores(te, tr, q, damping), want, rtol=1e-4,
                               atol=1e-6 * np.abs(want).max())


def test_trak_scores_rejects_mismatched_inputs():
    with pytest.raises(InputError, match="same positive number"):
        trak_scores([np.zeros((1, 3, 2))], [], [])


# The tiny run's 16 training and 8 test slices in batches of one shape: each gradient and
# output function of a TRAK run is traced and compiled once, not once per shape.
BATCH = 8


@pytest.fixture(scope="module")
def trak_workdir(tiny_run, tmp_path_factory):
    """A private copy of the tiny run (the seed models are cached inside the workdir)."""
    wd = tmp_path_factory.mktemp("trak_run") / "run"
    shutil.copytree(tiny_run, wd)
    return wd


def _trak_folder(workdir, out, **kw):
    return run_influence(workdir, out, method="trak", **{"batch_size": BATCH, "progress": False,
                                                         "params": "head", **kw})


@pytest.fixture(scope="module")
def trak_checkpoints(trak_workdir, tmp_path_factory):
    """(folder, meta): TRAK of the run's checkpoints 2 and 3 (head), computed once; tests that
    change the folder work on a copy."""
    out = tmp_path_factory.mktemp("trak_checkpoints") / "trak"
    meta = _trak_folder(trak_workdir, out, models_from="checkpoints", checkpoints="2,3")
    return out, meta


def test_trak_checkpoints_end_to_end(trak_workdir, trak_checkpoints, tmp_path):
    from tracin_jax import load_run
    from tracin_jax.evaluate.api import _load_influence

    out = tmp_path / "trak"
    shutil.copytree(trak_checkpoints[0], out)
    meta = trak_checkpoints[1]
    run = load_run(trak_workdir)
    patients = sorted({str(c) for c in run.train.cases})
    loaded = _load_influence(out, patients, [str(i) for i in run.train.ids],
                             [str(i) for i in run.test.ids], trak_workdir)
    assert loaded["scores"].shape == (len(run.test.ids), 3, len(patients), 3)
    assert np.isfinite(loaded["scores"]).all()
    assert [c["epoch"] for c in meta["checkpoints"]] == [2, 3]
    assert meta["trak"]["models"] == ["run epoch 2", "run epoch 3"]
    assert meta["gradient"]["tag"].startswith("trak(") and meta["run_identity"]["checkpoints"]
    assert list(meta["run_identity"]["checkpoints"]) == ["2", "3"]
    store = Path(meta["store"])
    assert store.parent == trak_workdir / "features"
    assert sorted(p.name for p in store.glob("epoch_*")) == ["epoch_0002", "epoch_0003"]
    # rerun after a lost meta.json and a lost store chunk: same scores
    first = np.load(out / "scores.npy")
    (out / "meta.json").unlink()
    next(iter(sorted(store.glob("epoch_*/*.npy")))).unlink()
    meta2 = _trak_folder(trak_workdir, out, models_from="checkpoints", checkpoints="2,3")
    assert meta2["timings"]["train_features"]["chunks_computed"] == 1
    np.testing.assert_allclose(np.load(out / "scores.npy"), first, rtol=1e-5, atol=1e-7)


def test_trak_seeds_trains_once(trak_workdir, tmp_path, capsys):
    meta = _trak_folder(trak_workdir, tmp_path / "a", models_from="seeds", models=2)
    files = sorted((trak_workdir / "trak" / "models").glob("*.npz"))
    assert len(files) == 1 and "training 1 full-data model" in capsys.readouterr().err
    assert meta["trak"]["models"] == ["run epoch 3", "seed 1"]
    assert [c["epoch"] for c in meta["checkpoints"]] == [3]
    assert meta["spec"]["checkpoints"] == [3] and meta["spec"]["options"]["models"] == 2
    assert list(meta["run_identity"]["checkpoints"]) == ["3"]
    # one store with the checkpoints ensemble: the seed model under its name
    store = Path(meta["store"])
    assert {p.name for p in store.iterdir() if p.is_dir()} >= {"epoch_0003", "model_seed1"}
    stamp = files[0].stat().st_mtime_ns
    meta_b = _trak_folder(trak_workdir, tmp_path / "b", models_from="seeds", models=2)
    assert files[0].stat().st_mtime_ns == stamp  # reused, not retrained
    assert "training" not in capsys.readouterr().err
    assert meta_b["timings"]["train_features"]["chunks_computed"] == 0
    np.testing.assert_allclose(np.load(tmp_path / "b" / "patient_scores.npy"),
                               np.load(tmp_path / "a" / "patient_scores.npy"), rtol=1e-5)


@pytest.mark.parametrize("kw, match", [
    ({"models_from": "bagging"}, "--trak-models-from 'bagging'"),
    ({"models": 0}, "--trak-models 0"),
    ({"damping": -1.0}, "--damping -1.0"),
    ({"params": "head", "max_dim": 8}, "use --proj-dim 4096"),
    ({"split": "train"}, "--method trak scores the test split only"),
    ({"memory_budget_gb": 1e-4}, "--memory-budget-gb 0.0001"),
    ({"models_from": "checkpoints", "kernel_gb": 4}, r"kernels 4\.00 GB"),
])
def test_trak_bad_input(trak_workdir, tmp_path, monkeypatch, kw, match):
    from tracin_jax.influence import trak

    if "max_dim" in kw:  # features larger than the kernel allows (the tiny head has 16)
        monkeypatch.setattr(trak, "MAX_KERNEL_DIM", kw.pop("max_dim"))
    if "kernel_gb" in kw:  # kernels beyond the memory budget, refused before any work
        gb = kw.pop("kernel_gb")
        monkeypatch.setattr(trak, "kernel_bytes", lambda m, d: gb * 2**30)
    models = trak_workdir / "trak" / "models"
    before = sorted(models.glob("*")) if models.exists() else []
    with pytest.raises(InputError, match=match):
        run_influence(trak_workdir, tmp_path / "x", method="trak", progress=False, **kw)
    assert not (tmp_path / "x").exists()
    after = sorted(models.glob("*")) if models.exists() else []
    assert after == before  # nothing trained before the error


def test_cli_trak_and_its_errors(trak_workdir, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["influence", "--workdir", str(trak_workdir), "--out", str(out), "--method",
                 "trak", "--trak-models-from", "checkpoints", "--checkpoints", "2,3", "--batch-size",
                 str(BATCH)]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["method"] == "trak" and [c["epoch"] for c in meta["checkpoints"]] == [2, 3]
    for extra, match in ((["--method", "bogus"], "--method 'bogus'"),
                         (["--method", "trak", "--normalised"], "do not apply"),
                         (["--method", "trak", "--trak-models", "0"], "--trak-models 0")):
        capsys.readouterr()
        assert main(["influence", "--workdir", str(trak_workdir), "--out", str(tmp_path / "bad"),
                     *extra]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tracin-jax: error:") and match in lines[0]
    assert not (tmp_path / "bad").exists()


def test_evaluation_knows_a_trak_folder(trak_workdir, trak_checkpoints, tmp_path):
    """The evaluation's table names TRAK, pairs it with no mislabel method, and randomises it
    by recomputing TRAK (not Dice TracIn) with re-initialised models."""
    from tracin_jax import load_run
    from tracin_jax.evaluate import sanity

    out, meta = trak_checkpoints
    spec = sanity.gradient_spec(meta)
    assert spec.describe().startswith("TRAK margin head, ") and spec.loss == "dice"
    assert "models_from=checkpoints" in spec.describe()
    seeds = {**meta["spec"], "options": {**meta["spec"]["options"], "models_from": "seeds"}}
    assert sanity.mislabel_match(meta["spec"], 3,
                                 [sanity.MislabelGradient("TRAK head", seeds, 3, 0.8)]) is None
    run = load_run(trak_workdir)
    res = sanity.model_randomisation(run, out, tmp_path / "rnd", progress=False)
    rnd = json.loads((tmp_path / "rnd" / sanity.randomised_key(meta, 0) / "meta.json").read_text())
    assert rnd["method"] == "trak" and rnd["trak"]["models"] == ["random init 0", "random init 1"]
    assert rnd["trak"]["damping"] == meta["trak"]["damping"]
    assert res["n_targets"] > 0 and np.isfinite(res["mean"])
