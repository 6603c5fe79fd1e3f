"""Class-wise TRAK: ``phi(z')^T (Phi^T Phi + lambda I)^-1 phi(z) Q(z)`` averaged over an
ensemble of models, with phi the projected gradients of the region log-odds margin
(:mod:`tracin_jax.influence.trak`, whose :func:`~tracin_jax.influence.trak.run_trak` is the
pipeline: its kernel is fitted per model, so this method overrides :meth:`Method.run`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tracin_jax.errors import InputError
from tracin_jax.influence.methods.base import Common, FeatureOptions, Method, option


@dataclass(frozen=True)
class TrakOptions(FeatureOptions):
    damping: float = option(1.0, "damping relative to the mean eigenvalue (trak: of the kernel; "
                            "ekfac, source: per layer)")
    models: int = option(4, "models ensembled with --trak-models-from seeds",
                         flag="--trak-models")
    models_from: str = option("seeds", "seeds (last checkpoint + full-data retrainings, cached in "
                              "WORKDIR/trak/models) | checkpoints (the run's --checkpoints)",
                              flag="--trak-models-from")

    def check(self) -> None:
        from tracin_jax.influence.trak import _check_trak_args

        super().check()
        _check_trak_args(self.models_from, self.models, self.damping)


class Trak(Method):
    name = "trak"
    summary = "class-wise TRAK (region log-odds margin, ensemble of models)"
    Options = TrakOptions
    presets = {"head-trak": {"params": "head", "models": 4}}

    def featuriser(self, run: Any) -> Any:
        import jax

        from tracin_jax.influence.engine import run_classes
        from tracin_jax.influence.projection import make_projector
        from tracin_jax.influence.subsets import resolve_subset
        from tracin_jax.influence.trak import trak_grad_fn
        from tracin_jax.training.train import init_variables

        o = self.options
        shapes = jax.eval_shape(lambda: init_variables(run.model, jax.random.key(0),
                                                       run.image_shape))
        subset = resolve_subset(shapes["params"], o.params)
        return trak_grad_fn(run.model, subset, make_projector(subset, o.proj_dim, o.proj_seed,
                                                              o.proj_kind), **run_classes(run))

    def spec(self, grad_fn: Any, epochs) -> dict | None:
        from tracin_jax.influence.trak import trak_spec

        o = self.options
        return trak_spec(grad_fn, epochs, damping=o.damping, n_models=o.models,
                         models_from=o.models_from)

    @classmethod
    def options_from_spec(cls, spec: dict) -> TrakOptions:
        # A folder of compute_trak's own ensemble (models_from "custom", "randomised"): its
        # randomisation reads the folder's meta only (randomised_trak).
        opts = dict(spec.get("options") or {})
        if opts.get("models_from") not in ("seeds", "checkpoints"):
            opts["models_from"] = "checkpoints"
        return super().options_from_spec({**spec, "options": opts})

    def run(self, workdir: Any, out: Any, common: Common, grad_fn: Any = None) -> dict:
        from tracin_jax.influence.trak import run_trak

        common.check()
        if grad_fn is not None:
            raise InputError("method='trak' builds its own gradient function; grad_fn is for "
                             "the methods that take one")
        if common.split != "test":
            raise InputError(f"--split {common.split!r}: --method trak scores the test split only")
        if common.store_dir is not None:
            raise InputError("--method trak keeps its feature store in WORKDIR/features; "
                             "store_dir does not apply to it")
        o = self.options
        return run_trak(workdir, out, models=o.models_from, n_models=o.models,
                        checkpoints=common.checkpoints, params=o.params, proj_dim=o.proj_dim,
                        proj_seed=o.proj_seed, proj_kind=o.proj_kind, damping=o.damping,
                        topk=common.topk, batch_size=common.batch_size,
                        chunk_size=common.chunk_size, memory_budget_gb=common.memory_budget_gb,
                        data_dir=common.data_dir, progress=common.progress)

    def compute(self, run: Any, checkpoints, out, common: Common, *, grad_fn: Any = None,
                workdir: Any = None, extra_timings: dict | None = None,
                extra_meta: dict | None = None) -> dict:
        """TRAK with ``checkpoints`` as the ensemble (as ``models_from="checkpoints"``), without
        a workdir (see :meth:`Method.compute`)."""
        from tracin_jax.influence.trak import TrakModel, compute_trak

        grad_fn = self.featuriser(run) if grad_fn is None else grad_fn
        ensemble = [TrakModel(int(c.epoch), f"epoch {c.epoch}", int(c.epoch), c.variables)
                    for c in checkpoints]
        return compute_trak(
            run.model, grad_fn, ensemble, run.train, run.test, out, models="checkpoints",
            damping=self.options.damping, topk=common.topk, batch_size=common.batch_size,
            chunk_size=common.chunk_size, memory_budget_gb=common.memory_budget_gb,
            progress=common.progress, workdir=workdir, store_dir=common.store_dir,
            extra_timings=extra_timings, extra_meta=extra_meta, task=getattr(run, "task", None))

    def randomised(self, run: Any, meta: dict, out_dir, *, seed: int = 0,
                   progress: bool = False) -> None:
        from tracin_jax.influence.trak import randomised_trak

        randomised_trak(run, meta, out_dir, seed=seed, progress=progress)
