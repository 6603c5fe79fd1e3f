"""Random projections: unbiased inner products, the documented variance, error shrinking with d."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracin_jax.errors import InputError
from tracin_jax.influence import (DEFAULT_PROJ_DIM, class_tracin, make_class_grad_fn,
                                  make_projector, resolve_subset)
from tracin_jax.influence import projection
from tracin_jax.influence.projection import EXACT_MAX_PARAMS, Projector
from tracin_jax.influence.subsets import ParamSubset
from tracin_jax.influence.reference import toy_problem

SUBSET = ParamSubset("fake", ("a/kernel", "b/kernel"), ((40,), (7, 8)))  # D = 96


def _vectors():
    rng = np.random.default_rng(0)
    g = rng.normal(size=96).astype(np.float32)
    h = (0.6 * g + rng.normal(size=96)).astype(np.float32)  # correlated: cos ~ 0.5
    return g, h


def _leaves(v):
    """A flat vector f32[..., 96] -> the subset's leaves."""
    return [v[..., :40], v[..., 40:].reshape(*v.shape[:-1], 7, 8)]


def _estimates(kind, dim, n_seeds, seed=0):
    g, h = _vectors()
    proj = Projector(SUBSET, dim=dim, kind=kind)
    both = jnp.stack([g, h])

    @jax.jit
    def one(key):
        p = proj.project(_leaves(both), key)
        return p[0] @ p[1]

    keys = jax.random.split(jax.random.key(seed), n_seeds)
    return np.asarray(jax.lax.map(one, keys), np.float64), g.astype(np.float64), h.astype(np.float64)


def _predicted_var(kind, dim, g, h):
    var = g @ g * (h @ h) + (g @ h) ** 2
    if kind != "gaussian":
        var -= 2 * np.sum(g**2 * h**2)
    return var / dim


@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "countsketch"])
def test_projection_is_unbiased_with_the_documented_variance(kind, monkeypatch):
    # Small blocks so the scan runs over several blocks, the last one padded (96 = 9*10 + 6).
    monkeypatch.setattr(projection, "BLOCK_ELEMENTS", 16 * 10)
    est, g, h = _estimates(kind, dim=16, n_seeds=3000)
    want_var = _predicted_var(kind, 16, g, h)
    # Mean over seeds approaches the exact inner product (4 standard errors).
    assert abs(est.mean() - g @ h) < 4 * np.sqrt(want_var / len(est))
    # The variance is the documented one (sampling error of a variance at n=3000 is ~3-5%).
    assert est.var() == pytest.approx(want_var, rel=0.15)


def test_projection_error_shrinks_as_d_grows():
    errs = []
    for dim in (8, 32, 128):
        est, g, h = _estimates("rademacher", dim, n_seeds=400, seed=dim)
        rel = np.sqrt(np.mean((est - g @ h) ** 2)) / (np.linalg.norm(g) * np.linalg.norm(h))
        # ~ sqrt((1 + cos^2) / d), as the module docstring states.
        predicted = np.sqrt(_predicted_var("rademacher", dim, g, h)) / (
            np.linalg.norm(g) * np.linalg.norm(h))
        assert rel == pytest.approx(predicted, rel=0.2)
        errs.append(rel)
    assert errs[1] < 0.6 * errs[0] and errs[2] < 0.6 * errs[1]  # 1/sqrt(4) = 0.5 per step


def test_projection_is_deterministic_and_matches_a_dense_matrix():
    g, _ = _vectors()
    proj = jax.jit(lambda v: Projector(SUBSET, dim=24, seed=3, kind="rademacher")(_leaves(v)))
    # Same seed, same features; the batch axes do not matter.
    a = proj(jnp.asarray(g))
    b = proj(jnp.stack([g, g, g]).reshape(3, 1, 96))
    assert a.shape == (24,) and b.shape == (3, 1, 24)
    np.testing.assert_allclose(b[2, 0], a, rtol=1e-6)
    # It is linear: the matrix read off from the basis vectors reproduces it.
    basis = proj(jnp.eye(96))  # [96, 24]
    np.testing.assert_allclose(g @ np.asarray(basis), a, rtol=1e-5, atol=1e-5)
    assert set(np.unique(np.round(np.abs(np.asarray(basis)) * np.sqrt(24), 5))) == {1.0}
    other = Projector(SUBSET, dim=24, seed=4, kind="rademacher").project(_leaves(jnp.asarray(g)), jax.random.key(4))
    assert not np.allclose(other, a)


def test_default_dimension_choice():
    small = ParamSubset("s", ("head/kernel",), ((1, 1, 64, 4),))
    assert make_projector(small, None) is None  # 256 parameters: exact
    big = ParamSubset("b", ("x",), ((EXACT_MAX_PARAMS + 1,),))
    p = make_projector(big, None)
    assert p.dim == DEFAULT_PROJ_DIM and p.kind == "countsketch"  # O(D): see the module doc
    assert make_projector(big, 0) is None  # forced exact
    assert make_projector(small, 32, seed=5).describe() == {"dim": 32, "seed": 5, "kind": "countsketch"}
    for bad in (-3, 2.5):
        with pytest.raises(InputError, match="--proj-dim"):
            make_projector(small, bad)
    with pytest.raises(InputError, match="kind"):
        make_projector(small, 8, kind="fourier")


def test_projected_tracin_is_close_to_exact_on_a_unet():
    toy = toy_problem(n_train=4, n_test=2, size=8, n_checkpoints=2, seed=1, depth=1)
    subset = resolve_subset(toy.checkpoints[0].variables["params"], "all")
    dim = 1024
    args = (toy.checkpoints, toy.train.images, toy.train.labels, toy.test.images, toy.test.labels)
    exact_fn = make_class_grad_fn(toy.model, subset)
    exact, self_exact = class_tracin(exact_fn, *args, batch_size=2)
    fn = make_class_grad_fn(toy.model, subset, projector=make_projector(subset, dim, seed=7))
    assert fn.dim == dim
    approx, _ = class_tracin(fn, *args, batch_size=2)
    # Per entry, the standard deviation is at most sqrt(2 |g|^2 |g'|^2 / d); with T checkpoints
    # summed, bound by the summed norms (self-influence of train, test-vs-test diagonal).
    _, self_test = class_tracin(exact_fn, toy.checkpoints,
                                toy.test.images, toy.test.labels, toy.test.images,
                                toy.test.labels, batch_size=2)
    bound = np.sqrt(2 * self_test[:, :, None, None] * self_exact[None, None] / dim)
    assert np.all(np.abs(approx - exact) <= 5 * bound + 1e-12)
    assert np.abs(approx - exact).max() > 0  # really projected
