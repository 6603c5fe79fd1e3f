import gzip
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tracin_jax.config import DataConfig
from tracin_jax.data import Examples, load_dataset
from tracin_jax.data.loader import NegativeVoxelsWarning
from tracin_jax.data.testing import LPS_AFFINE, write_nifti, write_tree
from tracin_jax.errors import InputError

CFG = DataConfig(crop=(2, 18, 2, 18), slices="4:8", test_fraction=0.3, split_seed=0)


def load(root, cfg=CFG, **kw):
    return load_dataset(root, cfg, cache_dir=False, progress=False, **kw)


def expected(truth, cid, cfg=CFG):
    """Ground-truth (classes [n, H, W], images [n, H, W, 4] before normalisation) of one case."""
    y0, y1, x0, x1 = cfg.crop
    a, b = (int(v) for v in cfg.slices.split(":"))
    t = truth[cid]
    classes = np.moveaxis(t.classes[y0:y1, x0:x1, a:b], 2, 0)
    images = np.stack([np.moveaxis(t.images[m][y0:y1, x0:x1, a:b], 2, 0) for m in ("flair", "t1", "t1ce", "t2")], -1)
    return classes, images


def all_examples(ds):
    train = set(ds.info["train_cases"])
    return {cid: (ds.train if cid in train else ds.test) for cid in ds.info["train_cases"] + ds.info["test_cases"]}


@pytest.mark.parametrize("layout, ext", [("brats2019", ".nii.gz"), ("brats2020", ".nii"), ("brats2021", ".nii.gz"),
                                         ("brats2023", ".nii"), ("msd", ".nii.gz")])
def test_each_layout_loads_with_exact_labels(tmp_path, layout, ext):
    truth = write_tree(tmp_path, layout, cases=3, ext=ext)
    ds = load(tmp_path)
    assert ds.info["layout"] == layout
    assert ds.train.images.shape == (8, 16, 16, 4) and ds.test.images.shape == (4, 16, 16, 4)
    assert ds.train.images.dtype == np.float32 and ds.train.labels.dtype == np.uint8
    for cid, ex in all_examples(ds).items():
        rows = [i for i, c in enumerate(ex.cases) if c == cid]
        classes, images = expected(truth, cid)
        np.testing.assert_array_equal(ex.labels[rows], classes)
        # paper normalisation is affine per channel, so the channel order must match exactly
        for c in range(4):
            corr = np.corrcoef(ex.images[rows][..., c].ravel(), images[..., c].ravel())[0, 1]
            assert corr > 0.999
    assert set(np.unique(ds.train.labels)) <= {0, 1, 2, 3} and 3 in ds.train.labels


def test_msd_label_order_is_remapped(tmp_path):
    truth = write_tree(tmp_path, "msd", cases=2)
    raw = np.asarray(nib.load(str(tmp_path / "Task01_BrainTumour/labelsTr/BRATS_001.nii.gz")).dataobj)
    # on disk: 1 = oedema, 2 = non-enhancing; project: 1 = NCR/NET, 2 = ED
    assert np.array_equal(raw == 1, truth["BRATS_001"].classes == 2)
    ds = load(tmp_path, replace(CFG, test_fraction=0.5))
    ex = all_examples(ds)["BRATS_001"]
    rows = [i for i, c in enumerate(ex.cases) if c == "BRATS_001"]
    np.testing.assert_array_equal(ex.labels[rows], expected(truth, "BRATS_001")[0])


def test_ids_cases_split_and_info(tmp_path):
    write_tree(tmp_path, "brats2020", cases=3, nonstandard_seg=True)
    ds = load(tmp_path)
    assert ds.train.ids[:4] == [f"{ds.train.cases[0]}/z{z}" for z in range(4, 8)]
    assert not set(ds.train.cases) & set(ds.test.cases)
    assert sorted(set(ds.train.cases)) == ds.info["train_cases"] and len(ds.info["test_cases"]) == 1
    assert ds.info["seg_nonstandard"] == {
        "BraTS20_Training_003": "MICCAI_BraTS2020_TrainingData/BraTS20_Training_003/W39_1998.09.19_Segm.nii"}
    import json
    json.dumps(ds.info)


