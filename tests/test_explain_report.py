"""End to end: the report of a (fake) run and a hand-made influence folder, checked against the inputs."""

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

from test_explain_fixtures import FakeRun, write_influence
from tracin_jax.errors import InputError
from tracin_jax.explain import explain_run, figures, ranking, run_explain
from tracin_jax.training.losses import dice_from_counts, hard_dice_counts

FAST = dict(k=2, items_per_class=1, n_permutations=100, random_seeds=3, progress=False)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run = FakeRun(n_train_cases=6, n_test_cases=2, slices=2)
    d = tmp_path_factory.mktemp("explain")
    scores = write_influence(d / "infl", run, seed=0)
    metrics = explain_run(run, d / "infl", d / "report", **FAST)
    return run, d, scores, metrics


def test_report_files_complete_and_offline(report):
    _, d, _, metrics = report
    out = d / "report"
    page = (out / "index.html").read_text()
    assert json.loads((out / "metrics.json").read_text()) == metrics
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) >= 8 and all((out / name).is_file() for name in images)
    assert {p.name for p in out.glob("*.png")} == set(images)
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert not list(d.glob(".report.tmp-*"))  # the temporary build folder is gone


def test_class_matrix_equals_mean_of_scores_file(report):
    run, d, scores, metrics = report
    present = np.load(d / "infl" / "test_present.npy")
    expected = np.array([[scores[present[:, i], i, :, j].mean() for j in range(3)] for i in range(3)])
    np.testing.assert_allclose(np.array(metrics["global"]["class_matrix"]), expected, rtol=1e-5, atol=1e-7)


def test_local_rankings_match_scores(report):
    run, d, scores, metrics = report
    ps = np.load(d / "infl" / "patient_scores.npy")
    patients = sorted(set(run.train.cases))
    train_patient = np.array([patients.index(c) for c in run.train.cases])
    local = metrics["local"]
    assert local["not_ranked_absent"] == {"NCR/NET": 0, "ED": 0, "ET": 1}
    assert len(local["items"]) == 3
    for it in local["items"]:
        t, i = it["test_index"], ["NCR/NET", "ED", "ET"].index(it["test_class"])
        assert (run.test.labels[t] == i + 1).any()  # absent classes are never explained
        order = np.argsort(-ps[t, i, :, i])
        want = [patients[p] for p in order[:2] if ps[t, i, p, i] > 0]
        assert [p["patient"] for p in it["proponents"]] == want
        for p in it["proponents"] + it["opponents"]:
            pi = patients.index(p["patient"])
            assert p["score"] == pytest.approx(float(ps[t, i, pi, i]))
            slices = np.flatnonzero(train_patient == pi)
            best = slices[np.argmax(np.abs(scores[t, i, slices, i]))]
            assert p["slice"] == run.train.ids[best]
        assert all(o["score"] < 0 for o in it["opponents"])
    assert metrics["global"]["topk_proponent_counts"] == ranking.topk_frequency(
        ps, np.load(d / "infl" / "test_present.npy"), 2)[0].tolist()


def test_faithfulness_and_selection_numbers(report):
    run, _, _, metrics = report
    f = metrics["faithfulness"]
    n_pat, n_f = 6, run.config.model.width
    for kind in ("cosine", "max_ratio", "max_product"):
        for c in ("NCR/NET", "ED", "ET"):
            e = f["metrics"][kind]["per_class"][c]
            assert len(e["fi_mean_over_filters"]) == n_pat
            rho = e["spearman_abs_score_vs_S"]["rho"]
            assert rho is None or -1 <= rho <= 1
            assert 0 < e["gap_test"]["p_value"] <= 1
    assert np.array(f["fi_curves"]).shape == (3, n_pat, n_f)
    s = metrics["selection"]
    assert np.array(s["per_filter_dice_drop"]["test"]).shape == (3, n_f)
    # the unablated Dice equals the network's own Dice on the split
    v = run.checkpoints[-1].variables
    logits = run.apply(v, jnp.asarray(run.test.images))
    dice = dice_from_counts(hard_dice_counts(jnp.argmax(logits, -1), jnp.asarray(run.test.labels, jnp.int32)))
    got = [s["baseline_dice"]["test"]["baseline"][c] for c in ("NCR/NET", "ED", "ET")]
    assert got == pytest.approx([np.nan if x is None else x for x in dice[1:]], nan_ok=True)


def test_replacement_without_scores_and_safe_failure(report, monkeypatch):
    run, d, _, _ = report
    infl = d / "infl_noscores"
    write_influence(infl, run, seed=1, with_scores=False)
    out = d / "report2"
    out.mkdir()  # a report written before report manifests existed, and a file of the user's
    (out / "index.html").write_text('old report <img src="stale.png">')
    (out / "metrics.json").write_text(json.dumps({"local": {}, "global": {}, "influence": {}}))
    (out / "stale.png").write_bytes(b"")
    (out / "notes.txt").write_text("mine")

    def boom(*a, **k):
        raise RuntimeError("figure failed")

    monkeypatch.setattr(figures, "class_matrix", boom)
    with pytest.raises(RuntimeError):
        explain_run(run, infl, out, **FAST)
    assert (out / "index.html").read_text().startswith("old report")  # the previous report is untouched
    assert not list(d.glob(".report2.tmp-*"))
    monkeypatch.undo()
    with pytest.raises(InputError, match="level='slice' needs scores.npy"):
        explain_run(run, infl, out, level="slice", **FAST)
    m = explain_run(run, infl, out, **FAST)
    assert not (out / "stale.png").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert "largest class region" in m["influence"]["representative_slice"]


def test_refuses_to_overwrite_a_users_page(report, tmp_path):
    run, d, _, _ = report
    (tmp_path / "index.html").write_text("mine")
    with pytest.raises(InputError, match="'index.html', which is not from an earlier report"):
        explain_run(run, d / "infl", tmp_path, **FAST)
    assert (tmp_path / "index.html").read_text() == "mine"
    with pytest.raises(InputError, match="modality='pet'"):
        explain_run(run, d / "infl", tmp_path / "r", modality="pet", **FAST)


def test_report_on_tiny_run(request, tmp_path):
    """With the shared trained run and its influence folder, when the suite provides them."""
    try:
        infl = request.getfixturevalue("tiny_influence")
    except pytest.FixtureLookupError:
        pytest.skip("tiny_influence fixture not available")
    workdir = request.getfixturevalue("tiny_run")
    m = run_explain(workdir, infl, tmp_path / "report", **FAST)
    assert (tmp_path / "report" / "index.html").is_file()
    assert len(m["selection"]["per_filter_dice_drop"]["train"]) == 3
