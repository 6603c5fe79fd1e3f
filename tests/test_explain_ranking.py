import numpy as np

from tracin_jax.explain import ranking


def test_top_k_proponents_and_opponents():
    v = np.array([0.5, -2.0, 3.0, 0.0, -0.1, 1.0])
    t = ranking.top_k(v, 2)
    np.testing.assert_array_equal(t.proponents, [2, 5])
    np.testing.assert_array_equal(t.proponent_scores, [3.0, 1.0])
    np.testing.assert_array_equal(t.opponents, [1, 4])  # most negative first
    np.testing.assert_array_equal(t.opponent_scores, [-2.0, -0.1])
    # Few items: a positive score is never an opponent, a negative one never a proponent.
    t = ranking.top_k(v[:3], 5)
    np.testing.assert_array_equal(t.proponents, [2, 0])
    np.testing.assert_array_equal(t.opponents, [1])
    t = ranking.top_k(np.zeros(4), 2)
    assert t.proponents.size == 0 and t.opponents.size == 0


def test_representative_is_slice_with_largest_abs_score():
    train_patient = np.array([0, 0, 1, 1, 1, 2])
    s = np.array([[0.1, -0.3, 2.0, -5.0, 1.0, 0.0],
                  [0.4, 0.3, 0.0, 0.0, 0.0, 7.0]])
    rep = ranking.representatives(s, train_patient, 4)
    np.testing.assert_array_equal(rep, [[1, 3, 5, -1], [0, 2, 5, -1]])  # ties: first slice


def test_aggregate_patients_is_sum_over_slices():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(2, 3, 5, 3)).astype(np.float32)
    train_patient = np.array([1, 0, 1, 2, 0])
    ps = ranking.aggregate_patients(scores, train_patient, 3)
    for p in range(3):
        np.testing.assert_allclose(ps[:, :, p], scores[:, :, train_patient == p].sum(axis=2), rtol=1e-6)


def test_class_matrix_known_answer_skips_absent_items():
    # 2 test items, 2 patients; n_train = 4 slices.
    ps = np.zeros((2, 3, 2, 3))
    ps[0, 0, :, 1] = [4.0, 4.0]  # item 0, class NCR, train class ED: sum 8 -> mean 2 per slice
    ps[1, 0, :, 1] = [100.0, 0.0]  # item 1 has no NCR: must not count
    ps[:, 2, :, 2] = [[1.0, 3.0], [-1.0, -3.0]]  # ET<-ET: items' means 1 and -1
    present = np.array([[True, True, True], [False, True, True]])
    m = ranking.class_matrix(ps, present, n_train=4)
    assert m[0, 1] == 2.0
    assert m[2, 2] == 0.0
    assert m[1, 1] == 0.0
    present[:, 0] = False
    assert np.isnan(ranking.class_matrix(ps, present, 4)[0]).all()


def test_topk_frequency_counts_and_skips_absent():
    # 3 test items, 4 patients; class ED (i=1), j = i.
    ps = np.zeros((3, 3, 4, 3))
    ps[0, 1, :, 1] = [3, 1, 0, -2]  # k=2 below: patient 2 (score 0) is neither
    ps[1, 1, :, 1] = [2, 5, -1, -4]
    ps[2, 1, :, 1] = [9, 9, 9, -9]  # class absent: ignored
    present = np.array([[1, 1, 1], [1, 1, 1], [1, 0, 1]], bool)
    prop, opp = ranking.topk_frequency(ps, present, k=1)
    np.testing.assert_array_equal(prop[1], [1, 1, 0, 0])
    np.testing.assert_array_equal(opp[1], [0, 0, 0, 2])
    assert prop[0].sum() == 0 and opp[2].sum() == 0  # all-zero scores: nobody is counted
    prop, opp = ranking.topk_frequency(ps, present, k=2)
    np.testing.assert_array_equal(prop[1], [2, 2, 0, 0])
    np.testing.assert_array_equal(opp[1], [0, 0, 1, 2])


def test_largest_region_items_excludes_absent():
    labels = np.zeros((3, 4, 4), np.uint8)
    labels[0, :2] = 2
    labels[1, :3] = 2
    labels[2, 0, 0] = 1
    items = ranking.largest_region_items(labels, 2)
    assert items == [[2], [1, 0], []]


def test_largest_region_representatives():
    labels = np.zeros((4, 3, 3), np.uint8)
    labels[0, 0, 0] = 3
    labels[1, :2] = 3
    labels[2, 0] = 2
    train_patient = np.array([0, 0, 1, 1])
    rep = ranking.largest_region_representatives(labels, train_patient, 2)
    assert rep.shape == (3, 2)
    assert rep[2, 0] == 1 and rep[1, 1] == 2
