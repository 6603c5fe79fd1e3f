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
    logits, feats = model.apply(variables, x, train=False, return_features=True)
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
    together = model.apply(variables, x, train=False)
    alone = model.apply(variables, x[:1], train=False)
    np.testing.assert_allclose(together[:1], alone, rtol=1e-5, atol=1e-5)
