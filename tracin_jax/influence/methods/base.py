"""The attribution-method protocol: one class per method, one options dataclass per method.

A method (:class:`Method`) turns a trained run into an influence folder in these steps, each a
hook with a default:

0. :meth:`Method.chosen_epochs`: the run's epochs whose checkpoints the method gets (default:
   ``--checkpoints``);
1. :meth:`Method.featuriser` -> a :class:`~tracin_jax.influence.grads.ClassGradFunction`
   ``(variables, images f32[B,H,W,Cin], labels int[B,H,W]) -> f32[B, C, D]``: class gradients
   of a loss over a parameter subset, optionally projected (:func:`~..grads.make_class_grad_fn`,
   :mod:`..subsets`, :mod:`..projection`, :mod:`..logra`);
2. :meth:`Method.fit` over the chosen checkpoints and the training set -> :class:`Fitted`:
   the checkpoints the features are taken at (their variables may carry fitted factors; they
   may also be other models, each with its own store ``key``), an optional per-checkpoint
   diagonal preconditioner applied to both sides before projection, optional query
   checkpoints (when the query features are taken at other variables than the training
   features) and what to record in meta.json;
3. :meth:`Method.fit_features`: anything fitted over the stored training features, once all
   of them are computed (TRAK's kernels ``Phi^T Phi + lambda I``, one per model); nothing by
   default;
4. :meth:`Method.transform_train` / :meth:`Method.transform_test`: wrap the readers of the
   training blocks ``k -> f32[rows, C, T*D]`` and of the query features (T checkpoints
   concatenated); identity by default;
5. the scorer: the blocked contraction of :mod:`..scores` (streaming top-K, patient sums,
   self-influence), run by :func:`~..engine.compute_influence` with the feature store
   (:mod:`..store`, shared between processes) and the staged output files;
6. :meth:`Method.spec`: the ``spec`` entry of meta.json, from which :meth:`Method.from_spec`
   rebuilds the same method (evaluate's model-randomisation check).

Every method goes through :meth:`Method.run` -> :meth:`Method.compute` ->
:func:`~..engine.compute_influence`; :meth:`Method.randomised` may be overridden (TRAK
re-initialises its models rather than the chosen checkpoints).

Arguments come in two groups: :class:`Common` (checkpoints, split, top-K, batches, memory,
data folder, progress, store folder: the same for every method) and the method's ``Options``
dataclass (its own arguments with defaults; ``check()`` raises a one-line InputError naming
the bad value). Each options field's ``metadata["flag"]`` is its command-line flag
(``tracin-jax influence``), ``metadata["help"]`` its help line.
"""

from __future__ import annotations

import dataclasses
import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from tracin_jax.errors import InputError
from tracin_jax.influence.projection import DEFAULT_PROJ_KIND


def option(default: Any, help: str = "", flag: str | None = None) -> Any:
    """A field of a method's options dataclass: default, help line, command-line flag
    (default ``--`` + the field name with dashes)."""
    return field(default=default, metadata={"help": help, "flag": flag})


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


@dataclass(frozen=True)
class Common:
    """Arguments every method takes (see :func:`~..api.run_influence`)."""

    checkpoints: Any = "all"
    split: str = "test"
    topk: int | None = None
    batch_size: int = 16
    chunk_size: int = 256
    memory_budget_gb: float = 2.0
    data_dir: Any = None
    progress: bool = True
    store_dir: Any = None

    def check(self) -> None:
        from tracin_jax.influence.checks import check_args

        check_args(self.split, self.topk, self.batch_size, self.chunk_size,
                    self.memory_budget_gb, 0)


COMMON_FIELDS = tuple(f.name for f in dataclasses.fields(Common))


@dataclass(frozen=True)
class Options:
    """Base of a method's options: no arguments."""

    def check(self) -> None:
        """One-line InputError naming a bad value; nothing by default."""


@dataclass(frozen=True)
class FeatureOptions(Options):
    """Parameter subset and projection of the class gradients."""

    params: str = option("head", "head | decoder | all | REGEX over param paths")
    proj_dim: int | None = option(None, "projected dimension (default: exact up to 65536 "
                                  "parameters, else 4096); with --proj-kind logra: the per-layer "
                                  "rank r (default 16)")
    proj_seed: int = option(0, "seed of the projection")
    proj_kind: str | None = option(DEFAULT_PROJ_KIND, "countsketch (O(D)) | rademacher | gaussian "
                                   "(dense JL) | logra (per-layer r x r projection from "
                                   "activations and output gradients)")

    def check(self) -> None:
        if isinstance(self.proj_seed, bool) or not isinstance(self.proj_seed, numbers.Integral):
            raise InputError(f"projection seed {self.proj_seed!r} must be an integer")


