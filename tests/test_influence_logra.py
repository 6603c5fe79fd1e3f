"""LoGra class gradients against explicit (P_in (x) P_out) projections of brute-force gradients."""

import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tracin_jax
from tracin_jax.errors import InputError
from tracin_jax.cli import main
from tracin_jax.influence import (class_tracin, make_class_grad_fn, make_projector, normalised,
                                  resolve_subset, sharding)
from tracin_jax.influence.logra import LograProjector, layer_ranks
from tracin_jax.influence.reference import (brute_force_class_grads, brute_force_tracin,
                                            dense_logra, single_class_grad_fn)
from tracin_jax.influence.store import compute_features
from tracin_jax.models import UNet
from tracin_jax.training.losses import tumour_dice_loss

RANK = 5  # fan-in 9*4 and 9*8 are projected; the head's 4 inputs and 4 outputs stay exact
BATCH = 3  # one batch size throughout (7 training examples: 3 + 3 + 1 padded; 3 test), so each
# gradient function compiles once


def feats(fn, variables, images, labels, batch_size=BATCH):
    """f32[n, C, D]: ``fn`` over the examples in batches, called as class_tracin calls it
    (arguments on the device mesh, int32 labels), so both share one compiled program."""
    mesh = sharding.train_mesh()
    return compute_features(fn, sharding.replicate(variables, mesh), 1.0, images, labels,
                            batch_size, mesh)


def _close(got, want, rel=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=rel, atol=rel * np.abs(want).max())


@pytest.fixture(scope="module")
def setup(toy):
    subset = resolve_subset(toy.checkpoints[0].variables["params"], "all")
    projector = make_projector(subset, RANK, seed=7, kind="logra")
    return subset, projector, make_class_grad_fn(toy.model, subset, projector=projector)


@pytest.fixture(scope="module")
def exact(toy, setup):
    """{(checkpoint index, "train" | "test"): f64[n, C, P]} brute-force class gradients (one
    jax.grad per example and class), computed once for the module."""
    subset = setup[0]
    grad = single_class_grad_fn(toy.model, subset, tumour_dice_loss)
    return {(t, name): brute_force_class_grads(toy.model, subset, ck.variables, ex.images,
                                               ex.labels, grad=grad)
            for t, ck in enumerate(toy.checkpoints)
            for name, ex in (("train", toy.train), ("test", toy.test))}


def test_projector_shapes_identity_sides_and_tag(toy, setup):
    subset, projector, fn = setup
    assert isinstance(projector, LograProjector) and projector.rank == RANK
    mats = projector.matrices()
    kernels = [p for p in subset.paths if p.endswith("kernel")]
    assert set(mats) == set(kernels)
    p_in, p_out = mats["head/kernel"]  # 4 x 4 head: both sides exact
    np.testing.assert_array_equal(p_in, np.eye(4)) and np.testing.assert_array_equal(p_out, np.eye(4))
    p_in, p_out = mats["enc0/conv0/kernel"]
    assert p_in.shape == (36, RANK) and p_out.shape == (4, 4)
    np.testing.assert_allclose(np.abs(p_in), 1 / np.sqrt(RANK))
    small = sum(int(np.prod(s)) for p, s in zip(subset.paths, subset.shapes) if p not in mats)
    blocks = sum(int(np.prod(layer_ranks(s, RANK))) for p, s in zip(subset.paths, subset.shapes)
                 if p in mats)
    assert fn.dim == projector.dim == small + blocks < subset.size
    assert fn.tag == f"tumour_dice_loss|logra|logra-r{RANK}s7"
    other = make_class_grad_fn(toy.model, subset, projector=make_projector(subset, RANK, 8, "logra"))
    assert other.tag != fn.tag and projector.describe()["rank"] == RANK


def test_features_equal_explicit_projection_of_brute_force_gradients(toy, setup, exact):
    subset, projector, fn = setup
    ck = toy.checkpoints[0]
    want = dense_logra(subset, projector, exact[0, "train"])
    _close(feats(fn, ck.variables, toy.train.images, toy.train.labels), want)
    # The same projection applied to explicit per-example VJP gradients (method="vjp"; one
    # example: its unrolled program grows with the batch).
    slow = make_class_grad_fn(toy.model, subset, projector=projector, method="vjp")
    _close(feats(slow, ck.variables, toy.train.images[:1], toy.train.labels[:1], 1), want[:1])


def test_tracin_scores_equal_explicit_and_class_sum_is_total_loss(toy, setup, exact):
    subset, projector, fn = setup
    args = (toy.checkpoints, toy.train.images, toy.train.labels, toy.test.images,
            toy.test.labels)
    scores, self_inf = class_tracin(fn, *args, batch_size=BATCH)
    grads = [tuple(dense_logra(subset, projector, exact[t, name])
                   for name in ("train", "test")) for t in range(len(toy.checkpoints))]
    want, want_self = brute_force_tracin(toy.model, subset, *args, grads=grads)
    _close(scores, want, 1e-4)
    _close(self_inf, want_self, 1e-4)

    def total(logits, labels):  # one "class": the summed loss
        return jnp.sum(tumour_dice_loss(logits, labels), axis=1, keepdims=True)

    total_fn = make_class_grad_fn(toy.model, subset, total, projector, tag="total",
                                  class_labels=(1,))
    ck = toy.checkpoints[1]
    per_class = feats(fn, ck.variables, toy.test.images, toy.test.labels)
    _close(feats(total_fn, ck.variables, toy.test.images, toy.test.labels)[:, 0],
           per_class.sum(1))
    total_scores, _ = class_tracin(total_fn, *args, batch_size=BATCH)
    _close(total_scores[:, 0, :, 0], scores.sum(axis=(1, 3)), 1e-4)


