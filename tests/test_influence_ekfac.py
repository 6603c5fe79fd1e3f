"""EK-FAC influence: the Kronecker pieces against the model's own outputs and gradients, the
whitened scores against dense damped inverses, and the CLI end to end on the tiny run."""

from __future__ import annotations

import json
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tracin_jax.influence import ekfac as E
from tracin_jax.influence.grads import make_class_grad_fn
from tracin_jax.influence.subsets import ParamSubset
from tracin_jax.models.unet import UNet
from tracin_jax.training.losses import tumour_dice_loss
from tracin_jax.training.train import init_variables

from conftest import check_conv_layer_pieces  # noqa: E402

SHAPE = (8, 8, 4)


@pytest.fixture(scope="module")
def small():
    """A width-2, depth-2 U-Net at random weights, 3 random examples (batches of 2: one padded)."""
    model = UNet(width=2, depth=2)
    x = jax.random.normal(jax.random.key(1), (3, *SHAPE))
    y = jax.random.randint(jax.random.key(2), (3, *SHAPE[:2]), 0, 4)
    v = init_variables(model, jax.random.key(0), SHAPE)  # numpy draws: no init program to compile
    return model, v, np.asarray(x), np.asarray(y)


def test_patches_and_output_gradients_rebuild_every_conv_layer(small):
    """patches @ W + b is the layer's output and sum_p x_p delta_p^T its weight gradient, for
    the 3x3 convs, the stride-2 transposed convs and the 1x1 head."""
    model, v, x, y = small
    subset, left = E.ekfac_subset(v["params"], "all")
    assert left and all("/norm" in p for p in left)
    layers = E.conv_layers(model, v, SHAPE, subset)
    assert {l.transpose for l in layers} == {True, False} and layers[-1].name == "head"
    loss = lambda logits: jnp.sum(tumour_dice_loss(logits, y), axis=-1)  # noqa: E731
    check_conv_layer_pieces(model, v, x, layers, loss)


def _split(g, subset: ParamSubset) -> dict:
    """f32[..., P] flattened in subset order -> {path: f32[..., *leaf_shape]}."""
    out, start = {}, 0
    for p, shape in zip(subset.paths, subset.shapes):
        n = int(np.prod(shape))
        out[p] = jnp.asarray(g)[..., start:start + n].reshape(*np.shape(g)[:-1], *shape)
        start += n
    return out


def _dense_inverse_scores(layers, factors, damping, mats_a, mats_b):
    """sum over layers of vec(a)^T (F + lambda I)^-1 vec(b), F the dense EK-FAC Fisher."""
    total = 0.0
    for l, a, b in zip(layers, mats_a, mats_b):
        f = E.dense_ekfac_fisher(factors, l)
        lam = damping * float(np.mean(factors[l.name]["lam"]))
        total = total + np.asarray(a, np.float64).reshape(*a.shape[:-2], -1) @ np.linalg.solve(
            f + lam * np.eye(len(f)), np.asarray(b, np.float64).reshape(*b.shape[:-2], -1).T)
    return total


