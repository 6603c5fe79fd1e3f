"""``load_dataset``: dataset folder -> preprocessed, patient-split examples (cached): 2D axial
slices, or with ``dims=3`` one volume per case (:func:`case_to_volume`).

Steps: discover the cases and the task (:mod:`~tracin_jax.data.discover`; BraTS, any MSD task,
nnU-Net v2 raw), choose the automatic data settings of a non-BraTS task
(:func:`resolve_data_config`), keep the first ``max_cases`` sorted ids, check every case has its
channels and labels (before decoding anything), split by patient (:mod:`~tracin_jax.data.split`;
labelled ``imagesTs`` cases are the test split when there are any), then either read the cache
or, per case, decode it into canonical volumes with its labels mapped to class indices 0..C
(:func:`read_case`: :mod:`~tracin_jax.data.nifti`, :mod:`~tracin_jax.data.labels`), cut its
examples from those volumes (:func:`case_to_examples`: axial slices,
:mod:`~tracin_jax.data.preprocess`) and write the cache (:mod:`~tracin_jax.data.cache`).

Automatic settings (``data.auto``, the default): the BraTS settings of every config (the crop
``27:219``, slices ``90:100``, the four BraTS modalities, paper normalisation) mean nothing for
another task, so for an MSD task other than Task01 and for an nnU-Net dataset they are replaced
by: every channel of ``dataset.json`` in its order; an in-plane window as large as the largest
case's canonical in-plane extent, rounded up to a multiple of ``data.downsample * size_multiple``
(the trainer passes ``2**model.depth``) and centred on each case (``crop_space=centre``, padded
with background where a case is smaller); every axial slice holding a foreground class
(``slices=foreground``); z-score normalisation (``normalise=zscore``); ``grades=all`` (a BraTS
2018/2019 setting). The returned config holds
those values with ``auto=False``, so loading with it again gives the same examples. BraTS data
ignore ``data.auto``.

Volumes (``dims=3``, a 3D run): ``data.crop``, ``data.crop_space`` and ``data.slices`` are not
used; each case is cut to the window ``data.volume`` centred on it, normalised and downsampled
on all three axes (:func:`~tracin_jax.data.preprocess.case_volume`). A ``data.volume`` of 0,0,0
is chosen by :func:`prepare` for any dataset: per canonical axis the largest case, rounded up to
a multiple of ``data.downsample * size_multiple``. The automatic settings of a non-BraTS task
are then the channels, ``zscore``, the layout and ``grades=all``.
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
from tracin_jax.data.discover import (GRADES, LAYOUTS, MODALITY_TOKENS, MSD_CHANNELS, Case, Discovery,
                                      discover_dataset)
from tracin_jax.data.labels import LAYOUT_CONVENTION, map_labels, map_task_labels
from tracin_jax.data.nifti import (check_ndim, check_same_grid, open_nifti, read_image, read_labels,
                                   stored_orientation)
from tracin_jax.data.preprocess import (case_examples, case_volume, centre_window, check_patch_fits,
                                        negative_minima, pad_to_window, parse_slices,
                                        stored_window_to_canonical)
from tracin_jax.data.split import first_cases, split_cases
from tracin_jax.errors import InputError
from tracin_jax.task import Task, brats

log = logging.getLogger(__name__)
CROP_SPACES = ("stored", "canonical", "centre")


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
    """One decoded case: its canonical volumes, from which examples are cut.

    Attributes:
      channels: M canonical channel volumes [X, Y, Z] in ``modalities`` order (stored dtype, see
        :func:`~tracin_jax.data.nifti.read_image`).
      labels: u8[X, Y, Z] canonical class indices 0..C.
      names: M file names used in messages, one per channel.
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