@dataclass(frozen=True)
class LossOptions(FeatureOptions):
    """Plus the class-wise loss differentiated and cosine normalisation."""

    loss: str = option("dice", "dice (the training loss, the paper) | ce (region cross-entropy)")
    normalise: bool = option(False, "unit-norm class gradients (cosine)", flag="--normalised")

    def check(self) -> None:
        from tracin_jax.influence.checks import check_loss

        super().check()
        check_loss(self.loss)
        if not isinstance(self.normalise, bool):
            raise InputError(f"--normalised {self.normalise!r} must be true or false")


@dataclass
class Fitted:
    """What :meth:`Method.fit` gives the scoring stage.

    ``checkpoints``: objects with ``epoch``, ``lr``, ``variables`` (features are taken at
    these, weighted by ``lr``), and optionally ``key``: the store key when it is not the epoch
    (a model that is no checkpoint of the run, with ``epoch`` None; see
    :func:`~..engine.compute_influence`); ``precondition``: None or a per-checkpoint diagonal
    preconditioner (``(checkpoint, subset) -> leaves``, with ``name`` and ``describe()``, see
    :mod:`..precondition`); ``meta``: entries added to meta.json; ``timings``: added to its
    timings; ``query_checkpoints``: None (the query features are taken at ``checkpoints``, as
    the training features) or one object per entry of ``checkpoints``, same epoch, whose
    ``variables`` the query features of that entry are taken at (weighted by the entry's
    ``lr``): for a method whose query side is not its training side (e.g. a query gradient
    taken at the last checkpoint for every entry); ``--split train`` is then refused.
    """

    checkpoints: list
    precondition: Any = None
    meta: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    query_checkpoints: list | None = None


def projection_args(projection: dict | None) -> dict:
    """meta.json's ``projection`` (a projector's ``describe()``) -> ``proj_dim``/``proj_seed``/
    ``proj_kind`` that rebuild it (exact when None; LoGra's dimension is its rank)."""
    if not projection:
        return {"proj_dim": 0, "proj_seed": 0, "proj_kind": DEFAULT_PROJ_KIND}
    dim = projection.get("rank", projection.get("dim")) if projection.get("kind") == "logra" \
        else projection.get("dim")
    return {"proj_dim": int(dim), "proj_seed": int(projection.get("seed", 0)),
            "proj_kind": projection.get("kind")}


