"""Per-example, per-class losses for mutually exclusive classes: 0 background and the C
foreground classes 1..C of the task (BraTS: 1 NCR/NET, 2 ED, 3 ET; any other task: its
``dataset.json`` classes, :class:`tracin_jax.task.Task`). Every function works for any C: the
number of classes is the logits' last axis.

Soft Dice as in the paper's code (squared denominator), one value per example and class:

    D_c = 1 - 2 * sum(y_c * p_c) / (sum(y_c**2) + sum(p_c**2) + eps),   p = softmax(logits)

Only channel c enters D_c, so each class loss isolates its own region. The training loss is the
weighted mean of D_c over classes (background weight 0 by default: the mean over the C
foreground classes). Class-wise influence uses the foreground columns 1..C of
:func:`classwise_dice_loss` (``tumour_*`` are those columns; the names are BraTS's, the functions
are not).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# The BraTS task's foreground classes; another task's names are ``Task.classes`` (``Run.task``).
TUMOUR_CLASSES = (1, 2, 3)
CLASS_NAMES = ("NCR/NET", "ED", "ET")


def classwise_dice_loss(logits: jax.Array, labels: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Soft Dice loss per example and class.

    Args:
      logits: f32[B, H, W, C] (a slice) or f32[B, D, H, W, C] (a volume).
      labels: int[B, H, W] (int[B, D, H, W]) with values in [0, C).
      eps: added to the denominator.
    Returns:
      f32[B, C]: D_c for every class, background included (sums over every pixel or voxel).
    """
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    y = jax.nn.one_hot(labels, logits.shape[-1], dtype=p.dtype)
    space = tuple(range(1, labels.ndim))  # (1, 2) for slices, (1, 2, 3) for volumes
    inter = jnp.sum(y * p, axis=space)
    denom = jnp.sum(y * y, axis=space) + jnp.sum(p * p, axis=space) + eps
    return 1.0 - 2.0 * inter / denom


def tumour_dice_loss(logits: jax.Array, labels: jax.Array, eps: float = 1e-6) -> jax.Array:
    """f32[B, C]: D_c of the foreground classes 1..C, logits f32[..., C + 1] (BraTS: NCR/NET, ED,
    ET); the class-wise TracIn losses."""
    return classwise_dice_loss(logits, labels, eps)[:, 1:]


def classwise_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Cross-entropy restricted to each class's region, per example and class.

    CE_c = -sum_{pixels with label c} log p_c / (number of pixels), so sum_c CE_c is the
    pixel-mean cross-entropy of the whole slice (voxel-mean of a volume, logits f32[B,D,H,W,C]).
    Returns f32[B, C].
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    y = jax.nn.one_hot(labels, logits.shape[-1], dtype=logp.dtype)
    n_pix = math.prod(labels.shape[1:])
    return -jnp.sum(y * logp, axis=tuple(range(1, labels.ndim))) / n_pix


def tumour_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """f32[B, C]: region cross-entropy of the foreground classes 1..C (BraTS: NCR/NET, ED, ET).

    Not the training loss: an alternative class-wise TracIn loss (``--loss ce``). Its gradient
    w.r.t. the logits, p - y, stays large where the model confidently predicts another class,
    whereas the soft Dice gradient passes through p_c (1 - p_c) there and nearly vanishes, so
    CE self-influence flags label errors that Dice self-influence misses (experiments/mislabel).
    """
    return classwise_cross_entropy(logits, labels)[:, 1:]


def class_weights(num_classes: int, background_weight: float) -> jax.Array:
    """f32[C]: weights of the per-class losses, normalised to sum 1."""
    w = jnp.ones((num_classes,), jnp.float32).at[0].set(background_weight)
    return w / jnp.sum(w)


def training_loss(logits, labels, *, kind: str = "dice", background_weight: float = 0.0,
                  eps: float = 1e-6) -> jax.Array:
    """Scalar training loss: mean over the batch of the class-weighted per-class loss."""
    if kind == "dice":
        per_class = classwise_dice_loss(logits, labels, eps)
        return jnp.mean(per_class @ class_weights(logits.shape[-1], background_weight))
    if kind == "ce":
        return jnp.mean(jnp.sum(classwise_cross_entropy(logits, labels), axis=-1))
    if kind == "dice+ce":
        # The CE gradient p - y does not vanish where p_c -> 0, so no class can die: with soft
        # Dice alone, a small model sometimes drives p_c to ~0 everywhere early (the Dice
        # gradient passes through p_c (1 - p_c)) and never learns class c.
        return (training_loss(logits, labels, kind="dice", background_weight=background_weight,
                              eps=eps)
                + training_loss(logits, labels, kind="ce"))
    raise ValueError(f"unknown loss {kind!r}")


def hard_dice_counts(pred: jax.Array, labels: jax.Array, num_classes: int = 4) -> jax.Array:
    """Counts for hard Dice. pred, labels: int[B,H,W] (int[B,D,H,W] for volumes; any rank) ->
    f32[3, C] rows (intersection, |pred|, |true|), summed over the batch and every voxel."""
    p = jax.nn.one_hot(pred, num_classes, dtype=jnp.float32)
    y = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    axes = tuple(range(labels.ndim))  # every axis but the class axis
    return jnp.stack([jnp.sum(p * y, axis=axes), jnp.sum(p, axis=axes), jnp.sum(y, axis=axes)])


def dice_from_counts(counts) -> list[float | None]:
    """Per-class hard Dice 2|P∩Y|/(|P|+|Y|) over a whole split, from f32[3, C] counts.

    One convention: a class absent from the split's ground truth (|Y| = 0) has undefined Dice,
    None, whatever the model predicts (its false-positive voxels are |P|, see
    :func:`absent_class_predictions`); a class present in the truth but never predicted has 0.
    """
    import numpy as np

    c = np.asarray(counts, dtype=np.float64)
    return [None if c[2, k] == 0 else float(2 * c[0, k] / (c[1, k] + c[2, k]))
            for k in range(c.shape[1])]


def absent_class_predictions(counts) -> list[int | None]:
    """Per class: the voxels predicted as a class absent from the ground truth (false positives
    with undefined Dice), or None where the class is present. counts: f32[3, C]."""
    import numpy as np

    c = np.asarray(counts, dtype=np.float64)
    return [int(c[1, k]) if c[2, k] == 0 else None for k in range(c.shape[1])]
