"""3D runs: one example per case volume, through data, training, influence and evaluate.

The synthetic nnU-Net task (2 channels, 4 classes) at 32^3, downsampled 2x to volumes of 16^3;
one tiny 3D U-Net (width 2, depth 1) trained once for the module on whole volumes, and one on
8^3 patches seen through the sliding window. Checked against naive loops: the volume examples
against the 2D slices of the same cases, the sliding window, the per-class counts, the
augmentations, and class-wise TracIn (head and every parameter, exact) against the brute-force
``jax.grad`` loop of :mod:`tracin_jax.influence.reference`.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracin_jax.config import DataConfig, apply_overrides, get_config
from tracin_jax.data import load_dataset, write_synthetic_nnunet
from tracin_jax.data import cache as cache_lib
from tracin_jax.data.synth import NNUNET_DIR
from tracin_jax.errors import InputError
from tracin_jax.influence.reference import brute_force_tracin
from tracin_jax.influence.subsets import resolve_subset
from tracin_jax.models import build_model
from tracin_jax.training import augment
from tracin_jax.training.losses import hard_dice_counts, tumour_dice_loss
from tracin_jax.training.train import init_variables
from tracin_jax.training.window import SlidingWindow, window_starts, windows

SIDE = 32  # synthetic volumes 32^3, downsampled 2x: the model sees 16^3
CASES = 6  # 4 training and 2 test volumes with the default split
CLASSES = ("CSF", "grey matter", "white matter", "lesion")
TINY3D = ["model.dims=3", "model.width=2", "model.depth=1", "data.downsample=2",
          "train.batch_size=2", "train.epochs=2"]
SILENT = dict(progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def data3d(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nnunet3d")
    write_synthetic_nnunet(out, cases=CASES, seed=0, progress=False, shape=(SIDE,) * 3)
    return out / NNUNET_DIR


def _config(*extra: str):
    return apply_overrides(get_config("tiny"), [*TINY3D, *extra])


def _train(data3d: Path, workdir: Path, *extra: str):
    from tracin_jax.training.train import train_and_evaluate

    train_and_evaluate(_config(*extra), data3d, workdir, **SILENT)
    from tracin_jax.run import load_run

    return load_run(workdir)


@pytest.fixture(scope="module")
def run3d(data3d, tmp_path_factory):
    """The tiny 3D run on whole volumes, 2 epochs (2 checkpoints)."""
    return _train(data3d, tmp_path_factory.mktemp("run3d") / "run")


@pytest.fixture(scope="module")
def patch_run(data3d, tmp_path_factory):
    """The tiny 3D run on 8^3 patches with every 3D augmentation, 1 epoch; its sliding window
    tiles each 16^3 volume with 8 windows (no overlap: test_sliding_window_... checks the
    averaging)."""
    return _train(data3d, tmp_path_factory.mktemp("patch") / "run", "train.epochs=1",
                  "data.patch=8,8,8", "data.patch_overlap=0", "train.augment_flip=true",
                  "train.augment_intensity=0.1")


# ------------------------------------------------------------------------------------- data


def test_volumes_are_the_cases_and_their_slices_the_2d_examples(data3d):
    cfg = DataConfig()
    vol = load_dataset(data3d, cfg, cache_dir=False, progress=False, dims=3)
    flat = load_dataset(data3d, cfg, cache_dir=False, progress=False)
    assert tuple(vol.info["config"]["volume"]) == (SIDE,) * 3 and vol.info["task"]["dims"] == 3
    assert vol.train.images.shape == (4, SIDE, SIDE, SIDE, 2)
    assert vol.train.labels.shape == (4, SIDE, SIDE, SIDE) and vol.train.labels.dtype == np.uint8
    assert vol.train.ids == vol.train.cases and len(set(vol.train.ids)) == 4
    assert set(vol.test.ids) == set(flat.test.cases)
    # the 2D example of slice z of a case is slice z of its volume (the same window in-plane)
    assert flat.train.images.shape[1:3] == (SIDE, SIDE)
    for n, (cid, z) in enumerate(i.split("/z") for i in flat.train.ids):
        k = vol.train.ids.index(cid)
        np.testing.assert_array_equal(vol.train.images[k, :, :, int(z)], flat.train.images[n])
        np.testing.assert_array_equal(vol.train.labels[k, :, :, int(z)], flat.train.labels[n])
    # downsampling by 2 on all three axes: images mean-pooled, labels the centre-ish voxel
    small = load_dataset(data3d, DataConfig(downsample=2), cache_dir=False, progress=False,
                         dims=3)
    x = vol.train.images[0]
    pooled = x.reshape(16, 2, 16, 2, 16, 2, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(small.train.images[0], pooled, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(small.train.labels[0], vol.train.labels[0][1::2, 1::2, 1::2])


def test_cache_keys_tell_slices_from_volumes(data3d, tmp_path):
    cfg = DataConfig(downsample=2)
    assert cache_lib.cache_key(data3d, [], cfg, 2) != cache_lib.cache_key(data3d, [], cfg, 3)
    first = load_dataset(data3d, cfg, cache_dir=tmp_path, progress=False, dims=3)
    flat = load_dataset(data3d, cfg, cache_dir=tmp_path, progress=False)
    again = load_dataset(data3d, cfg, cache_dir=tmp_path, progress=False, dims=3)
    assert not first.info["cache_hit"] and not flat.info["cache_hit"] and again.info["cache_hit"]
    assert first.info["cache_file"] != flat.info["cache_file"]
    assert again.train.images.shape == (4, 16, 16, 16, 2) and flat.train.images.ndim == 4
    np.testing.assert_array_equal(again.train.images, first.train.images)


# -------------------------------------------------------------- windows, counts, augmentation


@pytest.mark.parametrize("n,p,overlap", [(16, 8, 0.5), (12, 8, 0.5), (8, 8, 0.5), (40, 16, 0.0),
                                         (17, 4, 0.25)])
def test_window_starts_cover_the_axis_evenly(n, p, overlap):
    starts = window_starts(n, p, overlap)
    assert starts[0] == 0 and starts[-1] == n - p and list(starts) == sorted(set(starts))
    steps = np.diff(starts)
    assert (steps <= max(1, int(p * (1 - overlap)))).all()
    assert len(steps) == 0 or steps.max() - steps.min() <= 1  # evenly spread
    covered = np.zeros(n, int)
    for s in starts:
        covered[s:s + p] += 1
    assert covered.min() >= 1


def test_sliding_window_is_the_mean_of_the_windows():
    cfg = apply_overrides(get_config("tiny"), ["model.dims=3", "model.width=2", "model.depth=1"])
    net = build_model(cfg.model)
    model = SlidingWindow(net, (8, 8, 4), 0.5, "head", 3)
    shape = (16, 12, 8)
    variables = init_variables(net, jax.random.key(0), (*shape, 2))
    assert jax.tree.structure(init_variables(model, jax.random.key(0), (*shape, 2))) == \
        jax.tree.structure(variables)  # the same variables tree: checkpoints load into both
    x = jax.random.normal(jax.random.key(1), (2, *shape, 2))
    logits, feats = model.apply(variables, x, return_features=True)
    want_l, want_f = np.zeros(logits.shape), np.zeros(feats.shape)
    count = np.zeros(shape)
    apply = jax.jit(partial(net.apply, return_features=True))
    for w in windows(shape, (8, 8, 4), 0.5):
        lo, fe = apply(variables, x[(slice(None), *w)])
        want_l[(slice(None), *w)] += np.asarray(lo)
        want_f[(slice(None), *w)] += np.asarray(fe)
        count[w] += 1
    assert count.min() >= 1 and count.max() > 1  # the windows overlap
    np.testing.assert_allclose(logits, want_l / count[None, ..., None], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats, want_f / count[None, ..., None], rtol=1e-5, atol=1e-6)
    # the head is 1x1x1: averaged logits are the head of the averaged features
    head = variables["params"]["head"]
    np.testing.assert_allclose(logits, feats @ head["kernel"][0, 0, 0] + head["bias"],
                               rtol=1e-5, atol=1e-6)


def test_hard_dice_counts_of_volumes_match_a_loop():
    rng = np.random.default_rng(0)
    pred, labels = rng.integers(0, 5, (2, 3, 4, 5, 6)), rng.integers(0, 5, (2, 3, 4, 5, 6))
    got = np.asarray(hard_dice_counts(jnp.asarray(pred), jnp.asarray(labels), 5))
    for k in range(5):
        assert got[0, k] == np.sum((pred == k) & (labels == k))
        assert got[1, k] == np.sum(pred == k) and got[2, k] == np.sum(labels == k)


def test_3d_augmentations_match_their_definition():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 6, 5, 4, 2)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 5, (4, 6, 5, 4)))
    key = jax.random.key(3)
    fx, fy = augment.random_flips(key, x, y)
    flips = np.asarray(jax.random.bernoulli(key, 0.5, (3, 4)))
    assert flips.any() and not flips.all()
    for b in range(4):
        want_x, want_y = np.asarray(x[b]), np.asarray(y[b])
        for axis in range(3):
            if flips[axis, b]:
                want_x, want_y = np.flip(want_x, axis), np.flip(want_y, axis)
        np.testing.assert_array_equal(fx[b], want_x)
        np.testing.assert_array_equal(fy[b], want_y)
    jx = np.asarray(augment.random_intensity(key, x, 0.2))
    for b in range(4):
        for c in range(2):  # one scale and one shift per example and channel, within range
            scale, shift = np.polyfit(np.asarray(x[b, ..., c]).ravel(), jx[b, ..., c].ravel(), 1)
            assert abs(scale - 1) <= 0.2 + 1e-4 and abs(shift) <= 0.2 + 1e-4
    px, py = augment.random_patch(key, x, y, (4, 3, 4))
    assert px.shape == (4, 4, 3, 4, 2) and py.shape == (4, 4, 3, 4)
    for b in range(4):  # each patch is a window of its own volume, images and labels alike
        hits = [(i, j) for i in range(3) for j in range(3)
                if np.array_equal(np.asarray(x[b, i:i + 4, j:j + 3]), np.asarray(px[b]))]
        assert len(hits) == 1
        i, j = hits[0]
        np.testing.assert_array_equal(py[b], y[b, i:i + 4, j:j + 3])
    np.testing.assert_array_equal(augment.random_patch(key, x, y, (4, 3, 4))[0], px)  # seeded


# ------------------------------------------------------------------ train, influence, evaluate


def _reference(run, params: str):
    shapes = jax.eval_shape(lambda: init_variables(run.model, jax.random.key(0), run.image_shape))
    subset = resolve_subset(shapes["params"], params, head="head")
    loss = partial(tumour_dice_loss, eps=run.config.train.dice_eps)
    return brute_force_tracin(run.model, subset, run.checkpoints, run.train.images,
                              run.train.labels, run.test.images, run.test.labels, loss)


def _relative(got, want) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def test_3d_run_trains_on_volumes_and_records_them(run3d):
    assert run3d.dims == 3 and run3d.task.dims == 3
    assert run3d.train.images.shape == (4, 16, 16, 16, 2) and run3d.image_shape == (16, 16, 16, 2)
    assert run3d.config.data.volume == (SIDE,) * 3  # chosen and recorded
    assert [c.epoch for c in run3d.checkpoints] == [1, 2]
    lines = [json.loads(l) for l in (run3d.workdir / "metrics.jsonl").read_text().splitlines()]
    assert set(lines[-1]["test_dice"]) == set(CLASSES)
    logits = run3d.apply(run3d.checkpoints[-1].variables, run3d.test.images)
    assert logits.shape == (2, 16, 16, 16, 5)


@pytest.mark.parametrize("params,proj", [("head", None), ("all", 0)])
def test_3d_influence_matches_the_brute_force_loop(run3d, tmp_path, params, proj):
    from tracin_jax.influence import run_influence

    meta = run_influence(run3d.workdir, tmp_path / params, params=params, proj_dim=proj,
                         batch_size=2, progress=False)  # one compiled batch shape
    scores = np.load(tmp_path / params / "scores.npy")
    assert scores.shape == (2, 4, 4, 4)  # [n_test volumes, C, n_train volumes, C]
    want, want_self = _reference(run3d, params)
    assert _relative(scores, want) <= 1e-5
    assert _relative(np.load(tmp_path / params / "self_influence.npy"), want_self) <= 1e-5
    # one volume per patient: the patient sums are the volume scores
    assert meta["patients"] == run3d.train.ids
    np.testing.assert_allclose(np.load(tmp_path / params / "patient_scores.npy"), scores,
                               rtol=1e-6, atol=0)


def test_evaluate_retrains_3d_models(run3d, tmp_path):
    from tracin_jax.evaluate.api import run_evaluate
    from tracin_jax.influence import run_influence

    run_influence(run3d.workdir, tmp_path / "head", params="head", progress=False)
    result = run_evaluate(run3d.workdir, [tmp_path / "head"], tmp_path / "eval", small=True,
                          subsets=4, leave_out_queries=0, baselines=False, randomisation=False,
                          workers=1, progress=False, log=lambda *_: None)
    table = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert result and table["task"]["dims"] == 3 and table["class_names"] == list(CLASSES)
    lds = table["variants"]["head"]["lds"]
    assert set(lds["per_class"]) == set(CLASSES) and np.isfinite(lds["mean"])
    assert table["ground_truth"]


def test_patches_train_and_the_window_sees_whole_volumes(patch_run, tmp_path):
    from tracin_jax.influence import run_influence

    assert isinstance(patch_run.model, SlidingWindow) and patch_run.model.window == (8, 8, 8)
    variables = patch_run.checkpoints[-1].variables
    logits = np.asarray(patch_run.apply(variables, patch_run.test.images))
    assert logits.shape == (2, 16, 16, 16, 5)
    # the recorded test Dice is the sliding window's
    counts = np.asarray(hard_dice_counts(jnp.asarray(logits.argmax(-1)),
                                         jnp.asarray(patch_run.test.labels, jnp.int32), 5))
    line = json.loads((patch_run.workdir / "metrics.jsonl").read_text().splitlines()[-1])
    for k, name in enumerate(patch_run.task.classes, start=1):
        if counts[2, k]:
            assert line["test_dice"][name] == pytest.approx(
                2 * counts[0, k] / (counts[1, k] + counts[2, k]), abs=1e-6)
    run_influence(patch_run.workdir, tmp_path / "head", params="head", progress=False)
    want, _ = _reference(patch_run, "head")
    assert _relative(np.load(tmp_path / "head" / "scores.npy"), want) <= 1e-5
    for kw, what in ((dict(params="all", proj_kind="logra", proj_dim=2), "LoGra"),
                     (dict(method="ekfac", params="head"), "EK-FAC")):
        with pytest.raises(InputError, match=what) as err:
            run_influence(patch_run.workdir, tmp_path / what, progress=False, **kw)
        assert "\n" not in str(err.value) and not (tmp_path / what).exists()


# --------------------------------------------------------------------------------- bad input


from conftest import cli_in_process as _main  # noqa: E402


@pytest.mark.parametrize("sets,needle", [
    (["data.patch=32,32,32"], "data.patch=32,32,32 is larger than the volume 16x16x16"),
    (["data.slices=0:8"], "data.slices is for slices"),
    (["data.crop=0,32,0,32"], "data.crop is for slices"),
    (["train.augment_resize_crop=true"], "train.augment_resize_crop"),
    (["data.patch=5,5,5"], "data.patch 5x5x5 is not divisible by 2**model.depth=2"),
    (["model.dims=2", "data.patch=8,8,8"], "data.patch=8,8,8 is for volumes"),
    (["data.volume=30,30,30"], "must divide data.volume=30,30,30"),
])
def test_bad_3d_options_are_one_line_and_write_nothing(data3d, tmp_path, capsys, sets, needle):
    args = ["train", "--data", data3d, "--workdir", tmp_path / "w", "--config", "tiny"]
    for s in [*TINY3D, "data.downsample=4" if "volume" in sets[0] else "data.downsample=2", *sets]:
        args += ["--set", s]
    rc, err = _main(capsys, *args)
    assert rc == 2 and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "w").exists()


def test_a_2d_only_architecture_refuses_3d(capsys, tmp_path):
    from tracin_jax.models import registry
    from tracin_jax.models.unet import build_unet

    registry.register_architecture("flat_only_net", build_unet)
    try:
        with pytest.raises(InputError, match="no 3D version"):
            apply_overrides(get_config("tiny"), ["model.arch=flat_only_net", "model.dims=3"])
    finally:
        registry.ARCHITECTURES.pop("flat_only_net")
        registry.ARCHITECTURE_DIMS.pop("flat_only_net")


def test_demo_dims_is_2_or_3(capsys, tmp_path):
    rc, err = _main(capsys, "demo", "--dims", "4", "--workdir", tmp_path / "d")
    assert rc == 2 and "--dims 4" in err and err.count("\n") == 1
    assert not (tmp_path / "d").exists()


def test_a_killed_patch_run_resumes_to_the_weights_of_an_uninterrupted_one(data3d, tmp_path):
    """Random patches, flips and intensity jitter are drawn per step from the run's seed, so a
    patch-trained run killed mid-epoch and resumed trains the same steps as one never killed."""
    import os
    import subprocess
    import sys

    from tracin_jax import checkpoints

    extra = ("train.epochs=2", "data.patch=8,8,8", "data.patch_overlap=0",
             "train.augment_flip=true", "train.augment_intensity=0.1")
    whole = _train(data3d, tmp_path / "whole", *extra)
    killed = tmp_path / "killed"
    sets = [a for o in ("model.dims=3", *TINY3D[1:], *extra) for a in ("--set", o)]
    n_steps = -(-len(whole.train.ids) // 2)  # batches of 2
    proc = subprocess.run(
        [sys.executable, "-m", "tracin_jax.cli", "train", "--data", str(data3d), "--workdir",
         str(killed), "--config", "tiny", *sets], capture_output=True, text=True, timeout=600,
        env={**os.environ, "TRACIN_JAX_KILL_AT_STEP": str(n_steps + 1)})  # one step into epoch 2
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert checkpoints.list_epochs(killed) == [1]
    resumed = _train(data3d, killed, *extra)
    assert [c.epoch for c in resumed.checkpoints] == [1, 2]
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 resumed.checkpoints[-1].variables, whole.checkpoints[-1].variables)


def test_the_3d_demo_runs_end_to_end(capsys, tmp_path):
    """``tracin-jax demo --dims 3`` at a tiny size: the synthetic nnU-Net task, a 3D run, head
    influence and the report, with the task's classes carried to the end."""
    workdir = tmp_path / "demo3d"
    rc, err = _main(capsys, "demo", "--dims", "3", "--cases", "5", "--workdir", workdir,
                    "--set", "data.downsample=3", "--set", "model.width=2", "--set",
                    "model.depth=1", "--set", "train.epochs=1", "--set", "train.batch_size=2")
    assert rc == 0, err
    run = json.loads((workdir / "run" / "run.json").read_text())
    assert run["task"]["dims"] == 3 and tuple(run["task"]["classes"]) == CLASSES
    meta = json.loads((workdir / "influence" / "meta.json").read_text())
    assert tuple(meta["class_names"]) == CLASSES
    assert np.load(workdir / "influence" / "patient_scores.npy").shape[:2] == (meta["n_test"], 4)
    page = (workdir / "report" / "index.html").read_text()
    assert all(c in page for c in CLASSES) and "volume" in page
