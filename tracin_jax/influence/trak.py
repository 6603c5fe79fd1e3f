"""Class-wise TRAK (Park et al. 2023): kernel-preconditioned gradients, ensembled over models.

For model m (parameters theta_m), test slice z', test class i, training slice z, training class j:

    tau_m[z', i, z, j] = phi_m(z', i)^T (Phi_m^T Phi_m + lambda_m I)^-1 phi_m(z, j)
    scores[z', i, z, j] = (1/M sum_m tau_m[z', i, z, j]) * (1/M sum_m Q_m(z, j))

as in TRAK's Algorithm 1 (the out-to-loss term averaged over the models apart from the kernel
terms), written in the influence-folder format of :mod:`.folder` (positive = proponent).

- **Model output.** TRAK differentiates a model *output*, not the loss. For a segmentation region
  we take, for class c (label value ``class_labels[c]``), the summed log-odds margin over the
  pixels of the slice's class-c ground-truth region R_c::

      f_c(z) = sum_{x in R_c} [ logit_c(x) - logsumexp_{k != c} logit_k(x) ]

  the multi-class margin of TRAK's classifiers (log p_c - log(1 - p_c)) summed over the region.
  A class absent from the slice has an empty region: f_c = 0, its features are zero, so it
  neither enters the kernel nor gets a score (an absent test class scores 0 and the evaluation
  does not count it as a target). The features phi are gradients of f w.r.t. the parameter
  subset (``head`` exact, or ``all`` with a random projection), computed by the project's
  class-gradient machinery (:func:`~.grads.make_class_grad_fn` with
  :func:`region_margin_loss` = -f, a loss so that "lower is better" holds; the sign cancels in
  the score, which is quadratic in phi).
- **Kernel.** Phi_m stacks every training (slice, class) row: the training loss is a sum over
  classes (and pixels), so each class region is one "example" of the generalised Gauss-Newton
  approximation TRAK builds. lambda_m = ``damping`` x the mean eigenvalue of Phi_m^T Phi_m
  (its trace / D): relative damping, so one value serves head (D = 32) and projected (D = 4096)
  features, whose Phi^T Phi is rank-deficient when D exceeds the C x n_train rows.
- **Out-to-loss Q.** TRAK's 1 - p (the derivative of the cross-entropy with respect to the
  margin) becomes, for a region, the mean over the region's pixels of 1 - p_c (p = softmax), so
  that Q_m(z, j) f_j is the region cross-entropy's first-order change up to the pixel count;
  0 for an absent class.
- **Models** (``models_from``): ``seeds`` (default): the run's last checkpoint plus
  ``models - 1`` models trained from scratch on all training patients with the run's recipe
  and training seeds ``config.train.seed + k`` (cached in ``<workdir>/trak/models/``, one
  ``.npz`` per model, written atomically, so an interrupted run keeps the finished ones);
  ``checkpoints``: the run's saved checkpoints (``--checkpoints``), no training at all.
  TRAK's gains come from ensembling independently trained models (the paper ensembles 20-100;
  checkpoints of one trajectory are correlated and early ones are barely trained).
- **Through the shared pipeline** (:class:`~.methods.trak.Trak`, :mod:`.methods.base`):
  ``fit`` builds the ensemble and Q (:func:`ensemble_models`, :func:`mean_out_to_loss`); each
  model is one store "checkpoint" of weight 1 (store key: its epoch, or ``seed<s>`` for a
  retrained model, :func:`~.store.key_folder`), so :func:`~.engine.compute_influence` stores
  the training features phi_m (``<workdir>/features/<key>/``: a killed run recomputes only
  missing chunks, and the ``seeds`` and ``checkpoints`` ensembles share the last checkpoint's
  features) and computes the query features; ``fit_features`` fits each model's kernel from
  the stored features (:func:`fit_kernels`); ``transform_test`` multiplies model m's query
  features by K_m^-1 / M (:func:`precondition_queries`), ``transform_train`` the training rows
  by Q bar (:class:`QBlocks`), and the shared scorer sums the M terms.

Cost per model: one forward pass over the training set (Q), the class gradients of the
training and test sets (as one TracIn checkpoint), the D x D kernel (float64) and its Cholesky
factor; the M factors are held from the kernel fit until the query features are
preconditioned, (M + 1) D^2 x 8 bytes at the peak (:func:`kernel_bytes`).
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

from tracin_jax.atomic import save_npz_atomic
from tracin_jax.errors import InputError
from tracin_jax.influence import sharding
from tracin_jax.influence.grads import ClassGradFunction, make_class_grad_fn
from tracin_jax.influence.store import ids_hash

MODEL_SOURCES = ("seeds", "checkpoints")
DEFAULT_MODELS = 4
DEFAULT_DAMPING = 1.0
MAX_KERNEL_DIM = 16384  # D x D float64 kernel: 2 GiB at this size


def _foreground(logits: jax.Array, class_labels: Sequence[int] | None) -> tuple[int, ...]:
    """``class_labels``, or the model's foreground classes 1..K-1 of logits f32[..., K]."""
    if class_labels is None:
        return tuple(range(1, logits.shape[-1]))
    return tuple(int(v) for v in class_labels)


