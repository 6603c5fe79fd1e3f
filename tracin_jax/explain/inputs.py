"""Reading and checking an influence folder against the run it was computed for.

An influence folder holds (axes: test example, test class i, train example or patient, train
class j; C classes, the run's task's foreground classes, named in meta.json; a folder without
class names holds the BraTS tumour classes NCR/NET, ED, ET):

- ``scores.npy``          f32[n_test, C, n_train, C]   (optional: absent when too large),
- ``patient_scores.npy``  f32[n_test, C, n_patients, C] (a patient's score = sum over its
  examples: its slices, or its one volume in a 3D run),
- ``test_present.npy``    bool[n_test, C]  (test class present in the example's ground truth),
- ``self_influence.npy``  f32[n_train, C]  (optional),
- ``topk_{proponents,opponents}_{indices,scores}.npy``  int32 / f32[n_test, C, C, K]
  (optional: the top-K training slices per test item, test class and training class; -1 / NaN
  where not ranked; written instead of ``scores.npy`` when that is too large),
- ``meta.json``: class_names, class_labels (the label value of each class in the ground truth;
  [1, 2, 3] when absent, as in folders written before it existed), task (the run's task, when
  recorded), workdir, test_ids,
  train_ids, train_cases, patients, checkpoints, ...

Everything a user can get wrong (a missing file, a shape or id list that does not match the
run) raises :class:`~tracin_jax.errors.InputError` with one line naming the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from tracin_jax.errors import InputError
from tracin_jax.task import BRATS_CLASSES

META_FILE = "meta.json"
SCORES_FILE = "scores.npy"
PATIENT_SCORES_FILE = "patient_scores.npy"
PRESENT_FILE = "test_present.npy"
SELF_INFLUENCE_FILE = "self_influence.npy"
DEFAULT_CLASS_NAMES = BRATS_CLASSES  # folders written before class names were recorded
DEFAULT_CLASS_LABELS = (1, 2, 3)


@dataclass
class Influence:
    """A checked influence folder. Arrays are numpy; ``scores`` may be a read-only memmap or None."""

    dir: Path
    meta: dict
    patient_scores: np.ndarray  # f32[n_test, C, n_patients, C]
    test_present: np.ndarray  # bool[n_test, C]
    scores: np.ndarray | None  # f32[n_test, C, n_train, C]
    self_influence: np.ndarray | None  # f32[n_train, C]
    topk: dict | None  # {'proponents_indices', ...}: [n_test, C, C, K] slice-level top-K, or None
    test_ids: list[str]
    train_ids: list[str]
    train_cases: list[str]
    patients: list[str]
    train_patient: np.ndarray  # int[n_train]: index into ``patients`` of each training slice
    class_names: list[str]  # [C]
    class_labels: list[int]  # [C]: label value of each class in the ground-truth maps

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def n_test(self) -> int:
        return self.patient_scores.shape[0]

    @property
    def n_train(self) -> int:
        return len(self.train_ids)

    @property
    def query_split(self) -> str:
        """Which split of the run the "test" axis holds (``test`` unless the folder says ``train``)."""
        return str(self.meta.get("split", "test"))


def _load_array(path: Path, ndim: int, mmap: bool = False) -> np.ndarray:
    if not path.exists():
        raise InputError(f"{path}: missing (not an influence folder, or an unfinished one?)")
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise InputError(f"{path}: unreadable .npy file ({type(e).__name__}: {e})") from None
    if arr.ndim != ndim:
        raise InputError(f"{path}: expected {ndim} dimensions, found shape {tuple(arr.shape)}")
    return arr


def _check_ids(path: Path, key: str, found: Sequence[str], expected: Sequence[str] | None) -> None:
    if expected is None:
        return
    found, expected = list(found), list(expected)
    if len(found) != len(expected):
        raise InputError(f"{path}: {key} lists {len(found)} examples but the run has {len(expected)}")
    for a, b in zip(found, expected):
        if a != b:
            raise InputError(f"{path}: {key} differ from the run's (first difference: {a!r} vs {b!r})")


def classes_of(meta: dict, where: Path | str = META_FILE) -> tuple[list[str], list[int]]:
    """(class names [C], their label values [C]) from an influence meta.json.

    ``class_names`` defaults to NCR/NET, ED, ET and ``class_labels`` to 1, 2, 3 (folders written
    before ``class_labels`` existed hold the three tumour classes). InputError for names that
    are not distinct strings, or labels that are not distinct integers 0..255, one per name.
    """
    names = meta.get("class_names", list(DEFAULT_CLASS_NAMES))
    if (not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names)
            or len(set(names)) != len(names)):
        raise InputError(f"{where}: class_names must be a list of distinct names, found {names!r}")
    labels = meta.get("class_labels")
    if labels is None:
        if len(names) != len(DEFAULT_CLASS_LABELS):
            raise InputError(f"{where}: {len(names)} class_names but no class_labels (the label "
                             "value of each class)")
        labels = list(DEFAULT_CLASS_LABELS)
    if (not isinstance(labels, list) or len(labels) != len(names)
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in labels)
            or len(set(labels)) != len(labels)):
        raise InputError(f"{where}: class_labels must be {len(names)} distinct integers 0..255 "
                         f"(one per class name), found {labels!r}")
    return list(names), [int(v) for v in labels]


def patient_index(train_cases: Sequence[str], patients: Sequence[str]) -> np.ndarray:
    """int[n_train]: position in ``patients`` of each training slice's case (-1 when unknown)."""
    pos = {p: n for n, p in enumerate(patients)}
    return np.array([pos.get(c, -1) for c in train_cases], dtype=np.int64)


