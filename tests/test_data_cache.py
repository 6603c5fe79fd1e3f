import os
from dataclasses import replace

import nibabel
import numpy as np
import pytest

from tracin_jax.config import DataConfig
from tracin_jax.data import load_dataset
from tracin_jax.data import cache as cache_lib
from tracin_jax.data.testing import write_tree

CFG = DataConfig(crop=(2, 18, 2, 18), slices="4:8", test_fraction=0.5, split_seed=0)


def _no_decoding(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a NIfTI file was decoded")
    monkeypatch.setattr(nibabel, "load", refuse)


def test_second_load_reads_the_cache_without_decoding(tmp_path, monkeypatch):
    write_tree(tmp_path / "data", "brats2021", cases=2)
    first = load_dataset(tmp_path / "data", CFG, cache_dir=tmp_path / "cache", progress=False)
    assert not first.info["cache_hit"] and os.path.isfile(first.info["cache_file"])
    _no_decoding(monkeypatch)
    second = load_dataset(tmp_path / "data", CFG, cache_dir=tmp_path / "cache", progress=False)
    assert second.info["cache_hit"] and second.info["cache_file"] == first.info["cache_file"]
    np.testing.assert_array_equal(second.train.images, first.train.images)
    np.testing.assert_array_equal(second.test.labels, first.test.labels)
    assert second.train.ids == first.train.ids and second.test.cases == first.test.cases
    assert second.train.images.dtype == np.float32 and second.train.labels.dtype == np.uint8
    assert [p for p in os.listdir(tmp_path / "cache") if p.endswith(".tmp")] == []


def test_key_changes_with_config_and_files(tmp_path):
    truth = write_tree(tmp_path, "brats2021", cases=2)
    files = [f for t in truth.values() for f in t.files]
    key = cache_lib.cache_key(tmp_path, files, CFG)
    assert cache_lib.cache_key(tmp_path, files, CFG) == key
    assert cache_lib.cache_key(tmp_path, files, replace(CFG, slices="5:8")) != key
    assert cache_lib.cache_key(tmp_path, files[:-1], CFG) != key
    st = files[0].stat()
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    assert cache_lib.cache_key(tmp_path, files, CFG) != key


def test_empty_split_round_trips_through_the_cache(tmp_path, monkeypatch):
    write_tree(tmp_path / "data", "brats2021", cases=2)
    cfg = replace(CFG, slices="tumour", crop=(0, 4, 0, 4))  # no tumour in the corner: no examples
    first = load_dataset(tmp_path / "data", cfg, cache_dir=tmp_path / "cache", progress=False)
    _no_decoding(monkeypatch)
    second = load_dataset(tmp_path / "data", cfg, cache_dir=tmp_path / "cache", progress=False)
    assert second.info["cache_hit"]
    assert first.train.images.shape == second.train.images.shape == (0, 4, 4, 4)
    assert second.test.labels.shape == (0, 4, 4) and second.test.ids == []


def test_cache_of_an_older_format_is_not_served(tmp_path, monkeypatch):
    """Format 1 cropped the canonical array; its files must not be read for today's configs."""
    write_tree(tmp_path / "data", "brats2021", cases=2, lps=True)
    current = cache_lib.CACHE_VERSION
    monkeypatch.setattr(cache_lib, "CACHE_VERSION", 1)
    old = load_dataset(tmp_path / "data", CFG, cache_dir=tmp_path / "cache", progress=False)
    assert os.path.isfile(old.info["cache_file"])
    monkeypatch.setattr(cache_lib, "CACHE_VERSION", current)
    new = load_dataset(tmp_path / "data", CFG, cache_dir=tmp_path / "cache", progress=False)
    assert not new.info["cache_hit"] and new.info["cache_file"] != old.info["cache_file"]
    assert new.info["format_version"] == current and "class_slices" in new.info


def test_cached_load_repeats_the_negative_voxel_warning(tmp_path, monkeypatch):
    from tracin_jax.data.loader import NegativeVoxelsWarning
    from tracin_jax.data.testing import write_nifti

    truth = write_tree(tmp_path / "data", "brats2021", cases=2)
    path = truth["BraTS2021_00000"].files[0]
    data = np.asarray(nibabel.load(str(path)).dataobj).astype(np.int16)
    data[0, 0, 0] = -4
    write_nifti(path, data)
    with pytest.warns(NegativeVoxelsWarning, match="BraTS2021_00000: .*flair.nii.gz \\(min -4\\)"):
        load_dataset(tmp_path / "data", CFG, cache_dir=tmp_path / "cache", progress=False)
    _no_decoding(monkeypatch)
    with pytest.warns(NegativeVoxelsWarning, match="BraTS2021_00000: .*flair.nii.gz \\(min -4\\)"):
        again = load_dataset(tmp_path / "data", CFG, cache_dir=tmp_path / "cache", progress=False)
    assert again.info["cache_hit"]


def test_corrupt_cache_is_rebuilt(tmp_path):
    write_tree(tmp_path / "data", "brats2021", cases=2)
    first = load_dataset(tmp_path / "data", CFG, cache_dir=tmp_path / "cache", progress=False)
    path = first.info["cache_file"]
    with open(path, "r+b") as f:
        f.truncate(100)
    again = load_dataset(tmp_path / "data", CFG, cache_dir=tmp_path / "cache", progress=False)
    assert not again.info["cache_hit"]
    np.testing.assert_array_equal(again.train.images, first.train.images)
    assert load_dataset(tmp_path / "data", CFG, cache_dir=tmp_path / "cache", progress=False).info["cache_hit"]


def test_default_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACIN_JAX_CACHE", str(tmp_path / "envcache"))
    assert cache_lib.default_cache_dir() == tmp_path / "envcache"
    write_tree(tmp_path / "data", "brats2021", cases=2)
    ds = load_dataset(tmp_path / "data", CFG, progress=False)
    assert ds.info["cache_file"].startswith(str(tmp_path / "envcache"))
    monkeypatch.delenv("TRACIN_JAX_CACHE")
    assert str(cache_lib.default_cache_dir()).endswith(os.path.join(".cache", "tracin_jax"))


def test_unwritable_cache_folder_only_warns(tmp_path, caplog):
    write_tree(tmp_path / "data", "brats2021", cases=2)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    ds = load_dataset(tmp_path / "data", CFG, cache_dir=blocker / "sub", progress=False)
    assert ds.info["cache_file"] is None and len(ds.train) == 4
    assert "could not write the data cache" in caplog.text


def test_atomic_save_leaves_no_temp_file_on_failure(tmp_path):
    class Boom(Exception):
        pass

    class Bad:
        def __array__(self, *a, **k):
            raise Boom()

    with pytest.raises(Boom):
        cache_lib.save_atomic(tmp_path / "x.npz", {"a": Bad()})
    assert os.listdir(tmp_path) == []
    cache_lib.save_atomic(tmp_path / "x.npz", {"a": np.arange(3)})
    assert cache_lib.load_arrays(tmp_path / "x.npz")["a"].tolist() == [0, 1, 2]
