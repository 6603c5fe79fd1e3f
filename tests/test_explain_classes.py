"""Classes come from the influence folder; an influence folder of another run is refused."""

import json

import numpy as np
import pytest

from test_explain_fixtures import FakeRun, write_influence
from tracin_jax.errors import InputError
from tracin_jax.explain import explain_run
from tracin_jax.explain.api import present_classes
from tracin_jax.influence.folder import classes_of

FAST = dict(k=2, items_per_class=1, n_permutations=50, random_seeds=2, progress=False)
FOUR = ["background", "NCR/NET", "ED", "ET"]


@pytest.fixture(scope="module")
def run():
    return FakeRun(n_train_cases=5, n_test_cases=2, slices=2)


def test_presence_masks_follow_label_values():
    labels = np.zeros((3, 4, 4), np.uint8)
    labels[0, 0, 0] = 3
    labels[1] = 2
    got = present_classes(labels, [0, 1, 2, 3])
    assert got.tolist() == [[True, False, False, True], [False, False, True, False],
                            [True, False, False, False]]
    assert present_classes(labels, [1, 2, 3]).tolist() == [[False, False, True], [False, True, False],
                                                            [False, False, False]]


def test_class_labels_default_and_checks():
    assert classes_of({}) == (["NCR/NET", "ED", "ET"], [1, 2, 3])
    assert classes_of({"class_names": FOUR, "class_labels": [0, 1, 2, 3]}) == (FOUR, [0, 1, 2, 3])
    with pytest.raises(InputError, match="no class_labels"):
        classes_of({"class_names": FOUR})
    with pytest.raises(InputError, match="class_labels must be 4 distinct"):
        classes_of({"class_names": FOUR, "class_labels": [0, 1, 1, 3]})


def test_four_classes_with_background(run, tmp_path):
    write_influence(tmp_path / "infl", run, seed=3, class_names=FOUR, class_labels=[0, 1, 2, 3])
    m = explain_run(run, tmp_path / "infl", tmp_path / "report", train_class="background", **FAST)
    assert m["influence"]["class_names"] == FOUR and m["influence"]["class_labels"] == [0, 1, 2, 3]
    # ET (label 3) is absent from test00/z90 only; background is in every slice
    assert m["local"]["not_ranked_absent"] == {"background": 0, "NCR/NET": 0, "ED": 0, "ET": 1}
    assert np.array(m["global"]["class_matrix"]).shape == (4, 4)
    assert sorted(m["selection"]["baseline_dice"]["test"]["baseline"]) == sorted(FOUR)
    assert set(m["faithfulness"]["metrics"]["cosine"]["per_class"]) == set(FOUR)
    assert {it["train_class"] for it in m["local"]["items"]} == {"background"}
    assert any(it["test_class"] == "background" for it in m["local"]["items"])
    for it in m["local"]["items"]:
        c = FOUR.index(it["test_class"])
        assert it["class_area"] == int((run.test.labels[it["test_index"]] == c).sum())
        assert (tmp_path / "report" / it["figure"]).is_file()
    page = (tmp_path / "report" / "index.html").read_text()
    assert "background" in page


def test_presence_mask_with_other_labels_is_refused(run, tmp_path):
    # the folder says its classes are labels 1, 2, 3, 0: its presence masks disagree with the run
    write_influence(tmp_path / "infl", run, class_names=FOUR, class_labels=[0, 1, 2, 3])
    meta = json.loads((tmp_path / "infl" / "meta.json").read_text())
    meta["class_labels"] = [1, 2, 3, 0]
    (tmp_path / "infl" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="test_present.npy: says"):
        explain_run(run, tmp_path / "infl", tmp_path / "report", **FAST)
    with pytest.raises(InputError, match="train_class='NET'"):
        explain_run(run, tmp_path / "infl", tmp_path / "report", train_class="NET", **FAST)


def test_influence_of_another_run_is_refused(run, tmp_path):
    run_a, run_b = tmp_path / "runA", tmp_path / "runB"
    run_a.mkdir()
    run_b.mkdir()
    run.workdir = run_a
    run.info = {"train_ids": list(run.train.ids), "test_ids": list(run.test.ids)}
    write_influence(tmp_path / "infl", run, workdir=run_b)
    with pytest.raises(InputError, match=f"computed from the run {run_b}, not from --workdir {run_a}"):
        explain_run(run, tmp_path / "infl", tmp_path / "report", **FAST)
    assert not (tmp_path / "report").exists()
    # the run folder moved away: its recorded split decides
    write_influence(tmp_path / "infl", run, workdir=tmp_path / "gone")
    run.info = {"train_ids": list(run.train.ids), "test_ids": list(run.test.ids)[::-1]}
    with pytest.raises(InputError, match="does not belong to --workdir .*runA: its test_ids differ"):
        explain_run(run, tmp_path / "infl", tmp_path / "report", **FAST)
    run.info = {"train_ids": list(run.train.ids), "test_ids": list(run.test.ids)}
    meta = json.loads((tmp_path / "infl" / "meta.json").read_text())
    meta["checkpoints"] = [{"epoch": 7, "lr": 0.1}]
    (tmp_path / "infl" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="checkpoint epoch 7"):
        explain_run(run, tmp_path / "infl", tmp_path / "report", **FAST)
