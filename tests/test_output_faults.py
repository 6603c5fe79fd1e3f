"""Outputs that cannot be written: a full disk, a file in the way, a read-only folder.

Every stage refuses with one line (exit status 2 on the command line) naming the path, before
any work when the problem can be seen up front; a write that fails later (simulated ENOSPC)
removes its temporary files and leaves earlier complete outputs as they were.
"""

import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tracin_jax.errors import InputError

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


from conftest import cli_in_process as _main  # noqa: E402


def _one_line(err: str) -> str:
    """The error line: the last one, the only one from tracin-jax (progress bars aside)."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("tracin-jax: error: "), err
    assert sum(ln.startswith("tracin-jax:") for ln in lines) == 1 and "Traceback" not in err, err
    assert all(re.match(r"[\w ]+: \d+/\d+ ", ln) for ln in lines[:-1]), err  # progress only
    return lines[-1]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# -- the shared writers ------------------------------------------------------------------------

def test_atomic_writers_on_a_full_disk_keep_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import numpy as np

    from tracin_jax import atomic

    for name in ("a.json", "b.npy", "c.npz"):
        (tmp_path / name).write_bytes(b"old")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(json, "dump", full)
    monkeypatch.setattr(os, "posix_fallocate", full)
    monkeypatch.setattr(np, "savez", full)
    writes = {"a.json": lambda p: atomic.write_json_atomic(p, {"x": 1}),
              "b.npy": lambda p: atomic.save_npy_atomic(p, np.ones(3)),
              "c.npz": lambda p: atomic.save_npz_atomic(p, x=np.ones(3))}
    for name, write in writes.items():
        with pytest.raises(InputError) as e:
            write(tmp_path / name)
        assert str(e.value) == f"{tmp_path / name}: cannot be written: no space left on device"
        assert (tmp_path / name).read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.npy", "c.npz"]


# -- influence -----------------------------------------------------------------------------------

def _fail_writes_into(monkeypatch, folder: Path, after: int = 0) -> list:
    """Every .npy written into ``folder`` after the first ``after`` fails with ENOSPC."""
    from tracin_jax import atomic

    real, seen = atomic._write_npy, []

    def write(tmp, array):
        if Path(tmp).parent == folder:
            seen.append(Path(tmp).name)
            if len(seen) > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tmp, array)

    monkeypatch.setattr(atomic, "_write_npy", write)
    return seen


def test_influence_full_disk_mid_write_keeps_the_earlier_folder(tiny_run, tiny_influence,
                                                                tmp_path, monkeypatch):
    from tracin_jax.influence import run_influence

    out = tmp_path / "influence"
    shutil.copytree(tiny_influence, out)
    before = _snapshot(out)
    seen = _fail_writes_into(monkeypatch, out, after=2)
    with pytest.raises(InputError, match="cannot be written: no space left on device") as e:
        run_influence(tiny_run, out, params="head", progress=False)
    assert "\n" not in str(e.value) and str(out) in str(e.value) and len(seen) == 3
    assert _snapshot(out) == before  # earlier complete folder intact, no temporary files

    fresh = tmp_path / "fresh"
    _fail_writes_into(monkeypatch, fresh)
    with pytest.raises(InputError, match="no space left on device"):
        run_influence(tiny_run, fresh, params="head", progress=False)
    assert not fresh.exists()


def test_influence_command_full_disk_at_meta_json_is_one_line(tiny_run, tiny_influence,
                                                              tmp_path, monkeypatch, capsys):
    out = tmp_path / "influence"
    shutil.copytree(tiny_influence, out)
    before = _snapshot(out)
    real = json.dump

    def dump(obj, f, *a, **k):
        if Path(getattr(f, "name", "")).name == "meta.json.tmp":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *a, **k)

    monkeypatch.setattr(json, "dump", dump)
    rc, err = _main(capsys, "influence", "--workdir", tiny_run, "--out", out)
    line = _one_line(err)
    assert rc == 2 and f"{out / 'meta.json'}: cannot be written: no space left on device" in line
    assert _snapshot(out) == before


def test_influence_refuses_up_front_when_the_disk_is_too_small(tiny_run, tmp_path, monkeypatch):
    from tracin_jax import paths
    from tracin_jax.influence import engine, run_influence

    def boom(*a, **k):
        raise AssertionError("computed before checking the free space")

    monkeypatch.setattr(engine, "featurise_checkpoint", boom)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(paths.shutil, "disk_usage",
                        lambda p: usage._replace(free=100 * 1024))
    out, store = tmp_path / "out", tmp_path / "store"
    with pytest.raises(InputError) as e:
        run_influence(tiny_run, out, params="head", store_dir=store, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and f"--out {out}" in msg and f"feature store {store}" in msg
    assert "of disk space" in msg and "only 100 KB free" in msg
    assert not out.exists() and not store.exists()


def test_check_free_space_adds_up_one_file_system(tmp_path, monkeypatch):
    from tracin_jax import paths

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(paths.shutil, "disk_usage", lambda p: usage._replace(free=10 * 2**20))
    paths.check_free_space([("--out", tmp_path / "a", 4 * 2**20), ("store", tmp_path / "b", 4 * 2**20)])
    with pytest.raises(InputError, match=r"--out .*/a and store .*/b: needs about 13\.0 MB .*"
                       r"\(4\.0 MB for --out, 8\.0 MB for store\), only 10\.0 MB free"):
        paths.check_free_space([("--out", tmp_path / "a", 4 * 2**20),
                                ("store", tmp_path / "b", 8 * 2**20)])


# -- explain -------------------------------------------------------------------------------------

def test_explain_full_disk_keeps_the_earlier_report(tiny_run, tiny_influence, tmp_path,
                                                    monkeypatch, capsys):
    from tracin_jax.explain import figures, report

    out = tmp_path / "report"
    tmp = report.start(out)
    for name, text in {"index.html": "<p>old</p>", "metrics.json": "{}"}.items():
        (tmp / name).write_text(text)
    report.finish(tmp, out)
    before = _snapshot(out)

    def save(fig, path):  # the first figure finds the disk full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(figures, "_save", save)
    rc, err = _main(capsys, "explain", "--workdir", tiny_run, "--influence", tiny_influence,
                    "--out", out)
    assert rc == 2
    assert _one_line(err) == (f"tracin-jax: error: --out {out}: cannot be written: no space "
                              "left on device")
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no temporary folder


# -- the command line's last line of defence -----------------------------------------------------

@pytest.mark.parametrize("code,text", [(errno.ENOSPC, "cannot be written: no space left on device"),
                                       (errno.EROFS, "cannot be written: read-only file system"),
                                       (errno.EACCES, "permission denied")])
def test_any_refused_write_in_a_stage_is_one_line(tmp_path, monkeypatch, capsys, code, text):
    import tracin_jax.data

    def write(*a, **k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(tracin_jax.data, "write_synthetic_dataset", write)
    rc, err = _main(capsys, "synth", "--out", tmp_path / "data")
    assert rc == 2 and _one_line(err) == f"tracin-jax: error: {tmp_path / 'data'}: {text}"


# -- unwritable output paths, before any work ----------------------------------------------------

def _read_only(monkeypatch, folder: Path) -> None:
    """A read-only ``folder``: chmod, or for root (whom permission bits do not stop) what
    ``os.access`` says."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return
    real = os.access

    def access(path, mode, *a, **kw):
        if Path(path).resolve() == folder.resolve() and mode & os.W_OK:
            return False
        return real(path, mode, *a, **kw)

    monkeypatch.setattr(os, "access", access)


