import numpy as np
import pytest

from tracin_jax.data.labels import map_labels
from tracin_jax.data.preprocess import (case_examples, crop_inplane, downsample_images, downsample_labels,
                                        paper_normalise, paper_scale, parse_slices, select_slices,
                                        zscore_normalise, zscore_stats)
from tracin_jax.errors import InputError


def _volume(shape=(6, 8, 5)):
    """Voxel value encodes its index: 100 x + 10 y + z (+1 so nothing is 0)."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return (100 * x + 10 * y + z + 1).astype(np.float32)


def test_crop_indexes_axis0_then_axis1():
    v = _volume()
    c = crop_inplane(v, (1, 4, 2, 7))
    assert c.shape == (3, 5, 5)
    assert c[0, 0, 0] == v[1, 2, 0] and c[-1, -1, -1] == v[3, 6, 4]


def test_case_examples_geometry_and_ids_order():
    v = _volume()
    labels = np.zeros(v.shape, np.uint8)
    labels[2, 3, 1] = 3
    imgs, labs, z = case_examples([v, 2 * v], labels, ["a", "b"], (1, 5, 2, 6), "1:4", "paper", 1, "c")
    assert imgs.shape == (3, 4, 4, 2) and labs.shape == (3, 4, 4) and list(z) == [1, 2, 3]
    # example n, row i, column j is voxel (y0 + i, x0 + j, z[n])
    expect = 2 * v[1:5, 2:6, 2] / v.max() - 1
    np.testing.assert_allclose(imgs[1, :, :, 0], expect, rtol=1e-6)
    assert labs[0, 1, 1] == 3 and labs.sum() == 3


def test_paper_normalisation_exact_values():
    v = np.zeros((4, 4, 3), np.float32)
    v[1, 1, 1], v[2, 2, 2], v[3, 3, 0] = 50.0, 200.0, 100.0
    scale = paper_scale([v], ["f"])
    assert scale[0] == 200.0
    out = paper_normalise(v[..., None], scale)[..., 0]
    assert out.dtype == np.float32
    assert out[2, 2, 2] == 1.0 and out[0, 0, 0] == -1.0 and out[3, 3, 0] == 0.0 and out[1, 1, 1] == -0.5
    assert out.min() >= -1 and out.max() <= 1


def test_paper_max_is_over_the_whole_volume_not_the_crop():
    v = _volume()
    labels = np.zeros(v.shape, np.uint8)
    imgs, _, _ = case_examples([v], labels, ["f"], (0, 2, 0, 2), "0:1", "paper", 1, "c")
    assert imgs.max() < 0.1  # the volume max (at x=5, y=7) lies outside the crop
    np.testing.assert_allclose(imgs[0, 1, 1, 0], 2 * v[1, 1, 0] / v.max() - 1, rtol=1e-6)


def test_paper_max_not_positive_is_an_error():
    with pytest.raises(InputError, match="t1.nii.gz: image maximum is 0"):
        paper_scale([np.ones((2, 2, 2)), np.zeros((2, 2, 2))], ["flair.nii.gz", "t1.nii.gz"])


def test_zscore_inside_brain():
    rng = np.random.default_rng(0)
    a = np.zeros((10, 10, 6), np.float32)
    b = np.zeros_like(a)
    a[2:8, 2:8] = rng.uniform(100, 300, (6, 6, 6))
    b[2:8, 3:8] = rng.uniform(10, 20, (6, 5, 6))  # brain = a or b non-zero
    mean, std = zscore_stats([a, b], ["a", "b"])
    stacked = np.stack([a, b], -1)
    out = zscore_normalise(stacked, mean, std)
    brain = (a != 0) | (b != 0)
    np.testing.assert_allclose(out[brain].mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(out[brain].std(axis=0), 1, atol=1e-5)
    assert (out[~brain] == 0).all()
    # b is 0 on one brain column: normalised to -mean/std there, not to 0
    assert np.allclose(out[2:8, 2, :, 1], -mean[1] / std[1])
    with pytest.raises(InputError, match="no brain"):
        zscore_stats([np.zeros((2, 2, 2))], ["x"])
    with pytest.raises(InputError, match="b: constant inside the brain"):
        zscore_stats([a, (a != 0).astype(np.float32)], ["a", "b"])


def test_downsample_mean_pool_and_strided_labels():
    x = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)
    d = downsample_images(x, 2)
    assert d.shape == (2, 2, 3, 3)
    assert d[1, 1, 2, 0] == x[1, 2:4, 4:6, 0].mean()
    lab = np.arange(2 * 6 * 6, dtype=np.uint8).reshape(2, 6, 6)
    dl = downsample_labels(lab, 3)
    assert dl.shape == (2, 2, 2) and dl[0, 0, 0] == lab[0, 1, 1] and dl[1, 1, 1] == lab[1, 4, 4]
    assert downsample_images(x, 1) is x
    with pytest.raises(InputError, match="must divide"):
        downsample_images(x, 4)


def test_slices_selection():
    lab = np.zeros((4, 4, 10), np.uint8)
    lab[1, 1, 3] = 2
    lab[2, 2, 7] = 1
    assert list(select_slices(lab, "tumour", "c")) == [3, 7]
    assert list(select_slices(lab, "2:5", "c")) == [2, 3, 4]
    with pytest.raises(InputError, match="case c: slice range 5:11 lies outside the volume's 10 axial slices"):
        select_slices(lab, "5:11", "c")
    assert parse_slices("90:100") == (90, 100) and parse_slices("tumour") is None
    for bad in ("9-3", "5:5", "-1:3", "a:b"):
        with pytest.raises(InputError, match="data.slices"):
            parse_slices(bad)


def test_label_maps():
    seg = np.array([0, 1, 2, 4, 4, 0], np.int16)
    assert map_labels(seg, "brats2018", "c").tolist() == [0, 1, 2, 3, 3, 0]
    assert map_labels(np.array([0, 1, 2, 3]), "brats2023", "c").tolist() == [0, 1, 2, 3]
    # MSD: 1 oedema -> ED (2), 2 non-enhancing -> NCR/NET (1), 3 enhancing -> ET (3)
    assert map_labels(np.array([0, 1, 2, 3], np.uint8), "msd", "c").tolist() == [0, 2, 1, 3]
    assert map_labels(seg, "brats2018", "c").dtype == np.uint8
    with pytest.raises(InputError, match=r"case c7: unexpected label values \[-1, 300\] in s.nii"):
        map_labels(np.array([0, -1, 300]), "brats2018", "c7", "/x/s.nii")
    with pytest.raises(InputError, match=r"\[3\].*set data.layout"):
        map_labels(np.array([0, 3, 4]), "brats2018", "c")


def test_stored_window_maps_through_the_orientation():
    from tracin_jax.data.preprocess import stored_window_to_canonical

    lps = np.array([[0, -1], [1, -1], [2, 1]])
    ras = np.array([[0, 1], [1, 1], [2, 1]])
    shape = (240, 240, 155)
    assert stored_window_to_canonical((27, 219, 27, 219), "90:100", shape, lps, "f", "c") == ((21, 213, 21, 213), "90:100")
    assert stored_window_to_canonical((27, 219, 27, 219), "90:100", shape, ras, "f", "c") == ((27, 219, 27, 219), "90:100")
    lpi = np.array([[0, -1], [1, -1], [2, -1]])
    assert stored_window_to_canonical((0, 10, 5, 240), "0:5", shape, lpi, "f", "c") == ((230, 240, 0, 235), "150:155")
    assert stored_window_to_canonical((0, 10, 5, 240), "tumour", shape, lpi, "f", "c")[1] == "tumour"
    with pytest.raises(InputError, match=r"case c: slice range 150:160 lies outside"):
        stored_window_to_canonical((27, 219, 27, 219), "150:160", shape, lps, "f", "c")
    with pytest.raises(InputError, match=r"case c: crop \(27, 250, 27, 219\)"):
        stored_window_to_canonical((27, 250, 27, 219), "90:100", shape, lps, "f", "c")
    with pytest.raises(InputError, match=r"^f: stored axes are PLS, .*data.crop_space=canonical$"):
        stored_window_to_canonical((27, 219, 27, 219), "90:100", shape, np.array([[1, -1], [0, -1], [2, 1]]), "f", "c")
