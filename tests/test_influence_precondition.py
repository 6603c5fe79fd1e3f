"""Adam-aware TracIn (a per-checkpoint diagonal preconditioner in the store) and RelatIF-style
normalisation, against explicit jax.grad vectors and formulas on the toy problem."""

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tracin_jax.errors import InputError
from tracin_jax.influence import (class_tracin, compute_influence, make_class_grad_fn,
                                  make_projector, normalised, resolve_subset)
from tracin_jax.influence.precondition import (AdamPreconditioner, IdentityPreconditioner,
                                               adam_diagonal, relatif_scores)
from tracin_jax.influence.reference import brute_force_class_grads

B2, EPS = 0.99, 1e-3  # a large eps so it matters in the comparison


def _adam_checkpoints(toy, steps=(2, 3), b2=B2, eps=EPS):
    """The toy checkpoints, each with an Adam state (as training saves it: inject_hyperparams
    around optax.adam) after ``steps[t]`` updates with random gradients; plus the gradients."""
    out, history = [], []
    rng = np.random.default_rng(0)
    for ckpt, n in zip(toy.checkpoints, steps):
        params = ckpt.variables["params"]
        tx = optax.inject_hyperparams(optax.adam)(learning_rate=ckpt.lr, b1=0.9, b2=b2, eps=eps)
        state = tx.init(params)
        grads = []
        for _ in range(n):
            g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
            _, state = tx.update(g, state, params)
            grads.append(g)
        out.append(SimpleNamespace(epoch=ckpt.epoch, lr=ckpt.lr, variables=ckpt.variables,
                                   opt_state=state))
        history.append(grads)
    return out, history


def _manual_diagonal(grads, subset, b2=B2, eps=EPS):
    """1/(sqrt(v_hat)+eps) from the gradient sequence by the textbook recursion, flattened."""
    leaves = [np.zeros(s, np.float64) for s in subset.shapes]
    for g in grads:
        sel = subset.select(g)
        leaves = [b2 * v + (1 - b2) * np.asarray(x, np.float64) ** 2 for v, x in zip(leaves, sel)]
    t = len(grads)
    return np.concatenate([(1.0 / (np.sqrt(v / (1 - b2 ** t)) + eps)).reshape(-1)
                           for v in leaves])


@pytest.fixture(scope="module")
def adam_toy(toy):
    return _adam_checkpoints(toy)


def _explicit(toy, subset, ckpts, history, test_pre=False):
    """(scores f64[n_test, C, n_train, C], self f64[n_train, C]): sum_t lr_t g_test^T
    (a_t * g_train) with a_t from the manual recursion; the test side is NOT preconditioned."""
    scores, self_inf = 0.0, 0.0
    for ckpt, grads in zip(ckpts, history):
        a = _manual_diagonal(grads, subset)
        gtr = brute_force_class_grads(toy.model, subset, ckpt.variables, toy.train.images,
                                      toy.train.labels)
        gte = brute_force_class_grads(toy.model, subset, ckpt.variables, toy.test.images,
                                      toy.test.labels)
        scores = scores + ckpt.lr * np.einsum("aid,bjd->aibj", gte, gtr * a)
        self_inf = self_inf + ckpt.lr * np.einsum("bjd,bjd->bj", gtr, gtr * a)
    return scores, self_inf


def test_adam_diagonal_reads_the_bias_corrected_second_moment(toy, adam_toy):
    ckpts, history = adam_toy
    subset = resolve_subset(toy.checkpoints[0].variables["params"], "all")
    for ckpt, grads in zip(ckpts, history):
        got = np.concatenate([d.reshape(-1) for d in adam_diagonal(ckpt.opt_state, subset)])
        np.testing.assert_allclose(got, _manual_diagonal(grads, subset), rtol=1e-5)


@pytest.mark.parametrize("params, proj", [("head", None), ("all", None)])
def test_adam_tracin_equals_explicit_preconditioned_grads(toy, adam_toy, params, proj):
    ckpts, history = adam_toy
    subset = resolve_subset(toy.checkpoints[0].variables["params"], params)
    fn = make_class_grad_fn(toy.model, subset)
    scores, self_inf = class_tracin(fn, ckpts, toy.train.images, toy.train.labels,
                                    toy.test.images, toy.test.labels, batch_size=4,
                                    precondition=AdamPreconditioner())
    ref_scores, ref_self = _explicit(toy, subset, ckpts, history)
    scale = np.abs(ref_scores).max()
    np.testing.assert_allclose(scores, ref_scores, atol=2e-4 * scale, rtol=2e-3)
    np.testing.assert_allclose(self_inf, ref_self, rtol=2e-3)
    # Preconditioning changes the scores (the test would pass vacuously otherwise).
    plain, _ = class_tracin(fn, ckpts, toy.train.images, toy.train.labels, toy.test.images,
                            toy.test.labels, batch_size=4)
    assert np.abs(plain - scores).max() > 0.1 * scale


