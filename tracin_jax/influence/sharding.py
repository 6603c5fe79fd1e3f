"""Placement of influence arrays on devices: the training-example axis is sharded.

One 1-D mesh over every visible device, axis name ``train``. Batches of training (and test)
examples are split over it for the gradient stage; in the scoring stage each device holds a
slice of the training block and the whole (replicated) test features, so the contraction
``scores[a, i, b, j]`` is computed where its training rows live. Results do not depend on the
device count (tested with 8 fake CPU devices against 1).

Batches are padded to a multiple of the device count (padded rows are computed and dropped),
so one compiled program serves every batch.

Several JAX processes (one per GPU or per share of CPU cores, on one or several machines;
see :mod:`tracin_jax.distributed` and ``docs/scale-out.md``)
------------------------------------------------------------------------------------
Two meshes are used. The gradient stage runs on :func:`local_mesh` (this process's devices):
each process computes its own share of the training chunks and writes them to the feature
store on a shared file system (:mod:`.store`), with no communication. The scoring stage runs on
:func:`train_mesh` over the devices of every process: each process reads the same blocks from
the store, :func:`shard_rows` keeps only its own rows on its devices, and the results are
gathered with :func:`to_host` (``process_allgather``). Host arrays enter a multi-process mesh
only from numpy (:func:`replicate` and :func:`shard_rows` copy a local device array to the host
first: backends do not transfer device arrays between processes). Only process 0 writes the
output files; :func:`barrier` keeps the processes in step.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "train"


def train_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh named ``train`` over ``devices`` (default: all visible devices)."""
    return Mesh(np.array(devices if devices is not None else jax.devices()), (AXIS,))


def local_mesh(mesh: Mesh | None = None) -> Mesh:
    """The part of ``mesh`` (default :func:`train_mesh`) on this process's own devices: the
    mesh itself with one process."""
    mesh = mesh if mesh is not None else train_mesh()
    if jax.process_count() == 1:
        return mesh
    return Mesh(np.array([d for d in mesh.devices.flat if d.process_index == jax.process_index()]),
                (AXIS,))


def _placeable(tree: Any, mesh: Mesh) -> Any:
    """``tree`` with local device arrays copied to the host when ``mesh`` spans processes."""
    if jax.process_count() == 1 or all(d.process_index == jax.process_index()
                                       for d in mesh.devices.flat):
        return tree
    return jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array)
                        and x.is_fully_addressable else x, tree)


def padded_size(n: int, mesh: Mesh) -> int:
    """n rounded up to a multiple of the device count."""
    d = mesh.devices.size
    return -(-n // d) * d


def shard_rows(x: Any, mesh: Mesh) -> jax.Array:
    """Places x (leading axis divisible by the device count) split along its first axis."""
    return jax.device_put(_placeable(x, mesh), NamedSharding(mesh, P(AXIS)))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree whole on every device of the mesh."""
    return jax.device_put(_placeable(tree, mesh), NamedSharding(mesh, P()))


@functools.lru_cache(maxsize=64)
def per_device(fn: Callable, mesh: Mesh) -> Callable:
    """jit(shard_map(fn)) for ``fn(replicated, rows, rows) -> rows``: each device runs ``fn`` on
    its own slice of the examples.

    Per-example gradients are embarrassingly parallel, so the gradient stage is written as
    explicit data parallelism rather than left to the automatic partitioner (which, on the CPU
    backend, was seen to mis-partition the vmapped convolution backward pass over a sharded
    batch). Cached per (fn, mesh) so every batch reuses one compiled program.
    """
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)),
                                 out_specs=P(AXIS), check_vma=False))


def to_host(x: jax.Array) -> np.ndarray:
    """Device array -> numpy, gathering shards from other processes when there are any."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def my_share(items: list, rank: int | None = None, count: int | None = None) -> list:
    """The items process ``rank`` of ``count`` (default: this process) works on: every
    ``count``-th, starting at ``rank``. With one process, all of them."""
    rank = jax.process_index() if rank is None else rank
    count = jax.process_count() if count is None else count
    return list(items)[rank::count]


def from_writer(x: Any, shape: tuple[int, ...]) -> Any:
    """Process 0's f32 array ``x`` (of ``shape``) in every process; ``x`` as it is with one
    process. Other processes pass None."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    value = np.asarray(x, np.float32) if is_writer() else np.zeros(shape, np.float32)
    return np.asarray(multihost_utils.broadcast_one_to_all(value))


def is_writer() -> bool:
    """Only process 0 writes files."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits for every process (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
