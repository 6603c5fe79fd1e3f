"""experiments.consistency: its helpers, and the whole report on the tiny trained run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import consistency  # noqa: E402


def test_split_leaves_inverts_the_flattening():
    from types import SimpleNamespace

    subset = SimpleNamespace(shapes=((2, 3), (4,), (1, 1, 2)))
    leaves = [np.arange(5 * 3 * 6).reshape(5, 3, 2, 3), np.ones((5, 3, 4)), np.zeros((5, 3, 1, 1, 2))]
    flat = np.concatenate([l.reshape(5, 3, -1) for l in leaves], axis=-1)
    back = consistency.split_leaves(flat, subset)
    assert [b.shape for b in back] == [l.shape for l in leaves]
    assert all(np.array_equal(a, b) for a, b in zip(back, leaves))


def test_checkpoint_sets_and_queries():
    sets = consistency.checkpoint_sets([1, 2, 3, 4, 5, 6])
    assert sets == {"all": [1, 2, 3, 4, 5, 6], "last": [6], "first half": [1, 2, 3],
                    "every second": [2, 4, 6]}
    assert consistency.checkpoint_sets([4])["first half"] == [4]
    present = np.array([[True, False, True], [False, False, False]])
    assert consistency.queries(present) == [(0, 0), (0, 2)]


def test_agreement_of_identical_and_reversed_scores():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(3, 3, 12, 3))
    qs = [(0, 0), (1, 2), (2, 1)]
    patients = np.repeat(np.arange(4), 3)
    same = consistency.agreement(ref, ref.copy(), qs, patients, k=4)
    assert same["relative_error"] == 0.0
    for level in ("slices", "patients"):
        assert same[level]["spearman"]["mean"] == pytest.approx(1.0)
        assert same[level]["top_proponents"]["mean"] == 1.0
    flipped = consistency.agreement(ref, -ref, qs, patients, k=4)
    assert flipped["slices"]["spearman"]["mean"] == pytest.approx(-1.0)
    assert flipped["slices"]["top_proponents"]["mean"] == 0.0
    assert flipped["relative_error"] == pytest.approx(2.0)


def test_consistency_report_on_the_tiny_run(tiny_run, tmp_path):
    out = tmp_path / "consistency"
    assert consistency.main(["--out", str(out), "--workdir", str(tiny_run), "--dims", "16,256",
                             "--seeds", "1", "--identity-examples", "3,6", "--batch-size", "2",
                             "--check-dim", "256",
                             "--no-progress"]) == 0
    s = json.loads((out / "consistency.json").read_text())
    assert (out / "consistency.png").stat().st_size > 0
    assert s["epochs"] == [1, 2, 3]
    # identities on the real checkpoints hold to float32 round-off
    for name in ("head", "all"):
        ident = s["identities"][name]
        assert ident["sum_vs_total_max_rel_err"] < 2e-4, name
        assert ident["one_checkpoint_over_lr_vs_dot_products_max_rel_err"] < 2e-4, name
    for key, value in s["engine"].items():
        if isinstance(value, float):
            assert value < 1e-5, key
    # projection: the entry error shrinks with d and rankings agree at d = 256
    runs = s["projection"]["runs"]
    for kind in ("rademacher", "countsketch"):
        assert runs[kind]["256"][0]["relative_error"] < runs[kind]["16"][0]["relative_error"]
        assert runs[kind]["256"][0]["slices"]["spearman"]["mean"] > 0.9
    # every checkpoint set agrees with itself perfectly
    for name in ("head", "all"):
        assert s["checkpoints"][name]["all"]["slices"]["spearman"]["mean"] == pytest.approx(1.0)
    assert -1.0 <= s["head_vs_all"]["slices"]["spearman"]["mean"] <= 1.0
