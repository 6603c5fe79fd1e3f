"""Blocked contraction, streaming top-K, absent-class masking and patient aggregation."""

import numpy as np
import pytest

from tracin_jax.influence.scores import (aggregate_by_patient, contract, finalise_topk,
                                         init_topk, merge_topk, patient_index, score_blocks,
                                         topk_from_scores)
from tracin_jax.influence.sharding import train_mesh


def _numpy_topk(scores, k, present):
    """Reference ranking by sorting: (value desc, index asc) and (value asc, index asc)."""
    n_test, c, n, _ = scores.shape
    out = {name: np.zeros((n_test, c, c, k), dt) for name, dt in
           (("pi", np.int64), ("pv", np.float32), ("oi", np.int64), ("ov", np.float32))}
    for a in range(n_test):
        for i in range(c):
            for j in range(c):
                v = scores[a, i, :, j]
                pro = np.lexsort((np.arange(n), -v))[:k]
                opp = np.lexsort((np.arange(n), v))[:k]
                out["pi"][a, i, j], out["pv"][a, i, j] = pro, v[pro]
                out["oi"][a, i, j], out["ov"][a, i, j] = opp, v[opp]
    for key in out:
        if key.endswith("i"):
            out[key][~present] = -1
        else:
            out[key][~present] = np.nan
    return out


def _features(n, c=3, f=7, seed=0):
    return np.random.default_rng(seed).normal(size=(n, c, f)).astype(np.float32)


def test_streaming_topk_equals_topk_of_the_full_tensor():
    rng = np.random.default_rng(1)
    test, train = _features(4), _features(23, seed=2)
    train[5] = train[3]  # exact ties between two training slices
    train[7, 1] = 0.0  # a class absent from a training slice: zero scores, ties with each other
    train[11, 1] = 0.0
    present = rng.random((4, 3)) > 0.3
    present[0] = [True, False, True]
    k = 6
    # Streaming over uneven blocks, as the engine does; the full tensor is assembled from the
    # same blocks (as in the engine) so that both see bit-identical values and ties.
    state, parts = init_topk(4, 3, k), []
    for start, stop in ((0, 5), (5, 12), (12, 13), (13, 23)):
        idx = np.arange(start, stop, dtype=np.int32)
        parts.append(contract(test, train[start:stop]))
        state = merge_topk(state, parts[-1], idx, k)
    full = np.concatenate([np.asarray(p) for p in parts], axis=2)
    assert np.sum(full[:, :, 5] == full[:, :, 3]) > 0 and np.sum(full == 0) >= 2 * 4 * 3
    streamed = finalise_topk(state, present)
    whole = topk_from_scores(full, k, present)
    ref = _numpy_topk(full, k, present)
    for got in (streamed, whole):
        np.testing.assert_array_equal(got["proponents_indices"], ref["pi"])
        np.testing.assert_array_equal(got["opponents_indices"], ref["oi"])
        np.testing.assert_allclose(got["proponents_scores"], ref["pv"], rtol=1e-6)
        np.testing.assert_allclose(got["opponents_scores"], ref["ov"], rtol=1e-6)
    assert streamed["proponents_indices"].shape == (4, 3, 3, k)
    assert streamed["proponents_indices"].dtype == np.int32
    # Proponents are the largest (decreasing), opponents the most negative (increasing).
    pv, ov = streamed["proponents_scores"][present], streamed["opponents_scores"][present]
    assert np.all(np.diff(pv, axis=-1) <= 0) and np.all(np.diff(ov, axis=-1) >= 0)


def test_absent_test_classes_are_never_ranked_and_k_beyond_n_is_marked():
    test, train = _features(2), _features(3, seed=3)
    present = np.array([[True, False, True], [False, False, True]])
    got = topk_from_scores(contract(test, train), 10, present)
    assert got["proponents_indices"].shape[-1] == 3  # K clamped to n_train
    assert np.all(got["proponents_indices"][~present] == -1)
    assert np.all(np.isnan(got["opponents_scores"][~present]))
    assert np.all(got["proponents_indices"][present] >= 0)
    # Streaming with K larger than the training set: the unused ranks are marked too.
    state = merge_topk(init_topk(2, 3, 5), contract(test, train), np.arange(3, dtype=np.int32), 5)
    out = finalise_topk(state, present)
    assert np.all(out["proponents_indices"][present][:, :, 3:] == -1)
    assert np.all(np.isnan(out["proponents_scores"][present][:, :, 3:]))
    # Padding rows (index -1) never enter the ranking.
    state = merge_topk(init_topk(2, 3, 2), contract(test, np.concatenate([train, 100 * train])),
                       np.array([0, 1, 2, -1, -1, -1], np.int32), 2)
    assert set(np.unique(finalise_topk(state)["proponents_indices"])) <= {0, 1, 2}


def test_patient_aggregation_by_hand():
    # 1 test slice, 2 classes for brevity; 5 training slices of patients b, a, b, c, a.
    scores = np.zeros((1, 2, 5, 2), np.float32)
    scores[0, 0, :, 0] = [1, 2, 3, 4, 5]
    scores[0, 1, :, 1] = [10, 20, 30, 40, 50]
    scores[0, 0, :, 1] = [-1, 0, 0, 0, 1]
    cases = ["b", "a", "b", "c", "a"]
    got, patients = aggregate_by_patient(scores, cases)
    assert patients == ["a", "b", "c"]
    assert got.shape == (1, 2, 3, 2)
    np.testing.assert_allclose(got[0, 0, :, 0], [2 + 5, 1 + 3, 4])
    np.testing.assert_allclose(got[0, 1, :, 1], [20 + 50, 10 + 30, 40])
    np.testing.assert_allclose(got[0, 0, :, 1], [1, -1, 0])
    np.testing.assert_allclose(got[0, 1, :, 0], 0)
    assert patient_index(cases)[1].tolist() == [1, 0, 1, 2, 0]


def test_score_blocks_equals_the_full_contraction():
    test, train = _features(3, f=5), _features(11, f=5, seed=4)
    cases = ["p2", "p2", "p0", "p1", "p1", "p1", "p0", "p3", "p3", "p2", "p0"]
    patients, patient_of = patient_index(cases)
    blocks = [(0, 4), (4, 8), (8, 11)]
    out = np.zeros((3, 3, 11, 3), np.float32)
    res = score_blocks(test, lambda k: train[blocks[k][0]:blocks[k][1]], blocks, mesh=train_mesh(),
                       scores_out=out, topk=4, patient_of=patient_of, n_patients=len(patients))
    full = np.einsum("aif,bjf->aibj", test.astype(np.float64), train.astype(np.float64))
    np.testing.assert_allclose(out, full, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res["self_influence"], np.sum(train.astype(np.float64) ** 2, -1),
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(res["patient_scores"]),
                               aggregate_by_patient(full, cases)[0], rtol=1e-5, atol=1e-5)
    top = finalise_topk(res["topk_state"])
    np.testing.assert_array_equal(top["proponents_indices"],
                                  topk_from_scores(out, 4)["proponents_indices"])


@pytest.mark.parametrize("k", [1, 3])
def test_topk_of_patients_uses_the_same_ranking(k):
    scores = np.random.default_rng(5).normal(size=(2, 3, 4, 3)).astype(np.float32)
    got = topk_from_scores(scores, k)
    ref = _numpy_topk(scores, k, np.ones((2, 3), bool))
    np.testing.assert_array_equal(got["proponents_indices"], ref["pi"])
    np.testing.assert_array_equal(got["opponents_indices"], ref["oi"])
