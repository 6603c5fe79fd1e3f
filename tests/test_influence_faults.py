"""Damaged inputs and unwritable outputs: one-line errors before anything is computed or written."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tracin_jax
from tracin_jax.errors import InputError
from tracin_jax.influence import run_influence


def _copy(tiny_run, tmp_path) -> Path:
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run, workdir, ignore=shutil.ignore_patterns("features"))
    return workdir


def _biggest(folder: Path) -> Path:
    return max((p for p in folder.iterdir() if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "deleted data file": lambda c: _biggest(c / "variables" / "ocdbt.process_0" / "d").unlink(),
    "truncated data file": lambda c: _truncate(_biggest(c / "variables" / "ocdbt.process_0" / "d")),
    "missing _METADATA": lambda c: (c / "variables" / "_METADATA").unlink(),
    "missing meta/metadata": lambda c: (c / "meta" / "metadata").unlink(),
    "truncated manifest": lambda c: _truncate(c / "variables" / "manifest.ocdbt"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_one_line_and_writes_nothing(tiny_run, tmp_path, damage):
    workdir = _copy(tiny_run, tmp_path)
    DAMAGE[damage](workdir / "checkpoints" / "2")
    out, store = tmp_path / "out", tmp_path / "store"
    with pytest.raises(InputError, match=r"checkpoint of epoch 2") as e:
        run_influence(workdir, out, progress=False, store_dir=store)
    assert "\n" not in str(e.value) and str(workdir) in str(e.value)
    assert not out.exists() and not store.exists()
    assert not (workdir / "features").exists()


def test_damaged_checkpoint_from_load_run_and_the_lazy_variables(tiny_run, tmp_path):
    workdir = _copy(tiny_run, tmp_path)
    DAMAGE["truncated data file"](workdir / "checkpoints" / "3")
    run = tracin_jax.load_run(workdir)  # metadata is intact: opening works
    with pytest.raises(InputError, match="checkpoint of epoch 3.*cannot be read") as e:
        run.checkpoint(3).variables
    assert "\n" not in str(e.value)
    (workdir / "checkpoints" / "1" / "meta" / "metadata").unlink()
    with pytest.raises(InputError, match="checkpoint of epoch 1.*missing meta/metadata"):
        tracin_jax.load_run(workdir)


def test_damaged_checkpoint_on_the_command_line(tiny_run, tmp_path):
    workdir = _copy(tiny_run, tmp_path)
    DAMAGE["deleted data file"](workdir / "checkpoints" / "1")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "tracin_jax.cli", "influence", "--workdir",
                           str(workdir), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tracin-jax: error:")
    assert "epoch 1" in lines[0]
    assert not out.exists() and not (workdir / "features").exists()


def _unwritable(monkeypatch, folder: Path) -> None:
    """Simulates a read-only ``folder`` (tests run as root, which ignores chmod)."""
    import os

    real = os.access

    def access(path, mode, *a, **kw):
        if Path(path).resolve() == folder.resolve() and mode & os.W_OK:
            return False
        return real(path, mode, *a, **kw)

    monkeypatch.setattr(os, "access", access)


def _no_gradients(monkeypatch):
    """Fails the test if any gradient is computed (the error must come first)."""
    from tracin_jax.influence import engine

    def boom(*a, **kw):
        raise AssertionError("computed before checking --out")

    monkeypatch.setattr(engine, "featurise_checkpoint", boom)
    monkeypatch.setattr(engine, "compute_features", boom)


OUTS = {
    "existing file": (lambda t: (t / "f").write_text("x") and t / "f", "exists and is not a folder"),
    "under a file": (lambda t: (t / "f").write_text("x") and t / "f" / "sub" / "out",
                     "cannot be created, .*/f is a file"),
}


@pytest.mark.parametrize("case", list(OUTS))
def test_out_that_cannot_be_a_folder_fails_before_computing(tiny_run, tmp_path, monkeypatch, case):
    make, match = OUTS[case]
    out = make(tmp_path)
    _no_gradients(monkeypatch)
    with pytest.raises(InputError, match=f"--out .*{match}") as e:
        run_influence(tiny_run, out, progress=False, store_dir=tmp_path / "store")
    assert "\n" not in str(e.value) and not (tmp_path / "store").exists()


def test_read_only_out_and_store_fail_before_computing(tiny_run, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    _unwritable(monkeypatch, ro)
    _no_gradients(monkeypatch)
    with pytest.raises(InputError, match=r"--out .*/ro/out: cannot be created, .*/ro is not writable"):
        run_influence(tiny_run, ro / "out", progress=False, store_dir=tmp_path / "store")
    with pytest.raises(InputError, match=r"feature store .*/ro/store: cannot be created"):
        run_influence(tiny_run, tmp_path / "out", progress=False, store_dir=ro / "store")
    assert not (tmp_path / "out").exists() and not (tmp_path / "store").exists()
    (tmp_path / "f").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "tracin_jax.cli", "influence", "--workdir",
                           str(tiny_run), "--out", str(tmp_path / "f" / "x")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "is a file" in proc.stderr


def test_only_orbax_read_debris_is_muted(monkeypatch):
    """The filter behind the one-line error drops Orbax's leftover read coroutines and nothing
    else: an unrelated unraisable exception still reaches the previous hook."""
    from tracin_jax import checkpoints

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    checkpoints._mute_orbax_read_debris()
    checkpoints._mute_orbax_read_debris()  # idempotent: one filter, not a chain

    class Unraisable:
        def __init__(self, obj, exc):
            self.object, self.exc_value, self.exc_type = obj, exc, type(exc)
            self.exc_traceback = exc.__traceback__

    async def _read_array_index_and_device_put():  # stands in for Orbax's coroutine
        pass

    coro = _read_array_index_and_device_put()
    coro.close()
    orbax_code = coro.cr_code.replace(co_filename="/site-packages/orbax/checkpoint/serialization.py")

    class OrbaxCoroutine:
        cr_code = orbax_code

    sys.unraisablehook(Unraisable(OrbaxCoroutine(), GeneratorExit()))
    assert seen == []
    mine = Unraisable(None, ValueError("a user's own error"))
    sys.unraisablehook(mine)
    assert seen == [mine]
