"""Attribution-free baselines scored beside the influence variants.

An LDS or a leave-out effect means little without knowing what a score that ignores the model
reaches. ``class-voxels`` credits every training patient with its number of voxels of the
query's class in its training slices, the same for every test slice: removing patients with
much enhancing tumour raises the enhancing-tumour loss of every test slice (any task: its C
foreground classes, label values 1..C). It needs no
model, no gradient and no test image, so a variant that does not beat it has not shown that
its scores say anything about the query beyond the amount of each class in the training data.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

TUMOUR_LABELS = (1, 2, 3)  # the default of a bare call: BraTS NCR/NET, ED, ET after label mapping
CLASS_VOXELS = "baseline-class-voxels"
DESCRIPTION = "no model: the patient's voxels of the query's class"


def patient_class_voxels(labels: np.ndarray, cases: Sequence[str], patients: Sequence[str],
                         class_labels: Sequence[int] = TUMOUR_LABELS) -> np.ndarray:
    """Voxels of each foreground class per training patient.

    labels u8[N, H, W] (training slices), cases[N] (the slice's patient), patients[P],
    class_labels int[C] (a run's ``task.class_labels``, 1..C) -> f64[P, C]: the number of
    voxels labelled ``class_labels[c]`` over the patient's slices.
    """
    labels = np.asarray(labels)
    labels = labels.reshape(labels.shape[0], int(np.prod(labels.shape[1:])))  # slices or volumes
    index = {p: n for n, p in enumerate(patients)}
    rows = np.array([index[str(c)] for c in cases])
    per_slice = np.stack([(labels == v).sum(axis=1) for v in class_labels], 1)  # [N, C]
    out = np.zeros((len(patients), len(class_labels)))
    np.add.at(out, rows, per_slice)
    return out


def class_voxel_scores(voxels: np.ndarray, n_test: int) -> np.ndarray:
    """The baseline as a patient-score tensor.

    voxels f64[P, C] -> f32[n_test, C, P, C] with ``scores[a, i, p, j] = voxels[p, i]`` if
    ``j == i`` else 0: a patient helps class i in proportion to its class-i voxels, for every
    test slice a.
    """
    voxels = np.asarray(voxels, np.float64)
    p, c = voxels.shape
    scores = np.zeros((n_test, c, p, c), np.float32)
    for i in range(c):
        scores[:, i, :, i] = voxels[:, i]
    return scores
