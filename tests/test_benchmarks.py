"""The influence benchmark's pieces on a tiny U-Net: subset specs, data, the naive baseline, and
(with the optional ``bench`` extra installed) the PyTorch port and Captum's class-wise scores
against the engine's."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import numpy as np
import pytest

from benchmarks import influence as bench
from tracin_jax import influence as inf
from tracin_jax.models import UNet

TINY = bench.Case("tiny", width=4, size=16, n_train=4, n_test=2, checkpoints=2,
                  subsets=("head",), batch=2, depth=2)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    c = bench.prepare_case(TINY, tmp_path_factory.mktemp("bench"))
    c.torch_threads = 1
    return c


def test_parse_subset():
    assert bench.parse_subset("head") == ("head", None, 0)
    assert bench.parse_subset("all:exact") == ("all", None, 0)
    assert bench.parse_subset("all:countsketch1024") == ("all", "countsketch", 1024)
    assert bench.parse_subset("all:logra16") == ("all", "logra", 16)
    assert bench.parse_scaling("32x8,256x64") == [{"n_train": 32, "n_test": 8},
                                                  {"n_train": 256, "n_test": 64}]
    for bad in ("32", "32x", "0x4", "ax4"):
        with pytest.raises(ValueError, match="--scaling"):
            bench.parse_scaling(bad)


def test_topk_agreement():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2, 3, 40, 3))
    assert bench.topk_agreement(ref, ref) == 1.0
    assert bench.topk_agreement(-ref, ref) == 0.0  # top-10 of 40 against the bottom-10
    noisy = ref + 1e-3 * rng.normal(size=ref.shape)
    assert 0.8 < bench.topk_agreement(noisy, ref) <= 1.0


def test_synthetic_examples_have_every_class():
    ex = bench.synthetic_examples(6, 24, seed=0)
    assert ex.images.shape == (6, 24, 24, 4) and ex.labels.shape == (6, 24, 24)
    assert set(np.unique(ex.labels)) == {0, 1, 2, 3}


def _engine_head_scores(ctx):
    subset = inf.resolve_subset(ctx.variables[0]["params"], "head")
    grad_fn = inf.make_class_grad_fn(ctx.model, subset)
    scores, timing = bench.run_engine(ctx, grad_fn)
    return subset, scores, timing


def test_naive_baseline_equals_engine(ctx):
    subset, scores, timing = _engine_head_scores(ctx)
    assert scores.shape == (2, 3, 4, 3) and timing["s"] > 0
    naive, _ = bench.run_naive(ctx, subset)
    assert bench.max_rel_diff(naive, scores) < 1e-5


def test_torch_port_matches_flax_logits():
    pytest.importorskip("torch")
    from benchmarks import torch_unet

    model = UNet(width=4, depth=2)
    variables = bench.checkpoint_variables(model, 16, 0)  # random BatchNorm statistics
    assert torch_unet.check_equivalence(model, variables, (16, 16)) < 1e-4


def test_captum_classwise_scores_equal_engine_head(ctx, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("captum")
    _, scores, _ = _engine_head_scores(ctx)
    paths = bench.torch_checkpoints(ctx, tmp_path)
    captum_scores, info = bench.run_captum(ctx, "head", paths)
    assert captum_scores.shape == scores.shape
    # Captum weights each checkpoint by its lr once, as the engine does: same numbers.
    assert bench.max_rel_diff(captum_scores, scores) < 1e-4
    assert info["checkpoint_loads"] == 2 * (1 + 4 * 3 // TINY.batch)


def test_summary_table_lists_each_line():
    line = {"case": "c", "subset": "head", "projection": "exact",
            "train_step": {"gflops_per_s": 1.0}, "classgrad": {"gflops_per_s": 1.0,
                                                              "flop_rate_vs_train_step": 1.0},
            "engine": {"s": 1.0}, "checks": {}}
    table = bench.summary_table([line, {"xla_setting": "default"}])
    assert len(table.splitlines()) == 2 and "head" in table
