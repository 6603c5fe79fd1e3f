"""Tiny BraTS-like NIfTI trees for tests, in every supported layout.

Each case is a small volume (default 24 x 24 x 12) with an elliptic "brain" (positive intensities
inside, 0 outside, on every slice) and a nested tumour (NCR inside ET inside ED) on slices 4..7.
:func:`write_tree` returns the ground truth in canonical (RAS) orientation and project classes
(0 background, 1 NCR/NET, 2 ED, 3 ET), so tests can compare what the loader returns exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from tracin_jax.data.labels import CONVENTIONS

TINY_SHAPE = (24, 24, 12)
TUMOUR_SLICES = (4, 8)  # half-open range of axial slices that contain tumour
LPS_AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 23.0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
# Modality -> file-name token, per layout family.
BRATS_NAMES = {"flair": "flair", "t1": "t1", "t1ce": "t1ce", "t2": "t2"}
BRATS2023_NAMES = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"}
CHANNELS = ("flair", "t1", "t1ce", "t2")


@dataclass
class TinyCase:
    """Ground truth of one written case, canonical orientation.

    images: modality -> f32[X, Y, Z]; classes: u8[X, Y, Z] project classes; files: written paths.
    """

    images: dict[str, np.ndarray]
    classes: np.ndarray
    files: list[Path]


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Saves ``data`` (stored as given) with ``affine`` (identity: RAS) as .nii or .nii.gz."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def tiny_case(rng: np.random.Generator, shape: tuple[int, int, int] = TINY_SHAPE
              ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(modality -> f32[X, Y, Z], u8[X, Y, Z] classes) of one tiny case in RAS orientation."""
    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    cx, cy = (shape[0] - 1) / 2 + rng.uniform(-1, 1), (shape[1] - 1) / 2 + rng.uniform(-1, 1)
    brain = ((x - cx) / (0.42 * shape[0])) ** 2 + ((y - cy) / (0.45 * shape[1])) ** 2 < 1.0
    images = {}
    for m, name in enumerate(CHANNELS):
        base = 100.0 * (m + 1) + 10.0 * x + 3.0 * y + 2.0 * z + rng.uniform(0, 5, shape)
        images[name] = np.where(brain, base, 0.0).astype(np.float32)
    tx, ty = cx + rng.uniform(-2, 2), cy + rng.uniform(-2, 2)
    zc = (TUMOUR_SLICES[0] + TUMOUR_SLICES[1] - 1) / 2
    r = np.sqrt((x - tx) ** 2 + (y - ty) ** 2 + (1.5 * (z - zc)) ** 2)
    classes = np.zeros(shape, np.uint8)
    in_slices = (z >= TUMOUR_SLICES[0]) & (z < TUMOUR_SLICES[1])
    classes[(r < 6.0) & in_slices & brain] = 2
    classes[(r < 4.0) & in_slices & brain] = 3
    classes[(r < 2.0) & in_slices & brain] = 1
    return images, classes


def encode_labels(classes: np.ndarray, convention: str) -> np.ndarray:
    """Project classes -> the raw label values of ``convention`` (u8)."""
    inverse = np.zeros(4, np.uint8)
    for src, dst in CONVENTIONS[convention].items():
        inverse[dst] = src
    return inverse[classes]


def _store(array: np.ndarray, lps: bool) -> tuple[np.ndarray, np.ndarray]:
    """(array as stored on disk, affine): RAS identity, or flipped LPS like real BraTS."""
    if not lps:
        return array, np.eye(4)
    affine = LPS_AFFINE.copy()
    affine[1, 3] = array.shape[1] - 1
    return np.ascontiguousarray(array[::-1, ::-1]), affine


