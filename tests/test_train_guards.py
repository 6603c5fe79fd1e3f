"""Training guards: a config that contradicts the data, two runs on one workdir, the run's identity."""

from __future__ import annotations

import fcntl
import json
import shutil
import threading
import time

import pytest

from tracin_jax import identity
from tracin_jax.cli import main
from tracin_jax.training.train import LOCK_FILE, train_and_evaluate

from conftest import TINY_OVERRIDES


def test_num_classes_below_the_labels_is_refused_before_writing(tiny_data, tmp_path, capsys):
    sets = [a for o in [*TINY_OVERRIDES, "model.num_classes=2"] for a in ("--set", o)]
    code = main(["train", "--data", str(tiny_data), "--workdir", str(tmp_path / "w"),
                 "--config", "tiny", *sets])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("tracin-jax")]
    assert code == 2 and len(err) == 1, err
    assert "model.num_classes=2" in err[0] and "0, 1, 2, 3" in err[0], err[0]
    assert "model.num_classes=4" in err[0]
    assert not (tmp_path / "w").exists()


def test_identity_records_every_checkpoint(tiny_run):
    from tracin_jax import load_run

    stored = identity.read(tiny_run)
    assert stored is not None and sorted(stored["checkpoints"]) == ["1", "2", "3"]
    run = load_run(tiny_run)
    assert identity.describe(run, [1, 2, 3]) == {"run": stored["run"],
                                                 "checkpoints": stored["checkpoints"]}
    # A run without identity.json (trained before it existed) gets the same fingerprints.
    assert identity.describe(run, [2])["checkpoints"]["2"] == stored["checkpoints"]["2"]


def test_identity_check_refuses_another_run(tiny_run, tmp_path):
    from tracin_jax import load_run

    run = load_run(tiny_run)
    good = identity.describe(run, [1, 3])
    identity.check_same_run(good, run, "folder X")
    identity.check_same_run(None, run, "folder X")  # records without identity pass
    from tracin_jax.errors import InputError

    with pytest.raises(InputError, match="another run"):
        identity.check_same_run({**good, "run": "0" * 16}, run, "folder X")
    other = {"run": good["run"], "checkpoints": {**good["checkpoints"], "3": "f" * 16}}
    with pytest.raises(InputError, match="other weights of epoch 3"):
        identity.check_same_run(other, run, "folder X")


def test_a_second_train_waits_for_the_first(tiny_data, tiny_run, tmp_path):
    from conftest import tiny_config

    workdir = tmp_path / "run"
    shutil.copytree(tiny_run, workdir)
    held = open(workdir / LOCK_FILE, "a+")
    fcntl.flock(held, fcntl.LOCK_EX)
    lines, done = [], threading.Event()

    def second():
        train_and_evaluate(tiny_config(), tiny_data, workdir, progress=False, log=lines.append)
        done.set()

    t = threading.Thread(target=second)
    t.start()
    deadline = time.monotonic() + 60
    while not any("waiting for it" in ln for ln in lines) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert any("another run is training" in ln for ln in lines), lines
    assert not done.is_set()
    held.close()  # the first run ends: the second resumes and finds every epoch trained
    t.join(timeout=120)
    assert done.is_set() and any("already trained" in ln for ln in lines), lines
    assert json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 3


def test_evaluate_and_explain_refuse_influence_of_a_retrained_run(tiny_run, tiny_influence,
                                                                   tmp_path, capsys):
    """An influence folder whose recorded weights differ from the run's (the workdir that made it
    is gone): both stages refuse it in one line before any work."""
    infl = tmp_path / "influence"
    shutil.copytree(tiny_influence, infl)
    meta = json.loads((infl / "meta.json").read_text())
    assert set(meta["run_identity"]["checkpoints"]) == {"1", "2", "3"}
    meta["run_identity"]["checkpoints"]["2"] = "0" * 16
    meta["workdir"] = str(tmp_path / "gone")
    (infl / "meta.json").write_text(json.dumps(meta))
    for args in (["explain", "--workdir", str(tiny_run), "--influence", str(infl), "--out",
                  str(tmp_path / "report")],
                 ["evaluate", "--workdir", str(tiny_run), "--influence", str(infl), "--out",
                  str(tmp_path / "eval"), "--small"]):
        code = main(args)
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("tracin-jax")]
        assert code == 2 and len(err) == 1, err
        assert "other weights of epoch 2" in err[0], err[0]
    assert not (tmp_path / "report").exists() and not (tmp_path / "eval").exists()


def test_keys_added_to_the_config_later_keep_an_earlier_runs_identity():
    """A run trained before ``model.dims``, ``data.patch`` etc. existed recorded a hash of a config
    without them: the same config with those keys at their original values hashes the same, and
    another value of any of them changes the hash."""
    import json

    from tracin_jax import identity
    from tracin_jax.config import get_config

    now = json.loads(get_config("tiny").to_json())
    before = json.loads(json.dumps(now))
    for section, key in identity.KEYS_ADDED_LATER:
        before[section].pop(key)
    ids = (["a/z1", "b/z2"], ["c/z3"])
    assert identity.run_hash(now, *ids) == identity.run_hash(before, *ids)
    for (section, key), value in identity.KEYS_ADDED_LATER.items():
        other = json.loads(json.dumps(now))
        other[section][key] = 3 if key == "dims" else (not value if isinstance(value, bool)
                                                         else [8, 8, 8] if isinstance(value, list)
                                                         else 0.25)
        assert identity.run_hash(other, *ids) != identity.run_hash(now, *ids), key
