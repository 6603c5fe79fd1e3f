"""``model.dims=3``: the 3D version of every architecture (one definition per architecture,
parameterised by the number of spatial dimensions), its model interface, a training step, and
the one-line errors of a dimensionality an architecture does not have."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tracin_jax.config import (ModelConfig, apply_overrides, check_spatial_shape, get_config,
                               validate)
from tracin_jax.errors import InputError
from tracin_jax.models import (ARCHITECTURE_DIMS, ARCHITECTURES, build_model, features_apply,
                               head_name, register_architecture, supported_dims)
from tracin_jax.training.train import init_variables, make_optimizer, make_train_step

ARCHS = ("unet", "deepseg", "resunet", "attention_unet")
SIZE, CIN, K = 8, 2, 3  # 8^3 volumes, 2 channels, 3 classes (background + 2)


def _model(arch, dims=3, **kw):
    cfg = dict(arch=arch, width=2, depth=1, num_classes=K, dims=dims)
    return build_model(ModelConfig(**{**cfg, **kw}))


def _shapes(model, spatial):
    return jax.eval_shape(lambda: init_variables(model, jax.random.key(0), (*spatial, CIN)))


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("arch", ARCHS)
def test_3d_version_has_the_2d_layers_with_one_more_axis(arch):
    """Same parameter names as the 2D model; every conv kernel gains one spatial axis of the
    same size (3x3 -> 3x3x3, 2x2 -> 2x2x2, the 1x1 head -> 1x1x1); other leaves are equal."""
    flat2 = traverse_util.flatten_dict(_shapes(_model(arch, 2), (SIZE,) * 2), sep="/")
    flat3 = traverse_util.flatten_dict(_shapes(_model(arch, 3), (SIZE,) * 3), sep="/")
    assert sorted(flat2) == sorted(flat3)
    for path, leaf in flat2.items():
        s2, s3 = leaf.shape, flat3[path].shape
        if path.endswith("/kernel"):
            assert s3 == s2[:1] + s2[:-2] + s2[-2:] and len(set(s2[:-2])) == 1, path
        else:
            assert s3 == s2, path
    assert flat3["params/head/kernel"].shape == (1, 1, 1, 2, K)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shapes_and_the_model_interface(arch):
    """f32[B,D,H,W,Cin] -> logits f32[B,D,H,W,K] and features f32[B,D,H,W,width]; the 1x1x1
    head reads the features voxel by voxel; inference mode does not mix the examples."""
    model = _model(arch)
    assert model.dims == 3 and head_name(model) == "head"
    variables = init_variables(model, jax.random.key(0), (SIZE,) * 3 + (CIN,))
    x = np.random.default_rng(0).normal(size=(2, SIZE, SIZE, SIZE, CIN)).astype(np.float32)
    fwd = jax.jit(lambda v, x: features_apply(model, v, x))
    logits, feats = map(np.asarray, fwd(variables, x))
    assert logits.shape == (2, SIZE, SIZE, SIZE, K) and feats.shape == (2, SIZE, SIZE, SIZE, 2)
    head = jax.tree.map(np.asarray, variables["params"]["head"])
    again = np.einsum("bdhwf,fk->bdhwk", feats, head["kernel"][0, 0, 0]) + head["bias"]
    np.testing.assert_allclose(logits, again, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fwd(variables, x[1:])[0], logits[1:], rtol=1e-5, atol=1e-5)


def test_one_3d_training_step_moves_every_parameter():
    model = _model("unet")
    variables = init_variables(model, jax.random.key(1), (SIZE,) * 3 + (CIN,))
    before = jax.tree.map(np.asarray, variables)
    tcfg = get_config("tiny").train
    tx = make_optimizer(tcfg)
    step = make_train_step(model, tx, tcfg, (SIZE, SIZE))
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, SIZE, SIZE, SIZE, CIN)).astype(np.float32)
    y = rng.integers(0, K, size=(2, SIZE, SIZE, SIZE)).astype(np.int32)
    new, _, loss = step(variables, tx.init(variables["params"]), x, y, jax.random.key(3))
    assert np.isfinite(float(loss))
    for part in ("params", "batch_stats"):
        moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), new[part], before[part])
        assert all(jax.tree.leaves(moved)), part


def test_dims_is_a_config_key_and_2d_stays_the_default():
    assert ModelConfig().dims == 2 and get_config("paper").model.dims == 2
    cfg = apply_overrides(get_config("tiny"), ["model.dims=3", "model.arch=resunet"])
    assert cfg.model.dims == 3 and build_model(cfg.model).dims == 3
    assert all(supported_dims(a) == (2, 3) for a in ARCHS)


class Flat2D(nn.Module):
    """A user's model with only a 2D version."""

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        h = nn.relu(nn.Conv(4, (3, 3), name="body")(x))
        logits = nn.Conv(K, (1, 1), name="head")(h)
        return (logits, h) if return_features else logits


