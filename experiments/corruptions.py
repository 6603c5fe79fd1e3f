"""Realistic label corruptions of BraTS segmentations, and a corrupted copy of a dataset.

The corruptions act on a whole seg volume in its file's own label values (BraTS 2018-2021:
1 NCR/NET, 2 ED, 4 ET), the way an annotation error would:

- ``swap``: oedema and necrosis swapped (ED <-> NCR/NET);
- ``rim``: the enhancing rim dropped, relabelled as necrosis (ET -> NCR/NET);
- ``shift``: the whole mask translated in-plane by a few voxels (zero-filled, no wrap-around);
- ``foreign``: the mask of another patient.

:func:`write_corrupted_dataset` mirrors a BraTS folder: every image file and every untouched
seg file is a symbolic link to the original, only the corrupted patients' seg files are
rewritten (nibabel, same header and affine), and ``corruption.json`` records what was done.
Training and influence then run on it exactly as on user data.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from tracin_jax.data.labels import CONVENTIONS

CORRUPTIONS = ("swap", "rim", "shift", "foreign")
DESCRIPTIONS = {
    "swap": "oedema and necrosis swapped",
    "rim": "enhancing rim relabelled as necrosis",
    "shift": "mask shifted in-plane",
    "foreign": "mask of another patient",
}
MANIFEST = "corruption.json"


@dataclass(frozen=True)
class LabelCodes:
    """Source label values of the tumour classes in a seg file."""

    ncr: int = 1
    ed: int = 2
    et: int = 4


def label_codes(convention: str = "brats2018") -> LabelCodes:
    """The file values of NCR/NET, ED and ET for a label convention (see tracin_jax.data.labels)."""
    inverse = {dst: src for src, dst in CONVENTIONS[convention].items()}
    return LabelCodes(ncr=inverse[1], ed=inverse[2], et=inverse[3])


def swap_ed_ncr(seg: np.ndarray, codes: LabelCodes = LabelCodes()) -> np.ndarray:
    """Oedema becomes necrosis and necrosis oedema; everything else unchanged."""
    out = seg.copy()
    out[seg == codes.ed] = codes.ncr
    out[seg == codes.ncr] = codes.ed
    return out


def drop_enhancing_rim(seg: np.ndarray, codes: LabelCodes = LabelCodes()) -> np.ndarray:
    """The enhancing tumour is relabelled as necrosis (the rim is 'missed')."""
    out = seg.copy()
    out[seg == codes.et] = codes.ncr
    return out


def shift_mask(seg: np.ndarray, shift: tuple[int, int], axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """The label map translated by ``shift`` voxels along ``axes``; vacated voxels become 0 and
    labels moved past the border are lost (no wrap-around)."""
    out = np.zeros_like(seg)
    src = [slice(None)] * seg.ndim
    dst = [slice(None)] * seg.ndim
    for ax, s in zip(axes, shift):
        s = int(s)
        n = seg.shape[ax]
        if abs(s) >= n:
            return out
        if s >= 0:
            src[ax], dst[ax] = slice(0, n - s), slice(s, n)
        else:
            src[ax], dst[ax] = slice(-s, n), slice(0, n + s)
    out[tuple(dst)] = seg[tuple(src)]
    return out


def foreign_mask(seg: np.ndarray, donor: np.ndarray) -> np.ndarray:
    """Another patient's label map in place of this one (same grid required)."""
    if donor.shape != seg.shape:
        raise ValueError(f"donor mask shape {donor.shape} differs from {seg.shape}")
    return donor.astype(seg.dtype, copy=True)


def inplane_axes(affine: np.ndarray) -> tuple[int, int]:
    """The two array axes of a NIfTI volume that are not the axial (inferior-superior) one."""
    ornt = nib.io_orientation(affine)
    axes = tuple(i for i in range(3) if int(ornt[i, 0]) != 2)
    if len(axes) != 2:
        raise ValueError(f"cannot find the in-plane axes of affine {affine.tolist()}")
    return axes  # type: ignore[return-value]


@dataclass
class Corruption:
    """What is done to one patient: ``kind`` in CORRUPTIONS, with its parameters."""

    case: str
    kind: str
    shift_mm: tuple[float, float] | None = None  # along the two in-plane array axes ('shift')
    donor: str | None = None  # case whose mask is used ('foreign')
    extra: dict = field(default_factory=dict)  # filled when written, e.g. the shift in voxels


def shift_voxels(shift_mm, zooms, axes) -> tuple[int, int]:
    """A shift in mm along the in-plane ``axes`` -> whole voxels, given the voxel sizes."""
    return tuple(int(round(float(s) / float(zooms[a]))) for s, a in zip(shift_mm, axes))


