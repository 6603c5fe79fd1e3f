import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import tracin_jax
from tracin_jax import checkpoints
from tracin_jax.errors import InputError
from tracin_jax.training.train import train_and_evaluate

from conftest import TINY_OVERRIDES, tiny_config


def _metrics(workdir):
    return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_logs_every_epoch(tiny_run):
    m = _metrics(tiny_run)
    assert [r["epoch"] for r in m] == [1, 2, 3]
    assert m[-1]["train_loss"] < m[0]["train_loss"]
    for r in m:
        assert set(r["train_dice"]) == {"NCR/NET", "ED", "ET"} and set(r["test_dice"]) == {"NCR/NET", "ED", "ET"}
        assert r["lr"] == pytest.approx(3e-3, rel=1e-6)


def test_a_checkpoint_per_epoch_with_step_and_applied_lr(tiny_run):
    assert checkpoints.list_epochs(tiny_run) == [1, 2, 3]
    run = tracin_jax.load_run(tiny_run)
    steps_per_epoch = -(-len(run.train.ids) // run.config.train.batch_size)
    assert [(c.epoch, c.step) for c in run.checkpoints] == [(e, e * steps_per_epoch) for e in (1, 2, 3)]
    assert all(c.lr == pytest.approx(3e-3, rel=1e-6) for c in run.checkpoints)
    # Epochs differ (training moved the weights) and load the same way twice.
    a = run.checkpoints[0].variables["params"]["head"]["kernel"]
    b = run.checkpoints[-1].variables["params"]["head"]["kernel"]
    assert not np.allclose(a, b)
    again = tracin_jax.load_run(tiny_run).checkpoints[-1].variables["params"]["head"]["kernel"]
    np.testing.assert_array_equal(b, again)


def test_load_run_gives_apply_loss_and_examples(tiny_run):
    run = tracin_jax.load_run(tiny_run)
    x, y = run.test.images[:2], run.test.labels[:2]
    logits = run.apply(run.checkpoints[-1].variables, x)
    assert logits.shape == (*x.shape[:3], 4)
    assert run.classwise_loss(logits, y).shape == (2, 3)
    _, feats = run.features(run.checkpoints[-1].variables, x)
    assert feats.shape == (*x.shape[:3], run.config.model.width)
    assert len(run.train.ids) == len(run.train.images) and all("/z" in i for i in run.train.ids)
    assert not set(run.train.cases) & set(run.test.cases)  # patient-level split


def test_checkpoint_round_trip_keeps_values_and_lr(tmp_path):
    variables = {"params": {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3)}, "batch_stats": {"m": np.ones(3, np.float32)}}
    opt = {"mu": np.zeros(3, np.float32)}
    checkpoints.save_checkpoint(tmp_path, 7, variables, opt, {"step": 70, "lr": 1.5e-4})
    assert checkpoints.list_epochs(tmp_path) == [7]
    assert checkpoints.load_meta(tmp_path, 7) == {"epoch": 7, "step": 70, "lr": 1.5e-4}
    back = checkpoints.load_variables(tmp_path, 7, variables)
    np.testing.assert_array_equal(back["params"]["w"], variables["params"]["w"])
    with pytest.raises(InputError, match="no checkpoint for epoch 3"):
        checkpoints.load_variables(tmp_path, 3, variables)


