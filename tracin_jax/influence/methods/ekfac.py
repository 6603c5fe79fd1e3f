"""Class-wise EK-FAC influence functions: ``sum_t eta_t g_j(z)^T (F_t + lambda I)^-1 g_i(z')``
with the eigenvalue-corrected Kronecker-factored Fisher of each checkpoint (fitted on the
training set, :mod:`tracin_jax.influence.ekfac`); features are the whitened gradients
``(F_t + lambda I)^-1/2 g``, so the shared scorer contracts them as for TracIn.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tracin_jax.errors import InputError
from tracin_jax.influence.methods.base import Common, Fitted, LossOptions, Method, option


@dataclass(frozen=True)
class EkfacOptions(LossOptions):
    damping: float = option(0.1, "damping relative to the mean eigenvalue, per layer")
    fisher: str = option("sampled", "sampled (true Fisher, labels drawn from the model) | "
                         "empirical")
    fisher_seed: int = option(0, "seed of the sampled Fisher's labels")

    def check(self) -> None:
        from tracin_jax.influence.ekfac import FISHERS, check_damping

        super().check()
        check_damping(self.damping)
        if self.fisher not in FISHERS:
            raise InputError(f"--fisher {self.fisher!r} is not one of {', '.join(FISHERS)}")


class Ekfac(Method):
    """EK-FAC over the conv kernels and biases of ``params`` (BatchNorm parameters are left
    out); ``damping``: lambda = damping x the mean corrected eigenvalue, per layer."""

    name = "ekfac"
    summary = "EK-FAC influence functions"
    label = "EK-FAC"
    Options = EkfacOptions
    presets = {"ekfac-dice": {"params": "all"},
               "head-ekfac-cos": {"params": "head", "normalise": True}}

    def spec_loss(self, grad_fn: Any) -> str:
        return self.options.loss

    def featuriser(self, run: Any) -> Any:
        from tracin_jax.influence.ekfac import ekfac_setup

        o = self.options
        self.setup = ekfac_setup(run, o.params, loss=o.loss, damping=o.damping, fisher=o.fisher,
                                 fisher_seed=o.fisher_seed, proj_dim=o.proj_dim,
                                 proj_seed=o.proj_seed, proj_kind=o.proj_kind,
                                 normalise=o.normalise)
        return self.setup.grad_fn

    def fit(self, run: Any, grad_fn: Any, checkpoints: Sequence[Any], out: Path,
            common: Common, progress: bool = False) -> Fitted:
        from tracin_jax.influence.ekfac import factored_checkpoints

        t = time.perf_counter()
        folder = Path(out) / "ekfac_factors"
        factored = factored_checkpoints(run, self.setup, checkpoints, folder,
                                        batch_size=common.batch_size, progress=progress)
        return Fitted(factored, meta={"ekfac": {**self.setup.describe(), "factors": str(folder)}},
                      timings={"ekfac_fit_s": round(time.perf_counter() - t, 3)})
