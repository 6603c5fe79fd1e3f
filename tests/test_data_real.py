"""Real BraTS 2023 cases from the shared folder beside the clone (``../shared/data``).

Four adult-glioma cases stored LPS (``real-brats/BraTS-GLI-9000{1..4}-000``) and one metastasis
case stored RAS (``real-brats-met/BraTS-MET-90005-000``); provenance in their SOURCES.md. The
folder can be given by ``$TRACIN_JAX_SHARED``; every test here is skipped when it is absent.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tracin_jax.config import get_config
from tracin_jax.data import load_dataset
from tracin_jax.data.loader import NegativeVoxelsWarning
from tracin_jax.data.nifti import stored_orientation
from tracin_jax.data.preprocess import stored_window_to_canonical

SHARED = Path(os.environ.get("TRACIN_JAX_SHARED", Path(__file__).parents[2] / "shared"))
GLI = SHARED / "data" / "real-brats"
MET = SHARED / "data" / "real-brats-met"
pytestmark = pytest.mark.skipif(not (GLI.is_dir() and MET.is_dir()), reason=f"no real BraTS cases in {SHARED}")

MODALITIES = ("t2f", "t1n", "t1c", "t2w")  # the loader's channel order: flair, t1, t1ce, t2
CASES = ["BraTS-GLI-90001-000", "BraTS-GLI-90002-000", "BraTS-GLI-90003-000", "BraTS-GLI-90004-000",
         "BraTS-MET-90005-000"]
PAPER = replace(get_config("paper").data, grades="all")  # BraTS 2023 has no grade folders


def case_dir(cid: str) -> Path:
    return (MET if "MET" in cid else GLI) / cid


def stored(cid: str, kind: str) -> tuple[np.ndarray, nib.Nifti1Image]:
    img = nib.load(str(case_dir(cid) / f"{cid}-{kind}.nii.gz"))
    return np.asarray(img.dataobj), img


def to_ras(window: np.ndarray, img: nib.Nifti1Image) -> np.ndarray:
    """A stored-array window [X, Y, ...] turned to RAS (flips only; these files are not permuted)."""
    ornt = stored_orientation(Path("-"), img)
    assert tuple(ornt[:, 0]) == (0, 1, 2)
    for axis, direction in enumerate(ornt[:, 1]):
        if direction < 0:
            window = np.flip(window, axis)
    return window


def brain(cid: str) -> tuple[np.ndarray, nib.Nifti1Image]:
    """bool[X, Y, Z] stored voxels where any modality is non-zero, and the t2f header."""
    mask, img = None, None
    for m in MODALITIES:
        data, img = stored(cid, m)
        mask = data != 0 if mask is None else mask | (data != 0)
    return mask, img


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """All five cases in one folder (links), loaded with the paper's data settings, and the warnings."""
    root = tmp_path_factory.mktemp("real")
    for cid in CASES:
        (root / cid).symlink_to(case_dir(cid), target_is_directory=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_dataset(root, PAPER, cache_dir=False, progress=False)
    return ds, [str(w.message) for w in caught if issubclass(w.category, NegativeVoxelsWarning)]


def examples_of(ds, cid):
    ex = ds.train if cid in ds.info["train_cases"] else ds.test
    rows = [i for i, c in enumerate(ex.cases) if c == cid]
    return ex.images[rows], ex.labels[rows], [ex.ids[i] for i in rows]


def test_real_cases_load_through_the_brats2023_layout(real):
    ds, _ = real
    assert ds.info["layout"] == "brats2023" and ds.info["label_convention"] == "brats2023"
    assert sorted(ds.info["train_cases"] + ds.info["test_cases"]) == CASES
    assert ds.info["image_shape"] == [192, 192, 4] and ds.info["cases_without_examples"] == []


@pytest.mark.parametrize("cid", CASES)
def test_paper_crop_is_the_stored_window_reoriented_to_ras(real, cid):
    """images == 2 raw[27:219, 27:219, z] / max(raw) - 1 and labels == seg[27:219, 27:219, z], flipped to RAS."""
    ds, _ = real
    images, labels, ids = examples_of(ds, cid)
    assert ids == [f"{cid}/z{z}" for z in range(90, 100)]
    for c, m in enumerate(MODALITIES):
        data, img = stored(cid, m)
        window = data[27:219, 27:219, 90:100].astype(np.float64)
        want = to_ras(2.0 * window / float(data.max()) - 1.0, img)
        np.testing.assert_allclose(images[..., c], np.moveaxis(want, 2, 0), rtol=0, atol=2e-6)
    seg, img = stored(cid, "seg")
    np.testing.assert_array_equal(labels, np.moveaxis(to_ras(seg[27:219, 27:219, 90:100], img), 2, 0))


@pytest.mark.parametrize("cid", CASES)
def test_paper_window_loses_no_brain_voxel_on_the_paper_slices(cid):
    mask, img = brain(cid)
    crop, slices = stored_window_to_canonical(PAPER.crop, PAPER.slices, mask.shape, stored_orientation(Path(cid), img),
                                              cid, cid)
    canon = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(mask.astype(np.uint8), img.affine)).dataobj) > 0
    (y0, y1, x0, x1), (a, b) = crop, (int(v) for v in slices.split(":"))
    assert (a, b) == (90, 100)
    assert canon[y0:y1, x0:x1, a:b].sum() == mask[:, :, 90:100].sum() > 100_000


