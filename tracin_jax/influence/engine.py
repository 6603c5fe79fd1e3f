"""``run_influence``: class-wise TracIn of a trained run, from checkpoints to files.

Stages (each a separate, swappable part): parameter subset (:mod:`.subsets`) -> class
gradients (:mod:`.grads`, optionally projected by :mod:`.projection`) -> training features on
disk (:mod:`.store`) -> blocked contraction, top-K, patients, self-influence (:mod:`.scores`).

Files written into ``out`` (each in full under a temporary name, then all renamed together,
``meta.json`` last, so an earlier complete folder stays as it was until the new one is complete):

- ``scores.npy``: f32[n_test, C, n_train, C] (test example, test class, train example, train
  class; the C classes are the gradient function's ``class_names`` and ``class_labels``, for a
  run the C foreground classes of its task, :attr:`tracin_jax.run.Run.task`: NCR/NET, ED, ET
  for BraTS), when it fits ``memory_budget_gb`` on top of the stage's working memory;
- ``self_influence.npy``: f32[n_train, C];
- ``test_present.npy`` / ``train_present.npy``: bool[n, C], class c present in the ground truth
  (label value ``class_labels[c]``);
- ``topk_{proponents,opponents}_{indices,scores}.npy``: int32 / f32[n_test, C, C, K] (test
  example, test class, train class, rank), when ``topk`` is given or the full tensor does not
  fit (then K = DEFAULT_TOPK); absent test classes hold -1 / NaN;
- ``patient_scores.npy``: f32[n_test, C, n_patients, C], the sum over each training patient's
  slices (patients sorted by case id, listed in meta), when it fits; with ``topk`` also
  ``topk_patients_*`` ranked over patients;
- ``meta.json``: class names and label values, the run's task (``task``: its name, format,
  channels, classes and their label values in the dataset's files; None without a run), ids,
  cases, patients, checkpoints (epoch, lr), parameter subset (name, paths, size), projection,
  files and shapes, timings, device count.

Sign convention: a positive score means a proponent (a gradient step on the training example
lowers the test example's class loss), negative an opponent, as in TracIn.
"""

from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from tracin_jax.progress import tqdm

from tracin_jax.atomic import StagedFiles, open_memmap, write_json_atomic
from tracin_jax.checkpoints import check_complete
from tracin_jax.errors import InputError
from tracin_jax.influence import sharding
from tracin_jax.influence.grads import (DEFAULT_CLASS_LABELS, class_axis, make_class_grad_fn,
                                        normalised)
from tracin_jax.influence.precondition import (RelatIFBlocks, checkpoint_diagonal,
                                               make_preconditioner)
from tracin_jax.influence.projection import DEFAULT_PROJ_KIND, make_projector
from tracin_jax.influence.scores import (contract, finalise_topk, patient_index, score_blocks,
                                         squared_norms, topk_from_scores)
from tracin_jax.influence.store import (FeatureStore, compute_features, feature_shape,
                                        featurise_checkpoint, finish_stats, make_header,
                                        pending_bytes, store_key)
from tracin_jax.influence.subsets import resolve_subset
from tracin_jax.models.interface import head_name
from tracin_jax.paths import check_free_space, check_writable_folder  # noqa: F401 (re-exported)
from tracin_jax.training.losses import tumour_cross_entropy, tumour_dice_loss

DEFAULT_TOPK = 10
SPLITS = ("test", "train")
LOSSES = ("dice", "ce")
OUTPUT_FILES = (
    "scores.npy", "self_influence.npy", "test_present.npy", "train_present.npy",
    "patient_scores.npy",
    *(f"topk_{who}{side}_{what}.npy" for who in ("", "patients_")
      for side in ("proponents", "opponents") for what in ("indices", "scores")),
)


def class_present(labels: np.ndarray, class_labels: Sequence[int] | int = DEFAULT_CLASS_LABELS
                  ) -> np.ndarray:
    """labels int[n, H, W] (or int[n, X, Y, Z]) -> bool[n, C]: label value ``class_labels[c]``
    occurs in the slice (volume).

    ``class_labels``: the label value of each class of the loss (default 1, 2, 3: the BraTS
    classes NCR/NET, ED, ET; a run's are 1..C, :func:`run_classes`); an int C means labels 1..C.
    """
    if isinstance(class_labels, (int, np.integer)):
        class_labels = range(1, int(class_labels) + 1)
    labels = np.asarray(labels).reshape(len(labels), -1)
    return np.stack([(labels == v).any(axis=1) for v in class_labels], axis=1).reshape(
        len(labels), len(list(class_labels)))