def region_margin(logits: jax.Array, labels: jax.Array,
                  class_labels: Sequence[int] | None = None) -> jax.Array:
    """Summed log-odds margin of each class over its ground-truth region.

    logits f32[B,*S,K], labels int[B,*S] (S = (H, W), or (D, H, W)) -> f32[B, C]: ``sum over
    pixels with label class_labels[c] of logit_c - logsumexp_{k != c} logit_k``; 0 where the
    class is absent.
    ``class_labels`` None: the foreground classes 1..K-1 (C = K - 1; BraTS: 1, 2, 3).
    """
    logits = logits.astype(jnp.float32)
    out = []
    for v in _foreground(logits, class_labels):
        others = jnp.delete(logits, v, axis=-1, assume_unique_indices=True)
        margin = logits[..., v] - jax.nn.logsumexp(others, axis=-1)  # [B, H, W]
        out.append(jnp.sum(jnp.where(labels == v, margin, 0.0),
                           axis=tuple(range(1, labels.ndim))))  # every pixel, or voxel in 3D
    return jnp.stack(out, axis=1)


def region_margin_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """f32[B, C]: minus :func:`region_margin` of the foreground classes 1..K-1 (the TRAK output
    as a loss; BraTS: NCR/NET, ED, ET)."""
    return -region_margin(logits, labels)


def out_to_loss(logits: jax.Array, labels: jax.Array,
                class_labels: Sequence[int] | None = None) -> jax.Array:
    """TRAK's Q for regions: logits f32[B,*S,K], labels int[B,*S] -> f32[B, C], the mean over
    the class-c region of 1 - p_c (p = softmax); 0 where the class is absent. ``class_labels``
    None: the foreground classes 1..K-1."""
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    out = []
    for v in _foreground(logits, class_labels):
        region = labels == v
        space = tuple(range(1, labels.ndim))  # (1, 2), or (1, 2, 3) for volumes
        n = jnp.sum(region, axis=space)
        s = jnp.sum(jnp.where(region, 1.0 - p[..., v], 0.0), axis=space)
        out.append(jnp.where(n > 0, s / jnp.maximum(n, 1), 0.0))
    return jnp.stack(out, axis=1)


def trak_grad_fn(model: Any, subset, projector=None, *, class_names=None,
                 class_labels=None) -> ClassGradFunction:
    """The TRAK features: gradients of :func:`region_margin_loss` (``(variables, images,
    labels) -> f32[B, C, D]``, C = the model's K - 1 foreground classes), exact or projected.
    ``class_names``/``class_labels``: what those classes are (a run's:
    :func:`~.engine.run_classes`; default NCR/NET, ED, ET <- 1, 2, 3)."""
    return make_class_grad_fn(model, subset, region_margin_loss, projector,
                              class_names=class_names, class_labels=class_labels)


# -- the closed form ----------------------------------------------------------------------

def kernel_factor(train_feats: np.ndarray, damping: float = DEFAULT_DAMPING) -> tuple[Any, float]:
    """Cholesky factor of Phi^T Phi + lambda I and lambda.

    train_feats f[n, C, D] (or f[rows, D]); lambda = damping x trace(Phi^T Phi) / D (1 if Phi is
    zero). Returns (scipy ``cho_factor`` result, lambda).
    """
    phi = np.asarray(train_feats, np.float64)
    phi = phi.reshape(-1, phi.shape[-1])
    gram = phi.T @ phi
    return factor_gram(gram, damping)


