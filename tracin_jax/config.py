"""Run configuration: data, model and training settings, chosen by name and overridden by key.

Named configs (``get_config(name)``):

- ``paper``: the setting of Torda et al. (2024): 192x192 crops ``raw[27:219, 27:219, z]`` of the
  array as stored in the file (``data.crop_space=stored``, every config's default), slices z 90..99,
  width-64 U-Net (about 31.0M parameters), Adam lr 2e-4 b1 0.5, batch 10, 30 epochs,
  flip + resize-crop augmentation.
- ``demo``: small and fast on a laptop CPU: the same slices downsampled 2x to 96x96, a width-8
  U-Net with BatchNorm momentum 0.9, 6 epochs of soft Dice + cross-entropy.
- ``tiny``: for tests: 4 slices per case downsampled 6x to 32x32, width-4 U-Net of depth 2.
- ``demo3d``: the 3D demo (``tracin-jax demo --dims 3``): whole volumes (one per case) of the
  synthetic nnU-Net task at 48x48x48, a width-8 3D U-Net of depth 3 with BatchNorm momentum
  0.9, one volume per step at lr 1e-2, 6 epochs of soft Dice + cross-entropy.

Overrides use dotted keys, e.g. ``train.epochs=3``, ``model.width=16``, ``data.slices=tumour``,
``model.arch=resunet`` (unet | deepseg | resunet | attention_unet; see :mod:`tracin_jax.models`),
``model.dims=3`` (the architecture's 3D version, on volumes: one example per case, the window
``data.volume``, training patches ``data.patch``; options that index slices are refused,
:data:`OPTIONS_2D_ONLY`).
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
    layout: str = "auto"  # auto | brats2019 | brats2020 | brats2021 | brats2023 | msd | nnunet
    modalities: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")  # channel order
    crop: tuple[int, int, int, int] = (27, 219, 27, 219)  # y0, y1, x0, x1 (in-plane, crop_space)
    # "a:b" (half-open, in crop_space) or "tumour" = "foreground" (every slice with a foreground class)
    slices: str = "90:100"
    # Indices of crop and slices: "stored" = of the array as stored in the file (the paper's
    # raw[27:219, 27:219, z]), "canonical" = of the RAS-reoriented array; "centre" = a window of
    # the crop's size centred on each case (background padding where a case is smaller). Arrays
    # are RAS in every case.
    crop_space: str = "stored"
    normalise: str = "paper"  # paper: 2x/max(x)-1 per case and channel | zscore: inside brain
    downsample: int = 1  # integer in-plane factor after cropping (mean-pool images, strided labels)
    test_fraction: float = 0.2
    split_seed: int = 1234
    max_cases: int = 0  # 0 = all cases found
    grades: str = "all"  # BraTS 2018/2019 only: all | HGG | LGG
    # Non-BraTS tasks (nnU-Net, MSD other than Task01) only: replace the BraTS settings above
    # (layout, modalities, crop, crop_space, slices, normalise, grades) by ones chosen from the
    # data (every channel, the whole in-plane extent centred, the slices with foreground, zscore;
    # docs/your-task.md); training records the chosen values with auto=false. BraTS ignores it.
    auto: bool = True
    # 3D runs only (model.dims=3; one example = one case's volume, docs/your-task.md). volume:
    # the window X,Y,Z (canonical RAS voxels, before downsampling) centred on each case, padded
    # with background where a case is smaller; 0,0,0 = the largest case rounded up to a multiple
    # of downsample * 2**model.depth (training records the value chosen). patch: train on random
    # patches of X,Y,Z voxels (after downsampling) of the volumes; 0,0,0 = whole volumes. With a
    # patch, whole volumes are seen through a sliding window of the patch's size whose windows
    # overlap by patch_overlap of their size (outputs averaged where they overlap).
    volume: tuple[int, int, int] = (0, 0, 0)
    patch: tuple[int, int, int] = (0, 0, 0)
    patch_overlap: float = 0.5


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
    dims: int = 2  # 2: slices f32[B,H,W,C] | 3: volumes f32[B,D,H,W,C], the architecture in 3D


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
    # Intensity jitter a (0 = off): per example and channel, x -> x * (1 + u) + v with u, v
    # uniform in [-a, a] (seeded like the other augmentations). augment_flip flips the last
    # in-plane axis of a slice; in 3D each of the three axes of a volume independently.
    augment_intensity: float = 0.0


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


def _demo3d() -> Config:
    return Config(
        name="demo3d",
        model=ModelConfig(width=8, depth=3, bn_momentum=0.9, dims=3),
        # One volume per step at lr 1e-2 for 6 epochs: grey matter and the lesion are learned
        # last. On 16 of the 48^3 volumes (the evaluation's half-data subsets), lr 5e-3 left
        # them at Dice 0 after 4 epochs and the lesion at 0.1 after 8; lr 1e-2 learned all four
        # classes within 6 epochs (96 steps).
        train=TrainConfig(epochs=6, batch_size=1, lr=1e-2, b1=0.9, loss="dice+ce"),
    )


CONFIGS = {"paper": _paper, "demo": _demo, "tiny": _tiny, "demo3d": _demo3d}


def get_config(name: str) -> Config:
    """Returns the named config (``paper``, ``demo``, ``tiny`` or ``demo3d``)."""
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
    """Applies ``section.key=value`` overrides; unknown keys raise InputError, and so does a
    key of :data:`OPTIONS_2D_ONLY` given when the result is a 3D run (``model.dims=3``)."""
    given: list[str] = []
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
        given.append(key)
    if config.model.dims == 3:
        for key in given:
            if key in OPTIONS_2D_ONLY:
                raise InputError(f"config key {key} is for slices (model.dims=2); a 3D run "
                                 f"(model.dims=3) takes data.volume and data.patch instead")
    validate(config)
    return config


def validate(config: Config) -> None:
    """Checks values a typo could break; raises InputError naming the value."""
    from tracin_jax.models.registry import known_architectures

    d, m, t = config.data, config.model, config.train
    choices = {
        "model.arch": (m.arch, known_architectures()),
        "data.layout": (d.layout, ("auto", "brats2019", "brats2020", "brats2021", "brats2023", "msd",
                                   "nnunet")),
        "data.normalise": (d.normalise, ("paper", "zscore")),
        "data.crop_space": (d.crop_space, ("stored", "canonical", "centre")),
        "model.norm": (m.norm, ("batch", "group", "none")),
        "train.optimizer": (t.optimizer, ("adam", "sgd")),
        "train.loss": (t.loss, ("dice", "ce", "dice+ce")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise InputError(f"config value {key}={value!r} is not one of {', '.join(allowed)}")
    if len(d.crop) != 4 or d.crop[1] <= d.crop[0] or d.crop[3] <= d.crop[2]:
        raise InputError(f"config value data.crop={d.crop} must be y0,y1,x0,x1 with y1>y0, x1>x0")
    _check_model_dims(config)
    if m.dims == 2:  # in 3D the crop is not used (data.volume is the window)
        h, w = d.crop[1] - d.crop[0], d.crop[3] - d.crop[2]
        if d.downsample < 1 or h % d.downsample or w % d.downsample:
            raise InputError(f"config value data.downsample={d.downsample} must divide the crop "
                             f"{h}x{w}")
        check_spatial_shape((h // d.downsample, w // d.downsample), m.depth)
    elif d.downsample < 1:
        raise InputError(f"config value data.downsample={d.downsample} must be at least 1")
    if d.slices not in ("tumour", "foreground"):
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


def check_spatial_shape(shape, depth: int, what: str = "image size") -> None:
    """InputError unless every spatial size in ``shape`` (H, W or D, H, W) is divisible by
    ``2**depth``, as the architectures' ``depth`` halvings need."""
    if any(int(n) % (2**depth) for n in shape):
        raise InputError(f"{what} {'x'.join(str(int(n)) for n in shape)} is not divisible by "
                         f"2**model.depth={2**depth}")


