"""The architectures of ``model.arch`` (unet, deepseg, resunet, attention_unet) and the one model
interface: shapes, parameter counts, a training step, head-path class gradients against a
brute-force ``jax.grad`` loop, and the whole pipeline (train, ``all``-parameter influence,
report) on a tiny config; a user's own module plugged in through the registry."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from tracin_jax.config import ModelConfig, apply_overrides, get_config
from tracin_jax.errors import InputError
from tracin_jax.influence import is_head_subset, make_class_grad_fn, resolve_subset
from tracin_jax.influence.reference import brute_force_class_grads
from tracin_jax.models import (ARCHITECTURES, build_model, count_params, features_apply,
                               head_name, known_architectures, register_architecture)
from tracin_jax.training.train import init_variables, make_optimizer, make_train_step

ARCHS = ("unet", "deepseg", "resunet", "attention_unet")
# Trainable parameters at the paper's width (64), depth 4, 4 channels, 4 classes, BatchNorm.
PAPER_PARAMS = {"unet": 31_038_404, "deepseg": 31_038_404, "resunet": 33_137_412,
                "attention_unet": 32_433_928}


def _tiny_model(arch, norm="batch"):
    """Width 4, depth 1: one skip connection (with its attention gate or residual blocks)."""
    return build_model(ModelConfig(arch=arch, width=4, depth=1, norm=norm))


def _close(got, want, rel=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=rel, atol=rel * np.abs(want).max())


def test_registry_names_the_four_architectures():
    assert known_architectures() == tuple(sorted(ARCHS))
    assert get_config("paper").model.arch == "unet"  # the paper's stays the default


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_count_at_the_paper_width(arch):
    model = build_model(ModelConfig(arch=arch))
    shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), (192, 192, 4)))
    assert count_params(shapes["params"]) == PAPER_PARAMS[arch]
    assert shapes["params"]["head"]["kernel"].shape == (1, 1, 64, 4)
    out = jax.eval_shape(lambda v: features_apply(model, v, jnp.zeros((2, 192, 192, 4))), shapes)
    assert out[0].shape == (2, 192, 192, 4) and out[1].shape == (2, 192, 192, 64)


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_training_step_and_class_gradients(arch):
    """One tiny model per architecture (16 x 16): features and per-example inference, head-path
    and ``all`` class gradients against a brute-force loop, one training step."""
    model = _tiny_model(arch)
    variables = init_variables(model, jax.random.key(0), (16, 16, 4))
    assert variables["batch_stats"]

    # Shapes: the head is a 1x1 conv of the features, so the last hidden map fully determines
    # the logits.
    # Jitted: eager Flax runs every operation as its own compiled program.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 16, 16, 4)).astype(np.float32)
    logits, feats = map(np.asarray, jax.jit(lambda v, x: features_apply(model, v, x))(variables, x))
    assert logits.shape == (3, 16, 16, 4) and feats.shape == (3, 16, 16, 4)
    head = jax.tree.map(np.asarray, variables["params"][head_name(model)])
    again = np.einsum("bhwf,fk->bhwk", feats, head["kernel"][0, 0]) + head["bias"]
    np.testing.assert_allclose(logits, again, rtol=1e-5, atol=1e-5)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    np.testing.assert_allclose(apply(variables, x), logits, rtol=1e-6, atol=1e-6)
    # BatchNorm in inference mode: an example's output does not depend on the rest of the batch.
    np.testing.assert_allclose(apply(variables, x[:1]), logits[:1], rtol=1e-5, atol=1e-5)

    # Class gradients (head path and 'all') equal one jax.grad per example and class.
    images = rng.normal(size=(2, 16, 16, 4)).astype(np.float32)
    labels = rng.choice(4, size=(2, 16, 16), p=[0.55, 0.15, 0.15, 0.15]).astype(np.int32)
    for spec in ("head/.*", "all"):
        subset = resolve_subset(variables["params"], spec)
        fn = make_class_grad_fn(model, subset)
        assert is_head_subset(model, subset) == (spec == "head/.*")
        ref = brute_force_class_grads(model, subset, variables, images, labels)
        _close(fn(variables, images, labels), ref)

    # One training step (last: it donates the variables): every parameter moves; running
    # statistics update.
    tcfg = get_config("tiny").train
    tx = make_optimizer(tcfg)
    before = jax.tree.map(np.asarray, variables)
    step = make_train_step(model, tx, tcfg, (16, 16))
    xb = rng.normal(size=(2, 16, 16, 4)).astype(np.float32)
    yb = rng.integers(0, 4, size=(2, 16, 16)).astype(np.int32)
    new, _, loss = step(variables, tx.init(variables["params"]), xb, yb, jax.random.key(4))
    assert np.isfinite(float(loss))
    for part in ("params", "batch_stats"):
        moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), new[part], before[part])
        assert all(jax.tree.leaves(moved)), part


def test_unknown_architecture_is_one_line_error_listing_the_known_ones():
    with pytest.raises(InputError) as e:
        apply_overrides(get_config("tiny"), ["model.arch=vnet"])
    msg = str(e.value)
    assert "\n" not in msg and "'vnet'" in msg and "model.arch" in msg
    assert all(a in msg for a in ARCHS)
    with pytest.raises(InputError, match="attention_unet, deepseg, resunet, unet"):
        build_model(dataclasses.replace(ModelConfig(), arch="vnet"))


def test_cli_unknown_architecture_exits_2_with_one_line(tmp_path, capsys):
    from tracin_jax.cli import main

    code = main(["train", "--data", str(tmp_path), "--workdir", str(tmp_path / "run"),
                 "--config", "tiny", "--set", "model.arch=vnet"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tracin-jax: error:") and "resunet" in lines[0]
    assert not (tmp_path / "run").exists()


class UserNet(nn.Module):
    """A user's own model: its head is called ``classifier``, and it has no BatchNorm."""

    head_name = "classifier"

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        h = nn.relu(nn.Conv(6, (3, 3), name="body")(x))
        logits = nn.Conv(4, (1, 1), name="classifier")(h)
        return (logits, h) if return_features else logits