def parse_checkpoints(spec: Any, available: Sequence[int], workdir: Any = "") -> list[int]:
    """``all`` | [E1, E2, ...] | "E1,E2,..." | E -> epochs (in the given order, no repeats).

    ``all`` with a ``workdir`` refuses a run whose finished epochs lack a checkpoint (one-line
    InputError naming the missing and available epochs, :func:`tracin_jax.checkpoints.
    check_complete`): the learning-rate-weighted sum would silently drop them. A list chooses
    a subset on purpose.
    """
    have = ", ".join(str(e) for e in available)
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        if workdir:
            check_complete(workdir, [int(e) for e in available])
        return list(available)
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
    elif isinstance(spec, (int, np.integer)):
        parts = [spec]
    else:
        parts = list(spec)
    epochs = []
    for p in parts:
        try:
            e = int(p)
            if str(p).strip() != str(e) and not isinstance(p, (int, np.integer)):
                raise ValueError
        except (TypeError, ValueError):
            raise InputError(f"--checkpoints {spec!r}: {p!r} is not an epoch number "
                             f"(use all or a list such as {have})") from None
        if e not in available:
            raise InputError(f"--checkpoints names epoch {e}, which {workdir} does not have "
                             f"(available: {have})")
        if e not in epochs:
            epochs.append(e)
    if not epochs:
        raise InputError(f"--checkpoints {spec!r} names no epoch (available: {have})")
    return epochs


def _check_args(split, topk, batch_size, chunk_size, memory_budget_gb, proj_seed) -> None:
    if split not in SPLITS:
        raise InputError(f"--split {split!r} is not one of {', '.join(SPLITS)}")
    for name, value in (("--batch-size", batch_size), ("--chunk-size", chunk_size)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise InputError(f"{name} {value!r} must be a positive integer")
    if topk is not None and (not isinstance(topk, (int, np.integer)) or topk < 1):
        raise InputError(f"--topk {topk!r} must be a positive integer")
    try:
        ok = float(memory_budget_gb) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError(f"--memory-budget-gb {memory_budget_gb!r} must be a positive number")
    if not isinstance(proj_seed, (int, np.integer)):
        raise InputError(f"projection seed {proj_seed!r} must be an integer")


def _check_loss(loss) -> None:
    if loss not in LOSSES:
        raise InputError(f"--loss {loss!r} is not one of {', '.join(LOSSES)}")


def memory_estimate(*, n_test: int, n_train: int, num_classes: int, dim: int, n_checkpoints: int,
                    chunk_size: int, batch_size: int, grad_params: int, split: str,
                    workspace_bytes: int = 0) -> dict:
    """Bytes the influence stage holds at its peak, by part (float32 everywhere).

    - ``query_features``: the test features f32[n_test, C, T*D], twice (the per-checkpoint
      parts and their concatenation; ``split='train'``: one store block of queries, on the host
      and on device);
    - ``train_block``: one store chunk of every checkpoint, f32[chunk, C, T*D], three times (the
      memory-mapped chunk files' pages, which count as resident while they are read, their host
      concatenation, and its device copy);
    - ``batch_gradients``: one gradient batch before projection, f32[B, C, P] for P parameters,
      twice (the stacked per-example leaves and their flattened concatenation);
    - ``block_scores``: one block's scores f32[n_query, C, chunk, C], on device and on the host;
    - ``gradient_workspace``: ``workspace_bytes``, the temporary buffers XLA allocates for the
      compiled gradient program of one batch (:func:`gradient_workspace`; 0 when unknown).

    ``total`` is their sum; the full score tensor (f32[n_test, C, n_train, C]) comes on top
    when it is kept.
    """
    f, c = 4, num_classes
    width = min(chunk_size, n_train)
    row = c * n_checkpoints * dim * f
    n_query = n_test if split == "test" else width
    parts = {
        "query_features": 2 * n_query * row,
        "train_block": 3 * width * row,
        "batch_gradients": 2 * batch_size * c * grad_params * f,
        "block_scores": 2 * n_query * c * width * c * f,
        "gradient_workspace": int(workspace_bytes or 0),
    }
    parts["total"] = sum(parts.values())
    return parts


def gradient_workspace(grad_fn, variables, images, labels, batch_size: int, mesh,
                       precond_shapes: Sequence[Sequence[int]] | None = None) -> int | None:
    """Bytes of temporary buffers of the compiled gradient program the stage runs on one
    batch of ``images``/``labels`` (per device), from XLA's ``memory_analysis()``.

    The program is compiled exactly as :func:`~.store.compute_features` calls it (same batch,
    shardings and, with ``precond_shapes`` (the subset's leaf shapes), the preconditioned
    variant), so the stage reuses it. None when the function cannot be lowered ahead of time
    (a plain Python callable) or the backend does not report the sizes.
    """
    from jax.sharding import NamedSharding, PartitionSpec

    n = len(images)
    bs = sharding.padded_size(max(1, min(batch_size, n)), mesh)
    fn = grad_fn
    if precond_shapes is not None:
        fn = getattr(grad_fn, "scaled_fn", None)
        if fn is None:
            return None
    if mesh.devices.size > 1:
        try:
            fn = sharding.per_device(fn, mesh)
        except TypeError:
            fn = sharding.per_device.__wrapped__(fn, mesh)
    else:
        fn = getattr(fn, "fn", fn) if precond_shapes is None else fn
    lower = getattr(fn, "lower", None)
    if lower is None:
        return None
    rep, rows = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec(sharding.AXIS))

    def spec(x, where):
        return jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x), sharding=where)

    first = jax.tree.map(lambda x: spec(x, rep), variables)
    if precond_shapes is not None:
        first = (first, [jax.ShapeDtypeStruct(tuple(s), jnp.float32, sharding=rep)
                         for s in precond_shapes])
    x = jax.ShapeDtypeStruct((bs, *np.shape(images)[1:]), jnp.float32, sharding=rows)
    y = jax.ShapeDtypeStruct((bs, *np.shape(labels)[1:]), jnp.int32, sharding=rows)
    try:
        analysis = lower(first, x, y).compile().memory_analysis()
    except Exception:  # a backend or function without ahead-of-time compilation
        return None
    temp = getattr(analysis, "temp_size_in_bytes", None) if analysis is not None else None
    return int(temp) if temp is not None and temp >= 0 else None


