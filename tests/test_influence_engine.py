"""``run_influence`` on a trained tiny run: files, values, the default store, and bad input."""

import json
import shutil

import numpy as np
import pytest

import tracin_jax
from tracin_jax.errors import InputError
from tracin_jax.influence import make_class_grad_fn, normalised, resolve_subset, run_influence
from tracin_jax.influence.reference import brute_force_tracin


@pytest.fixture(scope="module")
def head_out(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("influence") / "head"
    store = out.parent / "store"
    meta = run_influence(tiny_run, out, checkpoints="1,3", params="head", batch_size=4,
                         chunk_size=5, topk=3, progress=False, store_dir=store)
    return meta, out


def test_head_influence_matches_brute_force(tiny_run, head_out):
    meta, out = head_out
    run = tracin_jax.load_run(tiny_run)
    train, test = run.train, run.test
    scores = np.load(out / "scores.npy")
    assert scores.shape == (len(test.ids), 3, len(train.ids), 3)
    ckpts = [run.checkpoint(1), run.checkpoint(3)]
    subset = resolve_subset(ckpts[0].variables["params"], "head")
    assert subset.size == run.config.model.width * 4
    want, want_self = brute_force_tracin(run.model, subset, ckpts, train.images, train.labels,
                                         test.images, test.labels)
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(np.load(out / "self_influence.npy"), want_self, rtol=1e-5,
                               atol=1e-5 * np.abs(want_self).max())
    assert meta["checkpoints"] == [{"epoch": 1, "lr": ckpts[0].lr}, {"epoch": 3, "lr": ckpts[1].lr}]
    assert meta["train_ids"] == list(train.ids) and meta["test_ids"] == list(test.ids)
    assert meta["train_cases"] == list(train.cases)
    assert meta["patients"] == sorted(set(train.cases))
    assert meta["params"]["size"] == subset.size and meta["params"]["name"] == "head"
    present = np.load(out / "test_present.npy")
    np.testing.assert_array_equal(present, np.stack(
        [(test.labels == c).reshape(len(test.ids), -1).any(1) for c in (1, 2, 3)], axis=1))
    assert np.load(out / "patient_scores.npy").shape == (len(test.ids), 3, len(meta["patients"]), 3)
    assert np.load(out / "topk_proponents_indices.npy").shape == (len(test.ids), 3, 3, 3)
    t = meta["timings"]
    assert t["train_features"]["examples_computed"] == 2 * len(train.ids)
    assert {"load_s", "features_s", "scores_s", "write_s", "total_s"} <= set(t)


def test_meta_is_readable_by_the_explain_stage(tiny_run, head_out):
    from tracin_jax.influence.folder import load_influence

    run = tracin_jax.load_run(tiny_run)
    infl = load_influence(head_out[1], test_ids=run.test.ids, train_ids=run.train.ids,
                          train_cases=run.train.cases)
    assert infl.topk is not None and infl.scores is not None


def test_default_store_under_the_workdir_and_a_swapped_gradient(tiny_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run, workdir, ignore=shutil.ignore_patterns("features"))
    meta = run_influence(workdir, tmp_path / "a", checkpoints=[2], proj_dim=8, progress=False)
    stores = sorted(p.name for p in (workdir / "features").iterdir())
    assert len(stores) == 1 and stores[0].startswith("head-countsketch8-seed0-")
    assert meta["projection"] == {"dim": 8, "seed": 0, "kind": "countsketch"}
    assert meta["gradient"]["feature_dim"] == 8
    # Same setting again: every training chunk comes from the store.
    again = run_influence(workdir, tmp_path / "b", checkpoints=[2], proj_dim=8, progress=False)
    assert again["timings"]["train_features"]["chunks_computed"] == 0
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "scores.npy"),
                                  np.load(tmp_path / "b" / "scores.npy"))
    # A notebook swaps the gradient (cosine TracIn); its features get their own store.
    run = tracin_jax.load_run(workdir)
    subset = resolve_subset(run.checkpoints[0].variables["params"], "head")
    fn = normalised(make_class_grad_fn(run.model, subset))
    meta = run_influence(workdir, tmp_path / "c", checkpoints=[2], grad_fn=fn, split="train",
                         progress=False)
    assert len(list((workdir / "features").iterdir())) == 2
    assert meta["gradient"]["tag"].startswith("normalised(")
    si = np.load(tmp_path / "c" / "self_influence.npy")
    present = np.load(tmp_path / "c" / "train_present.npy")
    np.testing.assert_allclose(si[present], run.checkpoint(2).lr, rtol=1e-4)  # eta * |unit|^2