def check_data_config(cfg: DataConfig, dims: int = 2) -> None:
    """InputError naming the first DataConfig value the loader cannot use (``dims=3``: the
    in-plane crop and the slices are not used, the volume window and patch are checked)."""
    if cfg.layout != "auto" and cfg.layout not in LAYOUTS:
        raise InputError(f"config value data.layout={cfg.layout!r} is not one of auto, {', '.join(LAYOUTS)}")
    if cfg.grades not in GRADES:
        raise InputError(f"config value data.grades={cfg.grades!r} is not one of {', '.join(GRADES)}")
    if cfg.normalise not in ("paper", "zscore"):
        raise InputError(f"config value data.normalise={cfg.normalise!r} is not one of paper, zscore")
    if cfg.crop_space not in CROP_SPACES:
        raise InputError(f"config value data.crop_space={cfg.crop_space!r} is not one of {', '.join(CROP_SPACES)}")
    if dims == 3:
        _check_volume_config(cfg)
    else:
        _check_slice_config(cfg)
    if not 0.0 < cfg.test_fraction < 1.0:
        raise InputError(f"config value data.test_fraction={cfg.test_fraction} must lie in (0, 1)")
    if cfg.max_cases < 0:
        raise InputError(f"config value data.max_cases={cfg.max_cases} must be >= 0 (0 = all)")
    if not cfg.modalities:
        raise InputError("config value data.modalities is empty")