def test_grades_and_max_cases(tmp_path):
    write_tree(tmp_path, "brats2019", cases=5)  # HGG: 1, 3, 5; LGG: 2, 4
    ds = load(tmp_path, replace(CFG, grades="HGG"))
    assert sorted(ds.info["train_cases"] + ds.info["test_cases"]) == [
        "BraTS19_TST_0001_1", "BraTS19_TST_0003_1", "BraTS19_TST_0005_1"]
    ds = load(tmp_path, replace(CFG, max_cases=2, test_fraction=0.5))
    assert sorted(ds.info["train_cases"] + ds.info["test_cases"]) == ["BraTS19_TST_0001_1", "BraTS19_TST_0002_1"]
    assert ds.info["n_cases_found"] == 5 and ds.info["n_cases"] == 2


def test_canonical_orientation_before_cropping(tmp_path):
    """crop_space=canonical: LPS-stored files (like real BraTS) give the same arrays as RAS-stored ones."""
    truth = write_tree(tmp_path / "lps", "brats2021", cases=2, lps=True, seed=3)
    write_tree(tmp_path / "ras", "brats2021", cases=2, lps=False, seed=3)
    cfg = replace(DataConfig(crop=(0, 10, 3, 21), slices="0:12", test_fraction=0.5, crop_space="canonical"),
                  split_seed=0)
    a, b = load(tmp_path / "lps", cfg), load(tmp_path / "ras", cfg)
    np.testing.assert_array_equal(a.train.images, b.train.images)
    np.testing.assert_array_equal(a.train.labels, b.train.labels)
    cid = a.train.cases[0]
    # crop=(y0, y1, x0, x1) indexes canonical axes 0 and 1: volume[0:10, 3:21, z]
    np.testing.assert_array_equal(a.train.labels[:12], np.moveaxis(truth[cid].classes[0:10, 3:21, :], 2, 0))


@pytest.mark.parametrize("lps", [True, False])
def test_stored_crop_selects_the_stored_window_in_canonical_orientation(tmp_path, lps):
    """crop_space=stored (default): the pixels of stored[y0:y1, x0:x1, z], reoriented to RAS."""
    truth = write_tree(tmp_path, "brats2021", cases=2, lps=lps, seed=3)
    cfg = DataConfig(crop=(0, 10, 3, 21), slices="0:12", test_fraction=0.5, split_seed=0)
    assert cfg.crop_space == "stored"
    ds = load(tmp_path, cfg)
    cid = ds.train.cases[0]
    classes = truth[cid].classes  # canonical RAS [X, Y, Z]
    stored = classes[::-1, ::-1] if lps else classes  # as on disk
    window = stored[0:10, 3:21, :]
    want = window[::-1, ::-1] if lps else window  # back to RAS
    np.testing.assert_array_equal(ds.train.labels, np.moveaxis(want, 2, 0))
    # for LPS the canonical window is [24-10:24-0, 24-21:24-3]
    if lps:
        np.testing.assert_array_equal(ds.train.labels, np.moveaxis(classes[14:24, 3:21, :], 2, 0))


def test_stored_slices_follow_a_flipped_axial_axis(tmp_path):
    """A file stored inferior-first (axis 2 flipped) selects stored slices a:b, ids in canonical z."""
    rng = np.random.default_rng(0)
    classes = np.zeros((8, 8, 10), np.uint8)
    classes[2:6, 2:6, :] = 2
    images = rng.integers(1, 100, (8, 8, 10)).astype(np.int16)
    affine = np.diag([1.0, 1.0, -1.0, 1.0])  # R, A, I
    for cid in ("BraTS2021_00000", "BraTS2021_00001"):
        folder = tmp_path / cid
        for m in ("flair", "t1", "t1ce", "t2"):
            write_nifti(folder / f"{cid}_{m}.nii.gz", images, affine)
        write_nifti(folder / f"{cid}_seg.nii.gz", classes, affine)
    ds = load(tmp_path, DataConfig(crop=(0, 8, 0, 8), slices="0:3", test_fraction=0.5, split_seed=0))
    assert [i.split("/z")[1] for i in ds.train.ids] == ["7", "8", "9"]  # stored 0..2 = canonical 9..7
    top = images[:, :, 0].astype(np.float32) * (2.0 / images.max()) - 1.0  # stored slice 0
    np.testing.assert_allclose(ds.train.images[2, :, :, 0], top, atol=1e-6)