def test_cross_entropy_and_normalised_gradients_from_the_command_line(tiny_run, tmp_path):
    """`--loss ce --normalised`: cosine TracIn of region cross-entropy gradients, own store."""
    import subprocess
    import sys

    workdir = tmp_path / "run"
    shutil.copytree(tiny_run, workdir, ignore=shutil.ignore_patterns("features"))
    cmd = [sys.executable, "-m", "tracin_jax.cli", "influence", "--workdir", str(workdir),
           "--checkpoints", "3", "--split", "train", "--loss", "ce", "--normalised"]
    proc = subprocess.run(cmd + ["--out", str(tmp_path / "ce")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "ce" / "meta.json").read_text())
    assert meta["gradient"]["tag"].startswith("normalised(tumour_cross_entropy|head|exact")
    si = np.load(tmp_path / "ce" / "self_influence.npy")
    present = np.load(tmp_path / "ce" / "train_present.npy")
    lr = tracin_jax.load_run(workdir).checkpoint(3).lr
    np.testing.assert_allclose(si[present], lr, rtol=1e-4)  # eta * |unit vector|^2
    bad = subprocess.run(cmd[:-3] + ["--loss", "hinge", "--out", str(tmp_path / "bad")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--loss 'hinge'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def _no_checkpoints(tiny_run, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_run / "config.json", bare / "config.json")
    return bare


BAD = [
    ("no checkpoints", lambda w, t: (_no_checkpoints(w, t), {}), "no checkpoints"),
    ("not a folder", lambda w, t: (t / "missing", {}), "not a folder"),
    ("unknown subset", lambda w, t: (w, {"params": "bogus"}), "'bogus'"),
    ("missing epoch", lambda w, t: (w, {"checkpoints": "1,7"}), "epoch 7.*available: 1, 2, 3"),
    ("bad epoch", lambda w, t: (w, {"checkpoints": "1,x"}), "'x' is not an epoch"),
    ("bad split", lambda w, t: (w, {"split": "valid"}), "--split 'valid'"),
    ("bad topk", lambda w, t: (w, {"topk": 0}), "--topk"),
    ("bad batch", lambda w, t: (w, {"batch_size": 0}), "--batch-size"),
    ("bad budget", lambda w, t: (w, {"memory_budget_gb": -1}), "--memory-budget-gb"),
    ("bad proj", lambda w, t: (w, {"proj_dim": -4}), "--proj-dim"),
    ("bad proj kind", lambda w, t: (w, {"proj_dim": 8, "proj_kind": "fjlt"}), "kind 'fjlt'"),
    ("bad loss", lambda w, t: (w, {"loss": "focal"}), "--loss 'focal'.*dice, ce"),
]


@pytest.mark.parametrize("case,make,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_input_error(tiny_run, tmp_path, case, make, match):
    workdir, kwargs = make(tiny_run, tmp_path)
    with pytest.raises(InputError, match=match) as e:
        run_influence(workdir, tmp_path / "out", progress=False, store_dir=tmp_path / "s", **kwargs)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_empty_split_is_an_input_error(tiny_run, tmp_path, monkeypatch):
    from tracin_jax.data.dataset import Examples
    from tracin_jax.run import Run

    monkeypatch.setattr(Run, "test", property(lambda self: Examples.empty(*self.image_shape)))
    with pytest.raises(InputError, match="test split has no slices") as e:
        run_influence(tiny_run, tmp_path / "out", progress=False, store_dir=tmp_path / "s")
    assert "\n" not in str(e.value)