def _cli(*args, env=None):
    """The real entry point in a new process (for what only a process shows: SIGKILL)."""
    return subprocess.run([sys.executable, "-m", "tracin_jax.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


from conftest import cli_in_process as _main  # noqa: E402


def test_sigkill_mid_epoch_keeps_checkpoints_and_resume_matches(tiny_data, tiny_run, tmp_path):
    workdir = tmp_path / "killed"
    sets = [a for o in TINY_OVERRIDES for a in ("--set", o)]
    n_steps = -(-len(tracin_jax.load_run(tiny_run).train.ids) // 4)
    kill_at = 2 * n_steps + 1  # one step into epoch 3
    proc = _cli("train", "--data", str(tiny_data), "--workdir", str(workdir), "--config", "tiny", *sets,
                env={"TRACIN_JAX_KILL_AT_STEP": str(kill_at)})
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert checkpoints.list_epochs(workdir) == [1, 2]
    assert [r["epoch"] for r in _metrics(workdir)] == [1, 2]
    # Resume: finishes epoch 3 and matches the uninterrupted run.
    train_and_evaluate(tiny_config(), tiny_data, workdir, progress=False, log=lambda s: None)
    assert checkpoints.list_epochs(workdir) == [1, 2, 3]
    assert [r["epoch"] for r in _metrics(workdir)] == [1, 2, 3]
    a = tracin_jax.load_run(workdir).checkpoints[-1].variables
    b = tracin_jax.load_run(tiny_run).checkpoints[-1].variables
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)


@pytest.mark.parametrize("args, needle", [
    (["--set", "train.epoch=2"], "config key 'train.epoch' does not exist"),
    (["--config", "huge"], "unknown config 'huge'"),
    (["--set", "model.width=abc"], "model.width='abc'"),
])
def test_bad_config_fails_cleanly_without_writing(tiny_data, tmp_path, args, needle, capsys):
    workdir = tmp_path / "w"
    rc, err = _main(capsys, "train", "--data", tiny_data, "--workdir", workdir, *args)
    assert rc == 2
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not workdir.exists()


def test_bad_data_fails_cleanly_without_writing(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    workdir = tmp_path / "w"
    for data in (empty, tmp_path / "missing"):
        rc, err = _main(capsys, "train", "--data", data, "--workdir", workdir, "--config", "tiny")
        assert rc == 2, err
        assert str(data) in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
        assert not workdir.exists()
    # The installed entry point exits with the same status and line.
    proc = _cli("train", "--data", str(data), "--workdir", str(workdir), "--config", "tiny")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [err.strip()]


def test_existing_workdir_with_other_config_is_refused(tiny_data, tiny_run):
    with pytest.raises(InputError, match="different config"):
        train_and_evaluate(tiny_config("train.lr=0.1"), tiny_data, tiny_run, progress=False)


def test_train_says_what_it_does_before_each_long_step(tiny_data, tmp_path):
    lines = []
    train_and_evaluate(tiny_config("train.epochs=1"), tiny_data, tmp_path / "w", progress=False,
                       log=lines.append)
    starts = [next(i for i, l in enumerate(lines) if l.startswith(p))
              for p in ("loading data", "initialising the U-Net", "compiling the train step", "epoch 1:")]
    assert starts == sorted(starts)
    assert any(l.startswith("initialised ") and l.endswith("s]") for l in lines)
    assert any(l.startswith("compiled the train step") and l.endswith("s]") for l in lines)


def test_absent_classes_are_warned_about_by_name():
    from types import SimpleNamespace

    from tracin_jax.data.dataset import class_slice_counts
    from tracin_jax.training.train import absent_class_warnings

    labels = np.zeros((3, 4, 4), int)
    labels[0, 0, 0], labels[1, 1, 1] = 2, 2
    labels[2, 2, 2] = 1
    assert class_slice_counts(labels) == {"NCR/NET": 1, "ED": 2, "ET": 0}
    split = lambda lab: SimpleNamespace(labels=lab)  # noqa: E731
    ds = SimpleNamespace(info={}, train=split(labels), test=split(labels[:2]))
    warn = absent_class_warnings(ds)
    assert len(warn) == 2 and all("\n" not in w for w in warn)
    assert "no train slice contains ET" in warn[0]
    assert "no test slice contains NCR/NET, ET" in warn[1] and "--set data.slices=tumour" in warn[1]
    # The loader's counts are used where it gives them.
    ds.info = {"class_slices": {"train": {"NCR/NET": 1, "ED": 1, "ET": 1},
                                "test": {"NCR/NET": 1, "ED": 1, "ET": 1}}}
    assert absent_class_warnings(ds) == []


def test_dice_of_a_class_absent_from_the_truth_is_always_undefined():
    from tracin_jax.training.train import _format_metrics, evaluate

    labels = np.zeros((2, 4, 4), np.int32)
    labels[:, :2] = 2  # ED only
    for pred in (2, 3):  # no ET predicted / 8 false-positive ET voxels
        def eval_step(variables, images, lab, pred=pred):
            from tracin_jax.training.losses import hard_dice_counts
            p = np.where(np.asarray(lab) == 2, 2, 0)
            p[:, 3, :] = pred if pred == 3 else 0
            return hard_dice_counts(p, lab), 0.0

        ev = evaluate(eval_step, None, np.zeros((2, 4, 4, 1)), labels, 2)
        assert ev["dice"] == {"NCR/NET": None, "ED": 1.0, "ET": None}
        assert ev["fp_voxels"] == {"NCR/NET": 0, "ET": 0 if pred == 2 else 8}
        line = _format_metrics({"epoch": 1, "train_loss": 0.5, "lr": 1e-3, "epoch_time_s": 1.0,
                                "train_dice": ev["dice"], "test_dice": ev["dice"],
                                "train_fp_voxels": {}, "test_fp_voxels": ev["fp_voxels"]})
        assert "test Dice [NCR/NET=- ED=1.000 ET=-" in line


def test_non_finite_loss_stops_with_one_line_and_keeps_earlier_checkpoints(tiny_data, tmp_path, monkeypatch):
    from tracin_jax.training import train as train_mod

    real = train_mod.make_train_step
    calls = []

    def nan_after_first_epoch(*args, **kwargs):
        step = real(*args, **kwargs)

        def wrapped(*a):
            calls.append(1)
            variables, opt, loss = step(*a)
            return variables, opt, loss * np.nan if len(calls) > n_batches else loss
        return wrapped

    workdir = tmp_path / "w"
    config = tiny_config("train.epochs=2")
    from tracin_jax.data import load_dataset

    n_batches = -(-len(load_dataset(tiny_data, config.data, progress=False).train.ids) // 4)
    monkeypatch.setattr(train_mod, "make_train_step", nan_after_first_epoch)
    with pytest.raises(InputError) as e:
        train_and_evaluate(config, tiny_data, workdir, progress=False, log=lambda s: None)
    msg = str(e.value)
    assert f"at epoch 2, step {n_batches + 1}" in msg and "lower lr" in msg and "\n" not in msg
    assert checkpoints.list_epochs(workdir) == [1]
    assert [r["epoch"] for r in _metrics(workdir)] == [1]


def test_cli_diverging_lr_exits_2_without_a_checkpoint(tiny_data, tmp_path, capsys):
    workdir = tmp_path / "w"
    sets = [a for o in [*TINY_OVERRIDES, "train.epochs=1", "train.lr=1e30"] for a in ("--set", o)]
    rc, stderr = _main(capsys, "train", "--data", tiny_data, "--workdir", workdir, "--config", "tiny", *sets)
    assert rc == 2, stderr[-2000:]
    err = stderr.strip().splitlines()[-1]  # after the progress bars
    assert err.startswith("tracin-jax: error: training loss became") and "Traceback" not in stderr
    assert "epoch 1, step" in err and "lower lr" in err
    assert checkpoints.list_epochs(workdir) == []


def test_finished_workdir_keeps_its_data_and_split(tiny_data, tiny_run, tmp_path):
    import shutil

    from tracin_jax.data import write_synthetic_dataset
    from conftest import TINY_SHAPE

    workdir = tmp_path / "run"
    shutil.copytree(tiny_run, workdir)
    run_json = (workdir / "run.json").read_bytes()
    # Nothing changed: "already trained", run.json untouched.
    lines = []
    train_and_evaluate(tiny_config(), tiny_data, workdir, progress=False, log=lines.append)
    assert any("already trained" in l for l in lines)
    assert (workdir / "run.json").read_bytes() == run_json
    # Other data (another split): refused, run.json untouched.
    other = tmp_path / "other"
    write_synthetic_dataset(other, cases=5, seed=1, progress=False, shape=TINY_SHAPE)
    with pytest.raises(InputError, match="different train split") as e:
        train_and_evaluate(tiny_config(), other, workdir, progress=False, log=lambda s: None)
    assert "\n" not in str(e.value) and str(tiny_data.resolve()) in str(e.value)
    assert (workdir / "run.json").read_bytes() == run_json
    # The same data moved elsewhere: accepted, run.json points to the new folder.
    moved = tmp_path / "moved"
    shutil.copytree(tiny_data, moved)
    train_and_evaluate(tiny_config(), moved, workdir, progress=False, log=lambda s: None)
    new = json.loads((workdir / "run.json").read_text())
    assert new["data_dir"] == str(moved.resolve())
    assert new["train_ids"] == json.loads(run_json)["train_ids"]
