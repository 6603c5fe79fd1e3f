"""Up-front checks of an influence computation: its arguments, its checkpoints, its memory.

Everything here runs before any gradient is computed, so a bad argument or a budget that
cannot hold the stage is a one-line :class:`~tracin_jax.errors.InputError` naming the value
and what to change:

- :func:`check_args` / :func:`check_loss`: the arguments every method shares (split, top-K,
  batch and chunk sizes, memory budget, projection seed) and the loss's name;
- :func:`parse_checkpoints`: ``--checkpoints`` -> epochs of the run;
- :func:`memory_estimate` (with :func:`gradient_workspace`, XLA's temporaries of the compiled
  gradient program, and :func:`batch_params`) and :func:`check_memory`: the stage's peak
  memory against ``--memory-budget-gb``.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tracin_jax.checkpoints import check_complete
from tracin_jax.errors import InputError
from tracin_jax.influence import sharding
from tracin_jax.influence.grads import LOSSES, ClassGradFunction, as_class_grad_function

SPLITS = ("test", "train")
LOSS_NAMES = tuple(LOSSES)  # "dice", "ce"


def check_args(split, topk, batch_size, chunk_size, memory_budget_gb, proj_seed) -> None:
    """One-line InputError for a split that is not ``test``/``train``, a batch or chunk size
    or top-K that is not a positive integer, a budget that is not a positive number, or a
    projection seed that is not an integer."""
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


def check_loss(loss) -> None:
    """One-line InputError unless ``loss`` names a loss of the project (:data:`LOSS_NAMES`)."""
    if loss not in LOSS_NAMES:
        raise InputError(f"--loss {loss!r} is not one of {', '.join(LOSS_NAMES)}")


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

    grad_fn = as_class_grad_function(grad_fn)
    n = len(images)
    bs = sharding.padded_size(max(1, min(batch_size, n)), mesh)
    fn = grad_fn
    if precond_shapes is not None:
        fn = grad_fn.scaled_fn
        if fn is None:
            return None
    if mesh.devices.size > 1:
        try:
            fn = sharding.per_device(fn, mesh)
        except TypeError:
            fn = sharding.per_device.__wrapped__(fn, mesh)
    else:
        fn = grad_fn.fn if precond_shapes is None else fn
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


def batch_params(grad_fn: ClassGradFunction, dim: int) -> int:
    """Numbers per (example, class) that a gradient batch holds before projection: the subset's
    size, or D for LoGra (:mod:`.logra`: no weight gradients are formed; its output gradients
    are part of the program's workspace, :func:`gradient_workspace`) and for a function without
    a subset."""
    subset, projector = grad_fn.subset, grad_fn.projector
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
