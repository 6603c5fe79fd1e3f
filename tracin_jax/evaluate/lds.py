"""Class-wise linear datamodeling score (LDS; Park et al. 2023, TRAK) and its noise ceiling.

A target is a (test slice z', class i) pair with class i, one of the run's C foreground classes
(BraTS: the tumour classes), present in the slice's ground truth. For every retraining subset
S_m of the training patients, an attribution predicts

    g_m(z', i) = sum_{p in S_m} sum_j patient_scores[z', i, p, j]

A positive TracIn score says "this patient lowers the loss", so the predicted *loss* is -g. The
LDS of a target is the Spearman correlation, over the M subsets, between -g and the class-i loss
actually measured after retraining on S_m (mean over retraining seeds); the reported LDS is the
mean over targets.

Intervals are percentile bootstrap intervals over the *subsets* (the M retrainings are resampled
with replacement and every target's Spearman recomputed; the targets stay fixed): they say how
much the number would move with another draw of retrainings, which the pilot showed is the
dominant noise. :func:`paired_difference` gives the same interval for the difference of two
attributions scored on the same subsets.

The noise ceiling (R >= 2 seeds): for each seed r, the mean loss of the other R-1 seeds is used
as the "prediction" of seed r's loss; its LDS, averaged over r, is what a perfect attribution of
the expected loss could reach given the retraining noise.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
from scipy import stats

from tracin_jax.task import BRATS_CLASSES as CLASS_NAMES  # the default of a bare call
BOOTSTRAP_RESAMPLES = 1000


def subset_predictions(patient_scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Predicted class losses of every subset model, up to a constant.

    patient_scores f32[n_test, C, P, C] (test slice, test class, patient, train class),
    masks bool[M, P] -> f32[M, n_test, C]: ``-sum_{p in S_m} sum_j patient_scores[., ., p, j]``
    (a proponent lowers the loss, hence the minus).
    """
    per_patient = np.asarray(patient_scores, np.float64).sum(axis=-1)  # [n_test, C, P]
    return -np.einsum("mp,aip->mai", np.asarray(masks, np.float64), per_patient)


