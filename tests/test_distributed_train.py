"""Data-parallel training: two JAX processes (gloo CPU collectives, one device each) train the
same model as one device, and a checkpoint written with one process count resumes with another.

Reference runs are the session's `tiny_run` (one process, one device) or one trained here; the
weights agree to float reassociation (the gradient and BatchNorm sums are split over devices).
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import tracin_jax
from tracin_jax import checkpoints
from tracin_jax.errors import InputError
from tracin_jax.training import parallel
from tracin_jax.training.train import train_and_evaluate

from conftest import TINY_OVERRIDES, tiny_config

# Float reassociation only, which training then amplifies: the reference trains on all cores,
# the two processes on one each, and XLA's CPU reductions round differently with the thread
# count (docs/scale-out.md). After 3 epochs the largest difference was below 1e-6 on one CPU
# model and up to 1.9e-4 on another; a wrong reduction (a batch counted twice or not at all)
# moves weights by about the learning rate (3e-3) per step.
RTOL, ATOL = 1e-4, 1e-3
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(data, workdir, overrides=TINY_OVERRIDES) -> list[str]:
    sets = [a for o in overrides for a in ("--set", o)]
    return ["train", "--data", str(data), "--workdir", str(workdir), "--config", "tiny", *sets]


def _two_processes(args, logs, env_of=lambda rank: {}) -> tuple[list[int], list[str]]:
    """Runs ``tracin-jax ARGS`` as processes 0 and 1 of a 2-process JAX cluster on this machine;
    returns their exit statuses and outputs. Output goes to files (a full pipe would block one
    process inside a collective that the other waits on)."""
    address = f"127.0.0.1:{_free_port()}"
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(rank), **env_of(rank)}
        with open(logs / f"process{rank}.log", "w") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "tracin_jax.cli", *args],
                                          env=env, stdout=out, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return codes, [(logs / f"process{rank}.log").read_text() for rank in (0, 1)]


def _metrics(workdir) -> dict[int, dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len({r["epoch"] for r in records}) == len(records), "an epoch logged twice"
    return {r["epoch"]: r for r in records}


def _assert_same_training(a, b, epochs) -> None:
    """Checkpoints (step, lr, variables) and metric lines of ``epochs`` agree between runs."""
    ca = {c.epoch: c for c in tracin_jax.load_run(a).checkpoints}
    cb = {c.epoch: c for c in tracin_jax.load_run(b).checkpoints}
    ma, mb = _metrics(a), _metrics(b)
    for e in epochs:
        assert (ca[e].step, ca[e].lr) == (cb[e].step, cb[e].lr)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL),
                     ca[e].variables, cb[e].variables)
        x, y = ma[e], mb[e]
        assert (x["step"], x["lr"]) == (y["step"], y["lr"])
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
        assert x["test_loss"] == pytest.approx(y["test_loss"], rel=1e-5)
        # Hard Dice: a voxel whose two best logits tie to float precision may flip class.
        for key in ("train_dice", "test_dice"):
            assert x[key] == pytest.approx(y[key], abs=1e-2)
        for key in ("train_fp_voxels", "test_fp_voxels"):
            assert x[key] == pytest.approx(y[key], abs=2)


def test_two_processes_train_like_one_and_their_checkpoint_resumes_in_one(
        tiny_data, tiny_run, tmp_path):
    """Two processes train from scratch (both preprocessing into the same fresh data cache) and
    process 0 is SIGKILLed one step into epoch 3; then one process resumes the workdir."""
    workdir, cache = tmp_path / "run", tmp_path / "cache"
    n_steps = -(-len(tracin_jax.load_run(tiny_run).train.ids) // 4)

    def env_of(rank):
        kill = {"TRACIN_JAX_KILL_AT_STEP": str(2 * n_steps + 1)} if rank == 0 else {}
        return {"TRACIN_JAX_CACHE": str(cache), **kill}

    codes, outs = _two_processes(_train_args(tiny_data, workdir), tmp_path, env_of)
    assert all(c != 0 for c in codes), outs
    assert checkpoints.list_epochs(workdir) == [1, 2], outs
    assert list(_metrics(workdir)) == [1, 2]  # one writer: no line twice
    # Both wrote the cache at the same time: one complete file, no temporary left.
    names = [p.name for p in cache.iterdir() if "brats" in p.name]
    assert len(names) == 1 and names[0].startswith("brats-") and names[0].endswith(".npz"), names
    _assert_same_training(workdir, tiny_run, [1, 2])

    train_and_evaluate(tiny_config(), tiny_data, workdir, progress=False, log=lambda s: None)
    assert checkpoints.list_epochs(workdir) == [1, 2, 3]
    _assert_same_training(workdir, tiny_run, [1, 2, 3])


def test_batch_size_must_split_over_the_devices():
    parallel.check_batch_size(4, 1)
    parallel.check_batch_size(8, 4)
    with pytest.raises(InputError) as e:
        parallel.check_batch_size(10, 4)
    msg = str(e.value)
    assert "train.batch_size=10" in msg and "4 devices" in msg and "\n" not in msg
    assert [parallel.eval_batch_size(b, d) for b, d in ((4, 1), (4, 3), (20, 8), (32, 2))] == \
        [16, 18, 24, 32]


def test_one_device_batches_are_split_on_the_data_axis():
    mesh = parallel.data_mesh(jax.devices()[:1])
    for size in (1, 3, 4):
        assert parallel.batch_sharding(mesh, size).spec == jax.sharding.PartitionSpec("data")
    images, labels = parallel.put_batch(mesh, np.zeros((3, 2, 2, 1), np.float32),
                                        np.ones((3, 2, 2), np.uint8))
    assert labels.dtype == np.int32 and images.shape == (3, 2, 2, 1)
    key = parallel.put_key(jax.random.key(7), mesh)
    assert jax.random.key_data(key).tolist() == jax.random.key_data(jax.random.key(7)).tolist()
