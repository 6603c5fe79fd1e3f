"""The influence-folder format: its file names and shapes, the writer and the reader.

An influence folder holds (axes: test example, test class i, train example or patient, train
class j; the C classes are the gradient function's ``class_names`` and ``class_labels``, for a
run the foreground classes of its task, :attr:`tracin_jax.run.Run.task`: NCR/NET, ED, ET for
BraTS; a folder without class names holds those three):

- ``scores.npy``: f32[n_test, C, n_train, C] (test example, test class, train example, train
  class), when it fits the memory budget on top of the stage's working memory;
- ``self_influence.npy``: f32[n_train, C] (optional);
- ``test_present.npy`` / ``train_present.npy``: bool[n, C], class c present in the ground truth
  (label value ``class_labels[c]``, :func:`class_present`);
- ``topk_{proponents,opponents}_{indices,scores}.npy``: int32 / f32[n_test, C, C, K] (test
  example, test class, train class, rank), when a top-K is asked for or the full tensor does
  not fit; absent test classes hold -1 / NaN;
- ``patient_scores.npy``: f32[n_test, C, n_patients, C], the sum over each training patient's
  examples (its slices, or its one volume in a 3D run; patients sorted by case id, listed in
  meta), when it fits; with a top-K also ``topk_patients_*`` ranked over patients;
- ``meta.json``: class names and label values (``class_labels``; [1, 2, 3] when absent, as in
  folders written before it existed), the run's task (``task``: its name, format, channels,
  classes and their label values in the dataset's files; None without a run), workdir, split,
  ids, cases, patients, checkpoints (epoch, lr), parameter subset, projection, files and
  shapes, timings, device count.

:data:`SHAPES` names each file's axes. Writing (:func:`write_score_files`, :func:`write_meta`):
each file is written in full under a temporary name, then all are renamed together,
``meta.json`` last, so an earlier complete folder stays as it was until the new one is complete
and the presence of ``meta.json`` marks a complete folder. Reading (:func:`load_influence`):
everything a user can get wrong (a missing file, a shape or id list that does not match the
run) raises :class:`~tracin_jax.errors.InputError` with one line naming the file.

Sign convention: a positive score means a proponent (a gradient step on the training example
lowers the test example's class loss), negative an opponent, as in TracIn.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from tracin_jax.atomic import StagedFiles, open_memmap, write_json_atomic
from tracin_jax.errors import InputError
from tracin_jax.influence import sharding
from tracin_jax.influence.scores import finalise_topk, topk_from_scores
from tracin_jax.influence.store import FeatureStore, pending_bytes
from tracin_jax.paths import check_free_space
from tracin_jax.task import BRATS_CLASSES

META_FILE = "meta.json"
SCORES_FILE = "scores.npy"
SELF_INFLUENCE_FILE = "self_influence.npy"
PRESENT_FILE = "test_present.npy"
TRAIN_PRESENT_FILE = "train_present.npy"
PATIENT_SCORES_FILE = "patient_scores.npy"
TOPK_NAMES = tuple(f"{side}_{what}" for side in ("proponents", "opponents")
                   for what in ("indices", "scores"))


def topk_file(name: str, patients: bool = False) -> str:
    """``topk_<name>.npy`` (ranked over training examples) or ``topk_patients_<name>.npy``
    (over patients), ``name`` one of :data:`TOPK_NAMES`."""
    return f"topk_{'patients_' if patients else ''}{name}.npy"


OUTPUT_FILES = (
    SCORES_FILE, SELF_INFLUENCE_FILE, PRESENT_FILE, TRAIN_PRESENT_FILE, PATIENT_SCORES_FILE,
    *(topk_file(name, who) for who in (False, True) for name in TOPK_NAMES),
)
# Each array file's axes, by their sizes' names: n_test, n_train, n_patients from meta.json, C
# its classes, K the top-K's rank.
SHAPES = {
    SCORES_FILE: ("n_test", "C", "n_train", "C"),
    SELF_INFLUENCE_FILE: ("n_train", "C"),
    PRESENT_FILE: ("n_test", "C"),
    TRAIN_PRESENT_FILE: ("n_train", "C"),
    PATIENT_SCORES_FILE: ("n_test", "C", "n_patients", "C"),
    **{topk_file(name, who): ("n_test", "C", "C", "K") for who in (False, True)
       for name in TOPK_NAMES},
}
SCORE_AXES = ("test example", "test class", "train example", "train class")
TOPK_AXES = ("test example", "test class", "train class", "rank")
DEFAULT_CLASS_NAMES = BRATS_CLASSES  # folders written before class names were recorded
DEFAULT_CLASS_LABELS = (1, 2, 3)


def shape_of(name: str, sizes: dict) -> tuple[int, ...]:
    """The shape file ``name`` must have, from ``sizes`` ({"n_test": ..., "C": ..., ...})."""
    return tuple(int(sizes[axis]) for axis in SHAPES[name])


# -- writing -----------------------------------------------------------------------------------

def class_present(labels: np.ndarray, class_labels: Sequence[int] | int = DEFAULT_CLASS_LABELS
                  ) -> np.ndarray:
    """labels int[n, H, W] (or int[n, X, Y, Z]) -> bool[n, C]: label value ``class_labels[c]``
    occurs in the slice (volume): ``test_present.npy`` / ``train_present.npy``.

    ``class_labels``: the label value of each class of the loss (default 1, 2, 3: the BraTS
    classes NCR/NET, ED, ET; a run's are 1..C, :func:`~.engine.run_classes`); an int C means
    labels 1..C.
    """
    if isinstance(class_labels, (int, np.integer)):
        class_labels = range(1, int(class_labels) + 1)
    labels = np.asarray(labels).reshape(len(labels), -1)
    return np.stack([(labels == v).any(axis=1) for v in class_labels], axis=1).reshape(
        len(labels), len(list(class_labels)))


def task_record(task) -> dict | None:
    """meta.json's ``task``: a :class:`~tracin_jax.task.Task` (or its dict) as a dict, None
    when there is none."""
    if task is None:
        return None
    return dict(task) if isinstance(task, dict) else task.to_dict()


def folder_meta(workdir, split: str, class_names, class_labels, test, train, patients,
                task=None) -> dict:
    """What every influence folder's ``meta.json`` says about its axes and slices (TracIn, TRAK
    and EK-FAC alike): the evaluation and explain stages match scores to slices through it.
    ``task``: the run's task (:func:`task_record`), None when unknown."""
    return {
        "format": 1,
        "workdir": str(workdir) if workdir is not None else None,
        "split": split,
        "class_names": list(class_names),
        "class_labels": list(class_labels),
        "task": task_record(task),
        "score_axes": list(SCORE_AXES),
        "topk_axes": list(TOPK_AXES),
        "n_test": len(test.ids), "n_train": len(train.ids),
        "test_ids": [str(x) for x in test.ids], "test_cases": [str(x) for x in test.cases],
        "train_ids": [str(x) for x in train.ids], "train_cases": [str(x) for x in train.cases],
        "patients": patients,
    }