class Flat(nn.Module):
    """A user's model written for both dimensionalities."""

    dims: int = 2

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        h = nn.relu(nn.Conv(4, (3,) * self.dims, name="body")(x))
        logits = nn.Conv(K, (1,) * self.dims, name="head")(h)
        return (logits, h) if return_features else logits


def test_an_architecture_without_a_3d_version_is_a_one_line_error(monkeypatch):
    for name in ("flat2d", "flat"):  # removed from the registry at the end of the test
        monkeypatch.setitem(ARCHITECTURES, name, None)
        monkeypatch.setitem(ARCHITECTURE_DIMS, name, ())
    register_architecture("flat2d", lambda cfg: Flat2D())  # 2D only, the default
    assert supported_dims("flat2d") == (2,)
    apply_overrides(get_config("tiny"), ["model.arch=flat2d"])  # 2D: accepted
    with pytest.raises(InputError) as e:
        apply_overrides(get_config("tiny"), ["model.arch=flat2d", "model.dims=3"])
    msg = _one_line(e)
    assert "'flat2d'" in msg and "model.dims=3" in msg and "no 3D version" in msg
    with pytest.raises(InputError, match="'flat2d' has no 3D version"):
        build_model(dataclasses.replace(ModelConfig(), arch="flat2d", dims=3))

    # Registered for both: its build reads model.dims.
    register_architecture("flat", lambda cfg: Flat(dims=cfg.dims), dims=(2, 3))
    model = build_model(ModelConfig(arch="flat", dims=3))
    shapes = _shapes(model, (SIZE,) * 3)
    assert shapes["params"]["head"]["kernel"].shape == (1, 1, 1, 4, K)
    for bad in ((4,), (), "3", (2, 7)):
        with pytest.raises(InputError, match="dims must list values among 2, 3"):
            register_architecture("flat", lambda cfg: Flat(), dims=bad)


@pytest.mark.parametrize("value", ["1", "4", "0"])
def test_other_dims_are_one_line_errors(value):
    with pytest.raises(InputError) as e:
        apply_overrides(get_config("tiny"), [f"model.dims={value}"])
    assert f"model.dims={value} is not one of 2, 3" in _one_line(e)


def test_a_known_3d_shape_must_be_divisible_by_2_to_the_depth():
    check_spatial_shape((16, 32, 32), 4, "data.patch")
    with pytest.raises(InputError) as e:
        check_spatial_shape((12, 32, 32), 3, "data.patch")
    assert _one_line(e) == "data.patch 12x32x32 is not divisible by 2**model.depth=8"
    # The volume the data config fixes is checked in 3D (the 2D in-plane crop is not used).
    cfg = apply_overrides(get_config("tiny"), ["model.dims=3", "data.downsample=1",
                                               "data.volume=32,32,32"])
    with pytest.raises(InputError, match=r"data.volume=32,32,32 after data.downsample=1: "
                                         r"32x32x32 is not divisible by 2\*\*model.depth=64"):
        validate(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, depth=6)))


def test_cli_refuses_a_bad_dims_in_one_line(tmp_path, capsys):
    from tracin_jax.cli import main

    code = main(["train", "--data", str(tmp_path), "--workdir", str(tmp_path / "run"),
                 "--config", "tiny", "--set", "model.dims=4"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tracin-jax: error:") and "model.dims" in err
    assert not (tmp_path / "run").exists()
