"""Class-wise TRAK (Park et al. 2023): kernel-preconditioned gradients, ensembled over models.

For model m (parameters theta_m), test slice z', test class i, training slice z, training class j:

    tau_m[z', i, z, j] = phi_m(z', i)^T (Phi_m^T Phi_m + lambda_m I)^-1 phi_m(z, j)
    scores[z', i, z, j] = (1/M sum_m tau_m[z', i, z, j]) * (1/M sum_m Q_m(z, j))

as in TRAK's Algorithm 1 (the out-to-loss term averaged over the models apart from the kernel
terms), written in the influence-folder format of :mod:`.engine` (positive = proponent).

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
- **Models** (``models=``): ``seeds`` (default): the run's last checkpoint plus ``n_models - 1``
  models trained from scratch on all training patients with the run's recipe and training seeds
  ``config.train.seed + k`` (cached in ``<workdir>/trak/models/``, one ``.npz`` per model,
  written atomically, so an interrupted run keeps the finished ones); ``checkpoints``: the
  run's saved checkpoints (``--checkpoints``), no training at all. TRAK's gains come from
  ensembling independently trained models (the paper ensembles 20-100; checkpoints of one
  trajectory are correlated and early ones are barely trained).

Training features of every model go to a :class:`~.store.FeatureStore`
(``<workdir>/features/trak-<models>-<key>/``, one store "checkpoint" per model), so a killed run
recomputes only missing chunks. Cost per model: one forward pass over the training set (Q), the
class gradients of the training and test sets (as one TracIn checkpoint), the D x D kernel
(float64) and its Cholesky factor.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

from tracin_jax.atomic import StagedFiles, save_npz_atomic
from tracin_jax.errors import InputError
from tracin_jax.influence import sharding
from tracin_jax.influence.engine import (DEFAULT_TOPK, _check_args, abandon_output,
                                         check_memory, check_writable_folder, open_outputs,
                                         class_present, folder_meta, gradient_workspace,
                                         memory_estimate, open_scores, output_bytes,
                                         parse_checkpoints, run_classes, run_record,
                                         write_meta, write_score_files)
from tracin_jax.influence.grads import ClassGradFunction, class_axis, make_class_grad_fn
from tracin_jax.influence.projection import DEFAULT_PROJ_KIND, make_projector
from tracin_jax.influence.scores import patient_index, score_blocks
from tracin_jax.influence.store import (compute_features, feature_shape, featurise_checkpoint,
                                        finish_stats, ids_hash, make_header, store_key)
from tracin_jax.influence.subsets import resolve_subset
from tracin_jax.progress import tqdm

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


def factor_gram(gram: np.ndarray, damping: float) -> tuple[Any, float]:
    """(``cho_factor`` of gram + lambda I, lambda) with lambda = damping x trace(gram) / D."""
    d = gram.shape[0]
    mean_eig = float(np.trace(gram)) / d
    lam = float(damping) * (mean_eig if mean_eig > 0 else 1.0)
    return linalg.cho_factor(gram + lam * np.eye(d), lower=True), lam


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
    """One model of the ensemble: ``key`` (the store's checkpoint number), a description,
    the run epoch it is (None for a retrained seed) and its variables."""

    key: int
    name: str
    epoch: int | None
    variables: Any


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


def ensure_seed_models(run, n_models: int, *, mode: str = "auto", progress: bool = True,
                       log=print) -> list[TrakModel]:
    """The ``seeds`` ensemble: the run's last checkpoint and ``n_models - 1`` full-data models.

    Missing models are trained one at a time (:func:`~tracin_jax.training.multi.train_models`
    with every patient kept) and saved atomically; finished ones are loaded.
    """
    from tracin_jax.training.multi import run_patients, train_models, unstack
    from tracin_jax.training.train import init_variables

    last = run.checkpoints[-1]
    models = [TrakModel(0, f"run epoch {last.epoch}", int(last.epoch), last.variables)]
    like = jax.eval_shape(lambda: init_variables(run.model, jax.random.key(0), run.image_shape))
    patients, _ = run_patients(run)
    todo = [s for s in model_seeds(run, n_models) if not seed_model_path(run, s).exists()]
    if todo:
        log(f"TRAK: training {len(todo)} full-data model(s) (seeds {', '.join(map(str, todo))}) "
            f"-> {seed_model_path(run, todo[0]).parent}")
    for k, seed in enumerate(model_seeds(run, n_models), start=1):
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
        models.append(TrakModel(k, f"seed {seed}", None, variables))
    return models


def checkpoint_models(run, checkpoints="all") -> list[TrakModel]:
    """The ``checkpoints`` ensemble: the run's saved checkpoints (epochs of ``checkpoints``)."""
    epochs = parse_checkpoints(checkpoints, [c.epoch for c in run.checkpoints], run.workdir)
    out = []
    for e in epochs:
        ck = run.checkpoint(e)
        ck.check()
        out.append(TrakModel(int(e), f"run epoch {e}", int(e), ck.variables))
    return out


def _out_to_loss_all(model, variables, images, labels, class_labels, batch_size) -> np.ndarray:
    """f32[n, C] :func:`out_to_loss` of a set, in batches."""
    fn = jax.jit(lambda v, x, y: out_to_loss(model.apply(v, x, train=False), y, class_labels))
    parts = [np.asarray(fn(variables, jnp.asarray(images[s:s + batch_size], jnp.float32),
                           jnp.asarray(labels[s:s + batch_size], jnp.int32)))
             for s in range(0, len(images), batch_size)]
    return np.concatenate(parts)


# -- the stage ----------------------------------------------------------------------------

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


def run_trak(workdir, out, *, models: str = "seeds", n_models: int = DEFAULT_MODELS,
             checkpoints="all", params: str = "head", proj_dim=None, proj_seed: int = 0,
             proj_kind=DEFAULT_PROJ_KIND, damping: float = DEFAULT_DAMPING, topk=None,
             batch_size: int = 16, chunk_size: int = 256, memory_budget_gb: float = 2.0,
             data_dir=None, progress: bool = True, mode: str = "auto", log=print) -> dict:
    """Class-wise TRAK of the run in ``workdir``, written to ``out`` like ``run_influence``.

    ``models``: ``seeds`` (the last checkpoint + ``n_models - 1`` full-data retrainings) or
    ``checkpoints`` (the run's checkpoints named by ``checkpoints``; ``n_models`` unused);
    ``params``/``proj_*``: the feature subset and projection as in ``run_influence`` (``all``
    defaults to a 4096-dimensional CountSketch); ``damping``: the relative kernel damping;
    ``mode``: how the extra models train (``auto``/``sequential``/``vmap``). The other
    arguments as in :func:`~.engine.run_influence`. Returns the meta dict.
    """
    from tracin_jax import identity, load_run
    from tracin_jax.training.train import init_variables

    t0 = time.perf_counter()
    _check_args("test", topk, batch_size, chunk_size, memory_budget_gb, proj_seed)
    _check_trak_args(models, n_models, damping)
    check_writable_folder(out, "--out")
    check_writable_folder(Path(workdir) / "features", "feature store")
    run = load_run(workdir, data_dir)
    shapes = jax.eval_shape(lambda: init_variables(run.model, jax.random.key(0), run.image_shape))
    subset = resolve_subset(shapes["params"], params)
    projector = make_projector(subset, proj_dim, proj_seed, proj_kind)
    grad_fn = trak_grad_fn(run.model, subset, projector, **run_classes(run))
    if grad_fn.dim > MAX_KERNEL_DIM:
        raise InputError(f"--params {params}: {grad_fn.dim} features per class; TRAK's kernel "
                         f"needs at most {MAX_KERNEL_DIM}: use --proj-dim 4096")
    for name, ex in (("training", run.train), ("test", run.test)):
        if len(ex.images) == 0:
            raise InputError(f"{workdir}: the {name} split has no slices")
    if models == "seeds":
        last = run.checkpoints[-1].epoch
        late = [e for e in run.missing_epochs() if e > last]
        if late:  # the ensemble would silently start from an earlier epoch
            raise InputError(f"{workdir}: the run finished epoch {late[-1]} but its checkpoint "
                             f"{Path(workdir) / 'checkpoints' / str(late[-1])} is missing (last "
                             f"available: {last}); the seeds ensemble starts from the run's last "
                             "epoch: restore it, or resume training to save it again")
        run.checkpoints[-1].check()  # a damaged checkpoint fails before any training
    ensemble = (ensure_seed_models(run, n_models, mode=mode, progress=progress, log=log)
                if models == "seeds" else checkpoint_models(run, checkpoints))
    timings = {"load_and_models_s": round(time.perf_counter() - t0, 3)}
    return compute_trak(run.model, grad_fn, ensemble, run.train, run.test, out, models=models,
                        damping=damping, topk=topk, batch_size=batch_size,
                        chunk_size=chunk_size, memory_budget_gb=memory_budget_gb,
                        progress=progress, workdir=workdir, run_checkpoints=run.checkpoints,
                        task=run.task,
                        extra_timings=timings, extra_meta={"run_identity": identity.describe(
                            run, sorted({m.epoch for m in ensemble if m.epoch is not None}))})


def compute_trak(model: Any, grad_fn, ensemble: Sequence[TrakModel], train: Any, test: Any,
                 out, *, models: str = "custom", damping: float = DEFAULT_DAMPING, topk=None,
                 batch_size: int = 16, chunk_size: int = 256, memory_budget_gb: float = 2.0,
                 progress: bool = True, workdir=None, store_dir=None, run_checkpoints=(),
                 extra_timings: dict | None = None, mesh=None,
                 extra_meta: dict | None = None, task=None) -> dict:
    """TRAK without the workdir: the Flax ``model``, the features ``grad_fn`` (e.g.
    :func:`trak_grad_fn`; any ClassGradFn with a ``tag``), the models and the examples given.

    ``ensemble``: :class:`TrakModel` objects; ``train``/``test``: objects with ``images``
    f32[n,H,W,M], ``labels`` int[n,H,W], ``ids`` and ``cases``.
    The store lives in ``store_dir``, else ``<workdir>/features/trak-<models>-<key>``.
    ``run_checkpoints``: the run's checkpoints (epoch, lr), to record the models that are run
    checkpoints in meta.json; ``task``: the run's task, meta.json's ``task``. Writes the files
    of :mod:`.engine` (``self_influence.npy`` holds the TRAK self-score phi^T K^-1 phi Q) and
    returns the meta dict.
    """
    timings = dict(extra_timings or {})
    _check_trak_args(models if models in MODEL_SOURCES else "seeds", len(ensemble) or 1, damping)
    out = Path(out)
    check_writable_folder(out, "--out")
    mesh = mesh if mesh is not None else sharding.train_mesh()
    train_ids, test_ids = [str(i) for i in train.ids], [str(i) for i in test.ids]
    n_train, n_test = len(train_ids), len(test_ids)
    if not n_train or not n_test or not ensemble:
        raise InputError(f"nothing to score: {n_train} training and {n_test} test examples, "
                         f"{len(ensemble)} models")
    c, dim = feature_shape(grad_fn, ensemble[0].variables, train.images, train.labels)
    class_names, class_labels = class_axis(getattr(grad_fn, "class_names", None),
                                           getattr(grad_fn, "class_labels", None))
    if len(class_labels) != c:
        raise InputError(f"the TRAK features have {c} classes but their class labels are "
                         f"{list(class_labels)} ({', '.join(class_names)}); pass class_names= "
                         f"and class_labels= with {c} entries to trak_grad_fn")
    if dim > MAX_KERNEL_DIM:
        raise InputError(f"the TRAK features have {dim} dimensions; the kernel needs at most "
                         f"{MAX_KERNEL_DIM} (project the gradients)")
    header = make_header(grad_fn, train_ids, chunk_size, c, dim)
    if store_dir is None:
        if workdir is None:
            raise ValueError("compute_trak needs store_dir or workdir")
        store_dir = Path(workdir) / "features" / f"trak-{models}-{store_key(header)}"
    check_writable_folder(store_dir, "feature store")
    subset = getattr(grad_fn, "subset", None)
    m = len(ensemble)
    workspace = gradient_workspace(grad_fn, ensemble[0].variables, train.images, train.labels,
                                   batch_size, mesh)
    estimate = memory_estimate(
        n_test=n_test, n_train=n_train, num_classes=c, dim=dim, n_checkpoints=m,
        chunk_size=chunk_size, batch_size=sharding.padded_size(batch_size, mesh),
        grad_params=subset.size if subset is not None else dim, split="test",
        workspace_bytes=workspace or 0)
    estimate["kernel"] = 3 * dim * dim * 8
    estimate["total"] += estimate["kernel"]
    budget = float(memory_budget_gb) * 2**30
    check_memory(estimate, budget, projected=getattr(grad_fn, "projector", None) is not None)
    full_bytes = 4 * n_test * c * n_train * c
    fits = estimate["total"] + full_bytes <= budget
    k = topk if topk is not None else (None if fits else DEFAULT_TOPK)
    k = min(int(k), n_train) if k else None
    patients, patient_of = patient_index(train.cases)
    store, made_out = open_outputs(
        out, store_dir, header, train_ids, [mdl.key for mdl in ensemble],
        output_bytes(n_test, n_train, c, len(patients), fits=fits, patients_fit=True, k=k,
                     topk=topk))
    if sharding.is_writer():
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"--out {out}: cannot be written ({e.strerror})") from None

    # Stage 1, per model: training features to the store, Q, test features preconditioned.
    t = time.perf_counter()
    blocks = [store.chunk_rows(k) for k in range(store.n_chunks)]
    test_parts, q_parts, lambdas, self_parts, train_stats = [], [], [], [], {}
    bar = tqdm(total=m * n_train, desc="TRAK train gradients", unit="ex", disable=not progress,
               dynamic_ncols=True, leave=False)
    for mdl in ensemble:
        stats = featurise_checkpoint(store, grad_fn, mdl.key, 1.0, mdl.variables, train.images,
                                     train.labels, batch_size=batch_size, mesh=mesh, bar=bar)
        for key, v in stats.items():
            train_stats[key] = train_stats.get(key, 0) + v
        gram = np.zeros((dim, dim), np.float64)
        for kb in range(len(blocks)):
            phi = np.asarray(store.read_chunk(mdl.key, kb), np.float64).reshape(-1, dim)
            gram += phi.T @ phi
        factor, lam = factor_gram(gram, damping)
        lambdas.append(lam)
        te = compute_features(grad_fn, sharding.replicate(mdl.variables, mesh), 1.0, test.images,
                              test.labels, batch_size, mesh)
        test_parts.append(precondition(factor, sharding.to_host(te)) / m)
        q_parts.append(_out_to_loss_all(model, mdl.variables, train.images, train.labels,
                                        class_labels, batch_size))
        lev = np.concatenate([np.einsum("bjd,bjd->bj", precondition(factor, store.read_chunk(
            mdl.key, kb)), store.read_chunk(mdl.key, kb)) for kb in range(len(blocks))])
        self_parts.append(lev)
    bar.close()
    qbar = np.mean(q_parts, axis=0).astype(np.float32)  # [n_train, C]
    keys = [mdl.key for mdl in ensemble]
    timings["features_s"] = round(time.perf_counter() - t, 3)
    timings["train_features"] = finish_stats(train_stats)

    # Stage 2: one contraction of the model-concatenated features, Q on the training side.
    t = time.perf_counter()
    test_feats = jnp.asarray(np.concatenate(test_parts, axis=-1))

    def read_block(kb):
        start, stop = blocks[kb]
        return store.read_block(keys, kb) * qbar[start:stop, :, None]

    staged = StagedFiles(out)
    scores_out = None
    try:
        if fits and sharding.is_writer():
            scores_out = open_scores(staged, (n_test, c, n_train, c))
        result = score_blocks(test_feats, read_block, blocks, mesh=mesh, scores_out=scores_out,
                              collect_scores=fits, topk=k, patient_of=patient_of,
                              n_patients=len(patients), progress=progress, self_influence=False)
        result["self_influence"] = (np.mean(self_parts, axis=0) * qbar).astype(np.float32)
        timings["scores_s"] = round(time.perf_counter() - t, 3)

        # Stage 3: files (each complete under a temporary name), then meta.json last.
        t = time.perf_counter()
        if scores_out is not None:
            scores_out.flush()
            scores_out = None
        test_present = class_present(test.labels, class_labels)
        train_present = class_present(train.labels, class_labels)
        written = write_score_files(out, result, test_present, train_present, topk=topk,
                                    scores_tmp=staged.path("scores.npy") if fits else None,
                                    staged=staged)
        timings["write_s"] = round(time.perf_counter() - t, 3)
        timings["total_s"] = round(sum(v for key, v in timings.items() if key.endswith("_s")), 3)

        lrs = {int(ck.epoch): float(ck.lr) for ck in run_checkpoints}
        projector = getattr(grad_fn, "projector", None)
        meta = {
            **folder_meta(workdir, "test", class_names, class_labels, test, train, patients,
                          task=task),
            "spec": trak_spec(grad_fn, [mdl.epoch for mdl in ensemble if mdl.epoch is not None],
                              damping=damping, n_models=m, models_from=models),
            "method": "trak",
            # The run checkpoints among the models (their epochs and learning rates): what the
            # explain stage checks against the run and uses for the latent features.
            "checkpoints": [{"epoch": mdl.epoch, "lr": lrs[mdl.epoch]} for mdl in ensemble
                            if mdl.epoch is not None and mdl.epoch in lrs],
            "trak": {
                "models_from": models, "models": [mdl.name for mdl in ensemble],
                "output": "summed log-odds margin over the class's ground-truth region",
                "out_to_loss": "mean over the region of 1 - p_c, averaged over the models",
                "damping": float(damping), "lambda": [round(x, 8) for x in lambdas],
            },
            "params": (dict(subset.describe()) if subset is not None else {"name": "custom"}),
            "gradient": {"tag": f"trak({getattr(grad_fn, 'tag', None)})", "feature_dim": dim},
            "projection": projector.describe() if projector is not None else None,
            **run_record(k, memory_budget_gb, full_bytes, store, written, timings, mesh),
            **(extra_meta or {}),
        }
        return write_meta(out, meta, "trak-written", staged=staged)
    except BaseException:
        scores_out = None
        abandon_output(staged, out, made_out)
        raise