def batch_params(grad_fn, dim: int) -> int:
    """Numbers per (example, class) that a gradient batch holds before projection: the subset's
    size, or D for LoGra (:mod:`.logra`: no weight gradients are formed; its output gradients
    are part of the program's workspace, :func:`gradient_workspace`) and for a function without
    a subset."""
    subset, projector = getattr(grad_fn, "subset", None), getattr(grad_fn, "projector", None)
    if subset is None or getattr(projector, "kind", None) == "logra":
        return dim
    return subset.size


def check_memory(estimate: dict, budget_bytes: float, projected: bool) -> None:
    """One-line InputError when the estimated peak exceeds the budget, with what to change."""
    if estimate["total"] <= budget_bytes:
        return
    gb = lambda b: f"{b / 2**30:.2f} GB"  # noqa: E731
    parts = ", ".join(f"{k.replace('_', ' ')} {gb(v)}" for k, v in estimate.items() if k != "total")
    need = max(0.1, round(estimate["total"] * 1.1 / 2**30 + 0.05, 1))
    fix = (f"use --proj-dim 4096 (projected gradients) or --memory-budget-gb {need}" if not projected
           else f"use a smaller --proj-dim, --batch-size or chunk size, or --memory-budget-gb {need}")
    raise InputError(f"--memory-budget-gb {budget_bytes / 2**30:g}: the influence stage needs "
                     f"about {gb(estimate['total'])} ({parts}); {fix}")


def _join_query_blocks(parts: list[dict]) -> dict:
    """Joins :func:`score_blocks` results of consecutive query blocks along the query axis."""
    first = parts[0]
    if len(parts) == 1:
        return first
    state = None
    if first["topk_state"] is not None:
        state = {side: {key: jnp.concatenate([p["topk_state"][side][key] for p in parts])
                        for key in ("key", "idx")} for side in first["topk_state"]}
    pat = None
    if first["patient_scores"] is not None:
        pat = jnp.concatenate([p["patient_scores"] for p in parts])
    return {"self_influence": first["self_influence"], "topk_state": state,
            "patient_scores": pat}


def run_classes(run) -> dict:
    """``class_names`` and ``class_labels`` of a run's C foreground classes, for
    :func:`~.grads.make_class_grad_fn`: the names of its task (:attr:`~tracin_jax.run.Run.task`)
    and the model's class indices 1..C. Empty (the BraTS defaults) for an object without a
    ``task`` (a test double, a notebook's namespace)."""
    task = getattr(run, "task", None)
    if task is None:
        return {}
    return {"class_names": tuple(task.classes), "class_labels": tuple(task.class_labels)}


def task_record(task) -> dict | None:
    """meta.json's ``task``: a :class:`~tracin_jax.task.Task` (or its dict) as a dict, None
    when there is none."""
    if task is None:
        return None
    return dict(task) if isinstance(task, dict) else task.to_dict()


def run_grad_fn(run, params="head", *, proj_dim=None, proj_seed=0, proj_kind=DEFAULT_PROJ_KIND,
                loss="dice", normalise=False):
    """The class-gradient function :func:`run_influence` uses for a loaded run.

    ``run``: a :class:`~tracin_jax.run.Run`; the other arguments as in :func:`run_influence`
    (the Dice loss uses the run's training ``dice_eps``). Returns a ClassGradFunction
    ``(variables, images, labels) -> f32[B, C, D]`` with its ``subset`` and ``projector``, whose
    C classes are the run's task's (:func:`run_classes`: names ``task.classes``, labels 1..C).
    """
    from tracin_jax.training.train import init_variables

    from tracin_jax.training.window import check_per_layer_method

    _check_loss(loss)
    if proj_kind == "logra":
        check_per_layer_method(run.model, "LoGra (--proj-kind logra)",
                               "another --proj-kind (countsketch, rademacher, gaussian)")
    shapes = jax.eval_shape(lambda: init_variables(run.model, jax.random.key(0), run.image_shape))
    subset = resolve_subset(shapes["params"], params, head=head_name(run.model))
    projector = make_projector(subset, proj_dim, proj_seed, proj_kind)
    loss_fn = (partial(tumour_dice_loss, eps=run.config.train.dice_eps) if loss == "dice"
               else tumour_cross_entropy)
    grad_fn = make_class_grad_fn(run.model, subset, loss_fn, projector, **run_classes(run))
    return normalised(grad_fn) if normalise else grad_fn


