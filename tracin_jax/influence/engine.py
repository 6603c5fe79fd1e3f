"""``run_influence``: class-wise TracIn of a trained run, from checkpoints to files.

Stages (each a separate, swappable part): parameter subset (:mod:`.subsets`) -> class
gradients (:mod:`.grads`, optionally projected by :mod:`.projection`) -> training features on
disk (:mod:`.store`) -> blocked contraction, top-K, patients, self-influence (:mod:`.scores`).

Files written into ``out`` (each to a temporary name, then renamed; ``meta.json`` last):

- ``scores.npy``: f32[n_test, 3, n_train, 3] (test example, test class, train example, train
  class; classes NCR/NET, ED, ET), when it fits ``memory_budget_gb``;
- ``self_influence.npy``: f32[n_train, 3];
- ``test_present.npy`` / ``train_present.npy``: bool[n, 3], class present in the ground truth;
- ``topk_{proponents,opponents}_{indices,scores}.npy``: int32 / f32[n_test, 3, 3, K] (test
  example, test class, train class, rank), when ``topk`` is given or the full tensor does not
  fit (then K = DEFAULT_TOPK); absent test classes hold -1 / NaN;
- ``patient_scores.npy``: f32[n_test, 3, n_patients, 3], the sum over each training patient's
  slices (patients sorted by case id, listed in meta), when it fits; with ``topk`` also
  ``topk_patients_*`` ranked over patients;
- ``meta.json``: ids, cases, patients, checkpoints (epoch, lr), parameter subset (name, paths,
  size), projection, files and shapes, timings, device count.

Sign convention: a positive score means a proponent (a gradient step on the training example
lowers the test example's class loss), negative an opponent, as in TracIn.
"""

from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from tracin_jax.atomic import save_npy_atomic, write_json_atomic
from tracin_jax.errors import InputError
from tracin_jax.influence import sharding
from tracin_jax.influence.grads import make_class_grad_fn, normalised
from tracin_jax.influence.projection import DEFAULT_PROJ_KIND, make_projector
from tracin_jax.influence.scores import (contract, finalise_topk, patient_index, score_blocks,
                                         squared_norms, topk_from_scores)
from tracin_jax.influence.store import (FeatureStore, compute_features, feature_shape,
                                        featurise_checkpoint, finish_stats, make_header,
                                        store_key)
from tracin_jax.influence.subsets import resolve_subset
from tracin_jax.training.losses import CLASS_NAMES, tumour_cross_entropy, tumour_dice_loss

DEFAULT_TOPK = 10
SPLITS = ("test", "train")
LOSSES = ("dice", "ce")
OUTPUT_FILES = (
    "scores.npy", "self_influence.npy", "test_present.npy", "train_present.npy",
    "patient_scores.npy",
    *(f"topk_{who}{side}_{what}.npy" for who in ("", "patients_")
      for side in ("proponents", "opponents") for what in ("indices", "scores")),
)


def class_present(labels: np.ndarray, num_classes: int = 3) -> np.ndarray:
    """bool[n, C]: class c (label value c + 1; 0 is background) occurs in the slice."""
    labels = np.asarray(labels)
    return np.stack([(labels == c + 1).reshape(len(labels), -1).any(axis=1)
                     for c in range(num_classes)], axis=1)


def parse_checkpoints(spec: Any, available: Sequence[int], workdir: Any = "") -> list[int]:
    """``all`` | [E1, E2, ...] | "E1,E2,..." | E -> epochs (in the given order, no repeats)."""
    have = ", ".join(str(e) for e in available)
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
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
    for name, value in (("--batch-size", batch_size), ("chunk_size", chunk_size)):
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