def test_stored_crop_rejects_permuted_axes_with_a_hint(tmp_path):
    truth = write_tree(tmp_path, "brats2021", cases=2)
    swap = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)  # stored A, R, S
    for path in truth["BraTS2021_00001"].files:
        img = nib.load(str(path))
        write_nifti(path, np.asarray(img.dataobj), swap)
    with pytest.raises(InputError, match=r"BraTS2021_00001_flair.nii.gz: stored axes are ARS.*data.crop_space=canonical"):
        load(tmp_path, CFG)
    ds = load(tmp_path, replace(CFG, crop_space="canonical"))
    assert ds.info["n_cases"] == 2


def test_class_slices_count_examples_per_class_and_split(tmp_path):
    write_tree(tmp_path, "brats2021", cases=3)
    ds = load(tmp_path, replace(CFG, slices="0:12"))
    for split, ex in (("train", ds.train), ("test", ds.test)):
        counts = ds.info["class_slices"][split]
        assert list(counts) == ["NCR/NET", "ED", "ET"]
        for c, name in ((1, "NCR/NET"), (2, "ED"), (3, "ET")):
            assert counts[name] == sum(bool((lab == c).any()) for lab in ex.labels)
    assert ds.info["class_slices"]["train"]["ED"] > 0
    assert len(ds.train) > ds.info["class_slices"]["train"]["ED"]  # slices 0..3 hold no tumour


def test_negative_voxels_warn_once_per_case_naming_file_and_minimum(tmp_path):
    truth = write_tree(tmp_path, "brats2021", cases=2)
    path = truth["BraTS2021_00001"].files[1]  # t1
    data = np.asarray(nib.load(str(path)).dataobj).astype(np.int16)
    data[0, 0, 0], data[1, 0, 0] = -37, -5
    write_nifti(path, data)
    with pytest.warns(UserWarning) as caught:
        ds = load(tmp_path, CFG)
    lines = [str(w.message) for w in caught if "negative voxels" in str(w.message)]
    assert lines == ["case BraTS2021_00001: negative voxels in BraTS2021_00001_t1.nii.gz (min -37); "
                     "paper normalisation 2x/max(x)-1 maps them below -1 (kept as they are)"]
    assert ds.info["negative_minima"] == {"BraTS2021_00001": {"BraTS2021_00001_t1.nii.gz": -37.0}}
    # the values really are below -1 where they fall inside the examples
    with pytest.warns(NegativeVoxelsWarning):
        ds = load(tmp_path, replace(CFG, crop=(0, 16, 0, 16), slices="0:1", crop_space="canonical"))
    ex = ds.train if "BraTS2021_00001" in ds.info["train_cases"] else ds.test
    i = ex.cases.index("BraTS2021_00001")
    top = float(data.max())
    assert ex.images[i, 0, 0, 1] == pytest.approx(2 * -37 / top - 1) and ex.images[i, 0, 0, 1] < -1


def test_crop_space_config_values():
    from tracin_jax.config import apply_overrides, config_from_dict, get_config

    assert get_config("paper").data.crop_space == "stored"
    c = apply_overrides(get_config("tiny"), ["data.crop_space=canonical"])
    assert c.data.crop_space == "canonical" and config_from_dict(c.to_dict()) == c
    with pytest.raises(InputError, match="data.crop_space='raw' is not one of stored, canonical"):
        apply_overrides(get_config("tiny"), ["data.crop_space=raw"])
    with pytest.raises(InputError, match="data.crop_space='raw'"):
        load(Path("."), replace(CFG, crop_space="raw"))
    # a run config written before crop_space existed cropped the canonical array
    old = get_config("paper").to_dict()
    del old["data"]["crop_space"]
    assert config_from_dict(old).data.crop_space == "canonical"