def randomised_trak(run, meta: dict, out_dir, *, seed: int = 0, progress: bool = False) -> dict:
    """The TRAK of an influence folder's ``meta`` (parameters, projection, damping, number of
    models) recomputed with re-initialised models (model k: initialisation key ``seed + k``)
    into ``out_dir``, for the model-randomisation check; its feature store (inside
    ``out_dir``) is removed once the scores are written. Returns the meta dict."""
    import shutil

    from tracin_jax.training.train import init_variables

    out_dir = Path(out_dir)
    shapes = jax.eval_shape(lambda: init_variables(run.model, jax.random.key(0), run.image_shape))
    subset = resolve_subset(shapes["params"], (meta.get("params") or {}).get("name", "head"))
    proj = meta.get("projection") or {}
    projector = make_projector(subset, proj.get("dim", 0), proj.get("seed", 0), proj.get("kind"))
    trak = meta.get("trak") or {}
    models = [TrakModel(k, f"random init {seed + k}", None,
                        init_variables(run.model, jax.random.key(seed + k), run.image_shape))
              for k in range(max(1, len(trak.get("models", []))))]
    out = compute_trak(run.model, trak_grad_fn(run.model, subset, projector, **run_classes(run)),
                       models, run.train, run.test, out_dir, models="randomised",
                       task=getattr(run, "task", None),
                       damping=trak.get("damping", DEFAULT_DAMPING),
                       store_dir=out_dir / "features", progress=progress)
    shutil.rmtree(out_dir / "features", ignore_errors=True)
    return out


__all__ = ["DEFAULT_DAMPING", "DEFAULT_MODELS", "MODEL_SOURCES", "TrakModel", "checkpoint_models",
           "compute_trak", "ensure_seed_models", "factor_gram", "kernel_factor", "out_to_loss",
           "precondition", "randomised_trak", "region_margin", "region_margin_loss", "run_trak",
           "trak_grad_fn",
           "trak_scores"]
