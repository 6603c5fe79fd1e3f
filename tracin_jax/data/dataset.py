"""Containers for preprocessed examples, and their flat-array form for the cache."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from tracin_jax.data.labels import CLASS_NAMES


@dataclass
class Examples:
    """The examples of one split: 2D axial slices, or (a 3D run) one volume per case.

    Attributes:
      images: f32[N, H, W, M], channels in ``DataConfig.modalities`` order (BraTS default FLAIR,
        T1, T1ce, T2; another task: its channels); H runs along canonical axis 0 (left -> right),
        W along axis 1 (posterior -> anterior). Volumes: f32[N, X, Y, Z, M], the canonical RAS
        axes (left -> right, posterior -> anterior, inferior -> superior).
      labels: u8[N, H, W] (volumes: u8[N, X, Y, Z]), class indices 0 background, 1..C the task's
        classes (BraTS: 1 NCR/NET, 2 ED, 3 ET).
      ids: N stable ids ``"<case>/z<index>"``, z the axial index in the canonical volume; a
        volume's id is its case id.
      cases: N case (patient) ids, one per example.
    """

    images: np.ndarray
    labels: np.ndarray
    ids: list[str] = field(default_factory=list)
    cases: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @classmethod
    def empty(cls, *shape: int) -> "Examples":
        """No examples, with the right ranks: ``empty(H, W, C)`` gives images (0, H, W, C) and
        labels (0, H, W); ``empty(X, Y, Z, C)`` volumes (0, X, Y, Z, C) and (0, X, Y, Z)."""
        return cls(np.zeros((0, *shape), np.float32), np.zeros((0, *shape[:-1]), np.uint8), [], [])

    @classmethod
    def concat(cls, parts: list["Examples"], *shape: int) -> "Examples":
        """Concatenates parts in order (an empty list gives :meth:`empty` of ``shape``:
        H, W, C or X, Y, Z, C)."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty(*shape)
        return cls(
            np.concatenate([p.images for p in parts]).astype(np.float32, copy=False),
            np.concatenate([p.labels for p in parts]).astype(np.uint8, copy=False),
            [i for p in parts for i in p.ids],
            [c for p in parts for c in p.cases],
        )


@dataclass
class Dataset:
    """Train and test examples (split by patient) plus a JSON-serialisable ``info`` dict."""

    train: Examples
    test: Examples
    info: dict = field(default_factory=dict)


def class_slice_counts(labels: np.ndarray, names=CLASS_NAMES[1:]) -> dict[str, int]:
    """Number of examples (slices, or volumes) holding each foreground class: u8[N, ...] ->
    {names[c - 1]: n} for the
    classes c = 1..len(names) (default the BraTS classes: {"NCR/NET": n, "ED": n, "ET": n})."""
    axes = tuple(range(1, labels.ndim))
    return {name: int(np.count_nonzero((labels == c).any(axis=axes)))
            for c, name in enumerate(names, start=1)}


def _str_array(values: list[str]) -> np.ndarray:
    return np.asarray(values, dtype=np.str_) if values else np.zeros((0,), dtype="<U1")


def to_arrays(ds: Dataset) -> dict[str, np.ndarray]:
    """Flat arrays (no pickled objects) for ``np.savez``."""
    out = {"info": np.asarray(json.dumps(ds.info, sort_keys=True))}
    for name, ex in (("train", ds.train), ("test", ds.test)):
        out[f"{name}_images"] = ex.images
        out[f"{name}_labels"] = ex.labels
        out[f"{name}_ids"] = _str_array(ex.ids)
        out[f"{name}_cases"] = _str_array(ex.cases)
    return out


def from_arrays(arrays: dict[str, np.ndarray]) -> Dataset | None:
    """Inverse of :func:`to_arrays`; None if anything is missing or inconsistent."""
    try:
        info = json.loads(str(arrays["info"]))
        splits = {}
        for name in ("train", "test"):
            images, labels = arrays[f"{name}_images"], arrays[f"{name}_labels"]
            ids = [str(i) for i in arrays[f"{name}_ids"].tolist()]
            cases = [str(c) for c in arrays[f"{name}_cases"].tolist()]
            n = images.shape[0]
            if (images.ndim not in (4, 5) or labels.ndim != images.ndim - 1
                    or images.dtype != np.float32 or labels.dtype != np.uint8
                    or labels.shape != images.shape[:-1] or len(ids) != n or len(cases) != n):
                return None
            splits[name] = Examples(images, labels, ids, cases)
    except (KeyError, ValueError, TypeError, AttributeError):
        return None
    if not isinstance(info, dict):
        return None
    return Dataset(splits["train"], splits["test"], info)
