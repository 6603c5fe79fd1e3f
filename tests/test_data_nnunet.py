"""Any mutually exclusive segmentation task: nnU-Net v2 raw and MSD datasets read from their
dataset.json (channels, classes, label values), the automatic data settings of a non-BraTS task,
`tracin-jax train` end to end on the synthetic nnU-Net task, and every bad input refused in one
line with nothing written."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tracin_jax.config import DataConfig
from tracin_jax.data import load_dataset, resolve_data_config, write_synthetic_nnunet
from tracin_jax.data.labels import map_task_labels
from tracin_jax.data.synth import NNUNET_DIR
from tracin_jax.data.testing import write_nifti
from tracin_jax.errors import InputError
from tracin_jax.task import Task

SHAPE = (24, 24, 16)  # the synthetic task at test size (10 x 10 x 9.7 mm voxels)
CLASSES = ["CSF", "grey matter", "white matter", "lesion"]


@pytest.fixture(scope="module")
def nnunet(tmp_path_factory) -> Path:
    """The synthetic nnU-Net task, 4 cases of 24 x 24 x 16 (read-only: copy it to change it)."""
    out = tmp_path_factory.mktemp("nnunet")
    write_synthetic_nnunet(out, cases=4, seed=0, progress=False, shape=SHAPE)
    return out / NNUNET_DIR


def _copy(nnunet: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(nnunet, tmp_path / NNUNET_DIR))


def _load(root, cfg=DataConfig(), **kw):
    return load_dataset(root, cfg, cache_dir=False, progress=False, **kw)


def _main(capsys, *args) -> tuple[int, str, str]:
    from tracin_jax.cli import main

    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


# ----------------------------------------------------------------------------------------------
# End to end


def test_train_end_to_end_records_the_task(nnunet, tmp_path, capsys):
    work = tmp_path / "run"
    args = ["train", "--data", nnunet, "--workdir", work, "--config", "tiny",
            "--set", "data.downsample=1", "--set", "train.epochs=1", "--set", "train.batch_size=8"]
    rc, out, err = _main(capsys, *args)
    assert rc == 0, err[-2000:]
    task_line = ("task: Dataset900_SynthBrain (nnunet, 2D): 2 channels [T1, T2], 4 classes [CSF (1), "
                 "grey matter (2), white matter (3), lesion (4)]")
    assert task_line in out.splitlines()
    assert any(l.startswith("Dataset900_SynthBrain is not BraTS: automatic data settings") and
               "window 24x24" in l for l in out.splitlines())
    run = json.loads((work / "run.json").read_text())
    assert run["task"] == {"name": NNUNET_DIR, "format": "nnunet", "channels": ["T1", "T2"],
                           "classes": CLASSES, "values": [1, 2, 3, 4], "dims": 2}
    assert run["dataset"]["task"] == run["task"] and run["dataset"]["layout"] == "nnunet"
    config = json.loads((work / "config.json").read_text())
    assert config["data"]["auto"] is False and config["data"]["modalities"] == ["T1", "T2"]
    assert config["data"]["crop"] == [0, 24, 0, 24] and config["data"]["crop_space"] == "centre"
    assert config["data"]["slices"] == "foreground" and config["model"]["num_classes"] == 5
    metrics = json.loads((work / "metrics.jsonl").read_text().splitlines()[-1])
    assert list(metrics["test_dice"]) == CLASSES
    import tracin_jax

    loaded = tracin_jax.load_run(work)
    assert loaded.task.classes == tuple(CLASSES) and loaded.image_shape == (24, 24, 2)
    assert loaded.train.images.shape[1:] == (24, 24, 2)
    # The same command again resumes: the recorded (automatic) config matches.
    rc, out, err = _main(capsys, *args)
    assert rc == 0 and "all 1 epochs already trained" in out, err[-2000:]


# ----------------------------------------------------------------------------------------------
# Reading nnU-Net and MSD tasks


def test_nnunet_examples_are_the_files_slices(nnunet):
    ds = _load(nnunet)
    assert ds.info["task"]["classes"] == CLASSES and ds.info["modalities"] == ["T1", "T2"]
    assert ds.info["data_auto"]["crop"] == [0, 24, 0, 24] and ds.info["split"] == "random"
    for split in (ds.train, ds.test):
        for k, (eid, case) in enumerate(zip(split.ids, split.cases)):
            z = int(eid.split("/z")[1])
            seg = np.asarray(nib.load(str(nnunet / "labelsTr" / f"{case}.nii.gz")).dataobj)
            assert seg[:, :, z].any()  # slices=foreground
            np.testing.assert_array_equal(split.labels[k], seg[:, :, z])  # values 1..4 = classes
    # every foreground slice of each case is an example
    n = sum(int(np.asarray(nib.load(str(p)).dataobj).any(axis=(0, 1)).sum())
            for p in sorted((nnunet / "labelsTr").iterdir()))
    assert len(ds.train) + len(ds.test) == n


def test_automatic_window_is_a_multiple_and_recorded(nnunet):
    cfg, task, auto = resolve_data_config(nnunet, DataConfig(), size_multiple=16)
    assert cfg.crop == (0, 32, 0, 32) and not cfg.auto and auto["slices"] == "foreground"
    assert task.channels == ("T1", "T2") and task.classes == tuple(CLASSES)
    again, _, auto2 = resolve_data_config(nnunet, cfg)  # recorded settings are kept as they are
    assert again == cfg and auto2 == {}
    ds = _load(nnunet, cfg)
    assert ds.train.images.shape[1:] == (32, 32, 2)
    # padded with background around the centred 24 x 24 case
    assert not ds.train.labels[:, :4].any() and not ds.train.labels[:, 28:].any()


def test_channels_can_be_chosen_by_name_when_auto_is_off(nnunet):
    full = _load(nnunet)
    cfg = DataConfig(**{**full.info["config"], "modalities": ("t2",), "crop": (0, 24, 0, 24)})
    one = _load(nnunet, cfg)
    assert one.info["task"]["channels"] == ["T2"]
    np.testing.assert_array_equal(one.train.images[..., 0], full.train.images[..., 1])
    with pytest.raises(InputError, match=r"data.modalities has 'flair', not a channel of "
                                         r"Dataset900_SynthBrain \(T1, T2\)"):
        _load(nnunet, DataConfig(auto=False))


def test_task_label_mapping_matches_a_loop():
    task = Task(name="x", format="nnunet", channels=("a",), classes=("p", "q", "r"), values=(7, 2, 300))
    rng = np.random.default_rng(0)
    for values in ([0, 7, 2, 300], [0, 7, 2]):
        seg = rng.choice(values, size=(5, 6, 3))
        want = np.vectorize(lambda v: {0: 0, 7: 1, 2: 2, 300: 3}[int(v)])(seg)
        np.testing.assert_array_equal(map_task_labels(seg, task, "c"), want)
    big = np.array([0, 7, 70000])  # beyond the lookup table: the np.unique path
    with pytest.raises(InputError, match=r"f.nii.gz: label values \[70000\] are not declared"):
        map_task_labels(big, task, "c", "f.nii.gz")
    np.testing.assert_array_equal(map_task_labels(np.array([-0, 300, 7]), task, "c"), [0, 3, 1])


def _msd_task(root: Path, shapes, channels=("T2", "ADC"), labels=None) -> dict:
    """An MSD-format task (not Task01): 4D images (3D for one channel), its own labels.

    Returns case id -> (images f32[X, Y, Z, M], raw labels u8[X, Y, Z])."""
    labels = labels or {"0": "background", "2": "TZ", "1": "PZ"}  # order: TZ is class 1
    rng = np.random.default_rng(1)
    truth = {}
    for i, shape in enumerate(shapes):
        cid = f"prostate_{i:02d}"
        img = rng.uniform(1, 100, (*shape, len(channels))).astype(np.float32)
        img[..., 1:] += 1000.0  # the channels differ
        seg = np.zeros(shape, np.uint8)
        seg[2:6, 3:7, 1:3] = 1
        seg[6:9, 3:7, 2:4] = 2
        write_nifti(root / "imagesTr" / f"{cid}.nii.gz", img if len(channels) > 1 else img[..., 0])
        write_nifti(root / "labelsTr" / f"{cid}.nii.gz", seg)
        truth[cid] = (img, seg)
    (root / "dataset.json").write_text(json.dumps({
        "name": "Prostate", "modality": dict(enumerate(channels)), "labels": labels,
        "numTraining": len(shapes)}))
    return truth


def test_msd_task_with_own_channels_classes_and_sizes(tmp_path):
    root = tmp_path / "Task05_Prostate"
    truth = _msd_task(root, [(12, 10, 5), (10, 14, 5), (11, 13, 5)])  # odd gaps: 1 after
    ds = _load(root, DataConfig(test_fraction=0.34))
    assert ds.info["layout"] == "msd" and ds.info["label_convention"] == "dataset.json"
    assert ds.info["task"] == {"name": "Task05_Prostate", "format": "msd", "channels": ["T2", "ADC"],
                               "classes": ["TZ", "PZ"], "values": [2, 1], "dims": 2}
    assert ds.train.images.shape[1:] == (12, 14, 2)  # the largest extent of each axis
    for split in (ds.train, ds.test):
        for k, (eid, case) in enumerate(zip(split.ids, split.cases)):
            img, seg = truth[case]
            z = int(eid.split("/z")[1])
            assert seg[:, :, z].any()
            # naive centring: pad each axis to the window, half before (rounded down)
            padded = np.zeros((12, 14), np.uint8)
            a, b = (12 - seg.shape[0]) // 2, (14 - seg.shape[1]) // 2
            padded[a:a + seg.shape[0], b:b + seg.shape[1]] = np.array([0, 2, 1])[seg[:, :, z]]
            np.testing.assert_array_equal(split.labels[k], padded)
            # z-score inside the non-zero voxels, channel order kept
            mean, std = img.mean(axis=(0, 1, 2)), img.std(axis=(0, 1, 2))
            want = (img[:, :, z] - mean) / std
            np.testing.assert_allclose(split.images[k, a:a + seg.shape[0], b:b + seg.shape[1]], want,
                                       rtol=1e-4, atol=1e-4)
            assert not split.images[k, :a].any()


def test_one_channel_msd_task_with_3d_images(tmp_path):
    root = tmp_path / "Task09_Spleen"
    _msd_task(root, [(8, 8, 4)] * 3, channels=("CT",), labels={"0": "background", "1": "spleen", "2": "kidney"})
    ds = _load(root, DataConfig(test_fraction=0.34))
    assert ds.info["task"]["channels"] == ["CT"] and ds.train.images.shape[1:] == (8, 8, 1)


def test_labelled_imagests_cases_are_the_test_split(nnunet, tmp_path):
    root = _copy(nnunet, tmp_path)
    (root / "imagesTs").mkdir()
    (root / "labelsTs").mkdir()
    for c in ("0000", "0001"):
        shutil.move(root / "imagesTr" / f"SYN_004_{c}.nii.gz", root / "imagesTs" / f"SYN_004_{c}.nii.gz")
        shutil.copy(root / "imagesTs" / f"SYN_004_{c}.nii.gz", root / "imagesTs" / f"SYN_009_{c}.nii.gz")
    shutil.move(root / "labelsTr" / "SYN_004.nii.gz", root / "labelsTs" / "SYN_004.nii.gz")
    ds = _load(root)  # SYN_009 has no label: not used
    assert ds.info["split"] == "imagesTs" and ds.info["test_cases"] == ["SYN_004"]
    assert ds.info["train_cases"] == ["SYN_001", "SYN_002", "SYN_003"]


def test_synth_cli_writes_the_nnunet_task(tmp_path, capsys):
    rc, out, err = _main(capsys, "synth", "--out", tmp_path, "--format", "nnunet", "--cases", "2",
                         "--shape", "16")
    assert rc == 0, err
    root = tmp_path / NNUNET_DIR
    desc = json.loads((root / "dataset.json").read_text())
    assert desc["channel_names"] == {"0": "T1", "1": "T2"} and desc["file_ending"] == ".nii.gz"
    assert desc["labels"] == {"background": 0, **{n: i for i, n in enumerate(CLASSES, 1)}}
    assert sorted(p.name for p in (root / "imagesTr").iterdir()) == [
        "SYN_001_0000.nii.gz", "SYN_001_0001.nii.gz", "SYN_002_0000.nii.gz", "SYN_002_0001.nii.gz"]
    assert nib.load(str(root / "labelsTr" / "SYN_001.nii.gz")).shape == (16, 16, 16)
    rc, _, err = _main(capsys, "synth", "--out", tmp_path / "x", "--format", "png")
    assert rc == 2 and "--format 'png'" in err and not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------
# Bad input: one line naming the file or value, exit 2, nothing written


def _json(root: Path, **changes) -> None:
    desc = json.loads((root / "dataset.json").read_text())
    desc.update(changes)
    (root / "dataset.json").write_text(json.dumps(desc))


def _relabel(root: Path, value: int) -> None:
    path = root / "labelsTr" / "SYN_002.nii.gz"
    img = nib.load(str(path))
    seg = np.asarray(img.dataobj).copy()
    seg[5, 5, 5] = value
    write_nifti(path, seg, img.affine)


def _reshape(root: Path, affine_only: bool) -> None:
    path = root / "imagesTr" / "SYN_003_0001.nii.gz"
    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    if affine_only:
        affine = img.affine.copy()
        affine[0, 3] += 5.0
        write_nifti(path, data, affine)
    else:
        write_nifti(path, data[:-2], img.affine)


BAD = {
    "dataset.json missing": (lambda r: (r / "dataset.json").unlink(), "dataset.json: missing"),
    "dataset.json not JSON": (lambda r: (r / "dataset.json").write_text("{'labels': 1"),
                              "dataset.json: not valid JSON"),
    "channel file missing": (lambda r: (r / "imagesTr" / "SYN_002_0001.nii.gz").unlink(),
                             r"case SYN_002: channel 0001 \(T2\) file missing: .*SYN_002_0001.nii.gz"),
    "label file missing": (lambda r: (r / "labelsTr" / "SYN_001.nii.gz").unlink(),
                           "case SYN_001: label file missing: .*labelsTr/SYN_001.nii.gz"),
    "undeclared label value": (lambda r: _relabel(r, 7),
                               r"SYN_002.nii.gz: label values \[7\] are not declared in dataset.json"),
    "region-based labels": (lambda r: _json(r, labels={"background": 0, "whole tumor": [1, 2, 3],
                                                        "core": [2, 3]}),
                            "label 'whole tumor' is a list of values .*not mutually exclusive"),
    "regions_class_order": (lambda r: _json(r, regions_class_order=[1, 2]),
                            "regions_class_order.*not mutually exclusive"),
    "shapes differ": (lambda r: _reshape(r, affine_only=False),
                      r"SYN_003_0001.nii.gz: shape \(22, 24, 16\) differs from SYN_003_0000.nii.gz"),
    "affines differ": (lambda r: _reshape(r, affine_only=True),
                       "SYN_003_0001.nii.gz: affine differs from that of SYN_003_0000.nii.gz"),
    "unsupported ending": (lambda r: _json(r, file_ending=".png"),
                           r"file_ending '.png' is not supported \(supported: .nii.gz, .nii"),
    "channel beyond channel_names": (lambda r: _json(r, channel_names={"0": "T1"}),
                                     "SYN_001_0001.nii.gz: channel 0001, but .*declares 1 channel"),
    "no foreground class": (lambda r: _json(r, labels={"background": 0}), "declares no foreground"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_one_line_and_writes_nothing(nnunet, tmp_path, capsys, name):
    make, needle = BAD[name]
    root = _copy(nnunet, tmp_path)
    make(root)
    work = tmp_path / "run"
    rc, out, err = _main(capsys, "train", "--data", root, "--workdir", work, "--config", "tiny")
    errors = [l for l in err.splitlines() if l.startswith("tracin-jax: error: ")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err  # besides progress bars
    assert re.search(needle, errors[0]), errors[0]
    assert not work.exists()


def test_task01_folder_describing_another_task_and_forced_layouts(nnunet, tmp_path):
    root = _copy(nnunet, tmp_path)
    with pytest.raises(InputError, match="data.layout=msd but .*dataset.json describes an nnU-Net"):
        _load(root, DataConfig(layout="msd"))
    msd = tmp_path / "Task07_Pancreas"
    _msd_task(msd, [(8, 8, 4)] * 2)
    with pytest.raises(InputError, match="data.layout=nnunet but .*has no channel_names"):
        _load(msd, DataConfig(layout="nnunet"))
