"""Run configuration: data, model and training settings, chosen by name and overridden by key.

Named configs (``get_config(name)``):

- ``paper``: the setting of Torda et al. (2024): 192x192 crops ``raw[27:219, 27:219, z]`` of the
  array as stored in the file (``data.crop_space=stored``, every config's default), slices z 90..99,
  width-64 U-Net (about 31.0M parameters), Adam lr 2e-4 b1 0.5, batch 10, 30 epochs,
  flip + resize-crop augmentation.
- ``demo``: small and fast on a laptop CPU: the same slices downsampled 2x to 96x96, a width-8
  U-Net with BatchNorm momentum 0.9, 6 epochs of soft Dice + cross-entropy.
- ``tiny``: for tests: 4 slices per case downsampled 6x to 32x32, width-4 U-Net of depth 2.

Overrides use dotted keys, e.g. ``train.epochs=3``, ``model.width=16``, ``data.slices=tumour``,
``model.arch=resunet`` (unet | deepseg | resunet | attention_unet; see :mod:`tracin_jax.models`).
A key that does not exist, or a value that does not parse as the field's type, raises
:class:`~tracin_jax.errors.InputError`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from tracin_jax.errors import InputError


@dataclass(frozen=True)
class DataConfig:
    layout: str = "auto"  # auto | brats2019 | brats2020 | brats2021 | brats2023 | msd
    modalities: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")  # channel order
    crop: tuple[int, int, int, int] = (27, 219, 27, 219)  # y0, y1, x0, x1 (in-plane, crop_space)
    slices: str = "90:100"  # "a:b" (half-open, in crop_space) or "tumour" (every slice with tumour)
    # Indices of crop and slices: "stored" = of the array as stored in the file (the paper's
    # raw[27:219, 27:219, z]), "canonical" = of the RAS-reoriented array. Arrays are RAS either way.
    crop_space: str = "stored"
    normalise: str = "paper"  # paper: 2x/max(x)-1 per case and channel | zscore: inside brain
    downsample: int = 1  # integer in-plane factor after cropping (mean-pool images, strided labels)
    test_fraction: float = 0.2
    split_seed: int = 1234
    max_cases: int = 0  # 0 = all cases found
    grades: str = "all"  # BraTS 2018/2019 only: all | HGG | LGG


@dataclass(frozen=True)
class ModelConfig:
    width: int = 64  # channels of the first encoder block
    depth: int = 4  # down-sampling stages; bridge has width * 2**depth channels
    norm: str = "batch"  # batch | group | none
    num_classes: int = 4
    bn_momentum: float = 0.99  # BatchNorm running statistics (Keras' default, the paper's model)
    # unet (the paper's) | deepseg | resunet | attention_unet, or a registered name
    # (tracin_jax.models.register_architecture)
    arch: str = "unet"


@dataclass(frozen=True)
class TrainConfig:
    optimizer: str = "adam"  # adam | sgd
    lr: float = 2e-4
    b1: float = 0.5
    b2: float = 0.999
    momentum: float = 0.0  # sgd only
    batch_size: int = 10
    epochs: int = 30
    seed: int = 0
    loss: str = "dice"  # dice | ce | dice+ce
    background_weight: float = 0.0
    dice_eps: float = 1e-6
    augment_flip: bool = False
    augment_resize_crop: bool = False
    resize_to: int = 250  # resize-crop augmentation: resize to this size (scaled with downsample)


@dataclass(frozen=True)
class Config:
    name: str = "paper"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _paper() -> Config:
    return Config(
        name="paper",
        data=DataConfig(grades="HGG"),
        train=TrainConfig(augment_flip=True, augment_resize_crop=True),
    )


def _demo() -> Config:
    return Config(
        name="demo",
        data=DataConfig(downsample=2),
        # BatchNorm momentum 0.9: with 0.99, 72 steps leave the running statistics half at their
        # start, and inference-mode Dice (evaluation, influence) is far below training-mode Dice.
        model=ModelConfig(width=8, bn_momentum=0.9),
        # Dice + cross-entropy: with soft Dice alone this small model, in 72 steps, lost NCR/NET
        # or ET entirely for 2 of 3 seeds (p_c -> 0 everywhere, where the Dice gradient vanishes).
        train=TrainConfig(epochs=6, lr=2e-3, b1=0.9, loss="dice+ce"),
    )


def _tiny() -> Config:
    return Config(
        name="tiny",
        data=DataConfig(slices="93:97", downsample=6),
        model=ModelConfig(width=4, depth=2),
        train=TrainConfig(epochs=2, batch_size=4, lr=3e-3, b1=0.9),
    )


CONFIGS = {"paper": _paper, "demo": _demo, "tiny": _tiny}


def get_config(name: str) -> Config:
    """Returns the named config (``paper``, ``demo`` or ``tiny``)."""
    if name not in CONFIGS:
        raise InputError(f"unknown config {name!r}: choose one of {', '.join(sorted(CONFIGS))}")
    return CONFIGS[name]()


def _parse_value(key: str, raw: str, current: Any) -> Any:
    try:
        if isinstance(current, bool):
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
        if isinstance(current, tuple):
            parts = [p for p in raw.replace("(", "").replace(")", "").split(",") if p.strip()]
            kind = type(current[0]) if current else str
            return tuple(kind(p.strip()) for p in parts)
        return raw
    except ValueError:
        raise InputError(
            f"config value {key}={raw!r} is not a valid {type(current).__name__}"
        ) from None


def apply_overrides(config: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Applies ``section.key=value`` overrides; unknown keys raise InputError."""
    for item in overrides:
        if "=" not in item:
            raise InputError(f"config override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key.count(".") != 1:
            raise InputError(f"config key {key!r} does not exist (use section.key, e.g. train.epochs)")
        section, name = key.split(".")
        if section not in ("data", "model", "train"):
            raise InputError(f"config key {key!r} does not exist: no section {section!r}")
        sub = getattr(config, section)
        if name not in {f.name for f in dataclasses.fields(sub)}:
            raise InputError(f"config key {key!r} does not exist")
        value = _parse_value(key, raw, getattr(sub, name))
        config = dataclasses.replace(config, **{section: dataclasses.replace(sub, **{name: value})})
    validate(config)
    return config


def validate(config: Config) -> None:
    """Checks values a typo could break; raises InputError naming the value."""
    from tracin_jax.models.registry import known_architectures

    d, m, t = config.data, config.model, config.train
    choices = {
        "model.arch": (m.arch, known_architectures()),
        "data.layout": (d.layout, ("auto", "brats2019", "brats2020", "brats2021", "brats2023", "msd")),
        "data.normalise": (d.normalise, ("paper", "zscore")),
        "data.crop_space": (d.crop_space, ("stored", "canonical")),
        "model.norm": (m.norm, ("batch", "group", "none")),
        "train.optimizer": (t.optimizer, ("adam", "sgd")),
        "train.loss": (t.loss, ("dice", "ce", "dice+ce")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise InputError(f"config value {key}={value!r} is not one of {', '.join(allowed)}")
    if len(d.crop) != 4 or d.crop[1] <= d.crop[0] or d.crop[3] <= d.crop[2]:
        raise InputError(f"config value data.crop={d.crop} must be y0,y1,x0,x1 with y1>y0, x1>x0")
    h, w = d.crop[1] - d.crop[0], d.crop[3] - d.crop[2]
    if d.downsample < 1 or h % d.downsample or w % d.downsample:
        raise InputError(f"config value data.downsample={d.downsample} must divide the crop {h}x{w}")
    size = (h // d.downsample, w // d.downsample)
    if size[0] % (2**m.depth) or size[1] % (2**m.depth):
        raise InputError(
            f"image size {size[0]}x{size[1]} is not divisible by 2**model.depth={2**m.depth}"
        )
    if d.slices != "tumour":
        try:
            a, b = (int(v) for v in d.slices.split(":"))
            if b <= a:
                raise ValueError
        except ValueError:
            raise InputError(f"config value data.slices={d.slices!r} must be 'a:b' with b>a, or 'tumour'") from None
    for key, value in (("model.width", m.width), ("model.depth", m.depth),
                       ("train.batch_size", t.batch_size), ("train.epochs", t.epochs)):
        if value < 1:
            raise InputError(f"config value {key}={value} must be at least 1")
    _check_floats(config)


# Float fields and the range each must lie in: (low, high, low inclusive, high inclusive).
# Every float must also be finite (nan and inf parse as floats).
FLOAT_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "data.test_fraction": (0.0, 1.0, False, False),
    "model.bn_momentum": (0.0, 1.0, True, False),
    "train.lr": (0.0, math.inf, False, False),
    "train.b1": (0.0, 1.0, True, False),
    "train.b2": (0.0, 1.0, True, False),
    "train.momentum": (0.0, math.inf, True, False),
    "train.background_weight": (0.0, math.inf, True, False),
    "train.dice_eps": (0.0, math.inf, False, False),
}


def _check_floats(config: Config) -> None:
    """Every float value is finite and in its range (``FLOAT_RANGES``); raises InputError."""
    for section in ("data", "model", "train"):
        sub = getattr(config, section)
        for f in dataclasses.fields(sub):
            value = getattr(sub, f.name)
            if not isinstance(value, float) or isinstance(value, bool):
                continue
            key = f"{section}.{f.name}"
            if not math.isfinite(value):
                raise InputError(f"config value {key}={value} must be a finite number")
            lo, hi, lo_in, hi_in = FLOAT_RANGES.get(key, (-math.inf, math.inf, True, True))
            if value < lo or value > hi or (value == lo and not lo_in) or (value == hi and not hi_in):
                span = f"{'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"
                raise InputError(f"config value {key}={value} must lie in {span}")


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Inverse of ``Config.to_dict`` (lists become tuples).

    A ``data`` section without ``crop_space`` was written before that key existed, when the crop
    indexed the canonical array: it is read as ``crop_space="canonical"`` so the run's data stay
    what it was trained on.
    """
    def build(cls, values):
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in values:
                v = values[f.name]
                kwargs[f.name] = tuple(v) if isinstance(v, list) else v
        return cls(**kwargs)

    data = dict(raw.get("data", {}))
    if data and "crop_space" not in data:
        data["crop_space"] = "canonical"
    return Config(
        name=raw.get("name", "custom"),
        data=build(DataConfig, data),
        model=build(ModelConfig, raw.get("model", {})),
        train=build(TrainConfig, raw.get("train", {})),
    )