def run_record(k: int, memory_budget_gb: float, full_bytes: int, store, written, timings: dict,
               mesh) -> dict:
    """How an influence folder was computed: top-K, memory, store, files, timings, devices."""
    return {
        "topk": k,
        "memory_budget_gb": float(memory_budget_gb),
        "scores_bytes": full_bytes,
        "store": str(store.root),
        "files": written,
        "timings": timings,
        "device_count": int(mesh.devices.size),
        "process_count": jax.process_count(),
        "backend": jax.default_backend(),
    }


def output_bytes(n_test: int, n_train: int, num_classes: int, n_patients: int, *, fits: bool,
                 patients_fit: bool, k: int | None, topk: int | None) -> int:
    """Disk bytes of the files an influence run writes into ``out`` (meta.json aside): the
    score tensor when kept, self-influence, presence, top-K and patient scores."""
    c = num_classes
    total = 4 * n_train * c + (n_test + n_train) * c
    if fits:
        total += 4 * n_test * c * n_train * c
    if k:
        total += 16 * n_test * c * c * k
    if patients_fit:
        total += 4 * n_test * c * n_patients * c
        if topk:
            total += 16 * n_test * c * c * min(int(topk), n_patients)
    return total


def open_outputs(out: Path, store_dir, header: dict, train_ids, keys, out_bytes: int
                 ) -> tuple[FeatureStore, bool]:
    """Before any gradient: refuses a file system without room for the store's pending chunks
    (checkpoint ``keys``) and, in the writer process, the ``out_bytes`` of the output files; then
    opens the feature store (refusing another setting's). Returns (store, made_out): whether
    this run creates ``out`` (removed again if it fails, :func:`abandon_output`)."""
    needs = [("feature store", store_dir, pending_bytes(store_dir, header, keys))]
    if sharding.is_writer():
        needs.append(("--out", out, out_bytes))
    check_free_space(needs)
    store = FeatureStore(store_dir, header, ids=train_ids)
    return store, sharding.is_writer() and not out.exists()


