"""Placement of influence arrays on devices: the training-example axis is sharded.

One 1-D mesh over every visible device, axis name ``train``. Batches of training (and test)
examples are split over it for the gradient stage; in the scoring stage each device holds a
slice of the training block and the whole (replicated) test features, so the contraction
``scores[a, i, b, j]`` is computed where its training rows live. Results do not depend on the
device count (tested with 8 fake CPU devices against 1).

Batches are padded to a multiple of the device count (padded rows are computed and dropped),
so one compiled program serves every batch.

Multi-host (several machines, each with its own accelerators)
-------------------------------------------------------------
The code is written SPMD: every process runs the same program on the same inputs, and the
mesh spans the devices of all processes. To run it:

1. Put the workdir (checkpoints, data, and the feature store under ``<workdir>/features``) on
   a file system every host can read; ``out`` should be shared too.
2. On every host, before anything else touches JAX::

       import jax
       jax.distributed.initialize()  # or (coordinator_address="host0:1234",
                                     #     num_processes=N, process_id=i) off Cloud TPU/SLURM
       from tracin_jax.influence import run_influence
       run_influence("runs/paper", "runs/paper/influence", params="all", proj_dim=4096)

   (or ``tracin-jax influence ...`` launched once per host by the cluster's launcher, with the
   ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID`` environment set).
3. ``jax.devices()`` then lists the global devices; each process feeds the same host arrays,
   ``jax.device_put`` keeps only its addressable shards, results are gathered with
   ``multihost_utils.process_allgather``, and only process 0 writes the feature store and the
   output files; barriers around each checkpoint's chunks keep the processes in step, so every
   process reads back chunks that are complete.
4. Every process must see the same devices in the same order and call ``run_influence`` with the
   same arguments; ``batch_size`` is rounded up to the global device count.
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


def padded_size(n: int, mesh: Mesh) -> int:
    """n rounded up to a multiple of the device count."""
    d = mesh.devices.size
    return -(-n // d) * d


def shard_rows(x: Any, mesh: Mesh) -> jax.Array:
    """Places x (leading axis divisible by the device count) split along its first axis."""
    return jax.device_put(x, NamedSharding(mesh, P(AXIS)))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree whole on every device of the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


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


def is_writer() -> bool:
    """Only process 0 writes files."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits for every process (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
