"""Class-wise TracIn: ``sum_t eta_t <g_j(z; theta_t), g_i(z'; theta_t)>`` (the paper).

Variants, all options of this one method: cosine (``normalise``: unit-norm class gradients),
Adam-aware (``precondition="adam"``: each checkpoint's gradients scaled elementwise by
``1/(sqrt(v_hat_t)+eps)`` of its saved Adam state before projection, :mod:`..precondition`),
RelatIF (``relatif``: training rows divided by the square root of their class
self-influence), LoGra (``proj_kind="logra"``: per-layer projection, :mod:`..logra`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tracin_jax.errors import InputError
from tracin_jax.influence.methods.base import Common, Fitted, LossOptions, Method, option


@dataclass(frozen=True)
class TracInOptions(LossOptions):
    precondition: Any = option(None, "none | adam (Adam's 1/(sqrt(v_hat)+eps) of each "
                               "checkpoint's saved state; tracin: gradients scaled by it, "
                               "source: its steps taken with it)")
    relatif: bool = option(False, "divide each training slice's class scores by the square root "
                           "of its class self-influence (RelatIF-style)")

    def check(self) -> None:
        from tracin_jax.influence.precondition import PRECONDITIONERS, make_preconditioner

        super().check()
        pre = self.precondition
        if isinstance(pre, str) and pre not in (*PRECONDITIONERS, "identity"):
            raise InputError(f"--precondition {pre!r} is not one of {', '.join(PRECONDITIONERS)}")
        if not (pre is None or isinstance(pre, str)):
            make_preconditioner(pre)  # a preconditioner object, checked
        if not isinstance(self.relatif, bool):
            raise InputError(f"--relatif {self.relatif!r} must be true or false")


class TracIn(Method):
    name = "tracin"
    summary = "class-wise TracIn (the paper)"
    label = ""
    Options = TracInOptions
    grad_fn_argument = True
    presets = {
        "head-dice": {"params": "head"},  # the paper
        "all-proj-dice": {"params": "all", "proj_dim": 4096, "proj_kind": "countsketch"},
        "head-ce": {"params": "head", "loss": "ce"},
        "head-cos": {"params": "head", "normalise": True},
        "all-proj-cos": {"params": "all", "proj_dim": 4096, "proj_kind": "countsketch",
                         "normalise": True},
        "head-dice-last": {"params": "head", "checkpoints": "last"},
        "head-adam": {"params": "head", "precondition": "adam"},
        "head-adam-cos": {"params": "head", "precondition": "adam", "normalise": True},
        "head-relatif": {"params": "head", "relatif": True},
        "head-adam-relatif": {"params": "head", "precondition": "adam", "relatif": True},
        "all-proj-adam": {"params": "all", "proj_dim": 4096, "proj_kind": "countsketch",
                          "precondition": "adam"},
        "all-logra-dice": {"params": "all", "proj_dim": 16, "proj_kind": "logra"},
        "all-logra-cos": {"params": "all", "proj_dim": 16, "proj_kind": "logra",
                          "normalise": True},
    }

    def featuriser(self, run: Any) -> Any:
        from tracin_jax.influence.engine import run_grad_fn

        o = self.options
        return run_grad_fn(run, o.params, proj_dim=o.proj_dim, proj_seed=o.proj_seed,
                           proj_kind=o.proj_kind, loss=o.loss, normalise=o.normalise)

    def fit(self, run: Any, grad_fn: Any, checkpoints: Sequence[Any], out: Path,
            common: Common, progress: bool = False) -> Fitted:
        from tracin_jax.influence.precondition import make_preconditioner

        # Adam: the second moments are read per checkpoint (by epoch, from the run).
        return Fitted(list(checkpoints), make_preconditioner(self.options.precondition, run))

    def transform_train(self, read, blocks):
        from tracin_jax.influence.precondition import RelatIFBlocks

        return RelatIFBlocks(read, blocks) if self.options.relatif else read

    def spec_fields(self) -> dict:
        pre = self.options.precondition
        kind = pre if isinstance(pre, str) or pre is None else getattr(pre, "name", "custom")
        return {"precondition": "none" if kind is None else kind,
                "relatif": bool(self.options.relatif)}

    def spec_options(self) -> dict:
        return {}
