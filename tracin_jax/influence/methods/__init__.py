"""The registry of attribution methods: name -> :class:`~.base.Method` subclass.

A new method is one file in this package (its options dataclass and its Method subclass, see
``docs/extending.md``) plus its line in :data:`METHODS`; ``run_influence(method=...)``,
``tracin-jax influence --method`` (choices and option flags) and evaluate's randomisation check
all read this table.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tracin_jax.errors import InputError
from tracin_jax.influence.methods.base import (COMMON_FIELDS, Common, FeatureOptions, Fitted,
                                               LossOptions, Method, Options, flag_of, option,
                                               projection_args, random_checkpoints)
from tracin_jax.influence.methods.ekfac import Ekfac
from tracin_jax.influence.methods.source import Source
from tracin_jax.influence.methods.tracin import TracIn
from tracin_jax.influence.methods.trak import Trak

METHODS: dict[str, type[Method]] = {m.name: m for m in (TracIn, Trak, Ekfac, Source)}


def get_method(name: Any) -> type[Method]:
    """The method class registered as ``name``; an unknown name is a one-line InputError
    listing the known ones."""
    if name not in METHODS:
        raise InputError(f"--method {name!r} is not one of {', '.join(METHODS)}")
    return METHODS[name]


def option_fields(cls: type[Method]) -> dict[str, dataclasses.Field]:
    """{field name: field} of a method's options dataclass."""
    return {f.name: f for f in dataclasses.fields(cls.Options)}


def all_option_flags() -> dict[str, str]:
    """{field name: command-line flag} over every registered method's options."""
    out: dict[str, str] = {}
    for cls in METHODS.values():
        for name, f in option_fields(cls).items():
            out.setdefault(name, flag_of(f))
    return out


def make_options(cls: type[Method], given: dict) -> Options:
    """``cls``'s options from ``given`` (field name -> value); a name no registered method
    takes, or one this method does not take, is a one-line InputError."""
    fields = option_fields(cls)
    flags = all_option_flags()
    for name in given:
        if name not in fields:
            flag = flags.get(name, name)
            takes = [m for m, c in METHODS.items() if name in option_fields(c)]
            if not takes:
                raise InputError(f"{name}={given[name]!r} is no method's option (--method "
                                 f"{cls.name} takes {', '.join(fields)})")
            raise InputError(f"{flag} is an option of --method {', '.join(takes)}; options of "
                             f"other methods do not apply to --method {cls.name}")
    return cls.Options(**given)


def presets() -> dict[str, dict]:
    """Every registered method's presets, in registry order: ``{name: run_influence keywords
    with "method"}`` (``checkpoints: "last"`` means the run's last epoch). A name used twice is
    a ValueError."""
    out: dict[str, dict] = {}
    for name, cls in METHODS.items():
        for preset, kw in cls.presets.items():
            if preset in out:
                raise ValueError(f"preset {preset!r} of method {name!r} is also "
                                 f"{out[preset]['method']!r}'s")
            out[preset] = {"method": name, **kw}
    return out


def from_spec(spec: dict) -> Method:
    """The method (with its options) recorded by a folder's meta.json ``spec``."""
    cls = get_method(spec.get("method"))
    return cls(cls.options_from_spec(spec))


__all__ = ["COMMON_FIELDS", "METHODS", "Common", "FeatureOptions", "Fitted", "LossOptions",
           "Method", "Options", "all_option_flags", "flag_of", "from_spec", "get_method",
           "make_options", "option", "option_fields", "presets", "projection_args",
           "random_checkpoints"]
