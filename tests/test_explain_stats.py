import numpy as np

from tracin_jax.explain import faithfulness as fa
from tracin_jax.explain import selection


def _u_shaped(m: int, r: int, noise: float, rng) -> np.ndarray:
    """f32[m, R]: similarity high at both ends of the ranking, low in the middle, plus noise."""
    x = np.linspace(-1, 1, r)
    return 0.3 + 0.3 * x**2 + noise * rng.normal(size=(m, r))


def test_spearman_perfect_and_unrelated():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=200)
    perfect = fa.spearman(x, np.exp(x))  # monotone
    assert perfect["rho"] == 1.0 and perfect["p_value"] < 1e-10 and perfect["n_pairs"] == 200
    unrelated = fa.spearman(x, rng.uniform(size=200))
    assert abs(unrelated["rho"]) < 0.2 and unrelated["p_value"] > 0.05
    with_nan = fa.spearman(np.r_[x, np.nan], np.r_[x, 1.0])
    assert with_nan["n_pairs"] == 200


def test_gap_permutation_test_related_vs_unrelated():
    rng = np.random.default_rng(0)
    related = fa.item_permutation_test(_u_shaped(30, 40, 0.05, rng), n_extremes=5,
                                       n_permutations=300, seed=0)
    assert related["gap"] > 0.2
    assert related["p_value"] <= 1 / 301 + 1e-12  # no shuffle reaches the observed gap
    assert related["proponents"] > related["middle"] < related["opponents"]
    unrelated = fa.item_permutation_test(rng.normal(size=(30, 40)), n_extremes=5,
                                         n_permutations=300, seed=0)
    assert unrelated["p_value"] > 0.05
    s = rng.normal(size=(10, 20))
    assert fa.item_permutation_test(s, 3, 100, seed=3) == fa.item_permutation_test(s, 3, 100, seed=3)


def test_windows_do_not_overlap():
    for r in (1, 3, 5, 6, 11, 207):
        top, bottom, middle, n = fa.windows(r, 10)
        if r >= 3:
            assert not (set(top) & set(middle)) and not (set(bottom) & set(middle))
    assert fa.windows(207, 10)[3] == 10 and fa.windows(6, 10)[3] == 1


def test_selection_rule_picks_the_u_shaped_filter():
    rng = np.random.default_rng(1)
    r, f = 50, 6
    fi = 0.4 + 0.02 * rng.normal(size=(r, f))
    fi[:, 2] = _u_shaped(1, r, 0.02, rng)[0]
    fi[:, 4] = np.nan  # silent filter: never selected
    out = selection.select_filters(fi, n_extremes=5, n_permutations=500, seed=0)
    assert out["selected"].tolist() == [False, False, True, False, False, False]
    assert out["z"][2] > 4 and np.isnan(out["z"][4])
    assert selection.least_important(out["z"], 2)[0] == 4  # undefined counts as least important


def test_mean_difference_test():
    v = np.array([5.0, 6.0, 5.5, 0.1, 0.0, 0.2, 0.1, 0.3])
    sel = np.array([1, 1, 1, 0, 0, 0, 0, 0], bool)
    out = selection.mean_difference_test(v, sel, 500, seed=0)
    assert out["difference"] > 5 and out["p_value"] < 0.05
    out = selection.mean_difference_test(v, ~sel, 500, seed=0)
    assert out["p_value"] > 0.5
    assert np.isnan(selection.mean_difference_test(v, np.zeros(8, bool))["difference"])


def test_random_sets_are_seeded_and_sized():
    a = selection.random_sets(64, 7, [0, 1])
    b = selection.random_sets(64, 7, [0, 1])
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    assert all(len(set(x)) == 7 for x in a) and a[0].tolist() != a[1].tolist()
