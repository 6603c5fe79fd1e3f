"""SOURCE (``--method source``): the scores against the unrolled formula built from dense
per-segment matrices of the same EK-FAC factors (scipy's expm, numpy solves, one jax.grad per
example and class), its limits (one long segment: EK-FAC's influence function; short steps:
TracIn), the segments' steps and learning rates, and its one-line refusals."""

from __future__ import annotations

import inspect
import json
from functools import partial
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

from tracin_jax.cli import main
from tracin_jax.errors import InputError
from tracin_jax.influence import ekfac as E
from tracin_jax.influence.methods import Common, from_spec, get_method, make_options
from tracin_jax.influence.methods.source import Source, SourceOptions, phi1, segments
from tracin_jax.influence.precondition import AdamPreconditioner
from tracin_jax.influence.reference import brute_force_class_grads
from tracin_jax.training.losses import tumour_dice_loss

EPS = inspect.signature(tumour_dice_loss).parameters["eps"].default
TWO_LAYERS = "dec0/conv1/kernel|head/.*"  # a 3x3 conv without bias and the 1x1 head with one
STEPS = (400, 2000)  # eta K lambda from ~1e-2 to ~30: neither limit
DAMPING = 0.5


def _stepped(checkpoints, steps, **extra):
    return [SimpleNamespace(**{**vars(c), "step": s, **extra}) for c, s in zip(checkpoints, steps)]


def _adam(checkpoints):
    """Each checkpoint with an Adam state after 3 updates with random gradients."""
    rng = np.random.default_rng(0)
    out = []
    for c in checkpoints:
        params = c.variables["params"]
        tx = optax.inject_hyperparams(optax.adam)(learning_rate=c.lr, b1=0.9, b2=0.99)
        state, update = jax.jit(tx.init)(params), jax.jit(tx.update)
        for _ in range(3):
            g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
            _, state = update(g, state, params)
        out.append(SimpleNamespace(**vars(c), opt_state=state))
    return out


@pytest.fixture(scope="module")
def toy_run(toy):
    return SimpleNamespace(model=toy.model, image_shape=toy.train.images.shape[1:],
                           config=SimpleNamespace(train=SimpleNamespace(dice_eps=EPS)),
                           train=toy.train, test=toy.test)


def _run_source(toy_run, checkpoints, out, **options):
    method = Source(SourceOptions(**options))
    meta = method.compute(toy_run, checkpoints, out, Common(
        store_dir=out.parent / (out.name + "-store"), batch_size=4, progress=False))
    return method, meta, np.load(out / "scores.npy")


def _factors(folder, epoch) -> dict:
    (path,) = folder.glob(f"epoch{epoch}-*.npz")
    with np.load(path) as z:
        out: dict = {}
        for k in z.files:
            name, part = k.rsplit("::", 1)
            out.setdefault(name, {})[part] = np.asarray(z[k], np.float64)
    return out


def _layer_vecs(layers, subset, g) -> np.ndarray:
    """Class gradients f64[..., P] in subset order -> per-layer vec(M) (patch order) joined."""
    offsets = np.concatenate([[0], np.cumsum([int(np.prod(s)) for s in subset.shapes])])
    leaf = {p: g[..., offsets[i]:offsets[i + 1]].reshape(*g.shape[:-1], *subset.shapes[i])
            for i, p in enumerate(subset.paths)}
    return np.concatenate([np.asarray(E.kernel_matrix(
        l, leaf[f"{l.name}/kernel"], leaf[f"{l.name}/bias"] if l.has_bias else None),
        np.float64).reshape(*g.shape[:-1], -1) for l in layers], axis=-1)