def corrupt_volume(seg: np.ndarray, c: Corruption, codes: LabelCodes, affine: np.ndarray,
                   donor: np.ndarray | None = None) -> np.ndarray:
    """Applies corruption ``c`` to a seg volume in file orientation (``affine`` gives the
    in-plane axes and the voxel size for ``shift``)."""
    if c.kind == "swap":
        return swap_ed_ncr(seg, codes)
    if c.kind == "rim":
        return drop_enhancing_rim(seg, codes)
    if c.kind == "shift":
        axes = inplane_axes(affine)
        zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
        vox = shift_voxels(c.shift_mm, zooms, axes)
        c.extra["shift_voxels"] = list(vox)
        c.extra["axes"] = list(axes)
        return shift_mask(seg, vox, axes)
    if c.kind == "foreign":
        if donor is None:
            raise ValueError(f"corruption 'foreign' of {c.case} needs the donor's mask")
        return foreign_mask(seg, donor)
    raise ValueError(f"unknown corruption {c.kind!r} (one of {', '.join(CORRUPTIONS)})")


def _read_seg(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    img = nib.load(str(path))
    return img, np.asarray(img.dataobj)


def write_corrupted_dataset(cases, out_dir, corruptions: list[Corruption],
                            codes: LabelCodes = LabelCodes(), source_root=None) -> Path:
    """Writes a mirror of a dataset in which only the listed patients' seg files are corrupted.

    Args:
      cases: the :class:`tracin_jax.data.Case` list of the clean dataset (from
        ``discover_cases``); folder-per-case layouts only (not MSD).
      out_dir: the new dataset root (replaced if it holds an earlier corrupted copy).
      corruptions: one entry per corrupted patient.
      codes: label values of the files.
      source_root: the clean dataset root that ``cases`` live under (default: their common
        folder's parent, e.g. ``.../MICCAI_BraTS_2019_Data_Training``); the relative layout
        below it is kept (``HGG/<case>/...``).
    Returns:
      ``out_dir``, with ``corruption.json`` listing the corruptions.
    """
    out_dir = Path(out_dir)
    by_case = {c.case_id: c for c in cases}
    if any(c.image4d is not None for c in cases):
        raise ValueError("corrupted copies need a folder-per-case layout (not MSD)")
    if source_root is None:
        source_root = Path(os.path.commonpath([str(c.folder.parent) for c in cases]))
        if len({c.folder.parent for c in cases}) == 1 and cases[0].grade is not None:
            source_root = source_root.parent
    source_root = Path(source_root).resolve()
    if out_dir.exists():
        if not (out_dir / MANIFEST).exists():
            raise ValueError(f"{out_dir} exists and is not a corrupted dataset copy; remove it")
        shutil.rmtree(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    todo = {c.case: c for c in corruptions}
    unknown = sorted(set(todo) - set(by_case))
    if unknown:
        raise ValueError(f"corruptions name unknown cases: {', '.join(unknown)}")
    for case in cases:
        rel = Path(case.folder).resolve().relative_to(source_root)
        folder = tmp / rel
        folder.mkdir(parents=True, exist_ok=True)
        for path in case.files():
            target = folder / Path(path).name
            if path == case.seg and case.case_id in todo:
                c = todo[case.case_id]
                img, seg = _read_seg(Path(path))
                donor = None
                if c.kind == "foreign":
                    donor = _read_seg(Path(by_case[c.donor].seg))[1]
                new = corrupt_volume(seg, c, codes, img.affine, donor).astype(seg.dtype)
                nib.save(nib.Nifti1Image(new, img.affine, img.header), str(target))
            else:
                os.symlink(Path(path).resolve(), target)
    manifest = {"source": str(source_root), "codes": asdict(codes),
                "corruptions": [asdict(c) for c in corruptions]}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out_dir)
    return out_dir


def changed_classes(clean: np.ndarray, corrupted: np.ndarray, num_classes: int = 3) -> np.ndarray:
    """Pixels whose class membership changed, per example and tumour class.

    clean, corrupted: u8[n, H, W] project classes (1 NCR/NET, 2 ED, 3 ET) ->
    int64[n, num_classes]: |{clean == c} xor {corrupted == c}| for c = 1..num_classes.
    """
    out = np.zeros((len(clean), num_classes), np.int64)
    for c in range(num_classes):
        a, b = clean == c + 1, corrupted == c + 1
        out[:, c] = (a ^ b).reshape(len(clean), -1).sum(axis=1)
    return out
