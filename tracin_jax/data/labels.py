"""Label conventions of the BraTS releases, mapped to the project's mutually exclusive classes.

Project classes: 0 background, 1 NCR/NET (necrotic / non-enhancing core), 2 ED (oedema),
3 ET (enhancing tumour).

===========  ===================================================  ==============
convention   source values                                        mapped to
===========  ===================================================  ==============
brats2018    BraTS 2018-2021: 0, 1 NCR/NET, 2 ED, 4 ET (no 3)     0, 1, 2, 3
brats2023    BraTS 2023: 0, 1 NCR, 2 ED, 3 ET                     0, 1, 2, 3
msd          MSD Task01: 0, 1 oedema, 2 non-enhancing, 3 enh.     0, 2, 1, 3
===========  ===================================================  ==============

Any other value is an error naming the case and the values, never a silent remap.

Any other task (an nnU-Net v2 raw dataset, an MSD task other than Task01) declares its label
values in ``dataset.json``: :func:`map_task_labels` maps value 0 to class 0 (background) and the
c-th declared foreground value to class c (:meth:`tracin_jax.task.Task.label_map`); a value the
file holds but ``dataset.json`` does not declare is an error naming the file and the value.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tracin_jax.errors import InputError

CLASS_NAMES = ("background", "NCR/NET", "ED", "ET")
NUM_CLASSES = 4
CONVENTIONS: dict[str, dict[int, int]] = {
    "brats2018": {0: 0, 1: 1, 2: 2, 4: 3},
    "brats2023": {0: 0, 1: 1, 2: 2, 3: 3},
    "msd": {0: 0, 1: 2, 2: 1, 3: 3},
}
DESCRIPTIONS = {
    "brats2018": "BraTS 2018-2021 labels are 0, 1, 2, 4",
    "brats2023": "BraTS 2023 labels are 0, 1, 2, 3",
    "msd": "MSD Task01 labels are 0, 1, 2, 3",
}
LAYOUT_CONVENTION = {
    "brats2019": "brats2018",
    "brats2020": "brats2018",
    "brats2021": "brats2018",
    "brats2023": "brats2023",
    "msd": "msd",
}


def lookup_table(convention: str) -> np.ndarray:
    """u8[256]: source value -> class, 255 for values the convention does not allow."""
    lut = np.full(256, 255, dtype=np.uint8)
    for src, dst in CONVENTIONS[convention].items():
        lut[src] = dst
    return lut


def map_labels(seg: np.ndarray, convention: str, case_id: str, path: Path | str = "") -> np.ndarray:
    """Maps a source label volume to the project classes.

    Args:
      seg: int[...] raw integer labels of one case.
      convention: one of ``CONVENTIONS``.
      case_id: named in the error message.
      path: the seg file, named in the error message.
    Returns:
      u8[...] with values in {0, 1, 2, 3}, same shape.
    Raises:
      InputError: a value outside the convention (e.g. a 3 in BraTS 2018-2021 data).
    """
    lut = lookup_table(convention)
    lo, hi = int(seg.min(initial=0)), int(seg.max(initial=0))
    if lo < 0 or hi > 255:
        _raise_bad(np.unique(seg), convention, case_id, path)
    mapped = lut[seg]
    invalid = mapped == 255
    if invalid.any():
        _raise_bad(np.unique(seg[invalid]), convention, case_id, path)
    return mapped


def _raise_bad(values: np.ndarray, convention: str, case_id: str, path) -> None:
    allowed = CONVENTIONS[convention]
    bad = [int(v) for v in values if int(v) not in allowed]
    hint = ""
    if convention == "brats2018" and bad == [3]:
        hint = "; a 3 suggests BraTS 2023 or MSD labels: set data.layout"
    where = f" in {Path(path).name}" if path else ""
    shown = ", ".join(str(v) for v in bad[:10]) + (", ..." if len(bad) > 10 else "")
    raise InputError(
        f"case {case_id}: unexpected label values [{shown}]{where} ({DESCRIPTIONS[convention]}{hint})"
    )


def map_task_labels(seg: np.ndarray, task, case_id: str, path: Path | str = "") -> np.ndarray:
    """Maps a label volume of a task described by its ``dataset.json`` to class indices.

    Args:
      seg: int[...] raw integer labels of one case.
      task: the :class:`~tracin_jax.task.Task` (its ``values``, in class order).
      case_id: named in the error message.
      path: the label file, named in the error message.
    Returns:
      u8[...] with values in {0, ..., C}, same shape (value 0 and ``task.values[c - 1]`` -> c).
    Raises:
      InputError: a value that ``dataset.json`` does not declare.
    """
    mapping = task.label_map()
    lo, hi = int(seg.min(initial=0)), int(seg.max(initial=0))
    if 0 <= lo and hi < 65536:  # a lookup table over the values present
        lut = np.full(hi + 1, 255, dtype=np.uint8)
        for src, dst in mapping.items():
            if src <= hi:
                lut[src] = dst
        mapped = lut[seg]
        invalid = mapped == 255
        if invalid.any():
            _raise_undeclared(np.unique(seg[invalid]), task, case_id, path)
        return mapped
    values, inverse = np.unique(seg, return_inverse=True)
    bad = [v for v in values.tolist() if int(v) not in mapping]
    if bad:
        _raise_undeclared(np.asarray(bad), task, case_id, path)
    table = np.asarray([mapping[int(v)] for v in values], dtype=np.uint8)
    return table[inverse].reshape(seg.shape)


def _raise_undeclared(values: np.ndarray, task, case_id: str, path) -> None:
    shown = ", ".join(str(int(v)) for v in values[:10]) + (", ..." if len(values) > 10 else "")
    where = f"{path}" if path else f"case {case_id}"
    declared = ", ".join(["0 background"] + [f"{v} {n}" for n, v in zip(task.classes, task.values)])
    raise InputError(f"{where}: label values [{shown}] are not declared in dataset.json "
                     f"(declared: {declared})")
