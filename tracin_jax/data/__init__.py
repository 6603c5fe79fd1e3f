"""Data stage: dataset folders -> preprocessed, patient-split examples: 2D axial slices, or
(``dims=3``, a 3D run) one volume per case.

Reads BraTS folders (every public layout, MSD Task01), any MSD task and nnU-Net v2 raw datasets.

Public interface:

- :func:`load_dataset` (data folder, DataConfig) -> :class:`Dataset` of train/test
  :class:`Examples` (images f32[N, H, W, M], labels u8[N, H, W] with class indices 0 background,
  1..C the task's classes; BraTS: 1 NCR/NET, 2 ED, 3 ET; ``dims=3``: images f32[N, X, Y, Z, M],
  labels u8[N, X, Y, Z], one per case), cached on disk; ``info["task"]``.
- :func:`resolve_data_config` -> (the data config with a non-BraTS task's automatic settings
  applied, the :class:`~tracin_jax.task.Task`, the settings chosen).
- :func:`discover_cases` -> (layout name, list of :class:`Case`); :func:`discover_dataset` also
  gives the task of an MSD or nnU-Net dataset.
- :func:`write_synthetic_dataset` writes a BraTS 2019-layout synthetic dataset;
  :func:`write_synthetic_nnunet` a synthetic nnU-Net v2 task (2 channels, 4 classes).
"""

from tracin_jax.data.dataset import Dataset, Examples
from tracin_jax.data.discover import Case, discover_cases, discover_dataset
from tracin_jax.data.labels import CLASS_NAMES, map_labels, map_task_labels
from tracin_jax.data.loader import load_dataset, resolve_data_config
from tracin_jax.data.split import split_cases
from tracin_jax.data.synth import write_synthetic_dataset, write_synthetic_nnunet

__all__ = [
    "CLASS_NAMES",
    "Case",
    "Dataset",
    "Examples",
    "discover_cases",
    "discover_dataset",
    "load_dataset",
    "map_labels",
    "map_task_labels",
    "resolve_data_config",
    "split_cases",
    "write_synthetic_dataset",
    "write_synthetic_nnunet",
]
