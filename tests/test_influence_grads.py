"""Class gradients and in-memory class-wise TracIn against explicit loops on a tiny UNet."""

from functools import partial
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracin_jax.errors import InputError
from tracin_jax.influence import (class_tracin, is_head_subset, make_class_grad_fn,
                                  make_projector, normalised, resolve_subset)
from tracin_jax.influence import sharding
from tracin_jax.influence.grads import default_examples_mode
from tracin_jax.influence.reference import (brute_force_class_grads, brute_force_tracin,
                                            single_class_grad_fn, total_loss_tracin)
from tracin_jax.influence.store import compute_features
from tracin_jax.training.losses import classwise_cross_entropy, tumour_dice_loss


@pytest.fixture(scope="module")
def fns(toy):
    """Gradient functions on the session's toy problem by (subset, method, examples mode),
    built once so each compiles once."""
    cache = {}

    def get(spec, method="auto", examples="auto"):
        # "auto" is "unroll" on CPU: one function (and one compiled program) for both names.
        examples = default_examples_mode() if examples == "auto" else examples
        if (spec, method, examples) not in cache:
            subset = resolve_subset(toy.checkpoints[0].variables["params"], spec)
            cache[spec, method, examples] = make_class_grad_fn(toy.model, subset, method=method,
                                                               examples=examples)
        return cache[spec, method, examples]

    return get


def feats(fn, variables, images, labels):
    """f32[n, C, D]: ``fn(variables, images, labels)`` in one batch, with the arguments placed
    as class_tracin places them (on the device mesh, int32 labels), so a test's direct call and
    its class_tracin share one compiled program instead of compiling two."""
    mesh = sharding.train_mesh()
    return compute_features(fn, sharding.replicate(variables, mesh), 1.0, images, labels,
                            len(images), mesh)


