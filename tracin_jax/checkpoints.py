"""Every-epoch Orbax checkpoints.

Layout: ``<workdir>/checkpoints/<epoch>/`` with three items:

- ``variables``: ``{"params": ..., "batch_stats": ...}`` (what influence needs),
- ``opt_state``: the Optax state (what resuming training needs),
- ``meta``: JSON ``{"epoch", "step", "lr"}``; ``lr`` is the learning rate the optimiser applied
  during that epoch (read back from the optimiser state, not from the config), which TracIn
  uses as eta_t.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a run
killed at any moment leaves every earlier checkpoint intact, and an unfinished one is ignored.
None are pruned.

Several JAX processes (:mod:`tracin_jax.distributed`): every Orbax manager here is local to the
process that opens it (``MultiprocessingOptions(active_processes={this process})``), so reading
a checkpoint needs no other process and no barrier. Every process restores the whole checkpoint
onto its own first local device (a checkpoint holds replicated variables, never shards), and
only process 0 writes one: :func:`save_checkpoint` is a no-op elsewhere and takes replicated
global arrays (it writes their local copy). A checkpoint is therefore written once and
restorable with any process count.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from tracin_jax.errors import InputError

logging.getLogger("absl").setLevel(logging.ERROR)

CHECKPOINT_DIR = "checkpoints"


def _manager(workdir: str | os.PathLike, read_only: bool = False) -> ocp.CheckpointManager:
    """A manager of this process alone (see the module docstring)."""
    path = Path(workdir).resolve() / CHECKPOINT_DIR
    rank = jax.process_index()
    if not read_only:
        path.mkdir(parents=True, exist_ok=True)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None,
        enable_async_checkpointing=False,
        create=False,
        read_only=read_only,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=rank, active_processes={rank}),
    )
    return ocp.CheckpointManager(path, options=options)


def _local_copy(tree: Any) -> Any:
    """Host numpy copy of a pytree of (possibly multi-process, replicated) arrays."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.sharding.is_fully_replicated:
                raise ValueError("save_checkpoint takes replicated arrays, not shards")
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)
    return jax.tree.map(one, tree)


def list_epochs(workdir: str | os.PathLike) -> list[int]:
    """Epochs with a complete checkpoint, ascending."""
    path = Path(workdir) / CHECKPOINT_DIR
    if not path.is_dir():
        return []
    try:
        return sorted(int(s) for s in _manager(workdir, read_only=True).all_steps())
    except Exception as e:  # an unreadable checkpoint folder
        raise InputError(f"{path}: cannot list checkpoints: {_describe(e)}") from None


def save_checkpoint(workdir, epoch: int, variables: Any, opt_state: Any, meta: dict) -> None:
    """Writes checkpoint ``epoch`` atomically. meta must be JSON-serialisable.

    Only process 0 writes (elsewhere this returns at once); arrays may be replicated global
    arrays of several processes."""
    if jax.process_index() != 0:
        return
    mngr = _manager(workdir)
    mngr.save(
        epoch,
        args=ocp.args.Composite(
            variables=ocp.args.StandardSave(_local_copy(variables)),
            opt_state=ocp.args.StandardSave(_local_copy(opt_state)),
            meta=ocp.args.JsonSave(dict(meta, epoch=epoch)),
        ),
    )
    mngr.wait_until_finished()
    mngr.close()


