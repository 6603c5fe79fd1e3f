import json

import numpy as np
import pytest

from test_explain_fixtures import FakeRun, write_influence
from tracin_jax.errors import InputError
from tracin_jax.explain import ranking
from tracin_jax.explain.api import _check_present
from tracin_jax.influence.folder import load_influence


@pytest.fixture(scope="module")
def run():
    return FakeRun(n_train_cases=3, n_test_cases=2, slices=2)


def _load(folder, run):
    return load_influence(folder, test_ids=run.test.ids, train_ids=run.train.ids,
                          train_cases=run.train.cases)


def test_good_folder_loads(tmp_path, run):
    scores = write_influence(tmp_path, run)
    infl = _load(tmp_path, run)
    assert infl.n_test == 4 and infl.n_train == 6 and infl.patients == ["train00", "train01", "train02"]
    np.testing.assert_array_equal(infl.scores, scores)
    assert infl.train_patient.tolist() == [0, 0, 1, 1, 2, 2]
    assert infl.topk is None


@pytest.mark.parametrize("name", ["meta.json", "patient_scores.npy", "test_present.npy"])
def test_missing_file(tmp_path, run, name):
    write_influence(tmp_path, run)
    (tmp_path / name).unlink()
    with pytest.raises(InputError, match=f"{name}: missing"):
        _load(tmp_path, run)


def test_shape_that_does_not_match(tmp_path, run):
    write_influence(tmp_path, run)
    np.save(tmp_path / "scores.npy", np.zeros((4, 3, 5, 3), np.float32))
    with pytest.raises(InputError, match=r"scores.npy: shape \(4, 3, 5, 3\) does not match"):
        _load(tmp_path, run)
    write_influence(tmp_path, run)
    np.save(tmp_path / "patient_scores.npy", np.zeros((4, 3, 3), np.float32))
    with pytest.raises(InputError, match="patient_scores.npy: expected 4 dimensions"):
        _load(tmp_path, run)


def test_run_with_other_splits(tmp_path, run):
    write_influence(tmp_path, run)
    other = FakeRun(n_train_cases=4, n_test_cases=2, slices=2)
    with pytest.raises(InputError, match="meta.json: train_ids lists 6 examples but the run has 8"):
        _load(tmp_path, other)
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["test_ids"][1] = "someone/z1"
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="test_ids differ from the run's .*'someone/z1'"):
        _load(tmp_path, run)


def test_present_must_match_ground_truth(tmp_path, run):
    write_influence(tmp_path, run)
    present = np.load(tmp_path / "test_present.npy")
    present[0, 2] = True  # test00/z90 has no ET
    np.save(tmp_path / "test_present.npy", present)
    infl = _load(tmp_path, run)
    with pytest.raises(InputError, match="test_present.npy: says ET is present in test00/z90"):
        _check_present(infl, run.test.labels)


def test_error_is_one_line(tmp_path, run):
    write_influence(tmp_path, run)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(InputError) as e:
        _load(tmp_path, run)
    assert "\n" not in str(e.value) and "meta.json" in str(e.value)


def test_topk_lists_refine_representatives():
    train_patient = np.array([0, 0, 1, 1])
    base = np.zeros((1, 1, 2), np.int64)  # fallback: slice 0 for both (wrong for patient 1)
    idx = np.array([[[3, 1, 2, -1]]])
    val = np.array([[[0.5, -2.0, 0.9, np.nan]]])
    rep = ranking.representatives_from_topk(base, idx, val, train_patient)
    assert rep[0, 0].tolist() == [1, 2]  # largest |score| among the listed slices of each patient
