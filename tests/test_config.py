import pytest

from tracin_jax.config import apply_overrides, config_from_dict, get_config
from tracin_jax.errors import InputError


def test_paper_config_is_the_papers_setting():
    c = get_config("paper")
    assert c.data.crop == (27, 219, 27, 219) and c.data.slices == "90:100"
    assert c.data.split_seed == 1234 and c.data.test_fraction == 0.2
    assert (c.model.width, c.model.depth) == (64, 4)
    assert (c.train.optimizer, c.train.lr, c.train.b1, c.train.batch_size, c.train.epochs) == ("adam", 2e-4, 0.5, 10, 30)
    assert c.train.augment_flip and c.train.augment_resize_crop
    assert c.model.bn_momentum == 0.99  # Keras' BatchNorm default, the paper's model
    assert get_config("demo").model.bn_momentum == 0.9 and get_config("demo").train.loss == "dice+ce"
    assert c.train.loss == "dice"


def test_overrides_parse_types_and_round_trip():
    c = apply_overrides(get_config("demo"), ["train.epochs=3", "model.norm=group", "data.crop=0,96,0,96",
                                             "train.augment_flip=true", "train.lr=1e-3"])
    assert c.train.epochs == 3 and c.model.norm == "group" and c.data.crop == (0, 96, 0, 96)
    assert c.train.augment_flip is True and c.train.lr == 1e-3
    assert config_from_dict(c.to_dict()) == c


@pytest.mark.parametrize("override, needle", [
    ("train.epoch=3", "train.epoch"),
    ("optim.lr=1", "optim"),
    ("train.epochs=three", "train.epochs='three'"),
    ("model.norm=layer", "model.norm='layer'"),
    ("data.slices=9-3", "data.slices"),
    ("epochs", "epochs"),
    ("data.downsample=5", "data.downsample=5"),
])
def test_bad_overrides_name_the_value(override, needle):
    with pytest.raises(InputError, match=None) as e:
        apply_overrides(get_config("demo"), [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unknown_config_name():
    with pytest.raises(InputError, match="unknown config 'big'"):
        get_config("big")


@pytest.mark.parametrize("override, needle", [
    ("train.lr=nan", "train.lr=nan must be a finite number"),
    ("train.lr=inf", "train.lr=inf must be a finite number"),
    ("train.lr=-1e-3", "train.lr=-0.001 must lie in (0, inf)"),
    ("train.lr=0", "train.lr=0.0 must lie in (0, inf)"),
    ("train.b1=1", "train.b1=1.0 must lie in [0, 1)"),
    ("train.b2=-0.1", "train.b2=-0.1 must lie in [0, 1)"),
    ("train.momentum=-0.5", "train.momentum=-0.5 must lie in [0, inf)"),
    ("train.dice_eps=0", "train.dice_eps=0.0 must lie in (0, inf)"),
    ("train.background_weight=-inf", "train.background_weight=-inf must be a finite number"),
    ("data.test_fraction=nan", "data.test_fraction=nan must be a finite number"),
])
def test_non_finite_or_out_of_range_floats_are_refused(override, needle):
    with pytest.raises(InputError) as e:
        apply_overrides(get_config("demo"), [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_good_float_edges_are_accepted():
    c = apply_overrides(get_config("demo"), ["train.b1=0", "train.momentum=0", "train.background_weight=0"])
    assert (c.train.b1, c.train.momentum, c.train.background_weight) == (0.0, 0.0, 0.0)
