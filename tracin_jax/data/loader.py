"""``load_dataset``: BraTS folder -> preprocessed, patient-split 2D examples (cached).

Steps: discover the cases (:mod:`~tracin_jax.data.discover`), keep the first ``max_cases``
sorted ids, check every case has its modalities and seg (before decoding anything), split by
patient (:mod:`~tracin_jax.data.split`), then either read the cache or decode each case
(:mod:`~tracin_jax.data.nifti`), map its labels (:mod:`~tracin_jax.data.labels`), preprocess it
(:mod:`~tracin_jax.data.preprocess`) and write the cache (:mod:`~tracin_jax.data.cache`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from tracin_jax.progress import tqdm

if TYPE_CHECKING:  # annotations only (the config sits above the data and model stages)
    from tracin_jax.config import DataConfig
from tracin_jax.data import cache as cache_lib
from tracin_jax.data.dataset import Dataset, Examples, class_slice_counts, from_arrays, to_arrays
from tracin_jax.data.discover import GRADES, LAYOUTS, MODALITY_TOKENS, MSD_CHANNELS, Case, discover_cases
from tracin_jax.data.labels import LAYOUT_CONVENTION, map_labels
from tracin_jax.data.nifti import (check_ndim, check_same_grid, open_nifti, read_image, read_labels,
                                   stored_orientation)
from tracin_jax.data.preprocess import case_examples, negative_minima, parse_slices, stored_window_to_canonical
from tracin_jax.data.split import first_cases, split_cases
from tracin_jax.errors import InputError

log = logging.getLogger(__name__)
CROP_SPACES = ("stored", "canonical")


class NegativeVoxelsWarning(UserWarning):
    """A case's image holds negative voxels, which paper normalisation maps below -1.

    Printed as one line, ``NegativeVoxelsWarning: case ...`` (without Python's usual second line
    quoting the source code that raised it; see :func:`one_line_warnings`). Filter it as any
    warning, e.g. ``warnings.simplefilter("ignore", NegativeVoxelsWarning)``."""


def one_line_warnings(category: type[Warning]) -> None:
    """Makes warnings of ``category`` (and its subclasses) print as one line
    ``<Category>: <message>``: wraps ``warnings.formatwarning`` once per category, leaving
    every other warning's format as it was."""
    current = warnings.formatwarning
    if category in getattr(current, "_one_line_categories", ()):
        return

    def formatwarning(message, cat, filename, lineno, line=None):
        if isinstance(cat, type) and issubclass(cat, category):
            return f"{cat.__name__}: {message}\n"
        return current(message, cat, filename, lineno, line)

    formatwarning._one_line_categories = (*getattr(current, "_one_line_categories", ()), category)
    warnings.formatwarning = formatwarning


class CaseVolumes(NamedTuple):
    """One decoded case.

    Attributes:
      channels: C canonical channel volumes [X, Y, Z] in ``modalities`` order (stored dtype, see
        :func:`~tracin_jax.data.nifti.read_image`).
      labels: u8[X, Y, Z] canonical project classes.
      names: C file names used in messages, one per channel.
      orientation: int[3, 2] stored axis -> (canonical axis, direction) of the case's files.
      stored_shape: (X, Y, Z) spatial shape as stored.
      reference: the file the orientation was read from (named in errors).
    """

    channels: list[np.ndarray]
    labels: np.ndarray
    names: list[str]
    orientation: np.ndarray
    stored_shape: tuple[int, int, int]
    reference: Path


class CaseResult(NamedTuple):
    """A case's examples and {channel file: minimum} of its channels with negative voxels."""

    examples: Examples
    negative: dict[str, float]


