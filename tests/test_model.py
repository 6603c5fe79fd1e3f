import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracin_jax.config import ModelConfig
from tracin_jax.models import UNet, build_unet, count_params
from tracin_jax.training.train import init_variables


def test_paper_unet_has_31m_parameters():
    model = build_unet(ModelConfig())  # width 64, depth 4, BatchNorm, 4 classes
    shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), (192, 192, 4)))
    n = count_params(shapes["params"])
    assert n == 31_038_404
    assert round(n / 1e6, 1) == 31.0
    # Encoder 64-128-256-512, bridge 1024, 1x1 head to 4 classes.
    p = shapes["params"]
    assert [p[f"enc{k}"]["conv1"]["kernel"].shape[-1] for k in range(4)] == [64, 128, 256, 512]
    assert p["bridge"]["conv1"]["kernel"].shape == (3, 3, 1024, 1024)
    assert p["head"]["kernel"].shape == (1, 1, 64, 4)


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_unet_shapes_and_features(norm):
    model = UNet(width=4, depth=2, norm=norm)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 4))
    variables = init_variables(model, jax.random.key(0), (16, 16, 4))
    # jitted: one program (eager application would compile every primitive on its own)
    logits, feats = jax.jit(lambda v, x: model.apply(v, x, train=False, return_features=True))(
        variables, x)
    assert logits.shape == (2, 16, 16, 4)
    assert feats.shape == (2, 16, 16, 4)  # width channels at full resolution
    # The head is a 1x1 conv of the features: the last hidden map fully determines the logits.
    head = variables["params"]["head"]
    again = jnp.einsum("bhwf,fk->bhwk", feats, head["kernel"][0, 0]) + head["bias"]
    np.testing.assert_allclose(logits, again, rtol=1e-5, atol=1e-5)
    assert bool(variables["batch_stats"]) == (norm == "batch")


def test_batchnorm_inference_mode_is_per_example():
    model = UNet(width=4, depth=2, norm="batch")
    variables = init_variables(model, jax.random.key(0), (16, 16, 4))
    x = jax.random.normal(jax.random.key(2), (3, 16, 16, 4))
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    together = apply(variables, x)
    alone = apply(variables, x[:1])
    np.testing.assert_allclose(together[:1], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_init_variables_has_the_structure_and_law_of_model_init(norm):
    """Same tree, shapes and dtypes as Flax's model.init; kernels LeCun-normal (std 1/sqrt(fan_in),
    truncated at 2 std), scales 1, biases and running means 0, running variances 1."""
    model = UNet(width=8, depth=1, norm=norm)
    ref = jax.jit(lambda k: model.init(k, jnp.zeros((1, 8, 8, 4)), train=False))(jax.random.key(0))
    ref = {"params": ref["params"], "batch_stats": ref.get("batch_stats", {})}
    got = init_variables(model, jax.random.key(0), (8, 8, 4))
    assert jax.tree.structure(got) == jax.tree.structure(ref)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(ref)):
        assert (a.shape, a.dtype) == (b.shape, b.dtype), jax.tree_util.keystr(path)
        name = path[-1].key
        if name == "kernel":
            std = 1 / np.sqrt(np.prod(a.shape[:-1]))
            assert np.max(np.abs(a)) <= 2 * std / 0.8796 + 1e-6
            if a.size >= 2000:
                assert float(np.std(a)) == pytest.approx(std, rel=0.1)
                assert float(np.std(a)) == pytest.approx(float(np.std(b)), rel=0.1)
        else:
            np.testing.assert_array_equal(a, b)


def test_init_variables_is_deterministic_in_the_key_and_traceable():
    model = UNet(width=4, depth=2)
    a = init_variables(model, jax.random.key(3), (16, 16, 4))
    b = init_variables(model, jax.random.key(3), (16, 16, 4))
    c = init_variables(model, jax.random.key(4), (16, 16, 4))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.allclose(a["params"]["enc0"]["conv0"]["kernel"], c["params"]["enc0"]["conv0"]["kernel"])
    # Under tracing (run.py and influence use jax.eval_shape; jit works too) the law is the same.
    traced = jax.jit(lambda k: init_variables(model, k, (16, 16, 4)))(jax.random.key(3))
    k = traced["params"]["dec0"]["conv0"]["kernel"]
    assert k.shape == a["params"]["dec0"]["conv0"]["kernel"].shape
    assert float(np.std(k)) == pytest.approx(1 / np.sqrt(np.prod(k.shape[:-1])), rel=0.15)


def test_bn_momentum_sets_the_running_statistics_update():
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4)) + 3.0
    means = []
    for momentum in (0.99, 0.5):
        model = UNet(width=4, depth=1, bn_momentum=momentum)
        variables = init_variables(model, jax.random.key(0), (8, 8, 4))
        _, state = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
            variables, x)
        means.append(np.asarray(state["batch_stats"]["enc0"]["norm0"]["mean"]))
    # new = momentum * old (0) + (1 - momentum) * batch mean
    np.testing.assert_allclose(means[0] / 0.01, means[1] / 0.5, rtol=1e-4, atol=1e-5)
    assert np.abs(means[1]).max() > 0
