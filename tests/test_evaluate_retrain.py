"""Retraining on patient subsets and the cached ground truth (tiny run; a few models each)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from tracin_jax.errors import InputError
from tracin_jax.evaluate import ground_truth as gt
from tracin_jax.evaluate import retrain


@pytest.fixture(scope="module")
def run(tiny_run):
    from tracin_jax import load_run

    return load_run(tiny_run)


def _max_diff(a, b) -> float:
    diffs = jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
    return max(jax.tree_util.tree_leaves(diffs))


def test_patient_subsets_sized_seeded():
    masks = retrain.patient_subsets(10, 64, 0.5, seed=3)
    assert masks.shape == (64, 10) and masks.dtype == bool
    assert (masks.sum(1) == 5).all()
    np.testing.assert_array_equal(masks, retrain.patient_subsets(10, 64, 0.5, seed=3))
    assert not np.array_equal(masks, retrain.patient_subsets(10, 64, 0.5, seed=4))
    assert len({m.tobytes() for m in masks}) > 32  # not one subset repeated
    assert (retrain.patient_subsets(10, 4, 0.01, 0).sum(1) == 1).all()
    assert (retrain.patient_subsets(10, 4, 0.99, 0).sum(1) == 9).all()
    for bad in [(10, 0, 0.5), (10, 4, 0.0), (10, 4, 1.0), (1, 4, 0.5)]:
        with pytest.raises(InputError):
            retrain.patient_subsets(*bad, seed=0)


def test_schedule_full_batches_wrap_within_epoch():
    examples = np.array([2, 5, 6, 9, 11, 12, 20])
    steps = retrain.model_schedule(examples, seed=1, epochs=2, batch_size=3)
    assert [(e, b) for e, b, _ in steps] == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    assert all(len(i) == 3 and (np.diff(i) >= 0).all() for _, _, i in steps)
    first = np.concatenate([i for e, _, i in steps if e == 1])
    assert set(first) == set(examples)  # each slice once, plus 2 wrapped from the epoch's start
    from tracin_jax.training.train import epoch_order

    order = examples[epoch_order(7, 1, 1)]
    np.testing.assert_array_equal(steps[2][2], np.sort([order[6], order[0], order[1]]))


def test_schedule_with_matched_steps_goes_on_into_further_epochs():
    examples = np.array([2, 5, 6, 9, 11, 12, 20])
    by_epochs = retrain.model_schedule(examples, seed=1, epochs=2, batch_size=3)
    for n in (4, 6, 8):
        steps = retrain.model_schedule(examples, seed=1, epochs=2, batch_size=3, n_steps=n)
        assert len(steps) == n
        shared = min(n, len(by_epochs))
        assert [(e, b) for e, b, _ in steps[:shared]] == [(e, b) for e, b, _ in by_epochs[:shared]]
        for (_, _, i), (_, _, j) in zip(steps[:shared], by_epochs[:shared]):
            np.testing.assert_array_equal(i, j)
    assert [(e, b) for e, b, _ in steps[6:]] == [(3, 0), (3, 1)]  # a third epoch, cut short
    with pytest.raises(InputError, match="at least one step"):
        retrain.model_schedule(examples, seed=1, epochs=2, batch_size=3, n_steps=0)


def test_all_patients_reproduce_the_base_run(run):
    """Full mask + the run's seed: the retrained model is the run's last checkpoint."""
    patients, _ = retrain.run_patients(run)
    assert len(run.train.images) % run.config.train.batch_size == 0  # no wrapped batch
    variables = retrain.train_models(run, np.ones((1, len(patients)), bool),
                                     [run.config.train.seed], mode="sequential", progress=False)
    assert _max_diff(retrain.unstack(variables, 0), run.checkpoints[-1].variables) < 1e-6


def test_vmap_equals_sequential(run):
    patients, _ = retrain.run_patients(run)
    masks = np.zeros((2, len(patients)), bool)
    masks[0, :2] = True
    masks[1, 1:] = True  # more patients: more steps, so model 0 is frozen at the end
    seeds = [5, 6]
    seq = retrain.train_models(run, masks, seeds, mode="sequential", progress=False)
    vm = retrain.train_models(run, masks, seeds, mode="vmap", progress=False)
    assert _max_diff(seq, vm) < 1e-4
    for k in range(2):
        a = retrain.test_outputs(run, retrain.unstack(seq, k))
        b = retrain.test_outputs(run, retrain.unstack(vm, k))
        for name in ("dice_loss", "ce_loss"):
            np.testing.assert_allclose(a[name], b[name], atol=1e-4)
    # different subsets give different models
    assert _max_diff(retrain.unstack(seq, 0), retrain.unstack(seq, 1)) > 1e-3


def test_test_outputs_are_the_influence_losses(run):
    import jax.numpy as jnp

    from tracin_jax.training.losses import tumour_cross_entropy

    variables = run.checkpoints[-1].variables
    out = retrain.test_outputs(run, variables, batch_size=3)
    n = len(run.test.images)
    assert out["dice_loss"].shape == (n, 3) and out["ce_loss"].shape == (n, 3)
    assert out["dice"].shape == (3,) and out["dice"].dtype == np.float32
    logits = run.apply(variables, jnp.asarray(run.test.images))
    np.testing.assert_allclose(out["dice_loss"], run.classwise_loss(logits, run.test.labels), atol=1e-5)
    np.testing.assert_allclose(out["ce_loss"], tumour_cross_entropy(logits, jnp.asarray(run.test.labels, jnp.int32)), atol=1e-5)
    metrics = [json.loads(l) for l in (run.workdir / "metrics.jsonl").read_text().splitlines()]
    expected = [np.nan if v is None else v for v in metrics[-1]["test_dice"].values()]
    np.testing.assert_allclose(out["dice"], expected, atol=1e-5)


def _ground_truth_in_subprocess(workdir: Path, env_extra: dict) -> subprocess.CompletedProcess:
    code = ("import sys; from tracin_jax.evaluate.ground_truth import compute_ground_truth; "
            "compute_ground_truth(sys.argv[1], subsets=2, mode='sequential', progress=False)")
    return subprocess.run([sys.executable, "-c", code, str(workdir)], capture_output=True, text=True,
                          env={**os.environ, **env_extra}, timeout=600)


def test_ground_truth_resumes_after_sigkill(tiny_run, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    shutil.copytree(tiny_run, whole)
    shutil.copytree(tiny_run, killed)
    proc = _ground_truth_in_subprocess(killed, {"TRACIN_JAX_KILL_AFTER_UNITS": "1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    (folder,) = (killed / gt.GROUND_TRUTH_DIR).iterdir()
    assert len(list((folder / "units").glob("*.npz"))) == 1
    assert not (folder / "meta.json").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in (folder / "units").glob("*.npz")}

    resumed = gt.compute_ground_truth(killed, subsets=2, mode="sequential", progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (folder / "units").glob("*.npz")
            if p.name in stamps} == stamps  # finished models were not redone
    fresh = gt.compute_ground_truth(whole, subsets=2, mode="sequential", progress=False)
    assert resumed.path.name == fresh.path.name
    m, p = 2, len(resumed.patients)
    n_test = len(resumed.test_ids)
    assert resumed.masks.shape == (m, p)
    assert resumed.dice_loss.shape == resumed.ce_loss.shape == (m, 1, n_test, 3)
    assert resumed.dice.shape == (m, 1, 3)
    for name in gt.ARRAYS:
        np.testing.assert_array_equal(getattr(resumed, name), getattr(fresh, name))
    assert np.isfinite(resumed.dice_loss).all()
    assert np.ptp(resumed.dice_loss, axis=0).max() > 1e-4  # subsets give different losses
    again = gt.compute_ground_truth(whole, subsets=2, mode="sequential", progress=False)
    assert again.meta == fresh.meta
    np.testing.assert_array_equal(again.dice_loss, fresh.dice_loss)
    # another setting never reuses these models
    from tracin_jax import load_run

    other = gt.ground_truth_settings(load_run(whole), subsets=m, fraction=0.5, seeds=1, seed=1)
    assert gt._digest(other) != fresh.path.name


def _fake_run(tmp_path, cases):
    from tracin_jax.config import get_config

    return SimpleNamespace(config=get_config("tiny"), workdir=tmp_path,
                           train=SimpleNamespace(cases=cases, ids=[f"{c}/z{i}" for i, c in enumerate(cases)]),
                           test=SimpleNamespace(ids=["t/z0"]))


@pytest.mark.parametrize("kwargs, needle", [
    ({"subsets": 1}, "--subsets 1"),
    ({"fraction": 1.0}, "--fraction 1.0"),
    ({"fraction": 0.0}, "--fraction 0.0"),
    ({"seeds": 0}, "--seeds 0"),
    ({"mode": "fast"}, "'fast'"),
])
def test_ground_truth_bad_settings(tmp_path, kwargs, needle):
    with pytest.raises(InputError, match=needle):
        gt.compute_ground_truth(_fake_run(tmp_path, ["a", "b", "c", "d"]), **kwargs)
    assert not (tmp_path / gt.GROUND_TRUTH_DIR).exists()


def test_too_few_patients(tmp_path):
    with pytest.raises(InputError, match="3 training patients"):
        gt.compute_ground_truth(_fake_run(tmp_path, ["a", "a", "b", "c"]))
    assert not (tmp_path / gt.GROUND_TRUTH_DIR).exists()


def test_retrain_without_cached_and_checked(run):
    patients, _ = retrain.run_patients(run)
    with pytest.raises(InputError, match="'nobody'"):
        gt.retrain_without(run, ["nobody"], seed=0, progress=False)
    with pytest.raises(InputError, match=f"removing {len(patients)} patients"):
        gt.retrain_without(run, patients, seed=0, progress=False)
    out = gt.retrain_without(run, [patients[1]], seed=3, mode="sequential", progress=False)
    folder = run.workdir / gt.GROUND_TRUTH_DIR / gt.LEAVE_OUT_DIR
    (cached,) = folder.glob("*.npz")
    stamp = cached.stat().st_mtime_ns
    mask = np.ones((1, len(patients)), bool)
    mask[0, 1] = False
    expected = retrain.test_outputs(run, retrain.unstack(
        retrain.train_models(run, mask, [3], mode="sequential", progress=False), 0))
    for name in ("dice_loss", "ce_loss", "dice"):
        np.testing.assert_array_equal(out[name], expected[name])
    (again,) = gt.retrain_without_many(run, [[patients[1]]], seed=3, progress=False)
    assert cached.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(again["dice_loss"], out["dice_loss"])

    # Matched steps: as many steps as on all patients, cached under its own key; the full-data
    # model is the same file under both rules.
    assert gt.leave_out_path(run, [patients[1]], 3, "matched") != cached
    assert gt.leave_out_path(run, [], 3, "matched") == gt.leave_out_path(run, [], 3)
    timings: dict = {}
    retrain.train_models(run, mask, [3], mode="sequential", progress=False, steps="matched",
                         timings=timings)
    full = retrain.full_data_steps(run)
    assert timings["n_steps"] + 1 == full  # the first step is timed apart
    kept = int(mask[0][retrain.run_patients(run)[1]].sum())
    assert full > run.config.train.epochs * -(-kept // run.config.train.batch_size)
    matched = gt.retrain_without(run, [patients[1]], seed=3, mode="sequential", progress=False,
                                 steps="matched")
    assert str(matched["steps"]) == "matched" and str(out["steps"]) == "epochs"
    assert not np.array_equal(matched["dice_loss"], out["dice_loss"])
    assert len(list(folder.glob("*.npz"))) == 2
    with pytest.raises(InputError, match="--leave-out-steps 'many'"):
        gt.retrain_without(run, [patients[1]], seed=3, progress=False, steps="many")
    shutil.rmtree(folder)


def test_more_seeds_reuse_the_models_of_fewer(tiny_run, tmp_path, monkeypatch):
    """--seeds 2 after --seeds 1: the seed-0 models are reused (same numbers), only seed 1 trains."""
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run, workdir, ignore=shutil.ignore_patterns("features", "ground_truth"))
    one = gt.compute_ground_truth(workdir, subsets=2, seeds=1, mode="sequential", progress=False)
    trained = []
    real = gt.train_models

    def counting(run, masks, seeds, **kw):
        trained.extend(seeds)
        return real(run, masks, seeds, **kw)

    monkeypatch.setattr(gt, "train_models", counting)
    two = gt.compute_ground_truth(workdir, subsets=2, seeds=2, mode="sequential", progress=False)
    assert two.path != one.path
    assert trained == [gt.training_seeds(0, 2)[1]] * 2  # two subsets, the new seed only
    np.testing.assert_array_equal(two.masks, one.masks)
    for name in ("dice_loss", "ce_loss", "dice"):
        np.testing.assert_array_equal(getattr(two, name)[:, :1], getattr(one, name))
    assert np.abs(two.dice_loss[:, 1] - two.dice_loss[:, 0]).max() > 1e-6


def test_cache_key_of_a_unet_run_predates_model_arch():
    """Ground truths cached before `model.arch` existed stay valid for U-Net runs; another
    architecture never shares their models."""
    from tracin_jax.config import apply_overrides, get_config

    unet = gt.config_identity(get_config("demo"))
    assert "arch" not in unet["model"] and unet["model"]["width"] == 8
    other = gt.config_identity(apply_overrides(get_config("demo"), ["model.arch=resunet"]))
    assert other["model"]["arch"] == "resunet"
    assert gt._digest(other) != gt._digest(unet)
