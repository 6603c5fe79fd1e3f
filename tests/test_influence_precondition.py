"""Adam-aware TracIn (a per-checkpoint diagonal preconditioner in the store) and RelatIF-style
normalisation, against explicit jax.grad vectors and formulas on the toy problem."""

import json
import shutil
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tracin_jax.cli import main
from tracin_jax.errors import InputError
from tracin_jax.influence import (class_tracin, compute_influence, make_class_grad_fn,
                                  make_projector, normalised, resolve_subset)
from tracin_jax.influence.precondition import (AdamPreconditioner, IdentityPreconditioner,
                                               adam_diagonal, relatif_scores)
from tracin_jax.influence.reference import brute_force_class_grads, single_class_grad_fn
from tracin_jax.training.losses import tumour_dice_loss

B2, EPS = 0.99, 1e-3  # a large eps so it matters in the comparison
BATCH = 2  # one batch size throughout, so each gradient function compiles once


def _adam_checkpoints(toy, steps=(2, 3), b2=B2, eps=EPS):
    """The toy checkpoints, each with an Adam state (as training saves it: inject_hyperparams
    around optax.adam) after ``steps[t]`` updates with random gradients; plus the gradients."""
    out, history = [], []
    rng = np.random.default_rng(0)
    for ckpt, n in zip(toy.checkpoints, steps):
        params = ckpt.variables["params"]
        tx = optax.inject_hyperparams(optax.adam)(learning_rate=ckpt.lr, b1=0.9, b2=b2, eps=eps)
        state = jax.jit(tx.init)(params)  # jitted: one program each, not one per eager op
        update = jax.jit(tx.update)
        grads = []
        for _ in range(n):
            g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
            _, state = update(g, state, params)
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


@pytest.fixture(scope="module")
def fns(toy):
    """Class-gradient functions of the toy by (subset, projection kind), built once so each
    compiles once (per batch size, plain and scaled)."""
    cache = {}

    def get(spec, kind=None):
        if (spec, kind) not in cache:
            subset = resolve_subset(toy.checkpoints[0].variables["params"], spec)
            proj = make_projector(subset, 64, seed=1, kind=kind) if kind else None
            cache[spec, kind] = make_class_grad_fn(toy.model, subset, projector=proj)
        return cache[spec, kind]

    return get


@pytest.fixture(scope="module")
def brute(toy):
    """spec -> [(train f64[n_train, C, P], test f64[n_test, C, P]) per checkpoint]: one
    jax.grad per example, class and checkpoint, computed once per subset."""
    cache = {}

    def get(spec):
        if spec not in cache:
            subset = resolve_subset(toy.checkpoints[0].variables["params"], spec)
            grad = single_class_grad_fn(toy.model, subset, tumour_dice_loss)
            cache[spec] = [tuple(brute_force_class_grads(toy.model, subset, c.variables,
                                                         ex.images, ex.labels, grad=grad)
                                 for ex in (toy.train, toy.test)) for c in toy.checkpoints]
        return cache[spec]

    return get


def _explicit(subset, ckpts, history, grads):
    """(scores f64[n_test, C, n_train, C], self f64[n_train, C]): sum_t lr_t g_test^T
    (a_t * g_train) with a_t from the manual recursion; the test side is NOT preconditioned.
    ``grads``: (train, test) brute-force class gradients per checkpoint."""
    scores, self_inf = 0.0, 0.0
    for ckpt, steps, (gtr, gte) in zip(ckpts, history, grads):
        a = _manual_diagonal(steps, subset)
        scores = scores + ckpt.lr * np.einsum("aid,bjd->aibj", gte, gtr * a)
        self_inf = self_inf + ckpt.lr * np.einsum("bjd,bjd->bj", gtr, gtr * a)
    return scores, self_inf


def test_adam_diagonal_reads_the_bias_corrected_second_moment(toy, adam_toy):
    ckpts, history = adam_toy
    subset = resolve_subset(toy.checkpoints[0].variables["params"], "all")
    for ckpt, grads in zip(ckpts, history):
        got = np.concatenate([d.reshape(-1) for d in adam_diagonal(ckpt.opt_state, subset)])
        np.testing.assert_allclose(got, _manual_diagonal(grads, subset), rtol=1e-5)


