"""benchmarks/gpu_check.py at ``--size tiny`` on this machine's CPU, in a subprocess, the way a
machine with a GPU runs it at full size: without nibabel (a package on the path raises on import,
so the script's placeholder is used) and, unless installed here, without Captum."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check

REPO = Path(__file__).resolve().parents[1]


def test_tiny_run_prints_every_check_as_json(tmp_path):
    hide = tmp_path / "hide" / "nibabel"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text('raise ImportError("nibabel hidden by the test")\n')
    env = dict(os.environ)  # conftest's XLA cache and compile flags are inherited
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "hide"), str(REPO),
                                         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out_file = tmp_path / "gpu.jsonl"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--size", "tiny",
                           "--out", str(out_file)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(l) for l in proc.stdout.splitlines() if l.strip()]
    assert len(lines) == len(proc.stdout.strip().splitlines())  # nothing but JSON on stdout
    assert [json.loads(l) for l in out_file.read_text().splitlines()] == lines

    by = {}
    for line in lines:
        assert "error" not in line, line
        for key in ("check", "size", "backend", "device_kind", "jax", "elapsed_s"):
            assert key in line, (key, line)
        assert line["size"] == "tiny"
        by.setdefault(line["check"], []).append(line)
    assert list(by) == ["environment", *gpu_check.CHECKS]

    env_line = by["environment"][0]
    assert env_line["nibabel"].startswith("placeholder")
    assert by["matmul_baseline"][0]["gflops_per_s"] > 0

    step = by["paper_train_step"][0]
    assert step["config"] == "paper" and step["image"] == [32, 32] and step["batch"] == 10
    assert step["compile_s"] > 0 and step["step_s_median"] > 0 and step["loss_finite"]
    assert len(step["step_s_all"]) == gpu_check.SIZES["tiny"].paper_steps

    retrain = by["retrain_vmap_vs_sequential"]
    assert [l["k"] for l in retrain] == list(gpu_check.SIZES["tiny"].retrain_k)
    for l in retrain:
        assert l["vmap"]["models_per_s"] > 0 and l["sequential"]["models_per_s"] > 0
        assert l["speedup_vmap_vs_sequential"] > 0
        # The two modes train the same models up to float rounding, which Adam's normalised
        # steps magnify to about the learning rate where a gradient is near zero (see the
        # script's docstring): below 1e-3 of the largest parameter on one CPU model, 5.6e-3 on
        # another. Different models (another seed, other data) differ by far more.
        assert l["max_rel_param_diff"] < 2e-2

    influence = by["influence_vs_captum"]
    assert [(l["subset"], l["projection"]) for l in influence] == [("head", "exact"),
                                                                   ("all", "logra8")]
    has_captum = (importlib.util.find_spec("captum") is not None
                  and importlib.util.find_spec("torch") is not None)
    for l in influence:
        assert l["engine_s"] > 0 and l["classgrad_s"] > 0 and "detail" in l
        if has_captum:
            assert l["engine_over_captum"] > 0 and "skipped" not in l
        else:
            assert l["skipped"] == "captum not installed"


def test_failed_check_prints_error_line_and_exit_status_1(monkeypatch, capsys):
    def boom(size):
        raise MemoryError("out of memory\nsecond line")

    monkeypatch.setattr(gpu_check, "check_matmul", boom)
    assert gpu_check.main(["--size", "tiny", "--only", "matmul_baseline"]) == 1
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [l["check"] for l in lines] == ["environment", "matmul_baseline"]
    assert lines[1]["error"] == "MemoryError: out of memory second line"


def test_unknown_check_is_a_usage_error():
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--only", "matmul_baseline,nope"])
    assert e.value.code == 2
