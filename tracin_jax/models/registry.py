"""Architectures by name: ``model.arch`` of the config -> a Flax module (see :mod:`.interface`).

================ ========================================= ===============================
``model.arch``   module                                    parameters, width 64 (width 32)
================ ========================================= ===============================
unet (default)   :class:`~.unet.UNet` (the paper's)        31,038,404 (7,763,428)
deepseg          :class:`~.deepseg.DeepSeg`                31,038,404 (7,763,428)
resunet          :class:`~.resunet.ResUNet`                33,137,412 (8,290,692)
attention_unet   :class:`~.attention_unet.AttentionUNet`   32,433,928 (8,113,032)
================ ========================================= ===============================

(Depth 4, 4 input channels, 4 classes, BatchNorm; counted with ``jax.eval_shape``.) A user's own module
that follows :mod:`.interface` joins with :func:`register_architecture`; register it before
loading a run that uses it.
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


def known_architectures() -> tuple[str, ...]:
    """Registered names, sorted."""
    return tuple(sorted(ARCHITECTURES))


def register_architecture(name: str, build: Callable[[Any], Any]) -> None:
    """Makes ``model.arch=name`` build ``build(model_config)``, a module following the interface."""
    if not isinstance(name, str) or not name.isidentifier():
        raise InputError(f"architecture name {name!r} must be an identifier such as my_unet")
    if not callable(build):
        raise InputError(f"architecture {name!r}: build must be callable (ModelConfig -> module)")
    ARCHITECTURES[name] = build


def build_model(cfg) -> Any:
    """The Flax module of a ModelConfig (``cfg.arch``; ``unet`` when absent)."""
    arch = getattr(cfg, "arch", "unet")
    if arch not in ARCHITECTURES:
        raise InputError(f"config value model.arch={arch!r} is not one of "
                         f"{', '.join(known_architectures())}")
    return ARCHITECTURES[arch](cfg)
