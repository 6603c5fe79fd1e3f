"""The report folder: mode, rewriting without losing a user's files, stale temporary folders."""

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tracin_jax.errors import InputError
from tracin_jax.explain import report

HERE = Path(__file__).resolve().parent


def _build(out: Path, files: dict[str, str]) -> Path:
    """Writes a 'report' of the given files through start/finish, as run_explain does."""
    tmp = report.start(out)
    for name, text in files.items():
        (tmp / name).write_text(text)
    return report.finish(tmp, out)


def _manifest(out: Path) -> list[str]:
    return json.loads((out / report.MANIFEST).read_text())["files"]


def test_report_folder_has_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        out = _build(tmp_path / "r", {"index.html": "x", "metrics.json": "{}"})
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "index.html").stat().st_mode) == 0o644


def test_rewrite_keeps_user_files_and_replaces_only_report_files(tmp_path):
    out = tmp_path / "r"
    _build(out, {"index.html": "v1", "metrics.json": "{}", "local_ET_0001.png": "a", "fig.png": "b"})
    (out / "notes.txt").write_text("mine")
    _build(out, {"index.html": "v2", "metrics.json": "{}", "fig.png": "c"})
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "index.html").read_text() == "v2" and (out / "fig.png").read_text() == "c"
    assert not (out / "local_ET_0001.png").exists()  # the earlier report's, no longer written
    assert sorted(_manifest(out)) == sorted(["index.html", "metrics.json", "fig.png", report.MANIFEST])
    assert not list(tmp_path.glob(".r.tmp-*"))


def test_non_report_folder_gets_the_report_added(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _build(out, {"index.html": "v1", "metrics.json": "{}"})
    _build(out, {"index.html": "v2", "metrics.json": "{}"})
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "index.html").read_text() == "v2"
    assert "notes.txt" not in _manifest(out)


def test_user_file_with_a_report_name_refuses(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "index.html").write_text("my page")
    with pytest.raises(InputError, match="index.html.*not from an earlier report"):
        report.start(out)
    (out / "index.html").unlink()
    (out / "fig.png").write_text("my figure")
    tmp = report.start(out)
    (tmp / "index.html").write_text("x")
    (tmp / "fig.png").write_text("report figure")
    with pytest.raises(InputError, match="fig.png"):
        report.finish(tmp, out)
    assert (out / "fig.png").read_text() == "my figure" and not (out / "index.html").exists()


def test_out_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="exists and is not a folder"):
        report.start(tmp_path / "f")


def test_report_without_manifest_from_older_versions(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "index.html").write_text('<img src="class_matrix.png"><img src="old.png">')
    (out / "metrics.json").write_text(json.dumps({"local": {}, "global": {}, "influence": {}}))
    for n in ("class_matrix.png", "old.png", "notes.txt"):
        (out / n).write_text(n)
    _build(out, {"index.html": "v2", "metrics.json": "{}", "class_matrix.png": "new"})
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["index.html", "metrics.json", "class_matrix.png", "notes.txt", report.MANIFEST])
    assert (out / "class_matrix.png").read_text() == "new"


def test_stale_temporary_folders_only_of_this_report(tmp_path):
    out = tmp_path / "r"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [tmp_path / f".r.tmp-{dead.pid}-0a1b2c3d", tmp_path / ".r.tmp-x7k2_q9z", tmp_path / ".r.old-abc"]
    live = tmp_path / f".r.tmp-{os.getppid()}-0a1b2c3d"  # a running process: maybe building it
    other = tmp_path / f".r2.tmp-{dead.pid}-0a1b2c3d"
    for p in stale + [live, other]:
        p.mkdir()
        (p / "index.html").write_text("partial")
    _build(out, {"index.html": "x"})
    assert not any(p.exists() for p in stale)
    assert live.exists() and other.exists()


SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from test_explain_fixtures import FakeRun, write_influence
    from tracin_jax.explain import explain_run
    d = Path({d!r})
    run = FakeRun(n_train_cases=6, n_test_cases=2, slices=2)
    if not (d / "infl" / "meta.json").exists():
        write_influence(d / "infl", run, seed=0)
    explain_run(run, d / "infl", d / "report", k=2, items_per_class=1, n_permutations=100,
                random_seeds=3, progress=False)
""")


def test_sigkill_then_rerun_leaves_no_temporary_folder(tmp_path):
    script = SCRIPT.format(tests=str(HERE), d=str(tmp_path))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "notes.txt").write_text("mine")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 600
        while not any(p.is_dir() and any(p.iterdir()) for p in tmp_path.glob(".report.tmp-*")):
            assert proc.poll() is None, "explain ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert list(tmp_path.glob(".report.tmp-*"))  # the killed run left its half-built report
    assert not (tmp_path / "report" / "index.html").exists()
    # The rerun, in this process: the same script's calls.
    from test_explain_fixtures import FakeRun
    from tracin_jax.explain import explain_run

    run = FakeRun(n_train_cases=6, n_test_cases=2, slices=2)
    explain_run(run, tmp_path / "infl", tmp_path / "report", k=2, items_per_class=1,
                n_permutations=100, random_seeds=3, progress=False)
    assert not list(tmp_path.glob(".report.tmp-*"))
    out = tmp_path / "report"
    assert (out / "notes.txt").read_text() == "mine"
    for name in _manifest(out):
        assert (out / name).is_file()
    assert {"index.html", "metrics.json"} <= set(_manifest(out))
