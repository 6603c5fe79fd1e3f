"""Several JAX processes: influence on 2 local CPU processes equals 1 process, resumes after one
process is killed, and a cluster that cannot form gives one line and exit 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tracin_jax.influence import run_influence
from tracin_jax.launch import free_port

VARIANTS = {  # name: (CLI flags, run_influence arguments)
    "head": ([], {}),
    "all-countsketch": (["--params", "all", "--proj-dim", "64"], {"params": "all", "proj_dim": 64}),
    "logra": (["--params", "all", "--proj-kind", "logra", "--proj-dim", "2"],
              {"params": "all", "proj_kind": "logra", "proj_dim": 2}),
}
CHUNK = 4  # 16 training slices -> 4 chunks, shared by the processes
FILES = ("scores.npy", "self_influence.npy", "patient_scores.npy")


def _cli(*args, env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "tracin_jax.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def _launch(n, *args, env=None):
    return _cli("launch", "-n", str(n), "--", *args, env=env)


@pytest.fixture(scope="module")
def run_dir(tiny_run, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dist") / "run"
    shutil.copytree(tiny_run, workdir)
    return workdir


@pytest.fixture(scope="module")
def references(run_dir, tmp_path_factory):
    """One process's influence folders, one per variant (their own stores)."""
    root = tmp_path_factory.mktemp("dist-ref")
    out = {}
    for name, (_, kwargs) in VARIANTS.items():
        out[name] = root / name
        run_influence(run_dir, out[name], chunk_size=CHUNK, batch_size=4, progress=False,
                      store_dir=root / f"store-{name}", **kwargs)
    return out


def _same(a, b, rtol=1e-6):
    for name in FILES:
        x, y = np.load(a / name), np.load(b / name)
        assert x.shape == y.shape, name
        scale = max(float(np.abs(x).max()), 1e-30)
        assert float(np.abs(x - y).max()) <= rtol * scale, name


@pytest.mark.parametrize("variant", ["all-countsketch", "logra"])  # head: the test below
def test_two_processes_equal_one(run_dir, references, tmp_path, variant):
    flags, _ = VARIANTS[variant]
    out = tmp_path / "two"
    proc = _launch(2, "influence", "--workdir", str(run_dir), "--out", str(out),
                   "--chunk-size", str(CHUNK), "--batch-size", "4", *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same(references[variant], out)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["process_count"] == 2 and meta["device_count"] == 2
    # Each process computed its own share of the 4 chunks x 3 checkpoints: process 0 two per
    # checkpoint (its timings are the ones recorded).
    assert meta["timings"]["train_features"]["chunks_computed"] == 6
    assert "[1] influence written" not in proc.stdout  # only process 0 prints results
    assert "[0] influence written" in proc.stdout


def test_killed_process_resumes_to_the_same_scores(run_dir, references, tmp_path):
    out = tmp_path / "two"
    # Chunks of 5 (a store of its own): 4 chunks, process 1 is killed after its first.
    args = ("influence", "--workdir", str(run_dir), "--out", str(out), "--chunk-size", "5",
            "--batch-size", "4", "--params", "head")
    proc = _launch(2, *args, env={"TRACIN_JAX_KILL_AFTER_CHUNKS": "1", "TRACIN_JAX_KILL_RANK": "1"})
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("tracin-jax: error: process 1 of 2 exited with status 137"), last
    assert "killed by signal 9" in last
    assert not (out / "meta.json").exists()
    proc = _launch(2, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["process_count"] == 2
    assert meta["timings"]["train_features"]["chunks_reused"] >= 1  # kept from before the kill
    assert "[0] influence written" in proc.stdout and "[1] influence written" not in proc.stdout
    _same(references["head"], out)


def _one_line(proc):
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def test_unreachable_coordinator_is_one_line(tmp_path):
    env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}", "JAX_NUM_PROCESSES": "2",
           "JAX_PROCESS_ID": "1", "TRACIN_JAX_COORDINATOR_TIMEOUT": "2"}
    line = _one_line(_cli("influence", "--workdir", str(tmp_path), "--out", str(tmp_path / "o"),
                          env=env, timeout=60))
    assert "no coordinator answered within 2 s" in line and env["JAX_COORDINATOR_ADDRESS"] in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("env, needle", [
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "JAX_PROCESS_ID=2 is outside [0, 2)"),
    ({"JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID is not"),
    ({"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "not integers"),
])
def test_bad_cluster_settings_are_one_line(monkeypatch, env, needle):
    from tracin_jax.distributed import env_settings
    from tracin_jax.errors import InputError

    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", f"127.0.0.1:{free_port()}")
    for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(InputError) as e:
        env_settings()
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_cluster_setting_on_the_command_line(tmp_path):
    # The same check as above, through a stage: one line, exit 2, nothing written.
    env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}", "JAX_NUM_PROCESSES": "2",
           "JAX_PROCESS_ID": "2"}
    line = _one_line(_cli("train", "--data", str(tmp_path), "--workdir", str(tmp_path / "w"),
                          env=env, timeout=60))
    assert "JAX_PROCESS_ID=2 is outside [0, 2)" in line, line
    assert not (tmp_path / "w").exists()


def test_same_process_id_twice_is_one_line_each(run_dir, tmp_path):
    # A real stage (so that the cluster is still up when the second process 1 registers).
    address = f"127.0.0.1:{free_port()}"
    base = {**os.environ, "JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2",
            "TRACIN_JAX_COORDINATOR_TIMEOUT": "10", "TRACIN_JAX_HEARTBEAT_TIMEOUT": "3"}
    args = [sys.executable, "-m", "tracin_jax.cli", "influence", "--workdir", str(run_dir),
            "--out", str(tmp_path / "o"), "--loss", "ce", "--chunk-size", "3"]
    procs = [subprocess.Popen(args, env={**base, "JAX_PROCESS_ID": i}, stderr=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, text=True) for i in ("0", "1", "1")]
    outs = [p.communicate(timeout=120)[1] for p in procs]
    for p, err in zip(procs, outs):
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert p.returncode == 2 and len(lines) == 1, err[-2000:]
        assert lines[0].startswith("tracin-jax: error:"), lines[0]
    assert any("same JAX_PROCESS_ID" in err for err in outs), outs
    assert not (tmp_path / "o" / "meta.json").exists()