def _abstract(tree: Any) -> Any:
    """Shapes and dtypes of ``tree``, placed whole on this process's first local device."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


def _describe(error: BaseException, limit: int = 200) -> str:
    """One short line from an Orbax/TensorStore error: the innermost cause (TensorStore's status,
    e.g. ``FAILED_PRECONDITION: Error reading "params...kernel/0.0.0.0": Truncated Zstd-compressed
    stream``), without the store path the caller already names."""
    seen = set()
    while (error.__cause__ or error.__context__) is not None and id(error) not in seen:
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    text = re.sub(r' in OCDBT database at local file "[^"]*"', "", str(error))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _missing_files(workdir, epoch: int, items: tuple[str, ...]) -> list[str]:
    """Files every complete checkpoint item has, missing from ``epoch`` (relative paths)."""
    root = Path(workdir) / CHECKPOINT_DIR / str(epoch)
    need = {"meta": ("metadata",), "variables": ("_METADATA", "manifest.ocdbt"),
            "opt_state": ("_METADATA", "manifest.ocdbt")}
    return [f"{item}/{name}" for item in items for name in need[item]
            if not (root / item / name).is_file()]


def _is_orbax_read_debris(unraisable) -> bool:
    """True for what a failed Orbax/TensorStore read leaves behind in other threads: pending read
    coroutines collected after their event loop closed ("Exception ignored in: <coroutine
    _read_array_index_and_device_put>", "RuntimeError: Event loop is closed")."""
    import traceback

    code = getattr(getattr(unraisable, "object", None), "cr_code", None)
    if code is not None and "orbax" in code.co_filename:
        return True
    frames = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback else []
    return any("orbax" in f.filename or f.filename.endswith(("asyncio/base_events.py",))
               for f in frames)


class _OrbaxReadDebrisFilter(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" for Orbax's read coroutines."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("never retrieved" in text and "orbax" in text)


def _mute_orbax_read_debris() -> None:
    """A damaged checkpoint makes one Orbax read fail while others are still pending in
    TensorStore's threads; those print tracebacks, interleaved with (even before) the one-line
    error. This drops exactly that debris (see :func:`_is_orbax_read_debris`); any other
    unraisable exception still reaches the previous hook. Installed once per process, before the
    first read, because the debris can appear before the failure reaches the caller."""
    import sys

    previous = sys.unraisablehook
    if getattr(previous, "_tracin_jax_filter", False):
        return

    def hook(unraisable):
        if not _is_orbax_read_debris(unraisable):
            previous(unraisable)

    hook._tracin_jax_filter = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_OrbaxReadDebrisFilter())


def _restore(workdir, epoch: int, args: dict) -> dict:
    """Restores the items ``args`` of checkpoint ``epoch``; any damage -> one-line InputError
    naming the checkpoint (a deleted or truncated file, a missing item, an unreadable manifest)."""
    where = f"{workdir}: checkpoint of epoch {epoch} ({Path(workdir) / CHECKPOINT_DIR / str(epoch)})"
    missing = _missing_files(workdir, epoch, tuple(args))
    if missing:
        raise InputError(f"{where} is damaged: missing {', '.join(missing)}")
    mngr = None
    _mute_orbax_read_debris()
    try:
        mngr = _manager(workdir, read_only=True)
        out = mngr.restore(epoch, args=ocp.args.Composite(**args))
        # Reading is lazy in places: fetch every array now so damage shows up here.
        out = {k: jax.block_until_ready(v) for k, v in out.items()}
    except Exception as e:  # Orbax/TensorStore raise many types; each means unreadable
        raise InputError(f"{where} cannot be read: {_describe(e)}") from None
    finally:
        if mngr is not None:
            mngr.close()
    return out


def load_meta(workdir, epoch: int) -> dict:
    """The JSON meta of ``epoch`` ({"epoch", "step", "lr"})."""
    meta = _restore(workdir, epoch, {"meta": ocp.args.JsonRestore()})["meta"]
    if not isinstance(meta, dict) or not {"step", "lr"} <= set(meta):
        raise InputError(f"{workdir}: checkpoint of epoch {epoch} has no step/lr in its meta")
    return dict(meta)


def load_variables(workdir, epoch: int, like: Any) -> Any:
    """Restores the model variables of ``epoch``; ``like`` gives the tree structure and shapes."""
    if epoch not in list_epochs(workdir):
        raise InputError(f"{workdir}: no checkpoint for epoch {epoch}")
    args = {"variables": ocp.args.StandardRestore(_abstract(like))}
    return _restore(workdir, epoch, args)["variables"]


def load_training_state(workdir, epoch: int, variables_like: Any, opt_state_like: Any):
    """Restores (variables, opt_state, meta) of ``epoch`` for resuming training."""
    out = _restore(workdir, epoch, {
        "variables": ocp.args.StandardRestore(_abstract(variables_like)),
        "opt_state": ocp.args.StandardRestore(_abstract(opt_state_like)),
        "meta": ocp.args.JsonRestore(),
    })
    return out["variables"], out["opt_state"], dict(out["meta"])
