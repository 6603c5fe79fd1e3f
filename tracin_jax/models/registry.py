"""Architectures by name: ``model.arch`` of the config -> a Flax module (see :mod:`.interface`).

================ ========================================= ===============================
``model.arch``   module                                    parameters, width 64 (width 32)
================ ========================================= ===============================
unet (default)   :class:`~.unet.UNet` (the paper's)        31,038,404 (7,763,428)
deepseg          :class:`~.deepseg.DeepSeg`                31,038,404 (7,763,428)
resunet          :class:`~.resunet.ResUNet`                33,137,412 (8,290,692)
attention_unet   :class:`~.attention_unet.AttentionUNet`   32,433,928 (8,113,032)
================ ========================================= ===============================

(Depth 4, 4 input channels, 4 classes, BatchNorm; counted with ``jax.eval_shape``.) A user's own
module that follows :mod:`.interface` joins with :func:`register_architecture`; register it before
loading a run that uses it.

``model.dims`` chooses slices (2, the default) or volumes (3). Every built-in architecture has
both versions; a registered one declares the dimensionalities its build function honours
(``register_architecture(name, build, dims=(2, 3))``; default 2 only), and asking for another is
a one-line :class:`~tracin_jax.errors.InputError` naming the architecture.
"""

from __future__ import annotations

from typing import Any, Callable

from tracin_jax.errors import InputError
from tracin_jax.models.attention_unet import build_attention_unet
from tracin_jax.models.deepseg import build_deepseg
from tracin_jax.models.resunet import build_resunet
from tracin_jax.models.unet import build_unet

# name -> build(ModelConfig) -> Flax module
ARCHITECTURES: dict[str, Callable[[Any], Any]] = {
    "unet": build_unet,
    "deepseg": build_deepseg,
    "resunet": build_resunet,
    "attention_unet": build_attention_unet,
}
DIMS = (2, 3)  # the values model.dims may take
# name -> the model.dims values its build honours; a name not listed here has 2 only
ARCHITECTURE_DIMS: dict[str, tuple[int, ...]] = {name: DIMS for name in ARCHITECTURES}


def known_architectures() -> tuple[str, ...]:
    """Registered names, sorted."""
    return tuple(sorted(ARCHITECTURES))


def register_architecture(name: str, build: Callable[[Any], Any],
                          dims: tuple[int, ...] | int = (2,)) -> None:
    """Makes ``model.arch=name`` build ``build(model_config)``, a module following the interface.

    ``dims``: the ``model.dims`` values ``build`` honours (it reads ``model_config.dims``): 2
    (slices f32[B,H,W,Cin]) and/or 3 (volumes f32[B,D,H,W,Cin]); one int for one value.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise InputError(f"architecture name {name!r} must be an identifier such as my_unet")
    if not callable(build):
        raise InputError(f"architecture {name!r}: build must be callable (ModelConfig -> module)")
    given = (dims,) if isinstance(dims, int) else dims
    if isinstance(given, (str, bytes)) or not given or not all(
            isinstance(d, int) and not isinstance(d, bool) and d in DIMS for d in given):
        raise InputError(f"architecture {name!r}: dims must list values among 2, 3 (got {dims!r})")
    dims = tuple(sorted(set(given)))
    ARCHITECTURES[name] = build
    ARCHITECTURE_DIMS[name] = dims


def supported_dims(arch: str) -> tuple[int, ...]:
    """The ``model.dims`` values architecture ``arch`` has a version for."""
    return ARCHITECTURE_DIMS.get(arch, (2,))


def check_dims(arch: str, dims: Any) -> None:
    """InputError (one line) unless ``dims`` is 2 or 3 and ``arch`` has a version for it."""
    if isinstance(dims, bool) or dims not in DIMS:
        raise InputError(f"config value model.dims={dims!r} is not one of 2, 3")
    if dims not in supported_dims(arch):
        have = " and ".join(f"{d}D" for d in supported_dims(arch))
        raise InputError(f"config value model.dims={dims}: architecture {arch!r} has no {dims}D "
                         f"version (it was registered for {have}; register it with "
                         f"dims=(2, 3) if its build reads model.dims)")


def build_model(cfg) -> Any:
    """The Flax module of a ModelConfig (``cfg.arch``, ``unet`` when absent; ``cfg.dims``, 2 when
    absent). InputError for an unknown architecture or one without a version for ``dims``."""
    arch = getattr(cfg, "arch", "unet")
    if arch not in ARCHITECTURES:
        raise InputError(f"config value model.arch={arch!r} is not one of "
                         f"{', '.join(known_architectures())}")
    check_dims(arch, getattr(cfg, "dims", 2))
    return ARCHITECTURES[arch](cfg)
