"""Checkpoints that went missing: all-checkpoint stages refuse a run with gaps, naming the
missing and the available epochs; an explicit --checkpoints list chooses a subset on purpose;
a run still training has no gap."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tracin_jax import checkpoints
from tracin_jax.errors import InputError


@pytest.fixture
def gappy(tiny_run, tmp_path) -> Path:
    """A copy of tiny_run (epochs 1, 2, 3 finished) whose checkpoints/1 was deleted."""
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run, workdir)  # the feature store too: chunks are reused
    shutil.rmtree(workdir / "checkpoints" / "1")
    return workdir


def _no_gradients(monkeypatch):
    from tracin_jax.influence import engine

    def boom(*a, **k):
        raise AssertionError("computed before checking the checkpoints")

    monkeypatch.setattr(engine, "featurise_checkpoint", boom)


def test_missing_epochs_from_later_checkpoints_and_metrics(tiny_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run, workdir, ignore=shutil.ignore_patterns("features"))
    assert checkpoints.missing_epochs(workdir) == []
    shutil.rmtree(workdir / "checkpoints" / "3")  # metrics.jsonl still lists epoch 3
    assert checkpoints.missing_epochs(workdir) == [3]
    with pytest.raises(InputError, match=r"finished epoch 3 but checkpoints/3 is missing "
                       r"\(resume training to save the last one again\); available: 1, 2"):
        checkpoints.check_complete(workdir)
    # A run still training (or stopped): fewer epochs than configured, no gap.
    metrics = workdir / checkpoints.METRICS_FILE
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:2]) + "\n")
    assert checkpoints.missing_epochs(workdir) == []
    checkpoints.check_complete(workdir)
    metrics.unlink()
    assert checkpoints.missing_epochs(workdir) == []
    checkpoints.check_complete(workdir, epochs=[1, 2])
    with pytest.raises(InputError, match=r"no checkpoint for epoch 3 \(available: 1, 2\)"):
        checkpoints.check_complete(workdir, epochs=[2, 3])


def test_influence_refuses_a_gap_and_takes_an_explicit_subset(gappy, tmp_path, monkeypatch,
                                                              capsys):
    from tracin_jax.cli import main
    from tracin_jax.influence import run_influence

    import tracin_jax

    assert tracin_jax.load_run(gappy).missing_epochs() == [1]
    with monkeypatch.context() as m:
        _no_gradients(m)
        with pytest.raises(InputError) as e:
            run_influence(gappy, tmp_path / "out", params="head", progress=False)
        msg = str(e.value)
        assert "\n" not in msg and "epoch 1" in msg and "checkpoints/1 is missing" in msg
        assert "available: 2, 3" in msg and "--checkpoints 2,3" in msg
        assert main(["influence", "--workdir", str(gappy), "--out", str(tmp_path / "cli")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("tracin-jax: error: ") and "epoch 1" in err[-1]
    assert not (tmp_path / "out").exists() and not (tmp_path / "cli").exists()

    assert main(["influence", "--workdir", str(gappy), "--out", str(tmp_path / "sub"),
                 "--checkpoints", "2,3"]) == 0
    meta = json.loads((tmp_path / "sub" / "meta.json").read_text())
    assert [c["epoch"] for c in meta["checkpoints"]] == [2, 3]
    with pytest.raises(InputError, match=r"epoch 1, which .* does not have \(available: 2, 3\)"):
        run_influence(gappy, tmp_path / "one", checkpoints="1,2", progress=False)


def test_trak_and_ekfac_use_the_same_check(gappy, tmp_path, monkeypatch):
    from tracin_jax.influence import ekfac, run_influence, trak

    def boom(*a, **k):
        raise AssertionError("worked before checking the checkpoints")

    monkeypatch.setattr(ekfac, "factored_checkpoints", boom)
    monkeypatch.setattr(trak, "ensure_seed_models", boom)
    with pytest.raises(InputError, match="checkpoints/1 is missing.*available: 2, 3"):
        run_influence(gappy, tmp_path / "e", method="ekfac", params="head", progress=False)
    with pytest.raises(InputError, match="checkpoints/1 is missing.*available: 2, 3"):
        run_influence(gappy, tmp_path / "t", method="trak", models_from="checkpoints",
                      progress=False)
    # The seeds ensemble starts from the last epoch: a gap before it does not matter, a
    # missing last epoch does.
    with pytest.raises(AssertionError, match="worked before"):
        run_influence(gappy, tmp_path / "t", method="trak", models_from="seeds", progress=False)
    shutil.rmtree(gappy / "checkpoints" / "3")
    with pytest.raises(InputError, match=r"finished epoch 3 but its checkpoint .*3 is missing "
                       r"\(last available: 2\)"):
        run_influence(gappy, tmp_path / "t", method="trak", models_from="seeds", progress=False)
    assert not (tmp_path / "e").exists() and not (tmp_path / "t").exists()
    assert np.all([p.name != "trak" for p in gappy.iterdir()])
