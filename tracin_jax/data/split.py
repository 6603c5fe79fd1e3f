"""Patient-level train/test split.

Case ids are sorted, permuted with ``np.random.RandomState(seed).permutation`` and the first
``ceil(test_fraction * n)`` of the permutation become the test patients (259 cases at 0.2 ->
52 test / 207 train, as in the paper). All slices of a patient go to the same side.
"""

from __future__ import annotations

import math

import numpy as np

from tracin_jax.errors import InputError


def n_test_cases(n_cases: int, test_fraction: float) -> int:
    """``ceil(test_fraction * n_cases)``, robust to float round-off (0.1 * 30 -> 3, not 4)."""
    return int(math.ceil(round(test_fraction * n_cases, 9)))


def split_cases(case_ids: list[str], test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Splits case ids into (train, test), each sorted.

    Raises:
      InputError: fewer than one train or one test case would result, or duplicate ids.
    """
    ids = sorted(case_ids)
    if len(set(ids)) != len(ids):
        raise InputError("case ids for the split are not unique")
    if not 0.0 < test_fraction < 1.0:
        raise InputError(f"config value data.test_fraction={test_fraction} must lie in (0, 1)")
    n = len(ids)
    n_test = n_test_cases(n, test_fraction)
    if n_test < 1 or n - n_test < 1:
        raise InputError(
            f"{n} case(s) cannot be split into train and test with test_fraction={test_fraction}: "
            "need at least 1 case on each side"
        )
    order = np.random.RandomState(seed).permutation(n)
    test = sorted(ids[i] for i in order[:n_test])
    chosen = set(test)
    train = [i for i in ids if i not in chosen]
    return train, test


def first_cases(case_ids: list[str], max_cases: int) -> list[str]:
    """The first ``max_cases`` sorted case ids (all when ``max_cases`` <= 0)."""
    ids = sorted(case_ids)
    return ids[:max_cases] if max_cases > 0 else ids


def patient_index(train_cases) -> tuple[list[str], np.ndarray]:
    """(patients sorted by id, int32[n_train] position of each slice's patient in that list).

    ``train_cases``: the case id of every training slice (``Examples.cases``). The order every
    patient axis follows (``patient_scores``, retraining masks).
    """
    patients, index = np.unique(np.asarray([str(c) for c in train_cases]), return_inverse=True)
    return [str(p) for p in patients], index.astype(np.int32)