# Keyword arguments of the earlier signature that callers pass with their old default values
# whatever the method: dropped when the chosen method does not take them.
_LEGACY_DEFAULTS = {"damping": None, "fisher": "sampled", "precondition": "none",
                    "relatif": False, "normalise": False, "loss": "dice"}


def run_influence(workdir, out, *, method: str = "tracin", options=None, grad_fn=None,
                  common=None, **kwargs) -> dict:
    """Influence of the run in ``workdir`` by the registered ``method``; writes the files listed
    above into ``out`` and returns the meta dict written to ``out/meta.json``.

    Args:
      workdir: a training workdir (see :func:`tracin_jax.load_run`).
      out: output folder (created).
      method: a name of :data:`tracin_jax.influence.methods.METHODS` (default ``tracin``,
        the paper's class-wise TracIn; each method's module documents it). An unknown name is
        a one-line InputError listing the known ones.
      options: the method's options dataclass (e.g. ``TracInOptions(params="all",
        proj_dim=4096)``); None: its defaults, updated by the option keywords below.
      grad_fn: a ClassGradFn replacing the method's featuriser (``tracin`` only); give it a
        ``tag`` so its store is its own, and a ``loss`` name (``make_class_grad_fn(...,
        loss="ce")``) so meta.json gets a ``spec`` (else ``spec: null``).
      common: a :class:`~.methods.base.Common`, or its fields as keywords:
        checkpoints (``"all"``, a list of epochs, or ``"E1,E2"``), split (``test`` or
        ``train``: train-vs-train), topk (K of the streamed top-K; default only when the full
        tensor does not fit, then DEFAULT_TOPK), batch_size (examples per gradient batch,
        rounded up to the device count), chunk_size (training examples per store chunk and
        scoring block), memory_budget_gb (a budget below :func:`memory_estimate` is refused up
        front; the full score tensor is kept only when it fits on top of the estimate),
        data_dir (overrides the data folder recorded in the workdir), progress (tqdm bars),
        store_dir (feature store folder, default ``<workdir>/features/<key>``).
      **kwargs: the common fields above and the method's option fields, e.g. ``params``
        (``head`` | ``decoder`` | ``all`` | a regular expression), ``proj_dim`` (None: exact up
        to 65536 parameters, else 4096; 0: exact), ``proj_seed``, ``proj_kind`` (countsketch |
        rademacher | gaussian | logra, whose ``proj_dim`` is the per-layer rank), ``loss``
        (``dice`` | ``ce``), ``normalise`` (cosine), and the method's own (its ``Options``
        dataclass). An option the method does not take is a one-line InputError (the
        keywords of the earlier flat signature at their old defaults, e.g.
        ``fisher="sampled"``, are accepted and ignored).
    Returns:
      the meta dict written to ``out/meta.json``.
    """
    import dataclasses

    from tracin_jax.influence import methods

    cls = methods.get_method(method)
    common_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in methods.COMMON_FIELDS}
    if common is None:
        common = methods.Common(**common_kw)
    elif common_kw:
        common = dataclasses.replace(common, **common_kw)
    fields = methods.option_fields(cls)
    given = {k: v for k, v in kwargs.items()
             if v is not None and not (k not in fields and _LEGACY_DEFAULTS.get(k, ...) == v)}
    if options is None:
        options = methods.make_options(cls, given)
    elif given:
        methods.make_options(cls, given)  # refuses the options it does not take
        options = dataclasses.replace(options, **given)
    return cls(options).run(workdir, out, common, grad_fn=grad_fn)


def write_score_files(out: Path, result: dict, test_present: np.ndarray,
                      train_present: np.ndarray, *, topk: int | None = None,
                      scores_tmp: Path | None = None,
                      staged: StagedFiles | None = None) -> dict[str, list[int]]:
    """Stage 3's arrays, written into ``out``; returns {file name: shape}.

    ``result``: :func:`~.scores.score_blocks`' dict (``self_influence`` f32[n_train, C] or None,
    ``topk_state``, ``patient_scores`` f32[n_test, C, n_patients, C] or None); ``scores_tmp``:
    a finished, flushed ``scores.npy.tmp`` to become ``scores.npy`` (None: no slice scores).

    With ``staged`` (:class:`~tracin_jax.atomic.StagedFiles` of ``out``) the files are only
    staged under temporary names; :func:`write_meta` with the same ``staged`` puts them in
    place (and removes the files of :data:`OUTPUT_FILES` this run did not write) before
    meta.json. Without it each file is replaced atomically now and stale ones are removed. A
    full disk: one-line InputError, this run's temporary files removed.
    """
    written: dict[str, list[int]] = {}
    arrays = {"test_present.npy": test_present, "train_present.npy": train_present}
    if result.get("self_influence") is not None:
        arrays["self_influence.npy"] = result["self_influence"]
    if result["topk_state"] is not None:
        for name, arr in finalise_topk(result["topk_state"], test_present).items():
            arrays[f"topk_{name}.npy"] = arr
    if result["patient_scores"] is not None:
        pat = sharding.to_host(result["patient_scores"])
        arrays["patient_scores.npy"] = pat
        if topk is not None:
            for name, arr in topk_from_scores(pat, topk, test_present).items():
                arrays[f"topk_patients_{name}.npy"] = arr
    if not sharding.is_writer():
        return written
    now = staged is None
    staged = StagedFiles(out) if now else staged
    try:
        if scores_tmp is not None:
            shape = list(np.load(scores_tmp, mmap_mode="r").shape)
            if Path(scores_tmp) != staged.path("scores.npy"):
                os.replace(scores_tmp, staged.path("scores.npy"))
            staged.adopt("scores.npy")
            written["scores.npy"] = shape
        for name, arr in arrays.items():
            staged.npy(name, np.asarray(arr))
            written[name] = list(np.shape(arr))
    except BaseException:
        staged.discard()
        raise
    if now:
        staged.commit(remove=OUTPUT_FILES)
    return written


