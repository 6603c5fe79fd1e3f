"""Turning one case's canonical volumes into 2D axial training examples.

Geometry (canonical RAS arrays, see :mod:`tracin_jax.data.nifti`): ``crop = (y0, y1, x0, x1)``
selects ``volume[y0:y1, x0:x1, z]`` of the canonical array: the first in-plane range applies to
array axis 0 (left -> right), the second to axis 1 (posterior -> anterior). An example image is
``[H, W] = [axis 0, axis 1]`` of one axial slice z (axis 2).

The config's crop and slice range are given in ``data.crop_space``:

- ``stored`` (default): indices of the array as stored in the file, as the paper's code cropped
  it (``raw[27:219, 27:219, z]``, 192 x 192). :func:`stored_window_to_canonical` maps the window
  through the file's orientation onto the canonical array, so for a BraTS file stored LPS the
  canonical window is ``[21:213, 21:213]`` (each in-plane axis flipped), for a RAS file it is
  ``[27:219, 27:219]``; either way the pixels are exactly those of ``raw[27:219, 27:219, z]``.
  Files whose stored axes are permuted relative to RAS (not stored axial) are an error.
- ``canonical``: indices of the canonical RAS array directly.
- ``centre``: only the window's size ``(y1 - y0) x (x1 - x0)`` is used: it is centred on each
  case's canonical in-plane extent (:func:`centre_window`), and where it reaches beyond the
  volume the case is padded with background (image 0, class 0) before anything else
  (:func:`pad_to_window`). The automatic settings of non-BraTS tasks use it, since their cases
  may differ in size.

Slices: ``a:b`` (half-open, in the crop space's indices), or ``tumour`` / ``foreground`` (the
same: every axial slice whose cropped labels hold any class other than background).

Order of operations per case: normalisation statistics on the whole volume -> crop -> choose
slices -> normalise -> downsample.

Normalisation:

- ``paper``: per case and channel, x -> 2 x / max(x) - 1, with max(x) over that channel's whole
  (uncropped, all-slices) volume, as the authors' code normalised each loaded volume. Background
  (0) becomes -1 and the brightest voxel of the volume 1. A channel with max <= 0 is an error.
  Negative voxels (resampled int16 files have a few) map below -1; they are kept as they are and
  reported by :func:`negative_minima` (the loader warns once per case).
- ``zscore``: per case and channel, (x - mean) / std with mean and std over the brain mask of the
  whole volume (voxels where any modality is non-zero); voxels outside the mask are set to 0.

Downsampling by an integer factor k (after cropping): images are mean-pooled over k x k blocks;
labels are picked with stride k at offset k // 2 (``labels[k//2::k, k//2::k]``), the centre-ish
voxel of each block, so classes stay exact integers.
"""

from __future__ import annotations

import numpy as np

from tracin_jax.errors import InputError


FOREGROUND_SLICES = ("tumour", "foreground")  # every slice holding a foreground class


def parse_slices(spec: str) -> tuple[int, int] | None:
    """``"a:b"`` -> (a, b) (half-open, b > a >= 0); ``"tumour"`` or ``"foreground"`` -> None."""
    if spec in FOREGROUND_SLICES:
        return None
    try:
        a, b = (int(v) for v in spec.split(":"))
    except ValueError:
        raise InputError(f"config value data.slices={spec!r} must be 'a:b' with b>a, or 'tumour'") from None
    if a < 0 or b <= a:
        raise InputError(f"config value data.slices={spec!r} must be 'a:b' with b>a>=0, or 'tumour'")
    return a, b


