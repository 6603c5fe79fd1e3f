"""Reading NIfTI volumes with nibabel, with one-line errors for every way a file can be bad.

Volumes are reoriented with ``nibabel.as_closest_canonical`` (RAS+) before any slicing, so array
axis 0 runs left -> right, axis 1 posterior -> anterior and axis 2 inferior -> superior (axial
slice index z), whatever the on-disk orientation. :func:`stored_orientation` gives the mapping
from the stored axes to these canonical ones (nibabel's ``io_orientation``, the one
``as_closest_canonical`` applies), so a window given in stored indices can be placed on the
canonical array. Images keep their stored values (header
scaling applied); labels are read from the raw data object, rounded and checked to be integers.
Every failure is an InputError naming the file.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from tracin_jax.errors import InputError

AFFINE_ATOL = 1e-4  # mm; tolerance when comparing the affines of one case's files
LABEL_INTEGER_ATOL = 1e-3


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _unreadable(path: Path, err: BaseException) -> InputError:
    return InputError(f"not a readable NIfTI file: {path} ({_reason(err)})")


def open_nifti(path: Path) -> nib.Nifti1Image:
    """Opens ``path`` (header only; data stays on disk). InputError if it is not a NIfTI file."""
    try:
        img = nib.load(str(path))
    except MemoryError:
        raise
    except Exception as err:  # nibabel raises many types for corrupt input
        raise _unreadable(path, err) from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"not a readable NIfTI file: {path} (nibabel read it as {type(img).__name__})")
    return img


def check_ndim(path: Path, img: nib.Nifti1Image, channels: int | None = None) -> None:
    """InputError unless ``img`` is 3D (``channels`` None) or 4D with ``channels`` volumes.

    A trailing singleton 4th axis (X, Y, Z, 1) counts as 3D.
    """
    shape = tuple(img.shape)
    if channels is None:
        if len(shape) == 3 or (len(shape) == 4 and shape[3] == 1):
            return
        raise InputError(f"{path}: expected a 3D volume, found shape {shape}")
    if len(shape) != 4 or shape[3] != channels:
        raise InputError(f"{path}: expected a 4D volume with {channels} channels, found shape {shape}")


def check_same_grid(ref: tuple[Path, nib.Nifti1Image], other: tuple[Path, nib.Nifti1Image]) -> None:
    """InputError naming ``other``'s file if its spatial shape or affine differs from ``ref``'s."""
    (ref_path, ref_img), (path, img) = ref, other
    if tuple(img.shape[:3]) != tuple(ref_img.shape[:3]):
        raise InputError(
            f"{path}: shape {tuple(img.shape[:3])} differs from {ref_path.name} {tuple(ref_img.shape[:3])}"
        )
    if not np.allclose(img.affine, ref_img.affine, rtol=0.0, atol=AFFINE_ATOL):
        raise InputError(f"{path}: affine differs from that of {ref_path.name} (files are not co-registered)")


def stored_orientation(path: Path, img: nib.Nifti1Image) -> np.ndarray:
    """int[3, 2]: row i = (canonical axis, +1 / -1 direction) of stored spatial axis i.

    The orientation ``nibabel.as_closest_canonical`` applies; BraTS files (LPS) give
    ``[[0, -1], [1, -1], [2, 1]]``, RAS files ``[[0, 1], [1, 1], [2, 1]]``. InputError naming
    ``path`` if the affine is degenerate (an axis with no direction).
    """
    ornt = nib.io_orientation(img.affine)
    if not np.isfinite(ornt).all():
        raise InputError(f"{path}: the header affine is degenerate (no orientation for every axis)")
    return ornt.astype(np.int64)


def _canonical_array(path: Path, img: nib.Nifti1Image) -> np.ndarray:
    """The (scaled) data of ``img`` reoriented to RAS+; InputError naming ``path`` on failure."""
    try:
        return np.asarray(nib.as_closest_canonical(img).dataobj)
    except MemoryError:
        raise
    except Exception as err:  # truncated gzip streams, short files, bad headers
        raise _unreadable(path, err) from None


def _volume(path: Path, img: nib.Nifti1Image | None) -> np.ndarray:
    """Canonical (RAS) array of the file; a trailing channel axis of size 1 is dropped."""
    img = open_nifti(path) if img is None else img
    data = _canonical_array(path, img)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    return data


def read_image(path: Path, img: nib.Nifti1Image | None = None) -> np.ndarray:
    """Image data in canonical RAS orientation: [X, Y, Z] (or [X, Y, Z, C] for 4D files).

    Values are the stored ones after header scaling. Unscaled integer data keeps its integer
    dtype (BraTS stores int16; converting only the slices used saves time and memory); anything
    else is returned as float32. InputError if the file is unreadable or holds NaN/Inf voxels.
    """
    data = _volume(path, img)
    if np.issubdtype(data.dtype, np.integer):
        return data
    data = data.astype(np.float32, copy=False)
    finite = np.isfinite(data)
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        raise InputError(f"{path}: {bad} voxels are NaN or infinite")
    return data


def read_labels(path: Path, img: nib.Nifti1Image | None = None) -> np.ndarray:
    """int[X, Y, Z] label volume in canonical RAS orientation, read from the raw data object.

    Integer-stored labels keep their dtype; float-stored labels are rounded to int32. InputError
    if any value is not (within 1e-3) an integer, NaN/Inf, or the file is unreadable.
    """
    raw = _volume(path, img)
    if np.issubdtype(raw.dtype, np.integer):
        return raw
    if not np.isfinite(raw).all():
        raise InputError(f"{path}: label volume has NaN or infinite voxels")
    rounded = np.rint(raw)
    off = np.abs(raw - rounded) > LABEL_INTEGER_ATOL
    if off.any():
        example = float(raw[off].flat[0])
        raise InputError(f"{path}: label values are not integers (e.g. {example:g})")
    lo, hi = float(rounded.min(initial=0)), float(rounded.max(initial=0))
    if lo < np.iinfo(np.int32).min or hi > np.iinfo(np.int32).max:
        raise InputError(f"{path}: label values out of range ({lo:g}..{hi:g})")
    return rounded.astype(np.int32)
