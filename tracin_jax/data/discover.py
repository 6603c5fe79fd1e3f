"""Finding BraTS cases on disk, in the layouts of the public releases.

===========  ===========================================================================  =========
layout       files                                                                        labels
===========  ===========================================================================  =========
brats2019    ``<root>/{HGG,LGG}/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz`` (also 2018)  0,1,2,4
brats2020    ``<root>/<case>/<case>_<mod>.nii.gz`` plus CSV files beside the cases         0,1,2,4
brats2021    ``<root>/BraTS2021_00000/BraTS2021_00000_<mod>.nii.gz``                        0,1,2,4
brats2023    ``<root>/BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1c,t1n,t2f,t2w,seg}.nii.gz``  0,1,2,3
msd          ``<root>/imagesTr/BRATS_001.nii.gz`` (4D: FLAIR, T1w, T1gd, T2w),             0..3,
             ``<root>/labelsTr/BRATS_001.nii.gz``, ``<root>/dataset.json``                 own order
===========  ===========================================================================  =========

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
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tracin_jax.errors import InputError

MODALITIES = ("flair", "t1", "t1ce", "t2")
LAYOUTS = ("brats2019", "brats2020", "brats2021", "brats2023", "msd")
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
# Layout -> family of folder structure.
FAMILY = {"brats2019": "grades", "brats2020": "flat", "brats2021": "flat", "brats2023": "flat", "msd": "msd"}


@dataclass
class Case:
    """One patient's files.

    Attributes:
      case_id: the case folder name (BraTS) or image file stem (MSD), e.g. ``BraTS19_TCIA01_123_1``.
      folder: the case folder (BraTS) or ``imagesTr`` (MSD).
      modalities: modality name (``flair``, ``t1``, ``t1ce``, ``t2``) -> file; empty for MSD.
      seg: segmentation file, or None when the case has none.
      image4d: MSD only: the 4D image file (channels FLAIR, T1w, T1gd, T2w).
      grade: ``HGG`` / ``LGG`` for the BraTS 2018/2019 layout, else None.
      seg_nonstandard: the seg file was matched by ``*seg*`` rather than by its standard name.
    """

    case_id: str
    folder: Path
    modalities: dict[str, Path] = field(default_factory=dict)
    seg: Path | None = None
    image4d: Path | None = None
    grade: str | None = None
    seg_nonstandard: bool = False

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
    images, labels = root / "imagesTr", root / "labelsTr"
    label_files = {}
    if labels.is_dir():
        label_files = {nifti_stem(p.name): p for p in _nifti_files(labels)}
    cases = []
    for path in _nifti_files(images):
        stem = nifti_stem(path.name)
        cases.append(Case(case_id=stem, folder=images, image4d=path, seg=label_files.get(stem)))
    return cases


def check_msd_description(root: Path) -> None:
    """If ``dataset.json`` exists, checks it describes Task01 (channel and label order)."""
    path = root / "dataset.json"
    if not path.is_file():
        return
    try:
        desc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read {path}: {err}") from None
    modality = {str(k): str(v).lower() for k, v in (desc.get("modality") or {}).items()}
    labels = {str(k): str(v).lower() for k, v in (desc.get("labels") or {}).items()}
    expect_mod = (("flair",), ("t1",), ("t1gd", "gd", "t1ce", "t1c"), ("t2",))
    ok_mod = not modality or (
        len(modality) == 4
        and all(any(tok in modality.get(str(i), "") for tok in toks) for i, toks in enumerate(expect_mod))
        and "gd" not in modality.get("1", "")
    )
    ok_lab = not labels or (
        "edema" in labels.get("1", "") or "oedema" in labels.get("1", "")
    ) and "enhancing" in labels.get("3", "") and "non" in labels.get("2", "")
    if not (ok_mod and ok_lab):
        raise InputError(
            f"{path} does not describe MSD Task01 (expected modalities FLAIR, T1w, T1gd, T2w and "
            f"labels 1 edema, 2 non-enhancing, 3 enhancing; found {modality or '-'} {labels or '-'})"
        )


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
    want = "any known BraTS layout" if layout == "auto" else f"the {layout} layout"
    raise InputError(
        f"no BraTS cases found in {data_dir}: expected {want} "
        f"(e.g. HGG/<case>/<case>_flair.nii.gz, <case>/<case>_t1.nii.gz, or imagesTr/ + labelsTr/)"
    )


def discover_cases(data_dir, layout: str = "auto", grades: str = "all") -> tuple[str, list[Case]]:
    """Finds the cases of a BraTS dataset.

    Args:
      data_dir: the dataset folder, or a folder up to two levels above it.
      layout: ``auto`` or one of ``LAYOUTS``; a named layout forces its label convention.
      grades: ``all``, ``HGG`` or ``LGG`` (BraTS 2018/2019 only; other layouts ignore it).
    Returns:
      (layout name, cases sorted by case id).
    Raises:
      InputError: missing, unreadable or empty folder, no recognisable cases, duplicate case ids.
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
    if family == "msd":
        name, cases = "msd", msd_cases(root)
    elif family in ("grades", "grade"):
        name, cases = "brats2019", _grade_cases(root, family, grades)
    else:
        cases = scan_case_folders(root)
        name = layout if layout != "auto" else flat_layout_name(cases)
    if not cases:
        raise InputError(f"no BraTS cases found in {root}")
    cases.sort(key=lambda c: c.case_id)
    dupes = sorted(i for i, n in Counter(c.case_id for c in cases).items() if n > 1)
    if dupes:
        raise InputError(f"case ids appear more than once in {root}: {', '.join(dupes[:5])}")
    return name, cases


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