def test_tumour_slices_and_empty_examples_keep_ranks(tmp_path):
    write_tree(tmp_path, "brats2021", cases=2)
    ds = load(tmp_path, replace(CFG, slices="tumour", test_fraction=0.5))
    zs = sorted({int(i.split("/z")[1]) for i in ds.train.ids})
    assert zs == [4, 5, 6, 7] and (ds.train.labels > 0).any(axis=(1, 2)).all()
    # a case without tumour gives no example; its split is empty but well-shaped
    seg = tmp_path / "BraTS2021_00001" / "BraTS2021_00001_seg.nii.gz"
    write_nifti(seg, np.zeros((24, 24, 12), np.uint8))
    ds = load(tmp_path, replace(CFG, slices="tumour", test_fraction=0.5, downsample=2))
    empty = ds.test if "BraTS2021_00001" in ds.info["test_cases"] else ds.train
    assert empty.images.shape == (0, 8, 8, 4) and empty.labels.shape == (0, 8, 8)
    assert ds.info["cases_without_examples"] == ["BraTS2021_00001"]
    assert Examples.empty(4, 5, 2).images.shape == (0, 4, 5, 2)


def test_modality_subset_and_order(tmp_path):
    truth = write_tree(tmp_path, "brats2021", cases=2)
    cfg = replace(CFG, modalities=("t1c", "flair"), normalise="zscore", test_fraction=0.5)
    ds = load(tmp_path, cfg)
    assert ds.train.images.shape[-1] == 2
    cid = ds.train.cases[0]
    t1ce = truth[cid].images["t1ce"][2:18, 2:18, 4]
    corr = np.corrcoef(ds.train.images[0, ..., 0][t1ce > 0], t1ce[t1ce > 0])[0, 1]
    assert corr > 0.999


# ------------------------------------------------------------------------------------------------
# Labels


@pytest.mark.parametrize("layout, value, needle", [
    ("brats2019", 3, r"unexpected label values \[3\].*BraTS 2018-2021.*set data.layout"),
    ("brats2021", 5, r"unexpected label values \[5\]"),
    ("brats2023", 4, r"unexpected label values \[4\].*BraTS 2023"),
    ("msd", 4, r"unexpected label values \[4\].*MSD"),
])
def test_unexpected_label_values(tmp_path, layout, value, needle):
    truth = write_tree(tmp_path, layout, cases=2)
    cid = sorted(truth)[1]
    seg = truth[cid].files[-1]
    data = np.asarray(nib.load(str(seg)).dataobj).copy()
    data[0, 0, 0] = value
    write_nifti(seg, data)
    with pytest.raises(InputError, match=needle) as err:
        load(tmp_path, replace(CFG, test_fraction=0.5))
    assert f"case {cid}" in str(err.value) and "\n" not in str(err.value)


def test_float_labels_are_rounded_and_non_integers_rejected(tmp_path):
    truth = write_tree(tmp_path, "brats2021", cases=2)
    seg = truth["BraTS2021_00000"].files[-1]
    data = np.asarray(nib.load(str(seg)).dataobj).astype(np.float32)
    write_nifti(seg, data + 1e-5)
    load(tmp_path, replace(CFG, test_fraction=0.5))
    data[3, 3, 3] = 1.5
    write_nifti(seg, data)
    with pytest.raises(InputError, match="label values are not integers"):
        load(tmp_path, replace(CFG, test_fraction=0.5))


# ------------------------------------------------------------------------------------------------
# Bad inputs: every message is one line and names the file or folder


def _case(tmp_path):
    truth = write_tree(tmp_path, "brats2021", cases=2)
    return truth["BraTS2021_00001"].files  # flair, t1, t1ce, t2, seg


def _corrupt(path):
    path.write_bytes(b"this is not a NIfTI file at all" * 20)


def _truncate(path):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _not_gzip(path):
    path.write_bytes(gzip.compress(b"hello world" * 100))


def _nan(path):
    data = np.asarray(nib.load(str(path)).dataobj).astype(np.float32)
    data[5, 5, 5] = np.nan
    write_nifti(path, data)


def _inf(path):
    data = np.asarray(nib.load(str(path)).dataobj).astype(np.float32)
    data[5, 5, 5] = np.inf
    write_nifti(path, data)


def _shape(path):
    write_nifti(path, np.ones((24, 24, 10), np.float32))


def _affine(path):
    img = nib.load(str(path))
    affine = img.affine.copy()
    affine[0, 3] += 0.5
    write_nifti(path, np.asarray(img.dataobj), affine)


