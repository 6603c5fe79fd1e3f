"""The training-feature store: sqrt(eta_t)-scaled class gradients on disk, chunked and resumable.

Layout of one store (default ``<workdir>/features/<key>/``)::

    manifest.json                  header + one entry per checkpoint and per finished chunk
    epoch_0006/chunk_00000.npy     f32[rows, C, D]: examples [0, chunk_size) at epoch 6
    epoch_0006/chunk_00001.npy     ...
    model_seed1/chunk_00000.npy    a model that is no checkpoint of the run, keyed by a name

Row ``[b, c]`` of a chunk is ``sqrt(eta_t) * g`` with g the (projected) gradient of the class-c
loss of training example b at checkpoint t, so a TracIn score is a plain inner product of
features concatenated over checkpoints. Scaling by sqrt(eta_t) on both sides (rather than eta_t
on one) keeps the train-vs-train matrix symmetric and self-influence a squared norm.

``<key>`` is ``<subset>-<projection>-seed<seed>-<hash>``, e.g. ``head-exact-seed0-3f9c1a0b2d4e``
or ``all-rademacher4096-seed0-...``; the hash covers the gradient function's tag (loss, method),
the resolved parameter paths, the projection, the example ids and the chunk size. The store
therefore belongs to a training set, not to a test set: any later test set reuses it. Each
checkpoint's entry records its epoch, lr and a fingerprint of its variables; if the checkpoint
on disk changes (a retrained workdir), that checkpoint's chunks are recomputed. A store
"checkpoint" is keyed by its epoch (an int), or by a name (a string starting with a letter,
:func:`key_folder`) for models that are no checkpoint of the run (TRAK's retrained seeds).

Crash safety: a chunk is written to ``chunk_k.npy.tmp`` through a memory map, flushed and
fsynced, then renamed to ``chunk_k.npy`` (atomic); only a renamed file counts as done. The
manifest is rewritten (temp file + rename) after each chunk; a chunk file whose manifest entry
was lost to a crash is re-recorded from the file. A run killed at any moment (SIGKILL included)
recomputes only missing chunks on the next start and gives the same scores.

Concurrent runs: a run holds an exclusive lock (``fcntl.flock`` on ``store.lock``) while it
fills one checkpoint's chunks. A second run on the same store waits for it (saying so on
stderr), then re-reads the manifest and reuses the chunks the first one wrote, so every chunk is
computed once. The lock is released by the kernel when its holder dies (SIGKILL included).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from tracin_jax.progress import tqdm

from tracin_jax.atomic import save_npy_atomic, write_json_atomic
from tracin_jax.errors import InputError
from tracin_jax.identity import variables_fingerprint  # noqa: F401 (also this module's API)
from tracin_jax.influence import sharding
from tracin_jax.influence.grads import as_class_grad_function

MANIFEST = "manifest.json"
LOCK = "store.lock"
FORMAT = 1


def ids_hash(ids: Sequence[Any]) -> str:
    """Short stable hash of a list of example ids."""
    return hashlib.sha1(json.dumps([str(i) for i in ids]).encode()).hexdigest()[:16]


def _slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9_.]+", "_", text).strip("_")
    return (s or "subset")[:limit]


def key_folder(key: int | str) -> str:
    """The folder of a store checkpoint: ``epoch_0006`` for epoch 6, ``model_<key>`` for a
    key given as a name (letters, digits, ``_.-``, starting with a letter)."""
    if isinstance(key, str):
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", key):
            raise ValueError(f"store key {key!r}: a name starts with a letter and holds letters, "
                             "digits, '_', '.' and '-' only")
        return f"model_{key}"
    return f"epoch_{int(key):04d}"


def _key(key: int | str) -> int | str:
    """A store checkpoint key as the manifest records it."""
    key_folder(key)  # checked
    return key if isinstance(key, str) else int(key)


def store_key(header: dict) -> str:
    """``<subset>-<projection>-seed<seed>-<hash of the header>``."""
    proj = header.get("projection")
    proj_s = "exact" if not proj else f"{proj['kind']}{proj['dim']}"
    seed = proj["seed"] if proj else 0
    digest = hashlib.sha1(json.dumps(header, sort_keys=True).encode()).hexdigest()[:12]
    return f"{_slug(header.get('subset_name') or 'custom')}-{proj_s}-seed{seed}-{digest}"


class FeatureStore:
    """A folder of per-checkpoint feature chunks; see the module docstring.

    ``header`` must describe everything the features depend on except the checkpoint
    (gradient tag, subset, projection, ids hash, n, chunk size, C, D); ``ids`` (optional) lets
    each chunk's manifest entry record the hash of its own ids.
    """

    def __init__(self, root: str | os.PathLike, header: dict, ids: Sequence[Any] | None = None):
        self.root = Path(root)
        self.header = dict(header)
        self.ids = list(ids) if ids is not None else None
        self.n = int(header["n_examples"])
        self.chunk_size = int(header["chunk_size"])
        self.num_classes = int(header["num_classes"])
        self.dim = int(header["dim"])
        self.n_chunks = max(1, math.ceil(self.n / self.chunk_size))
        if sharding.is_writer():
            self.root.mkdir(parents=True, exist_ok=True)
            with self.locked():
                if not (self.root / MANIFEST).exists():
                    self.manifest = {"format": FORMAT, "header": self.header, "checkpoints": {},
                                     "chunks": {}}
                    self._save_manifest()
        sharding.barrier("store-created")  # other processes read the manifest once it exists
        if not sharding.is_writer():
            self._load_manifest()

    def _load_manifest(self) -> None:
        path = self.root / MANIFEST
        if not path.exists():
            return
        try:
            self.manifest = json.loads(path.read_text())
        except ValueError:
            raise InputError(f"{path} is not valid JSON; delete {self.root} to recompute") from None
        if self.manifest.get("header") != json.loads(json.dumps(self.header)):
            raise InputError(f"{self.root} holds features of another setting; delete it or "
                             "choose another store folder")

    @contextlib.contextmanager
    def locked(self, log: Callable[[str], None] | None = None):
        """Holds the store's exclusive lock: waits (saying so) while another run holds it, then
        re-reads the manifest and removes temporary files a killed run left behind."""
        log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        handle = None
        if sharding.is_writer():
            handle = open(self.root / LOCK, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log(f"tracin-jax: another run is writing features to {self.root}; waiting for it "
                    "(its chunks will be reused)")
                t0 = time.perf_counter()
                fcntl.flock(handle, fcntl.LOCK_EX)
                log(f"tracin-jax: the other run released {self.root} after "
                    f"{time.perf_counter() - t0:.0f}s; continuing")
        try:
            self._load_manifest()
            if sharding.is_writer():
                for pattern in ("epoch_*/*.tmp", "model_*/*.tmp"):  # only the lock holder
                    for stale in self.root.glob(pattern):  # writes
                        stale.unlink(missing_ok=True)
            yield self
        finally:
            if handle is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()

    # -- layout -------------------------------------------------------------------------
    def chunk_rows(self, k: int) -> tuple[int, int]:
        return k * self.chunk_size, min(self.n, (k + 1) * self.chunk_size)

    def chunk_path(self, epoch: int | str, k: int) -> Path:
        return self.root / key_folder(epoch) / f"chunk_{k:05d}.npy"

    def _save_manifest(self) -> None:
        if sharding.is_writer():
            write_json_atomic(self.root / MANIFEST, self.manifest)

    # -- checkpoints --------------------------------------------------------------------
    def open_checkpoint(self, epoch: int | str, lr: float, fingerprint: str) -> None:
        """Records checkpoint ``epoch`` (an epoch, or a model's name: the store key); drops its
        chunks if they came from other variables."""
        entry = {"epoch": _key(epoch), "lr": float(lr), "fingerprint": fingerprint,
                 "scale": math.sqrt(float(lr))}
        old = self.manifest["checkpoints"].get(str(epoch))
        if old != entry:
            if old is not None and sharding.is_writer():
                for k in range(self.n_chunks):
                    self.chunk_path(epoch, k).unlink(missing_ok=True)
            self.manifest["chunks"] = {key: v for key, v in self.manifest["chunks"].items()
                                       if v["epoch"] != _key(epoch)}
            self.manifest["checkpoints"][str(epoch)] = entry
            self._save_manifest()

    def has_chunk(self, epoch: int | str, k: int) -> bool:
        """True when chunk k of ``epoch`` was completely written (its final file exists)."""
        if str(epoch) not in self.manifest["checkpoints"]:
            return False
        path = self.chunk_path(epoch, k)
        if not path.exists():
            return False
        start, stop = self.chunk_rows(k)
        try:
            arr = np.load(path, mmap_mode="r")
        except (ValueError, OSError):
            return False
        return arr.shape == (stop - start, self.num_classes, self.dim) and arr.dtype == np.float32

    def missing_chunks(self, epoch: int | str) -> list[int]:
        missing = [k for k in range(self.n_chunks) if not self.has_chunk(epoch, k)]
        # Re-record chunks that were renamed but whose manifest entry a crash lost.
        changed = False
        for k in range(self.n_chunks):
            key = f"{epoch}/{k}"
            if k not in missing and key not in self.manifest["chunks"]:
                self.manifest["chunks"][key] = self._chunk_entry(epoch, k)
                changed = True
        if changed:
            self._save_manifest()
        return missing

    def _chunk_entry(self, epoch: int | str, k: int) -> dict:
        start, stop = self.chunk_rows(k)
        ids = self.ids
        return {
            "epoch": _key(epoch), "lr": self.manifest["checkpoints"][str(epoch)]["lr"],
            "chunk": k, "start": start, "stop": stop,
            "ids_hash": ids_hash(ids[start:stop]) if ids is not None else None,
            "file": str(self.chunk_path(epoch, k).relative_to(self.root)),
            "shape": [stop - start, self.num_classes, self.dim], "dtype": "float32",
            "subset": self.header.get("subset_name"), "projection": self.header.get("projection"),
        }

    def write_chunk(self, epoch: int | str, k: int, features: np.ndarray) -> None:
        """Writes chunk k of ``epoch`` (f32[rows, C, D]) atomically, then records it.

        Any process may write the chunks it computed; only process 0 records them in the
        manifest (the others' chunks are recorded from their files, :meth:`missing_chunks`)."""
        start, stop = self.chunk_rows(k)
        expect = (stop - start, self.num_classes, self.dim)
        if features.shape != expect:
            raise ValueError(f"chunk {k} has shape {features.shape}, expected {expect}")
        path = self.chunk_path(epoch, k)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_npy_atomic(path, np.asarray(features, np.float32))
        if sharding.is_writer():
            self.manifest["chunks"][f"{epoch}/{k}"] = self._chunk_entry(epoch, k)
            self._save_manifest()

    def read_chunk(self, epoch: int | str, k: int) -> np.ndarray:
        """f32[rows, C, D], memory-mapped."""
        return np.load(self.chunk_path(epoch, k), mmap_mode="r")

    def read_block(self, epochs: Sequence[int | str], k: int) -> np.ndarray:
        """f32[rows, C, T*D]: chunk k of every checkpoint, concatenated along the feature axis."""
        return np.concatenate([self.read_chunk(e, k) for e in epochs], axis=-1)


def pending_bytes(root: str | os.PathLike, header: dict, epochs: Iterable[int | str]) -> int:
    """Disk bytes the chunk files of ``epochs`` still need in the store at ``root`` (header as
    for :class:`FeatureStore`): a chunk file already there with its full size counts as done."""
    n, size = int(header["n_examples"]), int(header["chunk_size"])
    row = int(header["num_classes"]) * int(header["dim"]) * 4
    total = 0
    for epoch in epochs:
        for k in range(max(1, math.ceil(n / size))):
            rows = min(n, (k + 1) * size) - k * size
            path = Path(root) / key_folder(epoch) / f"chunk_{k:05d}.npy"
            try:
                if path.stat().st_size >= rows * row:
                    continue
            except OSError:
                pass
            total += rows * row + 128  # + the .npy header
    return total


def make_header(grad_fn: Any, ids: Sequence[Any], chunk_size: int, num_classes: int,
                dim: int) -> dict:
    """The store header for ``grad_fn`` on examples ``ids`` (everything but the checkpoint).
    ``grad_fn`` is read through :func:`~.grads.as_class_grad_function`; one without a tag is
    refused (one-line InputError)."""
    grad_fn = as_class_grad_function(grad_fn)
    subset, projector, tag = grad_fn.subset, grad_fn.projector, grad_fn.tag
    if not tag:
        name = getattr(grad_fn.fn, "__qualname__", None) or type(grad_fn.fn).__name__
        raise InputError(f"the gradient function {name!r} has no tag, and stored features are "
                         "known by their tag (a function's name such as <lambda> does not tell "
                         "two functions apart): pass tag=\"...\" naming what it computes, "
                         "e.g. make_class_grad_fn(..., tag=\"my-loss\") or "
                         "ClassGradFunction(fn, tag=\"my-loss\", dim=D)")
    return {
        "format": FORMAT,
        "tag": tag,
        "subset_name": subset.name if subset is not None else None,
        "subset_paths": list(subset.paths) if subset is not None else None,
        "projection": projector.describe() if projector is not None else None,
        "n_examples": len(ids),
        "ids_hash": ids_hash(ids),
        "chunk_size": int(chunk_size),
        "num_classes": int(num_classes),
        "dim": int(dim),
    }


def feature_shape(grad_fn: Callable, variables: Any, images: np.ndarray,
                  labels: np.ndarray) -> tuple[int, int]:
    """(C, D) of ``grad_fn``'s output, from shapes only (no computation)."""
    out = jax.eval_shape(grad_fn, variables, jax.ShapeDtypeStruct((1, *images.shape[1:]), jnp.float32),
                         jax.ShapeDtypeStruct((1, *labels.shape[1:]), jnp.int32))
    return int(out.shape[1]), int(out.shape[2])


@jax.jit
def _scale(x, s):
    return x * s


def preconditioned_call(grad_fn: Callable, variables: Any, precond: Sequence[Any] | None
                        ) -> tuple[Callable, Any]:
    """(function, first argument) that compute ``grad_fn``'s features with the diagonal
    preconditioner ``precond`` split symmetrically: every class gradient g becomes
    ``sqrt(precond) * g`` in parameter space, before any projection, so the inner product of
    two features is ``g1^T diag(precond) g2``.

    ``precond``: None (plain features) or arrays shaped like ``grad_fn.subset``'s leaves, in
    ``subset.paths`` order, all > 0. A function without ``scaled_fn`` (a custom ClassGradFn)
    cannot apply it in parameter space and is refused with a one-line error.
    """
    if precond is None:
        return grad_fn, variables
    grad_fn = as_class_grad_function(grad_fn)
    scaled = grad_fn.scaled_fn
    if scaled is None:
        raise InputError(f"the gradient function {grad_fn.tag!r} cannot apply a "
                         "preconditioner in parameter space (it has no scaled_fn); build it with "
                         "make_class_grad_fn or normalised()")
    return scaled, (variables, [jnp.sqrt(jnp.asarray(d, jnp.float32)) for d in precond])


def compute_features(grad_fn: Callable, variables: Any, lr: float, images: np.ndarray,
                     labels: np.ndarray, batch_size: int, mesh,
                     precond: Sequence[Any] | None = None) -> jax.Array:
    """sqrt(lr)-scaled class gradients of a set of examples, kept on device.

    images f32[n,H,W,Cin], labels int[n,H,W] (host arrays; a 3D model's volumes:
    f32[n,D,H,W,Cin], int[n,D,H,W]) -> f32[n, C, D]. ``precond``: the
    checkpoint's diagonal preconditioner on the subset's leaves (see
    :func:`preconditioned_call`; the features become ``sqrt(lr) * P(sqrt(precond) * g)``), None
    for plain TracIn. Batches are padded
    to ``batch_size`` rounded up to the device count and split over the mesh; variables should
    already be replicated on it. A set smaller than one batch runs as one batch of its own size
    (rounded up to the device count): padded rows are computed in full, so a handful of test
    examples would otherwise cost a whole batch.
    """
    chex.assert_rank([images, labels], [{4, 5}, {3, 4}])
    chex.assert_equal_shape_prefix([images, labels], np.ndim(labels))  # [n, H, W] or [n, D, H, W]
    n = len(images)
    bs = sharding.padded_size(max(1, min(batch_size, n)), mesh)
    scale = jnp.float32(math.sqrt(float(lr)))
    grad_fn, variables = preconditioned_call(grad_fn, variables, precond)
    if precond is not None:
        variables = sharding.replicate(variables, mesh)
    run = grad_fn
    if mesh.devices.size > 1:
        try:
            run = sharding.per_device(grad_fn, mesh)
        except TypeError:  # an unhashable callable: build it uncached
            run = sharding.per_device.__wrapped__(grad_fn, mesh)
    outs = []
    for s in range(0, n, bs):
        x = np.asarray(images[s:s + bs], np.float32)
        y = np.asarray(labels[s:s + bs]).astype(np.int32)
        pad = bs - len(x)
        if pad:
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
            y = np.concatenate([y, np.zeros((pad, *y.shape[1:]), y.dtype)])
        g = run(variables, sharding.shard_rows(x, mesh), sharding.shard_rows(y, mesh))
        chex.assert_rank(g, 3)  # f32[B, C, D]
        chex.assert_axis_dimension(g, 0, bs)
        outs.append(_scale(g, scale)[: bs - pad])
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)


def featurise_checkpoint(store: FeatureStore, grad_fn: Callable, epoch: int | str, lr: float,
                         variables: Any, images: np.ndarray, labels: np.ndarray, *,
                         batch_size: int, mesh, bar=None,
                         precond: Sequence[Any] | None = None) -> dict:
    """Computes and writes the missing chunks of one checkpoint.

    ``epoch``: the store key (an epoch, or a model's name, :func:`key_folder`).
    ``variables``: host (or device) variables of the checkpoint; they are replicated on the mesh.
    ``precond``: the checkpoint's diagonal preconditioner (the per-checkpoint hook, see
    :func:`compute_features`); it joins the checkpoint's fingerprint, so chunks computed with
    another preconditioner are recomputed. Name the preconditioner in the store header.
    Returns {"chunks_computed", "chunks_reused", "examples_computed", "seconds"}.
    """
    fingerprint = variables_fingerprint(variables if precond is None
                                        else {"variables": variables, "precond": list(precond)})
    with store.locked():
        return _featurise_locked(store, grad_fn, epoch, lr, variables, fingerprint, images,
                                 labels, batch_size=batch_size, mesh=mesh, bar=bar,
                                 precond=precond)


def _featurise_locked(store, grad_fn, epoch, lr, variables, fingerprint, images, labels, *,
                      batch_size, mesh, bar, precond=None) -> dict:
    store.open_checkpoint(epoch, lr, fingerprint)
    sharding.barrier(f"store-opened-{epoch}")  # stale chunks are gone before anyone looks
    missing = store.missing_chunks(epoch)
    sharding.barrier(f"store-checked-{epoch}")  # nothing is written before everyone looked
    mine = set(sharding.my_share(missing))  # with several processes, each computes its share
    stats = {"chunks_computed": 0, "chunks_reused": 0, "examples_computed": 0, "seconds": 0.0}
    if mine:
        grad_fn, variables = preconditioned_call(grad_fn, variables, precond)
        variables = sharding.replicate(variables, mesh)
    others = 0
    for k in range(store.n_chunks):
        start, stop = store.chunk_rows(k)
        if k in mine:
            t0 = time.perf_counter()
            feats = compute_features(grad_fn, variables, lr, images[start:stop],
                                     labels[start:stop], batch_size, mesh)
            store.write_chunk(epoch, k, sharding.to_host(feats))
            _fault_injection()
            stats["seconds"] += time.perf_counter() - t0
            stats["chunks_computed"] += 1
            stats["examples_computed"] += stop - start
        elif k in missing:
            others += stop - start
            continue
        else:
            stats["chunks_reused"] += 1
        if bar is not None:
            bar.update(stop - start)
    sharding.barrier(f"store-done-{epoch}")
    if len(mine) != len(missing):  # the other processes' chunks: record them, check them
        left = store.missing_chunks(epoch)
        if left:
            raise InputError(f"{store.root}: chunks {left} of epoch {epoch} were not written by "
                             "the other processes (is the store on a file system every process "
                             "shares?)")
        if bar is not None:
            bar.update(others)
    return stats


_written = {"chunks": 0}


def _fault_injection() -> None:
    """Test hook: ``TRACIN_JAX_KILL_AFTER_CHUNKS=n`` SIGKILLs this process after the n-th chunk
    it wrote (only in process ``TRACIN_JAX_KILL_RANK`` when that is set)."""
    at = os.environ.get("TRACIN_JAX_KILL_AFTER_CHUNKS")
    if at is None:
        return
    rank = os.environ.get("TRACIN_JAX_KILL_RANK")
    if rank is not None and int(rank) != jax.process_index():
        return
    _written["chunks"] += 1
    if _written["chunks"] == int(at):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def featurise(store: FeatureStore, grad_fn: Callable, checkpoints: Iterable[Any],
              images: np.ndarray, labels: np.ndarray, *, batch_size: int, mesh,
              progress: bool = True, desc: str = "train gradients") -> dict:
    """Fills ``store`` for every checkpoint (loop over checkpoints outermost).

    ``checkpoints``: objects with ``epoch``, ``lr`` and ``variables``. Only missing chunks are
    computed. Returns {"chunks_computed", "chunks_reused", "examples_computed", "seconds",
    "examples_per_s"} (the rate counts computed examples only, first compilation included).
    """
    checkpoints = list(checkpoints)
    bar = tqdm(total=len(checkpoints) * store.n, desc=desc, unit="ex", disable=not progress,
               dynamic_ncols=True, leave=False)
    total: dict = {}
    for ckpt in checkpoints:
        bar.set_postfix(epoch=ckpt.epoch)
        stats = featurise_checkpoint(store, grad_fn, ckpt.epoch, ckpt.lr, ckpt.variables, images,
                                     labels, batch_size=batch_size, mesh=mesh, bar=bar)
        for key, v in stats.items():
            total[key] = total.get(key, 0) + v
    bar.close()
    return finish_stats(total)


def finish_stats(total: dict) -> dict:
    out = dict(total)
    out["seconds"] = round(out.get("seconds", 0.0), 3)
    rows = out.get("examples_computed", 0)
    out["examples_per_s"] = round(rows / out["seconds"], 2) if out["seconds"] > 0 else None
    return out
