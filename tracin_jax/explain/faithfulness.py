"""Faithfulness: does latent similarity of class regions track |TracIn|?

For test class i, training patients are ranked by ``patient_scores[t, i, :, i]`` (rank 1 = the
strongest proponent, rank R = the strongest opponent; only the R patients with a class-i region
in some example are ranked); each patient is represented by its example (slice) with the
largest |score| (or, without per-example scores, its largest class-i region). For a 3D run an
example is a whole volume, so a patient is its one volume; every function below reduces over
all spatial axes of the feature maps f32[N, *S, F] (S = H, W or D, H, W). With the
per-filter similarity S_k of ``features.py`` between the test item's class-i region and that
slice's class-i region,

    FI_{k,i}(r) = mean over test items (class i present) of S_k(item, r-th ranked patient).

The paper's finding is that FI is high at BOTH ends (strong proponents and strong opponents)
and low for the neutral middle. Two checkable statistics:

- Spearman correlation between |score| and S (mean over filters) over all (item, patient) pairs;
- the gap  G = mean FI over the top-N proponent and top-N opponent ranks
             - mean FI over the N middle ranks,
  with a one-sided permutation p-value: each test item's ranking is shuffled independently
  (seeded), which destroys any link between rank and similarity while keeping every item's
  set of similarities, and G is recomputed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from tracin_jax.explain.features import (FeatureStore, cosine_from_dots, flat_voxels,
                                         max_similarity, region_max, spatial_axes)
from tracin_jax.explain.ranking import rank_desc


@dataclass
class RegionStats:
    """What every similarity needs, per class c (axis 0, C classes), for test and training regions."""

    dots: np.ndarray  # f32[C, n_test, n_train, F]: <masked test map, masked train map> per filter
    test_norm: np.ndarray  # f32[C, n_test, F]   (NaN: empty region)
    train_norm: np.ndarray  # f32[C, n_train, F]
    test_max: np.ndarray  # f32[C, n_test, F]    (NaN: empty region)
    train_max: np.ndarray  # f32[C, n_train, F]


def _onehot(labels: np.ndarray, class_labels=(1, 2, 3)) -> np.ndarray:
    """u8[N, *S] -> f32[N, *S, C] masks of the classes with label values ``class_labels``."""
    return np.stack([(labels == c) for c in class_labels], axis=-1).astype(np.float32)


@jax.jit
def _block_dots(test_feats, test_masks, feats, masks):
    """f32[C, T, B, F]: per-class, per-filter dot products of masked maps (full f32 precision).

    test_feats f32[T, *S, F], test_masks f32[T, *S, C], feats f32[B, *S, F], masks f32[B, *S, C]:
    the voxels of every spatial axis are summed."""
    out = []
    for c in range(masks.shape[-1]):
        a = flat_voxels(test_feats * test_masks[..., c:c + 1])
        b = flat_voxels(feats * masks[..., c:c + 1])
        out.append(jnp.einsum("tvk,nvk->tnk", a, b, precision=jax.lax.Precision.HIGHEST))
    return jnp.stack(out)


def _norms_and_max(feats: np.ndarray, masks: np.ndarray, chunk: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(norms f32[C, N, F], maxima f32[C, N, F]) of the class-masked maps, in chunks of items.

    feats f32[N, *S, F], masks f32[N, *S, C] (0/1)."""
    norms, maxes = [], []
    for s in range(0, len(feats), chunk):
        f, mk = feats[s:s + chunk], masks[s:s + chunk] > 0
        sq = np.asarray(f, np.float64) ** 2
        nrm = np.sqrt(np.einsum("nvk,nvc->cnk", flat_voxels(sq), flat_voxels(mk)))
        nrm[~mk.any(axis=spatial_axes(mk[..., 0])).T] = np.nan
        norms.append(nrm.astype(np.float32))
        maxes.append(np.stack([region_max(f, mk[..., c]) for c in range(mk.shape[-1])]))
    return np.concatenate(norms, 1), np.concatenate(maxes, 1)


