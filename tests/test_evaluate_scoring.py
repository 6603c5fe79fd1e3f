"""Scoring of the evaluation on synthetic arrays (no retraining): LDS of a linear datamodel
oracle and of random scores, bootstrap and paired intervals, noise ceiling, leave-top-k-out
arithmetic, sanity-check helpers (the mislabel AUC matched by spec, also through run_evaluate
on the tiny run with its ground truth replaced) and the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from tracin_jax.errors import InputError
from tracin_jax.evaluate import baselines, lds, leave_out, report, sanity
from tracin_jax.evaluate.api import parse_ks


def _linear_world(seed=0, m=48, p=16, n_test=10, r=1, noise=0.0):
    """A linear datamodel: the class loss of subset model m is -sum_{p in S_m} beta[a, i, p]."""
    rng = np.random.default_rng(seed)
    beta = rng.normal(size=(n_test, 3, p))
    masks = rng.random((m, p)) < 0.5
    clean = -np.einsum("mp,aip->mai", masks.astype(float), beta)
    losses = clean[:, None] + noise * rng.normal(size=(m, r, n_test, 3))
    scores = np.zeros((n_test, 3, p, 3), np.float32)
    scores[..., 1] = beta  # all of it in one training class: predictions sum over j
    present = rng.random((n_test, 3)) < 0.8
    present[0] = True
    return scores, masks, losses.astype(np.float32), present


def test_spearman_columns_matches_scipy():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(20, 5)), rng.normal(size=(20, 5))
    y[:, 2] = x[:, 2] ** 3  # monotone: rho = 1
    x[:4, 3] = 0.0  # ties
    got = lds.spearman_columns(x, y)
    want = [stats.spearmanr(x[:, t], y[:, t]).statistic for t in range(5)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert np.isnan(lds.spearman_columns(np.ones((5, 1)), y[:5, :1]))[0]


def test_subset_predictions_sign_and_sum():
    scores = np.zeros((1, 3, 3, 3), np.float32)
    scores[0, 0, 0, :] = [1.0, 2.0, 0.0]  # patient 0: proponent of total 3
    scores[0, 0, 2, 2] = -4.0  # patient 2: opponent
    masks = np.array([[1, 0, 0], [0, 0, 1], [1, 1, 1]], bool)
    pred = lds.subset_predictions(scores, masks)
    assert pred.shape == (3, 1, 3)
    np.testing.assert_allclose(pred[:, 0, 0], [-3.0, 4.0, 1.0])


def test_oracle_lds_is_one_random_is_zero_negated_is_minus_one():
    scores, masks, losses, present = _linear_world(noise=0.0)
    oracle = lds.lds(scores, masks, losses, present, resamples=200)
    assert oracle["mean"] > 0.999
    assert oracle["ci"][0] > 0.99
    assert oracle["n_targets"] == int(present.sum())
    assert sum(c["n_targets"] for c in oracle["per_class"].values()) == oracle["n_targets"]
    assert lds.lds(-scores, masks, losses, present, resamples=50)["mean"] < -0.999

    rng = np.random.default_rng(7)
    rand = [lds.lds(rng.normal(size=scores.shape), masks, losses, present, resamples=50)["mean"]
            for _ in range(5)]
    assert abs(np.mean(rand)) < 0.05
    # with retraining noise, the oracle degrades but stays far above random
    noisy = _linear_world(noise=3.0)
    assert 0.3 < lds.lds(noisy[0], noisy[1], noisy[2], noisy[3], resamples=50)["mean"] < 0.95


def test_absent_targets_are_ignored():
    scores, masks, losses, present = _linear_world()
    present[:] = False
    present[2, 1] = True
    out = lds.lds(scores, masks, losses, present, resamples=50)
    assert out["n_targets"] == 1 and out["per_class"]["NCR/NET"]["mean"] is None
    assert out["per_class"]["ED"]["n_targets"] == 1


def test_bootstrap_interval_brackets_mean_and_widens_with_noise():
    a = _linear_world(noise=2.0, m=64)
    b = _linear_world(noise=8.0, m=64)
    ra, rb = (lds.lds(w[0], w[1], w[2], w[3], resamples=300) for w in (a, b))
    for r in (ra, rb):
        assert r["ci"][0] <= r["mean"] <= r["ci"][1]
    assert (rb["ci"][1] - rb["ci"][0]) > (ra["ci"][1] - ra["ci"][0])
    # reproducible with the same seed
    assert lds.lds(a[0], a[1], a[2], a[3], resamples=300)["ci"] == ra["ci"]


def test_paired_difference_separates_oracle_from_random():
    scores, masks, losses, present = _linear_world(noise=1.0)
    rnd = np.random.default_rng(3).normal(size=scores.shape)
    d = lds.paired_difference(scores, losses, rnd, losses, masks, present, resamples=300)
    assert d["ci"][0] > 0.3
    same = lds.paired_difference(scores, losses, scores, losses, masks, present, resamples=50)
    assert same["mean"] == 0.0


def test_noise_ceiling():
    scores, masks, losses, present = _linear_world(r=1)
    assert lds.noise_ceiling(losses, present) is None
    identical = np.repeat(losses, 3, axis=1)
    assert lds.noise_ceiling(identical, present)["mean"] > 0.999
    pure_noise = np.random.default_rng(0).normal(size=(64, 2, 10, 3))
    c = lds.noise_ceiling(pure_noise, present)
    assert abs(c["mean"]) < 0.1 and c["seeds"] == 2
    partly = _linear_world(r=3, noise=4.0)[2]
    assert 0.1 < lds.noise_ceiling(partly, present)["mean"] < 0.95


# -- leave-top-k-out ------------------------------------------------------------------------

def test_select_queries_spread_over_classes_and_deterministic():
    present = np.zeros((10, 3), bool)
    present[:, 1] = True  # ED everywhere
    present[:2, 0] = True  # NCR/NET in 2 slices
    present[5:9, 2] = True  # ET in 4
    q = leave_out.select_queries(present, 7, seed=3)
    assert q == leave_out.select_queries(present, 7, seed=3)
    classes = [c for _, c in q]
    assert classes == [0, 1, 2, 0, 1, 2, 1]  # NCR/NET runs out after two
    assert all(present[a, c] for a, c in q)
    assert len(set(q)) == len(q)
    assert len(leave_out.select_queries(present, 100)) == int(present.sum())


def test_top_patients_proponents_opponents_ties():
    scores = np.zeros((1, 3, 5, 3))
    scores[0, 1, :, 0] = [3.0, -1.0, 3.0, 0.5, -2.0]
    scores[0, 1, 3, 2] = 2.0  # patient 3 totals 2.5: summed over training classes
    assert leave_out.top_patients(scores, (0, 1), 1, "proponents") == (0,)  # tie: lower index
    assert leave_out.top_patients(scores, (0, 1), 3, "proponents") == (0, 2, 3)
    assert leave_out.top_patients(scores, (0, 1), 2, "opponents") == (1, 4)


def test_removal_plan_deduplicates_and_shares_random_sets():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(4, 3, 8, 3))
    present = np.ones((4, 3), bool)
    queries = leave_out.select_queries(present, 3)
    randoms = leave_out.random_sets(8, (1, 3), 2, seed=0)
    assert randoms == leave_out.random_sets(8, (1, 3), 2, seed=0)
    assert all(len(x) == k for k, lst in randoms.items() for x in lst)
    plan = leave_out.removal_plan({"a": s, "a_again": s.copy()}, queries, (1, 3), randoms)
    single = leave_out.removal_plan({"a": s}, queries, (1, 3), randoms)
    assert plan["sets"] == single["sets"]  # identical attributions cost nothing more
    assert plan["sets"][0] == ()
    assert len(set(plan["sets"])) == len(plan["sets"])


def test_loss_changes_arithmetic():
    queries = [(0, 0), (1, 2)]
    top = {"proponents": {1: [(0,), (1,)]}, "opponents": {1: [(2,), (2,)]}}
    randoms = {1: [(3,), (4,)]}
    base = np.zeros((2, 3))
    lw = {(): base}
    for p, val in ((0, 0.5), (1, 0.3), (2, -0.2), (3, 0.1), (4, 0.0)):
        lw[(p,)] = np.full((2, 3), val)
    out = leave_out.loss_changes(top, randoms, queries, lw)
    assert out[1]["proponents"]["per_query"] == [0.5, 0.3]
    assert out[1]["opponents"]["per_query"] == [-0.2, -0.2]
    assert out[1]["random"]["per_query"] == pytest.approx([0.05, 0.05])
    paired = out[1]["proponents_minus_random"]
    assert paired["per_query"] == pytest.approx([0.45, 0.25])
    assert paired["mean"] == pytest.approx(0.35) and paired["n"] == 2
    assert paired["wins"] == 2
    # exact one-sided signed-rank test: 2 positive differences of 2 -> p = 1/4
    assert paired["wilcoxon_p"] == pytest.approx(0.25)
    po = out[1]["proponents_minus_opponents"]
    assert po["per_query"] == pytest.approx([0.7, 0.5]) and po["wins"] == 2
    assert out[1]["proponents"]["mean"] == pytest.approx(0.4)


def test_paired_leave_out_difference_counts_and_test():
    d = leave_out._paired(np.array([0.3, -0.05, 0.2, 0.4, 0.1, 0.25]), seed=0)
    assert d["wins"] == 5 and d["n"] == 6
    # one negative difference of the smallest magnitude: rank sum 20 of 21 -> p = 2/64
    assert d["wilcoxon_p"] == pytest.approx(2 / 64)
    assert leave_out._paired(np.zeros(4), seed=0)["wilcoxon_p"] is None
    assert leave_out._paired(np.array([0.1]), seed=0)["wilcoxon_p"] is None


def test_class_voxel_baseline_scores():
    labels = np.zeros((4, 3, 3), np.uint8)
    labels[0, 0, :2] = 3  # patient b: 2 ET voxels
    labels[1, :, 0] = 1  # patient a: 3 NCR/NET voxels
    labels[2, 1, 1] = 2  # patient a: 1 ED voxel
    labels[3, 2, 2] = 3  # patient b: 1 more ET voxel
    vox = baselines.patient_class_voxels(labels, ["b", "a", "a", "b"], ["a", "b", "c"])
    np.testing.assert_array_equal(vox, [[3, 1, 0], [0, 0, 3], [0, 0, 0]])
    s = baselines.class_voxel_scores(vox, n_test=2)
    assert s.shape == (2, 3, 3, 3)
    np.testing.assert_array_equal(s[1, 2, :, 2], [0, 3, 0])  # ET queries: b helps most
    np.testing.assert_array_equal(s[0, 0, :, 0], [3, 0, 0])
    assert s.sum() == 2 * vox.sum()  # nothing off the class diagonal


def test_class_voxel_baseline_is_a_perfect_datamodel_when_only_voxels_matter():
    # Each class loss falls in proportion to the kept voxels of that class: the baseline's
    # LDS is 1 for every class, and a variant equal to it differs from it by exactly 0.
    rng = np.random.default_rng(3)
    p, m, n_test = 12, 40, 5
    vox = rng.integers(0, 500, size=(p, 3)).astype(float)
    masks = rng.random((m, p)) < 0.5
    losses = (-(masks.astype(float) @ vox))[:, None, None, :].repeat(n_test, axis=2)
    present = np.ones((n_test, 3), bool)
    s = baselines.class_voxel_scores(vox, n_test)
    res = lds.lds(s, masks, losses, present, resamples=100)
    assert res["mean"] == pytest.approx(1.0)
    assert all(c["mean"] == pytest.approx(1.0) for c in res["per_class"].values())
    diff = lds.paired_difference(s, losses, s.copy(), losses, masks, present, resamples=100)
    assert diff["mean"] == pytest.approx(0.0)


# -- sanity checks --------------------------------------------------------------------------

def _spec(**kw) -> dict:
    """A meta.json spec as the method registry writes it (default: Dice on head, exact)."""
    return {"method": "tracin", "loss": "dice", "params": "head", "projection": None,
            "normalise": False, "precondition": "none", "relatif": False,
            "checkpoints": [2, 4, 6], "options": {}, **kw}


SKETCH = {"dim": 4096, "seed": 0, "kind": "countsketch"}
EKFAC_OPTIONS = {"damping": 0.1, "fisher": "sampled", "fisher_seed": 0}
TRAK_OPTIONS = {"damping": 1.0, "models": 4, "models_from": "seeds"}


def _experiment_gradients() -> list:
    """The gradients of an experiments.mislabel run whose last epoch is 14 (its checkpoints
    6, 8, ..., 14), as read_mislabel gives them."""
    several = [6, 8, 10, 12, 14]
    specs = {
        "Dice head": _spec(checkpoints=several),
        "Dice head last": _spec(checkpoints=[14]),
        "CE head": _spec(loss="ce", checkpoints=several),
        "Dice all": _spec(params="all", projection=SKETCH, checkpoints=several),
        "Dice all logra": _spec(params="all", checkpoints=several,
                                projection={"dim": 6620, "rank": 16, "seed": 0, "kind": "logra"}),
        "Dice head adam": _spec(precondition="adam", checkpoints=several),
        "Dice head ekfac": _spec(method="ekfac", options=EKFAC_OPTIONS, checkpoints=several),
        "TRAK head": _spec(method="trak", loss="margin", options=TRAK_OPTIONS, checkpoints=[14]),
        # never matched: normalised self-influence is the same for every slice
        "Dice head cos": _spec(normalise=True, checkpoints=several),
        "custom": None,  # a gradient whose folder has no spec
    }
    return [sanity.MislabelGradient(name, spec, 14, 0.1 * k)
            for k, (name, spec) in enumerate(specs.items())]


def _matched(spec, last_epoch=6):
    g = sanity.mislabel_match(spec, last_epoch, _experiment_gradients())
    return None if g is None else g.name


def test_mislabel_match_by_spec():
    # equal specs on every field that defines the gradient; checkpoints as "several" or "the
    # run's last only" (the experiment's run has its own epochs)
    assert _matched(_spec()) == "Dice head"
    assert _matched(_spec(checkpoints=[1, 2, 3, 4, 5, 6])) == "Dice head"
    assert _matched(_spec(checkpoints=[6])) == "Dice head last"
    assert _matched(_spec(checkpoints=[3])) is None  # one checkpoint, not the run's last
    assert _matched(_spec(checkpoints=[6]), last_epoch=8) is None
    assert _matched(_spec(checkpoints=[])) is None
    assert _matched(_spec(loss="ce")) == "CE head"
    assert _matched(_spec(loss="ce", checkpoints=[6])) is None  # not computed there
    assert _matched(_spec(params="decoder")) is None
    # projections: kind and size (LoGra's is its rank); the seed and LoGra's total
    # dimension (another architecture's) do not count
    assert _matched(_spec(params="all", projection={**SKETCH, "seed": 3})) == "Dice all"
    assert _matched(_spec(params="all", projection={**SKETCH, "dim": 2048})) is None
    assert _matched(_spec(params="all", projection={**SKETCH, "kind": "gaussian"})) is None
    assert _matched(_spec(params="all")) is None  # exact `all`
    logra = {"dim": 9000, "rank": 16, "seed": 0, "kind": "logra"}
    assert _matched(_spec(params="all", projection=logra)) == "Dice all logra"
    assert _matched(_spec(params="all", projection={**logra, "rank": 8})) is None
    assert _matched(_spec(params="all", projection=logra, checkpoints=[6])) is None
    # preconditioning and the method with its options
    assert _matched(_spec(precondition="adam")) == "Dice head adam"
    assert _matched(_spec(precondition="identity")) is None
    assert _matched(_spec(method="ekfac", options=EKFAC_OPTIONS)) == "Dice head ekfac"
    assert _matched(_spec(method="ekfac", options={**EKFAC_OPTIONS, "damping": 0.2})) is None
    assert _matched(_spec(method="ekfac", options=EKFAC_OPTIONS, checkpoints=[6])) is None
    assert _matched(_spec(method="ekfac", options=EKFAC_OPTIONS, loss="ce")) is None
    trak = _spec(method="trak", loss="margin", options=TRAK_OPTIONS, checkpoints=[6])
    assert _matched(trak) == "TRAK head"
    assert _matched({**trak, "options": {**TRAK_OPTIONS, "models": 2}}) is None
    assert _matched({**trak, "checkpoints": [5, 6],
                     "options": {**TRAK_OPTIONS, "models": 2, "models_from": "checkpoints"}}) is None
    # normalised and RelatIF gradients: their normalised self-influence ranks nothing
    assert _matched(_spec(normalise=True)) is None
    assert _matched(_spec(relatif=True)) is None
    assert _matched(None) is None  # a folder written before specs
    # the row read is the experiment's "classwise sum" of that gradient
    g = sanity.mislabel_match(_spec(loss="ce"), 6, _experiment_gradients())
    assert g.row == "CE head classwise sum" and g.auc == pytest.approx(0.2)


def test_gradient_spec_describes_from_the_spec_and_the_registry():
    d = sanity.gradient_spec({"spec": _spec()})
    assert (d.loss, d.normalise, d.params, d.epochs, d.method) == ("dice", False, "head",
                                                                    (2, 4, 6), "tracin")
    assert d.describe() == "dice head"
    cos = sanity.gradient_spec({"spec": _spec(loss="ce", params="all", projection=SKETCH,
                                              normalise=True, checkpoints=[6])})
    assert (cos.loss, cos.normalise) == ("ce", True)
    assert cos.describe() == "ce all + countsketch 4096, cosine, epoch 6 only"
    adam = sanity.gradient_spec({"spec": _spec(precondition="adam", relatif=True)})
    assert adam.describe() == "dice head, adam-preconditioned, RelatIF"
    logra = {"dim": 6620, "rank": 16, "seed": 0, "kind": "logra"}
    assert sanity.gradient_spec({"spec": _spec(params="all", projection=logra)}).describe() == \
        "dice all + logra 16"
    # another method: its registry label, then its options; a loss LDS does not measure is
    # scored on Dice
    ek = sanity.gradient_spec({"spec": _spec(method="ekfac", options=EKFAC_OPTIONS)})
    assert ek.describe() == "EK-FAC dice head, damping=0.1, fisher=sampled, fisher_seed=0"
    trak = sanity.gradient_spec({"spec": _spec(method="trak", loss="margin", checkpoints=[6],
                                               options=TRAK_OPTIONS)})
    assert trak.loss == "dice" and trak.options == TRAK_OPTIONS
    assert trak.describe() == ("TRAK margin head, epoch 6 only, damping=1.0, models=4, "
                               "models_from=seeds")


def test_gradient_spec_of_a_folder_without_a_spec():
    """Written before specs: described from the entries every folder has."""
    meta = {"gradient": {"tag": "tumour_dice_loss(eps=1e-06)|head|exact"},
            "params": {"name": "head"}, "projection": None,
            "checkpoints": [{"epoch": 2}, {"epoch": 4}, {"epoch": 6}]}
    spec = sanity.gradient_spec(meta)
    assert (spec.loss, spec.normalise, spec.params, spec.epochs) == ("dice", False, "head", (2, 4, 6))
    assert spec.describe() == "dice head" and spec.precondition is None and spec.method == ""
    cos = sanity.gradient_spec({**meta, "params": {"name": "all"}, "projection": SKETCH,
                                "gradient": {"tag": "normalised(tumour_cross_entropy|all|cs)"},
                                "checkpoints": [{"epoch": 6}]})
    assert cos.describe() == "ce all + countsketch 4096, cosine, epoch 6 only"
    adam = sanity.gradient_spec({**meta, "precondition": {"kind": "adam"}, "relatif": True})
    assert adam.describe() == "dice head, adam-preconditioned, RelatIF"
    assert sanity.gradient_spec({**meta, "spec": None}).describe() == "dice head"
    # its randomisation is skipped with a one-line reason; it matches no mislabel gradient
    assert "no spec in meta.json" in sanity.randomisation_skipped(meta)
    assert "spec null" in sanity.randomisation_skipped({**meta, "spec": None})
    assert sanity.randomisation_skipped({**meta, "spec": _spec()}) is None
    assert _matched(meta.get("spec")) is None


def test_read_mislabel(tmp_path):
    methods = {"CE head classwise sum": {"all": {"auc": 0.78}},
               "CE head total": {"all": {"auc": 0.8}}}
    gradients = {"CE head": {"spec": _spec(loss="ce"), "last_epoch": 6},
                 "Dice head": {"spec": _spec(), "last_epoch": 6}}
    good = tmp_path / "results.json"
    good.write_text(json.dumps({"results": {"slices": {"methods": methods}},
                                "gradients": gradients}))
    res = sanity.read_mislabel(good)
    assert res.reason is None and [g.name for g in res.gradients] == ["CE head", "Dice head"]
    assert [g.auc for g in res.gradients] == [0.78, None]  # no "Dice head classwise sum" row
    assert sanity.mislabel_match(_spec(loss="ce", checkpoints=[1, 2]), 2, res.gradients).auc == 0.78
    # written before the experiment recorded its gradients: no gradient, one line saying why
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"results": {"slices": {"methods": methods}}}))
    res = sanity.read_mislabel(old)
    assert res.gradients == () and "old.json" in res.reason and "rerun" in res.reason
    assert "\n" not in res.reason
    for name, text in (("other.json", "{}"), ("bad.json", "not json"),
                       ("list.json", json.dumps({"results": {"slices": {"methods": methods}},
                                                 "gradients": [1]}))):
        (tmp_path / name).write_text(text)
        with pytest.raises(InputError, match=name):
            sanity.read_mislabel(tmp_path / name)
    with pytest.raises(InputError, match="not found"):
        sanity.read_mislabel(tmp_path / "missing.json")


def test_evaluate_names_no_method():
    """Methods are named in their own files only: evaluate reads specs and the registry."""
    import re
    from pathlib import Path

    from tracin_jax.influence.methods import METHODS

    folder = Path(sanity.__file__).parent
    names = [n for n in METHODS if n != "tracin"] + ["logra"]  # tracin: the package's name
    word = re.compile(r"\b(" + "|".join(names) + r")\b", re.IGNORECASE)
    citation = "Park et al. 2023, TRAK"  # LDS's paper
    hits = [f"{p.name}:{i}: {line.strip()}" for p in sorted(folder.glob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if word.search(line.replace(citation, ""))]
    assert not hits, hits


def test_rank_agreement():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(5, 3, 12, 3))
    present = np.ones((5, 3), bool)
    assert sanity.rank_agreement(s, 2 * s + 1, present)["mean"] == pytest.approx(1.0)
    other = [sanity.rank_agreement(s, rng.normal(size=s.shape), present)["mean"] for _ in range(5)]
    assert abs(np.mean(other)) < 0.15


def test_parse_ks():
    assert parse_ks("5,1,3") == (1, 3, 5)
    assert parse_ks([3]) == (3,)
    for raw in ("1,x", "0", "1.5"):
        with pytest.raises(InputError, match="--leave-out-k"):
            parse_ks(raw)


def _result(best_separated: bool) -> dict:
    def lds_entry(m):
        return {"mean": m, "ci": [m - 0.1, m + 0.1], "n_targets": 9,
                "per_class": {c: {"mean": m, "ci": [None, None], "n_targets": 3}
                              for c in report.CLASS_NAMES}}
    hi = -0.05 if best_separated else 0.05
    return {
        "workdir": "runs/x", "leave_out": {"k": [1], "queries_n": 2, "seed": 0},
        "ground_truth": {"patients": 12, "n_test": 6, "targets": 9, "subsets": 8, "fraction": 0.5,
                         "seeds": 1, "seed": 0, "noise_ceiling": {"dice": None, "ce": None}},
        "variants": {
            "head": {"gradient": "dice head", "lds": lds_entry(0.3), "vs_best": None,
                     "leave_out": {"1": {s: {"mean": 0.01, "ci": [0.0, 0.02]}
                                         for s in leave_out.SIDES}},
                     "randomisation": {"mean": 0.2}, "mislabel_auc": 0.13},
            "cos": {"gradient": "dice head, cosine", "lds": lds_entry(0.1),
                    "vs_best": {"mean": -0.2, "ci": [-0.3, hi]}, "randomisation": None,
                    "mislabel_auc": None},
        }}


def test_report_lists_the_baseline_and_each_variant_against_it(tmp_path):
    res = _result(True)
    res["variants"]["head"]["vs_baseline"] = {"mean": 0.04, "ci": [-0.01, 0.09]}
    res["variants"]["head"]["baseline_rho"] = 0.9
    base_lds = res["variants"]["cos"]["lds"]
    res["baselines"] = {baselines.CLASS_VOXELS: {
        "gradient": baselines.DESCRIPTION, "lds": base_lds, "vs_best": {"mean": -0.2, "ci": [-0.3, -0.1]},
        "leave_out": {"1": {s: {"mean": 0.02, "ci": [0.0, 0.04]} for s in leave_out.SIDES}},
        "randomisation": None, "mislabel_auc": None}}
    md = report.markdown(res)
    assert "LDS - baseline [95% CI]" in md
    assert "| `head` | dice head | +0.30 [+0.20, +0.40] | +0.30 | +0.30 | +0.30 | best | +0.04 [-0.01, +0.09] |" in md
    assert f"| `{baselines.CLASS_VOXELS}` | {baselines.DESCRIPTION} | +0.10" in md
    assert "has not shown more than how much of each class" in md
    assert "| `head` | +0.30 | +0.30 | +0.30 | +0.90 | +0.010 [+0.000, +0.020]" in md
    assert report.verdict(res).startswith("Highest LDS: `head`")  # baselines never "best"
    assert baselines.CLASS_VOXELS in report._rows(res) and report.markdown(_result(True)).count(
        "LDS - baseline") == 0
    report.write_outputs(res, tmp_path)  # the figures draw the baseline's row and its level
    assert (tmp_path / "lds.png").stat().st_size > 0 and (tmp_path / "leave_out.png").exists()


def test_report_markdown_verdict_and_figures(tmp_path):
    sep, tied = _result(True), _result(False)
    assert "separated from every other variant" in report.verdict(sep)
    assert "cannot be told apart" in report.verdict(tied)
    del tied["variants"]["cos"]
    assert report.verdict(tied) == "One variant scored: `head`, LDS +0.30."
    md = report.markdown(sep)
    assert "| `head` | dice head | +0.30 [+0.20, +0.40]" in md
    # the detail table: per-class means (no interval when the bootstrap gave none) and the
    # leave-out changes with their intervals over queries; blank for a variant without them
    assert "| `head` | +0.30 | +0.30 | +0.30 | +0.010 [+0.000, +0.020] | +0.010 [+0.000, +0.020] |" in md
    assert "| `cos` | +0.10 | +0.10 | +0.10 |  |  |  |  |" in md
    assert "top-1: prop. - random, paired [95% CI]" in md
    assert "remove top-1: random [95% CI]" in md
    assert "0.13" in md and "needs --seeds 2" in md
    report.write_outputs(sep, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"evaluation.json", "evaluation.md",
                                                     "lds.png", "leave_out.png"}
    assert json.loads((tmp_path / "evaluation.json").read_text())["variants"]["head"]["mislabel_auc"] == 0.13


def test_evaluate_reads_the_mislabel_auc_by_spec(tmp_path, tiny_run, tiny_influence, monkeypatch):
    """Through run_evaluate (ground truth replaced by random losses: no retraining): the AUC of
    the experiment's gradient with the folder's spec, in evaluation.json and the table; a
    results.json without gradients gives none and one printed line."""
    from pathlib import Path
    from types import SimpleNamespace

    from tracin_jax.evaluate import api
    from tracin_jax.evaluate import ground_truth as gt_mod

    meta = json.loads((Path(tiny_influence) / "meta.json").read_text())
    n_test, n_pat = len(meta["test_ids"]), len(meta["patients"])

    def fake_ground_truth(workdir, *, subsets, fraction, seeds, **kw):
        rng = np.random.default_rng(0)
        arr = rng.normal(size=(subsets, seeds, n_test, 3)).astype(np.float32)
        return SimpleNamespace(masks=rng.random((subsets, n_pat)) < 0.5, dice_loss=arr,
                               ce_loss=arr, path=tmp_path / "gt", meta={})

    monkeypatch.setattr(gt_mod, "compute_ground_truth", fake_ground_truth)
    methods = {"Dice head classwise sum": {"all": {"auc": 0.24}},
               "CE head classwise sum": {"all": {"auc": 0.92}}}
    spec = meta["spec"]
    assert spec["checkpoints"] == [1, 2, 3] and spec["loss"] == "dice"
    new = tmp_path / "results.json"  # another run: epochs 2, 4, 6
    new.write_text(json.dumps({"results": {"slices": {"methods": methods}}, "gradients": {
        "CE head": {"spec": {**spec, "loss": "ce", "checkpoints": [2, 4, 6]}, "last_epoch": 6},
        "Dice head": {"spec": {**spec, "checkpoints": [2, 4, 6]}, "last_epoch": 6}}}))
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"results": {"slices": {"methods": methods}}}))
    name = Path(tiny_influence).name
    for path, row, auc in ((new, "Dice head classwise sum", 0.24), (old, None, None)):
        lines = []
        res = api.run_evaluate(tiny_run, [tiny_influence], tmp_path / path.stem, subsets=4,
                               leave_out_queries=0, randomisation=False, baselines=False,
                               mislabel=path, progress=False, log=lines.append)
        v = res["variants"][name]
        assert (v["mislabel_method"], v["mislabel_auc"]) == (row, auc)
        said = [s for s in lines if "--mislabel" in s]
        md = (tmp_path / path.stem / "evaluation.md").read_text()
        if auc is None:
            assert len(said) == 1 and "old.json" in said[0] and "rerun" in said[0]
        else:
            assert not said and "| 0.24 |" in md
