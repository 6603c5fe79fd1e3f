"""Finding the cases of a dataset on disk: the BraTS releases' layouts, any MSD task, and the
nnU-Net v2 raw format.

===========  ===========================================================================  =========
layout       files                                                                        labels
===========  ===========================================================================  =========
brats2019    ``<root>/{HGG,LGG}/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz`` (also 2018)  0,1,2,4
brats2020    ``<root>/<case>/<case>_<mod>.nii.gz`` plus CSV files beside the cases         0,1,2,4
brats2021    ``<root>/BraTS2021_00000/BraTS2021_00000_<mod>.nii.gz``                        0,1,2,4
brats2023    ``<root>/BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1c,t1n,t2f,t2w,seg}.nii.gz``  0,1,2,3
msd          ``<root>/imagesTr/BRATS_001.nii.gz`` (4D: FLAIR, T1w, T1gd, T2w),             0..3,
             ``<root>/labelsTr/BRATS_001.nii.gz``, ``<root>/dataset.json``                 own order
msd          any other MSD task: ``<root>/imagesTr/<case>.nii.gz`` (4D, or 3D for one       from
             channel), ``labelsTr/<case>.nii.gz``, ``dataset.json`` (``modality``,          dataset
             ``labels``: value -> name)                                                     .json
nnunet       ``<root>/imagesTr/<case>_<XXXX><ending>`` (one file per channel XXXX),        from
             ``labelsTr/<case><ending>``, ``dataset.json`` (``channel_names``, ``labels``:  dataset
             name -> value, ``file_ending``); optional ``imagesTs/`` [``labelsTs/``]        .json
===========  ===========================================================================  =========

An ``imagesTr`` folder is MSD Task01 (BraTS) when ``dataset.json`` describes Task01, says nothing
of channels and labels, or is absent while the images are not named like nnU-Net channel files;
it is nnU-Net v2 when ``dataset.json`` has ``channel_names`` or ``file_ending``; any other MSD
task otherwise. A folder named ``Task01_*`` whose ``dataset.json`` describes another task is an
error (Task01 is BraTS). For the MSD and nnU-Net tasks, :func:`read_task` reads the channels and
classes (a :class:`~tracin_jax.task.Task`; labels in ``dataset.json``'s order) and refuses
nnU-Net region-based labels (a label given as a list of values: overlapping regions, not
mutually exclusive classes). Cases in ``imagesTs`` with a label file in ``labelsTs`` are test
cases (:attr:`Case.split`); ``imagesTs`` cases without labels are not used.

Files may be ``.nii`` or ``.nii.gz``; hidden files and macOS ``._*`` files are ignored. A file's
modality is the last ``_``/``-`` separated token of its name (``flair``, ``t1``, ``t1ce``, ``t2``;
BraTS 2023 ``t2f``, ``t1n``, ``t1c``, ``t2w``; ``seg``). When a case has no ``seg`` file, any NIfTI
whose name contains ``seg`` (any case) is taken as its segmentation and flagged as non-standard
(BraTS 2020 ships one such file).

``layout="auto"`` recognises the layout from the folder given or, if that holds none, from its
sub-folders up to two levels down (so the parent of ``MICCAI_BraTS_2019_Data_Training`` works).
Discovery only lists files; missing modalities are reported by the loader, which checks every
case before decoding any.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from tracin_jax.errors import InputError
from tracin_jax.task import Task

log = logging.getLogger(__name__)

MODALITIES = ("flair", "t1", "t1ce", "t2")
LAYOUTS = ("brats2019", "brats2020", "brats2021", "brats2023", "msd", "nnunet")
GRADES = ("all", "HGG", "LGG")
GRADE_DIRS = ("HGG", "LGG")
# File-name token -> modality (BraTS 2023 names and a few common aliases map onto the four).
MODALITY_TOKENS = {
    "flair": "flair", "t2f": "flair",
    "t1": "t1", "t1n": "t1",
    "t1ce": "t1ce", "t1c": "t1ce", "t1gd": "t1ce",
    "t2": "t2", "t2w": "t2",
}
BRATS2023_TOKENS = frozenset({"t1c", "t1n", "t2f", "t2w"})
MSD_CHANNELS = ("flair", "t1", "t1ce", "t2")  # channel order of the MSD Task01 4D images
# Layout -> family of folder structure ("msd": an imagesTr/ + labelsTr/ folder, MSD or nnU-Net).
FAMILY = {"brats2019": "grades", "brats2020": "flat", "brats2021": "flat", "brats2023": "flat", "msd": "msd",
          "nnunet": "msd"}
DESCRIPTION_FILE = "dataset.json"
NNUNET_ENDINGS = (".nii.gz", ".nii")  # nnU-Net file endings this project reads
NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")  # <case>_<XXXX>
MAX_CLASSES = 254  # class indices are stored as uint8, 255 marks an undeclared value


@dataclass
class Case:
    """One patient's files.

    Attributes:
      case_id: the case folder name (BraTS), image file stem (MSD) or the nnU-Net case id (the
        channel files' name without ``_XXXX`` and ending), e.g. ``BraTS19_TCIA01_123_1``.
      folder: the case folder (BraTS), or ``imagesTr`` / ``imagesTs`` (MSD, nnU-Net).
      modalities: modality name (``flair``, ``t1``, ``t1ce``, ``t2``) -> file (BraTS); channel
        name of ``dataset.json`` -> file (nnU-Net); empty for MSD.
      seg: segmentation file, or None when the case has none.
      image4d: MSD only: the 4D image file (channels FLAIR, T1w, T1gd, T2w for Task01, those of
        ``dataset.json`` otherwise; a 3D file for a one-channel task).
      grade: ``HGG`` / ``LGG`` for the BraTS 2018/2019 layout, else None.
      seg_nonstandard: the seg file was matched by ``*seg*`` rather than by its standard name.
      split: ``"test"`` for a labelled case of ``imagesTs`` (MSD, nnU-Net), else None.
      expected: nnU-Net only: channel name (and ``"seg"``) -> the file the case must have there,
        named when it is missing.
    """

    case_id: str
    folder: Path
    modalities: dict[str, Path] = field(default_factory=dict)
    seg: Path | None = None
    image4d: Path | None = None
    grade: str | None = None
    seg_nonstandard: bool = False
    split: str | None = None
    expected: dict[str, Path] = field(default_factory=dict)

    def files(self) -> list[Path]:
        """Every file of the case (images, then seg), in a fixed order."""
        out = [self.image4d] if self.image4d is not None else []
        out += [self.modalities[m] for m in sorted(self.modalities)]
        if self.seg is not None:
            out.append(self.seg)
        return out

    def missing(self, modalities: tuple[str, ...] = MODALITIES, need_seg: bool = True) -> list[str]:
        """Names of the required files this case lacks (modalities, then ``seg``)."""
        lost = [] if self.image4d is not None else [m for m in modalities if m not in self.modalities]
        if need_seg and self.seg is None:
            lost.append("seg")
        return lost


# ----------------------------------------------------------------------------------------------
# File names


def is_hidden(name: str) -> bool:
    """Hidden files and macOS resource forks (``._name``)."""
    return name.startswith(".")


def nifti_stem(name: str) -> str | None:
    """``case_t1.nii.gz`` -> ``case_t1``; None for anything that is not a (visible) NIfTI name."""
    if is_hidden(name):
        return None
    low = name.lower()
    for suffix in (".nii.gz", ".nii"):
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return None


def name_token(stem: str) -> str:
    """The last ``_`` or ``-`` separated token of a file stem, lower case."""
    return re.split(r"[_-]", stem)[-1].lower()


def classify(stem: str) -> str | None:
    """Modality (``flair``/``t1``/``t1ce``/``t2``), ``seg``, or None for a file stem."""
    token = name_token(stem)
    if token == "seg":
        return "seg"
    return MODALITY_TOKENS.get(token)


def _visible_dirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not is_hidden(p.name) and p.is_dir())
    except OSError as err:
        raise InputError(f"cannot list folder {folder}: {err.strerror or err}") from None


def _nifti_files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if nifti_stem(p.name) is not None and p.is_file())
    except OSError as err:
        raise InputError(f"cannot list folder {folder}: {err.strerror or err}") from None


# ----------------------------------------------------------------------------------------------
# BraTS case folders


def scan_case_folder(folder: Path) -> Case | None:
    """The case in a BraTS case folder, or None if the folder holds no recognisable NIfTI file.

    Raises InputError when two files claim the same modality or seg.
    """
    found: dict[str, Path] = {}
    segish: list[Path] = []
    for path in _nifti_files(folder):
        stem = nifti_stem(path.name)
        kind = classify(stem)
        if kind is None:
            if "seg" in stem.lower():
                segish.append(path)
            continue
        if kind in found:
            raise InputError(
                f"case folder {folder} has two {kind} files: {found[kind].name} and {path.name}"
            )
        found[kind] = path
    seg = found.pop("seg", None)
    nonstandard = False
    if seg is None and segish:
        if len(segish) > 1:
            names = ", ".join(p.name for p in segish)
            raise InputError(f"case folder {folder} has no *_seg file and several candidates: {names}")
        seg, nonstandard = segish[0], True
    if not found and seg is None:
        return None
    return Case(case_id=folder.name, folder=folder, modalities=found, seg=seg, seg_nonstandard=nonstandard)


def scan_case_folders(folder: Path, grade: str | None = None) -> list[Case]:
    """All case folders directly inside ``folder``, sorted by name."""
    cases = []
    for sub in _visible_dirs(folder):
        case = scan_case_folder(sub)
        if case is not None:
            case.grade = grade
            cases.append(case)
    return cases


def _has_case_folder(folder: Path) -> bool:
    for sub in _visible_dirs(folder):
        try:
            if any(classify(nifti_stem(p.name) or "") for p in sub.iterdir() if nifti_stem(p.name)):
                return True
        except OSError:
            continue
    return False


def flat_layout_name(cases: list[Case]) -> str:
    """``brats2023`` if its names are used, ``brats2021`` for ``BraTS2021_*`` cases, else ``brats2020``."""
    for case in cases:
        for path in case.modalities.values():
            if name_token(nifti_stem(path.name)) in BRATS2023_TOKENS:
                return "brats2023"
    if cases and all(c.case_id.startswith("BraTS2021") for c in cases):
        return "brats2021"
    return "brats2020"


# ----------------------------------------------------------------------------------------------
# MSD Task01


def msd_cases(root: Path) -> list[Case]:
    """Cases of an MSD Task01 folder: ``imagesTr/<id>.nii.gz`` with ``labelsTr/<id>.nii.gz``."""
    check_msd_description(root)
    return _image_file_cases(root)


def _image_file_cases(root: Path) -> list[Case]:
    """``imagesTr/<id>.nii[.gz]`` with ``labelsTr/<id>.nii[.gz]`` (seg None when absent)."""
    images, labels = root / "imagesTr", root / "labelsTr"
    label_files = {}
    if labels.is_dir():
        label_files = {nifti_stem(p.name): p for p in _nifti_files(labels)}
    cases = []
    for path in _nifti_files(images):
        stem = nifti_stem(path.name)
        cases.append(Case(case_id=stem, folder=images, image4d=path, seg=label_files.get(stem)))
    return cases


def describes_task01(desc: dict) -> bool:
    """Whether an MSD ``dataset.json`` describes Task01 (BraTS): modalities FLAIR, T1w, T1gd,
    T2w and labels 1 edema, 2 non-enhancing, 3 enhancing, in that order; a description without
    ``modality`` and ``labels`` counts as Task01 too (as it always has)."""
    modality = {str(k): str(v).lower() for k, v in _entries(desc.get("modality")).items()}
    labels = {str(k): str(v).lower() for k, v in _entries(desc.get("labels")).items()}
    expect_mod = (("flair",), ("t1",), ("t1gd", "gd", "t1ce", "t1c"), ("t2",))
    ok_mod = not modality or (
        len(modality) == 4
        and all(any(tok in modality.get(str(i), "") for tok in toks) for i, toks in enumerate(expect_mod))
        and "gd" not in modality.get("1", "")
    )
    ok_lab = not labels or (
        "edema" in labels.get("1", "") or "oedema" in labels.get("1", "")
    ) and "enhancing" in labels.get("3", "") and "non" in labels.get("2", "")
    return bool(ok_mod and ok_lab)


def _entries(raw) -> dict:
    return raw if isinstance(raw, dict) else {}


def check_msd_description(root: Path) -> None:
    """If ``dataset.json`` exists, checks it describes Task01 (channel and label order)."""
    path = root / DESCRIPTION_FILE
    if not path.is_file():
        return
    desc = read_description(path)
    if not describes_task01(desc):
        raise InputError(
            f"{path} does not describe MSD Task01 (expected modalities FLAIR, T1w, T1gd, T2w and "
            f"labels 1 edema, 2 non-enhancing, 3 enhancing; found {desc.get('modality') or '-'} "
            f"{desc.get('labels') or '-'})"
        )


# ----------------------------------------------------------------------------------------------
# dataset.json: MSD tasks and nnU-Net v2


def read_description(path: Path) -> dict:
    """The JSON object in ``path`` (a ``dataset.json``); InputError naming it when it is missing,
    unreadable, not JSON or not an object."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputError(f"{path}: missing (the dataset's description: channels, labels)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}") from None
    try:
        desc = json.loads(text)
    except ValueError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(desc, dict):
        raise InputError(f"{path}: not a JSON object (found {type(desc).__name__})")
    return desc


def _indexed_names(raw, path: Path, key: str) -> tuple[str, ...]:
    """``{"0": name, "1": name, ...}`` -> names in index order; the indices must be 0..M-1."""
    if not isinstance(raw, dict) or not raw:
        raise InputError(f"{path}: '{key}' must be an object {{\"0\": name, ...}} with at least one "
                         f"channel (found {raw!r})")
    try:
        order = sorted((int(k), str(v)) for k, v in raw.items())
    except (TypeError, ValueError):
        raise InputError(f"{path}: '{key}' has a key that is not a channel index: "
                         f"{', '.join(map(repr, raw))}") from None
    if [i for i, _ in order] != list(range(len(order))):
        raise InputError(f"{path}: '{key}' indices must be 0..{len(order) - 1}, found "
                         f"{', '.join(str(i) for i, _ in order)}")
    return tuple(name for _, name in order)


def _label_value(name: str, value, path: Path) -> int:
    if isinstance(value, (list, tuple)):
        raise InputError(
            f"{path}: label {name!r} is a list of values {list(value)} (nnU-Net region-based "
            f"labels): regions overlap, so the classes are not mutually exclusive and class-wise "
            f"influence does not apply; give each class one label value")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"{path}: label {name!r} has value {value!r}; a label value is an "
                         f"integer >= 0")
    return int(value)


def _make_task(path: Path, name: str, fmt: str, channels, labels: list[tuple[str, int]]) -> Task:
    """The Task of ``labels`` ([(class name, value)] in dataset.json's order, background 0
    included or not); InputError naming ``path`` for anything inconsistent."""
    values = [v for _, v in labels]
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        raise InputError(f"{path}: label value {twice[0]} is given to "
                         f"{', '.join(repr(n) for n, v in labels if v == twice[0])}")
    fg = [(n, v) for n, v in labels if v != 0]
    if not fg:
        raise InputError(f"{path}: 'labels' declares no foreground class (only background 0)")
    if len(fg) > MAX_CLASSES:
        raise InputError(f"{path}: {len(fg)} foreground classes; at most {MAX_CLASSES} are supported")
    try:
        return Task(name=name, format=fmt, channels=tuple(channels),
                    classes=tuple(n for n, _ in fg), values=tuple(v for _, v in fg))
    except InputError as err:
        raise InputError(f"{path}: {err}") from None


def nnunet_task(root: Path, desc: dict | None = None) -> tuple[Task, str]:
    """(task, file ending) of an nnU-Net v2 raw dataset from its ``dataset.json``.

    ``channel_names`` gives the M channels (indices 0..M-1), ``labels`` the classes as
    ``{name: value}`` (value 0 is background; the others are the C foreground classes, in the
    file's order), ``file_ending`` one of ``NNUNET_ENDINGS``. InputError naming the file for a
    missing or malformed entry, region-based labels (a list of values, or
    ``regions_class_order``), or another file ending.
    """
    path = root / DESCRIPTION_FILE
    desc = read_description(path) if desc is None else desc
    ending = desc.get("file_ending")
    if not isinstance(ending, str):
        raise InputError(f"{path}: no 'file_ending' (e.g. \".nii.gz\")")
    if ending.lower() not in NNUNET_ENDINGS:
        raise InputError(f"{path}: file_ending {ending!r} is not supported (supported: "
                         f"{', '.join(NNUNET_ENDINGS)}, NIfTI)")
    channels = _indexed_names(desc.get("channel_names"), path, "channel_names")
    raw = desc.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise InputError(f"{path}: 'labels' must be an object {{name: value, ...}} (found {raw!r})")
    labels = [(str(n), _label_value(str(n), v, path)) for n, v in raw.items()]
    if "regions_class_order" in desc:
        raise InputError(f"{path}: has 'regions_class_order' (nnU-Net region-based labels): regions "
                         f"overlap, so the classes are not mutually exclusive and class-wise "
                         f"influence does not apply")
    return _make_task(path, root.name, "nnunet", channels, labels), ending


def msd_task(root: Path, desc: dict) -> Task:
    """The task of an MSD ``dataset.json`` other than Task01: ``modality`` ({"0": name, ...}) and
    ``labels`` ({"value": name, ...}, the reverse of nnU-Net's); InputError naming the file."""
    path = root / DESCRIPTION_FILE
    channels = _indexed_names(desc.get("modality"), path, "modality")
    raw = desc.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise InputError(f"{path}: 'labels' must be an object {{\"value\": name, ...}} (found {raw!r})")
    labels = []
    for value, name in raw.items():
        if isinstance(name, (list, tuple)):
            raise InputError(f"{path}: label {value!r} is a list {list(name)}; each label value names "
                             f"one class")
        try:
            v = int(value)
        except (TypeError, ValueError):
            raise InputError(f"{path}: label key {value!r} is not an integer label value") from None
        labels.append((str(name), _label_value(str(name), v, path)))
    return _make_task(path, root.name, "msd", channels, labels)


def looks_like_nnunet(root: Path) -> bool:
    """Whether every visible file of ``imagesTr`` is named like an nnU-Net channel file
    (``<case>_<XXXX>.<ending>``) and there is at least one."""
    try:
        names = [p.name for p in (root / "imagesTr").iterdir() if not is_hidden(p.name) and p.is_file()]
    except OSError:
        return False
    return bool(names) and all(re.search(r"_\d{4}\.[^_]+$", n) for n in names)


def images_format(root: Path, layout: str = "auto") -> tuple[str, Task | None, str | None]:
    """(layout, task, nnU-Net file ending) of an ``imagesTr`` folder: ``("msd", None, None)`` for
    MSD Task01 (BraTS), ``("msd", task, None)`` for another MSD task, ``("nnunet", task, ending)``.

    InputError for a missing (nnU-Net) or malformed ``dataset.json``, a forced ``layout`` the
    folder is not, or a ``Task01_*`` folder whose ``dataset.json`` describes another task.
    """
    path = root / DESCRIPTION_FILE
    if not path.exists():
        if layout == "nnunet" or (layout == "auto" and looks_like_nnunet(root)):
            raise InputError(f"{path}: missing (an nnU-Net v2 raw dataset needs its dataset.json: "
                             f"channel_names, labels, file_ending)")
        return "msd", None, None
    desc = read_description(path)
    if "channel_names" in desc or "file_ending" in desc:
        if layout == "msd":
            raise InputError(f"data.layout=msd but {path} describes an nnU-Net v2 dataset "
                             f"(channel_names, file_ending): use data.layout=nnunet or auto")
        task, ending = nnunet_task(root, desc)
        return "nnunet", task, ending
    if layout == "nnunet":
        raise InputError(f"data.layout=nnunet but {path} has no channel_names (an MSD "
                         f"description?): use data.layout=msd or auto")
    if describes_task01(desc):
        return "msd", None, None
    if root.name.startswith("Task01_"):
        check_msd_description(root)  # raises: Task01 is BraTS
    return "msd", msd_task(root, desc), None


def msd_task_cases(root: Path) -> list[Case]:
    """Cases of an MSD task: ``imagesTr`` with ``labelsTr``, plus ``imagesTs`` cases that have a
    label file in ``labelsTs`` (split ``"test"``)."""
    cases = _image_file_cases(root)
    if (root / "imagesTs").is_dir() and (root / "labelsTs").is_dir():
        labels = {nifti_stem(p.name): p for p in _nifti_files(root / "labelsTs")}
        for path in _nifti_files(root / "imagesTs"):
            stem = nifti_stem(path.name)
            if stem in labels:
                cases.append(Case(case_id=stem, folder=root / "imagesTs", image4d=path,
                                  seg=labels[stem], split="test"))
    return cases


def _ending_files(folder: Path, ending: str) -> list[Path]:
    """Visible files of ``folder`` whose name ends with ``ending`` (case-insensitive), sorted."""
    low = ending.lower()
    try:
        return sorted(p for p in folder.iterdir()
                      if not is_hidden(p.name) and p.name.lower().endswith(low) and p.is_file())
    except OSError as err:
        raise InputError(f"cannot list folder {folder}: {err.strerror or err}") from None


def _nnunet_split(root: Path, images: Path, labels: Path, task: Task, ending: str,
                  split: str | None) -> list[Case]:
    """The cases of one nnU-Net image folder (``imagesTr`` or ``imagesTs``) with their channel
    files and label file (``seg`` None when ``labels`` has none for a case)."""
    n = len(task.channels)
    found: dict[str, dict[str, Path]] = {}
    for path in _ending_files(images, ending):
        stem = path.name[: -len(ending)]
        m = NNUNET_CHANNEL.match(stem)
        if m is None:
            raise InputError(f"{path}: not named <case>_<XXXX>{ending} (XXXX: the 4-digit channel "
                             f"index of dataset.json's channel_names)")
        index = int(m.group("channel"))
        if index >= n:
            raise InputError(f"{path}: channel {index:04d}, but {root / DESCRIPTION_FILE} declares "
                             f"{n} channel(s) ({', '.join(task.channels)})")
        found.setdefault(m.group("case"), {})[task.channels[index]] = path
    label_files = {}
    if labels.is_dir():
        label_files = {p.name[: -len(ending)]: p for p in _ending_files(labels, ending)}
    orphans = sorted(set(label_files) - set(found))
    if orphans and split is None:
        raise InputError(f"{label_files[orphans[0]]}: a label file without images in {images}")
    cases = []
    for case_id, files in sorted(found.items()):
        seg = label_files.get(case_id)
        if split == "test" and seg is None:
            continue  # an unlabelled test case: not used
        expected = {name: images / f"{case_id}_{i:04d}{ending}" for i, name in enumerate(task.channels)}
        expected["seg"] = labels / f"{case_id}{ending}"
        cases.append(Case(case_id=case_id, folder=images, modalities=files, seg=seg, split=split,
                          expected=expected))
    return cases


def nnunet_cases(root: Path, task: Task, ending: str) -> list[Case]:
    """Cases of an nnU-Net v2 raw dataset: ``imagesTr`` (with ``labelsTr``), plus the ``imagesTs``
    cases that have a label file in ``labelsTs`` (split ``"test"``).

    InputError for a file of ``imagesTr`` not named ``<case>_<XXXX><ending>``, a channel index
    beyond ``channel_names``, or a ``labelsTr`` file without images. Missing channel or label
    files are reported by the loader (:attr:`Case.expected` names them).
    """
    cases = _nnunet_split(root, root / "imagesTr", root / "labelsTr", task, ending, None)
    if (root / "imagesTs").is_dir() and (root / "labelsTs").is_dir():
        cases += _nnunet_split(root, root / "imagesTs", root / "labelsTs", task, ending, "test")
    return cases


# ----------------------------------------------------------------------------------------------
# Layout detection


def detect_family(folder: Path) -> str | None:
    """Folder-structure family of a candidate dataset root, or None.

    ``msd`` (has ``imagesTr``), ``grades`` (has ``HGG``/``LGG`` with case folders),
    ``grade`` (is itself an ``HGG``/``LGG`` folder), ``flat`` (has BraTS case folders).
    """
    if (folder / "imagesTr").is_dir():
        return "msd"
    if any((folder / g).is_dir() and _has_case_folder(folder / g) for g in GRADE_DIRS):
        return "grades"
    if _has_case_folder(folder):
        return "grade" if folder.name in GRADE_DIRS else "flat"
    return None


def _family_matches(family: str, layout: str) -> bool:
    if layout == "auto":
        return True
    want = FAMILY[layout]
    return family == want or (family == "grade" and want == "grades")


def find_root(data_dir: Path, layout: str = "auto") -> tuple[Path, str]:
    """The dataset root at or below ``data_dir`` (up to two levels) and its structure family.

    Among several candidates at the same depth one whose name contains ``train`` wins; otherwise
    InputError listing them.
    """
    level = [data_dir]
    for _ in range(3):
        found = []
        for folder in level:
            family = detect_family(folder)
            if family is not None and _family_matches(family, layout):
                found.append((folder, family))
        if len(found) > 1:
            training = [f for f in found if "train" in f[0].name.lower()]
            if len(training) == 1:
                found = training
            else:
                names = ", ".join(str(f[0]) for f in found)
                raise InputError(f"{data_dir} holds several datasets ({names}): pass one of them")
        if found:
            return found[0]
        level = [sub for folder in level for sub in _visible_dirs(folder)]
    want = ("any known BraTS layout, an MSD task or an nnU-Net v2 raw dataset" if layout == "auto"
            else f"the {layout} layout")
    raise InputError(
        f"no BraTS cases found in {data_dir}: expected {want} "
        f"(e.g. HGG/<case>/<case>_flair.nii.gz, <case>/<case>_t1.nii.gz, or imagesTr/ + labelsTr/ "
        f"+ dataset.json)"
    )


class Discovery(NamedTuple):
    """What :func:`discover_dataset` found.

    Attributes:
      layout: ``brats2019`` ... ``brats2023``, ``msd`` (Task01 or another MSD task), ``nnunet``.
      cases: sorted by case id.
      task: the task read from ``dataset.json``; None for BraTS (every BraTS layout and MSD
        Task01), whose task depends on the configured modalities (:func:`tracin_jax.task.brats`).
      root: the dataset root (the folder holding the cases, or ``imagesTr``'s parent).
      description: ``root/dataset.json`` when the dataset has one, else None.
    """

    layout: str
    cases: list[Case]
    task: Task | None
    root: Path
    description: Path | None


def discover_dataset(data_dir, layout: str = "auto", grades: str = "all") -> Discovery:
    """Finds the cases, and for a non-BraTS dataset the task, of a dataset folder.

    Args:
      data_dir: the dataset folder, or a folder up to two levels above it.
      layout: ``auto`` or one of ``LAYOUTS``; a named layout forces its label convention.
      grades: ``all``, ``HGG`` or ``LGG`` (BraTS 2018/2019 only; other layouts ignore it).
    Raises:
      InputError: missing, unreadable or empty folder, no recognisable cases, duplicate case ids,
        a missing or malformed ``dataset.json`` (nnU-Net, MSD other than Task01).
    """
    if layout != "auto" and layout not in LAYOUTS:
        raise InputError(f"unknown data layout {layout!r}: choose auto or one of {', '.join(LAYOUTS)}")
    if grades not in GRADES:
        raise InputError(f"unknown grades {grades!r}: choose one of {', '.join(GRADES)}")
    data_dir = Path(data_dir).expanduser()
    if not data_dir.exists():
        raise InputError(f"data folder does not exist: {data_dir}")
    if not data_dir.is_dir():
        raise InputError(f"data path is not a folder: {data_dir}")
    try:
        empty = not any(not is_hidden(p.name) for p in data_dir.iterdir())
    except OSError as err:
        raise InputError(f"cannot list folder {data_dir}: {err.strerror or err}") from None
    if empty:
        raise InputError(f"data folder is empty: {data_dir}")

    root, family = find_root(data_dir, layout)
    task, description = None, None
    if family == "msd":
        name, task, ending = images_format(root, layout)
        if task is None:
            cases = msd_cases(root)
        elif name == "nnunet":
            cases = nnunet_cases(root, task, ending)
        else:
            cases = msd_task_cases(root)
        if (root / DESCRIPTION_FILE).is_file():
            description = root / DESCRIPTION_FILE
    elif family in ("grades", "grade"):
        name, cases = "brats2019", _grade_cases(root, family, grades)
    else:
        cases = scan_case_folders(root)
        name = layout if layout != "auto" else flat_layout_name(cases)
    if not cases:
        if task is None:
            raise InputError(f"no BraTS cases found in {root}")
        named = f"<case>_<XXXX>{ending} files" if name == "nnunet" else "NIfTI images"
        raise InputError(f"no cases found in {root / 'imagesTr'}: expected {named}")
    cases.sort(key=lambda c: c.case_id)
    dupes = sorted(i for i, n in Counter(c.case_id for c in cases).items() if n > 1)
    if dupes:
        raise InputError(f"case ids appear more than once in {root}: {', '.join(dupes[:5])}")
    if name == "nnunet" and description is not None:
        _check_num_training(description, sum(c.split is None for c in cases))
    return Discovery(name, cases, task, root, description)


def _check_num_training(path: Path, n: int) -> None:
    """Logs a warning when ``numTraining`` of an nnU-Net ``dataset.json`` is not ``n``."""
    try:
        declared = json.loads(path.read_text()).get("numTraining")
    except (OSError, ValueError, AttributeError):
        return
    if declared is not None and declared != n:
        log.warning("%s: numTraining is %s but imagesTr holds %d cases", path, declared, n)


def discover_cases(data_dir, layout: str = "auto", grades: str = "all") -> tuple[str, list[Case]]:
    """Finds the cases of a dataset (see :func:`discover_dataset`).

    Returns:
      (layout name, cases sorted by case id).
    Raises:
      InputError: missing, unreadable or empty folder, no recognisable cases, duplicate case ids.
    """
    found = discover_dataset(data_dir, layout, grades)
    return found.layout, found.cases


def _grade_cases(root: Path, family: str, grades: str) -> list[Case]:
    if family == "grade":  # the user passed an HGG or LGG folder itself
        if grades not in ("all", root.name):
            raise InputError(f"{root} holds {root.name} cases but data.grades={grades}")
        return scan_case_folders(root, grade=root.name)
    wanted = GRADE_DIRS if grades == "all" else (grades,)
    cases = []
    for grade in wanted:
        folder = root / grade
        if folder.is_dir():
            cases += scan_case_folders(folder, grade=grade)
    if not cases:
        raise InputError(f"no {'/'.join(wanted)} cases found in {root}")
    return cases
