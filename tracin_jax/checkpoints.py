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
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from tracin_jax.errors import WRITE_ERRNOS, InputError, cannot_write

logging.getLogger("absl").setLevel(logging.ERROR)

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"  # one JSON line per finished epoch, written by training


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


def finished_epochs(workdir: str | os.PathLike) -> list[int]:
    """Epochs that ``metrics.jsonl`` records as trained, ascending (empty without the file;
    unreadable lines are skipped)."""
    import json

    path = Path(workdir) / METRICS_FILE
    try:
        text = path.read_text()
    except OSError:
        return []
    found = set()
    for line in text.splitlines():
        try:
            epoch = json.loads(line)["epoch"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 1:
            found.add(epoch)
    return sorted(found)


def missing_epochs(workdir: str | os.PathLike, available: list[int] | None = None) -> list[int]:
    """Epochs the run finished whose checkpoint is gone, ascending.

    Training saves a checkpoint after every epoch, from epoch 1 on, so an epoch counts as
    finished when a later checkpoint exists or ``metrics.jsonl`` lists it. A run still
    training (or stopped) has no missing epoch: only gaps count. ``available``: the epochs with
    a checkpoint (default :func:`list_epochs`).
    """
    have = set(list_epochs(workdir) if available is None else available)
    done = set(range(1, max(have) + 1)) if have else set()
    done |= set(finished_epochs(workdir))
    return sorted(done - have)


def check_complete(workdir: str | os.PathLike, available: list[int] | None = None, *,
                   epochs: list[int] | None = None, option: str = "--checkpoints") -> None:
    """One-line InputError when checkpoints the caller relies on are missing.

    ``epochs`` None: the caller uses every checkpoint (TracIn's learning-rate-weighted sum over
    all epochs), so any missing epoch (:func:`missing_epochs`) would silently change what it
    computes; a list: only those epochs must exist. The message names the missing and the
    available epochs and how to choose a subset on purpose (``option``).
    """
    have = list_epochs(workdir) if available is None else sorted(available)
    listing = ", ".join(map(str, have)) or "none"
    if epochs is not None:
        gone = [e for e in epochs if e not in have]
        if gone:
            raise InputError(f"{workdir}: no checkpoint for epoch{'s' if len(gone) > 1 else ''} "
                             f"{', '.join(map(str, gone))} (available: {listing})")
        return
    gone = missing_epochs(workdir, have)
    if not gone:
        return
    folders = ", ".join(f"{CHECKPOINT_DIR}/{e}" for e in gone)
    tail = [e for e in gone if not have or e > have[-1]]
    redo = (" (resume training to save the last one again)" if tail and len(tail) == len(gone)
            else "")
    raise InputError(
        f"{workdir}: the run finished epoch{'s' if len(gone) > 1 else ''} "
        f"{', '.join(map(str, gone))} but {folders} {'are' if len(gone) > 1 else 'is'} missing"
        f"{redo}; available: {listing}. Using all checkpoints would silently leave "
        f"{'them' if len(gone) > 1 else 'it'} out: restore {'them' if len(gone) > 1 else 'it'}, "
        f"or choose epochs on purpose, e.g. {option} {','.join(map(str, have))}")


def save_checkpoint(workdir, epoch: int, variables: Any, opt_state: Any, meta: dict) -> None:
    """Writes checkpoint ``epoch`` atomically. meta must be JSON-serialisable.

    Only process 0 writes (elsewhere this returns at once); arrays may be replicated global
    arrays of several processes."""
    if jax.process_index() != 0:
        return
    mngr = None
    _mute_orbax_write_debris()
    try:
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
    except Exception as e:
        code = _write_errno(e)
        if code is None:
            raise
        # A refused write (a full disk): the unfinished checkpoint goes, earlier ones stay.
        root = Path(workdir) / CHECKPOINT_DIR
        for tmp in root.glob(f"{epoch}.orbax-checkpoint-tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)
        raise cannot_write(root / str(epoch), OSError(code, os.strerror(code))) from None
    finally:
        if mngr is not None:
            try:
                mngr.close()
            except Exception:
                pass


def _write_errno(error: BaseException) -> int | None:
    """The errno of :data:`~tracin_jax.errors.WRITE_ERRNOS` behind a failed Orbax/TensorStore
    write (an OSError in the chain, or TensorStore's ``[os_error_code='28']``), else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
            return error.errno
        for m in re.finditer(r"os_error_code='?(\d+)", str(error)):
            if int(m.group(1)) in WRITE_ERRNOS:
                return int(m.group(1))
        error = error.__cause__ or error.__context__
    return None


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


class _OrbaxWriteDebrisFilter(logging.Filter):
    """Drops Orbax's own log records (with tracebacks) of a checkpoint write the file system
    refused (TensorStore's ``[os_error_code='28']``: no space left, and the other
    :data:`~tracin_jax.errors.WRITE_ERRNOS`): :func:`save_checkpoint` reports it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:
            return True
        codes = [int(c) for c in re.findall(r"os_error_code='?(\d+)", text)]
        return not any(c in WRITE_ERRNOS for c in codes)


def _mute_orbax_write_debris() -> None:
    """A refused checkpoint write fails in several of Orbax's threads at once; each logs the
    failure with a traceback, and their pending coroutines die with "Event loop is closed".
    This drops that debris (:class:`_OrbaxWriteDebrisFilter`, :func:`_mute_orbax_read_debris`);
    the failure itself reaches the caller as one line. Installed once per process."""
    _mute_orbax_read_debris()
    absl = logging.getLogger("absl")
    if not any(isinstance(f, _OrbaxWriteDebrisFilter) for f in absl.filters):
        absl.addFilter(_OrbaxWriteDebrisFilter())


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