def spearman_columns(pred: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column over the rows.

    pred, actual f[M, T] -> f64[T]; NaN where a column is constant in either array.
    """
    rp = stats.rankdata(np.asarray(pred, np.float64), axis=0)
    ra = stats.rankdata(np.asarray(actual, np.float64), axis=0)
    rp = rp - rp.mean(axis=0)
    ra = ra - ra.mean(axis=0)
    den = np.sqrt((rp ** 2).sum(axis=0) * (ra ** 2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rp * ra).sum(axis=0) / np.where(den > 0, den, 1.0), np.nan)


def target_mask(present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(test slice indices int[T], class indices int[T]) of the targets: present[a, i] True."""
    a, i = np.nonzero(np.asarray(present, bool))
    return a, i


def lds_per_target(pred: np.ndarray, losses: np.ndarray, present: np.ndarray) -> np.ndarray:
    """LDS of every target.

    pred f[M, n_test, C] (predicted loss), losses f[M, R, n_test, C] (measured loss per seed; the
    mean over R is used), present bool[n_test, C] -> f64[T] in the order of :func:`target_mask`.
    """
    a, i = target_mask(present)
    mean_loss = np.asarray(losses, np.float64).mean(axis=1)
    return spearman_columns(np.asarray(pred)[:, a, i], mean_loss[:, a, i])


def _bootstrap_mean_ci(pred_t: np.ndarray, loss_t: np.ndarray, resamples: int, seed: int,
                       level: float = 0.95) -> list[float | None]:
    """Percentile interval of the mean-over-targets LDS when subsets (rows) are resampled."""
    m = pred_t.shape[0]
    if m < 3 or pred_t.shape[1] == 0:
        return [None, None]

    def statistic(idx):
        idx = np.asarray(idx, int)
        return _mean_spearman(pred_t[idx], loss_t[idx])

    with warnings.catch_warnings():  # resamples with tied rows may give NaN: interval None
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap((np.arange(m),), statistic, vectorized=False, paired=False,
                              n_resamples=resamples, confidence_level=level,
                              method="percentile", random_state=np.random.default_rng(seed))
    lo, hi = res.confidence_interval
    return [_num(lo), _num(hi)]


def _mean_spearman(pred: np.ndarray, actual: np.ndarray) -> float:
    """Mean over columns of :func:`spearman_columns`, ignoring NaN (NaN if all are)."""
    rho = spearman_columns(pred, actual)
    ok = np.isfinite(rho)
    return float(rho[ok].mean()) if ok.any() else float("nan")


def _num(x) -> float | None:
    x = float(x)
    return None if not np.isfinite(x) else x


def lds(patient_scores: np.ndarray, masks: np.ndarray, losses: np.ndarray, present: np.ndarray,
        *, class_names: Sequence[str] = CLASS_NAMES, resamples: int = BOOTSTRAP_RESAMPLES,
        seed: int = 0) -> dict:
    """Class-wise LDS of one attribution.

    patient_scores f32[n_test, C, P, C]; masks bool[M, P]; losses f32[M, R, n_test, C] (the
    class-wise loss the attribution differentiates, per subset model and seed); present
    bool[n_test, C]; ``class_names``: the C class names (a run's ``task.classes``; default
    the BraTS ones). Returns ``{"mean", "ci", "n_targets", "per_class": {name: {"mean", "ci",
    "n_targets"}}, "per_target": [T floats]}``; intervals as in the module docstring.
    """
    if len(class_names) != np.shape(present)[1]:
        raise ValueError(f"{len(class_names)} class names for {np.shape(present)[1]} classes")
    pred = subset_predictions(patient_scores, masks)
    a, i = target_mask(present)
    mean_loss = np.asarray(losses, np.float64).mean(axis=1)
    pred_t, loss_t = pred[:, a, i], mean_loss[:, a, i]
    per_target = spearman_columns(pred_t, loss_t)
    out = {"mean": _nanmean(per_target), "ci": _bootstrap_mean_ci(pred_t, loss_t, resamples, seed),
           "n_targets": int(len(a)), "per_class": {}, "per_target": [_num(v) for v in per_target]}
    for c, name in enumerate(class_names):
        sel = i == c
        out["per_class"][name] = {
            "mean": _nanmean(per_target[sel]),
            "ci": _bootstrap_mean_ci(pred_t[:, sel], loss_t[:, sel], resamples, seed),
            "n_targets": int(sel.sum())}
    return out


def _nanmean(x: np.ndarray) -> float | None:
    x = np.asarray(x, np.float64)
    return _num(np.nanmean(x)) if np.isfinite(x).any() else None


def paired_difference(scores_a: np.ndarray, losses_a: np.ndarray, scores_b: np.ndarray,
                      losses_b: np.ndarray, masks: np.ndarray, present: np.ndarray, *,
                      resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """LDS(a) - LDS(b) on the same subsets, with a paired bootstrap interval over subsets.

    scores_* f32[n_test, C, P, C] and losses_* f32[M, R, n_test, C] (each attribution against
    the loss it differentiates); masks and present as in :func:`lds`. Returns ``{"mean",
    "ci"}``: an interval that excludes 0 separates the two attributions.
    """
    a, i = target_mask(present)
    la = np.asarray(losses_a, np.float64).mean(axis=1)[:, a, i]
    lb = np.asarray(losses_b, np.float64).mean(axis=1)[:, a, i]
    pa = subset_predictions(scores_a, masks)[:, a, i]
    pb = subset_predictions(scores_b, masks)[:, a, i]

    def statistic(idx):
        idx = np.asarray(idx, int)
        return (_mean_spearman(pa[idx], la[idx]) - _mean_spearman(pb[idx], lb[idx]))

    mean = _num(statistic(np.arange(len(pa))))
    if len(pa) < 3 or not len(a):
        return {"mean": mean, "ci": [None, None]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap((np.arange(len(pa)),), statistic, vectorized=False,
                              n_resamples=resamples, method="percentile",
                              random_state=np.random.default_rng(seed))
    lo, hi = res.confidence_interval
    return {"mean": mean, "ci": [_num(lo), _num(hi)]}


def noise_ceiling(losses: np.ndarray, present: np.ndarray, *,
                  class_names: Sequence[str] = CLASS_NAMES) -> dict | None:
    """LDS that the mean of R-1 seeds reaches at predicting the held-out seed, averaged over the
    held-out seed; None when R < 2.

    losses f32[M, R, n_test, C], present bool[n_test, C] -> {"mean", "per_class": {name: mean},
    "seeds": R}.
    """
    losses = np.asarray(losses, np.float64)
    r_total = losses.shape[1]
    if r_total < 2:
        return None
    a, i = target_mask(present)
    per_seed = []
    for r in range(r_total):
        others = np.delete(losses, r, axis=1).mean(axis=1)[:, a, i]
        per_seed.append(spearman_columns(others, losses[:, r][:, a, i]))
    with warnings.catch_warnings():  # a target constant in every seed stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        per_target = np.nanmean(np.stack(per_seed), axis=0) if len(a) else np.zeros(0)
    return {"mean": _nanmean(per_target), "seeds": int(r_total),
            "per_class": {name: _nanmean(per_target[i == c]) for c, name in enumerate(class_names)}}