@pytest.mark.parametrize("params", ["head", "all"])
def test_adam_tracin_equals_explicit_preconditioned_grads(toy, adam_toy, fns, brute, params):
    """The head shortcut and the per-example backward pass, each scaled by the diagonal."""
    ckpts, history = adam_toy
    fn = fns(params)
    subset = fn.subset
    scores, self_inf = class_tracin(fn, ckpts, toy.train.images, toy.train.labels,
                                    toy.test.images, toy.test.labels, batch_size=BATCH,
                                    precondition=AdamPreconditioner())
    ref_scores, ref_self = _explicit(subset, ckpts, history, brute(params))
    scale = np.abs(ref_scores).max()
    np.testing.assert_allclose(scores, ref_scores, atol=2e-4 * scale, rtol=2e-3)
    np.testing.assert_allclose(self_inf, ref_self, rtol=2e-3)
    # Preconditioning changes the scores (the test would pass vacuously otherwise).
    plain, _ = class_tracin(fn, ckpts, toy.train.images, toy.train.labels, toy.test.images,
                            toy.test.labels, batch_size=BATCH)
    assert np.abs(plain - scores).max() > 0.1 * scale


def test_preconditioning_happens_before_projection(toy, adam_toy, fns, brute):
    """all + CountSketch: each feature is sqrt(lr) P(sqrt(a) * g), P applied to explicit
    preconditioned jax.grad vectors."""
    ckpts, history = adam_toy
    fn = fns("all", "countsketch")
    subset, projector = fn.subset, fn.projector
    scores, _ = class_tracin(fn, ckpts[:1], toy.train.images, toy.train.labels,
                             toy.test.images, toy.test.labels, batch_size=BATCH,
                             precondition=AdamPreconditioner())
    ckpt, a = ckpts[0], np.sqrt(_manual_diagonal(history[0], subset))
    gtr, gte = brute("all")[0]
    g = np.concatenate([gtr, gte]) * a  # [n_train + n_test, C, P]: projected in one call
    leaves, start = [], 0
    for shape in subset.shapes:
        size = int(np.prod(shape))
        leaves.append(jnp.asarray(g[..., start:start + size].reshape(len(g), 3, *shape),
                                  jnp.float32))
        start += size
    projected = np.asarray(jax.jit(projector)(leaves), np.float64)  # one program, not per op
    ptr, pte = projected[:len(gtr)], projected[len(gtr):]
    ref = ckpt.lr * np.einsum("aid,bjd->aibj", pte, ptr)
    np.testing.assert_allclose(scores, ref, atol=2e-4 * np.abs(ref).max(), rtol=2e-3)


@pytest.mark.parametrize("params", ["head", "all"])
def test_identity_preconditioner_is_plain_tracin(toy, fns, params, tmp_path):
    fn = fns(params)
    kw = {"chunk_size": 4, "batch_size": BATCH, "progress": False}
    plain = compute_influence(fn, toy.checkpoints, toy.train, toy.test, tmp_path / "plain",
                              store_dir=tmp_path / "s1", **kw)
    ident = compute_influence(fn, toy.checkpoints, toy.train, toy.test, tmp_path / "ident",
                              store_dir=tmp_path / "s2", precondition=IdentityPreconditioner(),
                              **kw)
    assert plain["precondition"] is None and ident["precondition"] == {"kind": "identity"}
    for name in ("scores.npy", "self_influence.npy", "patient_scores.npy"):
        np.testing.assert_allclose(np.load(tmp_path / "ident" / name),
                                   np.load(tmp_path / "plain" / name), rtol=1e-6, atol=1e-12)