def abandon_output(staged, out: Path, made_out: bool) -> None:
    """After a failure: removes the staged files, and ``out`` when this run created it and it is
    empty; earlier complete outputs stay."""
    staged.discard()
    if made_out:
        _remove_if_empty(out)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def open_scores(staged: StagedFiles, shape: tuple[int, ...]) -> np.memmap:
    """The score tensor's memory-mapped temporary file (``scores.npy.tmp``) in ``staged``'s
    folder, its disk space allocated up front (:func:`tracin_jax.atomic.open_memmap`): a full
    disk is a one-line InputError here, not a crash while the scores are written."""
    from tracin_jax.atomic import writing

    with writing(staged.path(SCORES_FILE), staged.folder / SCORES_FILE) as tmp:
        mm = open_memmap(tmp, np.float32, shape)
    staged.adopt(SCORES_FILE)
    return mm


def write_score_files(out: Path, result: dict, test_present: np.ndarray,
                      train_present: np.ndarray, *, topk: int | None = None,
                      scores_tmp: Path | None = None,
                      staged: StagedFiles | None = None) -> dict[str, list[int]]:
    """The scoring stage's arrays, written into ``out``; returns {file name: shape}.

    ``result``: :func:`~.scores.score_blocks`' dict (``self_influence`` f32[n_train, C] or None,
    ``topk_state``, ``patient_scores`` f32[n_test, C, n_patients, C] or None); ``scores_tmp``:
    a finished, flushed ``scores.npy.tmp`` to become ``scores.npy`` (None: no slice scores).

    With ``staged`` (:class:`~tracin_jax.atomic.StagedFiles` of ``out``) the files are only
    staged under temporary names; :func:`write_meta` with the same ``staged`` puts them in
    place (and removes the files of :data:`OUTPUT_FILES` this run did not write) before
    meta.json. Without it each file is replaced atomically now and stale ones are removed. A
    full disk: one-line InputError, this run's temporary files removed.
    """
    written: dict[str, list[int]] = {}
    arrays = {PRESENT_FILE: test_present, TRAIN_PRESENT_FILE: train_present}
    if result.get("self_influence") is not None:
        arrays[SELF_INFLUENCE_FILE] = result["self_influence"]
    if result["topk_state"] is not None:
        for name, arr in finalise_topk(result["topk_state"], test_present).items():
            arrays[topk_file(name)] = arr
    if result["patient_scores"] is not None:
        pat = sharding.to_host(result["patient_scores"])
        arrays[PATIENT_SCORES_FILE] = pat
        if topk is not None:
            for name, arr in topk_from_scores(pat, topk, test_present).items():
                arrays[topk_file(name, patients=True)] = arr
    if not sharding.is_writer():
        return written
    now = staged is None
    staged = StagedFiles(out) if now else staged
    try:
        if scores_tmp is not None:
            shape = list(np.load(scores_tmp, mmap_mode="r").shape)
            if Path(scores_tmp) != staged.path(SCORES_FILE):
                os.replace(scores_tmp, staged.path(SCORES_FILE))
            staged.adopt(SCORES_FILE)
            written[SCORES_FILE] = shape
        for name, arr in arrays.items():
            staged.npy(name, np.asarray(arr))
            written[name] = list(np.shape(arr))
    except BaseException:
        staged.discard()
        raise
    if now:
        staged.commit(remove=OUTPUT_FILES)
    return written