def check_data_config(cfg: DataConfig) -> None:
    """InputError naming the first DataConfig value the loader cannot use."""
    if cfg.layout != "auto" and cfg.layout not in LAYOUTS:
        raise InputError(f"config value data.layout={cfg.layout!r} is not one of auto, {', '.join(LAYOUTS)}")
    if cfg.grades not in GRADES:
        raise InputError(f"config value data.grades={cfg.grades!r} is not one of {', '.join(GRADES)}")
    if cfg.normalise not in ("paper", "zscore"):
        raise InputError(f"config value data.normalise={cfg.normalise!r} is not one of paper, zscore")
    if cfg.crop_space not in CROP_SPACES:
        raise InputError(f"config value data.crop_space={cfg.crop_space!r} is not one of {', '.join(CROP_SPACES)}")
    crop = tuple(cfg.crop)
    if len(crop) != 4 or not (0 <= crop[0] < crop[1] and 0 <= crop[2] < crop[3]):
        raise InputError(f"config value data.crop={tuple(cfg.crop)} must be y0,y1,x0,x1 with 0<=y0<y1, 0<=x0<x1")
    h, w = cfg.crop[1] - cfg.crop[0], cfg.crop[3] - cfg.crop[2]
    if cfg.downsample < 1 or h % cfg.downsample or w % cfg.downsample:
        raise InputError(f"config value data.downsample={cfg.downsample} must divide the crop {h}x{w}")
    parse_slices(cfg.slices)
    if not 0.0 < cfg.test_fraction < 1.0:
        raise InputError(f"config value data.test_fraction={cfg.test_fraction} must lie in (0, 1)")
    if cfg.max_cases < 0:
        raise InputError(f"config value data.max_cases={cfg.max_cases} must be >= 0 (0 = all)")
    canonical_modalities(cfg.modalities)


def canonical_modalities(names) -> tuple[str, ...]:
    """Config modality names -> canonical ones (``t1c`` -> ``t1ce`` etc.); InputError if unknown."""
    out = []
    for name in names:
        canon = MODALITY_TOKENS.get(str(name).lower())
        if canon is None:
            raise InputError(f"config value data.modalities has unknown modality {name!r}: use flair, t1, t1ce, t2")
        if canon in out:
            raise InputError(f"config value data.modalities names {canon} twice")
        out.append(canon)
    if not out:
        raise InputError("config value data.modalities is empty")
    return tuple(out)


def require_complete(case: Case, modalities: tuple[str, ...]) -> None:
    """InputError naming the case folder and what it lacks (a modality, or the seg)."""
    missing = case.missing(modalities, need_seg=True)
    if not missing:
        return
    if case.image4d is not None:
        raise InputError(f"case {case.case_id}: no label file in {case.folder.parent / 'labelsTr'}")
    raise InputError(f"case folder {case.folder} has no {', '.join(missing)} file")


def read_case(case: Case, modalities: tuple[str, ...], convention: str) -> CaseVolumes:
    """Decodes one case (see :class:`CaseVolumes`).

    Raises:
      InputError: unreadable files, shape/affine mismatches, NaN/Inf, bad label values.
    """
    seg_img = open_nifti(case.seg)
    check_ndim(case.seg, seg_img)
    if case.image4d is not None:
        img4 = open_nifti(case.image4d)
        check_ndim(case.image4d, img4, channels=len(MSD_CHANNELS))
        check_same_grid((case.image4d, img4), (case.seg, seg_img))
        labels = map_labels(read_labels(case.seg, seg_img), convention, case.case_id, case.seg)
        data = read_image(case.image4d, img4)  # [X, Y, Z, 4]
        channels = [data[..., MSD_CHANNELS.index(m)] for m in modalities]
        return CaseVolumes(channels, labels, [f"{case.image4d} (channel {m})" for m in modalities],
                           stored_orientation(case.image4d, img4), tuple(img4.shape[:3]), case.image4d)
    opened = []
    for m in modalities:
        path = case.modalities[m]
        img = open_nifti(path)
        check_ndim(path, img)
        opened.append((path, img))
    for other in opened[1:] + [(case.seg, seg_img)]:
        check_same_grid(opened[0], other)
    labels = map_labels(read_labels(case.seg, seg_img), convention, case.case_id, case.seg)
    channels = [read_image(path, img) for path, img in opened]
    ref_path, ref_img = opened[0]
    return CaseVolumes(channels, labels, [str(path) for path, _ in opened],
                       stored_orientation(ref_path, ref_img), tuple(ref_img.shape[:3]), ref_path)


def canonical_window(vol: CaseVolumes, cfg: DataConfig, case_id: str) -> tuple[tuple[int, int, int, int], str]:
    """(crop, slices) of ``cfg`` in canonical indices for this case (see ``data.crop_space``)."""
    if cfg.crop_space == "canonical":
        return tuple(cfg.crop), cfg.slices
    return stored_window_to_canonical(tuple(cfg.crop), cfg.slices, vol.stored_shape, vol.orientation,
                                      str(vol.reference), case_id)


