import numpy as np
import pytest

from tracin_jax.explain import faithfulness as fa
from tracin_jax.explain.features import (FeatureStore, masked, max_similarity, pairwise_similarity,
                                         region_max)


def test_masking_zeroes_outside_region():
    f = np.arange(2 * 3 * 3 * 2, dtype=np.float32).reshape(2, 3, 3, 2) + 1
    m = np.zeros((2, 3, 3), bool)
    m[0, 1, 1] = True
    out = masked(f, m)
    assert out[0, 1, 1].tolist() == f[0, 1, 1].tolist()
    assert out.sum() == f[0, 1, 1].sum()
    mx = region_max(f, m)
    np.testing.assert_array_equal(mx[0], f[0, 1, 1])
    assert np.isnan(mx[1]).all()  # empty region: undefined


def test_cosine_similarity_cases():
    rng = np.random.default_rng(0)
    f = np.abs(rng.normal(size=(1, 6, 6, 3))).astype(np.float32)
    m = np.zeros((1, 6, 6), bool)
    m[0, :3] = True
    s = pairwise_similarity(f, m, 2.5 * f, m, "cosine")  # scale-invariant
    np.testing.assert_allclose(s, 1.0, atol=1e-6)
    m2 = np.zeros((1, 6, 6), bool)
    m2[0, 4:] = True  # disjoint regions: orthogonal masked maps
    np.testing.assert_allclose(pairwise_similarity(f, m, f, m2, "cosine"), 0.0, atol=1e-7)
    g = f.copy()
    g[..., 1] = 0  # filter 1 silent in the second region: undefined
    s = pairwise_similarity(f, m, g, m, "cosine")
    assert np.isnan(s[0, 0, 1]) and np.isfinite(s[0, 0, [0, 2]]).all()


def test_max_similarities():
    a, b = np.array([2.0, 0.0, 1.0]), np.array([1.0, 0.0, 1.0])
    np.testing.assert_allclose(max_similarity(a, b, "max_ratio"), [0.5, np.nan, 1.0])
    np.testing.assert_allclose(max_similarity(a, b, "max_product"), [0.8, np.nan, 1.0])
    with pytest.raises(ValueError):
        max_similarity(a, b, "nope")


def test_streamed_region_stats_match_reference():
    """The blocked pass (features from a store) equals the direct pairwise computation."""
    rng = np.random.default_rng(1)
    te_x = np.abs(rng.normal(size=(3, 8, 8, 4))).astype(np.float32)
    tr_x = np.abs(rng.normal(size=(5, 8, 8, 4))).astype(np.float32)
    te_y = rng.integers(0, 4, (3, 8, 8)).astype(np.uint8)
    tr_y = rng.integers(0, 4, (5, 8, 8)).astype(np.uint8)
    tr_y[2][tr_y[2] == 3] = 0  # an empty ET region
    store = FeatureStore(lambda v, x: (x, x * v), 1.0, batch_size=2, progress=False)  # features = images
    rs = fa.region_stats(store, te_x, te_y, tr_x, tr_y)
    for c in range(3):
        for kind in ("cosine", "max_ratio", "max_product"):
            ref = pairwise_similarity(te_x, te_y == c + 1, tr_x, tr_y == c + 1, kind)
            np.testing.assert_allclose(fa.similarity(rs, c, kind), ref, rtol=1e-5, atol=1e-6)
    assert np.isnan(fa.similarity(rs, 2, "cosine")[:, 2]).all()
    assert "train" in store._cache  # second pass reads the cache


def test_by_rank_gathers_representatives():
    sim = np.arange(2 * 4 * 1, dtype=np.float32).reshape(2, 4, 1)  # [n_test, n_train, F]
    order = np.array([[1, 0], [0, 1]])  # patients by rank
    reps = np.array([[3, 0], [2, -1]])  # slice of each patient per test item
    out = fa.by_rank(sim, order, reps)
    assert out[0, :, 0].tolist() == [0.0, 3.0]
    assert out[1, 0, 0] == 6.0 and np.isnan(out[1, 1, 0])