def check_writable_folder(path: str | os.PathLike, what: str) -> None:
    """Raises a one-line InputError unless folder ``path`` exists and is writable or can be
    created (its nearest existing parent is a writable folder). Creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {path}: exists and is not a folder")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise InputError(f"{what} {path}: cannot be created, {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        detail = "is not writable" if probe == path else f"cannot be created, {probe} is not writable"
        raise InputError(f"{what} {path}: {detail}")


def _check_loss(loss) -> None:
    if loss not in LOSSES:
        raise InputError(f"--loss {loss!r} is not one of {', '.join(LOSSES)}")


def run_grad_fn(run, params="head", *, proj_dim=None, proj_seed=0, proj_kind=DEFAULT_PROJ_KIND,
                loss="dice", normalise=False):
    """The class-gradient function :func:`run_influence` uses for a loaded run.

    ``run``: a :class:`~tracin_jax.run.Run`; the other arguments as in :func:`run_influence`
    (the Dice loss uses the run's training ``dice_eps``). Returns a ClassGradFunction
    ``(variables, images, labels) -> f32[B, 3, D]`` with its ``subset`` and ``projector``.
    """
    from tracin_jax.training.train import init_variables

    _check_loss(loss)
    shapes = jax.eval_shape(lambda: init_variables(run.model, jax.random.key(0), run.image_shape))
    subset = resolve_subset(shapes["params"], params)
    projector = make_projector(subset, proj_dim, proj_seed, proj_kind)
    loss_fn = (partial(tumour_dice_loss, eps=run.config.train.dice_eps) if loss == "dice"
               else tumour_cross_entropy)
    grad_fn = make_class_grad_fn(run.model, subset, loss_fn, projector)
    return normalised(grad_fn) if normalise else grad_fn


def run_influence(workdir, out, *, checkpoints="all", params="head", proj_dim=None, proj_seed=0,
                  split="test", topk=None, batch_size=16, chunk_size=256, memory_budget_gb=2.0,
                  data_dir=None, progress=True, grad_fn=None, proj_kind=DEFAULT_PROJ_KIND,
                  loss="dice", normalise=False, store_dir=None) -> dict:
    """Class-wise TracIn of the run in ``workdir``; writes the files listed above into ``out``.

    Args:
      workdir: a training workdir (see :func:`tracin_jax.load_run`).
      out: output folder (created).
      checkpoints: ``"all"``, a list of epochs, or ``"E1,E2"``.
      params: parameter subset: ``head`` | ``decoder`` | ``all`` | a regular expression.
      proj_dim: projection dimension; None = exact up to 65536 parameters, else 4096 (see
        :mod:`tracin_jax.influence.projection`); 0 = exact whatever the size.
      proj_seed, proj_kind: projection seed and kind (countsketch | rademacher | gaussian).
      split: the examples to explain: ``test`` or ``train`` (train-vs-train).
      topk: K of the streamed top-K proponents/opponents (default: only when the full tensor
        does not fit, then DEFAULT_TOPK).
      batch_size: examples per gradient batch (rounded up to the device count).
      chunk_size: training examples per store chunk and per scoring block.
      memory_budget_gb: largest score tensor (slices or patients) materialised on the host.
      data_dir: overrides the data folder recorded in the workdir.
      progress: show tqdm bars.
      loss: the class-wise loss differentiated: ``dice`` (the training loss, the paper) or
        ``ce`` (region cross-entropy, :func:`~tracin_jax.training.losses.tumour_cross_entropy`).
      normalise: unit-norm class gradients (cosine TracIn, :func:`normalised`).
      grad_fn: a ClassGradFn to use instead of the one built from ``params``/``proj_dim``/
        ``loss``/``normalise``; give it a ``tag`` so its store is its own.
      store_dir: feature store folder (default ``<workdir>/features/<key>``).
    Returns:
      the meta dict written to ``out/meta.json``.
    """
    from tracin_jax import load_run

    t0 = time.perf_counter()
    _check_args(split, topk, batch_size, chunk_size, memory_budget_gb, proj_seed)
    _check_loss(loss)
    check_writable_folder(out, "--out")
    check_writable_folder(store_dir if store_dir is not None else Path(workdir) / "features",
                          "feature store")
    run = load_run(workdir, data_dir)
    available = [c.epoch for c in run.checkpoints]
    epochs = parse_checkpoints(checkpoints, available, workdir)
    chosen = [run.checkpoint(e) for e in epochs]
    if grad_fn is None:
        grad_fn = run_grad_fn(run, params, proj_dim=proj_dim, proj_seed=proj_seed,
                              proj_kind=proj_kind, loss=loss, normalise=normalise)
    train = run.train
    test = run.test if split == "test" else run.train
    for name, ex in (("training", train), (split, test)):
        if len(ex.images) == 0:
            raise InputError(f"{workdir}: the {name} split has no slices")
    for c in chosen:
        if not c.lr >= 0:
            raise InputError(f"{workdir}: checkpoint {c.epoch} records learning rate {c.lr}")
    for c in chosen:  # a damaged checkpoint fails here, before any file or folder is made
        c.check()
    load_s = time.perf_counter() - t0
    meta = compute_influence(
        grad_fn, chosen, train, test, out, split=split, topk=topk, batch_size=batch_size,
        chunk_size=chunk_size, memory_budget_gb=memory_budget_gb, progress=progress,
        store_dir=store_dir, workdir=workdir, extra_timings={"load_s": round(load_s, 3)})
    return meta


def compute_influence(grad_fn, checkpoints: Sequence[Any], train: Any, test: Any,
                      out: str | os.PathLike, *, split: str = "test", topk: int | None = None,
                      batch_size: int = 16, chunk_size: int = 256, memory_budget_gb: float = 2.0,
                      progress: bool = True, store_dir: str | os.PathLike | None = None,
                      workdir: str | os.PathLike | None = None, class_names=CLASS_NAMES,
                      extra_timings: dict | None = None, mesh=None) -> dict:
    """The engine without the workdir: gradient function, checkpoints and examples given.

    ``checkpoints``: objects with ``epoch``, ``lr``, ``variables``; ``train``/``test``: objects
    with ``images`` f32[N,H,W,4], ``labels`` int[N,H,W], ``ids`` and ``cases``. ``split='train'``
    means ``test`` is the training set (its features are read back from the store). The store
    lives in ``store_dir``, else ``<workdir>/features/<key>``. ``mesh``: the devices to shard
    the training axis over (default: all visible, :func:`~.sharding.train_mesh`). Returns the
    meta dict.
    """
    timings = dict(extra_timings or {})
    out = Path(out)
    check_writable_folder(out, "--out")
    if store_dir is not None or workdir is not None:
        check_writable_folder(store_dir if store_dir is not None else Path(workdir) / "features",
                              "feature store")
    if sharding.is_writer():
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "meta.json").unlink(missing_ok=True)
        except OSError as e:
            raise InputError(f"--out {out}: cannot be written ({e.strerror})") from None
    mesh = mesh if mesh is not None else sharding.train_mesh()
    train_ids, test_ids = [str(i) for i in train.ids], [str(i) for i in test.ids]
    n_train, n_test = len(train_ids), len(test_ids)
    if not n_train or not n_test or not checkpoints:
        raise InputError(f"nothing to score: {n_train} training and {n_test} test examples, "
                         f"{len(checkpoints)} checkpoints")

    c, dim = feature_shape(grad_fn, checkpoints[0].variables, train.images, train.labels)
    header = make_header(grad_fn, train_ids, chunk_size, c, dim)
    if store_dir is None:
        if workdir is None:
            raise ValueError("compute_influence needs store_dir or workdir")
        store_dir = Path(workdir) / "features" / store_key(header)
    store = FeatureStore(store_dir, header, ids=train_ids)

    # Stage 1, checkpoints outermost: test features in memory, training features to the store.
    t = time.perf_counter()
    test_parts, train_stats, test_s = [], {}, 0.0
    bar = tqdm(total=len(checkpoints) * n_train, desc="train gradients", unit="ex",
               disable=not progress, dynamic_ncols=True, leave=False)
    for ckpt in checkpoints:
        bar.set_postfix(epoch=ckpt.epoch)
        variables = ckpt.variables
        stats = featurise_checkpoint(store, grad_fn, ckpt.epoch, ckpt.lr, variables,
                                     train.images, train.labels, batch_size=batch_size,
                                     mesh=mesh, bar=bar)
        for key, v in stats.items():
            train_stats[key] = train_stats.get(key, 0) + v
        if split != "train":
            ts = time.perf_counter()
            test_parts.append(compute_features(grad_fn, sharding.replicate(variables, mesh),
                                               ckpt.lr, test.images, test.labels, batch_size,
                                               mesh))
            test_parts[-1].block_until_ready()
            test_s += time.perf_counter() - ts
    bar.close()
    epochs = [ckpt.epoch for ckpt in checkpoints]
    blocks = [store.chunk_rows(k) for k in range(store.n_chunks)]
    if split == "train":
        test_feats = jnp.asarray(np.concatenate([store.read_block(epochs, k)
                                                 for k in range(store.n_chunks)]))
    else:
        test_feats = jnp.concatenate(test_parts, axis=-1)
    timings["features_s"] = round(time.perf_counter() - t, 3)
    timings["test_features_s"] = round(test_s, 3)
    timings["test_examples_per_s"] = (round(n_test * len(checkpoints) / test_s, 2)
                                      if test_s > 0 else None)
    timings["train_features"] = finish_stats(train_stats)

    # Stage 2: blocked contraction over the training axis.
    t = time.perf_counter()
    budget = float(memory_budget_gb) * 2**30
    full_bytes = 4 * n_test * c * n_train * c
    fits = full_bytes <= budget
    k = topk if topk is not None else (None if fits else DEFAULT_TOPK)
    k = min(int(k), n_train) if k else None  # ranks beyond n_train would be empty
    patients, patient_of = patient_index(train.cases)
    pat_fits = 4 * n_test * c * len(patients) * c <= budget
    test_present = class_present(test.labels, c)
    train_present = class_present(train.labels, c)
    written: dict[str, list[int]] = {}
    scores_tmp = out / "scores.npy.tmp"
    scores_out = None
    if fits and sharding.is_writer():
        scores_out = np.lib.format.open_memmap(scores_tmp, mode="w+", dtype=np.float32,
                                               shape=(n_test, c, n_train, c))
    result = score_blocks(test_feats, lambda kb: store.read_block(epochs, kb), blocks, mesh=mesh,
                          scores_out=scores_out, collect_scores=fits, topk=k,
                          patient_of=patient_of if pat_fits else None,
                          n_patients=len(patients), progress=progress)
    timings["scores_s"] = round(time.perf_counter() - t, 3)

    # Stage 3: files (each atomic), meta.json last.
    t = time.perf_counter()
    arrays = {"self_influence.npy": result["self_influence"],
              "test_present.npy": test_present, "train_present.npy": train_present}
    if result["topk_state"] is not None:
        for name, arr in finalise_topk(result["topk_state"], test_present).items():
            arrays[f"topk_{name}.npy"] = arr
    if result["patient_scores"] is not None:
        pat = sharding.to_host(result["patient_scores"])
        arrays["patient_scores.npy"] = pat
        if topk is not None:
            for name, arr in topk_from_scores(pat, topk, test_present).items():
                arrays[f"topk_patients_{name}.npy"] = arr
    if sharding.is_writer():
        if scores_out is not None:
            scores_out.flush()
            del scores_out
            os.replace(scores_tmp, out / "scores.npy")
            written["scores.npy"] = [n_test, c, n_train, c]
        for name, arr in arrays.items():
            save_npy_atomic(out / name, np.asarray(arr))
            written[name] = list(np.shape(arr))
        for name in OUTPUT_FILES:
            if name not in written:
                (out / name).unlink(missing_ok=True)
    timings["write_s"] = round(time.perf_counter() - t, 3)
    if "load_s" in timings:
        timings["total_s"] = round(sum(v for key, v in timings.items()
                                       if key in ("load_s", "features_s", "scores_s", "write_s")), 3)

    subset = getattr(grad_fn, "subset", None)
    projector = getattr(grad_fn, "projector", None)
    meta = {
        "format": 1,
        "workdir": str(workdir) if workdir is not None else None,
        "split": split,
        "class_names": list(class_names)[:c],
        "score_axes": ["test example", "test class", "train example", "train class"],
        "topk_axes": ["test example", "test class", "train class", "rank"],
        "n_test": n_test, "n_train": n_train,
        "test_ids": test_ids, "test_cases": [str(x) for x in test.cases],
        "train_ids": train_ids, "train_cases": [str(x) for x in train.cases],
        "patients": patients,
        "checkpoints": [{"epoch": int(ck.epoch), "lr": float(ck.lr)} for ck in checkpoints],
        "params": (dict(subset.describe()) if subset is not None else {"name": "custom"}),
        "gradient": {"tag": getattr(grad_fn, "tag", None), "feature_dim": dim},
        "projection": projector.describe() if projector is not None else None,
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
    if sharding.is_writer():
        write_json_atomic(out / "meta.json", meta, indent=1)
    sharding.barrier("influence-written")
    return meta


def class_tracin(grad_fn, checkpoints: Sequence[Any], train_images, train_labels, test_images,
                 test_labels, *, batch_size: int = 16, mesh=None) -> tuple[np.ndarray, np.ndarray]:
    """In-memory class-wise TracIn (no store, no files), for small sets and notebooks.

    Returns (scores f32[n_test, C, n_train, C], self_influence f32[n_train, C]).
    """
    mesh = mesh if mesh is not None else sharding.train_mesh()
    tr, te = [], []
    for ckpt in checkpoints:
        variables = sharding.replicate(ckpt.variables, mesh)
        tr.append(compute_features(grad_fn, variables, ckpt.lr, train_images, train_labels,
                                   batch_size, mesh))
        te.append(compute_features(grad_fn, variables, ckpt.lr, test_images, test_labels,
                                   batch_size, mesh))
    train_feats = jnp.concatenate(tr, axis=-1)
    test_feats = jnp.concatenate(te, axis=-1)
    return (sharding.to_host(contract(test_feats, train_feats)),
            sharding.to_host(squared_norms(train_feats)))