def load_influence(directory: str | os.PathLike, *, test_ids: Sequence[str] | None = None,
                   train_ids: Sequence[str] | None = None,
                   train_cases: Sequence[str] | None = None) -> Influence:
    """Loads and checks an influence folder; ids given here must match the folder's exactly.

    Raises InputError (one line naming the file) for a missing file, a shape that does not fit
    the other files or the run, ids that differ, or non-finite scores.
    """
    d = Path(directory)
    if not d.is_dir():
        raise InputError(f"--influence {d}: not a folder")
    meta_path = d / META_FILE
    if not meta_path.exists():
        raise InputError(f"{meta_path}: missing (not an influence folder, or an unfinished one?)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{meta_path}: not valid JSON ({e})") from None
    for key in ("test_ids", "train_ids", "train_cases", "patients"):
        if not isinstance(meta.get(key), list):
            raise InputError(f"{meta_path}: no list {key!r}")
    class_names, class_labels = classes_of(meta, meta_path)
    C = len(class_names)
    m_test, m_train, m_cases, m_patients = (meta["test_ids"], meta["train_ids"],
                                            meta["train_cases"], meta["patients"])
    if len(m_cases) != len(m_train):
        raise InputError(f"{meta_path}: train_cases has {len(m_cases)} entries, train_ids {len(m_train)}")
    _check_ids(meta_path, "test_ids", m_test, test_ids)
    _check_ids(meta_path, "train_ids", m_train, train_ids)
    _check_ids(meta_path, "train_cases", m_cases, train_cases)
    n_test, n_train, n_pat = len(m_test), len(m_train), len(m_patients)
    train_patient = patient_index(m_cases, m_patients)
    if (train_patient < 0).any():
        bad = m_cases[int(np.argmax(train_patient < 0))]
        raise InputError(f"{meta_path}: training case {bad!r} is not in 'patients'")

    def expect(path: Path, arr: np.ndarray, shape: tuple[int, ...], what: str) -> None:
        if tuple(arr.shape) != shape:
            raise InputError(f"{path}: shape {tuple(arr.shape)} does not match {what} {shape}")

    p_path = d / PATIENT_SCORES_FILE
    patient_scores = np.asarray(_load_array(p_path, 4), dtype=np.float32)
    expect(p_path, patient_scores, (n_test, C, n_pat, C),
           "(n_test, C, n_patients, C) from meta.json")
    if not np.isfinite(patient_scores).all():
        raise InputError(f"{p_path}: contains non-finite values")

    t_path = d / PRESENT_FILE
    present = _load_array(t_path, 2)
    expect(t_path, present, (n_test, C), "(n_test, C) from meta.json")
    present = present.astype(bool)

    s_path = d / SCORES_FILE
    scores = None
    if s_path.exists():
        scores = _load_array(s_path, 4, mmap=True)
        expect(s_path, scores, (n_test, C, n_train, C),
               "(n_test, C, n_train, C) from meta.json")

    si_path = d / SELF_INFLUENCE_FILE
    self_influence = None
    if si_path.exists():
        self_influence = np.asarray(_load_array(si_path, 2), dtype=np.float32)
        expect(si_path, self_influence, (n_train, C), "(n_train, C) from meta.json")

    topk = None
    names = [f"{side}_{what}" for side in ("proponents", "opponents") for what in ("indices", "scores")]
    if all((d / f"topk_{n}.npy").exists() for n in names):
        topk = {n: _load_array(d / f"topk_{n}.npy", 4) for n in names}
        k = topk["proponents_indices"].shape[-1]
        for n, arr in topk.items():
            expect(d / f"topk_{n}.npy", arr, (n_test, C, C, k),
                   "(n_test, C, C, K) from meta.json")
            if n.endswith("indices") and (arr >= n_train).any():
                raise InputError(f"{d / f'topk_{n}.npy'}: index beyond the {n_train} training slices")

    return Influence(d, meta, patient_scores, present, scores, self_influence, topk, list(m_test),
                     list(m_train), list(m_cases), list(m_patients), train_patient, class_names, class_labels)