def factor_gram(gram: np.ndarray, damping: float, overwrite: bool = False
                ) -> tuple[Any, float]:
    """(``cho_factor`` of gram + lambda I, lambda) with lambda = damping x trace(gram) / D.
    ``overwrite``: ``gram`` (float64) becomes the factor, no D x D copy is made."""
    d = gram.shape[0]
    mean_eig = float(np.trace(gram)) / d
    lam = float(damping) * (mean_eig if mean_eig > 0 else 1.0)
    if not overwrite:
        return linalg.cho_factor(gram + lam * np.eye(d), lower=True), lam
    gram[np.diag_indices(d)] += lam
    return linalg.cho_factor(gram, lower=True, overwrite_a=True), lam


def precondition(factor: Any, feats: np.ndarray) -> np.ndarray:
    """f[n, C, D] -> f32[n, C, D]: every row multiplied by the inverse damped kernel."""
    feats = np.asarray(feats, np.float64)
    flat = feats.reshape(-1, feats.shape[-1])
    return linalg.cho_solve(factor, flat.T).T.reshape(feats.shape).astype(np.float32)


def trak_scores(test_feats: Sequence[np.ndarray], train_feats: Sequence[np.ndarray],
                q: Sequence[np.ndarray], damping: float = DEFAULT_DAMPING) -> np.ndarray:
    """In-memory class-wise TRAK of M models (small sets, notebooks, tests).

    test_feats: M arrays f[n_test, C, D]; train_feats: M arrays f[n_train, C, D]; q: M arrays
    f[n_train, C] (:func:`out_to_loss`). Returns f32[n_test, C, n_train, C] (module docstring).
    """
    if not (len(test_feats) == len(train_feats) == len(q)) or not len(q):
        raise InputError(f"TRAK needs the same positive number of test features, training "
                         f"features and Q arrays (got {len(test_feats)}, {len(train_feats)}, "
                         f"{len(q)})")
    total = 0.0
    for te, tr in zip(test_feats, train_feats):
        factor, _ = kernel_factor(tr, damping)
        total = total + np.einsum("aid,bjd->aibj", precondition(factor, te).astype(np.float64),
                                  np.asarray(tr, np.float64))
    qbar = np.mean([np.asarray(x, np.float64) for x in q], axis=0)
    return (total / len(q) * qbar[None, None]).astype(np.float32)


# -- models -------------------------------------------------------------------------------

@dataclass
class TrakModel:
    """One model of the ensemble, as the shared pipeline sees a checkpoint: ``key`` (its store
    key, :func:`~.store.key_folder`: the run epoch, or a name such as ``seed1``), a
    description, the run epoch it is (None for a model that is no checkpoint of the run), its
    variables and ``lr``, the weight its features are stored with (1: the score does not
    depend on it, the kernel scales with it)."""

    key: int | str
    name: str
    epoch: int | None
    variables: Any
    lr: float = 1.0


def _flat(variables: Any) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(variables)[0]}


