"""Data parallelism for training: one 1-D mesh over every device of every JAX process.

The variables (parameters, batch statistics) and the optimiser state are replicated on every
device (``P()``); a batch is split over the devices along its leading axis (``P("data")``). The
training loss is the mean over the whole (global) batch inside one jitted program, so XLA adds
the all-reduce of the gradients, and BatchNorm normalises with the statistics of the global
batch: a step computes what one device computes on the whole batch, up to float reassociation.

Every process holds the same host arrays (the same data, the same epoch order) and passes the
same full batch to :func:`put_batch`; ``jax.device_put`` keeps only the shards of the process's
own devices. Only process 0 writes files (:func:`is_writer`).

A batch whose size is not a multiple of the device count (only the last, partial batch of an
epoch: :func:`check_batch_size` refuses such a ``train.batch_size``) is replicated instead:
every device computes the whole batch, which keeps that step's meaning (the mean over its own
examples, BatchNorm statistics of those examples only).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tracin_jax.errors import InputError

AXIS = "data"


def data_mesh(devices: list | None = None) -> Mesh:
    """1-D mesh, axis ``"data"``, over ``devices`` (default: ``jax.devices()``, every device of
    every process, in JAX's global order)."""
    return Mesh(np.array(jax.devices() if devices is None else devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, size: int) -> NamedSharding:
    """Sharding of a batch of ``size`` examples: split on its leading axis when ``size`` is a
    multiple of the device count, else replicated (see the module docstring)."""
    return NamedSharding(mesh, P(AXIS)) if size % mesh.size == 0 else replicated(mesh)


def check_batch_size(batch_size: int, devices: int) -> None:
    """One-line InputError unless ``batch_size`` splits evenly over ``devices`` devices."""
    if batch_size % devices:
        raise InputError(
            f"train.batch_size={batch_size} does not split over the {devices} devices of the "
            f"data-parallel mesh; use a multiple of {devices} (e.g. --set "
            f"train.batch_size={max(devices, batch_size - batch_size % devices)})")


def eval_batch_size(batch_size: int, devices: int) -> int:
    """Evaluation batch: ``max(batch_size, 16)`` rounded up to a multiple of ``devices``."""
    size = max(batch_size, 16)
    return -(-size // devices) * devices


def host_copy(x: Any) -> np.ndarray:
    """numpy copy of an array held whole by this process (a replicated global array: the copy of
    its first local device)."""
    if isinstance(x, jax.Array):
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """A pytree of arrays every process holds whole (host or single-device) -> replicated global
    arrays on ``mesh``. Goes through host memory: a committed single-device array cannot be
    placed on another process's devices directly."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.device_put(host_copy(x), sharding), tree)


def put_key(key: jax.Array, mesh: Mesh) -> jax.Array:
    """A typed PRNG key (the same in every process) -> the same key replicated on ``mesh``."""
    data = jax.device_put(np.asarray(jax.random.key_data(key)), replicated(mesh))
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(key))


def put_batch(mesh: Mesh, images: np.ndarray, labels: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """Host batch f32[B,H,W,C], int[B,H,W] (the same in every process) -> global arrays (images,
    labels as int32) sharded by :func:`batch_sharding`."""
    sharding = batch_sharding(mesh, len(images))
    return (jax.device_put(np.asarray(images), sharding),
            jax.device_put(np.asarray(labels, np.int32), sharding))


def is_writer() -> bool:
    """True in the one process that writes files (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