def region_stats(store: FeatureStore, test_images: np.ndarray, test_labels: np.ndarray,
                 train_images: np.ndarray, train_labels: np.ndarray,
                 test_name: str = "test", class_labels=(1, 2, 3)) -> RegionStats:
    """One pass over the training features against all test features (kept on the device).

    ``test_name`` is the store's name for the test images ("train" when the influence queries
    were training slices). Images f32[N, *S, M], labels u8[N, *S] (slices or volumes). Memory:
    the test features f32[n_test, *S, F] plus one training block, and the dot products
    f32[C, n_test, n_train, F] (C = len(class_labels)).
    """
    test_feats = np.concatenate([f for _, f in store.blocks(test_name, test_images, "test features")])
    test_masks = _onehot(np.asarray(test_labels), class_labels)
    t_norm, t_max = _norms_and_max(test_feats, test_masks)
    tf_dev, tm_dev = jnp.asarray(test_feats), jnp.asarray(test_masks)
    n_train = len(train_images)
    dots = np.zeros((len(class_labels), len(test_feats), n_train, test_feats.shape[-1]), np.float32)
    norms, maxes = [], []
    for s, f in store.blocks("train", train_images, "similarity (train features)"):
        m = _onehot(np.asarray(train_labels[s:s + len(f)]), class_labels)
        dots[:, :, s:s + len(f)] = np.asarray(_block_dots(tf_dev, tm_dev, jnp.asarray(f), jnp.asarray(m)))
        nrm, mx = _norms_and_max(f, m)
        norms.append(nrm)
        maxes.append(mx)
    return RegionStats(dots, t_norm, np.concatenate(norms, 1), t_max, np.concatenate(maxes, 1))


def similarity(rs: RegionStats, c: int, kind: str = "cosine") -> np.ndarray:
    """f32[n_test, n_train, F]: S_k between class-c test and training regions (c in 0..C-1)."""
    if kind == "cosine":
        return cosine_from_dots(rs.dots[c], rs.test_norm[c], rs.train_norm[c])
    return max_similarity(rs.test_max[c][:, None], rs.train_max[c][None], kind)


def by_rank(sim: np.ndarray, patient_order: np.ndarray, reps: np.ndarray) -> np.ndarray:
    """f32[n_test, R, F]: S between each test item and its r-th ranked patient.

    sim: f32[n_test, n_train, F] (one class); patient_order: int[n_test, R] (patients by rank);
    reps: int[n_test, n_patients] (representative slice of each patient, -1 = none -> NaN).
    """
    t = np.arange(sim.shape[0])[:, None]
    slices = reps[t, patient_order]  # [n_test, R]
    out = sim[t, np.maximum(slices, 0)]  # [n_test, R, F]
    out[slices < 0] = np.nan
    return out


def patient_order(patient_scores: np.ndarray, c: int, eligible: np.ndarray | None = None) -> np.ndarray:
    """int[n_test, R]: patients ranked by patient_scores[t, c, :, c], strongest proponent first.

    ``eligible`` (bool[n_patients]) keeps only the patients that have a class-c region in some
    slice: for the others every D_c gradient is zero, so their score is exactly 0 and their
    similarity undefined; ranking them would only pad the middle (or an end) of the curve.
    """
    ps = patient_scores[:, c, :, c]
    keep = np.arange(ps.shape[1]) if eligible is None else np.flatnonzero(eligible)
    return keep[rank_desc(ps[:, keep])]


def eligible_patients(train_labels: np.ndarray, train_patient: np.ndarray, n_patients: int,
                      class_labels=(1, 2, 3)) -> np.ndarray:
    """bool[C, n_patients]: patient has a class-c region (label ``class_labels[c]``) in some
    example (train_labels u8[n_train, *S])."""
    out = np.zeros((len(class_labels), n_patients), bool)
    labels = np.asarray(train_labels)
    for c, v in enumerate(class_labels):
        has = (labels == v).any(axis=spatial_axes(labels))
        out[c, np.unique(train_patient[has])] = True
    return out


