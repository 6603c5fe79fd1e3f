import pytest

from tracin_jax.data import discover_cases
from tracin_jax.data.discover import classify, nifti_stem
from tracin_jax.data.testing import write_tree
from tracin_jax.errors import InputError


def test_brats2019_grades_and_auto_detection_from_parent(tmp_path):
    write_tree(tmp_path, "brats2019", cases=3)  # HGG, LGG, HGG
    layout, cases = discover_cases(tmp_path)  # the parent of MICCAI_BraTS_2019_Data_Training
    assert layout == "brats2019"
    assert [c.case_id for c in cases] == ["BraTS19_TST_0001_1", "BraTS19_TST_0002_1", "BraTS19_TST_0003_1"]
    assert [c.grade for c in cases] == ["HGG", "LGG", "HGG"]
    assert set(cases[0].modalities) == {"flair", "t1", "t1ce", "t2"} and cases[0].seg.name.endswith("_seg.nii.gz")
    _, hgg = discover_cases(tmp_path, grades="HGG")
    _, lgg = discover_cases(tmp_path / "MICCAI_BraTS_2019_Data_Training", layout="brats2019", grades="LGG")
    assert [c.case_id for c in hgg] == ["BraTS19_TST_0001_1", "BraTS19_TST_0003_1"]
    assert [c.case_id for c in lgg] == ["BraTS19_TST_0002_1"]
    # An HGG folder passed directly is read as that grade.
    layout, only = discover_cases(tmp_path / "MICCAI_BraTS_2019_Data_Training" / "HGG")
    assert layout == "brats2019" and [c.grade for c in only] == ["HGG", "HGG"]


def test_brats2020_nonstandard_seg_and_csv_files(tmp_path):
    write_tree(tmp_path, "brats2020", cases=3, nonstandard_seg=True)
    layout, cases = discover_cases(tmp_path)
    assert layout == "brats2020" and len(cases) == 3
    assert cases[-1].seg.name == "W39_1998.09.19_Segm.nii" and cases[-1].seg_nonstandard
    assert not cases[0].seg_nonstandard


@pytest.mark.parametrize("layout, first", [("brats2021", "BraTS2021_00000"), ("brats2023", "BraTS-GLI-00000-000")])
def test_flat_layouts(tmp_path, layout, first):
    write_tree(tmp_path, layout, cases=2, ext=".nii")
    found, cases = discover_cases(tmp_path)
    assert found == layout and cases[0].case_id == first
    assert set(cases[0].modalities) == {"flair", "t1", "t1ce", "t2"}
    assert all(p.suffix == ".nii" for p in cases[0].files())


def test_brats2023_names_map_to_modalities(tmp_path):
    write_tree(tmp_path, "brats2023", cases=1)
    _, (case,) = discover_cases(tmp_path)
    assert case.modalities["t1ce"].name.endswith("-t1c.nii.gz")
    assert case.modalities["t1"].name.endswith("-t1n.nii.gz")
    assert case.modalities["flair"].name.endswith("-t2f.nii.gz")
    assert case.modalities["t2"].name.endswith("-t2w.nii.gz")


def test_msd_layout_ignores_macos_files(tmp_path):
    write_tree(tmp_path, "msd", cases=2)
    layout, cases = discover_cases(tmp_path)
    assert layout == "msd" and [c.case_id for c in cases] == ["BRATS_001", "BRATS_002"]
    assert cases[0].image4d.name == "BRATS_001.nii.gz" and cases[0].seg.parent.name == "labelsTr"
    assert cases[0].modalities == {}


def test_msd_dataset_json_of_another_task_is_rejected(tmp_path):
    write_tree(tmp_path, "msd", cases=1)
    (tmp_path / "Task01_BrainTumour" / "dataset.json").write_text(
        '{"modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "cancer"}}')
    with pytest.raises(InputError, match="does not describe MSD Task01"):
        discover_cases(tmp_path)


def test_hidden_files_and_folders_are_ignored(tmp_path):
    write_tree(tmp_path, "brats2021", cases=2)
    case = tmp_path / "BraTS2021_00000"
    (case / "._BraTS2021_00000_t1.nii.gz").write_bytes(b"junk")
    (tmp_path / ".Trash").mkdir()
    (tmp_path / ".Trash" / "x_t1.nii.gz").write_bytes(b"junk")
    _, cases = discover_cases(tmp_path)
    assert [c.case_id for c in cases] == ["BraTS2021_00000", "BraTS2021_00001"]
    assert cases[0].modalities["t1"].name == "BraTS2021_00000_t1.nii.gz"


def test_file_name_helpers():
    assert nifti_stem("a_t1.nii.gz") == "a_t1" and nifti_stem("A_T1.NII") == "A_T1"
    assert nifti_stem("._a_t1.nii.gz") is None and nifti_stem("a.csv") is None
    assert classify("BraTS19_X_1_t1") == "t1" and classify("BraTS19_X_1_t1ce") == "t1ce"
    assert classify("BraTS-GLI-00000-000-t2f") == "flair" and classify("x_seg") == "seg"
    assert classify("W39_1998.09.19_Segm") is None


@pytest.mark.parametrize("make, needle", [
    (lambda p: None, "data folder is empty"),
    (lambda p: (p / "notes.txt").write_text("x"), "no BraTS cases found"),
    (lambda p: (p / "sub").mkdir(), "no BraTS cases found"),
])
def test_empty_or_unrecognised_folder(tmp_path, make, needle):
    make(tmp_path)
    with pytest.raises(InputError, match=needle) as err:
        discover_cases(tmp_path)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_missing_folder_and_wrong_layout(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        discover_cases(tmp_path / "nope")
    write_tree(tmp_path, "brats2021", cases=1)
    with pytest.raises(InputError, match="the msd layout"):
        discover_cases(tmp_path, layout="msd")
    with pytest.raises(InputError, match="unknown data layout"):
        discover_cases(tmp_path, layout="brats2017")


def test_two_files_for_one_modality(tmp_path):
    write_tree(tmp_path, "brats2021", cases=1)
    case = tmp_path / "BraTS2021_00000"
    (case / "BraTS2021_00000_t1.nii").write_bytes((case / "BraTS2021_00000_t1.nii.gz").read_bytes())
    with pytest.raises(InputError, match="two t1 files"):
        discover_cases(tmp_path)


def test_several_datasets_prefer_training(tmp_path):
    write_tree(tmp_path / "MICCAI_BraTS2020_TrainingData", "brats2021", cases=2)
    write_tree(tmp_path / "MICCAI_BraTS2020_ValidationData", "brats2021", cases=1)
    _, cases = discover_cases(tmp_path)
    assert len(cases) == 2 and "TrainingData" in str(cases[0].folder)
    write_tree(tmp_path / "other" / "release_a", "brats2021", cases=1)
    write_tree(tmp_path / "other" / "release_b", "brats2021", cases=1)
    with pytest.raises(InputError, match="several datasets"):
        discover_cases(tmp_path / "other")