def test_preconditioning_happens_before_projection(toy, adam_toy):
    """all + CountSketch: each feature is sqrt(lr) P(sqrt(a) * g), P applied to explicit
    preconditioned jax.grad vectors."""
    ckpts, history = adam_toy
    subset = resolve_subset(toy.checkpoints[0].variables["params"], "all")
    projector = make_projector(subset, 64, seed=1, kind="countsketch")
    fn = make_class_grad_fn(toy.model, subset, projector=projector)
    scores, _ = class_tracin(fn, ckpts[:1], toy.train.images, toy.train.labels,
                             toy.test.images, toy.test.labels, batch_size=4,
                             precondition=AdamPreconditioner())
    ckpt, a = ckpts[0], np.sqrt(_manual_diagonal(history[0], subset))

    def feats(images, labels):
        g = brute_force_class_grads(toy.model, subset, ckpt.variables, images, labels) * a
        n = len(g)
        leaves, start = [], 0
        for shape in subset.shapes:
            size = int(np.prod(shape))
            leaves.append(jnp.asarray(g[..., start:start + size].reshape(n, 3, *shape),
                                      jnp.float32))
            start += size
        return np.asarray(projector(leaves), np.float64)

    ref = ckpt.lr * np.einsum("aid,bjd->aibj", feats(toy.test.images, toy.test.labels),
                              feats(toy.train.images, toy.train.labels))
    np.testing.assert_allclose(scores, ref, atol=2e-4 * np.abs(ref).max(), rtol=2e-3)


@pytest.mark.parametrize("params", ["head", "all"])
def test_identity_preconditioner_is_plain_tracin(toy, params, tmp_path):
    subset = resolve_subset(toy.checkpoints[0].variables["params"], params)
    fn = make_class_grad_fn(toy.model, subset)
    kw = {"chunk_size": 3, "batch_size": 2, "progress": False}
    plain = compute_influence(fn, toy.checkpoints, toy.train, toy.test, tmp_path / "plain",
                              store_dir=tmp_path / "s1", **kw)
    ident = compute_influence(fn, toy.checkpoints, toy.train, toy.test, tmp_path / "ident",
                              store_dir=tmp_path / "s2", precondition=IdentityPreconditioner(),
                              **kw)
    assert plain["precondition"] is None and ident["precondition"] == {"kind": "identity"}
    for name in ("scores.npy", "self_influence.npy", "patient_scores.npy"):
        np.testing.assert_allclose(np.load(tmp_path / "ident" / name),
                                   np.load(tmp_path / "plain" / name), rtol=1e-6, atol=1e-12)


def test_adam_store_is_its_own_and_split_train_stays_symmetric(toy, adam_toy, tmp_path):
    ckpts, history = adam_toy
    subset = resolve_subset(toy.checkpoints[0].variables["params"], "head")
    fn = make_class_grad_fn(toy.model, subset)
    kw = {"chunk_size": 3, "batch_size": 2, "progress": False, "workdir": tmp_path}
    plain = compute_influence(fn, ckpts, toy.train, toy.test, tmp_path / "plain", **kw)
    adam = compute_influence(fn, ckpts, toy.train, toy.train, tmp_path / "adam", split="train",
                             precondition="adam", **kw)
    assert adam["store"] != plain["store"] and adam["precondition"]["kind"] == "adam"
    s = np.load(tmp_path / "adam" / "scores.npy")  # [n, C, n, C]
    np.testing.assert_allclose(s, s.transpose(2, 3, 0, 1), rtol=1e-5, atol=1e-9)
    n = len(toy.train.ids)
    diag = s[np.arange(n), :, np.arange(n), :]  # [n, C, C]
    _, ref_self = _explicit(SimpleNamespace(**{**vars(toy), "test": toy.train}), subset, ckpts,
                            history)
    np.testing.assert_allclose(np.einsum("bjj->bj", diag), ref_self, rtol=2e-3)
    np.testing.assert_allclose(np.load(tmp_path / "adam" / "self_influence.npy"), ref_self,
                               rtol=2e-3)


def test_cosine_composes_with_the_preconditioner(toy, adam_toy):
    ckpts, history = adam_toy
    subset = resolve_subset(toy.checkpoints[0].variables["params"], "head")
    fn = normalised(make_class_grad_fn(toy.model, subset))
    scores, self_inf = class_tracin(fn, ckpts, toy.train.images, toy.train.labels,
                                    toy.test.images, toy.test.labels,
                                    precondition=AdamPreconditioner())
    ref, ref_self = 0.0, 0.0
    for ckpt, grads in zip(ckpts, history):
        r = np.sqrt(_manual_diagonal(grads, subset))
        unit = lambda g: g / (np.linalg.norm(g, axis=-1, keepdims=True) + 1e-12)  # noqa: E731
        gtr = unit(r * brute_force_class_grads(toy.model, subset, ckpt.variables,
                                               toy.train.images, toy.train.labels))
        gte = unit(r * brute_force_class_grads(toy.model, subset, ckpt.variables,
                                               toy.test.images, toy.test.labels))
        ref = ref + ckpt.lr * np.einsum("aid,bjd->aibj", gte, gtr)
        ref_self = ref_self + ckpt.lr * np.einsum("bjd,bjd->bj", gtr, gtr)
    np.testing.assert_allclose(scores, ref, atol=1e-5 * np.abs(ref).max(), rtol=1e-4)
    np.testing.assert_allclose(self_inf, ref_self, rtol=1e-5, atol=1e-9)


