"""The scoring orchestration: from a gradient function, checkpoints and examples to an
influence folder (:func:`compute_influence`) or to arrays in memory (:func:`class_tracin`).

Stages (each a separate, swappable part): parameter subset (:mod:`.subsets`) -> class
gradients (:mod:`.grads`, optionally projected by :mod:`.projection`) -> training features on
disk (:mod:`.store`) -> blocked contraction, top-K, patients, self-influence (:mod:`.scores`)
-> the influence folder (:mod:`.folder`: its files, shapes and staged writing, meta.json
last). The up-front checks (arguments, memory) are in :mod:`.checks`; choosing a method of the
registry and running it on a training workdir is :func:`~.api.run_influence`.

A gradient function is read through :func:`~.grads.as_class_grad_function` (a plain callable
works in memory; the feature store needs a tag). :func:`run_grad_fn` builds the default one of
a loaded run, over its task's classes (:func:`run_classes`).

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

from tracin_jax.atomic import StagedFiles
from tracin_jax.errors import InputError
from tracin_jax.influence import sharding
from tracin_jax.influence.checks import (batch_params, check_loss, check_memory,
                                         gradient_workspace, memory_estimate)
from tracin_jax.influence.folder import (abandon_output, class_present, folder_meta,
                                         open_outputs, open_scores, output_bytes, run_record,
                                         write_meta, write_score_files)
from tracin_jax.influence.grads import (as_class_grad_function, class_axis, make_class_grad_fn,
                                        normalised)
from tracin_jax.influence.precondition import (RelatIFBlocks, checkpoint_diagonal,
                                               make_preconditioner)
from tracin_jax.influence.projection import DEFAULT_PROJ_KIND, make_projector
from tracin_jax.influence.scores import contract, patient_index, score_blocks, squared_norms
from tracin_jax.influence.store import (compute_features, feature_shape, featurise_checkpoint,
                                        finish_stats, make_header, store_key)
from tracin_jax.influence.subsets import resolve_subset
from tracin_jax.models.interface import head_name
from tracin_jax.paths import check_writable_folder
from tracin_jax.training.losses import tumour_cross_entropy, tumour_dice_loss

DEFAULT_TOPK = 10


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


def run_grad_fn(run, params="head", *, proj_dim=None, proj_seed=0, proj_kind=DEFAULT_PROJ_KIND,
                loss="dice", normalise=False):
    """The class-gradient function :func:`~.api.run_influence` uses for a loaded run.

    ``run``: a :class:`~tracin_jax.run.Run`; the other arguments as in :func:`~.api.run_influence`
    (the Dice loss uses the run's training ``dice_eps``). Returns a ClassGradFunction
    ``(variables, images, labels) -> f32[B, C, D]`` with its ``subset`` and ``projector``, whose
    C classes are the run's task's (:func:`run_classes`: names ``task.classes``, labels 1..C).
    """
    from tracin_jax.training.train import init_variables

    from tracin_jax.training.window import check_per_layer_method

    check_loss(loss)
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

    ``checkpoints``: objects with ``epoch``, ``lr``, ``variables`` (and optionally ``key``, their
    store key when it is not the epoch: a model that is no checkpoint of the run, e.g. TRAK's
    retrained seeds, :func:`~.store.key_folder`; such an entry may have ``epoch`` None, and is
    then left out of meta.json's ``checkpoints``); ``train``/``test``: objects
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
    ``fit_features`` sees the complete stored training features once stage 1 is done (its
    entries go to meta.json last) and whose ``transform_train``/``transform_test`` then wrap
    the training block reader and the query features (None: unchanged). ``task``: the run's
    :class:`~tracin_jax.task.Task` (or its dict), recorded as meta.json's ``task`` (None: none
    recorded). ``query_checkpoints``: one
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

    grad_fn = as_class_grad_function(grad_fn, class_names=class_names, class_labels=class_labels)
    c, dim = feature_shape(grad_fn, checkpoints[0].variables, train.images, train.labels)
    class_names, class_labels = class_axis(
        class_names if class_names is not None else grad_fn.class_names,
        class_labels if class_labels is not None else grad_fn.class_labels)
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
    subset = grad_fn.subset
    sizes = dict(n_test=n_test, n_train=n_train, num_classes=c, dim=dim,
                 n_checkpoints=len(checkpoints), chunk_size=chunk_size,
                 batch_size=sharding.padded_size(batch_size, local),
                 grad_params=batch_params(grad_fn, dim), split=split)
    budget = float(memory_budget_gb) * 2**30
    projected = grad_fn.projector is not None
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
    keys = [ck.epoch if getattr(ck, "key", None) is None else ck.key for ck in checkpoints]
    store, made_out = open_outputs(
        out, store_dir, header, train_ids, keys,
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
        bar.set_postfix(epoch=keys[t_index])
        variables = ckpt.variables
        query_variables = (query_checkpoints[t_index].variables if query_checkpoints is not None
                           else variables)
        diag = (checkpoint_diagonal(precondition, ckpt, subset) if precondition is not None
                else None)
        stats = featurise_checkpoint(store, grad_fn, keys[t_index], ckpt.lr, variables,
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
    blocks = [store.chunk_rows(k) for k in range(store.n_chunks)]
    if split == "train":
        # The query side streams from the store too, one block at a time: memory is bounded
        # by two blocks, not by the training set times the checkpoints.
        queries = [(start, stop, partial(store.read_block, keys, kq))
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
    test_present = class_present(test.labels, class_labels)
    train_present = class_present(train.labels, class_labels)
    staged = StagedFiles(out)
    scores_out = None
    fit_meta = {}
    try:
        if method is not None:  # a fit over the complete training features (TRAK's kernels)
            t = time.perf_counter()
            fit_meta = method.fit_features(partial(store.read_block, keys), blocks) or {}
            timings["features_fit_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        if fits and sharding.is_writer():
            scores_out = open_scores(staged, (n_test, c, n_train, c))
        read_train = partial(store.read_block, keys)
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

        projector = grad_fn.projector
        meta = {
            **folder_meta(workdir, split, class_names, class_labels, test, train, patients,
                          task=task),
            "checkpoints": [{"epoch": int(ck.epoch), "lr": float(ck.lr)} for ck in checkpoints
                            if ck.epoch is not None],
            "params": (dict(subset.describe()) if subset is not None else {"name": "custom"}),
            "gradient": {"tag": grad_fn.tag, "feature_dim": dim},
            "projection": projector.describe() if projector is not None else None,
            "precondition": precondition.describe() if precondition is not None else None,
            "relatif": bool(relatif),
            "batch_size": int(batch_size),
            **run_record(k, memory_budget_gb, full_bytes, store, written, timings, mesh),
            "memory_estimate": estimate,
            **(extra_meta or {}),
            **fit_meta,
        }
        return write_meta(out, meta, "influence-written", staged=staged)
    except BaseException:
        scores_out = None
        abandon_output(staged, out, made_out)
        raise


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
    grad_fn = as_class_grad_function(grad_fn)
    mesh = mesh if mesh is not None else sharding.train_mesh()
    precondition = make_preconditioner(precondition)
    tr, te = [], []  # features per checkpoint, slices or volumes alike
    for ckpt in checkpoints:
        variables = sharding.replicate(ckpt.variables, mesh)
        diag = (checkpoint_diagonal(precondition, ckpt, grad_fn.subset)
                if precondition is not None else None)
        tr.append(compute_features(grad_fn, variables, ckpt.lr, train_images, train_labels,
                                   batch_size, mesh, precond=diag))
        te.append(compute_features(grad_fn, variables, ckpt.lr, test_images, test_labels,
                                   batch_size, mesh, precond=diag))
    train_feats = jnp.concatenate(tr, axis=-1)
    test_feats = jnp.concatenate(te, axis=-1)
    return (sharding.to_host(contract(test_feats, train_feats)),
            sharding.to_host(squared_norms(train_feats)))