def write_tree(root, layout: str, cases: int = 3, shape: tuple[int, int, int] = TINY_SHAPE,
               ext: str = ".nii.gz", seed: int = 0, lps: bool = False, grades: tuple[str, ...] = ("HGG", "LGG"),
               nonstandard_seg: bool = False) -> dict[str, TinyCase]:
    """Writes a tiny dataset of ``layout`` under ``root``; returns case id -> ground truth.

    Layouts and folders:
      brats2019: ``root/MICCAI_BraTS_2019_Data_Training/{HGG,LGG}/BraTS19_TST_000i_1/`` (cases
        alternate over ``grades``).
      brats2020: ``root/MICCAI_BraTS2020_TrainingData/BraTS20_Training_00i/`` plus two CSV files;
        with ``nonstandard_seg`` the last case's seg is named ``W39_1998.09.19_Segm.nii``.
      brats2021: ``root/BraTS2021_0000i/``.
      brats2023: ``root/BraTS-GLI-0000i-000/`` with t2f/t1n/t1c/t2w names and labels 0..3.
      msd: ``root/Task01_BrainTumour/imagesTr/BRATS_00i`` 4D (FLAIR, T1w, T1gd, T2w) + labelsTr,
        dataset.json and a macOS ``._`` file.
    ``lps`` stores arrays flipped with a BraTS-like ``diag(-1, -1, 1)`` affine.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    truth: dict[str, TinyCase] = {}
    if layout == "msd":
        return _write_msd(root / "Task01_BrainTumour", cases, shape, ext, rng, lps)
    for i in range(cases):
        images, classes = tiny_case(rng, shape)
        if layout == "brats2019":
            cid = f"BraTS19_TST_{i + 1:04d}_1"
            folder = root / "MICCAI_BraTS_2019_Data_Training" / grades[i % len(grades)] / cid
            sep, names, conv = "_", BRATS_NAMES, "brats2018"
        elif layout == "brats2020":
            cid = f"BraTS20_Training_{i + 1:03d}"
            folder = root / "MICCAI_BraTS2020_TrainingData" / cid
            sep, names, conv = "_", BRATS_NAMES, "brats2018"
        elif layout == "brats2021":
            cid = f"BraTS2021_{i:05d}"
            folder = root / cid
            sep, names, conv = "_", BRATS_NAMES, "brats2018"
        elif layout == "brats2023":
            cid = f"BraTS-GLI-{i:05d}-000"
            folder = root / cid
            sep, names, conv = "-", BRATS2023_NAMES, "brats2023"
        else:
            raise ValueError(f"unknown layout {layout!r}")
        files = []
        for m in CHANNELS:
            data, affine = _store(images[m], lps)
            files.append(write_nifti(folder / f"{cid}{sep}{names[m]}{ext}", data, affine))
        seg_name = f"{cid}{sep}seg{ext}"
        if nonstandard_seg and i == cases - 1:
            seg_name = "W39_1998.09.19_Segm.nii"
        data, affine = _store(encode_labels(classes, conv), lps)
        files.append(write_nifti(folder / seg_name, data, affine))
        truth[cid] = TinyCase(images, classes, files)
    if layout == "brats2020":
        base = root / "MICCAI_BraTS2020_TrainingData"
        (base / "name_mapping.csv").write_text("Grade,BraTS_2020_subject_ID\nHGG,BraTS20_Training_001\n")
        (base / "survival_info.csv").write_text("Brats20ID,Age,Survival_days,Extent_of_Resection\n")
    return truth


def _write_msd(task: Path, cases: int, shape, ext: str, rng: np.random.Generator, lps: bool) -> dict[str, TinyCase]:
    truth = {}
    for i in range(cases):
        images, classes = tiny_case(rng, shape)
        cid = f"BRATS_{i + 1:03d}"
        stack = np.stack([images[m] for m in CHANNELS], axis=-1)  # FLAIR, T1w, T1gd, T2w
        data, affine = _store(stack, lps)
        img_path = write_nifti(task / "imagesTr" / f"{cid}{ext}", data, affine)
        data, affine = _store(encode_labels(classes, "msd"), lps)
        seg_path = write_nifti(task / "labelsTr" / f"{cid}{ext}", data, affine)
        truth[cid] = TinyCase(images, classes, [img_path, seg_path])
    (task / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"\x00\x05\x16\x07 mac resource fork")
    (task / "imagesTs").mkdir(exist_ok=True)
    (task / "dataset.json").write_text(json.dumps({
        "name": "BRATS", "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "numTraining": cases,
    }))
    return truth
