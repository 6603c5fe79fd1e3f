"""experiments.mislabel and its helpers: label corruptions, ranking metrics, a tiny end-to-end run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import TINY_OVERRIDES, tiny_config  # noqa: E402
from experiments import corruptions as cor  # noqa: E402
from experiments import ranking  # noqa: E402
from experiments import mislabel  # noqa: E402


# -- corruptions on hand-built label maps -------------------------------------------------

def _seg():
    """A 6 x 6 x 2 BraTS-valued map: ED ring, NCR centre, ET rim pixels, background elsewhere."""
    s = np.zeros((6, 6, 2), np.uint8)
    s[1:5, 1:5, :] = 2
    s[2:4, 2:4, :] = 1
    s[2, 1, :] = 4
    s[3, 4, 0] = 4
    return s


def test_swap_ed_ncr_exchanges_exactly_the_two_classes():
    s = _seg()
    out = cor.swap_ed_ncr(s)
    assert np.array_equal(out == 1, s == 2)
    assert np.array_equal(out == 2, s == 1)
    assert np.array_equal(out == 4, s == 4)
    assert np.array_equal(out == 0, s == 0)
    assert np.array_equal(cor.swap_ed_ncr(out), s)  # an involution
    assert out.dtype == s.dtype


def test_drop_enhancing_rim_relabels_et_as_necrosis():
    s = _seg()
    out = cor.drop_enhancing_rim(s)
    assert not (out == 4).any()
    assert np.array_equal(out == 1, (s == 1) | (s == 4))
    assert np.array_equal(out == 2, s == 2)


def test_shift_mask_moves_labels_without_wrapping():
    s = np.zeros((5, 4, 1), np.uint8)
    s[0, 0, 0], s[4, 3, 0], s[2, 1, 0] = 1, 4, 2
    out = cor.shift_mask(s, (1, -1))
    expect = np.zeros_like(s)
    expect[3, 0, 0] = 2  # (2, 1) -> (3, 0)
    # (0, 0) -> (1, -1) and (4, 3) -> (5, 2) fall outside: lost, not wrapped around
    assert np.array_equal(out, expect)
    assert np.array_equal(cor.shift_mask(s, (0, 0)), s)
    assert not cor.shift_mask(s, (9, 0)).any()
    # other axes: the shift applies to the axes named
    t = np.zeros((1, 4, 3), np.uint8)
    t[0, 1, 1] = 2
    assert cor.shift_mask(t, (2, 1), axes=(1, 2))[0, 3, 2] == 2


def test_shift_in_mm_uses_the_voxel_size_of_each_axis():
    assert cor.shift_voxels((8.0, -4.0), (2.0, 1.0, 1.0), (0, 1)) == (4, -4)
    affine = np.diag([-2.0, -2.0, 1.0, 1.0])
    seg = np.zeros((10, 10, 3), np.uint8)
    seg[2, 2, 1] = 1
    c = cor.Corruption(case="x", kind="shift", shift_mm=(4.0, 0.0))
    out = cor.corrupt_volume(seg, c, cor.LabelCodes(), affine)
    assert out[4, 2, 1] == 1 and out.sum() == 1
    assert c.extra["shift_voxels"] == [2, 0]


def test_foreign_mask_and_codes_and_axes():
    s, d = _seg(), np.full((6, 6, 2), 2, np.int16)
    out = cor.foreign_mask(s, d)
    assert out.dtype == s.dtype and (out == 2).all()
    with pytest.raises(ValueError):
        cor.foreign_mask(s, d[:5])
    assert cor.label_codes("brats2018") == cor.LabelCodes(1, 2, 4)
    assert cor.label_codes("brats2023") == cor.LabelCodes(1, 2, 3)
    assert cor.label_codes("msd") == cor.LabelCodes(ncr=2, ed=1, et=3)
    # MSD-coded file: swap exchanges its own values (1 oedema, 2 non-enhancing)
    m = np.array([0, 1, 2, 3])
    assert cor.swap_ed_ncr(m, cor.label_codes("msd")).tolist() == [0, 2, 1, 3]
    assert cor.inplane_axes(np.diag([-1.0, -1.0, 1.0, 1.0])) == (0, 1)
    # array axis 0 runs inferior-superior (third world axis), axes 1 and 2 in-plane
    axial_first = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
    assert cor.inplane_axes(axial_first) == (1, 2)


def test_changed_classes_counts_membership_changes():
    clean = np.array([[[0, 1], [2, 3]], [[2, 2], [0, 0]]], np.uint8)
    bad = np.array([[[0, 2], [1, 3]], [[2, 2], [0, 0]]], np.uint8)
    assert cor.changed_classes(clean, bad).tolist() == [[2, 2, 0], [0, 0, 0]]


# -- ranking metrics -------------------------------------------------------------------------

def test_roc_auc_known_cases():
    y = np.array([0, 0, 1, 1], bool)
    assert ranking.roc_auc([1, 2, 3, 4], y) == 1.0
    assert ranking.roc_auc([4, 3, 2, 1], y) == 0.0
    assert ranking.roc_auc([5, 5, 5, 5], y) == 0.5
    # pairs (pos, neg): (2 vs 1) 1, (2 vs 2) 0.5, (3 vs 1) 1, (3 vs 2) 1 -> 3.5 / 4
    assert ranking.roc_auc([1, 2, 2, 3], np.array([0, 1, 0, 1], bool)) == pytest.approx(0.875)
    assert np.isnan(ranking.roc_auc([1, 2], np.array([1, 1], bool)))
    rng = np.random.default_rng(0)
    s, lab = rng.normal(size=200), rng.random(200) < 0.3
    brute = np.mean([(a > b) + 0.5 * (a == b) for a in s[lab] for b in s[~lab]])
    assert ranking.roc_auc(s, lab) == pytest.approx(brute)


def test_detection_curve_known_cases():
    y = np.array([1, 0, 0, 1, 0], bool)
    x, f = ranking.detection_curve([5, 1, 2, 4, 3], y)  # perfect: both positives first
    assert np.interp(0.4, x, f) == pytest.approx(1.0)
    assert np.interp(0.2, x, f) == pytest.approx(0.5)
    assert ranking.found_at([1, 5, 4, 2, 3], y, 0.6) == pytest.approx(0.0)  # worst: last two
    # all tied: the expected (diagonal) curve
    assert ranking.found_at(np.zeros(5), y, 0.4) == pytest.approx(0.4)
    assert ranking.curve_on_grid(np.zeros(5), y, [0, 0.5, 1]).tolist() == pytest.approx([0, 0.5, 1])
    # ties inside a group are interpolated: one positive among the two tied top items
    assert ranking.found_at([3, 3, 1, 0], np.array([1, 0, 1, 0], bool), 0.25) == pytest.approx(0.25)


def test_rank_agreement_helpers():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert ranking.spearman(a, a ** 3) == pytest.approx(1.0)
    assert ranking.spearman(a, -a) == pytest.approx(-1.0)
    assert np.isnan(ranking.spearman(a, np.ones(4)))
    assert ranking.topk_overlap(a, a, 2) == 1.0
    assert ranking.topk_overlap(a, -a, 2) == 0.0
    assert ranking.topk_overlap(a, [4, 1, 2, 3], 2, largest=False) == 0.5
    q = ranking.quantile_normalise(np.array([[1.0, 5.0], [2.0, 0.0], [3.0, 7.0]]),
                                   np.array([[1, 1], [1, 0], [1, 1]], bool))
    assert np.allclose(q, [[1 / 3, 0.5], [2 / 3, 0.0], [1.0, 1.0]])
    ids, s = ranking.group_scores([1.0, 2.0, 5.0], ["b", "a", "b"], "sum")
    assert ids == ["a", "b"] and s.tolist() == [2.0, 6.0]
    assert ranking.group_scores([1.0, 2.0, 5.0], ["b", "a", "b"], "max")[1].tolist() == [2.0, 5.0]


# -- the plan -----------------------------------------------------------------------------

def test_plan_corrupts_the_fraction_in_turn_and_respects_eligibility():
    patients = [f"p{i:02d}" for i in range(20)]
    presence = {p: np.array([True, True, i % 2 == 0]) for i, p in enumerate(patients)}
    plan = mislabel.plan_corruptions(patients, presence, 0.2, seed=3)
    assert len(plan) == 4
    assert [c.kind for c in plan] == ["swap", "rim", "shift", "foreign"]
    assert len({c.case for c in plan}) == 4
    rim = next(c for c in plan if c.kind == "rim")
    assert presence[rim.case][2]  # only a patient with ET can lose its rim
    shift = next(c for c in plan if c.kind == "shift")
    assert sorted(abs(v) for v in shift.shift_mm) == [0.0, 8.0]
    foreign = next(c for c in plan if c.kind == "foreign")
    assert foreign.donor not in {c.case for c in plan} and foreign.donor != foreign.case
    assert [c.case for c in mislabel.plan_corruptions(patients, presence, 0.2, seed=3)] == [c.case for c in plan]
    with pytest.raises(ValueError):
        mislabel.plan_corruptions(patients[:2], presence, 1.0, seed=0)


def test_corrupted_copy_rewrites_only_the_chosen_segs(tiny_data, tmp_path):
    from tracin_jax.data import discover_cases, load_dataset

    _, cases = discover_cases(tiny_data)
    cfg = tiny_config().data
    clean = load_dataset(tiny_data, cfg, progress=False)
    train = sorted(set(clean.train.cases))
    plan = [cor.Corruption(case=train[0], kind="swap"),
            cor.Corruption(case=train[1], kind="foreign", donor=train[2])]
    out = cor.write_corrupted_dataset(cases, tmp_path / "bad", plan)
    manifest = json.loads((out / cor.MANIFEST).read_text())
    assert [c["case"] for c in manifest["corruptions"]] == [train[0], train[1]]
    for case in cases:
        new = out / "HGG" / case.case_id
        for path in case.files():
            target = new / path.name
            rewritten = path == case.seg and case.case_id in (train[0], train[1])
            assert target.is_symlink() != rewritten
            if rewritten:
                a, b = nib.load(str(path)), nib.load(str(target))
                assert np.allclose(a.affine, b.affine)
                assert a.header.get_data_dtype() == b.header.get_data_dtype()
    donor = np.asarray(nib.load(str(next(c for c in cases if c.case_id == train[2]).seg)).dataobj)
    got = np.asarray(nib.load(str(out / "HGG" / train[1] / f"{train[1]}_seg.nii.gz")).dataobj)
    assert np.array_equal(got, donor)
    bad = load_dataset(out, cfg, progress=False)
    assert bad.train.ids == clean.train.ids
    assert np.array_equal(bad.test.labels, clean.test.labels)
    changed = cor.changed_classes(clean.train.labels, bad.train.labels).sum(axis=1) > 0
    hit = {c for c, ch in zip(clean.train.cases, changed) if ch}
    assert hit <= {train[0], train[1]} and train[0] in hit


# -- end to end -----------------------------------------------------------------------------

def test_mislabel_end_to_end_tiny(tiny_data, tmp_path):
    out = tmp_path / "mislabel"
    args = ["--out", str(out), "--data", str(tiny_data), "--config", "tiny", "--fraction", "0.5",
            "--proj-dim", "64", "--bootstrap", "50", "--batch-size", "2", "--no-progress",
            "--logra-rank", "0", "--adam-subsets", "", "--trak-models", "2"]
    # Adam-aware and LoGra variants are the engine's options, tested in their own files; here
    # they would only add their compilations to the experiment's plumbing.
    for o in [*TINY_OVERRIDES[:-1], "train.epochs=2"]:
        args += ["--set", o]
    assert mislabel.main(args) == 0
    res = json.loads((out / "results.json").read_text())
    for name in ("detection_curves.png", "auc.png", "class_attribution.png", "corruptions.png",
                 "auc_by_checkpoint.png", "summary.md"):
        assert (out / name).stat().st_size > 0
    assert [c["kind"] for c in res["corrupted_patients"]] == ["swap", "rim"]
    train_cases = set(json.loads((out / "run" / "run.json").read_text())["dataset"]["train_cases"])
    assert {c["case"] for c in res["corrupted_patients"]} <= train_cases
    assert res["n_corrupted_slices"] == len(res["corrupted_slices"]) > 0
    methods = res["results"]["slices"]["methods"]
    for m in ("Dice head classwise sum", "Dice head total", "Dice all classwise sum", "CE head classwise sum",
              "loss sum", "loss max-q"):
        auc = methods[m]["all"]["auc"]
        assert 0.0 <= auc <= 1.0
        assert len(methods[m]["all"]["curve"]) == len(res["grid"])
    for m in ("Dice head ekfac classwise sum", "CE head ekfac classwise sum",
              "TRAK head classwise sum"):
        assert 0.0 <= methods[m]["all"]["auc"] <= 1.0, m
    for name, meta in res["influence"].items():
        if name == "TRAK head":  # no train-vs-train tensor: its self-score only
            assert meta["self_influence_vs_diagonal_max_rel_err"] is None
            assert meta["trak_models"] == ["run epoch 2", "seed 1"]
            continue
        assert meta["self_influence_vs_diagonal_max_rel_err"] < 1e-4, name
    assert res["influence"]["Dice head ekfac"]["method"] == "ekfac"
    assert not any("adam" in name or "logra" in name for name in res["influence"])
    # TRAK's self-score is its own, not a TracIn self-influence under another name
    si = {n: np.load(out / f"influence-{n.replace(' ', '-')}" / "self_influence.npy")
          for n in ("TRAK head", "Dice head", "Dice head ekfac")}
    assert not np.allclose(si["TRAK head"], si["Dice head"])
    assert not np.allclose(si["Dice head ekfac"], si["Dice head"])
    assert res["influence"]["Dice all"]["projection"]["dim"] == 64
    assert res["auc_by_checkpoint"]["epochs"] == [1, 2]
    # each gradient's folder spec and the run's last epoch, which `tracin-jax evaluate
    # --mislabel` matches folders against: each folder's spec finds its own gradient
    from tracin_jax.evaluate import sanity

    read = sanity.read_mislabel(out / "results.json")
    assert read.reason is None and [g.name for g in read.gradients] == list(res["influence"])
    for g in read.gradients:
        folder = out / f"influence-{g.name.replace(' ', '-')}"
        spec = json.loads((folder / "meta.json").read_text())["spec"]
        assert spec is not None and g.spec == spec and g.last_epoch == 2, g.name
        assert g.auc == methods[g.row]["all"]["auc"]
        assert sanity.mislabel_match(spec, 2, read.gradients).name == g.name
