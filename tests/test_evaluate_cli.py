"""`tracin-jax evaluate`: bad input gives one line and exit 2 with nothing written; a tiny end
to end run writes the table, figures and json, and a rerun reproduces them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tracin_jax.cli import main
from tests.conftest import tiny_config


def _evaluate(capsys, *args) -> tuple[int, str]:
    rc = main(["evaluate", *map(str, args)])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, (err[-1] if err else "")


@pytest.mark.parametrize("extra, message", [
    (["--subsets", "1"], "--subsets 1: need at least 2"),
    (["--fraction", "1.5"], "--fraction 1.5: must lie strictly between 0 and 1"),
    (["--fraction", "0"], "--fraction 0.0: must lie strictly between 0 and 1"),
    (["--seeds", "0"], "--seeds 0"),
    (["--leave-out-k", "1,x"], "--leave-out-k '1,x'"),
    (["--leave-out-k", "4"], "--leave-out-k 4: larger than the 4 training patients allow"),
    (["--leave-out-variants", "nope"], "--leave-out-variants 'nope'"),
    (["--mislabel", "missing.json"], "missing.json: file not found"),
])
def test_bad_settings_one_line_exit_2_nothing_written(capsys, tmp_path, tiny_run, tiny_influence,
                                                      extra, message):
    out = tmp_path / "eval"
    rc, line = _evaluate(capsys, "--workdir", tiny_run, "--influence", tiny_influence,
                         "--out", out, "--small", *extra)
    assert rc == 2
    assert line.startswith("tracin-jax: error: ") and message in line
    assert not out.exists()
    assert not (Path(tiny_run) / "ground_truth").exists()


def test_influence_of_another_run(capsys, tmp_path, tiny_run, tiny_influence):
    other = tmp_path / "other-run-influence"
    shutil.copytree(tiny_influence, other)
    meta = json.loads((other / "meta.json").read_text())
    meta["test_ids"] = [f"X_{i}" for i in meta["test_ids"]]
    (other / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "eval"
    rc, line = _evaluate(capsys, "--workdir", tiny_run, "--influence", tiny_influence, other,
                         "--out", out, "--small")
    assert rc == 2 and "other-run-influence" in line and "test_ids differ" in line
    assert not out.exists()


def test_duplicate_folder_names_and_missing_folder(capsys, tmp_path, tiny_run, tiny_influence):
    twin = tmp_path / "x" / Path(tiny_influence).name
    shutil.copytree(tiny_influence, twin)
    rc, line = _evaluate(capsys, "--workdir", tiny_run, "--influence", tiny_influence, twin,
                         "--out", tmp_path / "e", "--small")
    assert rc == 2 and "share the name" in line
    rc, line = _evaluate(capsys, "--workdir", tiny_run, "--influence", tmp_path / "nope",
                         "--out", tmp_path / "e", "--small")
    assert rc == 2 and "nope: not a folder" in line
    assert not (tmp_path / "e").exists()


def test_too_few_training_patients(capsys, tmp_path, tiny_data, tiny_influence):
    from tracin_jax.training.train import train_and_evaluate

    run = tmp_path / "run3"  # 6 cases, half for testing: 3 training patients
    train_and_evaluate(tiny_config("data.test_fraction=0.5", "train.epochs=1"), tiny_data, run,
                       progress=False, log=lambda s: None)
    rc, line = _evaluate(capsys, "--workdir", run, "--influence", tiny_influence,
                         "--out", tmp_path / "e", "--small")
    assert rc == 2 and "3 training patients" in line and "at least 4" in line
    assert not (tmp_path / "e").exists()
