"""Rankings and aggregates of class-wise influence scores (pure numpy).

Axes follow the influence folder: ``scores: f32[n_test, C, n_train, C]`` (test example, test
class i, training example, training class j) and ``patient_scores: f32[n_test, C, n_patients, C]``
(C classes; the three tumour classes unless the folder says otherwise). An example is a slice
of a 2D run and a whole volume of a 3D run (where a patient has exactly one example, so its
patient score is its volume's score).
Proponents are the highest scores (training on them lowered the test loss), opponents the
lowest (most negative). Test classes absent from a slice's ground truth are never ranked.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class TopK(NamedTuple):
    """Indices (into the ranked axis) and scores of the k strongest proponents and opponents.

    ``proponents`` are in decreasing score order, ``opponents`` in increasing order (strongest,
    i.e. most negative, first).
    """

    proponents: np.ndarray  # int[k]
    proponent_scores: np.ndarray  # f32[k]
    opponents: np.ndarray  # int[k]
    opponent_scores: np.ndarray  # f32[k]


def rank_desc(values: np.ndarray) -> np.ndarray:
    """int[..., n]: indices that sort the last axis by decreasing value (stable: ties keep order).

    Position 0 holds the strongest proponent, position n-1 the strongest opponent.
    """
    return np.argsort(-np.asarray(values, dtype=np.float64), axis=-1, kind="stable")


def top_k(values: np.ndarray, k: int) -> TopK:
    """Top-k proponents and opponents of one ranking. values: f32[n].

    Proponents are the k highest positive scores, opponents the k most negative: a training item
    with a score of the wrong sign is never shown as a proponent or an opponent (which matters
    when there are fewer than 2k items), and none is both.
    """
    values = np.asarray(values)
    order = rank_desc(values)
    prop = order[:k][values[order[:k]] > 0]
    rev = order[::-1][:k]
    opp = rev[values[rev] < 0]
    return TopK(prop, values[prop], opp, values[opp])


def representatives(slice_scores: np.ndarray, train_patient: np.ndarray, n_patients: int) -> np.ndarray:
    """int[..., n_patients]: each patient's slice with the largest |score| (first one on ties).

    Args:
      slice_scores: f32[..., n_train], e.g. ``scores[t, i, :, j]`` or ``scores[:, :, :, j]``.
      train_patient: int[n_train], patient index of each training slice.
      n_patients: number of patients; a patient without slices gets -1.
    """
    s = np.abs(np.asarray(slice_scores, dtype=np.float64))
    out = np.full(s.shape[:-1] + (n_patients,), -1, dtype=np.int64)
    for p in range(n_patients):
        idx = np.flatnonzero(train_patient == p)
        if idx.size:
            out[..., p] = idx[np.argmax(s[..., idx], axis=-1)]
    return out


def largest_region_representatives(train_labels: np.ndarray, train_patient: np.ndarray,
                                   n_patients: int, class_labels=(1, 2, 3)) -> np.ndarray:
    """int[C, n_patients]: each patient's slice with the largest class-j region, per class j.

    The fallback representative when per-slice scores are not available (``scores.npy`` absent).
    train_labels: u8[n_train, *S] (slices or volumes); class_labels: int[C], the label value of
    each class.
    """
    labels = np.asarray(train_labels)
    axes = tuple(range(1, labels.ndim))
    areas = np.stack([(labels == v).sum(axis=axes) for v in class_labels])  # [C, n_train]
    return representatives(areas.astype(np.float64), train_patient, n_patients)


def representatives_from_topk(base: np.ndarray, indices: np.ndarray, scores: np.ndarray,
                              train_patient: np.ndarray) -> np.ndarray:
    """Refines fallback representatives with slice-level top-K lists (when scores.npy is absent).

    A patient with slices among the listed ones is represented by the listed slice with the
    largest |score|; the others keep ``base``.
    Args:
      base: int[n_test, C, n_patients] fallback representatives (e.g. largest region).
      indices, scores: int[n_test, C, L] / f32[n_test, C, L] listed slices (-1 / NaN = none),
        e.g. proponents and opponents of one training class concatenated.
      train_patient: int[n_train].
    """
    out = np.array(base, dtype=np.int64, copy=True)
    mag = np.where(indices >= 0, np.abs(np.nan_to_num(scores, nan=0.0)), -1.0)
    order = np.argsort(mag, axis=-1, kind="stable")  # ascending: the largest |score| is written last
    t, i = np.meshgrid(np.arange(out.shape[0]), np.arange(out.shape[1]), indexing="ij")
    for r in range(indices.shape[-1]):
        col = np.take_along_axis(indices, order[..., r:r + 1], -1)[..., 0]
        ok = col >= 0
        out[t[ok], i[ok], train_patient[col[ok]]] = col[ok]
    return out


def aggregate_patients(scores: np.ndarray, train_patient: np.ndarray, n_patients: int) -> np.ndarray:
    """Sum of slice scores per patient along the training axis (axis 2).

    scores: f32[n_test, C, n_train, C] -> f32[n_test, C, n_patients, C] (what the influence
    stage writes as ``patient_scores.npy``; used to check it).
    """
    s = np.asarray(scores, dtype=np.float64)
    out = np.zeros(s.shape[:2] + (n_patients,) + s.shape[3:], dtype=np.float64)
    np.add.at(out, (slice(None), slice(None), train_patient), s)
    return out.astype(np.float32)


def class_matrix(patient_scores: np.ndarray, present: np.ndarray, n_train: int) -> np.ndarray:
    """f32[C, C]: mean influence of training class j on test class i (patient_scores [n_test, C, P, C]).

    M[i, j] = mean over test items with class i present of the mean over training slices of
    scores[t, i, n, j]. Computed from patient scores (their sum over patients equals the sum over
    slices), so it does not need ``scores.npy``. NaN for a class present in no test item.
    """
    ps = np.asarray(patient_scores, dtype=np.float64)
    per_item = ps.sum(axis=2) / float(n_train)  # [n_test, C(i), C(j)]
    n_cls = ps.shape[1]
    out = np.full((n_cls, n_cls), np.nan)
    for i in range(n_cls):
        rows = np.asarray(present)[:, i]
        if rows.any():
            out[i] = per_item[rows, i].mean(axis=0)
    return out


def topk_frequency(patient_scores: np.ndarray, present: np.ndarray, k: int,
                   train_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """How often each patient is among the top-k proponents / opponents, per test class.

    Same rule as :func:`top_k`: the k highest positive / k most negative scores of each item.

    Args:
      patient_scores: f32[n_test, C, n_patients, C].
      present: bool[n_test, C]; test items with class i absent are not counted.
      k: ranks counted at each end.
      train_class: j used for class i; None means j = i.
    Returns:
      (proponent counts int[C, n_patients], opponent counts int[C, n_patients]).
    """
    ps = np.asarray(patient_scores)
    n_cls, n_pat = ps.shape[1], ps.shape[2]
    prop = np.zeros((n_cls, n_pat), dtype=np.int64)
    opp = np.zeros((n_cls, n_pat), dtype=np.int64)
    for i in range(n_cls):
        j = i if train_class is None else train_class
        rows = ps[np.asarray(present)[:, i], i, :, j]  # [m, n_pat]
        if rows.shape[0] == 0 or k == 0:
            continue
        order = rank_desc(rows)
        top = order[:, :k]
        np.add.at(prop[i], top[np.take_along_axis(rows, top, 1) > 0], 1)
        bottom = order[:, ::-1][:, :k]
        np.add.at(opp[i], bottom[np.take_along_axis(rows, bottom, 1) < 0], 1)
    return prop, opp


def largest_region_items(labels: np.ndarray, n: int, class_labels=(1, 2, 3)) -> list[list[int]]:
    """Per class (label values ``class_labels``, int[C]), the indices of the (up to) n slices
    with the largest class region.

    labels: u8[N, *S] (slices or volumes). Examples without the class are never chosen.
    """
    labels = np.asarray(labels)
    axes = tuple(range(1, labels.ndim))
    out = []
    for c in class_labels:
        area = (labels == c).sum(axis=axes)
        order = np.argsort(-area, kind="stable")
        out.append([int(t) for t in order[:n] if area[t] > 0])
    return out