def test_a_checkpoint_without_adam_state_is_one_line_error(toy):
    params = toy.checkpoints[0].variables["params"]
    sgd_state = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1).init(params)
    ckpt = SimpleNamespace(epoch=4, lr=0.1, variables=toy.checkpoints[0].variables,
                           opt_state=sgd_state)
    subset = resolve_subset(params, "head")
    fn = make_class_grad_fn(toy.model, subset)
    with pytest.raises(InputError) as e:
        class_tracin(fn, [ckpt], toy.train.images, toy.train.labels, toy.test.images,
                     toy.test.labels, precondition="adam")
    msg = str(e.value)
    assert "\n" not in msg and "epoch 4" in msg and "no Adam moments" in msg
    bare = SimpleNamespace(epoch=2, lr=0.1, variables=toy.checkpoints[0].variables)
    with pytest.raises(InputError, match="epoch 2 carries no optimiser state"):
        class_tracin(fn, [bare], toy.train.images, toy.train.labels, toy.test.images,
                     toy.test.labels, precondition="adam")
    with pytest.raises(InputError, match="'adamw' is not one of none, adam"):
        class_tracin(fn, [bare], toy.train.images, toy.train.labels, toy.test.images,
                     toy.test.labels, precondition="adamw")


def test_relatif_divides_by_the_root_of_the_training_self_influence(toy, tmp_path):
    subset = resolve_subset(toy.checkpoints[0].variables["params"], "head")
    fn = make_class_grad_fn(toy.model, subset)
    kw = {"chunk_size": 3, "batch_size": 2, "progress": False, "store_dir": tmp_path / "s"}
    compute_influence(fn, toy.checkpoints, toy.train, toy.test, tmp_path / "plain", **kw)
    meta = compute_influence(fn, toy.checkpoints, toy.train, toy.test, tmp_path / "rel",
                             relatif=True, **kw)
    assert meta["relatif"] is True
    plain = np.load(tmp_path / "plain" / "scores.npy")
    self_inf = np.load(tmp_path / "plain" / "self_influence.npy")
    got = np.load(tmp_path / "rel" / "scores.npy")
    # Explicit formula, written out: score[a, i, b, j] / sqrt(self[b, j]) (a class whose
    # gradient is zero, like NCR/NET absent from training slice 2, scores zero).
    assert (self_inf == 0).any() and (self_inf > 0).sum() > 10
    ref = np.zeros_like(plain)
    for b in range(plain.shape[2]):
        for j in range(plain.shape[3]):
            if self_inf[b, j] > 0:
                ref[:, :, b, j] = plain[:, :, b, j] / np.sqrt(self_inf[b, j])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7 * np.abs(ref).max())
    np.testing.assert_allclose(relatif_scores(plain, self_inf), ref, rtol=1e-6)
    # Patient sums are of the normalised slice scores; self-influence stays the raw one.
    pat = np.load(tmp_path / "rel" / "patient_scores.npy")
    patients = json.loads((tmp_path / "rel" / "meta.json").read_text())["patients"]
    cases = np.asarray(toy.train.cases)
    ref_pat = np.stack([ref[:, :, cases == p, :].sum(axis=2) for p in patients], axis=2)
    np.testing.assert_allclose(pat, ref_pat, rtol=1e-5, atol=1e-7 * np.abs(ref_pat).max())
    np.testing.assert_allclose(np.load(tmp_path / "rel" / "self_influence.npy"), self_inf,
                               rtol=1e-6)
    assert not np.allclose(got / np.abs(got).max(), plain / np.abs(plain).max(), atol=1e-2)


def test_cli_adam_on_a_trained_run_and_refusal_on_sgd(tiny_run, tmp_path):
    out = tmp_path / "adam"
    cmd = [sys.executable, "-m", "tracin_jax.cli", "influence", "--workdir", str(tiny_run),
           "--out", str(out), "--precondition", "adam", "--relatif"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["precondition"]["kind"] == "adam" and meta["relatif"] is True
    assert np.isfinite(np.load(out / "patient_scores.npy")).all()

    sgd = tmp_path / "sgd-run"
    shutil.copytree(tiny_run, sgd, ignore=shutil.ignore_patterns("features"))
    config = json.loads((sgd / "config.json").read_text())
    config["train"]["optimizer"] = "sgd"
    (sgd / "config.json").write_text(json.dumps(config))
    cmd[cmd.index(str(tiny_run))] = str(sgd)
    cmd[cmd.index(str(out))] = str(tmp_path / "never")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tracin-jax: error: --precondition adam:")
    assert "trained with sgd" in lines[0]
    assert not (tmp_path / "never").exists()