def _dense_segment(layers, factors, pixels, damping, rate, diag=None):
    """(S, R) of one segment as dense f64 matrices over the layers' vec(M): H = F / pixels +
    damping * mean(Lambda / pixels) per layer, S = expm(-rate P H), R = (I - S) H^-1, with P
    the preconditioner's diagonal in the Kronecker eigenbasis (identity without ``diag``)."""
    blocks_h, blocks_p = [], []
    for l in layers:
        f = factors[l.name]
        q = np.kron(f["qa"], f["qs"])
        h = E.dense_ekfac_fisher(factors, l) / pixels
        blocks_h.append(h + damping * np.mean(f["lam"] / pixels) * np.eye(len(h)))
        if diag is not None:
            p = np.diag(diag[l.name].reshape(-1))
            blocks_p.append(q @ np.diag(np.diag(q.T @ p @ q)) @ q.T)
    h = scipy.linalg.block_diag(*blocks_h)
    p = scipy.linalg.block_diag(*blocks_p) if diag is not None else np.eye(len(h))
    s = scipy.linalg.expm(-rate * p @ h)
    return s, (np.eye(len(h)) - s) @ np.linalg.inv(h)


def _dense_scores(model, subset, layers, checkpoints, folder, test, train, pixels, damping,
                  diags=None):
    """sum_l g(z'; theta_L)^T S_L ... S_{l+1} R_l g(z; theta_l), a loop over every pair."""
    loss = partial(tumour_dice_loss, eps=EPS)
    grads = [_layer_vecs(layers, subset, brute_force_class_grads(
        model, subset, c.variables, train.images, train.labels, loss)) for c in checkpoints]
    query = _layer_vecs(layers, subset, brute_force_class_grads(
        model, subset, checkpoints[-1].variables, test.images, test.labels, loss))
    steps = np.diff([0, *[c.step for c in checkpoints]])  # K of each segment
    mats = [_dense_segment(layers, _factors(folder, c.epoch), pixels, damping, c.lr * k,
                           None if diags is None else diags[t])
            for t, (c, k) in enumerate(zip(checkpoints, steps))]
    n_test, n_cls, n_train = query.shape[0], query.shape[1], grads[0].shape[0]
    out = np.zeros((n_test, n_cls, n_train, n_cls))
    for t in range(len(checkpoints)):
        carry = np.eye(query.shape[-1])
        for s, _ in mats[:t:-1]:  # S_L ... S_{t+1}
            carry = carry @ s
        m = carry @ mats[t][1]
        for a in range(n_test):
            for i in range(n_cls):
                for b in range(n_train):
                    for j in range(n_cls):
                        out[a, i, b, j] += query[a, i] @ m @ grads[t][b, j]
    return out, mats, query, grads


