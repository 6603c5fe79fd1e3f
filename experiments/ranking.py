"""Ranking metrics for influence checks: detection curves, ROC-AUC, rank agreement.

All functions take plain numpy arrays; a higher score means "inspect first". Ties are handled
in expectation (as if tied items were inspected in random order), so a constant score gives
the diagonal detection curve and an AUC of exactly 0.5.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def roc_auc(scores, positive) -> float:
    """ROC-AUC of ``scores`` f[n] for the boolean labels ``positive`` bool[n].

    The Mann-Whitney statistic: the probability that a random positive scores above a random
    negative, ties counting one half. NaN when either class is empty.
    """
    s = np.asarray(scores, np.float64)
    y = np.asarray(positive, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)  # average ranks for ties
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def detection_curve(scores, positive) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of positives found vs fraction of items inspected, highest scores first.

    Returns (inspected f64[m], found f64[m]), both from 0 to 1, at the boundaries of the groups
    of tied scores; between two points the curve is linear, which is the expectation over
    random orders inside a tie group. With no positive, ``found`` is all NaN.
    """
    s = np.asarray(scores, np.float64)
    y = np.asarray(positive, bool)
    n, n_pos = len(s), int(y.sum())
    if n == 0:
        return np.array([0.0]), np.array([np.nan])
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    last_of_group = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    counts = np.cumsum(np.ones(n))[last_of_group]
    hits = np.cumsum(y_sorted)[last_of_group]
    inspected = np.r_[0.0, counts / n]
    found = np.r_[0.0, hits / n_pos] if n_pos else np.full(len(counts) + 1, np.nan)
    return inspected, found


def found_at(scores, positive, fraction: float) -> float:
    """Fraction of positives found after inspecting ``fraction`` of the items (interpolated)."""
    x, f = detection_curve(scores, positive)
    return float(np.interp(fraction, x, f))


def curve_on_grid(scores, positive, grid) -> np.ndarray:
    """The detection curve sampled at the inspected fractions ``grid`` (for plots and JSON)."""
    x, f = detection_curve(scores, positive)
    return np.interp(np.asarray(grid, np.float64), x, f)


def spearman(a, b) -> float:
    """Spearman rank correlation of two f[n] vectors (average ranks for ties); NaN if either
    is constant or n < 2."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if len(a) < 2:
        return float("nan")
    ra, rb = rankdata(a), rankdata(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def topk_overlap(a, b, k: int, largest: bool = True) -> float:
    """|top-k of a ∩ top-k of b| / k (ties broken by the lower index); ``largest=False``
    compares the k smallest (opponents)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    k = min(int(k), len(a))
    if k == 0:
        return float("nan")
    sign = -1.0 if largest else 1.0
    ta = set(np.argsort(sign * a, kind="stable")[:k].tolist())
    tb = set(np.argsort(sign * b, kind="stable")[:k].tolist())
    return len(ta & tb) / k


def quantile_normalise(scores, valid=None) -> np.ndarray:
    """Each column of f[n, C] mapped to its empirical quantile in (0, 1] among the valid rows
    (``valid`` bool[n, C], default all); invalid entries become 0.

    Puts classes whose raw scores live on different scales on one footing, so that "the most
    unusual class of an item" can be taken with a max over columns.
    """
    s = np.asarray(scores, np.float64)
    valid = np.ones(s.shape, bool) if valid is None else np.asarray(valid, bool)
    out = np.zeros(s.shape)
    for c in range(s.shape[1]):
        m = valid[:, c]
        if m.any():
            out[m, c] = rankdata(s[m, c], method="max") / m.sum()
    return out


def group_scores(scores, groups, how: str = "sum") -> tuple[list[str], np.ndarray]:
    """Aggregates item scores f[n] by group id (e.g. slices -> patients).

    Returns (sorted group ids, f64[n_groups]); ``how`` is ``sum``, ``max`` or ``mean``.
    """
    s = np.asarray(scores, np.float64)
    ids, inv = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    if how == "sum":
        out = np.bincount(inv, weights=s, minlength=len(ids))
    elif how == "mean":
        out = np.bincount(inv, weights=s, minlength=len(ids)) / np.bincount(inv, minlength=len(ids))
    elif how == "max":
        out = np.full(len(ids), -np.inf)
        np.maximum.at(out, inv, s)
    else:
        raise ValueError(f"unknown aggregation {how!r} (sum, max or mean)")
    return [str(i) for i in ids], out
