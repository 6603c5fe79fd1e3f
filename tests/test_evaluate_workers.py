"""The retrainings of `tracin-jax evaluate` shared out over processes: unit claims, a job array of
`--worker` runs (one killed mid-way) then `--score-only`, `--workers 2` against `--workers 1`,
and the one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tracin_jax.cli import main
from tracin_jax.errors import InputError
from tracin_jax.evaluate import ground_truth as gt
from tracin_jax.evaluate import workers

# Two subsets, one leave-out query at k = 1, no baseline: 2 ground-truth and <= 4 leave-out models.
SETTINGS = ["--small", "--subsets", "2", "--no-baseline", "--no-randomisation"]
CPUS = sorted(os.sched_getaffinity(0))
ROOT = Path(__file__).resolve().parents[1]
# A CLI process pinned to the CPUs given as its first argument: XLA sizes its thread pool to
# them, and models are bit for bit the same between processes with as many cores.
PINNED = ("import json, os, sys; cpus = json.loads(sys.argv[1]); os.sched_setaffinity(0, cpus); "
          "from tracin_jax.cli import main; sys.exit(main(sys.argv[2:]))")


def _popen(args, cpus, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PINNED, json.dumps(list(cpus)), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**workers.worker_env(on_cpu=True), **env})


def _cli(args, cpus, **env) -> tuple[subprocess.Popen, str, str]:
    p = _popen(args, cpus, **env)
    out, err = p.communicate(timeout=600)
    return p, out, err


def _copy(tiny_run, dst: Path) -> Path:
    shutil.copytree(tiny_run, dst, ignore=shutil.ignore_patterns(gt.GROUND_TRUTH_DIR))
    return dst


def _command(work: Path, influence, out: Path) -> list:
    return ["evaluate", "--workdir", work, "--influence", influence, "--out", out, *SETTINGS]


def _units(work: Path) -> dict[str, dict]:
    """{path under ground_truth/: the unit file's arrays, mtime and trainer}."""
    root = work / gt.GROUND_TRUTH_DIR
    found = {}
    for f in sorted(root.glob("*/units/*.npz")) + sorted(root.glob(f"{gt.LEAVE_OUT_DIR}/*.npz")):
        with np.load(f) as z:
            found[str(f.relative_to(root))] = {
                "mtime": f.stat().st_mtime_ns, "worker": str(z["worker"]),
                **{k: z[k] for k in ("dice_loss", "ce_loss", "dice")}}
    return found


def _numbers(result):
    """evaluation.json without what names folders or measures time."""
    if isinstance(result, dict):
        return {k: _numbers(v) for k, v in result.items()
                if k not in ("seconds", "path", "workdir", "retraining")}
    if isinstance(result, list):
        return [_numbers(v) for v in result]
    return result


def _same_models(units: dict, reference: dict) -> None:
    assert sorted(units) == sorted(reference)
    for name, u in units.items():
        for k in ("dice_loss", "ce_loss", "dice"):
            np.testing.assert_array_equal(u[k], reference[name][k], err_msg=f"{name} {k}")


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def reference(tiny_run, tiny_influence, tmp_path_factory):
    """The single-process evaluation (`--workers 1`, pinned to one core): its numbers and models."""
    root = tmp_path_factory.mktemp("workers_reference")
    work = _copy(tiny_run, root / "run")
    p, _, err = _cli([*_command(work, tiny_influence, root / "eval"), "--workers", "1"], CPUS[:1])
    assert p.returncode == 0, err[-2000:]
    result = json.loads((root / "eval" / "evaluation.json").read_text())
    units = _units(work)
    assert len(units) >= 4 and len({u["worker"] for u in units.values()}) == 1
    return SimpleNamespace(result=result, units=units)


# -- claims -----------------------------------------------------------------------------------


CLAIM_AND_DIE = ("import os, sys; from tracin_jax.evaluate.workers import try_claim; "
                 "c = try_claim(sys.argv[1]); print('claimed' if c else 'busy', flush=True); "
                 "os.kill(os.getpid(), 9) if sys.argv[2] == 'die' else None")


def test_two_claimers_one_wins_and_release_frees(tmp_path):
    result = tmp_path / "m0000_r00.npz"
    first = workers.try_claim(result)
    assert first is not None and workers.claim_path(result).exists()
    assert str(os.getpid()) in workers.claim_path(result).read_text()
    assert workers.try_claim(result) is None  # another claim in this process
    other = subprocess.run([sys.executable, "-c", CLAIM_AND_DIE, str(result), "live"],
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert other.stdout.strip() == "busy"  # another process
    first.release()
    first.release()  # idempotent
    assert not workers.claim_path(result).exists()
    again = workers.try_claim(result)
    assert again is not None
    again.release()


def test_a_killed_holders_claim_is_taken_over(tmp_path):
    result = tmp_path / "m0001_r00.npz"
    dead = subprocess.Popen([sys.executable, "-c", CLAIM_AND_DIE, str(result), "die"],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    stdout, _ = dead.communicate(timeout=60)
    assert dead.returncode == -9 and stdout.strip() == "claimed"
    stale = workers.claim_path(result)
    assert stale.exists()  # left behind, locked by nobody
    lines = []
    claim = workers.try_claim(result, log=lines.append)
    assert claim is not None and claim.held
    assert len(lines) == 1 and "taking over the stale claim" in lines[0]
    assert f"pid {dead.pid} on " in lines[0]
    assert str(os.getpid()) in stale.read_text()
    claim.release()


def test_a_finished_unit_is_never_claimed(tmp_path):
    result = tmp_path / "m0002_r00.npz"
    result.write_bytes(b"done")
    assert workers.try_claim(result) is None
    assert not workers.claim_path(result).exists()


def _fake_training(monkeypatch, trained: list) -> SimpleNamespace:
    """train_units without JAX training: a model's outputs are its seed."""
    def train_models(run, masks, seeds, **kw):
        trained.extend(seeds)
        return list(seeds)

    monkeypatch.setattr(gt, "train_models", train_models)
    monkeypatch.setattr(gt, "unstack", lambda v, k: v[k])
    monkeypatch.setattr(gt, "test_outputs",
                        lambda run, s: {"dice_loss": np.full((2, 3), s, np.float32)})
    return SimpleNamespace()


def test_train_units_waits_for_claimed_units_and_takes_over_freed_ones(tmp_path, monkeypatch):
    trained: list = []
    run = _fake_training(monkeypatch, trained)
    units = [gt.Unit(tmp_path / f"u{i}.npz", np.ones(4, bool), i, "epochs", f"u{i}")
             for i in range(3)]
    peer = workers.try_claim(units[1].path)  # held by "another worker"
    lines: list = []
    done: dict = {}
    t = threading.Thread(target=lambda: done.update(n=gt.train_units(
        run, units, mode="sequential", poll_s=0.02, log=lines.append)))
    t.start()
    deadline = time.monotonic() + 30
    while not (units[0].done and units[2].done) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    assert t.is_alive() and not units[1].done and trained == [0, 2]  # waiting, not training it
    os.close(peer._fd)  # the peer dies: its lock goes, its claim file stays
    peer._fd = None
    t.join(timeout=30)
    assert not t.is_alive() and done["n"] == 3 and trained == [0, 2, 1]
    assert [ln for ln in lines if ln.startswith("waiting for 1 model")] and \
        [ln for ln in lines if "taking over the stale claim" in ln]
    with np.load(units[1].path) as z:
        assert float(z["dice_loss"][0, 0]) == 1.0 and str(os.getpid()) in str(z["worker"])
    assert not any(workers.claim_path(u.path).exists() for u in units)
    assert gt.train_units(run, units, mode="sequential") == 0  # nothing left: trains nothing


def test_a_failing_worker_stops_the_others_with_its_message(tmp_path):
    # The first worker to start sleeps; the second fails with an input error.
    script = ("import os, sys, time\n"
              "try:\n    os.close(os.open(sys.argv[1], os.O_CREAT | os.O_EXCL))\n"
              "except FileExistsError:\n"
              "    print('tracin-jax: error: --influence x: not a folder', file=sys.stderr)\n"
              "    sys.exit(2)\n"
              "time.sleep(120)\n")
    t0 = time.monotonic()
    with pytest.raises(InputError, match=r"^worker [01] of 2: --influence x: not a folder$"):
        workers.run_workers([sys.executable, "-c", script, str(tmp_path / "first")], 2,
                            [tmp_path / "u.npz"], progress=False, poll_s=0.05)
    assert time.monotonic() - t0 < 60  # the sleeper was stopped
    kill = "import os; os.kill(os.getpid(), 9)"
    with pytest.raises(workers.WorkerFailed, match=r"exited with signal 9 \(SIGKILL\); stopped "
                       "the other 1"):
        workers.run_workers([sys.executable, "-c", kill], 2, [tmp_path / "u.npz"],
                            progress=False, poll_s=0.05)


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--workers", "0"], "--workers 0: must be at least 1"),
    (["--workers", "-2"], "--workers -2: must be at least 1"),
    (["--worker", "--score-only"], "--worker trains and --score-only never trains"),
])
def test_bad_sharing_one_line_exit_2(capsys, tmp_path, tiny_run, tiny_influence, extra, message):
    before = _listing(tiny_run)
    rc = main([*map(str, _command(tiny_run, tiny_influence, tmp_path / "eval")), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("tracin-jax: error: ") and message in err[-1]
    assert not (tmp_path / "eval").exists() and _listing(tiny_run) == before


def test_worker_refuses_a_ground_truth_folder_of_other_settings(capsys, tmp_path, tiny_run,
                                                                tiny_influence):
    from tracin_jax import load_run

    work = _copy(tiny_run, tmp_path / "run")
    plan = gt.plan_ground_truth(load_run(work), subsets=2, fraction=0.5, seeds=1, seed=0)
    plan.folder.mkdir(parents=True)
    (plan.folder / "settings.json").write_text(json.dumps({**plan.settings, "train_ids": ["x"]}))
    before = _listing(work)
    rc = main([*map(str, _command(work, tiny_influence, tmp_path / "eval")), "--worker"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "settings.json: differs from the settings the run" in line
    assert _listing(work) == before


# -- processes --------------------------------------------------------------------------------


def test_job_array_worker_killed_then_another_then_score_only(capsys, tmp_path, tiny_run,
                                                              tiny_influence, reference):
    work = _copy(tiny_run, tmp_path / "run")
    out = tmp_path / "eval"
    cmd = _command(work, tiny_influence, out)
    # worker 1 dies (SIGKILL) after its first model
    p, _, err = _cli([*cmd, "--worker"], CPUS[:1], TRACIN_JAX_KILL_AFTER_UNITS="1")
    assert p.returncode == -9, err[-2000:]
    first = _units(work)
    assert len(first) == 1 and f"pid {p.pid} " in next(iter(first.values()))["worker"]

    before = _listing(work)
    rc = main([*map(str, cmd), "--score-only"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    n = len(reference.units)
    assert rc == 2 and f"--score-only: {n - 1} of {n} models are missing (ground truth m000" in line
    assert "--worker" in line and not out.exists() and _listing(work) == before

    p2, stdout, err = _cli([*cmd, "--worker"], CPUS[:1])
    assert p2.returncode == 0, err[-2000:]
    assert f"all {n} models of this evaluation are done" in stdout and not out.exists()
    units = _units(work)
    for name, u in first.items():  # nothing trained twice
        assert (units[name]["mtime"], units[name]["worker"]) == (u["mtime"], u["worker"])
    assert sum(f"pid {p2.pid} " in u["worker"] for u in units.values()) == n - 1
    _same_models(units, reference.units)  # nothing lost, the same models

    assert main([*map(str, cmd), "--score-only"]) == 0
    result = json.loads((out / "evaluation.json").read_text())
    assert _numbers(result) == _numbers(reference.result)
    assert {k: u["mtime"] for k, u in _units(work).items()} == {
        k: u["mtime"] for k, u in units.items()}  # scoring trained nothing


def test_workers_2_equals_workers_1(tmp_path, tiny_run, tiny_influence, reference):
    work = _copy(tiny_run, tmp_path / "run")
    out = tmp_path / "eval"
    # the parent on two cores: each worker pinned to one, as the reference
    p, _, err = _cli([*_command(work, tiny_influence, out), "--workers", "2"], CPUS[:2])
    assert p.returncode == 0, err[-2000:]
    result = json.loads((out / "evaluation.json").read_text())
    assert result["retraining"]["workers"] == 2 and result["retraining"]["trained_here"] == 0
    units = _units(work)
    assert not any(f"pid {p.pid} " in u["worker"] for u in units.values())  # the workers trained
    _same_models(units, reference.units)
    assert _numbers(result) == _numbers(reference.result)


def test_default_worker_count(monkeypatch):
    from tracin_jax.evaluate import api

    missing = [object()] * 5
    monkeypatch.setattr(gt, "unit_steps", lambda run, u: api.AUTO_MIN_STEPS // 4)
    assert api._worker_count(None, None, missing) == min(workers.usable_cpus(), 5)
    assert api._worker_count(None, None, missing[:3]) == 1  # too little training for processes
    assert api._worker_count(None, None, []) == 1
    assert api._worker_count(4, None, missing[:2]) == 2  # never more workers than models
    assert api._worker_count(1, None, missing) == 1


@pytest.mark.skipif(len(CPUS) < 2, reason="needs 2 cores: one per JAX process")
def test_two_jax_processes_equal_one(tmp_path, tiny_run, tiny_influence, reference):
    """`tracin-jax launch -n 2 -- evaluate`: each JAX process (pinned to its own core) trains the
    models it claims; process 0 scores. Same models and numbers as one process on one core."""
    work = _copy(tiny_run, tmp_path / "run")
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "-m", "tracin_jax.cli", "launch", "-n", "2", "--",
                           *map(str, _command(work, tiny_influence, out))],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={k: v for k, v in os.environ.items() if k != "TRACIN_JAX_QUIET"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    units = _units(work)
    assert len({u["worker"] for u in units.values()}) == 2  # both processes trained models
    _same_models(units, reference.units)
    result = json.loads((out / "evaluation.json").read_text())
    assert _numbers(result) == _numbers(reference.result)
    assert "[0] evaluation written" in proc.stdout and "[1] evaluation written" not in proc.stdout
