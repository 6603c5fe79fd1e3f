"""Parameter subsets: which weights the influence gradients are taken over, chosen by path.

Parameters are addressed by their '/'-joined path in the Flax ``params`` tree, e.g.
``enc0/conv0/kernel``, ``dec1/norm0/scale``, ``up0/bias``, ``head/kernel``. A subset is
chosen by name or by a regular expression over those paths:

- ``head``: the kernel of the final 1x1 conv only, bias excluded, as in the authors' code
  (64 x 4 = 256 numbers at width 64);
- ``decoder``: every ``dec*`` and ``up*`` parameter plus the head kernel and bias;
- ``all``: every trainable parameter;
- anything else is a regular expression that must match a whole path (``re.fullmatch``), e.g.
  ``dec0/.*|head/kernel``.

BatchNorm running statistics are not parameters and never belong to a subset (gradients are
taken in inference mode, where they are constants).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import jax
import numpy as np
from flax import traverse_util

from tracin_jax.errors import InputError

NAMED_SUBSETS = ("head", "decoder", "all")


def param_paths(params: Any) -> dict[str, Any]:
    """{'/'-joined path: leaf} of a params tree, in sorted path order."""
    flat = traverse_util.flatten_dict(params, sep="/")
    return {k: flat[k] for k in sorted(flat)}


@dataclass(frozen=True)
class ParamSubset:
    """A resolved subset: the chosen paths (sorted), their shapes and total size.

    ``select(params) -> tuple of leaves`` and ``insert(params, leaves) -> params`` move between
    the full params tree and the subset; gradient functions differentiate ``insert`` w.r.t. the
    leaves, so only the subset is traced as a variable.
    """

    name: str
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def size(self) -> int:
        """Number of scalar parameters in the subset."""
        return int(sum(int(np.prod(s, dtype=np.int64)) for s in self.shapes))

    def select(self, params: Any) -> tuple[jax.Array, ...]:
        flat = traverse_util.flatten_dict(params, sep="/")
        return tuple(flat[p] for p in self.paths)

    def insert(self, params: Any, leaves: Sequence[jax.Array]) -> Any:
        flat = dict(traverse_util.flatten_dict(params, sep="/"))
        for p, leaf in zip(self.paths, leaves):
            flat[p] = leaf
        return traverse_util.unflatten_dict(flat, sep="/")

    def describe(self) -> dict:
        """JSON-ready description (name, paths, shapes, size)."""
        return {"name": self.name, "paths": list(self.paths),
                "shapes": [list(s) for s in self.shapes], "size": self.size}


def _choices_line(paths: Sequence[str], head: str = "head") -> str:
    shown = [p for p in paths if p.startswith("dec")][:1] + [p for p in paths if p.startswith(f"{head}/")]
    examples = ", ".join(shown or list(paths[:3]))
    return (f"choose head, decoder, all, or a regular expression matching whole parameter "
            f"paths (e.g. {examples}; {len(paths)} paths in all)")


def resolve_subset(params: Any, spec: str, head: str = "head") -> ParamSubset:
    """Resolves ``spec`` (head | decoder | all | REGEX) against a params tree (arrays or shapes).

    ``head``: the name of the model's final 1x1 conv (:func:`tracin_jax.models.head_name`).

    Raises InputError (one line naming the value and the valid choices) when the spec names an
    unknown subset or a regular expression that matches nothing or does not compile.
    """
    flat = param_paths(params)
    paths = list(flat)
    spec = str(spec).strip()
    if spec == "head":
        chosen = [p for p in paths if p == f"{head}/kernel"]
    elif spec == "decoder":
        chosen = [p for p in paths
                  if re.match(r"(dec|up)\d*/", p) or p in (f"{head}/kernel", f"{head}/bias")]
    elif spec == "all":
        chosen = paths
    else:
        try:
            pattern = re.compile(spec)
        except re.error as e:
            raise InputError(f"--params {spec!r} is not a valid regular expression ({e}); "
                             f"{_choices_line(paths, head)}") from None
        chosen = [p for p in paths if pattern.fullmatch(p)]
    if not chosen:
        what = "matches no parameter" if spec not in NAMED_SUBSETS else "is empty for this model"
        raise InputError(f"--params {spec!r} {what}: {_choices_line(paths, head)}")
    return ParamSubset(name=spec, paths=tuple(chosen),
                       shapes=tuple(tuple(int(d) for d in flat[p].shape) for p in chosen))