def nanmean(x: np.ndarray, axis=None) -> np.ndarray:
    """np.nanmean without the all-NaN warning (the result is NaN there)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)


def fi_curve(sim_by_rank: np.ndarray) -> np.ndarray:
    """FI(r) = mean over test items: f32[m, R, F] -> f32[R, F] (NaN pairs left out)."""
    return nanmean(sim_by_rank, axis=0)


def windows(n_ranks: int, n_extremes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(top ranks, bottom ranks, middle ranks, N): positions of the three windows of N ranks.

    N = min(n_extremes, max(1, R // 5)) so the windows never overlap (1 for 5 ranks or fewer;
    0, i.e. empty windows and undefined statistics, below 3 ranks).
    """
    n = int(min(n_extremes, max(1, n_ranks // 5))) if n_ranks >= 3 else 0
    top = np.arange(n)
    bottom = np.arange(n_ranks - n, n_ranks)
    start = (n_ranks - n) // 2
    middle = np.arange(start, start + n)
    return top, bottom, middle, n


def window_means(curve: np.ndarray, n_extremes: int) -> dict:
    """Mean of a curve f32[R, ...] over the proponent, middle and opponent windows, and the gap."""
    top, bottom, middle, n = windows(curve.shape[0], n_extremes)
    prop = nanmean(curve[top], axis=0)
    opp = nanmean(curve[bottom], axis=0)
    mid = nanmean(curve[middle], axis=0)
    ext = nanmean(curve[np.concatenate([top, bottom])], axis=0)
    return {"n": n, "proponents": prop, "middle": mid, "opponents": opp, "gap": ext - mid}


def item_permutation_test(sim_by_rank: np.ndarray, n_extremes: int, n_permutations: int = 1000,
                          seed: int = 0, chunk: int = 50) -> dict:
    """Gap G of the filter-averaged FI curve and its one-sided permutation p-value.

    sim_by_rank: f32[m, R] (S averaged over filters, per test item and rank). Each permutation
    shuffles every item's ranks independently. p = (1 + #{G_perm >= G}) / (1 + n_permutations).
    """
    s = np.asarray(sim_by_rank, np.float64)
    m, n_ranks = s.shape
    w = window_means(fi_curve(s[..., None])[:, 0], n_extremes)
    n = windows(n_ranks, n_extremes)[3]
    rng = np.random.default_rng(seed)
    null = []
    done = 0
    while done < n_permutations and n > 0:
        p = min(chunk, n_permutations - done)
        # Only the 3N window positions of each shuffled ranking matter: draw them as the 3N
        # smallest of R random keys, in key order (a uniformly random ordered 3N-subset).
        keys = rng.random((p, m, n_ranks))
        pick = np.argpartition(keys, 3 * n - 1, axis=-1)[..., :3 * n]
        pick = np.take_along_axis(pick, np.argsort(np.take_along_axis(keys, pick, -1), -1), -1)
        vals = np.take_along_axis(np.broadcast_to(s, (p, m, n_ranks)), pick, axis=-1)
        curve = nanmean(vals, axis=1)  # [p, 3N]: first 2N play the extremes, last N the middle
        null.append(nanmean(curve[:, :2 * n], axis=1) - nanmean(curve[:, 2 * n:], axis=1))
        done += p
    null = np.concatenate(null) if null else np.full(1, np.nan)
    g = float(w["gap"])
    ok = np.isfinite(null)
    pval = float((1 + np.sum(null[ok] >= g)) / (1 + ok.sum())) if np.isfinite(g) else float("nan")
    return {"n": n, "gap": g, "proponents": float(w["proponents"]), "middle": float(w["middle"]),
            "opponents": float(w["opponents"]), "p_value": pval,
            "null_mean": float(nanmean(null)),
            "null_std": float(np.nanstd(null)) if ok.any() else float("nan"),
            "n_items": int(m), "n_ranks": int(n_ranks), "n_permutations": int(n_permutations)}


def spearman(x: np.ndarray, y: np.ndarray) -> dict:
    """Spearman rho (and scipy's p-value, which assumes independent pairs) over finite pairs."""
    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    if n < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return {"rho": float("nan"), "p_value": float("nan"), "n_pairs": n}
    r = stats.spearmanr(x[ok], y[ok])
    return {"rho": float(r.statistic), "p_value": float(r.pvalue), "n_pairs": n}