# stage -> (its output option, the other arguments); the inputs need not exist: the output is
# checked first.
STAGES = {
    "synth": ("--out", []),
    "train": ("--workdir", ["--data", "{tmp}/no-data"]),
    "explain": ("--out", ["--workdir", "{tmp}/no-run", "--influence", "{tmp}/no-infl"]),
    "evaluate": ("--out", ["--workdir", "{tmp}/no-run", "--influence", "{tmp}/no-infl"]),
    "demo": ("--workdir", []),
}
PLACES = {
    "existing file": (lambda t: t / "file", "exists and is not a folder"),
    "under a file": (lambda t: t / "file" / "sub" / "out", "cannot be created, .*/file is a file"),
    "read-only folder": (lambda t: t / "ro" / "out", "cannot be created, .*/ro is not writable"),
}


@pytest.mark.parametrize("place", list(PLACES))
@pytest.mark.parametrize("stage", list(STAGES))
def test_unwritable_output_is_refused_first(tmp_path, monkeypatch, capsys, stage, place):
    (tmp_path / "file").write_text("x")
    (tmp_path / "ro").mkdir()
    _read_only(monkeypatch, tmp_path / "ro")
    path, match = PLACES[place]
    option, rest = STAGES[stage]
    before = _listing(tmp_path)
    try:
        rc, err = _main(capsys, stage, *[a.format(tmp=tmp_path) for a in rest], option,
                        path(tmp_path))
    finally:
        (tmp_path / "ro").chmod(0o755)
    assert rc == 2
    assert re.search(f"{option} .*{match}", _one_line(err)), err
    assert _listing(tmp_path) == before  # nothing created
    assert (tmp_path / "file").read_text() == "x"


def test_read_only_file_system_is_found_by_the_probe(tmp_path, monkeypatch):
    """What os.access cannot show (root, a read-only mount): the probe folder is refused."""
    import tempfile

    from tracin_jax.paths import check_writable_folder

    def mkdtemp(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    with pytest.raises(InputError, match=r"--out .*/x: cannot be created, .* is not writable "
                       r"\(read-only file system\)"):
        check_writable_folder(tmp_path / "x", "--out")
    assert list(tmp_path.iterdir()) == []


def test_python_apis_check_their_output_first(tmp_path, monkeypatch):
    from tracin_jax.data import write_synthetic_dataset
    from tracin_jax.explain import run_explain

    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="--out .*/file/d: cannot be created, .*/file is a file"):
        write_synthetic_dataset(tmp_path / "file" / "d", cases=2, progress=False)
    with pytest.raises(InputError, match="--out .*/file: exists and is not a folder"):
        run_explain(tmp_path / "no-run", tmp_path / "no-infl", tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_influence_folder_without_meta_json_is_refused_by_explain(tiny_run, tiny_influence,
                                                                   tmp_path):
    from tracin_jax.explain import run_explain

    half = tmp_path / "half"
    shutil.copytree(tiny_influence, half)
    (half / "meta.json").unlink()
    with pytest.raises(InputError, match="meta.json: missing") as e:
        run_explain(tiny_run, half, tmp_path / "report", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "report").exists()