@pytest.mark.parametrize("cid", CASES[:4])
def test_stored_window_keeps_every_glioma_brain_voxel_where_the_canonical_one_did_not(cid):
    """On all 155 slices the stored [27:219] window holds the whole brain of each LPS glioma case.

    The same indices on the canonical array (the former default) cut the occipital pole of three.
    """
    mask, img = brain(cid)
    canon = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(mask.astype(np.uint8), img.affine)).dataobj) > 0
    (y0, y1, x0, x1), _ = stored_window_to_canonical(PAPER.crop, "tumour", mask.shape,
                                                     stored_orientation(Path(cid), img), cid, cid)
    assert (y0, y1, x0, x1) == (21, 213, 21, 213)
    assert canon[y0:y1, x0:x1].sum() == mask.sum()
    old_lost = {"BraTS-GLI-90001-000": 652, "BraTS-GLI-90002-000": 3299, "BraTS-GLI-90003-000": 0,
                "BraTS-GLI-90004-000": 700}[cid]
    assert mask.sum() - canon[27:219, 27:219].sum() == old_lost


def test_class_slices_of_the_real_split(real):
    ds, _ = real
    for split, ex in (("train", ds.train), ("test", ds.test)):
        want = {name: int(sum((lab == c).any() for lab in ex.labels)) for c, name in ((1, "NCR/NET"), (2, "ED"), (3, "ET"))}
        assert ds.info["class_slices"][split] == want
    # the voxel counts SOURCES.md gives for z 90..99 cropped [27:219]^2, per case and class
    sources = {"BraTS-GLI-90001-000": (0, 25213, 0), "BraTS-GLI-90002-000": (0, 11534, 0),
               "BraTS-GLI-90003-000": (161, 1849, 0), "BraTS-GLI-90004-000": (1418, 5959, 2520)}
    for cid, counts in sources.items():
        _, labels, _ = examples_of(ds, cid)
        assert tuple(int((labels == c).sum()) for c in (1, 2, 3)) == counts


def test_negative_voxels_of_the_resampled_cases_are_reported(real):
    ds, lines = real
    assert sorted(ds.info["negative_minima"]) == ["BraTS-GLI-90003-000", "BraTS-GLI-90004-000"]
    assert ds.info["negative_minima"]["BraTS-GLI-90003-000"] == {
        "BraTS-GLI-90003-000-t1c.nii.gz": -105.0, "BraTS-GLI-90003-000-t1n.nii.gz": -69.0,
        "BraTS-GLI-90003-000-t2f.nii.gz": -54.0, "BraTS-GLI-90003-000-t2w.nii.gz": -122.0}
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert lines[1].startswith("case BraTS-GLI-90004-000: negative voxels in BraTS-GLI-90004-000-t2f.nii.gz (min -45)")
    images, _, _ = examples_of(ds, "BraTS-GLI-90003-000")
    assert images.min() < -1.0  # documented: kept, below -1


def test_cli_trains_end_to_end_on_the_real_gliomas(tmp_path):
    env = dict(os.environ, TRACIN_JAX_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "tracin_jax.cli", "train", "--data", str(GLI), "--config", "tiny",
         "--workdir", str(tmp_path / "run"), "--set", "train.epochs=1"],
        capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "negative voxels" in proc.stderr
    assert (tmp_path / "run" / "checkpoints" / "1").is_dir()