# Options that mean something for slices only: given (by --set / apply_overrides) to a 3D run,
# a one-line InputError. The crop, slices and crop space index slices of the stored or canonical
# array (a 3D run's window is data.volume); the resize-crop augmentation is written for slices.
OPTIONS_2D_ONLY = ("data.crop", "data.slices", "data.crop_space", "train.augment_resize_crop",
                   "train.resize_to")
# Options of volumes only (X,Y,Z shapes): a 2D run refuses them unless they are 0,0,0.
OPTIONS_3D_ONLY = ("data.volume", "data.patch")


def _check_model_dims(config: Config) -> None:
    """model.dims is 2 or 3 and the architecture has that version; a 2D run leaves the 3D-only
    data options at 0,0,0; in 3D, the resize-crop augmentation is off, ``data.volume`` (when
    given) is divisible by ``data.downsample`` and then by ``2**model.depth``, and
    ``data.patch`` (when given) is divisible by ``2**model.depth`` and fits in the volume."""
    from tracin_jax.models.registry import check_dims

    d, m = config.data, config.model
    check_dims(m.arch, m.dims)
    volume, patch = _shape3(d, "volume"), _shape3(d, "patch")
    if m.dims == 2:
        for key in OPTIONS_3D_ONLY:
            value = _shape3(d, key.split(".")[1])
            if any(value):
                raise InputError(f"config value {key}={_xyz(value)} is for volumes: set "
                                 f"model.dims=3, or leave it at 0,0,0 for slices")
        return
    if config.train.augment_resize_crop:
        raise InputError("config value train.augment_resize_crop=True is for slices (model.dims=2)"
                         "; a 3D run flips (train.augment_flip) and jitters intensities "
                         "(train.augment_intensity): set train.augment_resize_crop=false")
    if any(volume):
        if d.downsample < 1 or any(n % d.downsample for n in volume):
            raise InputError(f"config value data.downsample={d.downsample} must divide "
                             f"data.volume={_xyz(volume)}")
        check_spatial_shape([n // d.downsample for n in volume], m.depth,
                            f"data.volume={_xyz(volume)} after data.downsample={d.downsample}:")
    if any(patch):
        from tracin_jax.data.preprocess import check_patch_fits

        check_spatial_shape(patch, m.depth, "data.patch")
        if any(volume):
            check_patch_fits(patch, [n // d.downsample for n in volume])


def _shape3(data, name: str) -> tuple[int, int, int]:
    """``data.<name>`` as three ints >= 0, all zero or all positive; InputError otherwise."""
    value = tuple(getattr(data, name, (0, 0, 0)) or (0, 0, 0))
    if len(value) != 3 or not all(isinstance(n, int) and not isinstance(n, bool) for n in value) \
            or min(value) < 0 or (any(value) and not all(value)):
        raise InputError(f"config value data.{name}={_xyz(value)} must be X,Y,Z, three "
                         f"positive integers (or 0,0,0)")
    return value


def _xyz(shape) -> str:
    return ",".join(str(n) for n in shape)




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
    "train.augment_intensity": (0.0, 1.0, True, False),
    "data.patch_overlap": (0.0, 1.0, True, False),
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