def test_whitened_class_gradients_equal_dense_damped_inverse_fisher(small):
    """The corrected eigenvalues are E_n[(Q_A^T G_n Q_S)^2] of the per-example gradients, the
    same however the examples are batched (a padded last batch included); the scores of the
    EK-FAC gradient function are g'^T (F + lambda I)^-1 g with F the eigen-corrected Kronecker
    Fisher formed densely, layer by layer; summed over both class axes they equal the influence
    of the total loss."""
    model, v, x, y = small
    subset, _ = E.ekfac_subset(v["params"], "up0/.*|head/.*")
    layers = E.conv_layers(model, v, SHAPE, subset)
    loss_fn = tumour_dice_loss
    fit = partial(E.fit_ekfac, model, v, x, y, layers, loss_fn=loss_fn, fisher="empirical")
    factors, unpadded = fit(batch_size=2), fit(batch_size=3)
    # The head's factors have distinct eigenvalues, so its EK-FAC Fisher is unique. (Those of a
    # stride-2 transposed conv do not: each input pixel feeds one output pixel per kernel tap,
    # so A holds four equal tap blocks, and the corrected eigenvalues depend on the basis
    # eigh picks inside each repeated eigenspace.)
    head = layers[-1]
    assert head.name == "head"
    want = E.dense_ekfac_fisher(unpadded, head)
    np.testing.assert_allclose(E.dense_ekfac_fisher(factors, head), want, rtol=1e-4,
                               atol=1e-6 * np.abs(want).max())

    def mats(g):
        leaves = _split(g, subset)
        return [np.asarray(E.kernel_matrix(l, leaves[f"{l.name}/kernel"],
                                           leaves[f"{l.name}/bias"]), np.float64)
                for l in layers]

    def total_loss(params, xi, yi):
        return jnp.sum(loss_fn(model.apply(dict(v, params=params), xi[None], train=False),
                               yi[None]))

    tot = []
    grad_total = jax.jit(jax.grad(total_loss))
    for b in range(len(x)):
        g = traverse_util.flatten_dict(grad_total(v["params"], x[b], y[b]), sep="/")
        tot.append(np.concatenate([np.ravel(g[p]) for p in subset.paths]))
    tm = mats(np.stack(tot))  # per-example gradients of the loss the empirical Fisher uses
    for l, m in zip(layers, tm):
        f = factors[l.name]
        want = np.mean(np.einsum("ia,nij,jb->nab", f["qa"], m, f["qs"]) ** 2, axis=0)
        np.testing.assert_allclose(f["lam"], want, rtol=1e-3, atol=1e-6 * want.max())

    damping = 0.1
    fn = E.make_ekfac_grad_fn(model, subset, layers, loss_fn, damping=damping, proj_dim=0,
                              tag="test")
    w = np.asarray(fn(E.with_factors(v, factors), x, y), np.float64)  # [B, C, D]
    got = np.einsum("aid,bjd->aibj", w, w)
    raw = np.asarray(make_class_grad_fn(model, subset, loss_fn, None, method="vjp")(v, x, y))
    ms = [m.reshape(-1, *m.shape[-2:]) for m in mats(raw)]
    want = _dense_inverse_scores(layers, factors, damping, ms, ms).reshape(got.shape)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-6 * np.abs(want).max())

    # Class-wise scores summed over both class axes = the total loss's influence.
    want_total = _dense_inverse_scores(layers, factors, damping, tm, tm)
    np.testing.assert_allclose(got.sum(axis=(1, 3)), want_total, rtol=2e-3,
                               atol=1e-6 * np.abs(want_total).max())