def _close(got, want, rel=1e-5):
    """Agreement to `rel` of the largest entry (f32 sums of thousands of terms cancel)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=rel, atol=rel * np.abs(want).max())


def test_subsets_resolve_by_name_and_regex(toy):
    params = toy.checkpoints[0].variables["params"]
    head = resolve_subset(params, "head")
    assert head.paths == ("head/kernel",) and head.size == 4 * 4  # width x classes, no bias
    dec = resolve_subset(params, "decoder")
    assert {"head/bias", "head/kernel", "up0/kernel", "dec0/conv0/kernel"} <= set(dec.paths)
    assert not any(p.startswith(("enc", "bridge")) for p in dec.paths)
    everything = resolve_subset(params, "all")
    assert everything.size == sum(x.size for x in jax.tree_util.tree_leaves(params))
    rx = resolve_subset(params, "dec0/.*|head/kernel")
    assert all(p.startswith("dec0/") or p == "head/kernel" for p in rx.paths)
    assert is_head_subset(toy.model, head) and not is_head_subset(toy.model, rx)
    # The paper's subset at width 64 is the 64 x 4 kernel.
    big = jax.eval_shape(lambda: {"head": {"kernel": jnp.zeros((1, 1, 64, 4)), "bias": jnp.zeros(4)}})
    assert resolve_subset(big, "head").size == 256


@pytest.mark.parametrize("spec", ["nonsense", "enc9/.*", "dec0/conv0/kern", "(["])
def test_unknown_subset_is_one_line_input_error(toy, spec):
    with pytest.raises(InputError) as e:
        resolve_subset(toy.checkpoints[0].variables["params"], spec)
    msg = str(e.value)
    assert "\n" not in msg and repr(spec) in msg and "head, decoder, all" in msg


def test_head_shortcut_equals_backward_pass(toy, fns):
    ckpt = toy.checkpoints[1]
    fast, slow = fns("head/.*"), fns("head/.*", "vjp")  # kernel and bias
    assert fast.tag != slow.tag and fast.subset.paths == ("head/bias", "head/kernel")
    _close(fast(ckpt.variables, toy.test.images[:2], toy.test.labels[:2]),
           slow(ckpt.variables, toy.test.images[:2], toy.test.labels[:2]))


def test_head_shortcut_has_no_backward_through_the_network(toy, fns):
    fn = fns("head")
    jaxpr = jax.make_jaxpr(fn.fn)(toy.checkpoints[0].variables, toy.test.images, toy.test.labels)
    text = str(jaxpr)
    # Forward convolutions of the encoder/decoder only: no transposed (backward) convolutions.
    assert "conv_general_dilated" in text
    n_conv = text.count("conv_general_dilated")
    slow = fns("head", "vjp")
    assert str(jax.make_jaxpr(slow.fn)(toy.checkpoints[0].variables, toy.test.images,
                                       toy.test.labels)).count("conv_general_dilated") > n_conv


@pytest.mark.parametrize("spec", ["head", "all", "decoder"])
def test_class_grads_and_tracin_match_brute_force(toy, fns, spec):
    """Against one jax.grad per example, class and checkpoint, and explicit dot products:
    the head shortcut, the whole network, and a part of it (``decoder``: selected leaves of
    several modules, put back among the frozen ones)."""
    fn = fns(spec)
    subset = fn.subset
    grad = single_class_grad_fn(toy.model, subset, tumour_dice_loss)
    ref = [(brute_force_class_grads(toy.model, subset, c.variables, toy.train.images,
                                    toy.train.labels, grad=grad),
            brute_force_class_grads(toy.model, subset, c.variables, toy.test.images,
                                    toy.test.labels, grad=grad)) for c in toy.checkpoints]
    got = feats(fn, toy.checkpoints[0].variables, toy.train.images[1:3], toy.train.labels[1:3])
    assert got.shape == (2, 3, subset.size)
    _close(got, ref[0][0][1:3])
    # Class 1 (NCR/NET) is absent from training slice 2: D = 1 exactly, zero gradient.
    assert float(jnp.abs(got[1, 0]).max()) == 0.0

    scores, self_inf = class_tracin(fn, toy.checkpoints, toy.train.images, toy.train.labels,
                                    toy.test.images, toy.test.labels, batch_size=2)
    want, want_self = brute_force_tracin(toy.model, subset, toy.checkpoints, toy.train.images,
                                         toy.train.labels, toy.test.images, toy.test.labels,
                                         grads=ref)
    assert scores.shape == (3, 3, 7, 3) and self_inf.shape == (7, 3)
    _close(scores, want)
    _close(self_inf, want_self)
    if spec == "all":
        # Summed over class pairs it is ordinary TracIn of the total loss sum_c D_c.
        total = total_loss_tracin(toy.model, subset, toy.checkpoints, toy.train.images,
                                  toy.train.labels, toy.test.images, toy.test.labels)
        _close(scores.sum(axis=(1, 3)), total)


def test_self_influence_is_train_vs_train_diagonal_and_linear_in_eta(toy, fns):
    fn = fns("decoder")
    tr = toy.train
    scores, self_inf = class_tracin(fn, toy.checkpoints, tr.images, tr.labels, tr.images, tr.labels,
                                    batch_size=2)
    diag = np.einsum("bjbj->bj", scores)
    _close(diag, self_inf)
    # Symmetric: the same sqrt(eta)-scaled features on both sides.
    _close(scores, scores.transpose(2, 3, 0, 1))
    # Linear in eta: per checkpoint, and scaling every eta by 3 scales the scores by 3.
    parts = [class_tracin(fn, [c], tr.images, tr.labels, tr.images, tr.labels, batch_size=2)[0]
             for c in toy.checkpoints]
    _close(sum(parts), scores)
    tripled = [SimpleNamespace(epoch=c.epoch, lr=3.0 * c.lr, variables=c.variables)
               for c in toy.checkpoints]
    _close(class_tracin(fn, tripled, tr.images, tr.labels, tr.images, tr.labels, batch_size=2)[0],
           3 * scores)
    # One checkpoint with eta = 1 is the plain gradient dot product.
    one = SimpleNamespace(epoch=1, lr=1.0, variables=toy.checkpoints[0].variables)
    g = np.asarray(feats(fn, one.variables, tr.images[:2], tr.labels[:2]), np.float64)
    _close(class_tracin(fn, [one], tr.images[:2], tr.labels[:2], tr.images[:2], tr.labels[:2],
                        batch_size=2)[0], np.einsum("aif,bjf->aibj", g, g))


# A dense projection (rademacher, gaussian) is applied to the stacked leaves by the same code in
# both modes, so the exact case covers it; CountSketch is applied per example when unrolled.
@pytest.mark.parametrize("kind", [None, "countsketch"])
def test_unrolled_and_vmapped_examples_agree(toy, fns, kind):
    """The CPU default (one batch-1 program per example, unrolled; CountSketch applied per
    example) and the accelerator default (vmap over the batch) compute the same features."""
    ckpt = toy.checkpoints[1]
    subset = fns("all").subset
    proj = make_projector(subset, 64, 3, kind) if kind else None
    x, y = toy.train.images[:2], toy.train.labels[:2]  # 2 examples: the unrolled program is per example
    # The exact unrolled function is the shared ``fns("all")`` (compiled once for batch 2).
    exact = np.asarray(feats(fns("all", examples="unroll"), ckpt.variables, x, y))
    got = {mode: np.asarray(feats(make_class_grad_fn(toy.model, subset, projector=proj,
                                                     examples=mode), ckpt.variables, x, y))
           for mode in (("unroll", "vmap") if kind else ("vmap",))}
    got.setdefault("unroll", exact)
    assert got["unroll"].shape == (2, 3, 64 if kind else subset.size)
    _close(got["unroll"], got["vmap"])
    if proj is not None:  # the per-example sketch is the projector applied to exact gradients
        split_and_project = jax.jit(lambda g: proj(_split_leaves(g, subset)))  # not op by op
        _close(got["unroll"], split_and_project(exact))
    assert default_examples_mode() == ("unroll" if jax.default_backend() == "cpu" else "vmap")
    with pytest.raises(ValueError, match="examples mode"):
        make_class_grad_fn(toy.model, subset, examples="loop")


def _split_leaves(flat, subset):
    """f32[B, C, D] (subset order) -> leaves [B, C, *shape]."""
    out, start = [], 0
    for shape in subset.shapes:
        n = int(np.prod(shape))
        out.append(jnp.asarray(flat)[..., start:start + n].reshape(*flat.shape[:2], *shape))
        start += n
    return out


def test_batch_size_does_not_change_results(toy, fns):
    """BatchNorm in inference mode: an example's gradient ignores its batch companions (each
    example alone, against pairs of examples and a zero-padded last batch)."""
    fn = fns("decoder")
    args = (toy.checkpoints, toy.train.images, toy.train.labels, toy.test.images, toy.test.labels)
    _close(class_tracin(fn, *args, batch_size=1)[0], class_tracin(fn, *args, batch_size=2)[0])


def test_loss_is_pluggable(toy, fns):
    """A region-restricted cross-entropy plugs in where the Dice loss was."""

    def ce(logits, labels):
        return classwise_cross_entropy(logits, labels)[:, 1:]

    ckpt = toy.checkpoints[0]
    subset = resolve_subset(ckpt.variables["params"], "decoder")
    fn = make_class_grad_fn(toy.model, subset, loss_fn=ce)
    want = brute_force_class_grads(toy.model, subset, ckpt.variables, toy.test.images[:2],
                                   toy.test.labels[:2], loss_fn=ce)
    _close(fn(ckpt.variables, toy.test.images[:2], toy.test.labels[:2]), want)
    # The default tag names the loss (eps included), so stores never mix losses.
    dice = fns("decoder")
    eps = make_class_grad_fn(toy.model, subset, loss_fn=partial(tumour_dice_loss, eps=1e-3))
    assert len({fn.tag, dice.tag, eps.tag}) == 3


def test_normalised_gradients_give_cosine_tracin(toy, fns):
    fn = fns("decoder")
    cos = normalised(fn)
    ckpt = toy.checkpoints[0]
    g = np.asarray(feats(fn, ckpt.variables, toy.test.images[:2], toy.test.labels[:2]),
                   np.float64)
    h = np.asarray(cos(ckpt.variables, toy.test.images[:2], toy.test.labels[:2]), np.float64)
    present = np.linalg.norm(g, axis=-1) > 0
    np.testing.assert_allclose(np.linalg.norm(h, axis=-1)[present], 1.0, rtol=1e-5)
    _close(h[present], g[present] / np.linalg.norm(g[present], axis=-1, keepdims=True))
    assert cos.tag.startswith("normalised(") and cos.subset == fn.subset
