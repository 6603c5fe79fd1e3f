"""The persistent compilation cache of command-line runs."""

from __future__ import annotations

import os
import subprocess
import sys

from tracin_jax import compile_cache


def test_cache_folder_choice(monkeypatch, tmp_path):
    monkeypatch.setenv("TRACIN_JAX_CACHE", str(tmp_path / "c"))
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    assert compile_cache.cache_dir() == tmp_path / "c" / "xla"
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.cache_dir() is None
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "elsewhere"))
    assert compile_cache.cache_dir() == tmp_path / "elsewhere"


def test_influence_fills_the_cache_and_reuses_it(tiny_run, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env[compile_cache.ENV] = str(tmp_path / "xla")
    cmd = [sys.executable, "-m", "tracin_jax.cli", "influence", "--workdir", str(tiny_run),
           "--params", "head"]
    first = subprocess.run([*cmd, "--out", str(tmp_path / "a")], env=env, capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    entries = {p.name for p in (tmp_path / "xla").iterdir()}
    assert entries  # compiled programs were stored
    second = subprocess.run([*cmd, "--out", str(tmp_path / "b")], env=env, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    new = {p.name for p in (tmp_path / "xla").iterdir()} - entries
    assert not {n for n in new if not n.endswith("-atime")}  # nothing compiled again


def test_no_compile_cache_flag_leaves_jax_alone(monkeypatch, tmp_path):
    """--no-compile-cache: the stage starts without touching JAX's cache setting."""
    from tracin_jax import cli

    calls = []
    monkeypatch.setattr(compile_cache, "enable", lambda on=True: calls.append(on))
    monkeypatch.setattr("tracin_jax.distributed.initialize", lambda: None)
    for argv, want in ((["explain", "--workdir", "w", "--influence", "i", "--out", "o"], True),
                       (["explain", "--workdir", "w", "--influence", "i", "--out", "o",
                         "--no-compile-cache"], False)):
        cli._start(cli.build_parser().parse_args(argv))
        assert calls[-1] is want