def _unflat(arrays: dict, like: Any) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    out = []
    for p, leaf in leaves:
        a = arrays[jax.tree_util.keystr(p)]
        if tuple(a.shape) != tuple(leaf.shape):
            raise ValueError(f"{jax.tree_util.keystr(p)}: shape {a.shape}, expected {leaf.shape}")
        out.append(jnp.asarray(a, leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def model_seeds(run, n_models: int) -> list[int]:
    """Training seeds of the retrained models 1..n_models-1: ``config.train.seed + k``."""
    return [int(run.config.train.seed) + k for k in range(1, n_models)]


def seed_model_path(run, seed: int) -> Path:
    """``<workdir>/trak/models/seed<seed>-<hash of the training ids>.npz``."""
    return Path(run.workdir) / "trak" / "models" / f"seed{seed}-{ids_hash(run.train.ids)}.npz"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ensure_seed_models(run, n_models: int, *, last: Any = None, mode: str = "auto",
                       progress: bool = True, log: Callable[[str], None] = _log
                       ) -> list[TrakModel]:
    """The ``seeds`` ensemble: ``last`` (a checkpoint of the run; default its last) and
    ``n_models - 1`` full-data models (store keys: the epoch, ``seed<s>``).

    Missing models are trained one at a time (:func:`~tracin_jax.training.multi.train_models`
    with every patient kept) and saved atomically; finished ones are loaded. ``log``: where the
    training is announced (default: stderr).
    """
    from tracin_jax.training.multi import run_patients, train_models, unstack
    from tracin_jax.training.train import init_variables

    last = run.checkpoints[-1] if last is None else last
    models = [TrakModel(int(last.epoch), f"run epoch {last.epoch}", int(last.epoch),
                        last.variables)]
    like = jax.eval_shape(lambda: init_variables(run.model, jax.random.key(0), run.image_shape))
    patients, _ = run_patients(run)
    todo = [s for s in model_seeds(run, n_models) if not seed_model_path(run, s).exists()]
    if todo:
        log(f"TRAK: training {len(todo)} full-data model(s) (seeds {', '.join(map(str, todo))}) "
            f"-> {seed_model_path(run, todo[0]).parent}")
    for seed in model_seeds(run, n_models):
        path = seed_model_path(run, seed)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            v = train_models(run, np.ones((1, len(patients)), bool), [seed], mode=mode,
                             progress=progress)
            save_npz_atomic(path, **_flat(unstack(v, 0)))
            log(f"TRAK: model seed {seed} trained in {time.perf_counter() - t0:.0f}s")
        try:
            with np.load(path) as z:
                variables = _unflat({n: z[n] for n in z.files}, like)
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"{path}: unreadable TRAK model ({type(e).__name__}); delete it to "
                             "retrain") from None
        models.append(TrakModel(f"seed{seed}", f"seed {seed}", None, variables))
    return models


def seeds_start_epoch(run, workdir) -> int:
    """The epoch the ``seeds`` ensemble starts from: the run's last checkpoint. A run that
    finished a later epoch whose checkpoint is gone is a one-line InputError (the ensemble
    would silently start from an earlier epoch); a gap before it does not matter."""
    last = int(run.checkpoints[-1].epoch)
    late = [e for e in run.missing_epochs() if e > last]
    if late:
        raise InputError(f"{workdir}: the run finished epoch {late[-1]} but its checkpoint "
                         f"{Path(workdir) / 'checkpoints' / str(late[-1])} is missing (last "
                         f"available: {last}); the seeds ensemble starts from the run's last "
                         "epoch: restore it, or resume training to save it again")
    return last


def as_model(checkpoint: Any) -> TrakModel:
    """A run checkpoint (``epoch``, ``variables``) as a model of the ensemble (store key: its
    epoch); a :class:`TrakModel` as it is."""
    if isinstance(checkpoint, TrakModel):
        return checkpoint
    e = int(checkpoint.epoch)
    return TrakModel(e, f"run epoch {e}", e, checkpoint.variables)


def ensemble_models(run, checkpoints: Sequence[Any], models_from: str, n_models: int, *,
                    progress: bool = True) -> list[TrakModel]:
    """The ensemble: ``seeds``: the last of ``checkpoints`` and ``n_models - 1`` full-data
    models of ``run`` (a loaded run with its workdir), trained by process 0 while the others
    wait; ``checkpoints``: ``checkpoints`` themselves (:func:`as_model`)."""
    checkpoints = list(checkpoints)
    if not checkpoints:
        raise InputError("--method trak: no checkpoint to build the ensemble from")
    if models_from != "seeds":
        models = [as_model(c) for c in checkpoints]
        keys = [str(m.key) for m in models]
        if len(set(keys)) != len(keys):
            raise InputError(f"--method trak: the models' store keys {keys} repeat")
        return models
    if getattr(run, "workdir", None) is None:
        raise InputError("--trak-models-from seeds trains models in a run's workdir; with given "
                         "checkpoints use models_from='checkpoints'")
    if sharding.is_writer():  # several processes: process 0 trains, the others then load
        models = ensure_seed_models(run, n_models, last=checkpoints[-1], progress=progress)
    sharding.barrier("trak-seed-models")
    if not sharding.is_writer():
        models = ensure_seed_models(run, n_models, last=checkpoints[-1], progress=False)
    return models


def _out_to_loss_all(model, variables, images, labels, class_labels, batch_size) -> np.ndarray:
    """f32[n, C] :func:`out_to_loss` of a set, in batches."""
    fn = jax.jit(lambda v, x, y: out_to_loss(model.apply(v, x, train=False), y, class_labels))
    parts = [np.asarray(fn(variables, jnp.asarray(images[s:s + batch_size], jnp.float32),
                           jnp.asarray(labels[s:s + batch_size], jnp.int32)))
             for s in range(0, len(images), batch_size)]
    return np.concatenate(parts)


def mean_out_to_loss(model: Any, ensemble: Sequence[TrakModel], train: Any,
                     class_labels: Sequence[int], batch_size: int) -> np.ndarray:
    """Q bar f32[n_train, C]: :func:`out_to_loss` of the training set averaged over the models,
    computed by process 0 and sent to the others (every process scales the same rows)."""
    q = None
    if sharding.is_writer():
        q = np.mean([_out_to_loss_all(model, m.variables, train.images, train.labels,
                                      class_labels, batch_size) for m in ensemble],
                    axis=0).astype(np.float32)
    return sharding.from_writer(q, (len(train.ids), len(class_labels)))


def random_models(run, n_models: int, seed: int = 0) -> list[TrakModel]:
    """``n_models`` re-initialised models of ``run``'s architecture (model k: initialisation key
    ``seed + k``, store key ``random<seed + k>``)."""
    from tracin_jax.training.train import init_variables

    return [TrakModel(f"random{seed + k}", f"random init {seed + k}", None,
                      init_variables(run.model, jax.random.key(seed + k), run.image_shape))
            for k in range(n_models)]


# -- the kernels over the stored features -------------------------------------------------

def check_kernel_dim(dim: int, what: str = "the TRAK features") -> None:
    """One-line InputError when D x D kernels of ``dim`` exceed :data:`MAX_KERNEL_DIM`."""
    if dim > MAX_KERNEL_DIM:
        raise InputError(f"{what}: {dim} features per class; TRAK's kernel needs at most "
                         f"{MAX_KERNEL_DIM}: use --proj-dim 4096")


def kernel_bytes(n_models: int, dim: int) -> int:
    """Bytes the kernel fit holds at its peak: the M float64 D x D Cholesky factors and one
    D x D product being summed (:func:`fit_kernels`)."""
    return (int(n_models) + 1) * int(dim) ** 2 * 8


def check_kernel_memory(grad_fn: Any, *, n_test: int, n_train: int, num_classes: int,
                        dim: int, n_models: int, chunk_size: int, batch_size: int,
                        memory_budget_gb: float, workspace_bytes: int = 0) -> dict:
    """The shared stage's estimate (:func:`~.checks.memory_estimate`; ``workspace_bytes``: the
    gradient program's, :func:`~.checks.gradient_workspace`, 0 when not computed) plus the
    kernels (:func:`kernel_bytes`), refused in one line when over ``memory_budget_gb``
    (:func:`~.checks.check_memory`): checked before any model is trained. Returns the
    estimate."""
    from tracin_jax.influence.checks import batch_params, check_memory, memory_estimate

    local = sharding.local_mesh(sharding.train_mesh())
    estimate = memory_estimate(n_test=n_test, n_train=n_train, num_classes=num_classes, dim=dim,
                               n_checkpoints=n_models, chunk_size=chunk_size,
                               batch_size=sharding.padded_size(batch_size, local),
                               grad_params=batch_params(grad_fn, dim), split="test",
                               workspace_bytes=workspace_bytes)
    estimate["kernels"] = kernel_bytes(n_models, dim)
    estimate["total"] += estimate["kernels"]
    check_memory(estimate, float(memory_budget_gb) * 2**30,
                 projected=getattr(grad_fn, "projector", None) is not None)
    return estimate


def fit_kernels(read: Callable[[int], np.ndarray], blocks: Sequence[tuple[int, int]],
                n_models: int, damping: float = DEFAULT_DAMPING
                ) -> tuple[list, list[float], np.ndarray]:
    """Each model's damped kernel from the stored training features, and TRAK's leverage.

    ``read(k)``: block k (rows ``blocks[k]``) of the M models' features, f32[rows, C, M*D]
    (model m in ``[m*D, (m+1)*D)``). Two passes over the blocks: the float64 Gram matrices
    Phi_m^T Phi_m (factored in place: :func:`factor_gram`), then the leverage
    phi_m^T K_m^-1 phi_m of every row. Returns (M ``cho_factor`` results, M lambdas,
    f32[n_train, C] the leverage averaged over the models).
    """
    m = int(n_models)
    grams = None
    for kb in range(len(blocks)):
        block = read(kb)
        d = block.shape[-1] // m
        if grams is None:
            grams = [np.zeros((d, d), np.float64) for _ in range(m)]
        for i in range(m):
            phi = np.asarray(block[..., i * d:(i + 1) * d], np.float64).reshape(-1, d)
            grams[i] += phi.T @ phi
    factors, lambdas = [], []
    for i in range(m):
        factor, lam = factor_gram(grams[i], damping, overwrite=True)
        grams[i] = None
        factors.append(factor)
        lambdas.append(lam)
    leverage = [[] for _ in range(m)]
    for kb in range(len(blocks)):
        block = read(kb)
        for i in range(m):
            phi = np.ascontiguousarray(block[..., i * d:(i + 1) * d])
            leverage[i].append(np.einsum("bjd,bjd->bj", precondition(factors[i], phi), phi))
    return factors, lambdas, np.mean([np.concatenate(parts) for parts in leverage], axis=0)


def precondition_queries(factors: Sequence[Any], features: Any) -> np.ndarray:
    """f32[n, C, M*D] -> f32[n, C, M*D]: model m's query features multiplied by K_m^-1 / M."""
    feats = np.asarray(features)
    m = len(factors)
    d = feats.shape[-1] // m
    return np.concatenate([precondition(f, feats[..., i * d:(i + 1) * d]) / m
                           for i, f in enumerate(factors)], axis=-1)


class QBlocks:
    """The training block reader times Q bar: ``read(k) -> f32[rows, C, M*D]`` becomes
    ``read(k) * qbar[rows, :, None]``; :meth:`self_influence` gives TRAK's self-score, the
    leverage times Q bar (``leverage`` None: zeros, a process that writes nothing)."""

    def __init__(self, read: Callable[[int], np.ndarray], blocks: Sequence[tuple[int, int]],
                 qbar: np.ndarray, leverage: np.ndarray | None):
        self.read, self.blocks, self.qbar, self.leverage = read, list(blocks), qbar, leverage

    def __call__(self, k: int) -> np.ndarray:
        start, stop = self.blocks[k]
        return self.read(k) * self.qbar[start:stop, :, None]

    def self_influence(self) -> np.ndarray:
        """f32[n_train, C]: mean over the models of phi^T K^-1 phi, times Q bar."""
        if self.leverage is None:
            return np.zeros(self.qbar.shape, np.float32)
        return (self.leverage * self.qbar).astype(np.float32)


# -- options and spec ---------------------------------------------------------------------

def _check_trak_args(models, n_models, damping) -> None:
    if models not in MODEL_SOURCES:
        raise InputError(f"--trak-models-from {models!r} is not one of {', '.join(MODEL_SOURCES)}")
    if not isinstance(n_models, (int, np.integer)) or n_models < 1:
        raise InputError(f"--trak-models {n_models!r} must be a positive integer")
    try:
        ok = math.isfinite(float(damping)) and float(damping) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError(f"--damping {damping!r} must be a positive number")


def trak_spec(grad_fn: Any, epochs: Sequence[int | None], *, damping: float, n_models: int,
              models_from: str) -> dict | None:
    """meta.json's ``spec`` of a TRAK folder (see :mod:`tracin_jax.influence.methods.base`);
    None for features without a parameter subset (a custom gradient function)."""
    subset, projector = getattr(grad_fn, "subset", None), getattr(grad_fn, "projector", None)
    if subset is None:
        return None
    return {"method": "trak", "loss": "margin", "params": subset.name,
            "projection": projector.describe() if projector is not None else None,
            "normalise": False, "precondition": "none", "relatif": False,
            "checkpoints": [int(e) for e in epochs if e is not None],
            "options": {"damping": float(damping), "models": int(n_models),
                        "models_from": str(models_from)}}


__all__ = ["DEFAULT_DAMPING", "DEFAULT_MODELS", "MAX_KERNEL_DIM", "MODEL_SOURCES", "QBlocks",
           "TrakModel", "as_model", "check_kernel_dim", "check_kernel_memory",
           "ensemble_models", "ensure_seed_models", "factor_gram", "fit_kernels",
           "kernel_bytes", "kernel_factor", "mean_out_to_loss", "out_to_loss", "precondition",
           "precondition_queries", "random_models", "region_margin",
           "region_margin_loss", "seeds_start_epoch", "trak_grad_fn", "trak_scores",
           "trak_spec"]