def _check_volume_config(cfg: DataConfig) -> None:
    """The 3D data values: downsample >= 1, a given volume divisible by it, a given patch no
    larger than the given volume (after downsampling)."""
    volume, patch = tuple(cfg.volume), tuple(cfg.patch)
    if cfg.downsample < 1:
        raise InputError(f"config value data.downsample={cfg.downsample} must be at least 1")
    for name, value in (("volume", volume), ("patch", patch)):
        if len(value) != 3 or min(value) < 0 or (any(value) and not all(value)):
            raise InputError(f"config value data.{name}={','.join(map(str, value))} must be "
                             f"X,Y,Z, three positive integers (or 0,0,0)")
    if any(volume):
        if any(n % cfg.downsample for n in volume):
            raise InputError(f"config value data.downsample={cfg.downsample} must divide "
                             f"data.volume={','.join(map(str, volume))}")
        if any(patch):
            check_patch_fits(patch, [n // cfg.downsample for n in volume])


def _check_slice_config(cfg: DataConfig) -> None:
    crop = tuple(cfg.crop)
    if len(crop) != 4 or not (0 <= crop[0] < crop[1] and 0 <= crop[2] < crop[3]):
        raise InputError(f"config value data.crop={tuple(cfg.crop)} must be y0,y1,x0,x1 with 0<=y0<y1, 0<=x0<x1")
    h, w = cfg.crop[1] - cfg.crop[0], cfg.crop[3] - cfg.crop[2]
    if cfg.downsample < 1 or h % cfg.downsample or w % cfg.downsample:
        raise InputError(f"config value data.downsample={cfg.downsample} must divide the crop {h}x{w}")
    parse_slices(cfg.slices)


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


def task_channels(names, task: Task) -> tuple[str, ...]:
    """Config channel names -> the task's own names (matched case-insensitively), in the config's
    order; InputError naming a name that is not one of the task's channels."""
    by_low = {c.lower(): c for c in task.channels}
    out = []
    for name in names:
        channel = by_low.get(str(name).lower())
        if channel is None:
            raise InputError(f"config value data.modalities has {name!r}, not a channel of "
                             f"{task.name} ({', '.join(task.channels)}); data.auto=true takes them all")
        if channel in out:
            raise InputError(f"config value data.modalities names {channel} twice")
        out.append(channel)
    return tuple(out)


def require_complete(case: Case, modalities: tuple[str, ...]) -> None:
    """InputError naming the case folder and what it lacks (a modality, or the seg); for an
    nnU-Net case, the missing file itself."""
    missing = case.missing(modalities, need_seg=True)
    if not missing:
        return
    if case.expected:
        what = missing[0]
        if what == "seg":
            raise InputError(f"case {case.case_id}: label file missing: {case.expected['seg']}")
        index = list(case.expected).index(what)
        raise InputError(f"case {case.case_id}: channel {index:04d} ({what}) file missing: "
                         f"{case.expected[what]}")
    if case.image4d is not None:
        raise InputError(f"case {case.case_id}: no label file in {case.folder.parent / 'labelsTr'}")
    raise InputError(f"case folder {case.folder} has no {', '.join(missing)} file")


def map_case_labels(seg: np.ndarray, labelling: str | Task, case_id: str, path) -> np.ndarray:
    """Raw labels -> u8 class indices: a BraTS label convention name
    (:func:`~tracin_jax.data.labels.map_labels`) or a task read from ``dataset.json``
    (:func:`~tracin_jax.data.labels.map_task_labels`)."""
    if isinstance(labelling, str):
        return map_labels(seg, labelling, case_id, path)
    return map_task_labels(seg, labelling, case_id, path)


def read_case(case: Case, modalities: tuple[str, ...], convention: str | Task,
              channel_order: tuple[str, ...] = MSD_CHANNELS) -> CaseVolumes:
    """Decodes one case into canonical volumes (see :class:`CaseVolumes`).

    Args:
      case: the case's files.
      modalities: the channels to keep, in output order.
      convention: a BraTS label convention name, or the :class:`~tracin_jax.task.Task` whose
        label values map to its class indices.
      channel_order: the channels of a 4D (MSD) image file, in file order (a one-channel task
        may store 3D images).
    Raises:
      InputError: unreadable files, shape/affine mismatches, NaN/Inf, bad label values.
    """
    seg_img = open_nifti(case.seg)
    check_ndim(case.seg, seg_img)
    if case.image4d is not None:
        img4 = open_nifti(case.image4d)
        if len(channel_order) == 1:
            check_ndim(case.image4d, img4)
        else:
            check_ndim(case.image4d, img4, channels=len(channel_order))
        check_same_grid((case.image4d, img4), (case.seg, seg_img))
        labels = map_case_labels(read_labels(case.seg, seg_img), convention, case.case_id, case.seg)
        data = read_image(case.image4d, img4)  # [X, Y, Z, M] ([X, Y, Z] for one channel)
        if data.ndim == 3:
            data = data[..., None]
        channels = [data[..., channel_order.index(m)] for m in modalities]
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
    labels = map_case_labels(read_labels(case.seg, seg_img), convention, case.case_id, case.seg)
    channels = [read_image(path, img) for path, img in opened]
    ref_path, ref_img = opened[0]
    return CaseVolumes(channels, labels, [str(path) for path, _ in opened],
                       stored_orientation(ref_path, ref_img), tuple(ref_img.shape[:3]), ref_path)


def canonical_window(vol: CaseVolumes, cfg: DataConfig, case_id: str) -> tuple[tuple[int, int, int, int], str]:
    """(crop, slices) of ``cfg`` in canonical indices for this case (see ``data.crop_space``);
    with ``centre`` the window may reach outside the volume (see
    :func:`~tracin_jax.data.preprocess.pad_to_window`)."""
    if cfg.crop_space == "canonical":
        return tuple(cfg.crop), cfg.slices
    if cfg.crop_space == "centre":
        y0, y1, x0, x1 = cfg.crop
        return centre_window(vol.labels.shape, (y1 - y0, x1 - x0)), cfg.slices
    return stored_window_to_canonical(tuple(cfg.crop), cfg.slices, vol.stored_shape, vol.orientation,
                                      str(vol.reference), case_id)


def case_to_examples(case: Case, cfg: DataConfig, modalities: tuple[str, ...], convention: str | Task,
                     channel_order: tuple[str, ...] = MSD_CHANNELS) -> CaseResult:
    """Decodes one case (:func:`read_case`) and cuts its examples from the volumes: axial slices
    (ids ``"<case>/z<index>"``, z canonical after any padding, which is in-plane only)."""
    vol = read_case(case, modalities, convention, channel_order)
    crop, slices = canonical_window(vol, cfg, case.case_id)
    channels, labels = vol.channels, vol.labels
    if cfg.crop_space == "centre":
        channels, labels, crop = pad_to_window(channels, labels, crop)
    images, labs, z = case_examples(channels, labels, vol.names, crop, slices, cfg.normalise,
                                    cfg.downsample, case.case_id)
    ids = [f"{case.case_id}/z{int(i)}" for i in z]
    negative = negative_minima(vol.channels, vol.names) if cfg.normalise == "paper" else {}
    return CaseResult(Examples(images, labs, ids, [case.case_id] * len(ids)), negative)


def case_to_volume(case: Case, cfg: DataConfig, modalities: tuple[str, ...], convention: str | Task,
                   channel_order: tuple[str, ...] = MSD_CHANNELS) -> CaseResult:
    """Decodes one case (:func:`read_case`) into its one volume example (3D runs): the window
    ``cfg.volume`` centred on the case, normalised, downsampled on all three axes
    (:func:`~tracin_jax.data.preprocess.case_volume`); id = the case id."""
    vol = read_case(case, modalities, convention, channel_order)
    images, labels = case_volume(vol.channels, vol.labels, vol.names, tuple(cfg.volume),
                                 cfg.normalise, cfg.downsample)
    negative = negative_minima(vol.channels, vol.names) if cfg.normalise == "paper" else {}
    return CaseResult(Examples(images[None], labels[None], [case.case_id], [case.case_id]),
                      negative)


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


class Prepared(NamedTuple):
    """A data config resolved against a dataset folder (:func:`prepare`)."""

    config: "DataConfig"  # auto settings applied (auto=False) for a non-BraTS task
    task: Task
    discovery: Discovery
    channels: tuple[str, ...]  # the channels kept, in input order
    auto: dict  # the settings chosen automatically ({} when none)


def canonical_extent(case: Case, axes: int = 2) -> tuple[int, ...]:
    """The size of a case along its first ``axes`` canonical axes (2: in-plane, axes 0 and 1; 3:
    the whole volume X, Y, Z), from its first image file's header."""
    path = case.image4d if case.image4d is not None else case.modalities[sorted(case.modalities)[0]]
    img = open_nifti(path)
    ornt = stored_orientation(path, img)
    canon = [0, 0, 0]
    for axis, (target, _) in enumerate(ornt):
        canon[int(target)] = int(img.shape[axis])
    return tuple(canon[:axes])


def automatic_volume(cases: list[Case], step: int) -> tuple[int, int, int]:
    """The 3D window of ``data.volume=0,0,0``: per canonical axis the largest size among
    ``cases``, rounded up to a multiple of ``step`` (``downsample * 2**model.depth``)."""
    ext = [canonical_extent(c, 3) for c in cases if c.image4d is not None or c.modalities]
    return tuple(-(-max(e[a] for e in ext) // step) * step for a in range(3))


def automatic_config(cfg: DataConfig, task: Task, layout: str, cases: list[Case],
                     size_multiple: int = 1, dims: int = 2) -> tuple[DataConfig, dict]:
    """The automatic data settings of a non-BraTS task (see the module docstring) and a dict of
    the values chosen. ``cases``: the cases loaded (their headers give the in-plane extents).
    ``dims=3``: the channels, normalisation, layout and grades only (the in-plane window and the
    slices are 2D settings; :func:`prepare` chooses the volume window)."""
    if dims == 3:
        chosen = {"layout": layout, "modalities": tuple(task.channels), "normalise": "zscore",
                  "grades": "all"}
        return dataclasses.replace(cfg, auto=False, **chosen), chosen
    step = cfg.downsample * max(1, int(size_multiple))
    ext = [canonical_extent(c) for c in cases if c.image4d is not None or c.modalities]
    height = max(e[0] for e in ext)
    width = max(e[1] for e in ext)
    h, w = -(-height // step) * step, -(-width // step) * step
    chosen = {"layout": layout, "modalities": tuple(task.channels), "crop": (0, h, 0, w),
              "crop_space": "centre", "slices": "foreground", "normalise": "zscore", "grades": "all"}
    return dataclasses.replace(cfg, auto=False, **chosen), chosen


def prepare(data_dir, cfg: DataConfig, size_multiple: int = 1, dims: int = 2) -> Prepared:
    """Checks ``cfg``, discovers the dataset, reads its task and, for a non-BraTS task with
    ``cfg.auto``, chooses the automatic settings (window sizes a multiple of
    ``cfg.downsample * size_multiple``); with ``dims=3``, a ``data.volume`` of 0,0,0 becomes the
    automatic volume window (:func:`automatic_volume`) for any dataset, BraTS included.
    InputError for anything wrong, in one line."""
    check_data_config(cfg, dims)
    found = discover_dataset(Path(data_dir).expanduser(), cfg.layout, cfg.grades)
    auto: dict = {}
    keep = set(first_cases([c.case_id for c in found.cases], cfg.max_cases))
    kept = [c for c in found.cases if c.case_id in keep]
    if found.task is None:
        channels = canonical_modalities(cfg.modalities)
        task = brats(channels, layout=found.layout, dims=dims)
    else:
        task = dataclasses.replace(found.task, dims=dims)
        if cfg.auto:
            cfg, auto = automatic_config(cfg, task, found.layout, kept, size_multiple, dims)
            check_data_config(cfg, dims)
        channels = task_channels(cfg.modalities, task)
        task = dataclasses.replace(task, channels=channels) if channels != task.channels else task
    if dims == 3 and not any(cfg.volume) and kept:
        volume = automatic_volume(kept, cfg.downsample * max(1, int(size_multiple)))
        cfg = dataclasses.replace(cfg, volume=volume)
        auto = {**auto, "volume": volume}
        check_data_config(cfg, dims)
    return Prepared(cfg, task, found, channels, auto)


def resolve_data_config(data_dir, cfg: DataConfig, size_multiple: int = 1, dims: int = 2
                        ) -> tuple[DataConfig, Task, dict]:
    """(the data config to record, the task, the settings chosen automatically) for a dataset
    folder: ``cfg`` itself for BraTS data or ``auto=False``; for another task with ``auto``, the
    automatic settings (module docstring); with ``dims=3`` also the volume window when
    ``data.volume`` is 0,0,0. InputError in one line for bad data or config."""
    prep = prepare(data_dir, cfg, size_multiple, dims)
    return prep.config, prep.task, prep.auto


def load_dataset(data_dir, cfg: DataConfig, cache_dir=None, progress: bool = True,
                 size_multiple: int = 1, dims: int = 2) -> Dataset:
    """Loads a dataset (BraTS, any MSD task, nnU-Net v2 raw) as patient-split, preprocessed 2D
    axial examples, or (``dims=3``) one volume example per case.

    Args:
      data_dir: the dataset folder (any supported layout), or a folder up to two levels above.
      cfg: the data settings (layout, modalities, crop, slices, normalise, downsample,
        test_fraction, split_seed, max_cases, grades, auto).
      cache_dir: folder for the .npz cache; None -> ``$TRACIN_JAX_CACHE`` or
        ``~/.cache/tracin_jax``; False -> no cache. An unwritable cache folder only logs a warning.
      progress: tqdm bar over the cases being decoded.
      size_multiple: for the automatic settings only (a non-BraTS task's window, a 3D
        ``data.volume`` of 0,0,0): the size after downsampling is a multiple of it
        (``2**model.depth`` for the built-in networks).
      dims: 2 (axial slices) or 3 (``model.dims=3``: one example per case, its volume window
        ``data.volume`` downsampled on all three axes; ``data.crop`` and ``data.slices`` are
        not used). Part of the cache key.
    Returns:
      Dataset with train/test Examples (images f32[N, H, W, M], H = (y1 - y0) / downsample,
      W = (x1 - x0) / downsample, M = len(modalities); labels u8[N, H, W] class indices 0..C;
      with ``dims=3`` images f32[N, X, Y, Z, M] and labels u8[N, X, Y, Z], canonical RAS axes,
      (X, Y, Z) = data.volume / downsample, N the number of cases, ids the case ids)
      and ``info``: layout, dataset root, cases, split, ``task`` (:meth:`Task.to_dict`: channels,
      classes, label values), ``config`` (the data config used, automatic settings applied),
      ``data_auto`` (the settings chosen automatically, {} if none), non-standard seg files,
      cache file and whether it was a cache hit, ``class_slices`` ({"train"|"test": {class: n}},
      the number of examples of the split whose labels contain the class) and
      ``negative_minima`` ({case: {channel file name: minimum}} for paper normalisation, whose
      channels hold voxels < 0; each such case is also reported by one
      :class:`NegativeVoxelsWarning` when decoded).
    Raises:
      InputError: any problem with the folder, its files or the config, in one line.
    """
    prep = prepare(data_dir, cfg, size_multiple, dims)
    cfg, task, modalities = prep.config, prep.task, prep.channels
    layout, found = prep.discovery.layout, prep.discovery.cases
    data_dir = Path(data_dir).expanduser()
    keep = set(first_cases([c.case_id for c in found], cfg.max_cases))
    cases = [c for c in found if c.case_id in keep]
    for case in cases:
        require_complete(case, modalities)
    train_ids, test_ids, split = split_dataset(cases, cfg)

    folder = _resolve_cache_dir(cache_dir)
    path = None
    if folder is not None:
        files = [f for c in cases for f in c.files()]
        if prep.discovery.description is not None:
            files.append(prep.discovery.description)
        key = cache_lib.cache_key(data_dir, files, cfg, dims)
        path = cache_lib.cache_path(folder, key)
        cached = _read_cache(path)
        if cached is not None:
            cached.info.update(cache_file=str(path), cache_hit=True)
            for case_id, negative in cached.info.get("negative_minima", {}).items():
                warn_negative(case_id, negative)
            return cached

    if prep.discovery.task is None:
        convention, labelling, order = LAYOUT_CONVENTION[layout], LAYOUT_CONVENTION[layout], MSD_CHANNELS
    else:
        convention, labelling, order = "dataset.json", task, prep.discovery.task.channels
    if dims == 3:
        spatial = tuple(n // cfg.downsample for n in cfg.volume)
        cut = case_to_volume
    else:
        spatial = ((cfg.crop[1] - cfg.crop[0]) // cfg.downsample,
                   (cfg.crop[3] - cfg.crop[2]) // cfg.downsample)
        cut = case_to_examples
    what = "BraTS" if task.is_brats else task.name
    with tqdm(total=len(cases), desc=f"decoding {what} cases", unit="case", disable=not progress) as bar:
        results = map_ordered(lambda c: cut(c, cfg, modalities, labelling, order), cases,
                              decode_workers(), on_done=lambda: bar.update(1))
    for case, res in zip(cases, results):
        warn_negative(case.case_id, res.negative)
    per_case = {case.case_id: res.examples for case, res in zip(cases, results)}
    negative = {case.case_id: res.negative for case, res in zip(cases, results) if res.negative}
    train = Examples.concat([per_case[i] for i in train_ids], *spatial, len(modalities))
    test = Examples.concat([per_case[i] for i in test_ids], *spatial, len(modalities))

    info = _info(data_dir, layout, convention, found, cases, cfg, modalities, train_ids, test_ids,
                 train, test, per_case, task)
    info["split"] = split
    info["data_auto"] = {k: list(v) if isinstance(v, tuple) else v for k, v in prep.auto.items()}
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


def split_dataset(cases: list[Case], cfg: DataConfig) -> tuple[list[str], list[str], str]:
    """(train ids, test ids, how): the dataset's own test cases (labelled ``imagesTs``, how =
    ``"imagesTs"``) when it has any, else the seeded patient split of ``cfg`` (``"random"``)."""
    fixed = sorted(c.case_id for c in cases if c.split == "test")
    if fixed:
        train = sorted(c.case_id for c in cases if c.split != "test")
        if not train:
            raise InputError(f"{cases[0].folder.parent}: no training case (imagesTr) to go with the "
                             f"{len(fixed)} labelled imagesTs case(s)")
        return train, fixed, "imagesTs"
    train, test = split_cases([c.case_id for c in cases], cfg.test_fraction, cfg.split_seed)
    return train, test, "random"


def _info(data_dir: Path, layout: str, convention: str, found: list[Case], cases: list[Case],
          cfg: DataConfig, modalities, train_ids, test_ids, train: Examples, test: Examples,
          per_case: dict[str, Examples], task: Task) -> dict:
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
        "task": task.to_dict(),
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
        "class_slices": {"train": class_slice_counts(train.labels, task.classes),
                         "test": class_slice_counts(test.labels, task.classes)},
        "seg_nonstandard": nonstandard,
        "config": dataclasses.asdict(cfg),
    }