class _OneConv(nn.Module):
    """A 1x1 conv with bias, called like the U-Net (``train`` keyword)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Conv(4, (1, 1), name="head")(x)


def test_one_example_one_pixel_is_the_exact_damped_inverse_fisher():
    """One example with one pixel: the per-layer (empirical) Fisher vec(G) vec(G)^T is exactly
    Kronecker, so the EK-FAC Fisher equals it and its whitened scores equal the dense damped
    inverse of the true Fisher."""
    model = _OneConv()
    x = np.asarray(jax.random.normal(jax.random.key(4), (1, 1, 1, 3)))
    y = np.array([[[2]]], np.int32)
    v = init_variables(model, jax.random.key(5), x.shape[1:])
    subset, _ = E.ekfac_subset(v["params"], "head/.*")
    layers = E.conv_layers(model, v, (1, 1, 3), subset)
    (layer,) = layers
    assert layer.has_bias and layer.in_dim == 4

    def loss_fn(logits, labels):  # f32[B, 2]: two "classes" of a per-pixel loss
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
        return jnp.stack([nll.sum(axis=(1, 2)), (logits[..., 0] ** 2).sum(axis=(1, 2))], -1)

    factors = E.fit_ekfac(model, v, x, y, layers, loss_fn=loss_fn, fisher="empirical")
    g = jax.grad(lambda p: jnp.sum(loss_fn(model.apply({"params": p}, x), y)))(v["params"])
    gvec = np.asarray(E.kernel_matrix(layer, g["head"]["kernel"], g["head"]["bias"]),
                      np.float64).ravel()
    fisher = np.outer(gvec, gvec)
    np.testing.assert_allclose(E.dense_ekfac_fisher(factors, layer), fisher,
                               atol=1e-5 * np.abs(fisher).max())

    damping = 0.5
    lam = damping * float(np.mean(factors["head"]["lam"]))
    fn = E.make_ekfac_grad_fn(model, subset, layers, loss_fn, damping=damping, proj_dim=0,
                              tag="test")
    w = np.asarray(fn(E.with_factors(v, factors), x, y), np.float64)[0]  # [2, D]
    raw = make_class_grad_fn(model, subset, loss_fn, None, method="vjp")(v, x, y)[0]  # [2, P]
    leaves = _split(raw, subset)
    cls = np.asarray(E.kernel_matrix(layer, leaves["head/kernel"], leaves["head/bias"]),
                     np.float64).reshape(2, -1)
    want = cls @ np.linalg.solve(fisher + lam * np.eye(len(fisher)), cls.T)
    np.testing.assert_allclose(w @ w.T, want, rtol=1e-3)


def _cli(capsys, *args) -> tuple[int, str]:
    """(exit status, stderr) of the command line, run in this process."""
    from tracin_jax.cli import main

    try:
        rc = main(list(args))
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    return rc, capsys.readouterr().err


def test_cli_ekfac_end_to_end_resumes_and_refuses_bad_damping(tiny_run, tmp_path, capsys):
    out = tmp_path / "ekfac"
    rc, err = _cli(capsys, "influence", "--workdir", str(tiny_run), "--out", str(out),
                   "--method", "ekfac", "--damping", "-1")
    assert rc == 2 and err.strip().count("\n") == 0, err
    assert "--damping" in err and not out.exists()
    rc, err = _cli(capsys, "influence", "--workdir", str(tiny_run), "--out", str(out),
                   "--method", "ekfac", "--fisher", "exact")
    assert rc == 2 and "--fisher" in err and not out.exists()

    args = ("influence", "--workdir", str(tiny_run), "--out", str(out), "--method", "ekfac",
            "--params", "dec0/.*|head/.*", "--checkpoints", "2,3", "--batch-size", "4")
    rc, err = _cli(capsys, *args)
    assert rc == 0, err
    meta = json.loads((out / "meta.json").read_text())
    pat = np.load(out / "patient_scores.npy")
    assert pat.shape == (meta["n_test"], 3, len(meta["patients"]), 3)
    assert np.isfinite(pat).all() and np.abs(pat).max() > 0
    assert meta["ekfac"]["fisher"] == "sampled" and meta["ekfac"]["damping"] == 0.1
    # the decoder block's convs and the head; its normalisation parameters are left out
    assert "head" in meta["ekfac"]["layers"] and any(l.startswith("dec0/") for l in meta["ekfac"]["layers"])
    assert meta["ekfac"]["left_out"] and all(p.startswith("dec0/") for p in meta["ekfac"]["left_out"])
    assert [c["epoch"] for c in meta["checkpoints"]] == [2, 3]
    factors = sorted((out / "ekfac_factors").iterdir())
    assert len(factors) == 2
    stamps = [f.stat().st_mtime_ns for f in factors]

    # A rerun fits nothing and recomputes no features; the scores are the same.
    rc, err = _cli(capsys, *args)
    assert rc == 0, err
    meta2 = json.loads((out / "meta.json").read_text())
    assert [f.stat().st_mtime_ns for f in sorted((out / "ekfac_factors").iterdir())] == stamps
    assert meta2["timings"]["train_features"]["examples_computed"] == 0
    np.testing.assert_array_equal(np.load(out / "patient_scores.npy"), pat)

    # The evaluation names the method, matches no TracIn mislabel row, and its randomisation
    # check refits the factors at random weights.
    from tracin_jax import load_run
    from tracin_jax.evaluate import sanity

    spec = sanity.gradient_spec(meta)
    assert spec.method == "ekfac" and spec.describe().startswith("EK-FAC dice ")
    assert sanity.mislabel_match(meta["spec"], 3, [sanity.MislabelGradient(
        "Dice head", {**meta["spec"], "method": "tracin", "options": {}}, 6, 0.2)]) is None
    rnd = sanity.model_randomisation(load_run(tiny_run), out, tmp_path / "rnd")
    assert -1 <= rnd["mean"] <= 1
    assert len(list((tmp_path / "rnd").glob("*/ekfac_factors/*.npz"))) == 2