def case_to_examples(case: Case, cfg: DataConfig, modalities: tuple[str, ...], convention: str) -> CaseResult:
    """Decodes and preprocesses one case into its examples (ids ``"<case>/z<index>"``, z canonical)."""
    vol = read_case(case, modalities, convention)
    crop, slices = canonical_window(vol, cfg, case.case_id)
    images, labs, z = case_examples(vol.channels, vol.labels, vol.names, crop, slices, cfg.normalise,
                                    cfg.downsample, case.case_id)
    ids = [f"{case.case_id}/z{int(i)}" for i in z]
    negative = negative_minima(vol.channels, vol.names) if cfg.normalise == "paper" else {}
    return CaseResult(Examples(images, labs, ids, [case.case_id] * len(ids)), negative)


def warn_negative(case_id: str, negative: dict[str, float]) -> None:
    """One :class:`NegativeVoxelsWarning` line naming the case, its channel files and minima."""
    if not negative:
        return
    files = ", ".join(f"{Path(name).name} (min {low:g})" for name, low in negative.items())
    one_line_warnings(NegativeVoxelsWarning)
    warnings.warn(f"case {case_id}: negative voxels in {files}; paper normalisation 2x/max(x)-1 maps "
                  f"them below -1 (kept as they are)", NegativeVoxelsWarning, stacklevel=3)


def decode_workers() -> int:
    """Threads used to decode cases: min(4, CPU count) (zlib and numpy release the GIL)."""
    return max(1, min(4, os.cpu_count() or 1))


def map_ordered(fn, items: list, workers: int, on_done=None) -> list:
    """``[fn(x) for x in items]`` on ``workers`` threads, results in order.

    The first exception (in item order) is re-raised after cancelling the work not yet started.
    ``on_done()`` is called once per finished item, in order.
    """
    if workers <= 1 or len(items) <= 1:
        out = []
        for x in items:
            out.append(fn(x))
            if on_done:
                on_done()
        return out
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = [pool.submit(fn, x) for x in items]
        out = []
        for fut in futures:
            out.append(fut.result())
            if on_done:
                on_done()
        return out
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _resolve_cache_dir(cache_dir) -> Path | None:
    if cache_dir is False:
        return None
    return Path(cache_dir).expanduser() if cache_dir is not None else cache_lib.default_cache_dir()


def _read_cache(path: Path) -> Dataset | None:
    arrays = cache_lib.load_arrays(path)
    ds = from_arrays(arrays) if arrays is not None else None
    if ds is None or ds.info.get("format_version") != cache_lib.CACHE_VERSION:
        if path.exists():
            log.warning("ignoring unreadable cache file %s; rebuilding it", path)
        return None
    return ds


