"""Data stage: BraTS folders (every public layout) -> preprocessed, patient-split 2D examples.

Public interface:

- :func:`load_dataset` (data folder, DataConfig) -> :class:`Dataset` of train/test
  :class:`Examples` (images f32[N, H, W, 4], labels u8[N, H, W] with classes 0 background,
  1 NCR/NET, 2 ED, 3 ET), cached on disk.
- :func:`discover_cases` -> (layout name, list of :class:`Case`).
- :func:`write_synthetic_dataset` writes a BraTS 2019-layout synthetic dataset.
"""

from tracin_jax.data.dataset import Dataset, Examples
from tracin_jax.data.discover import Case, discover_cases
from tracin_jax.data.labels import CLASS_NAMES, map_labels
from tracin_jax.data.loader import load_dataset
from tracin_jax.data.split import split_cases
from tracin_jax.data.synth import write_synthetic_dataset

__all__ = [
    "CLASS_NAMES",
    "Case",
    "Dataset",
    "Examples",
    "discover_cases",
    "load_dataset",
    "map_labels",
    "split_cases",
    "write_synthetic_dataset",
]