def test_group_norm_scale_and_unit_norm_wrapper(toy):
    images, labels = toy.train.images[:2], toy.train.labels[:2]  # 8 x 8, 4 channels
    model = UNet(width=4, depth=1, norm="group")
    # Random values on the initialiser's shapes (GroupNorm scales around 1): no initialiser
    # to compile.
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 4)))
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map_with_path(
        lambda path, s: (float(path[-1].key == "scale") + 0.3 * rng.normal(size=s.shape)
                         ).astype(np.float32), shapes)
    subset = resolve_subset(variables["params"], r"dec0/.*|head/kernel")
    assert any(p.endswith("norm0/scale") for p in subset.paths)
    projector = make_projector(subset, 3, seed=2, kind="logra")
    fn = make_class_grad_fn(model, subset, projector=projector)
    exact = brute_force_class_grads(model, subset, variables, images, labels)
    _close(fn(variables, images, labels), dense_logra(subset, projector, exact))
    unit = normalised(fn)(variables, images, labels)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=-1), 1.0, rtol=1e-5)


def test_compiles_once_per_shape(toy, setup):
    _, projector, _ = setup
    subset = resolve_subset(toy.checkpoints[0].variables["params"], "dec0/conv1/kernel")
    from tracin_jax.influence.logra import make_logra_grad_fn

    inner = chex.assert_max_traces(make_logra_grad_fn(
        toy.model, subset, tumour_dice_loss, make_projector(subset, 2, 0, "logra")), n=1)
    fn = jax.jit(inner)
    for ck in toy.checkpoints:
        fn(ck.variables, toy.train.images[:2], toy.train.labels[:2])


class _Scaled(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        w = self.param("w", nn.initializers.ones, (x.shape[-1],))
        return nn.Conv(4, (1, 1), name="head")(x * w)


def test_refused_inputs_are_input_errors(toy):
    subset = resolve_subset(toy.checkpoints[0].variables["params"], "all")
    for bad in (0, -3, 2.5):
        with pytest.raises(InputError, match="per-layer rank"):
            make_projector(subset, bad, 0, "logra")
    model = _Scaled()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 4)))
    sub = resolve_subset(variables["params"], "all")
    fn = make_class_grad_fn(model, sub, projector=make_projector(sub, 2, 0, "logra"), tag="x")
    with pytest.raises(InputError, match="parameter w belongs to a _Scaled module"):
        fn(variables, toy.train.images[:1], toy.train.labels[:1])


def test_command_line_logra_matches_python(tiny_run, tmp_path, capsys):
    """`--proj-kind logra --proj-dim R` writes the scores the Python API computes (on the
    decoder: LoGra of every layer is checked against brute force on the toy problem above)."""
    out = tmp_path / "logra"
    # --batch-size 8: the 16 training and 8 test slices run in batches of one shape (one
    # compiled program, which the Python side below reuses).
    argv = ["influence", "--workdir", str(tiny_run), "--checkpoints", "3", "--params", "decoder",
            "--batch-size", "8", "--proj-kind", "logra", "--proj-dim", "4", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    meta = json.loads((out / "meta.json").read_text())
    assert meta["projection"]["kind"] == "logra" and meta["projection"]["rank"] == 4
    assert meta["gradient"]["tag"].endswith("|logra|logra-r4s0")
    run = tracin_jax.load_run(tiny_run)
    fn = tracin_jax.influence.run_grad_fn(run, "decoder", proj_dim=4, proj_kind="logra")
    ck = run.checkpoint(3)
    scores, _ = class_tracin(fn, [ck], run.train.images, run.train.labels, run.test.images,
                             run.test.labels, batch_size=8)
    assert meta["gradient"]["feature_dim"] == fn.dim
    _close(np.load(out / "scores.npy"), scores, 1e-4)
    capsys.readouterr()
    assert main(argv[:-4] + ["--proj-dim", "0", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "per-layer rank" in err and len(err.strip().splitlines()) == 1
    assert err.startswith("tracin-jax: error: ") and not (tmp_path / "bad").exists()


def test_memory_check_counts_logra_features_not_weight_gradients(toy, setup, tmp_path):
    """A budget that fits LoGra's batch (B x C x D) is accepted; weight gradients are never
    formed, so the subset's size must not be charged for them."""
    from tracin_jax.influence import sharding
    from tracin_jax.influence.checks import gradient_workspace, memory_estimate
    from tracin_jax.influence.engine import compute_influence

    subset, projector, fn = setup
    workspace = gradient_workspace(fn, toy.checkpoints[0].variables, toy.train.images,
                                   toy.train.labels, BATCH, sharding.train_mesh())
    common = dict(n_test=3, n_train=7, num_classes=3, dim=fn.dim, n_checkpoints=2,
                  chunk_size=256, batch_size=BATCH, split="test")
    fits = memory_estimate(**common, grad_params=fn.dim)["total"]
    assert memory_estimate(**common, grad_params=subset.size)["total"] > 1.5 * fits
    fits += workspace  # XLA's workspace of the LoGra program (its output gradients included)
    meta = compute_influence(fn, toy.checkpoints, toy.train, toy.test, tmp_path / "out",
                             store_dir=tmp_path / "store", batch_size=BATCH, progress=False,
                             memory_budget_gb=1.2 * fits / 2**30)
    assert meta["projection"]["kind"] == "logra"
