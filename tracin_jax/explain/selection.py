"""Filter selection from FI profiles, and its validation by ablation.

Selection rule (the paper's rule is not public; this one is ours). For class i and filter k,
with FI_{k,i}(r) the FI curve over patient ranks (``faithfulness.py``) and N-rank windows at
the proponent end, the opponent end and the middle:

    gap_k = mean FI_k over the 2N extreme ranks - mean FI_k over the N middle ranks

measures how much more a filter's regions resemble those of strongly influential patients
(either sign) than those of neutral ones. Its null distribution comes from shuffling the
positions of the R ranks of the curve (n_permutations, seeded; one shuffle shared by all
filters): z_k = (gap_k - mean_null_k) / std_null_k and the one-sided p_k. A filter is
**selected** when z_k >= z_min (default 2) and p_k <= alpha (default 0.05). Filters whose FI is
undefined (silent in every region) get z = NaN and are never selected. The filter importance
shown in the log|FI| histograms is |gap_k|.

Validation: zero one filter (or a group) of the last hidden layer and re-apply the head,
logits = features @ W + b voxel by voxel (the network is not rerun; the head is the 1x1 conv of
a 2D model or the 1x1x1 conv of a 3D one, its kernel read as f32[F, K]), then compare per-class
hard Dice over the whole split (every voxel of every slice or volume) with the unablated
model. Groups per class: the selected set, random sets of the same size (several seeds) and
the same number of least important filters (lowest z).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tracin_jax.explain.faithfulness import nanmean, windows
from tracin_jax.explain.features import FeatureStore
from tracin_jax.training.losses import dice_from_counts, hard_dice_counts


def curve_permutation_test(fi: np.ndarray, n_extremes: int, n_permutations: int = 1000,
                           seed: int = 0) -> dict:
    """Per-filter gap, z-score and one-sided p-value. fi: f32[R, F] -> dict of f32[F] arrays."""
    fi = np.asarray(fi, np.float64)
    n_ranks = fi.shape[0]
    top, bottom, middle, n = windows(n_ranks, n_extremes)
    ext = np.concatenate([top, bottom])

    def gap(curves):  # [..., R, F] -> [..., F]
        return nanmean(curves[..., ext, :], axis=-2) - nanmean(curves[..., middle, :], axis=-2)

    g = gap(fi)
    rng = np.random.default_rng(seed)
    perms = np.argsort(rng.random((n_permutations, n_ranks)), axis=-1)
    null = gap(fi[perms])  # [P, F]
    with np.errstate(invalid="ignore", divide="ignore"):
        mu = nanmean(null, axis=0)
        sd = np.sqrt(nanmean((null - mu) ** 2, axis=0))
        z = np.where(sd > 0, (g - mu) / np.where(sd > 0, sd, 1.0), np.nan)
        p = (1 + np.sum(null >= g, axis=0)) / (1 + n_permutations)
    z[~np.isfinite(g)] = np.nan
    p = np.where(np.isfinite(g), p, np.nan)
    return {"n": n, "gap": g, "z": z, "p": p}


def select_filters(fi: np.ndarray, n_extremes: int = 10, n_permutations: int = 1000, seed: int = 0,
                   z_min: float = 2.0, alpha: float = 0.05) -> dict:
    """Applies the selection rule to one class's FI curves f32[R, F].

    Returns {'n', 'gap', 'z', 'p' (f32[F]), 'selected' (bool[F])}.
    """
    t = curve_permutation_test(fi, n_extremes, n_permutations, seed)
    with np.errstate(invalid="ignore"):
        t["selected"] = (t["z"] >= z_min) & (t["p"] <= alpha)
    return t


def least_important(z: np.ndarray, size: int) -> np.ndarray:
    """int[size]: the filters with the lowest z (NaN counts as lowest), in that order."""
    key = np.where(np.isfinite(z), z, -np.inf)
    return np.argsort(key, kind="stable")[:size]


def random_sets(n_filters: int, size: int, seeds: Sequence[int]) -> list[np.ndarray]:
    """One random set of ``size`` filters (without replacement) per seed."""
    return [np.sort(np.random.default_rng(s).choice(n_filters, size, replace=False)) for s in seeds]


def group_mask(n_filters: int, idx: Sequence[int]) -> np.ndarray:
    """bool[F] with True at the filters to zero."""
    m = np.zeros(n_filters, bool)
    m[np.asarray(idx, dtype=np.int64)] = True
    return m


@jax.jit
def _ablated_counts(feats, labels, kernel, bias, zero):
    """f32[G, 3, K] hard-Dice counts (K head classes), the filters of each row of zero bool[G, F]
    zeroed. feats f32[B, *S, F], labels int[B, *S]: the voxels of every spatial axis count."""
    def one(z):
        w = kernel * (1.0 - z.astype(kernel.dtype))[:, None]
        logits = jnp.einsum("...f,fc->...c", feats, w, precision=jax.lax.Precision.HIGHEST) + bias
        return hard_dice_counts(jnp.argmax(logits, -1), labels, kernel.shape[-1])

    return jax.lax.map(one, zero)


def ablation_counts(store: FeatureStore, split: str, images: np.ndarray, labels: np.ndarray,
                    kernel: np.ndarray, bias: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """f64[G, 3, C] hard-Dice counts over a split for each ablation row of zero bool[G, F].

    images f32[N, *S, M], labels u8[N, *S] (slices or volumes: every voxel counts). Zeroing
    filter k of the features is the same as zeroing row k of the head kernel f32[F, C] (the
    bias stays), which is what is applied.
    """
    zero = jnp.asarray(np.asarray(zero, bool))
    k = jnp.asarray(kernel, jnp.float32)
    b = jnp.asarray(bias, jnp.float32)
    total = 0.0
    for s, f in store.blocks(split, images, f"ablation ({split})"):
        y = jnp.asarray(np.asarray(labels[s:s + len(f)]), jnp.int32)
        total = total + np.asarray(_ablated_counts(jnp.asarray(f), y, k, b, zero), np.float64)
    return np.asarray(total)


def dice_table(counts: np.ndarray, class_labels=(1, 2, 3)) -> np.ndarray:
    """f64[G, C]: hard Dice of the classes with label values class_labels (int[C]) from counts
    f64[G, 3, K] (NaN where a class is in neither prediction nor truth, or not a head class)."""
    out = []
    for c in counts:
        d = dice_from_counts(c)
        vals = [d[v] if v < len(d) else None for v in class_labels]
        out.append([np.nan if v is None else v for v in vals])
    return np.asarray(out, np.float64)


def mean_difference_test(values: np.ndarray, selected: np.ndarray, n_permutations: int = 1000,
                         seed: int = 0) -> dict:
    """Mean of ``values`` over selected minus over the rest, with a one-sided label-shuffle p-value."""
    v = np.asarray(values, np.float64)
    sel = np.asarray(selected, bool)
    ok = np.isfinite(v)
    v, sel = v[ok], sel[ok]
    if sel.sum() == 0 or (~sel).sum() == 0:
        return {"selected_mean": float(v[sel].mean()) if sel.any() else float("nan"),
                "other_mean": float(v[~sel].mean()) if (~sel).any() else float("nan"),
                "difference": float("nan"), "p_value": float("nan")}
    d = v[sel].mean() - v[~sel].mean()
    rng = np.random.default_rng(seed)
    null = np.empty(n_permutations)
    for r in range(n_permutations):
        s = rng.permutation(sel)
        null[r] = v[s].mean() - v[~s].mean()
    return {"selected_mean": float(v[sel].mean()), "other_mean": float(v[~sel].mean()),
            "difference": float(d), "p_value": float((1 + np.sum(null >= d)) / (1 + n_permutations))}
