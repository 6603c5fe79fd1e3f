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
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from tracin_jax.errors import InputError

logging.getLogger("absl").setLevel(logging.ERROR)

CHECKPOINT_DIR = "checkpoints"


def _manager(workdir: str | os.PathLike, read_only: bool = False) -> ocp.CheckpointManager:
    path = Path(workdir).resolve() / CHECKPOINT_DIR
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None,
        enable_async_checkpointing=False,
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(path, options=options)


def list_epochs(workdir: str | os.PathLike) -> list[int]:
    """Epochs with a complete checkpoint, ascending."""
    path = Path(workdir) / CHECKPOINT_DIR
    if not path.is_dir():
        return []
    return sorted(int(s) for s in _manager(workdir, read_only=True).all_steps())


def save_checkpoint(workdir, epoch: int, variables: Any, opt_state: Any, meta: dict) -> None:
    """Writes checkpoint ``epoch`` atomically. meta must be JSON-serialisable."""
    mngr = _manager(workdir)
    mngr.save(
        epoch,
        args=ocp.args.Composite(
            variables=ocp.args.StandardSave(variables),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(dict(meta, epoch=epoch)),
        ),
    )
    mngr.wait_until_finished()
    mngr.close()


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def load_meta(workdir, epoch: int) -> dict:
    mngr = _manager(workdir, read_only=True)
    return dict(mngr.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])


def load_variables(workdir, epoch: int, like: Any) -> Any:
    """Restores the model variables of ``epoch``; ``like`` gives the tree structure and shapes."""
    if epoch not in list_epochs(workdir):
        raise InputError(f"{workdir}: no checkpoint for epoch {epoch}")
    mngr = _manager(workdir, read_only=True)
    out = mngr.restore(epoch, args=ocp.args.Composite(variables=ocp.args.StandardRestore(_abstract(like))))
    return out["variables"]


def load_training_state(workdir, epoch: int, variables_like: Any, opt_state_like: Any):
    """Restores (variables, opt_state, meta) of ``epoch`` for resuming training."""
    mngr = _manager(workdir, read_only=True)
    out = mngr.restore(
        epoch,
        args=ocp.args.Composite(
            variables=ocp.args.StandardRestore(_abstract(variables_like)),
            opt_state=ocp.args.StandardRestore(_abstract(opt_state_like)),
            meta=ocp.args.JsonRestore(),
        ),
    )
    return out["variables"], out["opt_state"], dict(out["meta"])
