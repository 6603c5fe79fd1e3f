"""Class-wise influence on a 3D model (``model.dims=3``): the head path on 3D features, exact
and CountSketch-projected ``all`` gradients, LoGra with 3D convolutions, EK-FAC's Kronecker
pieces and TRAK's region outputs on volumes, each against a brute-force ``jax.grad`` loop or the
dense definition, and the one-line errors."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracin_jax.errors import InputError
from tracin_jax.influence import (is_head_subset, make_class_grad_fn, make_projector,
                                  resolve_subset, sharding)
from tracin_jax.influence import ekfac as E
from tracin_jax.influence.logra import make_logra_grad_fn
from tracin_jax.influence.reference import (brute_force_class_grads, brute_force_tracin,
                                            dense_logra, single_class_grad_fn, toy_problem)
from tracin_jax.influence.scores import contract, squared_norms
from tracin_jax.influence.store import compute_features
from tracin_jax.influence.trak import out_to_loss, region_margin, region_margin_loss
from tracin_jax.training.losses import tumour_dice_loss

from conftest import check_conv_layer_pieces  # noqa: E402

# A 3D U-Net of width 2 and depth 1 on 8^3 volumes with 2 channels; 3 training and 2 test
# volumes, 2 checkpoints. Batches of 2 (training: 2 + 1 padded), so every function compiles once.
TOY3 = dict(n_train=3, n_test=2, size=8, n_checkpoints=2, seed=5, width=2, depth=1, dims=3,
            channels=2)
BATCH = 2


@pytest.fixture(scope="module")
def toy3():
    return toy_problem(**TOY3)


@pytest.fixture(scope="module")
def everything(toy3):
    """(subset 'all', {(checkpoint, 'train' | 'test'): f64[n, C, P]}): one jax.grad per volume,
    class and checkpoint, computed once for the module."""
    subset = resolve_subset(toy3.checkpoints[0].variables["params"], "all")
    grad = single_class_grad_fn(toy3.model, subset, tumour_dice_loss)
    ref = {(t, name): brute_force_class_grads(toy3.model, subset, ck.variables, ex.images,
                                              ex.labels, grad=grad)
           for t, ck in enumerate(toy3.checkpoints)
           for name, ex in (("train", toy3.train), ("test", toy3.test))}
    return subset, ref


def _leaves(subset, flat, paths=None):
    """f[..., P] flattened in ``subset`` order -> {path: f[..., *leaf shape]}."""
    out, start = {}, 0
    for p, shape in zip(subset.paths, subset.shapes):
        n = int(np.prod(shape))
        out[p] = flat[..., start:start + n].reshape(*flat.shape[:-1], *shape)
        start += n
    return out if paths is None else [out[p] for p in paths]


def _restrict(subset, ref, paths):
    """Brute-force gradients of 'all' restricted to ``paths`` (f64[n, C, P'])."""
    return {k: np.concatenate([l.reshape(*l.shape[:2], -1) for l in _leaves(subset, g, paths)],
                              axis=-1) for k, g in ref.items()}


def _close(got, want, rel=1e-5):
    """Agreement to ``rel`` of the largest entry."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=rel, atol=rel * np.abs(want).max())


def _tracin(fn, toy3):
    """Class-wise TracIn as the engine computes it (features scaled by sqrt(lr) per checkpoint,
    on the device mesh, then one contraction): (scores f32[n_test, C, n_train, C], self-influence
    f32[n_train, C]), and the features of checkpoint 0 (train, test)."""
    mesh = sharding.train_mesh()
    tr, te = [], []
    for ck in toy3.checkpoints:
        v = sharding.replicate(ck.variables, mesh)
        tr.append(compute_features(fn, v, ck.lr, toy3.train.images, toy3.train.labels, BATCH, mesh))
        te.append(compute_features(fn, v, ck.lr, toy3.test.images, toy3.test.labels, BATCH, mesh))
    lr0 = np.sqrt(toy3.checkpoints[0].lr)
    train, test = jnp.concatenate(tr, -1), jnp.concatenate(te, -1)
    return (np.asarray(contract(test, train)), np.asarray(squared_norms(train)),
            (np.asarray(tr[0]) / lr0, np.asarray(te[0]) / lr0))


def _check_tracin(fn, toy3, subset, grads):
    """Features and class-wise TracIn of ``fn`` against the brute-force gradients ``grads``."""
    scores, self_inf, (tr0, te0) = _tracin(fn, toy3)
    _close(tr0, grads[0, "train"])
    _close(te0, grads[0, "test"])
    want, want_self = brute_force_tracin(
        toy3.model, subset, toy3.checkpoints, toy3.train.images, toy3.train.labels,
        toy3.test.images, toy3.test.labels,
        grads=[(grads[t, "train"], grads[t, "test"]) for t in range(len(toy3.checkpoints))])
    assert scores.shape == (2, 3, 3, 3) and self_inf.shape == (3, 3)
    _close(scores, want)
    _close(self_inf, want_self)


def test_head_path_on_3d_features_matches_brute_force(toy3, everything):
    """The head kernel and bias from the 3D features and the logits' class gradients (one
    einsum over voxels, no backward pass), compiled once for both checkpoints and every batch."""
    full, ref = everything
    params = toy3.checkpoints[0].variables["params"]
    subset = resolve_subset(params, "head/.*")
    assert subset.shapes == ((3 + 1,), (1, 1, 1, 2, 4)) and is_head_subset(toy3.model, subset)

    def dice(logits, labels):
        return tumour_dice_loss(logits, labels)

    loss = chex.assert_max_traces(dice, n=1)  # one trace of fn for every batch and checkpoint
    fn = make_class_grad_fn(toy3.model, subset, loss, tag="head3d")
    _check_tracin(fn, toy3, subset, _restrict(full, ref, subset.paths))
    # No backward pass through the network: only the forward's convolutions.
    args = (toy3.checkpoints[0].variables, toy3.test.images, toy3.test.labels)
    fast, slow = (make_class_grad_fn(toy3.model, subset, method=m) for m in ("head", "vjp"))
    n_fast = str(jax.make_jaxpr(fast.fn)(*args)).count("conv_general_dilated")
    assert 0 < n_fast < str(jax.make_jaxpr(slow.fn)(*args)).count("conv_general_dilated")


def test_all_parameters_exact_match_brute_force(toy3, everything):
    subset, ref = everything
    assert make_projector(subset, None) is None  # 1,298 numbers: exact by default
    def dice(logits, labels):
        return tumour_dice_loss(logits, labels)

    loss = chex.assert_max_traces(dice, n=BATCH)  # unrolled over the batch: B calls per trace
    fn = make_class_grad_fn(toy3.model, subset, loss, tag="all3d")
    _check_tracin(fn, toy3, subset, ref)


def test_countsketch_features_are_the_sketch_of_the_exact_gradients(toy3, everything):
    subset, ref = everything
    projector = make_projector(subset, 64, seed=3)
    assert projector.kind == "countsketch"
    fn = make_class_grad_fn(toy3.model, subset, projector=projector)
    ck = toy3.checkpoints[1]
    got = fn(ck.variables, toy3.train.images[:BATCH], toy3.train.labels[:BATCH])
    exact = ref[1, "train"][:BATCH].astype(np.float32)
    want = projector(_leaves(subset, exact, subset.paths))
    assert got.shape == (BATCH, 3, 64)
    _close(got, want)


def test_logra_with_3d_convolutions_matches_its_dense_definition(toy3, everything):
    subset, ref = everything
    rank = 3
    projector = make_projector(subset, rank, seed=7, kind="logra")
    mats = projector.matrices()
    p_in, p_out = mats["enc0/conv0/kernel"]  # 3x3x3 conv of 2 channels: k = 54
    assert p_in.shape == (54, rank) and p_out.shape == (2, 2)
    assert mats["up0/kernel"][0].shape == (2 * 2 * 2 * 4, rank)  # 2x2x2 transposed conv
    fn = make_class_grad_fn(toy3.model, subset, projector=projector)
    assert fn.dim == projector.dim < subset.size
    grads = {k: dense_logra(subset, projector, g) for k, g in ref.items()}
    _check_tracin(fn, toy3, subset, grads)


def test_logra_compiles_once_over_checkpoints(toy3):
    subset = resolve_subset(toy3.checkpoints[0].variables["params"], "dec0/conv1/kernel")
    inner = chex.assert_max_traces(make_logra_grad_fn(
        toy3.model, subset, tumour_dice_loss, make_projector(subset, 2, 0, "logra")), n=1)
    fn = jax.jit(inner)
    for ck in toy3.checkpoints:
        assert fn(ck.variables, toy3.train.images[:2], toy3.train.labels[:2]).shape == (2, 3, 4)


def test_ekfac_pieces_rebuild_every_3d_conv_layer(toy3):
    """patches @ W + b is each layer's output and sum_p x_p delta_p^T its weight gradient, for
    the 3x3x3 convs, the 2x2x2 stride-2 transposed conv and the 1x1x1 head."""
    model, v = toy3.model, toy3.checkpoints[0].variables
    x, y = toy3.train.images[:2], toy3.train.labels[:2].astype(np.int32)
    subset, left = E.ekfac_subset(v["params"], "all")
    assert left and all("/norm" in p for p in left)
    layers = E.conv_layers(model, v, x.shape[1:], subset)
    assert {len(l.kernel_shape) for l in layers} == {5} and any(l.transpose for l in layers)
    loss = lambda logits: jnp.sum(tumour_dice_loss(logits, y), axis=-1)  # noqa: E731
    check_conv_layer_pieces(model, v, x, layers, loss)


def test_ekfac_whitened_head_gradients_are_the_damped_inverse_fisher(toy3, everything):
    """On the 1x1x1 head: the EK-FAC features' inner products are g'^T (F + lambda I)^-1 g with
    F the eigen-corrected Kronecker Fisher fitted on 3D volumes, formed densely."""
    full, ref = everything
    model, v = toy3.model, toy3.checkpoints[0].variables
    x, y = toy3.train.images, toy3.train.labels
    subset, _ = E.ekfac_subset(v["params"], "head/.*")
    (layer,) = E.conv_layers(model, v, x.shape[1:], subset)
    factors = E.fit_ekfac(model, v, x, y, [layer], loss_fn=tumour_dice_loss, fisher="sampled",
                          batch_size=BATCH)
    assert factors["head"]["lam"].shape == (2 + 1, 4)
    fn = E.make_ekfac_grad_fn(model, subset, [layer], tumour_dice_loss, damping=0.1,
                              proj_dim=0, tag="test")
    w = np.asarray(fn(E.with_factors(v, factors), x, y), np.float64)
    got = np.einsum("aid,bjd->aibj", w, w)
    leaves = _leaves(full, ref[0, "train"].astype(np.float32), subset.paths)
    g = np.asarray(E.kernel_matrix(layer, leaves[1], leaves[0]), np.float64)  # [n, C, in, out]
    f = E.dense_ekfac_fisher(factors, layer)
    lam = 0.1 * float(np.mean(factors["head"]["lam"]))
    flat = g.reshape(-1, g.shape[-2] * g.shape[-1])
    want = (flat @ np.linalg.solve(f + lam * np.eye(len(f)), flat.T)).reshape(got.shape)
    _close(got, want, 2e-3)


def test_trak_region_outputs_and_features_on_volumes(toy3, everything):
    """The TRAK output (summed region margin) and Q over the voxels of each region, by hand;
    its head features against brute-force gradients of the same output."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 4, 4, 4)).astype(np.float32)
    labels = rng.integers(0, 4, size=(2, 4, 4, 4)).astype(np.int32)
    labels[1][labels[1] == 3] = 0  # class 3 absent from volume 1
    m = np.asarray(jax.jit(region_margin)(logits, labels))
    q = np.asarray(jax.jit(out_to_loss)(logits, labels))
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    for b in range(2):
        for c, v in enumerate((1, 2, 3)):
            region = labels[b] == v
            others = np.log(np.exp(np.delete(z[b], v, axis=-1)).sum(-1))
            np.testing.assert_allclose(m[b, c], (z[b][..., v] - others)[region].sum(),
                                       rtol=1e-5, atol=1e-5)
            want_q = (1 - p[b][..., v])[region].mean() if region.any() else 0.0
            np.testing.assert_allclose(q[b, c], want_q, rtol=1e-5, atol=1e-6)
    assert m[1, 2] == 0 and q[1, 2] == 0

    from tracin_jax.influence.trak import trak_grad_fn

    ck = toy3.checkpoints[0]
    subset = resolve_subset(ck.variables["params"], "head")
    fn = trak_grad_fn(toy3.model, subset)
    want = brute_force_class_grads(toy3.model, subset, ck.variables, toy3.test.images,
                                   toy3.test.labels, region_margin_loss)
    _close(fn(ck.variables, toy3.test.images, toy3.test.labels), want)


def test_slices_given_to_a_3d_model_are_a_one_line_error(toy3):
    ck = toy3.checkpoints[0]
    fn = make_class_grad_fn(toy3.model, resolve_subset(ck.variables["params"], "head"))
    with pytest.raises(InputError) as e:
        fn(ck.variables, toy3.test.images[:, 0], toy3.test.labels[:, 0])
    msg = str(e.value)
    assert "\n" not in msg and "(2, 8, 8, 2)" in msg and "3D model" in msg
    with pytest.raises(InputError, match="labels of shape \\(2, 8, 8, 4\\) do not match"):
        fn(ck.variables, toy3.test.images, toy3.test.labels[..., :4])
