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


def _listing(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


@pytest.mark.parametrize("extra, message", [
    (["--subsets", "1"], "--subsets 1: need at least 2"),
    (["--fraction", "1.5"], "--fraction 1.5: must lie strictly between 0 and 1"),
    (["--fraction", "0"], "--fraction 0.0: must lie strictly between 0 and 1"),
    (["--seeds", "0"], "--seeds 0"),
    (["--leave-out-k", "1,x"], "--leave-out-k '1,x'"),
    (["--leave-out-k", "4"], "--leave-out-k 4: larger than the 4 training patients allow"),
    (["--leave-out-variants", "nope"], "--leave-out-variants 'nope'"),
    (["--mode", "fast"], "--mode 'fast'"),
    (["--leave-out-steps", "more"], "--leave-out-steps 'more' is not one of epochs, matched"),
    (["--mislabel", "missing.json"], "missing.json: file not found"),
])
def test_bad_settings_one_line_exit_2_nothing_written(capsys, tmp_path, tiny_run, tiny_influence,
                                                      extra, message):
    out = tmp_path / "eval"
    before = _listing(tiny_run)
    rc, line = _evaluate(capsys, "--workdir", tiny_run, "--influence", tiny_influence,
                         "--out", out, "--small", *extra)
    assert rc == 2
    assert line.startswith("tracin-jax: error: ") and message in line
    assert not out.exists()
    assert _listing(tiny_run) == before  # nothing trained or cached


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


def _linear_ground_truth(scores: np.ndarray, patients: list[str], m: int, r: int, seed: int):
    """A ground truth in which the influence scores are exactly right: the class loss of a model
    trained on the patients S is -sum_{p in S} sum_j scores[a, i, p, j]. No constant offset: in
    float32 a constant of 1 would swallow head-subset scores of order 1e-8 and tie the losses."""
    per_patient = scores.sum(axis=-1)  # [n_test, C, P]
    rng = np.random.default_rng(seed)
    masks = rng.random((m, len(patients))) < 0.5

    def loss(mask):
        return (-np.einsum("p,aip->ai", mask.astype(np.float64), per_patient)).astype(np.float32)

    arr = np.stack([np.stack([loss(mk)] * r) for mk in masks])  # [M, R, n_test, C]
    return masks, arr, loss


def test_api_linear_oracle_through_the_pipeline(tmp_path, tiny_run, tiny_influence, monkeypatch):
    """With a ground truth generated from the scores themselves, every sign in the pipeline
    must line up: LDS ~ 1, removing proponents raises the loss, removing opponents lowers it."""
    from types import SimpleNamespace

    from tracin_jax.evaluate import api
    gt_mod = pytest.importorskip("tracin_jax.evaluate.ground_truth")

    scores = np.load(Path(tiny_influence) / "patient_scores.npy")
    patients = json.loads((Path(tiny_influence) / "meta.json").read_text())["patients"]
    calls, rules = [], []

    def fake_ground_truth(workdir, *, subsets, fraction, seeds, seed, mode, progress, small):
        masks, arr, _ = _linear_ground_truth(scores, patients, subsets, seeds, seed)
        return SimpleNamespace(masks=masks, dice_loss=arr, ce_loss=arr, path=tmp_path / "gt",
                               meta={})

    def fake_retrain_without_many(workdir, removal_sets, seed, **kw):
        calls.append([tuple(s) for s in removal_sets])
        rules.append(kw.get("steps"))
        _, _, loss = _linear_ground_truth(scores, patients, 2, 1, seed)
        out = []
        for removed in removal_sets:
            kept = np.array([p not in removed for p in patients])
            out.append({"dice_loss": loss(kept), "ce_loss": loss(kept)})
        return out

    monkeypatch.setattr(gt_mod, "compute_ground_truth", fake_ground_truth)
    monkeypatch.setattr(gt_mod, "retrain_without_many", fake_retrain_without_many)
    kw = dict(subsets=12, seeds=2, leave_out_queries=3, leave_out_k="1,2", randomisation=False,
              progress=False, log=lambda s: None)
    res = api.run_evaluate(tiny_run, [tiny_influence], tmp_path / "e", **kw)
    v = res["variants"][Path(tiny_influence).name]
    assert v["lds"]["mean"] > 0.99 and v["vs_best"] is None
    assert res["ground_truth"]["noise_ceiling"]["dice"]["mean"] > 0.99
    for k in ("1", "2"):
        lo = v["leave_out"][k]
        # here every patient may help (raw TracIn is mostly positive): opponents help least
        assert lo["proponents"]["mean"] > 0
        assert lo["proponents"]["mean"] >= lo["random"]["mean"] >= lo["opponents"]["mean"]
        assert lo["proponents"]["mean"] > lo["opponents"]["mean"]
    assert len(calls) == 1 and calls[0][0] == ()  # every set at once, the reference first
    assert len(set(calls[0])) == len(calls[0])
    md = (tmp_path / "e" / "evaluation.md").read_text()
    assert "One variant scored" in md and "+1.00" in md
    # the attribution-free baseline: scored, compared, and given leave-out on the same sets
    base = res["baselines"]["baseline-class-voxels"]
    assert -1.0 <= base["lds"]["mean"] <= 1.0 and base["vs_best"]["mean"] is not None
    assert v["vs_baseline"]["mean"] == pytest.approx(v["lds"]["mean"] - base["lds"]["mean"],
                                                     abs=1e-9)
    assert set(base["leave_out"]) == {"1", "2"} and base["randomisation"] is None
    assert -1.0 <= v["baseline_rho"] <= 1.0
    assert "| `baseline-class-voxels` |" in md
    api.run_evaluate(tiny_run, [tiny_influence], tmp_path / "e2", **kw)
    assert (tmp_path / "e2" / "evaluation.md").read_text() == md
    assert rules == ["epochs", "epochs"] and res["leave_out"]["steps"] == "epochs"
    assert "trained the run's epochs" in md
    matched = api.run_evaluate(tiny_run, [tiny_influence], tmp_path / "e3",
                               leave_out_steps="matched", **kw)
    assert rules[-1] == "matched" and matched["leave_out"]["steps"] == "matched"
    assert "as many steps as on all patients" in (tmp_path / "e3" / "evaluation.md").read_text()


def test_model_randomisation_on_tiny_run(tmp_path, tiny_run, tiny_influence):
    from tracin_jax import load_run
    from tracin_jax.evaluate import sanity

    run = load_run(tiny_run)
    out = tmp_path / "rand"
    res = sanity.model_randomisation(run, Path(tiny_influence), out, seed=0)
    trained = np.load(Path(tiny_influence) / "patient_scores.npy")
    out = Path(res["folder"])
    assert out.parent == tmp_path / "rand" and not (out / "features").exists()
    randomised = np.load(out / "patient_scores.npy")
    assert randomised.shape == trained.shape and not np.allclose(randomised, trained)
    assert -1.0 <= res["mean"] < 0.999 and res["n_targets"] > 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["gradient"]["tag"] == json.loads(
        (Path(tiny_influence) / "meta.json").read_text())["gradient"]["tag"]
    stamp = (out / "patient_scores.npy").stat().st_mtime_ns
    assert sanity.model_randomisation(run, Path(tiny_influence), tmp_path / "rand", seed=0) == res
    assert (out / "patient_scores.npy").stat().st_mtime_ns == stamp  # reused, not recomputed
    other = sanity.model_randomisation(run, Path(tiny_influence), tmp_path / "rand", seed=1)
    assert other["folder"] != res["folder"]  # another seed never reuses these scores


def test_end_to_end_small_and_rerun_reproduces(tmp_path, tiny_run, tiny_influence, capsys):
    work = tmp_path / "run"
    shutil.copytree(tiny_run, work)
    out = tmp_path / "eval"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "tracin_jax.cli", "evaluate", "--workdir", str(work),
           "--influence", str(tiny_influence), "--out", str(out), "--small", "--subsets", "3",
           "--no-randomisation"]  # randomisation: test_model_randomisation_on_tiny_run
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "distinct removal sets" in proc.stdout + proc.stderr
    assert {"evaluation.json", "evaluation.md", "lds.png", "leave_out.png"} <= {
        p.name for p in out.iterdir()}
    res = json.loads((out / "evaluation.json").read_text())
    gt = res["ground_truth"]
    assert (gt["subsets"], gt["seeds"], gt["patients"]) == (3, 1, 4)
    v = res["variants"][Path(tiny_influence).name]
    assert v["loss"] == "dice" and -1.0 <= v["lds"]["mean"] <= 1.0
    assert set(v["lds"]["per_class"]) == {"NCR/NET", "ED", "ET"}
    assert set(v["leave_out"]["1"]) == {"proponents", "random", "opponents",
                                         "proponents_minus_random",
                                         "proponents_minus_opponents"}
    assert v["randomisation"] is None and res["leave_out"]["queries_n"] == 1
    assert set(res["baselines"]) == {"baseline-class-voxels"}
    assert "1" in res["baselines"]["baseline-class-voxels"]["leave_out"]
    md = (out / "evaluation.md").read_text()
    assert md in proc.stdout
    # experiments.architectures reads the LDS of its one folder from this dict
    from experiments.architectures import lds_entry, overall_lds_lines, summary_table

    names = ("NCR/NET", "ED", "ET")
    per_class, overall = lds_entry(res, names)
    assert per_class == {n: v["lds"]["per_class"][n]["mean"] for n in names}
    assert overall == {"mean": v["lds"]["mean"], "ci": v["lds"]["ci"], "subsets": 3}
    row = {"test_dice": 0.5, "n_selected": 0, "n_filters": 4, "difference": float("nan"),
           "selected_drop": None, "random_drop_mean": None, "random_drop_std": None}
    entry = {"parameters": 10, "classes": {n: row for n in names},
             "lds": {"NCR/NET": 0.25, "ED": None, "ET": -0.5},
             "lds_all": {"mean": 0.125, "ci": [-0.1, 0.3], "subsets": 3}}
    table = summary_table({"unet": entry}).splitlines()
    assert [r.rsplit("|", 2)[1].strip() for r in table[2:]] == ["0.25", "–", "-0.50"]
    assert "- U-Net: LDS +0.12 [-0.10, +0.30] against 3 retrained" in overall_lds_lines({"unet": entry})
    assert overall_lds_lines({"unet": dict(entry, lds_all={"mean": None})}) == ""
    units = sorted((Path(gt["path"]) / "units").iterdir())
    stamps = [p.stat().st_mtime_ns for p in units]
    # rerun: every model comes from the caches and the table is the same
    assert main(cmd[3:]) == 0
    assert "0 to retrain" in capsys.readouterr().out
    assert (out / "evaluation.md").read_text() == md
    assert [p.stat().st_mtime_ns for p in units] == stamps