def test_adam_store_is_its_own_and_split_train_stays_symmetric(toy, adam_toy, fns, brute,
                                                                 tmp_path):
    ckpts, history = adam_toy
    fn = fns("head")
    subset = fn.subset
    kw = {"chunk_size": 4, "batch_size": BATCH, "progress": False, "workdir": tmp_path}
    plain = compute_influence(fn, ckpts, toy.train, toy.test, tmp_path / "plain", **kw)
    adam = compute_influence(fn, ckpts, toy.train, toy.train, tmp_path / "adam", split="train",
                             precondition="adam", **kw)
    assert adam["store"] != plain["store"] and adam["precondition"]["kind"] == "adam"
    s = np.load(tmp_path / "adam" / "scores.npy")  # [n, C, n, C]
    np.testing.assert_allclose(s, s.transpose(2, 3, 0, 1), rtol=1e-5, atol=1e-9)
    n = len(toy.train.ids)
    diag = s[np.arange(n), :, np.arange(n), :]  # [n, C, C]
    _, ref_self = _explicit(subset, ckpts, history, [(tr, tr) for tr, _ in brute("head")])
    np.testing.assert_allclose(np.einsum("bjj->bj", diag), ref_self, rtol=2e-3)
    np.testing.assert_allclose(np.load(tmp_path / "adam" / "self_influence.npy"), ref_self,
                               rtol=2e-3)


def test_cosine_composes_with_the_preconditioner(toy, adam_toy, fns, brute):
    ckpts, history = adam_toy
    fn = normalised(fns("head"))
    subset = fn.subset
    scores, self_inf = class_tracin(fn, ckpts, toy.train.images, toy.train.labels,
                                    toy.test.images, toy.test.labels, batch_size=BATCH,
                                    precondition=AdamPreconditioner())
    ref, ref_self = 0.0, 0.0
    for ckpt, grads, (btr, bte) in zip(ckpts, history, brute("head")):
        r = np.sqrt(_manual_diagonal(grads, subset))
        unit = lambda g: g / (np.linalg.norm(g, axis=-1, keepdims=True) + 1e-12)  # noqa: E731
        gtr, gte = unit(r * btr), unit(r * bte)
        ref = ref + ckpt.lr * np.einsum("aid,bjd->aibj", gte, gtr)
        ref_self = ref_self + ckpt.lr * np.einsum("bjd,bjd->bj", gtr, gtr)
    np.testing.assert_allclose(scores, ref, atol=1e-5 * np.abs(ref).max(), rtol=1e-4)
    np.testing.assert_allclose(self_inf, ref_self, rtol=1e-5, atol=1e-9)


def test_a_checkpoint_without_adam_state_is_one_line_error(toy, fns):
    params = toy.checkpoints[0].variables["params"]
    sgd_state = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1).init(params)
    ckpt = SimpleNamespace(epoch=4, lr=0.1, variables=toy.checkpoints[0].variables,
                           opt_state=sgd_state)
    fn = fns("head")
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


def test_relatif_divides_by_the_root_of_the_training_self_influence(toy, fns, tmp_path):
    fn = fns("head")
    kw = {"chunk_size": 4, "batch_size": BATCH, "progress": False, "store_dir": tmp_path / "s"}
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


def test_cli_adam_on_a_trained_run_and_refusal_on_sgd(tiny_run, tmp_path, capsys):
    out = tmp_path / "adam"
    argv = ["influence", "--workdir", str(tiny_run), "--out", str(out), "--precondition", "adam",
            "--relatif", "--batch-size", "8"]  # 16 training and 8 test slices: one batch shape
    assert main(argv) == 0, capsys.readouterr().err
    meta = json.loads((out / "meta.json").read_text())
    assert meta["precondition"]["kind"] == "adam" and meta["relatif"] is True
    assert np.isfinite(np.load(out / "patient_scores.npy")).all()

    sgd = tmp_path / "sgd-run"
    shutil.copytree(tiny_run, sgd, ignore=shutil.ignore_patterns("features"))
    config = json.loads((sgd / "config.json").read_text())
    config["train"]["optimizer"] = "sgd"
    (sgd / "config.json").write_text(json.dumps(config))
    argv[argv.index(str(tiny_run))] = str(sgd)
    argv[argv.index(str(out))] = str(tmp_path / "never")
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tracin-jax: error: --precondition adam:")
    assert "trained with sgd" in lines[0]
    assert not (tmp_path / "never").exists()