def load_dataset(data_dir, cfg: DataConfig, cache_dir=None, progress: bool = True) -> Dataset:
    """Loads a BraTS dataset as patient-split, preprocessed 2D axial examples.

    Args:
      data_dir: the dataset folder (any supported layout), or a folder up to two levels above.
      cfg: the data settings (layout, modalities, crop, slices, normalise, downsample,
        test_fraction, split_seed, max_cases, grades).
      cache_dir: folder for the .npz cache; None -> ``$TRACIN_JAX_CACHE`` or
        ``~/.cache/tracin_jax``; False -> no cache. An unwritable cache folder only logs a warning.
      progress: tqdm bar over the cases being decoded.
    Returns:
      Dataset with train/test Examples (images f32[N, H, W, C], H = (y1 - y0) / downsample,
      W = (x1 - x0) / downsample, C = len(modalities)) and ``info``: layout, dataset root, cases,
      split, non-standard seg files, cache file and whether it was a cache hit, the config,
      ``class_slices`` ({"train"|"test": {"NCR/NET": n, "ED": n, "ET": n}}, the number of
      examples of the split whose labels contain the class) and ``negative_minima`` ({case:
      {channel file name: minimum}} for paper normalisation, whose channels hold voxels < 0;
      each such case is also reported by one :class:`NegativeVoxelsWarning` when decoded).
    Raises:
      InputError: any problem with the folder, its files or the config, in one line.
    """
    check_data_config(cfg)
    modalities = canonical_modalities(cfg.modalities)
    data_dir = Path(data_dir).expanduser()
    layout, found = discover_cases(data_dir, cfg.layout, cfg.grades)
    keep = set(first_cases([c.case_id for c in found], cfg.max_cases))
    cases = [c for c in found if c.case_id in keep]
    for case in cases:
        require_complete(case, modalities)
    train_ids, test_ids = split_cases([c.case_id for c in cases], cfg.test_fraction, cfg.split_seed)

    folder = _resolve_cache_dir(cache_dir)
    path = None
    if folder is not None:
        key = cache_lib.cache_key(data_dir, [f for c in cases for f in c.files()], cfg)
        path = cache_lib.cache_path(folder, key)
        cached = _read_cache(path)
        if cached is not None:
            cached.info.update(cache_file=str(path), cache_hit=True)
            for case_id, negative in cached.info.get("negative_minima", {}).items():
                warn_negative(case_id, negative)
            return cached

    convention = LAYOUT_CONVENTION[layout]
    height = (cfg.crop[1] - cfg.crop[0]) // cfg.downsample
    width = (cfg.crop[3] - cfg.crop[2]) // cfg.downsample
    with tqdm(total=len(cases), desc="decoding BraTS cases", unit="case", disable=not progress) as bar:
        results = map_ordered(lambda c: case_to_examples(c, cfg, modalities, convention), cases,
                              decode_workers(), on_done=lambda: bar.update(1))
    for case, res in zip(cases, results):
        warn_negative(case.case_id, res.negative)
    per_case = {case.case_id: res.examples for case, res in zip(cases, results)}
    negative = {case.case_id: res.negative for case, res in zip(cases, results) if res.negative}
    train = Examples.concat([per_case[i] for i in train_ids], height, width, len(modalities))
    test = Examples.concat([per_case[i] for i in test_ids], height, width, len(modalities))

    info = _info(data_dir, layout, convention, found, cases, cfg, modalities, train_ids, test_ids,
                 train, test, per_case)
    info["negative_minima"] = {cid: {Path(n).name: v for n, v in neg.items()} for cid, neg in negative.items()}
    info.update(cache_file=None, cache_hit=False)
    dataset = Dataset(train, test, info)
    if path is not None:
        info["cache_file"] = str(path)
        try:
            cache_lib.save_atomic(path, to_arrays(dataset))
        except OSError as err:
            info["cache_file"] = None
            log.warning("could not write the data cache %s: %s", path, err.strerror or err)
    return dataset


def _info(data_dir: Path, layout: str, convention: str, found: list[Case], cases: list[Case],
          cfg: DataConfig, modalities, train_ids, test_ids, train: Examples, test: Examples,
          per_case: dict[str, Examples]) -> dict:
    root = os.path.commonpath([str(c.folder.parent) for c in cases])
    grades = cfg.grades
    if layout != "brats2019" and cfg.grades != "all":
        grades = f"{cfg.grades} (ignored: {layout} has no grade folders)"
        log.warning("data.grades=%s ignored: the %s layout has no HGG/LGG folders", cfg.grades, layout)
    nonstandard = {
        c.case_id: Path(os.path.relpath(c.seg, data_dir)).as_posix() for c in cases if c.seg_nonstandard
    }
    return {
        "format_version": cache_lib.CACHE_VERSION,
        "data_dir": str(data_dir.resolve()),
        "root": root,
        "layout": layout,
        "label_convention": convention,
        "grades": grades,
        "case_grades": {c.case_id: c.grade for c in cases if c.grade is not None},
        "modalities": list(modalities),
        "n_cases_found": len(found),
        "n_cases": len(cases),
        "train_cases": list(train_ids),
        "test_cases": list(test_ids),
        "n_train_examples": len(train),
        "n_test_examples": len(test),
        "image_shape": list(train.images.shape[1:]),
        "cases_without_examples": sorted(i for i, ex in per_case.items() if len(ex) == 0),
        "class_slices": {"train": class_slice_counts(train.labels), "test": class_slice_counts(test.labels)},
        "seg_nonstandard": nonstandard,
        "config": dataclasses.asdict(cfg),
    }