def compute_influence(grad_fn, checkpoints: Sequence[Any], train: Any, test: Any,
                      out: str | os.PathLike, *, split: str = "test", topk: int | None = None,
                      batch_size: int = 16, chunk_size: int = 256, memory_budget_gb: float = 2.0,
                      progress: bool = True, store_dir: str | os.PathLike | None = None,
                      workdir: str | os.PathLike | None = None, class_names=None,
                      class_labels=None, extra_timings: dict | None = None, mesh=None,
                      precondition=None, relatif: bool = False,
                      extra_meta: dict | None = None, method=None, task=None,
                      query_checkpoints: Sequence[Any] | None = None) -> dict:
    """The engine without the workdir: gradient function, checkpoints and examples given.

    ``checkpoints``: objects with ``epoch``, ``lr``, ``variables``; ``train``/``test``: objects
    with ``images`` f32[N,H,W,M], ``labels`` int[N,H,W], ``ids`` and ``cases``. ``split='train'``
    means ``test`` is the training set (its features are read back from the store). The store
    lives in ``store_dir``, else ``<workdir>/features/<key>``. ``mesh``: the devices to shard
    the training axis over (default: all visible, :func:`~.sharding.train_mesh`).
    ``class_names``/``class_labels``: the names and label values of the gradient function's C
    classes (default: its own ``class_names``/``class_labels``, for :func:`run_grad_fn` the
    run's task's, else NCR/NET, ED, ET <- 1, 2, 3);
    their count must equal C. ``precondition``: a per-checkpoint diagonal preconditioner
    (``(checkpoint, subset) -> arrays shaped like the subset's leaves``, with ``name`` and
    ``describe()``; e.g. :class:`~.precondition.AdamPreconditioner`, which reads
    ``checkpoint.opt_state`` when the checkpoint has one), applied to test and training
    gradients alike as ``sqrt(diag)`` before projection (:func:`~.store.compute_features`).
    ``relatif``: RelatIF-style normalisation of the training side (:class:`~.precondition.
    RelatIFBlocks`); ``self_influence.npy`` keeps the un-normalised values. ``extra_meta``:
    entries added to meta.json. ``method``: a :class:`~.methods.base.Method` whose
    ``transform_train``/``transform_test`` wrap the training block reader and the query
    features (None: unchanged). ``task``: the run's :class:`~tracin_jax.task.Task` (or its
    dict), recorded as meta.json's ``task`` (None: none recorded). ``query_checkpoints``: one
    per checkpoint (same epochs), the variables the query features of that checkpoint are
    taken at (with that checkpoint's lr and preconditioner), for a method whose query side
    differs from its training side; None: the checkpoints themselves. Not with
    ``split='train'``, whose queries are the stored training features. Returns the meta dict.

    Before any work: ``out`` and the store must be writable, the estimated memory
    (:func:`memory_estimate`, XLA's workspace of the gradient program included) must fit
    ``memory_budget_gb``, and the file systems must have room for the store chunks still to
    compute and the output files (:func:`~tracin_jax.paths.check_free_space`); each refusal is
    one line. The output files are written under temporary names and put in place together at
    the end (meta.json last): a failure, a full disk included, leaves an earlier complete
    folder in ``out`` as it was, and removes this run's temporary files.
    """
    timings = dict(extra_timings or {})
    out = Path(out)
    check_writable_folder(out, "--out")
    if store_dir is not None or workdir is not None:
        check_writable_folder(store_dir if store_dir is not None else Path(workdir) / "features",
                              "feature store")
    mesh = mesh if mesh is not None else sharding.train_mesh()
    local = sharding.local_mesh(mesh)  # the gradient stage: this process's devices
    train_ids, test_ids = [str(i) for i in train.ids], [str(i) for i in test.ids]
    n_train, n_test = len(train_ids), len(test_ids)
    if not n_train or not n_test or not checkpoints:
        raise InputError(f"nothing to score: {n_train} training and {n_test} test examples, "
                         f"{len(checkpoints)} checkpoints")
    if query_checkpoints is not None:
        query_checkpoints = list(query_checkpoints)
        if [q.epoch for q in query_checkpoints] != [ck.epoch for ck in checkpoints]:
            raise ValueError("query_checkpoints must have the epochs of checkpoints, in order")
        if split == "train":
            raise InputError("--split train reads its queries from the training features, but "
                             "this method takes its query features elsewhere; use --split test")

    c, dim = feature_shape(grad_fn, checkpoints[0].variables, train.images, train.labels)
    class_names, class_labels = class_axis(
        class_names if class_names is not None else getattr(grad_fn, "class_names", None),
        class_labels if class_labels is not None else getattr(grad_fn, "class_labels", None))
    if len(class_labels) != c:
        raise InputError(f"the gradient function gives {c} classes but its class labels are "
                         f"{list(class_labels)} ({', '.join(class_names)}); pass class_labels= "
                         f"(and class_names=) with {c} entries to make_class_grad_fn, e.g. "
                         "class_labels=(0, 1, 2, 3) for a loss with background first")
    header = make_header(grad_fn, train_ids, chunk_size, c, dim)
    precondition = make_preconditioner(precondition)
    if precondition is not None:  # plain stores keep their header (and key) unchanged
        header["precondition"] = precondition.describe()
    if store_dir is None:
        if workdir is None:
            raise ValueError("compute_influence needs store_dir or workdir")
        store_dir = Path(workdir) / "features" / store_key(header)
    subset = getattr(grad_fn, "subset", None)
    sizes = dict(n_test=n_test, n_train=n_train, num_classes=c, dim=dim,
                 n_checkpoints=len(checkpoints), chunk_size=chunk_size,
                 batch_size=sharding.padded_size(batch_size, local),
                 grad_params=batch_params(grad_fn, dim), split=split)
    budget = float(memory_budget_gb) * 2**30
    projected = getattr(grad_fn, "projector", None) is not None
    check_memory(memory_estimate(**sizes), budget, projected)  # before compiling anything
    workspace = gradient_workspace(
        grad_fn, checkpoints[0].variables, train.images, train.labels, batch_size, local,
        precond_shapes=subset.shapes if precondition is not None and subset is not None else None)
    estimate = memory_estimate(**sizes, workspace_bytes=workspace or 0)
    check_memory(estimate, budget, projected)
    full_bytes = 4 * n_test * c * n_train * c
    fits = estimate["total"] + full_bytes <= budget
    k = topk if topk is not None else (None if fits else DEFAULT_TOPK)
    k = min(int(k), n_train) if k else None  # ranks beyond n_train would be empty
    patients, patient_of = patient_index(train.cases)
    pat_fits = estimate["total"] + 4 * n_test * c * len(patients) * c <= budget
    store, made_out = open_outputs(
        out, store_dir, header, train_ids, [ck.epoch for ck in checkpoints],
        output_bytes(n_test, n_train, c, len(patients), fits=fits, patients_fit=pat_fits, k=k,
                     topk=topk))
    if sharding.is_writer():
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"--out {out}: cannot be written ({e.strerror})") from None

    # Stage 1, checkpoints outermost: test features in memory, training features to the store.
    t = time.perf_counter()
    test_parts, train_stats, test_s = [], {}, 0.0
    bar = tqdm(total=len(checkpoints) * n_train, desc="train gradients", unit="ex",
               disable=not progress, dynamic_ncols=True, leave=False)
    for t_index, ckpt in enumerate(checkpoints):
        bar.set_postfix(epoch=ckpt.epoch)
        variables = ckpt.variables
        query_variables = (query_checkpoints[t_index].variables if query_checkpoints is not None
                           else variables)
        diag = (checkpoint_diagonal(precondition, ckpt, subset) if precondition is not None
                else None)
        stats = featurise_checkpoint(store, grad_fn, ckpt.epoch, ckpt.lr, variables,
                                     train.images, train.labels, batch_size=batch_size,
                                     mesh=local, bar=bar, precond=diag)
        for key, v in stats.items():
            train_stats[key] = train_stats.get(key, 0) + v
        if split != "train" and sharding.is_writer():  # (sent to the others below)
            ts = time.perf_counter()
            test_parts.append(compute_features(grad_fn,
                                               sharding.replicate(query_variables, local),
                                               ckpt.lr, test.images, test.labels, batch_size,
                                               local, precond=diag))
            test_parts[-1].block_until_ready()
            test_s += time.perf_counter() - ts
    bar.close()
    epochs = [ckpt.epoch for ckpt in checkpoints]
    blocks = [store.chunk_rows(k) for k in range(store.n_chunks)]
    if split == "train":
        # The query side streams from the store too, one block at a time: memory is bounded
        # by two blocks, not by the training set times the checkpoints.
        queries = [(start, stop, partial(store.read_block, epochs, kq))
                   for kq, (start, stop) in enumerate(blocks)]
    else:
        # One process computes the test features and sends them to the others: computed in
        # each process, they could differ in the last bit (XLA's CPU code depends on the
        # cores a process has), and every process must place the same values on the mesh.
        test_feats = sharding.from_writer(
            jnp.concatenate(test_parts, axis=-1) if test_parts else None,
            (n_test, c, len(checkpoints) * dim))
        del test_parts
        queries = [(0, n_test, lambda: test_feats)]
    timings["features_s"] = round(time.perf_counter() - t, 3)
    timings["test_features_s"] = round(test_s, 3)
    timings["test_examples_per_s"] = (round(n_test * len(checkpoints) / test_s, 2)
                                      if test_s > 0 else None)
    timings["train_features"] = finish_stats(train_stats)

    # Stage 2: blocked contraction over the training axis. Every output file is written under
    # a temporary name (the score tensor while it is computed) and the earlier folder stays as
    # it was until all are complete (:class:`~tracin_jax.atomic.StagedFiles`, meta.json last).
    t = time.perf_counter()
    test_present = class_present(test.labels, class_labels)
    train_present = class_present(train.labels, class_labels)
    staged = StagedFiles(out)
    scores_out = None
    try:
        if fits and sharding.is_writer():
            scores_out = open_scores(staged, (n_test, c, n_train, c))
        read_train = partial(store.read_block, epochs)
        if relatif:
            read_train = RelatIFBlocks(read_train, blocks)
        if method is not None:
            read_train = method.transform_train(read_train, blocks)
        transform_test = method.transform_test if method is not None else (lambda f: f)
        relatif = isinstance(read_train, RelatIFBlocks)
        parts = []
        for qs, qe, read_query in queries:
            parts.append(score_blocks(
                transform_test(read_query()), read_train, blocks, mesh=mesh,
                scores_out=scores_out[qs:qe] if scores_out is not None else None,
                collect_scores=fits, topk=k, patient_of=patient_of if pat_fits else None,
                n_patients=len(patients), progress=progress, self_influence=not parts))
        result = _join_query_blocks(parts)
        if hasattr(read_train, "self_influence"):  # RelatIF: the normalised one is 1 by
            result["self_influence"] = read_train.self_influence()  # construction; the raw one
        timings["scores_s"] = round(time.perf_counter() - t, 3)

        # Stage 3: files (each complete under a temporary name), then meta.json last.
        t = time.perf_counter()
        if scores_out is not None:
            scores_out.flush()
            scores_out = None
        written = write_score_files(out, result, test_present, train_present, topk=topk,
                                    scores_tmp=staged.path("scores.npy") if fits else None,
                                    staged=staged)
        timings["write_s"] = round(time.perf_counter() - t, 3)
        if "load_s" in timings:
            timings["total_s"] = round(sum(
                v for key, v in timings.items()
                if key in ("load_s", "features_s", "scores_s", "write_s")
                or key.endswith("_fit_s")), 3)  # a method's fit (Fitted.timings)

        projector = getattr(grad_fn, "projector", None)
        meta = {
            **folder_meta(workdir, split, class_names, class_labels, test, train, patients,
                          task=task),
            "checkpoints": [{"epoch": int(ck.epoch), "lr": float(ck.lr)} for ck in checkpoints],
            "params": (dict(subset.describe()) if subset is not None else {"name": "custom"}),
            "gradient": {"tag": getattr(grad_fn, "tag", None), "feature_dim": dim},
            "projection": projector.describe() if projector is not None else None,
            "precondition": precondition.describe() if precondition is not None else None,
            "relatif": bool(relatif),
            "batch_size": int(batch_size),
            **run_record(k, memory_budget_gb, full_bytes, store, written, timings, mesh),
            "memory_estimate": estimate,
            **(extra_meta or {}),
        }
        return write_meta(out, meta, "influence-written", staged=staged)
    except BaseException:
        scores_out = None
        abandon_output(staged, out, made_out)
        raise