@pytest.fixture(scope="module")
def plain(toy, toy_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("source") / "plain"
    cks = _stepped(toy.checkpoints, STEPS)
    method, meta, got = _run_source(toy_run, cks, out, params=TWO_LAYERS, damping=DAMPING)
    want, mats, query, grads = _dense_scores(
        toy.model, method.setup.subset, method.setup.layers, cks, out / "ekfac_factors",
        toy.test, toy.train, int(np.prod(toy_run.image_shape[:-1])), DAMPING)
    return SimpleNamespace(method=method, meta=meta, got=got, want=want, mats=mats, out=out,
                           checkpoints=cks, query=query, grads=grads)


def test_scores_equal_the_dense_unrolled_formula(plain):
    got, want = plain.got, plain.want
    assert got.shape == (3, 3, 7, 3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # not a trivial case: the later segment's transport damps some directions a lot, and it
    # matters (the scores without it are far off)
    decays = np.linalg.eigvalsh(plain.mats[1][0])
    assert decays.min() < 0.05 and decays.max() > 0.9
    untransported = sum(np.einsum("aip,pq,bjq->aibj", plain.query, r, g)
                        for (_, r), g in zip(plain.mats, plain.grads))
    assert np.abs(untransported - want).max() > 0.05 * np.abs(want).max()
    seg = plain.meta["source"]["segments"]
    assert [(s["steps"], s["mean_lr"]) for s in seg] == [
        (400, plain.checkpoints[0].lr), (1600, plain.checkpoints[1].lr)]
    assert seg[1]["x"]["max"] > 10 and seg[0]["x"]["min"] < 0.1
    assert plain.meta["checkpoints"] == [{"epoch": c.epoch, "lr": c.lr} for c in plain.checkpoints]
    # one program for the training side, one for the queries (their transports), no more
    assert plain.method.setup.grad_fn.fn._cache_size() <= 2


def test_classwise_scores_sum_to_the_total_loss_version(toy, plain):
    """sum over (i, j) of the class-wise scores = SOURCE of the summed class loss, its gradient
    taken by one jax.grad of the sum."""
    subset, layers = plain.method.setup.subset, plain.method.setup.layers

    @jax.jit
    def total_grad(variables, x, y):
        def f(leaves):
            v = dict(variables, params=subset.insert(variables["params"], leaves))
            return jnp.sum(tumour_dice_loss(toy.model.apply(v, x[None], train=False), y[None],
                                            eps=EPS))
        return jnp.concatenate([a.ravel() for a in jax.grad(f)(subset.select(variables["params"]))])

    def totals(variables, ex):
        return _layer_vecs(layers, subset, np.stack([
            np.asarray(total_grad(variables, x, y), np.float64)
            for x, y in zip(ex.images, ex.labels.astype(np.int32))]))

    cks, mats = plain.checkpoints, plain.mats
    q = totals(cks[-1].variables, toy.test)
    want = (q @ mats[1][1] @ totals(cks[1].variables, toy.train).T
            + q @ mats[1][0] @ mats[0][1] @ totals(cks[0].variables, toy.train).T)
    got = plain.got.sum(axis=(1, 3))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_adam_steps_through_the_preconditioner_hook(toy, toy_run, tmp_path):
    cks = _adam(_stepped(toy.checkpoints, STEPS))
    pre = AdamPreconditioner()  # reads each checkpoint's opt_state, as for Adam-aware TracIn
    method, meta, got = _run_source(toy_run, cks, tmp_path / "adam", params=TWO_LAYERS,
                                     damping=DAMPING, precondition=pre)
    subset, layers = method.setup.subset, method.setup.layers
    diags = []
    for c in cks:
        leaves = dict(zip(subset.paths, pre(c, subset)))
        diags.append({l.name: np.asarray(E.kernel_matrix(
            l, leaves[f"{l.name}/kernel"], leaves[f"{l.name}/bias"] if l.has_bias else None),
            np.float64) for l in layers})
    want, *_ = _dense_scores(toy.model, subset, layers, cks, tmp_path / "adam" / "ekfac_factors",
                             toy.test, toy.train, int(np.prod(toy_run.image_shape[:-1])),
                             DAMPING, diags)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert meta["spec"]["precondition"] == "adam"
    assert meta["source"]["precondition"]["kind"] == "adam"


def test_one_segment_limits(toy, toy_run, tmp_path):
    """One segment (the last checkpoint): many steps give the influence function at the same
    damping (EK-FAC's score of that checkpoint / lr, times the pixels: SOURCE's Hessian is per
    pixel); K steps with eta K lambda << 1 give K times its TracIn score."""
    last = toy.checkpoints[-1:]
    pixels = int(np.prod(toy_run.image_shape[:-1]))
    common = dict(store_dir=None, batch_size=4, progress=False)

    def scores(name, ck, out, **options):
        cls = get_method(name)
        cls(make_options(cls, {"params": "head", **options})).compute(
            toy_run, ck, tmp_path / out, Common(**{**common, "store_dir": tmp_path / (out + "s")}))
        return np.load(tmp_path / out / "scores.npy").astype(np.float64)

    ekfac = scores("ekfac", last, "ekfac", damping=DAMPING)
    long = scores("source", _stepped(last, (10**9,)), "long", damping=DAMPING)
    want = ekfac * pixels / last[0].lr
    np.testing.assert_allclose(long, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    slow = _stepped(last, (50,), lr=2e-9)
    tracin = 50 * scores("tracin", slow, "tracin")
    short = scores("source", slow, "short")
    seg = json.loads((tmp_path / "short" / "meta.json").read_text())["source"]["segments"][0]
    assert seg["steps"] == 50 and seg["x"]["max"] < 1e-5
    np.testing.assert_allclose(short, tracin, rtol=1e-4, atol=1e-5 * np.abs(tracin).max())


def test_segments_steps_and_mean_learning_rates():
    rec = [SimpleNamespace(epoch=e, step=10 * e, lr=0.1 * e) for e in (1, 2, 3, 4)]
    segs = segments([rec[1], rec[3]], rec)
    assert [(s.first_step, s.last_step, s.steps) for s in segs] == [(0, 20, 20), (20, 40, 20)]
    assert segs[0].lr == pytest.approx(0.15) and segs[1].lr == pytest.approx(0.35)
    # a missing record: its steps count at the next recorded epoch's rate
    assert segments([rec[3]], [rec[0], rec[3]])[0].lr == pytest.approx((0.1 * 10 + 0.4 * 30) / 40)
    np.testing.assert_allclose(phi1(np.array([0.0, 1e-12, 1e-3, 1.0, 50.0])),
                               [1, 1, (1 - np.exp(-1e-3)) / 1e-3, 1 - np.exp(-1.0), 1 / 50],
                               rtol=1e-12)
    with pytest.raises(InputError, match="records no training step"):
        segments([SimpleNamespace(epoch=1, lr=0.1)])
    with pytest.raises(InputError, match=r"epoch 2 is at step 10, not after epoch 1 \(step 10\)"):
        segments([SimpleNamespace(epoch=1, step=10, lr=0.1), SimpleNamespace(epoch=2, step=10,
                                                                             lr=0.1)])


def test_spec_round_trip_and_randomisation(toy, toy_run, plain, tmp_path):
    spec = plain.meta["spec"]
    assert spec["method"] == "source" and spec["checkpoints"] == [1, 3]
    assert spec["options"] == {"damping": DAMPING, "fisher_seed": 0}
    again = from_spec(json.loads(json.dumps(spec)))
    assert isinstance(again, Source) and again.options.damping == DAMPING
    assert again.spec(again.featuriser(toy_run), [1, 3]) == spec
    run = SimpleNamespace(**vars(toy_run), checkpoint=lambda e: next(
        c for c in plain.checkpoints if c.epoch == e))
    again.randomised(run, plain.meta, tmp_path / "rnd")
    rnd = np.load(tmp_path / "rnd" / "patient_scores.npy")
    assert rnd.shape == np.load(plain.out / "patient_scores.npy").shape
    assert np.all(np.isfinite(rnd))
    assert not np.allclose(rnd, np.load(plain.out / "patient_scores.npy"))


def test_bad_input_is_one_line(toy, toy_run, tmp_path, capsys):
    for options, words in (({"damping": -1.0}, "--damping -1.0 must be a number >= 0"),
                           ({"precondition": "lbfgs"}, "--precondition 'lbfgs' is not one of"),
                           ({"loss": "l1"}, "--loss 'l1'")):
        with pytest.raises(InputError, match=words):
            Source(SourceOptions(**options))
    method = Source(SourceOptions(params="head"))
    with pytest.raises(InputError, match="--split 'train': --method source scores the test"):
        method.compute(toy_run, _stepped(toy.checkpoints, (4, 8)), tmp_path / "o",
                       Common(split="train", store_dir=tmp_path / "s", progress=False))
    base = ["influence", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "o2"),
            "--method", "source"]
    for extra, words in ((["--normalised"], "--normalised is an option of --method tracin"),
                         (["--damping", "-1"], "--damping -1.0 must be a number >= 0")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()
