"""Per-checkpoint diagonal preconditioners (Adam-aware TracIn) and RelatIF normalisation.

**Adam-aware TracIn.** TracIn follows the SGD step ``theta -= eta_t g``; a run trained with Adam
moves along ``eta_t g / (sqrt(v_hat_t) + eps)`` instead, to first order in the example's own
gradient (the momentum term ``m`` adds the same vector for every training example, and the
example's own share of ``v`` is second order). The loss change of a test example z' from a step
on training example z at checkpoint t is therefore ``eta_t grad D(z')^T diag(a_t) grad D(z)``
with ``a_t = 1 / (sqrt(v_hat_t) + eps)``, ``v_hat_t = nu_t / (1 - b2^count_t)`` the bias-corrected
second moment that optax's ``scale_by_adam`` keeps in the checkpoint's ``opt_state``
(``InjectStatefulHyperparamsState.inner_state[0]`` = ``ScaleByAdamState(count, mu, nu)``; ``b2``
and ``eps`` are read from the same state's ``hyperparams``).

We use ``g / (sqrt(v_hat) + eps)`` rather than LESS's full Adam update ``m_hat / (sqrt(v_hat) +
eps)`` with the example folded into m and v (Xia et al. 2024): that update is not linear in the
example's gradient, its ``m`` part is common to all training examples (a shift, not a ranking),
and it is defined for the summed training loss, not for one class of it. The diagonal form is
linear, so it commutes with the class axis, the projection and the checkpoint sum; with ``a_t``
= 1 it is exactly plain TracIn.

The store applies ``a_t`` as a *symmetric split*, like it applies ``eta_t``: every feature, test
and training alike, is ``sqrt(eta_t) P(sqrt(a_t) * g)`` (P the projection, applied after the
scaling, in parameter space), so an inner product is ``eta_t g'^T diag(a_t) g``, the same number
as preconditioning the training side alone, while self-influence stays a squared norm
(``sum_t eta_t g^T diag(a_t) g``), the train-vs-train matrix stays symmetric and ``split='train'``
(whose queries are read back from the store) stays correct.

**RelatIF-style normalisation** (Barshan et al. 2020): each training example's scores for its
class j are divided by the square root of its own class-j self-influence, ``sum_t eta_t
|g_j(z)|^2`` (preconditioned when a preconditioner is used), so a training slice cannot lead a
ranking by gradient norm alone. It needs the sum over checkpoints, so it is applied to each
training block of the store (all checkpoints concatenated) as the contraction reads it:
:class:`RelatIFBlocks`. Unlike cosine TracIn, test features are untouched and each checkpoint
keeps its weight.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
import optax

from tracin_jax.errors import InputError

PRECONDITIONERS = ("none", "adam")


def find_adam_state(opt_state: Any) -> tuple[Any, dict]:
    """(the ``ScaleByAdamState`` inside ``opt_state``, the hyperparameters stored beside it).

    Raises InputError when the state holds no Adam moments (an SGD run).
    """
    found = []

    def visit(node):
        if isinstance(node, optax.ScaleByAdamState):
            found.append(node)
            return
        if hasattr(node, "_fields"):  # optax states are NamedTuples
            for child in node:
                visit(child)
        elif isinstance(node, (tuple, list)):
            for child in node:
                visit(child)

    visit(opt_state)
    if not found:
        raise InputError("the optimiser state holds no Adam moments (was the run trained with "
                         "SGD?); Adam preconditioning needs an Adam-trained run")
    hyper = dict(getattr(opt_state, "hyperparams", {}) or {})
    return found[0], {k: float(np.asarray(v)) for k, v in hyper.items()}


def adam_diagonal(opt_state: Any, subset: Any, *, eps: float | None = None,
                  b2: float | None = None) -> list[np.ndarray]:
    """``1 / (sqrt(v_hat) + eps)`` on the leaves of ``subset`` (``subset.paths`` order).

    ``v_hat = nu / (1 - b2^count)`` from the Adam state in ``opt_state``; ``b2`` and ``eps``
    default to the values stored in the state's hyperparameters, else optax's defaults (0.999,
    1e-8). Returns f32 arrays shaped like the subset's leaves.
    """
    state, hyper = find_adam_state(opt_state)
    b2 = float(hyper.get("b2", 0.999) if b2 is None else b2)
    eps = float(hyper.get("eps", 1e-8) if eps is None else eps)
    count = int(np.asarray(state.count))
    if count < 1:
        raise InputError("the Adam state has taken no step yet (count 0): its second moment is "
                         "empty, so there is nothing to precondition with")
    correction = 1.0 - b2 ** count
    nu = subset.select(state.nu)
    return [np.asarray(1.0 / (np.sqrt(np.asarray(v, np.float64) / correction) + eps), np.float32)
            for v in nu]


class IdentityPreconditioner:
    """All ones: the store then gives exactly plain TracIn (a reference and a test)."""

    name = "identity"

    def describe(self) -> dict:
        return {"kind": self.name}

    def __call__(self, checkpoint: Any, subset: Any) -> list[np.ndarray]:
        return [np.ones(shape, np.float32) for shape in subset.shapes]


class AdamPreconditioner:
    """Per-checkpoint ``1 / (sqrt(v_hat_t) + eps)`` from each checkpoint's saved Adam state.

    ``__call__(checkpoint, subset) -> list of f32 arrays`` (subset leaf shapes). The state is
    ``checkpoint.opt_state`` when the object has one (in-memory checkpoints), else it is read
    from ``workdir``'s Orbax checkpoint of ``checkpoint.epoch`` with ``opt_state_like`` (the
    abstract state of the run's optimiser) as its structure.
    """

    name = "adam"

    def __init__(self, workdir: Any = None, variables_like: Any = None,
                 opt_state_like: Any = None, eps: float | None = None):
        self.workdir, self.eps = workdir, eps
        self.variables_like, self.opt_state_like = variables_like, opt_state_like

    def describe(self) -> dict:
        return {"kind": self.name, "form": "g / (sqrt(v_hat) + eps)",
                "eps": "from the optimiser state" if self.eps is None else float(self.eps)}

    def opt_state(self, checkpoint: Any) -> Any:
        state = getattr(checkpoint, "opt_state", None)
        if state is not None:
            return state
        if self.workdir is None or self.opt_state_like is None:
            raise InputError(f"checkpoint of epoch {checkpoint.epoch} carries no optimiser state "
                             "and the Adam preconditioner was given no workdir to read it from")
        from tracin_jax import checkpoints

        _, state, _ = checkpoints.load_training_state(self.workdir, checkpoint.epoch,
                                                      self.variables_like, self.opt_state_like)
        return state

    def __call__(self, checkpoint: Any, subset: Any) -> list[np.ndarray]:
        try:
            return adam_diagonal(self.opt_state(checkpoint), subset, eps=self.eps)
        except InputError as e:
            where = f"{self.workdir}: " if self.workdir is not None else ""
            raise InputError(f"--precondition adam: {where}checkpoint of epoch "
                             f"{checkpoint.epoch}: {e}") from None


def adam_preconditioner(run: Any, eps: float | None = None) -> AdamPreconditioner:
    """The Adam preconditioner of a loaded :class:`~tracin_jax.run.Run` (reads each
    checkpoint's ``opt_state`` on demand). An SGD run gets a one-line InputError."""
    from tracin_jax.training.train import init_variables, make_optimizer

    tcfg = run.config.train
    if tcfg.optimizer != "adam":
        raise InputError(f"--precondition adam: {run.workdir} was trained with "
                         f"{tcfg.optimizer}, so its checkpoints hold no Adam state")
    like = jax.eval_shape(lambda: init_variables(run.model, jax.random.key(0), run.image_shape))
    opt_like = jax.eval_shape(make_optimizer(tcfg).init, like["params"])
    return AdamPreconditioner(run.workdir, like, opt_like, eps=eps)


def make_preconditioner(spec: Any, run: Any = None) -> Any:
    """``None``/``"none"`` -> None; ``"adam"`` -> :func:`adam_preconditioner` of ``run``;
    ``"identity"`` -> :class:`IdentityPreconditioner`; a preconditioner object is returned as
    is (anything with ``name``, ``describe()`` and ``(checkpoint, subset) -> leaves``)."""
    if spec is None or (isinstance(spec, str) and spec == "none"):
        return None
    if isinstance(spec, str):
        if spec == "adam":  # without a run: each checkpoint must carry its opt_state
            return adam_preconditioner(run) if run is not None else AdamPreconditioner()
        if spec == "identity":
            return IdentityPreconditioner()
        raise InputError(f"--precondition {spec!r} is not one of {', '.join(PRECONDITIONERS)}")
    if not callable(spec) or not hasattr(spec, "describe"):
        raise InputError(f"precondition={spec!r} is neither a name ({', '.join(PRECONDITIONERS)}) "
                         "nor a preconditioner object")
    return spec


def checkpoint_diagonal(preconditioner: Any, checkpoint: Any, subset: Any) -> list[np.ndarray]:
    """The preconditioner's diagonal at ``checkpoint``, checked: one array per subset leaf, of
    the leaf's shape, finite and > 0 (a zero would drop parameters, a negative has no square
    root)."""
    if subset is None:
        raise InputError("a preconditioner needs the gradient function's parameter subset "
                         "(grad_fn.subset is None)")
    diag = list(preconditioner(checkpoint, subset))
    if len(diag) != len(subset.paths):
        raise InputError(f"the preconditioner gave {len(diag)} arrays for the "
                         f"{len(subset.paths)} parameters of subset {subset.name!r}")
    for path, shape, d in zip(subset.paths, subset.shapes, diag):
        if tuple(np.shape(d)) != tuple(shape):
            raise InputError(f"the preconditioner's {path} has shape {np.shape(d)}, the "
                             f"parameter {tuple(shape)}")
        d = np.asarray(d)
        if not np.all(np.isfinite(d)) or not np.all(d > 0):
            raise InputError(f"checkpoint of epoch {checkpoint.epoch}: the preconditioner of "
                             f"{path} is not finite and positive everywhere")
    return diag


class RelatIFBlocks:
    """A store block reader whose training rows are divided by their own norm.

    ``read(k) -> f32[rows, C, T*D]`` (a store block: checkpoints concatenated) becomes
    ``read(k) / sqrt(self[k])[..., None]`` with ``self[k] = |read(k)|^2`` over the feature
    axis, the class-wise TracIn self-influence of each training row and class; rows with zero
    self-influence stay zero. The raw self-influence of every block read is kept
    (:meth:`self_influence`), since the normalised one is 1 by construction.
    """

    def __init__(self, read: Callable[[int], np.ndarray], blocks: Sequence[tuple[int, int]]):
        self.read, self.blocks = read, list(blocks)
        self.raw: dict[int, np.ndarray] = {}

    def __call__(self, k: int) -> np.ndarray:
        block = np.asarray(self.read(k))
        sq = np.einsum("bcd,bcd->bc", block, block, dtype=np.float64)  # f64[rows, C]
        self.raw[k] = sq.astype(np.float32)
        norm = np.sqrt(sq)
        inv = np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 0)
        return (block * inv[..., None]).astype(np.float32)

    def self_influence(self) -> np.ndarray:
        """f32[n_train, C]: the un-normalised self-influence, blocks in order (each block must
        have been read)."""
        missing = [k for k in range(len(self.blocks)) if k not in self.raw]
        if missing:
            raise RuntimeError(f"blocks {missing} were never read")
        return np.concatenate([self.raw[k] for k in range(len(self.blocks))])


def relatif_scores(scores: np.ndarray, self_influence: np.ndarray) -> np.ndarray:
    """Reference formula: scores f32[n_test, C, n_train, C] / sqrt(self_influence f32[n_train,
    C]) broadcast over the training axes (zero self-influence gives zero)."""
    root = np.sqrt(np.asarray(self_influence, np.float64))
    inv = np.divide(1.0, root, out=np.zeros_like(root), where=root > 0)
    return (np.asarray(scores, np.float64) * inv[None, None]).astype(np.float32)


__all__ = ["PRECONDITIONERS", "AdamPreconditioner", "IdentityPreconditioner", "RelatIFBlocks",
           "adam_diagonal", "adam_preconditioner", "checkpoint_diagonal", "find_adam_state",
           "make_preconditioner", "relatif_scores"]