class Method:
    """An attribution method. Subclasses set ``name``, ``Options`` and ``summary`` (one line,
    the CLI's help) and override the hooks they need; ``grad_fn_argument``: whether a custom
    gradient function (``run_influence(grad_fn=...)``) may replace :meth:`featuriser`;
    ``presets``: named variants of the method, ``{name: run_influence keywords}`` (its option
    fields, plus ``checkpoints``, where ``"last"`` means the run's last epoch), which
    ``experiments.evaluate_variants`` studies (names unique over the registry)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # Shown before the gradient's description in evaluation tables ("EK-FAC dice head"); the
    # default is the method's name in capitals, TracIn's is empty (the plain gradient).
    label: ClassVar[str | None] = None
    Options: ClassVar[type] = Options
    grad_fn_argument: ClassVar[bool] = False
    presets: ClassVar[dict[str, dict]] = {}

    def __init__(self, options: Options | None = None):
        options = self.Options() if options is None else options
        if not isinstance(options, self.Options):
            raise InputError(f"--method {self.name}: options must be {self.Options.__name__}, "
                             f"not {type(options).__name__}")
        options.check()
        self.options = options

    @classmethod
    def title(cls) -> str:
        """The label of evaluation tables (:attr:`label`, else the name in capitals)."""
        return cls.name.upper() if cls.label is None else cls.label

    # -- hooks -------------------------------------------------------------------------------
    def chosen_epochs(self, run: Any, common: Common, workdir: Any) -> list[int]:
        """The epochs of the loaded ``run`` whose checkpoints :meth:`run` checks, loads and gives
        :meth:`compute` (and records in meta.json's ``run_identity``). Default:
        ``common.checkpoints`` (:func:`~..checks.parse_checkpoints`; ``all`` refuses a run
        whose finished epochs lack a checkpoint)."""
        from tracin_jax.influence.checks import parse_checkpoints

        return parse_checkpoints(common.checkpoints, [c.epoch for c in run.checkpoints], workdir)

    def featuriser(self, run: Any) -> Any:
        """The class-gradient function for the loaded ``run``."""
        raise NotImplementedError

    def fit(self, run: Any, grad_fn: Any, checkpoints: Sequence[Any], out: Path,
            common: Common, progress: bool = False) -> Fitted:
        """Anything fitted over the checkpoints and the training set (default: nothing)."""
        return Fitted(list(checkpoints))

    def fit_features(self, read: Callable, blocks: Sequence[tuple[int, int]]) -> dict:
        """Anything fitted over the stored training features; returns entries for meta.json
        (merged last). Called once every training feature is in the store, before
        :meth:`transform_train` and :meth:`transform_test`, in every process (each sees the
        complete store): ``read(k) -> f32[rows, C, T*D]`` is block k (rows ``blocks[k]``) of
        every :class:`Fitted` checkpoint, concatenated in their order (D = the featuriser's
        dimension), each scaled by sqrt(lr) as stored. Default: nothing, ``{}``."""
        return {}

    def transform_train(self, read: Callable, blocks: Sequence[tuple[int, int]]) -> Callable:
        """Wraps the training block reader ``k -> f32[rows, C, T*D]``. A wrapper with a
        ``self_influence()`` method gives ``self_influence.npy`` (f32[n_train, C]) instead of
        the squared norms of its output. Default: unchanged."""
        return read

    def transform_test(self, features: Any) -> Any:
        """Maps a block of query features f32[n, C, T*D]. Default: unchanged."""
        return features

    def spec_loss(self, grad_fn: Any) -> str | None:
        """The loss's name (``dice``, ``ce``, ...), None when unknown: the gradient function's
        ``loss`` by default."""
        return grad_fn.loss

    def spec_fields(self) -> dict:
        """``precondition`` / ``relatif`` entries of the spec (defaults ``none`` / False)."""
        return {}

    def spec_options(self) -> dict:
        """The spec's ``options``: the method's own arguments beyond the gradient's."""
        skip = {f.name for f in dataclasses.fields(LossOptions)}
        return {f.name: getattr(self.options, f.name) for f in dataclasses.fields(self.options)
                if f.name not in skip}

    # -- spec --------------------------------------------------------------------------------
    def spec(self, grad_fn: Any, epochs: Sequence[int]) -> dict | None:
        """meta.json's ``spec``; None when the featuriser could not rebuild the gradient: a
        custom ``grad_fn`` whose loss has no name, or without a parameter subset, or whose
        classes are not a run's foreground classes (label values 1..C, BraTS: 1, 2, 3)."""
        from tracin_jax.influence.grads import as_class_grad_function

        grad_fn = as_class_grad_function(grad_fn)
        loss = self.spec_loss(grad_fn)
        subset, projector = grad_fn.subset, grad_fn.projector
        labels = tuple(grad_fn.class_labels)
        if loss is None or subset is None or labels != tuple(range(1, len(labels) + 1)):
            return None
        return {"method": self.name, "loss": loss,
                "params": subset.name,
                "projection": projector.describe() if projector is not None else None,
                "normalise": bool(grad_fn.normalised),
                "precondition": "none", "relatif": False, **self.spec_fields(),
                "checkpoints": [int(e) for e in epochs], "options": self.spec_options()}

    @classmethod
    def options_from_spec(cls, spec: dict) -> Options:
        names = {f.name for f in dataclasses.fields(cls.Options)}
        values = {"params": spec.get("params"), **projection_args(spec.get("projection")),
                  "loss": spec.get("loss"), "normalise": bool(spec.get("normalise")),
                  "precondition": spec.get("precondition"), "relatif": spec.get("relatif"),
                  **(spec.get("options") or {})}
        return cls.Options(**{k: v for k, v in values.items() if k in names})

    # -- pipeline ----------------------------------------------------------------------------
    def run(self, workdir: Any, out: Any, common: Common, grad_fn: Any = None) -> dict:
        """Influence of the run in ``workdir`` into ``out`` (the files of :mod:`..folder`);
        returns the meta dict."""
        from tracin_jax import identity, load_run
        from tracin_jax.paths import check_writable_folder

        t0 = time.perf_counter()
        common.check()
        if grad_fn is not None and not self.grad_fn_argument:
            raise InputError(f"method={self.name!r} builds its own gradient function; "
                             "grad_fn is for the methods that take one")
        check_writable_folder(out, "--out")
        check_writable_folder(common.store_dir if common.store_dir is not None
                              else Path(workdir) / "features", "feature store")
        run = load_run(workdir, common.data_dir)
        epochs = self.chosen_epochs(run, common, workdir)
        chosen = [run.checkpoint(e) for e in epochs]
        grad_fn = self.featuriser(run) if grad_fn is None else grad_fn
        test = run.test if common.split == "test" else run.train
        for name, ex in (("training", run.train), (common.split, test)):
            if len(ex.images) == 0:
                raise InputError(f"{workdir}: the {name} split has no slices")
        for c in chosen:
            if not c.lr >= 0:
                raise InputError(f"{workdir}: checkpoint {c.epoch} records learning rate {c.lr}")
        for c in chosen:  # a damaged checkpoint fails here, before any file or folder is made
            c.check()
        load_s = time.perf_counter() - t0
        return self.compute(run, chosen, out, common, grad_fn=grad_fn, workdir=workdir,
                            extra_timings={"load_s": round(load_s, 3)},
                            extra_meta={"run_identity": identity.describe(run, epochs)})

    def compute(self, run: Any, checkpoints: Sequence[Any], out: Any, common: Common, *,
                grad_fn: Any = None, workdir: Any = None, extra_timings: dict | None = None,
                extra_meta: dict | None = None) -> dict:
        """The method without the workdir: ``run`` is anything with ``model``, ``image_shape``,
        ``config`` (``config.train.dice_eps``), ``train`` and ``test`` (``images``
        f32[n,H,W,Cin], ``labels`` int[n,H,W], ``ids``, ``cases``); ``checkpoints``: objects
        with ``epoch``, ``lr``, ``variables``. Featurises, fits, scores and writes ``out``
        (the store in ``common.store_dir``, else ``<workdir>/features/<key>``); returns the
        meta dict."""
        from tracin_jax.influence.engine import compute_influence
        from tracin_jax.influence.grads import as_class_grad_function

        grad_fn = as_class_grad_function(self.featuriser(run) if grad_fn is None else grad_fn)
        test = run.test if common.split == "test" else run.train
        fitted = self.fit(run, grad_fn, checkpoints, Path(out), common, progress=common.progress)
        epochs = [int(c.epoch) for c in checkpoints if getattr(c, "epoch", None) is not None]
        return compute_influence(
            grad_fn, fitted.checkpoints, run.train, test, out, split=common.split,
            topk=common.topk, batch_size=common.batch_size, chunk_size=common.chunk_size,
            memory_budget_gb=common.memory_budget_gb, progress=common.progress,
            store_dir=common.store_dir, workdir=workdir,
            extra_timings={**(extra_timings or {}), **fitted.timings},
            precondition=fitted.precondition, method=self, task=getattr(run, "task", None),
            query_checkpoints=fitted.query_checkpoints,
            extra_meta={**fitted.meta, **(extra_meta or {}),
                        "spec": self.recorded_spec(grad_fn, epochs, run)})

    def recorded_spec(self, grad_fn: Any, epochs: Sequence[int], run: Any) -> dict | None:
        """meta.json's ``spec`` for a folder of ``run``: :meth:`spec`, or None when the gradient
        function scores another number of classes than the run's task has (a gradient over
        some of its classes: the featuriser would rebuild all of them)."""
        from tracin_jax.influence.grads import as_class_grad_function

        spec = self.spec(grad_fn, epochs)
        task = getattr(run, "task", None)
        if spec is not None and task is not None and \
                len(as_class_grad_function(grad_fn).class_labels) != len(task.classes):
            return None
        return spec

    def randomised(self, run: Any, meta: dict, out_dir: Path, *, seed: int = 0,
                   progress: bool = False) -> None:
        """Recomputes ``meta``'s folder into ``out_dir`` with every chosen checkpoint's weights
        re-initialised (checkpoint of epoch t: key ``seed + t``; same learning rates; a
        preconditioner stays that of the trained checkpoints), its store in
        ``out_dir/features``."""
        epochs = [int(e) for e in meta["spec"]["checkpoints"]]
        checkpoints = random_checkpoints(run, epochs, seed)
        # The folder's batch size: the same gradient programs, compiled once.
        self.compute(run, checkpoints, out_dir,
                     Common(batch_size=int(meta.get("batch_size", 16)), progress=progress,
                            store_dir=out_dir / "features"))


@dataclass
class RandomCheckpoint:
    epoch: int
    lr: float
    variables: Any
    step: int | None = None


def random_checkpoints(run: Any, epochs: Sequence[int], seed: int = 0) -> list:
    """The run's checkpoints of ``epochs`` (same learning rates and training steps) with
    re-initialised weights (epoch t: key ``seed + t``)."""
    import jax

    from tracin_jax.training.train import init_variables

    out = []
    for e in epochs:
        trained = run.checkpoint(e)
        out.append(RandomCheckpoint(e, trained.lr, init_variables(
            run.model, jax.random.key(seed + e), run.image_shape), getattr(trained, "step", None)))
    return out


__all__ = ["COMMON_FIELDS", "Common", "FeatureOptions", "Fitted", "LossOptions", "Method",
           "Options", "RandomCheckpoint", "flag_of", "option", "projection_args",
           "random_checkpoints"]