def write_meta(out: Path, meta: dict, barrier: str, staged: StagedFiles | None = None) -> dict:
    """Writes ``out/meta.json`` last (its presence marks a complete folder) from the writer
    process, then waits for every process.

    With ``staged`` (the files :func:`write_score_files` staged): meta.json is staged too, then
    the earlier meta.json is removed, the staged files are put in place, the files of
    :data:`OUTPUT_FILES` not written now are removed, and meta.json comes last. A failure
    before that (a full disk) removes the staged files and leaves ``out`` as it was."""
    if sharding.is_writer():
        if staged is None:
            write_json_atomic(out / META_FILE, meta, indent=1)
        else:
            try:
                staged.json(META_FILE, meta, indent=1)
            except BaseException:
                staged.discard()
                raise
            staged.commit(first=(META_FILE,), remove=OUTPUT_FILES, last=META_FILE)
    sharding.barrier(barrier)
    return meta


# -- reading -----------------------------------------------------------------------------------

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


def _patient_positions(train_cases: Sequence[str], patients: Sequence[str]) -> np.ndarray:
    """int[n_train]: position in ``patients`` of each training slice's case (-1 when unknown)."""
    pos = {p: n for n, p in enumerate(patients)}
    return np.array([pos.get(c, -1) for c in train_cases], dtype=np.int64)


def load_influence(directory: str | os.PathLike, *, test_ids: Sequence[str] | None = None,
                   train_ids: Sequence[str] | None = None,
                   train_cases: Sequence[str] | None = None) -> Influence:
    """Loads and checks an influence folder; ids given here must match the folder's exactly.

    Raises InputError (one line naming the file) for a missing file, a shape that does not fit
    the other files or the run (:data:`SHAPES`), ids that differ, or non-finite scores.
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
    m_test, m_train, m_cases, m_patients = (meta["test_ids"], meta["train_ids"],
                                            meta["train_cases"], meta["patients"])
    if len(m_cases) != len(m_train):
        raise InputError(f"{meta_path}: train_cases has {len(m_cases)} entries, train_ids {len(m_train)}")
    _check_ids(meta_path, "test_ids", m_test, test_ids)
    _check_ids(meta_path, "train_ids", m_train, train_ids)
    _check_ids(meta_path, "train_cases", m_cases, train_cases)
    sizes = {"n_test": len(m_test), "n_train": len(m_train), "n_patients": len(m_patients),
             "C": len(class_names)}
    train_patient = _patient_positions(m_cases, m_patients)
    if (train_patient < 0).any():
        bad = m_cases[int(np.argmax(train_patient < 0))]
        raise InputError(f"{meta_path}: training case {bad!r} is not in 'patients'")

    def expect(name: str, arr: np.ndarray) -> np.ndarray:
        """``arr``, read from file ``name``, when it has the shape :data:`SHAPES` gives it."""
        shape = shape_of(name, sizes)
        if tuple(arr.shape) != shape:
            raise InputError(f"{d / name}: shape {tuple(arr.shape)} does not match "
                             f"({', '.join(SHAPES[name])}) from meta.json {shape}")
        return arr

    def load(name: str, mmap: bool = False) -> np.ndarray:
        return expect(name, _load_array(d / name, len(SHAPES[name]), mmap=mmap))

    patient_scores = np.asarray(load(PATIENT_SCORES_FILE), dtype=np.float32)
    if not np.isfinite(patient_scores).all():
        raise InputError(f"{d / PATIENT_SCORES_FILE}: contains non-finite values")
    present = load(PRESENT_FILE).astype(bool)
    scores = load(SCORES_FILE, mmap=True) if (d / SCORES_FILE).exists() else None
    self_influence = None
    if (d / SELF_INFLUENCE_FILE).exists():
        self_influence = np.asarray(load(SELF_INFLUENCE_FILE), dtype=np.float32)

    topk = None
    if all((d / topk_file(n)).exists() for n in TOPK_NAMES):
        topk = {n: _load_array(d / topk_file(n), 4) for n in TOPK_NAMES}
        sizes["K"] = topk["proponents_indices"].shape[-1]
        for n, arr in topk.items():
            expect(topk_file(n), arr)
            if n.endswith("indices") and (arr >= sizes["n_train"]).any():
                raise InputError(f"{d / topk_file(n)}: index beyond the {sizes['n_train']} "
                                 "training slices")

    return Influence(d, meta, patient_scores, present, scores, self_influence, topk, list(m_test),
                     list(m_train), list(m_cases), list(m_patients), train_patient, class_names,
                     class_labels)