def open_outputs(out: Path, store_dir, header: dict, train_ids, keys, out_bytes: int
                 ) -> tuple[FeatureStore, bool]:
    """Before any gradient: refuses a file system without room for the store's pending chunks
    (checkpoint ``keys``) and, in the writer process, the ``out_bytes`` of the output files; then
    opens the feature store (refusing another setting's). Returns (store, made_out): whether
    this run creates ``out`` (removed again if it fails, :func:`abandon_output`)."""
    needs = [("feature store", store_dir, pending_bytes(store_dir, header, keys))]
    if sharding.is_writer():
        needs.append(("--out", out, out_bytes))
    check_free_space(needs)
    store = FeatureStore(store_dir, header, ids=train_ids)
    return store, sharding.is_writer() and not out.exists()


def abandon_output(staged, out: Path, made_out: bool) -> None:
    """After a failure: removes the staged files, and ``out`` when this run created it and it is
    empty; earlier complete outputs stay."""
    staged.discard()
    if made_out:
        _remove_if_empty(out)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def output_bytes(n_test: int, n_train: int, num_classes: int, n_patients: int, *, fits: bool,
                 patients_fit: bool, k: int | None, topk: int | None) -> int:
    """Disk bytes of the files an influence run writes into ``out`` (meta.json aside): the
    score tensor when kept, self-influence, presence, top-K and patient scores."""
    c = num_classes
    total = 4 * n_train * c + (n_test + n_train) * c
    if fits:
        total += 4 * n_test * c * n_train * c
    if k:
        total += 16 * n_test * c * c * k
    if patients_fit:
        total += 4 * n_test * c * n_patients * c
        if topk:
            total += 16 * n_test * c * c * min(int(topk), n_patients)
    return total


