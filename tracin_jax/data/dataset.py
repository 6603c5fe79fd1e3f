"""Containers for preprocessed examples, and their flat-array form for the cache."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from tracin_jax.data.labels import CLASS_NAMES


@dataclass
class Examples:
    """2D axial examples of one split.

    Attributes:
      images: f32[N, H, W, C], channels in ``DataConfig.modalities`` order (default FLAIR, T1,
        T1ce, T2); H runs along canonical axis 0 (left -> right), W along axis 1 (posterior ->
        anterior).
      labels: u8[N, H, W], classes 0 background, 1 NCR/NET, 2 ED, 3 ET.
      ids: N stable ids ``"<case>/z<index>"``, z the axial index in the canonical volume.
      cases: N case (patient) ids, one per example.
    """

    images: np.ndarray
    labels: np.ndarray
    ids: list[str] = field(default_factory=list)
    cases: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @classmethod
    def empty(cls, height: int, width: int, channels: int) -> "Examples":
        """No examples, with the right ranks: images (0, H, W, C), labels (0, H, W)."""
        return cls(np.zeros((0, height, width, channels), np.float32), np.zeros((0, height, width), np.uint8), [], [])

    @classmethod
    def concat(cls, parts: list["Examples"], height: int, width: int, channels: int) -> "Examples":
        """Concatenates parts in order (an empty list gives :meth:`empty`)."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty(height, width, channels)
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


def class_slice_counts(labels: np.ndarray) -> dict[str, int]:
    """Number of examples holding each tumour class: u8[N, H, W] -> {"NCR/NET": n, "ED": n, "ET": n}."""
    present = [labels == c for c in range(1, len(CLASS_NAMES))]
    return {name: int(np.count_nonzero(p.any(axis=(1, 2)))) for name, p in zip(CLASS_NAMES[1:], present)}


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
            if (images.ndim != 4 or labels.ndim != 3 or images.dtype != np.float32 or labels.dtype != np.uint8
                    or labels.shape != images.shape[:3] or len(ids) != n or len(cases) != n):
                return None
            splits[name] = Examples(images, labels, ids, cases)
    except (KeyError, ValueError, TypeError, AttributeError):
        return None
    if not isinstance(info, dict):
        return None
    return Dataset(splits["train"], splits["test"], info)