def test_user_model_head_path_through_the_interface(monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, "usernet", lambda cfg: UserNet())
    cfg = apply_overrides(get_config("tiny"), ["model.arch=usernet"])  # registered: accepted
    model = build_model(cfg.model)
    variables = init_variables(model, jax.random.key(0), (8, 8, 4))
    subset = resolve_subset(variables["params"], "head", head=head_name(model))
    assert subset.paths == ("classifier/kernel",)
    both = resolve_subset(variables["params"], "classifier/.*")
    assert is_head_subset(model, both)
    rng = np.random.default_rng(1)
    images = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
    labels = rng.choice(4, size=(2, 8, 8)).astype(np.int32)
    fast = make_class_grad_fn(model, both)
    slow = make_class_grad_fn(model, both, method="vjp")
    _close(fast(variables, images, labels), slow(variables, images, labels))
    _close(fast(variables, images, labels),
           brute_force_class_grads(model, both, variables, images, labels))


def test_register_architecture_refuses_bad_names():
    with pytest.raises(InputError, match="identifier"):
        register_architecture("my net", lambda cfg: UserNet())
    assert "my net" not in ARCHITECTURES


# The parameter subset of each pipeline's influence: 'all' (the engine's VJP path, projected)
# for one architecture, the head for the others ('all' class gradients of every architecture
# are checked against a brute-force loop above).
PIPELINE_PARAMS = {"deepseg": "head", "resunet": "head", "attention_unet": "all"}


@pytest.fixture(scope="module", params=list(PIPELINE_PARAMS))
def arch_pipeline(request, tiny_data, tmp_path_factory):
    """Per architecture: a tiny run (depth 1, 1 epoch), its influence, its report."""
    from tracin_jax.explain import run_explain
    from tracin_jax.influence import run_influence
    from tracin_jax.training.train import train_and_evaluate

    arch = request.param
    root = tmp_path_factory.mktemp(f"arch_{arch}")
    train_and_evaluate(tiny_config(f"model.arch={arch}", "model.depth=1", "train.epochs=1"), tiny_data,
                       root / "run", progress=False, log=lambda s: None)
    meta = run_influence(root / "run", root / "influence", params=PIPELINE_PARAMS[arch],
                         proj_dim=64, batch_size=2, progress=False)
    metrics = run_explain(root / "run", root / "influence", root / "report", k=2,
                          items_per_class=1, n_permutations=20, random_seeds=2, progress=False)
    return arch, root, meta, metrics


def test_pipeline_runs_on_each_architecture(arch_pipeline):
    from tracin_jax.run import load_run

    arch, root, meta, metrics = arch_pipeline
    run = load_run(root / "run")
    assert run.config.model.arch == arch and type(run.model) is type(_tiny_model(arch))
    params = run.checkpoints[-1].variables["params"]
    assert meta["params"]["name"] == PIPELINE_PARAMS[arch]
    want = count_params(params) if PIPELINE_PARAMS[arch] == "all" else params["head"]["kernel"].size
    assert meta["params"]["size"] == want
    scores = np.load(root / "influence" / "scores.npy")
    assert scores.shape == (len(run.test.ids), 3, len(run.train.ids), 3)
    assert np.isfinite(scores).all() and np.abs(scores).max() > 0
    assert (root / "report" / "index.html").exists()
    sel = metrics["selection"]
    assert sel["n_filters"] == run.config.model.width
    assert set(sel["per_class"]) == {"NCR/NET", "ED", "ET"}


def test_selected_vs_other_log_fi():
    from experiments.architectures import selected_vs_other

    gap = np.array([np.e, np.e**3, 1.0, 0.0, np.nan, -np.e])
    sel = np.array([False, True, False, False, True, False])
    r = selected_vs_other(gap, sel)  # zero and NaN gaps have no log and are left out
    assert r["selected_mean_log_fi"] == pytest.approx(3.0)
    assert r["other_mean_log_fi"] == pytest.approx((1 + 0 + 1) / 3)
    assert r["difference"] == pytest.approx(3.0 - 2 / 3)
    assert (r["n_selected"], r["n_filters"]) == (2, 6)
    assert np.isnan(selected_vs_other(gap, np.zeros(6, bool))["selected_mean_log_fi"])


def test_experiment_table_and_panel_from_a_report(arch_pipeline, tmp_path):
    from experiments.architectures import architecture_row, plot_panel, summary_table

    arch, root, meta, metrics = arch_pipeline
    row = architecture_row(metrics)
    sel = metrics["selection"]
    for c, name in enumerate(("NCR/NET", "ED", "ET")):
        assert row[name]["n_selected"] == sel["per_class"][name]["n_selected"]
        assert row[name]["test_dice"] == sel["baseline_dice"]["test"]["baseline"][name]
        assert row[name]["n_filters"] == sel["n_filters"]
    entry = {"parameters": 1234, "classes": row,
             "gap": {n: sel["per_class"][n]["gap"] for n in row},
             "selected": {n: np.isin(np.arange(sel["n_filters"]), sel["per_class"][n]["selected"])
                          for n in row}}
    table = summary_table({arch: entry})
    assert table.count("\n") == 1 + 3 and "1,234" in table
    plot_panel({arch: entry, "other": entry}, tmp_path / "panel.png")
    assert (tmp_path / "panel.png").stat().st_size > 0