def open_scores(staged: StagedFiles, shape: tuple[int, ...]) -> np.memmap:
    """The score tensor's memory-mapped temporary file (``scores.npy.tmp``) in ``staged``'s
    folder, its disk space allocated up front (:func:`tracin_jax.atomic.open_memmap`): a full
    disk is a one-line InputError here, not a crash while the scores are written."""
    from tracin_jax.atomic import writing

    with writing(staged.path("scores.npy"), staged.folder / "scores.npy") as tmp:
        mm = open_memmap(tmp, np.float32, shape)
    staged.adopt("scores.npy")
    return mm


def folder_meta(workdir, split: str, class_names, class_labels, test, train, patients,
                task=None) -> dict:
    """What every influence folder's ``meta.json`` says about its axes and slices (TracIn, TRAK
    and EK-FAC alike): the evaluation and explain stages match scores to slices through it.
    ``task``: the run's task (:func:`task_record`), None when unknown."""
    return {
        "format": 1,
        "workdir": str(workdir) if workdir is not None else None,
        "split": split,
        "class_names": list(class_names),
        "class_labels": list(class_labels),
        "task": task_record(task),
        "score_axes": ["test example", "test class", "train example", "train class"],
        "topk_axes": ["test example", "test class", "train class", "rank"],
        "n_test": len(test.ids), "n_train": len(train.ids),
        "test_ids": [str(x) for x in test.ids], "test_cases": [str(x) for x in test.cases],
        "train_ids": [str(x) for x in train.ids], "train_cases": [str(x) for x in train.cases],
        "patients": patients,
    }


