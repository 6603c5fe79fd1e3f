"""experiments.paper_scale: peak table, checkpoint choice, FLOP counting, and the --small run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import paper_scale  # noqa: E402


def test_device_peak_table():
    assert paper_scale.device_peak("NVIDIA H100 80GB HBM3")[:2] == ("H100", 494.7)
    assert paper_scale.device_peak("NVIDIA H100 PCIe")[0] == "H100 PCIe"
    assert paper_scale.device_peak("NVIDIA H200")[0] == "H200"
    assert paper_scale.device_peak("NVIDIA A100-SXM4-80GB")[1] == 156.0
    assert paper_scale.device_peak("cpu") == (None, None, None)


def test_paper_checkpoints():
    assert paper_scale.paper_checkpoints(list(range(1, 31))) == [6, 8, 10, 12, 14]
    assert paper_scale.paper_checkpoints(list(range(1, 11))) == [6, 8, 10]
    assert paper_scale.paper_checkpoints([1, 2, 3]) == [1, 3]


def test_xla_flops_counts_a_matmul():
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda a, b: a @ b)
    flops = paper_scale.xla_flops(f, jnp.ones((8, 16)), jnp.ones((16, 32)))
    if flops is None:
        pytest.skip("this backend has no cost analysis")
    assert flops == pytest.approx(2 * 8 * 16 * 32, rel=0.01)


def test_small_run_reports_time_rate_and_flops(tmp_path):
    workdir = tmp_path / "paper-small"
    assert paper_scale.main(["--small", "--workdir", str(workdir), "--proj-dim", "32",
                             "--batch-size", "2", "--no-progress"]) == 0
    r = json.loads((workdir / "paper-scale" / "paper_scale.json").read_text())
    assert r["dataset"]["n_train"] == 16 and r["dataset"]["n_test"] == 8
    assert r["checkpoints"] == [2]
    for name in ("head", "all"):
        s = r["subsets"][name]
        assert s["wall_s"] > 0 and s["train_examples_per_s"] > 0
        assert not s["store_reused"]
        assert s["cost"]["gflop_per_example"] > 0
        assert s["cost"]["steady_examples_per_s"] > 0
        if r["peak"]["tflops"] == "unknown":
            assert s["engine_fraction_of_peak"] == "unknown"
    assert r["subsets"]["all"]["projection"] == {"dim": 32, "seed": 0, "kind": "countsketch"}
    # CountSketch (the default): one multiply-add per parameter and class, whatever d.
    assert r["subsets"]["all"]["cost"]["gflop_per_example_projection"] == pytest.approx(
        2 * 3 * r["subsets"]["all"]["param_count"] / 1e9, rel=1e-3)
    assert r["subsets"]["head"]["cost"]["gflop_per_example_projection"] == 0.0
    # the influence stage alone, on the trained run, with a given peak
    assert paper_scale.main(["--small", "--workdir", str(workdir), "--influence-only", "--subsets",
                             "head", "--peak-tflops", "1.0", "--batch-size", "2", "--no-progress"]) == 0
    r = json.loads((workdir / "paper-scale" / "paper_scale.json").read_text())
    assert r["peak"]["tflops"] == 1.0
    assert isinstance(r["subsets"]["head"]["engine_fraction_of_peak"], float)
    assert "training_wall_s" not in r
