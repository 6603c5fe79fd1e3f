"""Class-wise TRAK: ``phi(z')^T (Phi^T Phi + lambda I)^-1 phi(z) Q(z)`` averaged over an
ensemble of models, with phi the projected gradients of the region log-odds margin
(:mod:`tracin_jax.influence.trak`: the formula, the ensembles, the kernels).

Through the shared pipeline, hook by hook: :meth:`Trak.chosen_epochs` (``seeds``: the run's
last epoch), :meth:`Trak.featuriser` (the margin's class gradients), :meth:`Trak.fit` (the
ensemble, one store "checkpoint" of weight 1 per model, and Q bar), :meth:`Trak.fit_features`
(each model's kernel from the stored training features, fitted by process 0),
:meth:`Trak.transform_test` (model m's query features times K_m^-1 / M) and
:meth:`Trak.transform_train` (training rows times Q bar, TRAK's self-score).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from tracin_jax.errors import InputError
from tracin_jax.influence.methods.base import Common, FeatureOptions, Fitted, Method, option


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
    """TRAK over ``params`` (exact or projected features, at most
    :data:`~tracin_jax.influence.trak.MAX_KERNEL_DIM` of them). ``models_from="seeds"``: the
    last of the given checkpoints and ``models - 1`` full-data retrainings (a run with a
    workdir); ``"checkpoints"``: the given checkpoints (or :class:`~tracin_jax.influence.trak.
    TrakModel` objects) are the ensemble. ``--split test`` only."""

    name = "trak"
    summary = "class-wise TRAK (region log-odds margin, ensemble of models)"
    Options = TrakOptions
    presets = {"head-trak": {"params": "head", "models": 4}}
    # What meta.json calls the ensemble when it is not ``models_from`` (``randomised``:
    # evaluate's re-initialised models, :meth:`randomised`).
    ensemble_label: str | None = None

    def __init__(self, options: TrakOptions | None = None):
        super().__init__(options)
        self._models: list | None = None  # fit: the ensemble (TrakModel objects)
        self._qbar = None                 # fit: Q bar f32[n_train, C]
        self._factors = None              # fit_features (process 0): M Cholesky factors
        self._leverage = None             # fit_features (process 0): f32[n_train, C]
        self._lambdas: list[float] = []

    def chosen_epochs(self, run: Any, common: Common, workdir: Any) -> list[int]:
        if self.options.models_from == "seeds":  # the ensemble starts from the last epoch
            from tracin_jax.influence.trak import seeds_start_epoch

            return [seeds_start_epoch(run, workdir)]
        return super().chosen_epochs(run, common, workdir)

    def featuriser(self, run: Any) -> Any:
        import jax

        from tracin_jax.influence import trak
        from tracin_jax.influence.engine import run_classes
        from tracin_jax.influence.projection import make_projector
        from tracin_jax.influence.subsets import resolve_subset
        from tracin_jax.training.train import init_variables

        o = self.options
        shapes = jax.eval_shape(lambda: init_variables(run.model, jax.random.key(0),
                                                       run.image_shape))
        subset = resolve_subset(shapes["params"], o.params)
        grad_fn = trak.trak_grad_fn(run.model, subset, make_projector(
            subset, o.proj_dim, o.proj_seed, o.proj_kind), **run_classes(run))
        trak.check_kernel_dim(grad_fn.dim, f"--params {o.params}")
        return grad_fn

    def spec(self, grad_fn: Any, epochs) -> dict | None:
        from tracin_jax.influence.trak import trak_spec

        o = self.options
        n = (len(self._models) if self._models is not None
             else o.models if o.models_from == "seeds" else len(epochs))
        return trak_spec(grad_fn, epochs, damping=o.damping, n_models=n,
                         models_from=self.ensemble_label or o.models_from)

    @classmethod
    def options_from_spec(cls, spec: dict) -> TrakOptions:
        # A folder of a given ensemble (models_from "custom", "randomised"): its randomisation
        # reads the folder's meta only (:meth:`randomised`).
        opts = dict(spec.get("options") or {})
        if opts.get("models_from") not in ("seeds", "checkpoints"):
            opts["models_from"] = "checkpoints"
        return super().options_from_spec({**spec, "options": opts})

    def fit(self, run: Any, grad_fn: Any, checkpoints: Sequence[Any], out: Path,
            common: Common, progress: bool = False) -> Fitted:
        """The ensemble (each model a store "checkpoint" of weight 1) and Q bar; the memory of
        the kernels is checked before any model is trained."""
        from tracin_jax.influence import trak
        from tracin_jax.influence.grads import class_axis
        from tracin_jax.influence.store import feature_shape

        if common.split != "test":
            raise InputError(f"--split {common.split!r}: --method trak scores the test split only")
        t = time.perf_counter()
        o = self.options
        checkpoints = list(checkpoints)
        if not checkpoints:
            raise InputError("--method trak: no checkpoint to build the ensemble from")
        seeds = o.models_from == "seeds"
        n_models = o.models if seeds else len(checkpoints)
        c, dim = feature_shape(grad_fn, checkpoints[-1].variables, run.train.images,
                               run.train.labels)
        trak.check_kernel_dim(dim)
        workspace = 0
        if seeds:  # the whole estimate before any training (the engine checks it again)
            from tracin_jax.influence import sharding
            from tracin_jax.influence.checks import gradient_workspace

            workspace = gradient_workspace(grad_fn, checkpoints[-1].variables, run.train.images,
                                           run.train.labels, common.batch_size,
                                           sharding.local_mesh(sharding.train_mesh())) or 0
        trak.check_kernel_memory(grad_fn, n_test=len(run.test.ids), n_train=len(run.train.ids),
                                 num_classes=c, dim=dim, n_models=n_models,
                                 chunk_size=common.chunk_size, batch_size=common.batch_size,
                                 memory_budget_gb=common.memory_budget_gb,
                                 workspace_bytes=workspace)
        models = trak.ensemble_models(run, checkpoints, o.models_from, o.models,
                                      progress=progress)
        _, class_labels = class_axis(getattr(grad_fn, "class_names", None),
                                     getattr(grad_fn, "class_labels", None))
        self._models = models
        self._qbar = trak.mean_out_to_loss(run.model, models, run.train, class_labels,
                                           common.batch_size)
        self._factors, self._leverage, self._lambdas = None, None, []
        # The run checkpoints among the models (their epochs and learning rates): what the
        # explain stage checks against the run and uses for the latent features.
        lrs = {int(c.epoch): float(c.lr) for c in checkpoints
               if not isinstance(c, trak.TrakModel) and getattr(c, "epoch", None) is not None}
        meta = {
            "method": "trak",
            "checkpoints": [{"epoch": m.epoch, "lr": lrs[m.epoch]} for m in models
                            if m.epoch is not None and m.epoch in lrs],
            "gradient": {"tag": f"trak({getattr(grad_fn, 'tag', None)})", "feature_dim": dim},
            "trak": self._trak_meta(),
        }
        return Fitted(models, meta=meta, timings={"trak_fit_s": round(time.perf_counter() - t, 3)})

    def _trak_meta(self) -> dict:
        return {"models_from": self.ensemble_label or self.options.models_from,
                "models": [m.name for m in self._models or ()],
                "output": "summed log-odds margin over the class's ground-truth region",
                "out_to_loss": "mean over the region of 1 - p_c, averaged over the models",
                "damping": float(self.options.damping),
                "lambda": [round(x, 8) for x in self._lambdas]}

    def fit_features(self, read: Callable, blocks: Sequence[tuple[int, int]]) -> dict:
        """Each model's kernel Phi_m^T Phi_m + lambda_m I and the leverage, by process 0 (the
        others get its preconditioned query features in :meth:`transform_test`)."""
        from tracin_jax.influence import sharding, trak

        if sharding.is_writer():
            self._factors, self._lambdas, self._leverage = trak.fit_kernels(
                read, blocks, len(self._models), self.options.damping)
        return {"trak": self._trak_meta()}

    def transform_train(self, read: Callable, blocks: Sequence[tuple[int, int]]) -> Callable:
        from tracin_jax.influence.trak import QBlocks

        return QBlocks(read, blocks, self._qbar, self._leverage)

    def transform_test(self, features: Any) -> Any:
        """Model m's query features times K_m^-1 / M (computed by process 0, sent to the
        others); the factors are released before the scoring starts."""
        from tracin_jax.influence import sharding
        from tracin_jax.influence.trak import precondition_queries

        shape = tuple(features.shape)
        out = (precondition_queries(self._factors, features) if sharding.is_writer() else None)
        self._factors = None
        return sharding.from_writer(out, shape)

    def randomised(self, run: Any, meta: dict, out_dir, *, seed: int = 0,
                   progress: bool = False) -> None:
        """The folder's TRAK (parameters, projection, damping, number of models, from its
        ``meta``) recomputed into ``out_dir`` through the shared pipeline with as many
        re-initialised models as it ensembles (model k: key ``seed + k``); the feature store
        (``out_dir/features``) is removed once the scores are written."""
        import shutil

        from tracin_jax.influence.methods.base import projection_args
        from tracin_jax.influence.trak import DEFAULT_DAMPING, random_models

        out_dir = Path(out_dir)
        trak = meta.get("trak") or {}
        options = TrakOptions(params=(meta.get("params") or {}).get("name", "head"),
                              **projection_args(meta.get("projection")),
                              damping=trak.get("damping", DEFAULT_DAMPING),
                              models_from="checkpoints")
        method = Trak(options)
        method.ensemble_label = "randomised"
        models = random_models(run, max(1, len(trak.get("models", []))), seed)
        method.compute(run, models, out_dir,
                       Common(batch_size=int(meta.get("batch_size", 16)), progress=progress,
                              store_dir=out_dir / "features"))
        shutil.rmtree(out_dir / "features", ignore_errors=True)