def run_record(k: int, memory_budget_gb: float, full_bytes: int, store, written, timings: dict,
               mesh) -> dict:
    """How an influence folder was computed: top-K, memory, store, files, timings, devices."""
    return {
        "topk": k,
        "memory_budget_gb": float(memory_budget_gb),
        "scores_bytes": full_bytes,
        "store": str(store.root),
        "files": written,
        "timings": timings,
        "device_count": int(mesh.devices.size),
        "process_count": jax.process_count(),
        "backend": jax.default_backend(),
    }


def write_meta(out: Path, meta: dict, barrier: str, staged: StagedFiles | None = None) -> dict:
    """Writes ``out/meta.json`` last (its presence marks a complete folder) from the writer
    process, then waits for every process.

    With ``staged`` (the files :func:`write_score_files` staged): meta.json is staged too, then
    the earlier meta.json is removed, the staged files are put in place, the files of
    :data:`OUTPUT_FILES` not written now are removed, and meta.json comes last. A failure
    before that (a full disk) removes the staged files and leaves ``out`` as it was."""
    if sharding.is_writer():
        if staged is None:
            write_json_atomic(out / "meta.json", meta, indent=1)
        else:
            try:
                staged.json("meta.json", meta, indent=1)
            except BaseException:
                staged.discard()
                raise
            staged.commit(first=("meta.json",), remove=OUTPUT_FILES, last="meta.json")
    sharding.barrier(barrier)
    return meta


def class_tracin(grad_fn, checkpoints: Sequence[Any], train_images, train_labels, test_images,
                 test_labels, *, batch_size: int = 16, mesh=None, precondition=None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """In-memory class-wise TracIn (no store, no files), for small sets and notebooks.

    Images f32[n, H, W, M] and labels int[n, H, W] (slices), or f32[n, X, Y, Z, M] and
    int[n, X, Y, Z] (volumes of a 3D model); train and test of the same rank.
    ``precondition``: as in :func:`compute_influence`. Returns (scores f32[n_test, C, n_train,
    C], self_influence f32[n_train, C]).
    """
    spatial = np.ndim(train_labels) - 1
    if spatial not in (2, 3):
        raise InputError(f"class_tracin: labels of shape {np.shape(train_labels)} are neither "
                         "slices [n, H, W] nor volumes [n, X, Y, Z]")
    chex.assert_rank([train_images, train_labels, test_images, test_labels],
                     [spatial + 2, spatial + 1, spatial + 2, spatial + 1])
    chex.assert_equal_shape_prefix([train_images, train_labels], spatial + 1)
    chex.assert_equal_shape_prefix([test_images, test_labels], spatial + 1)
    mesh = mesh if mesh is not None else sharding.train_mesh()
    precondition = make_preconditioner(precondition)
    tr, te = [], []  # features per checkpoint, slices or volumes alike
    for ckpt in checkpoints:
        variables = sharding.replicate(ckpt.variables, mesh)
        diag = (checkpoint_diagonal(precondition, ckpt, getattr(grad_fn, "subset", None))
                if precondition is not None else None)
        tr.append(compute_features(grad_fn, variables, ckpt.lr, train_images, train_labels,
                                   batch_size, mesh, precond=diag))
        te.append(compute_features(grad_fn, variables, ckpt.lr, test_images, test_labels,
                                   batch_size, mesh, precond=diag))
    train_feats = jnp.concatenate(tr, axis=-1)
    test_feats = jnp.concatenate(te, axis=-1)
    return (sharding.to_host(contract(test_feats, train_feats)),
            sharding.to_host(squared_norms(train_feats)))