def centre_window(shape: tuple[int, ...], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of a ``size[0] x size[1]`` window centred on the in-plane extent
    ``shape[:2]``. Per axis of length n and window size h: ``(n - h) // 2`` voxels are cut before
    when n >= h; when n < h, ``(h - n) // 2`` voxels of padding come before (the start is
    negative); an odd voxel, cut or padded, goes after."""

    def start(n: int, h: int) -> int:
        return (n - h) // 2 if n >= h else -((h - n) // 2)

    y0, x0 = start(int(shape[0]), int(size[0])), start(int(shape[1]), int(size[1]))
    return y0, y0 + int(size[0]), x0, x0 + int(size[1])


def pad_to_window(channels: list[np.ndarray], labels: np.ndarray, crop: tuple[int, int, int, int]
                  ) -> tuple[list[np.ndarray], np.ndarray, tuple[int, int, int, int]]:
    """Pads canonical volumes in-plane with background so that ``crop`` lies inside them.

    Args:
      channels: image volumes [X, Y, Z] (any dtype), padded with 0.
      labels: u8[X, Y, Z] classes, padded with 0 (background).
      crop: (y0, y1, x0, x1), possibly reaching below 0 or beyond X, Y.
    Returns:
      (channels, labels, crop) with the same window in the padded arrays' indices; the inputs
      unchanged (not copied) when the window already fits.
    """
    y0, y1, x0, x1 = crop
    nx, ny = labels.shape[0], labels.shape[1]
    before = (max(0, -y0), max(0, -x0))
    after = (max(0, y1 - nx), max(0, x1 - ny))
    if not any(before + after):
        return channels, labels, crop
    width = ((before[0], after[0]), (before[1], after[1]), (0, 0))
    channels = [np.pad(v, width) for v in channels]
    labels = np.pad(labels, width)
    return channels, labels, (y0 + before[0], y1 + before[0], x0 + before[1], x1 + before[1])


def check_crop(shape: tuple[int, ...], crop: tuple[int, int, int, int], case_id: str) -> None:
    """InputError naming the case if ``crop`` does not fit the in-plane size ``shape[:2]``."""
    y0, y1, x0, x1 = crop
    if not (0 <= y0 < y1 <= shape[0] and 0 <= x0 < x1 <= shape[1]):
        raise InputError(
            f"case {case_id}: crop {tuple(crop)} (y0, y1, x0, x1) does not fit its in-plane size "
            f"{shape[0]}x{shape[1]}"
        )


def flip_range(a: int, b: int, n: int) -> tuple[int, int]:
    """The half-open range [a, b) of an axis of length n, counted from the other end: [n-b, n-a)."""
    return n - b, n - a


def stored_window_to_canonical(crop: tuple[int, int, int, int], slices: str, shape: tuple[int, ...],
                               ornt: np.ndarray, name: str, case_id: str
                               ) -> tuple[tuple[int, int, int, int], str]:
    """Places a crop and slice range given in stored-array indices on the canonical (RAS) array.

    Args:
      crop: (y0, y1, x0, x1) on stored axes 0 and 1.
      slices: ``"a:b"`` on stored axis 2, or ``"tumour"`` (orientation-free, returned as is).
      shape: the stored spatial shape (X, Y, Z).
      ornt: int[3, 2] from :func:`~tracin_jax.data.nifti.stored_orientation`.
      name: the file named when its axes are permuted.
      case_id: named when the window does not fit.
    Returns:
      (canonical crop, canonical slice spec): ``canonical[cy0:cy1, cx0:cx1, ca:cb]`` holds the
      voxels of ``stored[y0:y1, x0:x1, a:b]`` (reoriented).
    Raises:
      InputError: the window does not fit ``shape``, or the stored axes are permuted relative to
        RAS (the in-plane axes of the file are not the canonical ones).
    """
    if tuple(int(a) for a in ornt[:, 0]) != (0, 1, 2):
        codes = "".join("RAS"[int(a)] if d > 0 else "LPI"[int(a)] for a, d in ornt)
        raise InputError(
            f"{name}: stored axes are {codes}, not axial (x, y in-plane first), so a crop in stored "
            f"indices has no in-plane meaning; use --set data.crop_space=canonical"
        )
    check_crop(shape, crop, case_id)
    y0, y1, x0, x1 = crop
    if ornt[0, 1] < 0:
        y0, y1 = flip_range(y0, y1, shape[0])
    if ornt[1, 1] < 0:
        x0, x1 = flip_range(x0, x1, shape[1])
    rng = parse_slices(slices)
    if rng is None:
        return (y0, y1, x0, x1), slices
    a, b = rng
    check_slice_range(a, b, shape[2], case_id)
    if ornt[2, 1] < 0:
        a, b = flip_range(a, b, shape[2])
    return (y0, y1, x0, x1), f"{a}:{b}"


def check_slice_range(a: int, b: int, depth: int, case_id: str) -> None:
    """InputError naming the case if the slice range a:b does not fit ``depth`` axial slices."""
    if b > depth:
        raise InputError(
            f"case {case_id}: slice range {a}:{b} lies outside the volume's {depth} axial slices"
        )


def crop_inplane(volume: np.ndarray, crop: tuple[int, int, int, int]) -> np.ndarray:
    """``volume[y0:y1, x0:x1, ...]``: [X, Y, Z, ...] -> [y1-y0, x1-x0, Z, ...] (a view)."""
    y0, y1, x0, x1 = crop
    return volume[y0:y1, x0:x1]


def select_slices(labels: np.ndarray, spec: str, case_id: str) -> np.ndarray:
    """Axial slice indices to use.

    Args:
      labels: u8[H, W, Z] cropped class labels of the case (used by ``"tumour"``).
      spec: ``"a:b"``, or ``"tumour"`` / ``"foreground"`` (every z whose cropped labels contain
        any class other than background).
      case_id: named in the error message.
    Returns:
      int64[n] increasing slice indices (n may be 0 for ``"tumour"``).
    Raises:
      InputError: the range a:b lies outside the volume's Z slices.
    """
    rng = parse_slices(spec)
    depth = labels.shape[2]
    if rng is None:
        return np.flatnonzero(labels.any(axis=(0, 1)))
    a, b = rng
    check_slice_range(a, b, depth, case_id)
    return np.arange(a, b)


def paper_scale(channels: list[np.ndarray], names: list[str]) -> np.ndarray:
    """f32[C]: the maximum of each whole channel volume [X, Y, Z].

    InputError naming ``names[c]`` (the channel's file) if a maximum is <= 0.
    """
    top = np.array([float(v.max()) for v in channels], dtype=np.float32)
    for c, m in enumerate(top):
        if not m > 0:
            raise InputError(f"{names[c]}: image maximum is {float(m):g}; paper normalisation needs max > 0")
    return top


def negative_minima(channels: list[np.ndarray], names: list[str]) -> dict[str, float]:
    """{name: minimum} of every channel volume [X, Y, Z] whose minimum is below 0 (else {})."""
    out = {}
    for name, v in zip(names, channels):
        low = float(v.min())
        if low < 0:
            out[name] = low
    return out


def paper_normalise(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``2 x / scale - 1`` per channel: f32[..., C], f32[C] -> f32[..., C] in [-1, 1] for x >= 0.

    Negative x give values below -1 (kept, not clipped; see :func:`negative_minima`).
    """
    return (x.astype(np.float32) * (2.0 / scale) - 1.0).astype(np.float32)


def brain_mask(channels: list[np.ndarray]) -> np.ndarray:
    """bool[X, Y, Z]: voxels where any channel volume is non-zero."""
    mask = channels[0] != 0
    for v in channels[1:]:
        mask |= v != 0
    return mask


def zscore_stats(channels: list[np.ndarray], names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(mean f32[C], std f32[C]) of each channel volume inside the brain mask of all channels.

    InputError naming the channel's file when the mask is empty or the std is 0.
    """
    mask = brain_mask(channels)
    if not mask.any():
        raise InputError(f"{names[0]}: every voxel of every modality is 0; no brain to normalise")
    mean, std = np.zeros(len(channels), np.float32), np.zeros(len(channels), np.float32)
    for c, v in enumerate(channels):
        inside = v[mask].astype(np.float64)
        mean[c], std[c] = inside.mean(), inside.std()
        if not std[c] > 0:
            raise InputError(f"{names[c]}: constant inside the brain; zscore normalisation needs std > 0")
    return mean, std


def zscore_normalise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` per channel inside the brain (any channel non-zero), 0 outside.

    f32[..., C] -> f32[..., C].
    """
    x = x.astype(np.float32)
    out = (x - mean) / std
    out[~np.any(x != 0, axis=-1)] = 0.0
    return out.astype(np.float32)



def normalise_channels(img: np.ndarray, channels, names, normalise: str) -> np.ndarray:
    """``img`` f32[..., M] (cut from ``channels``, the M whole channel volumes named ``names``)
    normalised per channel with statistics of the whole volumes: ``paper`` (2x/max(x)-1) or
    ``zscore`` (inside the brain); another value is a one-line InputError."""
    if normalise == "paper":
        return paper_normalise(img, paper_scale(channels, names))
    if normalise == "zscore":
        mean, std = zscore_stats(channels, names)
        return zscore_normalise(img, mean, std)
    raise InputError(f"config value data.normalise={normalise!r} is not one of paper, zscore")

def downsample_images(images: np.ndarray, k: int) -> np.ndarray:
    """Mean-pools k x k blocks: f32[N, H, W, C] -> f32[N, H/k, W/k, C] (H, W divisible by k)."""
    if k == 1:
        return images
    n, h, w, c = images.shape
    if h % k or w % k:
        raise InputError(f"config value data.downsample={k} must divide the crop {h}x{w}")
    return images.reshape(n, h // k, k, w // k, k, c).mean(axis=(2, 4), dtype=np.float32)


def downsample_labels(labels: np.ndarray, k: int) -> np.ndarray:
    """Strided pick ``labels[:, k//2::k, k//2::k]``: u8[N, H, W] -> u8[N, H/k, W/k]."""
    if k == 1:
        return labels
    return np.ascontiguousarray(labels[:, k // 2 :: k, k // 2 :: k])


def case_examples(channels: list[np.ndarray], labels: np.ndarray, names: list[str], crop, slices: str,
                  normalise: str, downsample: int, case_id: str
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All preprocessing of one case.

    Args:
      channels: C canonical image volumes [X, Y, Z] (any real dtype), in output channel order.
      labels: u8[X, Y, Z] canonical classes (0..C).
      names: C file names (for errors), one per channel.
      crop, slices: the window in canonical indices (the DataConfig values for
        ``crop_space=canonical``, else :func:`stored_window_to_canonical` of them).
      normalise, downsample: the DataConfig fields.
      case_id: named in errors.
    Returns:
      images f32[n, H, W, C], labels u8[n, H, W], z int64[n]; H = (y1-y0)/k, W = (x1-x0)/k.
    """
    for name, v in zip(names, channels):
        if v.shape != labels.shape:
            raise InputError(f"{name}: shape {v.shape} differs from the seg shape {labels.shape}")
    check_crop(labels.shape, crop, case_id)
    lab = crop_inplane(labels, crop)  # [H, W, Z]
    z = select_slices(lab, slices, case_id)
    img = np.stack([crop_inplane(v, crop)[:, :, z] for v in channels], axis=-1)  # [H, W, n, C]
    img = normalise_channels(img, channels, names, normalise)
    img = np.ascontiguousarray(np.moveaxis(img, 2, 0), dtype=np.float32)  # [n, H, W, C]
    lab = np.ascontiguousarray(np.moveaxis(lab[:, :, z], 2, 0), dtype=np.uint8)  # [n, H, W]
    return downsample_images(img, downsample), downsample_labels(lab, downsample), z


# ------------------------------------------------------------------------------ volumes (3D)
#
# A 3D run's example is a whole case: the canonical volume [X, Y, Z] (axes in RAS order, the
# network's D, H, W) cut to a window of ``data.volume`` voxels centred on the case (padded with
# background where the case is smaller, an odd voxel of padding or cut going after), normalised
# with the statistics of the whole case, then downsampled by k along all three axes: images
# mean-pooled over k x k x k blocks, labels picked at offset k // 2 with stride k. The window is
# the 2D centre window (:func:`centre_window`) extended to the third axis, so slice z of a
# volume example is the 2D example of that slice whenever the two windows agree in-plane.


def check_patch_fits(patch, volume) -> None:
    """One-line InputError when a training patch (``data.patch``, voxels after downsampling) is
    larger than the volume (X, Y, Z after downsampling) along an axis."""
    if any(int(p) > int(v) for p, v in zip(patch, volume)):
        raise InputError(f"config value data.patch={','.join(str(int(p)) for p in patch)} is "
                         f"larger than the volume {'x'.join(str(int(v)) for v in volume)} "
                         f"(voxels after data.downsample) along an axis; choose a patch no "
                         f"larger than the volume")


def volume_window(shape: tuple[int, ...], size: tuple[int, int, int]) -> tuple[tuple[int, int], ...]:
    """((x0, x1), (y0, y1), (z0, z1)): a window of ``size`` centred on ``shape[:3]``, per axis as
    :func:`centre_window` (a negative start or a stop beyond the axis means padding)."""
    out = []
    for n, h in zip(shape[:3], size):
        n, h = int(n), int(h)
        start = (n - h) // 2 if n >= h else -((h - n) // 2)
        out.append((start, start + h))
    return tuple(out)


def cut_volume(volume: np.ndarray, window: tuple[tuple[int, int], ...]) -> np.ndarray:
    """``volume`` [X, Y, Z, ...] cut to ``window`` (:func:`volume_window`), padded with 0 where the
    window reaches outside it: -> [x1 - x0, y1 - y0, z1 - z0, ...]."""
    pads, cuts = [], []
    for (a, b), n in zip(window, volume.shape[:3]):
        pads.append((max(0, -a), max(0, b - n)))
        cuts.append(slice(max(0, a), min(n, b)))
    out = volume[tuple(cuts)]
    if any(p for pair in pads for p in pair):
        out = np.pad(out, pads + [(0, 0)] * (volume.ndim - 3))
    return out


def downsample_volume_images(images: np.ndarray, k: int) -> np.ndarray:
    """Mean-pools k x k x k blocks: f32[X, Y, Z, C] -> f32[X/k, Y/k, Z/k, C] (each divisible by k)."""
    if k == 1:
        return images
    x, y, z, c = images.shape
    if x % k or y % k or z % k:
        raise InputError(f"config value data.downsample={k} must divide the volume {x}x{y}x{z}")
    return images.reshape(x // k, k, y // k, k, z // k, k, c).mean(axis=(1, 3, 5), dtype=np.float32)


def downsample_volume_labels(labels: np.ndarray, k: int) -> np.ndarray:
    """Strided pick ``labels[k//2::k, k//2::k, k//2::k]``: u8[X, Y, Z] -> u8[X/k, Y/k, Z/k]."""
    if k == 1:
        return labels
    o = k // 2
    return np.ascontiguousarray(labels[o::k, o::k, o::k])


def case_volume(channels: list[np.ndarray], labels: np.ndarray, names: list[str],
                size: tuple[int, int, int], normalise: str, downsample: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """All preprocessing of one case as one volume example.

    Args:
      channels: M canonical image volumes [X, Y, Z] (any real dtype), in output channel order.
      labels: u8[X, Y, Z] canonical classes (0..C).
      names: M file names (for errors), one per channel.
      size: the window (``data.volume``) in voxels before downsampling, each a multiple of
        ``downsample``.
      normalise, downsample: the DataConfig fields (statistics over the whole case).
    Returns:
      images f32[X', Y', Z', M] and labels u8[X', Y', Z'], (X', Y', Z') = size / downsample.
    """
    for name, v in zip(names, channels):
        if v.shape != labels.shape:
            raise InputError(f"{name}: shape {v.shape} differs from the seg shape {labels.shape}")
    window = volume_window(labels.shape, size)
    img = np.stack([cut_volume(v, window) for v in channels], axis=-1)  # [X, Y, Z, M]
    img = normalise_channels(img, channels, names, normalise)
    lab = cut_volume(labels, window).astype(np.uint8, copy=False)
    return (np.ascontiguousarray(downsample_volume_images(img, downsample), dtype=np.float32),
            downsample_volume_labels(lab, downsample))
