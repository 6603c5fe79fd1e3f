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
    return subprocess.run([sys.executable, "-m", "tracin_jax.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


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
def test_bad_config_fails_cleanly_without_writing(tiny_data, tmp_path, args, needle):
    workdir = tmp_path / "w"
    proc = _cli("train", "--data", str(tiny_data), "--workdir", str(workdir), *args)
    assert proc.returncode == 2
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not workdir.exists()


def test_bad_data_fails_cleanly_without_writing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    workdir = tmp_path / "w"
    for data in (empty, tmp_path / "missing"):
        proc = _cli("train", "--data", str(data), "--workdir", str(workdir), "--config", "tiny")
        assert proc.returncode == 2, proc.stderr
        assert str(data) in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert not workdir.exists()


def test_existing_workdir_with_other_config_is_refused(tiny_data, tiny_run):
    with pytest.raises(InputError, match="different config"):
        train_and_evaluate(tiny_config("train.lr=0.1"), tiny_data, tiny_run, progress=False)
