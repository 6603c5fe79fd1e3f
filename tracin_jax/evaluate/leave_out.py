"""Leave-top-k-out (remove-and-retrain; dattri's brittleness test), class-wise and by patient.

For a query (test slice z', class i) and an attribution, retrain without its k strongest
proponent patients, without k random patients, and without its k strongest opponents, and
compare the class-i loss with that of a model retrained on every training patient (same recipe
and seed). A faithful attribution: removing proponents raises the loss more than removing random
patients; removing opponents lowers it.

Cost control: every retraining is identified by its *removal set* (the sorted patient ids), so
a set asked for by several queries or several attributions is trained once (and cached on disk
by :func:`tracin_jax.evaluate.ground_truth.retrain_without`). The queries and the random sets
depend only on the test labels and a seed, never on the attribution, so they are shared by every
attribution scored against the same run: one random set per (k, draw) serves all queries.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from scipy import stats

DEFAULT_KS = (1, 3, 5)
DEFAULT_QUERIES = 16
DEFAULT_RANDOM_SETS = 2
SIDES = ("proponents", "random", "opponents")


def select_queries(present: np.ndarray, q: int, seed: int = 0) -> list[tuple[int, int]]:
    """Q targets spread across the classes.

    present bool[n_test, C] -> [(test index, class)] of length min(q, #targets): the classes
    take turns (1, 2, ..., C, 1, ...; BraTS: NCR/NET, ED, ET, NCR/NET, ...), each drawing its
    next slice from a seeded permutation of the slices where it is present; a class with no
    slices left is skipped.
    """
    present = np.asarray(present, bool)
    rng = np.random.default_rng(seed)
    pools = [list(rng.permutation(np.nonzero(present[:, c])[0])) for c in range(present.shape[1])]
    out: list[tuple[int, int]] = []
    while len(out) < q and any(pools):
        for c, pool in enumerate(pools):
            if pool and len(out) < q:
                out.append((int(pool.pop(0)), c))
    return out


def top_patients(patient_scores: np.ndarray, query: tuple[int, int], k: int,
                 side: str) -> tuple[int, ...]:
    """The k patients with the largest (``proponents``) or smallest (``opponents``) score
    ``sum_j patient_scores[a, i, p, j]`` for query (a, i); ties go to the lower index.

    patient_scores f32[n_test, C, P, C] -> sorted tuple of k patient indices.
    """
    a, i = query
    s = np.asarray(patient_scores, np.float64)[a, i].sum(axis=-1)  # [P]
    key = -s if side == "proponents" else s
    order = np.lexsort((np.arange(len(s)), key))
    return tuple(sorted(int(p) for p in order[:k]))


def random_sets(n_patients: int, ks: Sequence[int], draws: int, seed: int = 0) -> dict[int, list]:
    """{k: [sorted tuple of k patient indices] * draws}, seeded, shared by queries and
    attributions."""
    rng = np.random.default_rng(seed)
    return {int(k): [tuple(sorted(int(p) for p in rng.choice(n_patients, size=k, replace=False)))
                     for _ in range(draws)] for k in ks}


def removal_plan(scores: Mapping[str, np.ndarray], queries: Sequence[tuple[int, int]],
                 ks: Sequence[int], randoms: Mapping[int, list]) -> dict:
    """Every removal set the study needs.

    scores: {attribution name: patient_scores f32[n_test, C, P, C]}. Returns
    ``{"sets": [sorted tuples, the empty set first], "top": {name: {side: {k: [tuple per
    query]}}}}`` where side is proponents or opponents.
    """
    sets: dict[tuple, None] = {(): None}
    top: dict = {}
    for name, ps in scores.items():
        top[name] = {}
        for side in ("proponents", "opponents"):
            top[name][side] = {int(k): [top_patients(ps, q, k, side) for q in queries] for k in ks}
            for k in ks:
                for s in top[name][side][int(k)]:
                    sets.setdefault(s, None)
    for k in ks:
        for s in randoms[int(k)]:
            sets.setdefault(s, None)
    return {"sets": list(sets), "top": top}


def _mean_ci(values: np.ndarray, seed: int, resamples: int = 1000) -> dict:
    """Mean over queries with a percentile bootstrap 95% interval over queries."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return {"mean": None, "ci": [None, None], "n": 0}
    ci = [None, None]
    if len(v) >= 3 and np.ptp(v) > 0:
        res = stats.bootstrap((v,), np.mean, n_resamples=resamples, method="percentile",
                              random_state=np.random.default_rng(seed))
        ci = [float(res.confidence_interval.low), float(res.confidence_interval.high)]
    return {"mean": float(v.mean()), "ci": ci, "n": int(len(v))}


def loss_changes(top: Mapping[str, Mapping[int, list]], randoms: Mapping[int, list],
                 queries: Sequence[tuple[int, int]], loss_without: Mapping[tuple, np.ndarray],
                 *, seed: int = 0) -> dict:
    """Mean change of each query's class loss after removal, per k and side.

    top: {side: {k: [removal set per query]}} for proponents and opponents (one attribution);
    randoms: {k: [sets]}; loss_without: {removal set: f32[n_test, C] class loss of the model
    retrained without it}, including the empty set (the reference). Returns ``{k: {side:
    {"mean", "ci", "n", "per_query"}}}``; the random side of a query is the mean over the random
    draws. Loss changes are positive when the loss rises. ``proponents_minus_random`` and
    ``proponents_minus_opponents`` are per-query paired differences of those sides, with their
    interval over queries, ``wins`` (queries where the difference is above 0) and
    ``wilcoxon_p`` (one-sided signed-rank test that it is above 0; None below 2 queries).
    """
    base = np.asarray(loss_without[()], np.float64)
    out: dict = {}
    for k in sorted({int(k) for k in randoms}):
        out[k] = {}
        for side in SIDES:
            deltas = []
            for n, (a, i) in enumerate(queries):
                if side == "random":
                    d = np.mean([loss_without[s][a, i] - base[a, i] for s in randoms[k]])
                else:
                    d = loss_without[top[side][k][n]][a, i] - base[a, i]
                deltas.append(float(d))
            out[k][side] = {**_mean_ci(np.asarray(deltas), seed), "per_query": deltas}
        # Paired over queries: how much more removing the proponents raises the loss than
        # removing random patients or the opponents (an interval above 0 separates the sides).
        for other in ("random", "opponents"):
            diff = (np.asarray(out[k]["proponents"]["per_query"])
                    - np.asarray(out[k][other]["per_query"]))
            out[k][f"proponents_minus_{other}"] = _paired(diff, seed)
    return out


def _paired(diff: np.ndarray, seed: int) -> dict:
    """Mean and bootstrap interval of per-query differences f64[Q], the number of queries
    above 0 and the one-sided Wilcoxon signed-rank p-value (exact for small Q)."""
    d = np.asarray(diff, np.float64)
    d = d[np.isfinite(d)]
    p = None
    if len(d) >= 2 and np.any(d != 0):
        p = float(stats.wilcoxon(d, alternative="greater").pvalue)
    return {**_mean_ci(d, seed), "per_query": d.tolist(), "wins": int((d > 0).sum()),
            "wilcoxon_p": p}