def _four_d(path):
    write_nifti(path, np.ones((24, 24, 12, 2), np.float32))


@pytest.mark.parametrize("index, damage, needle", [
    (1, _corrupt, "not a readable NIfTI file"),
    (2, _truncate, "not a readable NIfTI file"),
    (0, _not_gzip, "not a readable NIfTI file"),
    (4, _truncate, "not a readable NIfTI file"),
    (3, _nan, "NaN or infinite"),
    (0, _inf, "NaN or infinite"),
    (2, _shape, "shape"),
    (4, _shape, "shape"),
    (3, _affine, "affine differs"),
    (4, _affine, "affine differs"),
    (1, _four_d, "expected a 3D volume"),
])
def test_bad_files_are_named(tmp_path, index, damage, needle):
    files = _case(tmp_path)
    damage(files[index])
    with pytest.raises(InputError, match=needle) as err:
        load(tmp_path, replace(CFG, test_fraction=0.5))
    msg = str(err.value)
    assert str(files[index]) in msg and "\n" not in msg


def test_truncated_uncompressed_nii_is_named(tmp_path):
    truth = write_tree(tmp_path, "brats2021", cases=2, ext=".nii")
    path = truth["BraTS2021_00000"].files[2]
    _truncate(path)
    with pytest.raises(InputError, match="not a readable NIfTI file") as err:
        load(tmp_path, replace(CFG, test_fraction=0.5))
    assert str(path) in str(err.value)


def test_progress_bar_goes_to_stderr(tmp_path, capsys):
    write_tree(tmp_path, "brats2021", cases=2)
    load_dataset(tmp_path, replace(CFG, test_fraction=0.5), cache_dir=False, progress=True)
    assert "decoding BraTS cases" in capsys.readouterr().err


@pytest.mark.parametrize("index, what", [(2, "t1ce"), (4, "seg")])
def test_missing_modality_or_seg(tmp_path, index, what):
    files = _case(tmp_path)
    files[index].unlink()
    with pytest.raises(InputError, match=f"has no {what} file") as err:
        load(tmp_path, replace(CFG, test_fraction=0.5))
    assert str(files[index].parent) in str(err.value)


def test_missing_msd_label(tmp_path):
    truth = write_tree(tmp_path, "msd", cases=2)
    truth["BRATS_002"].files[1].unlink()
    with pytest.raises(InputError, match="case BRATS_002: no label file in .*labelsTr"):
        load(tmp_path, replace(CFG, test_fraction=0.5))


def test_wrong_msd_channel_count(tmp_path):
    truth = write_tree(tmp_path, "msd", cases=2)
    write_nifti(truth["BRATS_001"].files[0], np.ones((24, 24, 12, 3), np.float32))
    with pytest.raises(InputError, match="expected a 4D volume with 4 channels"):
        load(tmp_path, replace(CFG, test_fraction=0.5))


@pytest.mark.parametrize("cfg, needle", [
    (replace(CFG, slices="8:14"), r"case BraTS2021_0000\d: slice range 8:14 lies outside the volume's 12 axial slices"),
    (replace(CFG, crop=(0, 30, 0, 16)), r"crop \(0, 30, 0, 16\).*does not fit its in-plane size 24x24"),
    (replace(CFG, downsample=3), "must divide the crop"),
    (replace(CFG, normalise="minmax"), "data.normalise"),
    (replace(CFG, modalities=("flair", "dwi")), "unknown modality 'dwi'"),
    (replace(CFG, max_cases=1), r"1 case\(s\) cannot be split"),
])
def test_config_problems(tmp_path, cfg, needle):
    write_tree(tmp_path, "brats2021", cases=2)
    with pytest.raises(InputError, match=needle):
        load(tmp_path, cfg)


def test_max_below_zero_for_paper_normalisation(tmp_path):
    files = _case(tmp_path)
    write_nifti(files[1], np.zeros((24, 24, 12), np.float32))
    with pytest.raises(InputError, match="image maximum is 0") as err:
        load(tmp_path, replace(CFG, test_fraction=0.5))
    assert str(files[1]) in str(err.value)


def test_lps_affine_constant():
    assert np.allclose(LPS_AFFINE[:3, :3], np.diag([-1, -1, 1]))
