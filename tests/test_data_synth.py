import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from tracin_jax.config import DataConfig
from tracin_jax.data import load_dataset, write_synthetic_dataset
from tracin_jax.data import synth
from tracin_jax.errors import InputError

SMALL = (64, 64, 40)  # same field of view as 240 x 240 x 155, 3.75 mm voxels
CENTRAL = slice(23, 26)  # z 90..99 of 155 at this resolution


@pytest.fixture(scope="module")
def small_cases():
    return [synth.synth_case(np.random.default_rng([0, i]), SMALL) for i in range(8)]


def _ring(mask):
    return ndimage.binary_dilation(mask) & ~mask


def test_labels_are_nested_like_gliomas(small_cases):
    nec_ring, core_ring = [], []
    for _, seg in small_cases:
        assert set(np.unique(seg)) <= {0, 1, 2, 4} and seg.dtype == np.uint8
        core = (seg == 1) | (seg == 4)
        comps, n = ndimage.label(core)
        for k in range(1, n + 1):
            comp = comps == k
            if (seg[comp] == 4).mean() > 0.25:  # an enhancing tumour: its necrosis lies inside the rim
                nec_ring.append(seg[_ring(comp & (seg == 1))])
        core_ring.append(seg[_ring(core)])
    nec_ring, core_ring = np.concatenate(nec_ring), np.concatenate(core_ring)
    assert (nec_ring == 4).mean() > 0.8  # necrosis is surrounded by enhancing tumour
    assert (core_ring == 2).mean() > 0.8  # the core is wrapped in oedema
    assert sum((seg[:, :, CENTRAL] > 0).any() for _, seg in small_cases) >= 6


def test_contrasts(small_cases):
    for images, seg in small_cases:
        brain = images["t1"] > 0
        normal = brain & (seg == 0)
        assert (images["flair"][~brain] == 0).all() and (images["t2"][~brain] == 0).all()
        assert images["flair"][seg == 2].mean() > 1.3 * np.median(images["flair"][normal])
        if (seg == 4).any():
            assert images["t1ce"][seg == 4].mean() > 1.5 * images["t1ce"][seg == 2].mean()
        if (seg == 4).any() and (seg == 1).sum() > 20:
            assert images["t1ce"][seg == 1].mean() < images["t1ce"][seg == 4].mean()
            assert images["t2"][seg == 1].mean() > np.median(images["t2"][normal])
        # CSF: the brightest normal T2 voxels are dark on FLAIR
        t2 = images["t2"][normal]
        bright = t2 > np.quantile(t2, 0.98)
        assert images["flair"][normal][bright].mean() < 0.7 * np.median(images["flair"][normal])


def test_written_dataset_loads_as_brats2019_and_is_deterministic(tmp_path):
    ids = write_synthetic_dataset(tmp_path / "a", cases=3, seed=5, progress=False, shape=SMALL)
    assert ids == ["BraTS19_SYN_0001_1", "BraTS19_SYN_0002_1", "BraTS19_SYN_0003_1"]
    root = tmp_path / "a" / "MICCAI_BraTS_2019_Data_Training"
    files = sorted(p.relative_to(root) for p in root.rglob("*.nii.gz"))
    assert len(files) == 15 and str(files[0]) == "HGG/BraTS19_SYN_0001_1/BraTS19_SYN_0001_1_flair.nii.gz"
    assert json.loads((root / "synth.json").read_text())["seed"] == 5
    write_synthetic_dataset(tmp_path / "b", cases=3, seed=5, progress=False, shape=SMALL)
    other = tmp_path / "b" / "MICCAI_BraTS_2019_Data_Training"
    assert all((root / f).read_bytes() == (other / f).read_bytes() for f in files)
    write_synthetic_dataset(tmp_path / "c", cases=1, seed=6, progress=False, shape=SMALL)
    third = tmp_path / "c" / "MICCAI_BraTS_2019_Data_Training"
    assert (third / files[0]).read_bytes() != (root / files[0]).read_bytes()

    cfg = DataConfig(crop=(8, 56, 8, 56), slices="22:27", downsample=2, test_fraction=0.3, grades="HGG")
    ds = load_dataset(tmp_path / "a", cfg, cache_dir=False, progress=False)
    assert ds.info["layout"] == "brats2019"
    assert ds.train.images.shape == (10, 24, 24, 4) and ds.test.images.shape == (5, 24, 24, 4)
    assert ds.train.images.min() >= -1 and ds.train.images.max() <= 1
    assert set(np.unique(np.concatenate([ds.train.labels, ds.test.labels]))) <= {0, 1, 2, 3}


def test_existing_dataset_is_reused_or_refused(tmp_path, monkeypatch):
    write_synthetic_dataset(tmp_path, cases=1, seed=0, progress=False, shape=SMALL)
    monkeypatch.setattr(synth, "write_case", lambda *a, **k: pytest.fail("regenerated"))
    assert write_synthetic_dataset(tmp_path, cases=1, seed=0, progress=False, shape=SMALL) == ["BraTS19_SYN_0001_1"]
    with pytest.raises(InputError, match="already exists and is not a synthetic dataset with seed=1"):
        write_synthetic_dataset(tmp_path, cases=1, seed=1, progress=False, shape=SMALL)


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    real = synth.write_case

    def flaky(folder, case_id, seed, index, shape):
        if index == 1:
            raise KeyboardInterrupt
        real(folder, case_id, seed, index, shape)

    monkeypatch.setattr(synth, "write_case", flaky)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_dataset(tmp_path, cases=2, seed=0, progress=False, shape=SMALL, workers=1)
    assert list(tmp_path.iterdir()) == []


def test_default_size_header_is_like_real_brats(tmp_path):
    write_synthetic_dataset(tmp_path, cases=1, seed=0, progress=False)
    case = tmp_path / "MICCAI_BraTS_2019_Data_Training" / "HGG" / "BraTS19_SYN_0001_1"
    img = nib.load(str(case / "BraTS19_SYN_0001_1_t1ce.nii.gz"))
    seg = nib.load(str(case / "BraTS19_SYN_0001_1_seg.nii.gz"))
    assert img.shape == (240, 240, 155) and img.get_data_dtype() == np.int16
    assert seg.get_data_dtype() == np.uint8 and np.allclose(img.header.get_zooms(), 1.0)
    np.testing.assert_allclose(img.affine, [[-1, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]])
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    labels = np.asarray(seg.dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2, 4} and (labels[:, :, 90:100] > 0).any()


def test_necrosis_fills_much_of_the_tumour_core():
    """Glioblastoma-like cores: at the demo's 2 mm resolution the median case has at least a
    quarter of its core (NCR/NET + ET) necrotic, so a small model can learn NCR/NET."""
    fractions = []
    for i in range(8):
        _, seg = synth.synth_case(np.random.default_rng([0, i]), (120, 120, 78))
        ncr, et = (seg == 1).sum(), (seg == 4).sum()
        fractions.append(ncr / max(1, ncr + et))
    assert np.median(fractions) > 0.25
