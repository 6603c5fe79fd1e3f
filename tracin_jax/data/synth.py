"""Synthetic BraTS-like dataset, written in the BraTS 2019 training layout.

Real BraTS data needs a registration and cannot be shipped, so demos and tests use volumes that
the loader reads exactly as real BraTS (layout ``brats2019``)::

    out_dir/MICCAI_BraTS_2019_Data_Training/HGG/BraTS19_SYN_0001_1/BraTS19_SYN_0001_1_flair.nii.gz
                                                                   ..._t1, _t1ce, _t2, _seg
    out_dir/MICCAI_BraTS_2019_Data_Training/synth.json   (seed, number of cases, shape)

Each case is a 240 x 240 x 155 volume of 1 mm voxels, int16 images and a uint8 segmentation with
the BraTS 2018-2021 labels {0, 1 NCR/NET, 2 ED, 4 ET}. The header affine is that of real BraTS
files, ``diag(-1, -1, 1)`` with origin (0, 239, 0): array axis 0 runs right to left, axis 1
anterior to posterior, axis 2 inferior to superior, so the loader's reorientation to RAS is
exercised.

Anatomy (built in RAS millimetres around the brain centre, with a small random yaw):

- a skull-stripped brain: an egg-shaped ellipsoid (wider posteriorly, flatter inferiorly) whose
  boundary is perturbed by smooth random fields; every voxel outside it is exactly 0;
- a thin CSF rim under the surface, sulci (thin sheets around the zero set of a smooth random
  field, down to ~17 mm depth) lined by a grey-matter cortex ribbon, an interhemispheric fissure
  above the corpus callosum and towards the poles, deep grey nuclei and two arched lateral ventricles
  whose bodies cross the central axial slices; white matter elsewhere;
- one or two gliomas built like real ones: a tumour core (a smoothly deformed, anisotropic,
  rotated blob) whose outer shell enhances (label 4) around a necrotic centre (label 1), inside
  a larger, independently deformed oedema envelope (label 2) that spares CSF. Some cores have no
  necrosis, some do not enhance (the whole core is non-enhancing tumour, label 1). The first
  tumour sits in one hemisphere at a height that overlaps the central slices z = 90..99 in most
  cases; a second, smaller one may appear anywhere in the brain.

Contrasts (relative tissue means per modality, jittered per case, see ``CONTRAST``): enhancing
tumour bright on T1ce; oedema bright on FLAIR and T2; necrosis dark on T1ce and bright on T2;
CSF dark on FLAIR and T1, bright on T2; white matter brighter than grey matter on T1. Images then
get a mild texture that follows the gyral pattern, a smooth multiplicative bias field per
modality, and Rician noise (magnitude of a complex Gaussian signal), inside the brain only.

A second task, for data that is not BraTS (:func:`write_synthetic_nnunet`), uses the same
anatomy in the nnU-Net v2 raw format: brain tissue segmentation with 2 channels (T1 and T2 of the
contrasts below) and 4 mutually exclusive classes, 1 CSF, 2 grey matter (cortex and deep nuclei),
3 white matter, 4 lesion (the whole glioma: oedema and core), chosen per voxel as the lesion where
the glioma labels are set, else the normal tissue with the largest fraction::

    out_dir/Dataset900_SynthBrain/dataset.json
    out_dir/Dataset900_SynthBrain/imagesTr/SYN_001_0000.nii.gz, SYN_001_0001.nii.gz, ...
    out_dir/Dataset900_SynthBrain/labelsTr/SYN_001.nii.gz, ...
    out_dir/Dataset900_SynthBrain/synth.json

Its volumes are 64 x 64 x 64 by default (the same 240 x 240 x 155 mm field of view, so 3.75 x
3.75 x 2.4 mm voxels), stored RAS (``diag(spacing)``), int16 images, uint8 labels 0..4.

Speed: all smooth fields are drawn on coarse grids and upsampled separably with small matrix
products; tissue arithmetic runs on brain voxels only; files are gzip-compressed at level 1 with
a zero timestamp, so the same seed gives byte-identical files. Cases are generated in worker
threads (numpy and zlib release the GIL).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import secrets
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
from tracin_jax.progress import tqdm

from tracin_jax.errors import WRITE_ERRNOS, InputError, cannot_write

DATASET_DIR = "MICCAI_BraTS_2019_Data_Training"
GRADE_DIR = "HGG"
MANIFEST = "synth.json"
GENERATOR_VERSION = 2
DEFAULT_SHAPE = (240, 240, 155)
FOV_MM = (240.0, 240.0, 155.0)
MODALITY_FILES = ("flair", "t1", "t1ce", "t2")

# Tissue layers, painted bottom to top (a layer covers the ones below it by its weight).
TISSUES = ("wm", "nuclei", "gm", "csf", "oedema", "net", "enhancing", "necrosis")
# Relative mean intensity [tissue, modality] for FLAIR, T1, T1ce, T2.
CONTRAST = np.array(
    [
        [0.50, 0.80, 0.70, 0.42],  # white matter
        [0.58, 0.66, 0.58, 0.52],  # deep grey nuclei
        [0.62, 0.60, 0.53, 0.62],  # cortical grey matter
        [0.12, 0.22, 0.18, 1.00],  # CSF
        [0.95, 0.52, 0.50, 0.85],  # oedema
        [0.85, 0.48, 0.46, 0.80],  # non-enhancing tumour
        [0.80, 0.58, 1.40, 0.70],  # enhancing tumour
        [0.55, 0.30, 0.20, 0.95],  # necrosis
    ],
    dtype=np.float32,
)
# Overall intensity scale of each modality (FLAIR, T1, T1ce, T2), like typical BraTS int16 ranges.
MODALITY_SCALE = np.array([450.0, 700.0, 900.0, 1400.0], dtype=np.float32)
# BraTS 2018-2021 label values written to the seg file.
LABEL_NCR, LABEL_ED, LABEL_ET = 1, 2, 4

# The synthetic nnU-Net v2 task (brain tissue): folder, channels (CONTRAST columns), labels.
NNUNET_DIR = "Dataset900_SynthBrain"
NNUNET_CHANNELS = ("T1", "T2")
NNUNET_COLUMNS = (1, 3)
NNUNET_LABELS = {"background": 0, "CSF": 1, "grey matter": 2, "white matter": 3, "lesion": 4}
NNUNET_SHAPE = (64, 64, 64)
NNUNET_ENDING = ".nii.gz"


def brats_affine(shape: tuple[int, int, int] = DEFAULT_SHAPE) -> np.ndarray:
    """f64[4, 4]: a real BraTS header affine, ``diag(-1, -1, 1)`` with origin (0, 239, 0).

    For a non-default ``shape`` the field of view stays 240 x 240 x 155 mm, so voxels are larger.
    """
    spacing = np.asarray(FOV_MM) / np.asarray(shape, dtype=float)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[1, 3] = FOV_MM[1] - spacing[1]
    return affine


def case_ids(cases: int) -> list[str]:
    """Case ids ``BraTS19_SYN_0001_1``, ... in the naming style of BraTS 2019."""
    return [f"BraTS19_SYN_{i + 1:04d}_1" for i in range(cases)]


# ----------------------------------------------------------------------------------------------
# Smooth random fields


def _interp_matrix(coords: np.ndarray, spacing: float) -> np.ndarray:
    """f32[n, g]: Gaussian weights from n sample points to g grid nodes ``spacing`` mm apart.

    Rows are scaled to unit sum of squares, so white noise on the nodes becomes a field of unit
    variance at every point.
    """
    lo, hi = float(coords.min()) - 2 * spacing, float(coords.max()) + 2 * spacing
    nodes = np.arange(lo, hi + spacing, spacing, dtype=np.float32)
    w = np.exp(-0.5 * ((coords[:, None] - nodes[None, :]) / (0.7 * spacing)) ** 2)
    w /= np.sqrt(np.sum(w * w, axis=1, keepdims=True))
    return w.astype(np.float32)


def smooth_field(rng: np.random.Generator, axes: tuple[np.ndarray, ...], spacing: float) -> np.ndarray:
    """f32[nx, ny, nz]: a smooth random field of unit variance, feature size about ``spacing`` mm.

    ``axes`` holds the three 1D coordinate vectors (mm) of the grid. The field is white noise on
    a coarse node grid, interpolated separably with Gaussian weights (three small matmuls).
    """
    mx, my, mz = (_interp_matrix(np.asarray(a, dtype=np.float32), spacing) for a in axes)
    nodes = rng.standard_normal((mx.shape[1], my.shape[1], mz.shape[1]), dtype=np.float32)
    f = np.tensordot(mx, nodes, axes=(1, 0))  # [nx, gy, gz]
    f = np.tensordot(f, my, axes=(1, 1))  # [nx, gz, ny]
    f = np.tensordot(f, mz, axes=(1, 1))  # [nx, ny, nz]
    return np.ascontiguousarray(f, dtype=np.float32)


def smooth_curve(rng: np.random.Generator, coords: np.ndarray, period: float, terms: int = 3) -> np.ndarray:
    """f32[n]: a smooth random 1D function of unit-ish amplitude (a few random cosines)."""
    out = np.zeros(coords.shape, dtype=np.float32)
    for k in range(1, terms + 1):
        phase = rng.uniform(0, 2 * np.pi)
        out += rng.standard_normal() / k * np.cos(2 * np.pi * k * coords / period + phase)
    return out.astype(np.float32)


def ramp(t: np.ndarray) -> np.ndarray:
    """Soft step: 0 for t <= -0.5, 1 for t >= 0.5, linear in between (partial-volume weight)."""
    return np.clip(t + 0.5, 0.0, 1.0)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """f32[3, 3]: a uniformly random rotation matrix."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Anatomy


class _Head:
    """Geometry of one synthetic brain, evaluated on its bounding box and on its brain voxels.

    Attributes (Nb = number of brain voxels):
      box: (slice, slice, slice) bounding box in RAS voxel indices of the full volume.
      axes: three f32 vectors, box voxel-centre coordinates (mm) relative to the brain centre.
      index: three int arrays [Nb], box indices of the brain voxels.
      x, y, z: f32[Nb], brain-voxel coordinates (mm) in the brain's own frame (yaw removed).
      depth: f32[Nb], approximate depth below the brain surface (mm).
      flat: int[Nb], brain voxels as flat indices into the box.
      volume_flat: int[Nb], brain voxels as flat indices into the full volume.
      fold: f32[Nb], the gyral-pattern field (set by :func:`tissue_weights`).
      semi: (a, b, c) brain semi-axes (mm), left-right, anterior-posterior, inferior-superior.
      voxel: mean voxel size (mm).
    """

    def __init__(self, rng: np.random.Generator, shape: tuple[int, int, int]):
        spacing = np.asarray(FOV_MM) / np.asarray(shape, dtype=float)
        self.voxel = float(np.mean(spacing))
        centre = np.array([120.0 + rng.normal(0, 2), 118.0 + rng.normal(0, 4), 74.0 + rng.normal(0, 3)])
        a, b, c = rng.uniform(62, 70), rng.uniform(78, 88), rng.uniform(56, 63)
        self.semi = (a, b, c)
        yaw = np.deg2rad(rng.normal(0, 3))
        cy, sy = abs(np.cos(yaw)), abs(np.sin(yaw))
        # Brain extent (with margin for the boundary roughness), below / above the centre.
        lo_mm = np.array([1.15 * (1.07 * a * cy + b * sy), 1.15 * (b * cy + 1.07 * a * sy), 1.15 * 0.82 * c])
        hi_mm = np.array([lo_mm[0], lo_mm[1], 1.15 * c])
        box = []
        for ax in range(3):
            lo = int(max(0, np.floor((centre[ax] - lo_mm[ax]) / spacing[ax])))
            hi = int(min(shape[ax], np.ceil((centre[ax] + hi_mm[ax]) / spacing[ax]) + 1))
            box.append(slice(lo, hi))
        self.box = tuple(box)
        self.axes = tuple(
            ((np.arange(s.start, s.stop) + 0.5) * spacing[ax] - centre[ax]).astype(np.float32)
            for ax, s in enumerate(self.box)
        )
        bx, by, bz = self.axes
        cos, sin = np.float32(np.cos(yaw)), np.float32(np.sin(yaw))
        xr = cos * bx[:, None] + sin * by[None, :]  # [nx, ny], brain frame
        yr = -sin * bx[:, None] + cos * by[None, :]
        a_y = a * (1.0 - 0.07 * yr / b)  # wider posteriorly
        c_z = np.where(bz > 0, c, 0.82 * c).astype(np.float32)  # flatter inferiorly
        r2 = ((xr / a_y) ** 2 + (yr / b) ** 2)[:, :, None] + ((bz / c_z) ** 2)[None, None, :]
        self.voxel_index = tuple(np.arange(len(a)) for a in self.axes)
        self._coarse_flat: dict[int, np.ndarray] = {}
        self._rng = rng
        rough = 0.035 * self.box_field(28.0) + 0.012 * self.box_field(12.0)
        r = np.sqrt(r2) * (1.0 + rough)
        depth_box = (1.0 - r) * np.float32((a + b + c) / 3.0)
        mask = depth_box > 0
        box_shape = mask.shape
        flat = np.flatnonzero(mask)
        self.index = np.unravel_index(flat, box_shape)
        ix, iy, iz = self.index
        plane = flat // box_shape[2]  # flat index into [nx, ny]
        self.x, self.y, self.z = xr.ravel()[plane], yr.ravel()[plane], bz[iz]
        self.depth = depth_box.ravel()[flat]
        origin = [s.start for s in self.box]
        self.flat = flat  # brain voxels, flat in the box
        self.volume_flat = np.ravel_multi_index((ix + origin[0], iy + origin[1], iz + origin[2]), shape)

    def _coarse_field(self, spacing: float) -> tuple[np.ndarray, int]:
        """(field drawn on every k-th box voxel, k). Fields much smoother than a voxel use
        k = spacing / 8 voxels and are read at the nearest grid point: k**3 times cheaper, with
        an error far below the field's own scale."""
        k = max(1, int(spacing / (8.0 * self.voxel)))
        return smooth_field(self._rng, tuple(a[k // 2 :: k] for a in self.axes), spacing), k

    def box_field(self, spacing: float) -> np.ndarray:
        """f32[nx, ny, nz]: a unit smooth random field on the whole bounding box."""
        coarse, k = self._coarse_field(spacing)
        if k == 1:
            return coarse
        return coarse[np.ix_(*(np.minimum(i // k, n - 1) for i, n in zip(self.voxel_index, coarse.shape)))]

    def field(self, spacing: float) -> np.ndarray:
        """f32[Nb]: a unit smooth random field sampled at the brain voxels."""
        coarse, k = self._coarse_field(spacing)
        if k == 1:
            return coarse.ravel()[self.flat]
        if k not in self._coarse_flat:
            ix, iy, iz = (np.minimum(i // k, n - 1) for i, n in zip(self.index, coarse.shape))
            self._coarse_flat[k] = np.ravel_multi_index((ix, iy, iz), coarse.shape)
        return coarse.ravel()[self._coarse_flat[k]]

    def local_field(self, spacing: float, sel: np.ndarray) -> np.ndarray:
        """f32[sum(sel)]: a unit smooth field drawn on the bounding box of the selected brain
        voxels only (cheap for a tumour's neighbourhood), sampled at those voxels."""
        ix, iy, iz = (i[sel] for i in self.index)
        lo = [int(i.min()) for i in (ix, iy, iz)]
        hi = [int(i.max()) + 1 for i in (ix, iy, iz)]
        sub_axes = tuple(ax[l:h] for ax, l, h in zip(self.axes, lo, hi))
        f = smooth_field(self._rng, sub_axes, spacing)
        return f[ix - lo[0], iy - lo[1], iz - lo[2]]


def tissue_weights(head: _Head, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Soft weights f32[Nb] in [0, 1] of the normal tissue layers (nuclei, gm, csf) per brain voxel."""
    v = head.voxel
    x, y, z, depth = head.x, head.y, head.z, head.depth
    b = head.semi[1]
    fold = head.field(7.0)
    head.fold = fold
    sulcus_depth = 17.0 + 4.0 * head.field(30.0)
    # CSF: outer rim, sulci, interhemispheric fissure, lateral ventricles.
    rim = ramp((1.6 - depth) / v)
    sulci = ramp((0.15 - np.abs(fold)) / 0.06) * ramp((sulcus_depth - depth) / (2 * v))
    # The fissure reaches down to the corpus callosum (an arch about 24 mm above the centre)
    # and deeper towards the frontal and occipital poles.
    callosum_top = 24.0 * (1.0 - (y / (0.6 * b)) ** 2)
    fissure_zone = ramp((z - callosum_top) / (3.0 * v))
    midline = 0.8 * smooth_curve(rng, y, 120.0)
    fissure = ramp((1.4 - np.abs(x - midline)) / v) * fissure_zone
    vent = np.zeros_like(depth)
    size = rng.uniform(0.7, 1.5)
    for side in (-1.0, 1.0):
        ay = 31.0 * rng.uniform(0.9, 1.1)
        yc = rng.uniform(-4.0, 2.0)
        t = (y - yc) / ay
        xc = side * size * (5.0 + 0.06 * (y - yc))
        zc = 11.0 + 9.0 * (1.0 - t**2)
        ax = 3.2 * size * (1.0 + 0.3 * np.clip(t, -1, 1))
        q = ((x - xc) / ax) ** 2 + t**2 + ((z - zc) / (5.5 * size)) ** 2
        vent = np.maximum(vent, ramp((1.0 - q) / (0.4 * v)))
    csf = np.maximum.reduce([rim, sulci, fissure, vent])
    # Grey matter: cortex ribbon under the surface and along sulci and the fissure; deep nuclei.
    cortex = ramp((3.5 + 0.8 * head.field(20.0) - depth) / v)
    gyral = ramp((0.5 - np.abs(fold)) / 0.1) * ramp((sulcus_depth + 3.0 - depth) / (2 * v))
    medial = ramp((4.5 - np.abs(x - midline)) / v) * fissure_zone
    gm = np.maximum.reduce([cortex, gyral, medial])
    nuclei = np.zeros_like(depth)
    for side in (-1.0, 1.0):
        q = ((x - side * 15.0) / 9.0) ** 2 + ((y - 2.0) / 15.0) ** 2 + ((z + 3.0) / 10.0) ** 2
        nuclei = np.maximum(nuclei, ramp((1.0 - q) / (0.2 * v)))
    return {"nuclei": nuclei, "gm": gm, "csf": csf}


def _tumour_centre(rng: np.random.Generator, semi: tuple[float, float, float], first: bool) -> np.ndarray:
    """f64[3]: a tumour centre in the brain frame (mm), well inside the brain."""
    a, b, c = semi
    while True:
        if first:  # one hemisphere, at a height overlapping the central slices (z ~ +16..+25)
            p = np.array([rng.choice([-1, 1]) * rng.uniform(12, 0.62 * a),
                          rng.uniform(-0.6 * b, 0.55 * b), rng.uniform(8, 30)])
        else:
            p = np.array([rng.uniform(-0.7 * a, 0.7 * a), rng.uniform(-0.7 * b, 0.7 * b),
                          rng.uniform(-0.4 * c, 0.6 * c)])
        if (p[0] / a) ** 2 + (p[1] / b) ** 2 + (p[2] / c) ** 2 < 0.6**2:
            return p


def add_tumour(head: _Head, rng: np.random.Generator, weights: dict[str, np.ndarray],
               seg: np.ndarray, first: bool) -> None:
    """Paints one glioma into ``weights`` (oedema / net / enhancing / necrosis, f32[Nb], in place,
    combined by maximum) and ``seg`` (u8[Nb], BraTS labels, in place).

    Core: q_core = |A (p - c)| / (R_core (1 + 0.2 n)) with A a random anisotropic rotation and n
    a smooth field; core = q_core < 1. Necrosis: q_core < rho (rho varies smoothly, leaving an
    enhancing shell of at least max(3 mm, 1.5 voxels)). Oedema: an independently deformed larger
    blob, plus an envelope of the same minimum thickness around the core, excluding CSF.
    """
    v = head.voxel
    centre = _tumour_centre(rng, head.semi, first)
    r_oed = rng.uniform(16, 34) if first else rng.uniform(10, 22)
    r_core = r_oed * rng.uniform(0.4, 0.75)
    extent = 1.7 * r_oed
    d = np.stack([head.x - centre[0], head.y - centre[1], head.z - centre[2]])  # [3, Nb]
    sel = np.all(np.abs(d) < extent, axis=0)
    if not sel.any():
        return
    d = d[:, sel]
    shape_core = random_rotation(rng) * rng.uniform(0.75, 1.3, size=(3, 1)).astype(np.float32)
    shape_oed = random_rotation(rng) * rng.uniform(0.75, 1.3, size=(3, 1)).astype(np.float32)
    offset = rng.normal(0, 0.15 * r_oed, size=3).astype(np.float32)[:, None]
    n_core = head.local_field(max(4.0, 0.6 * r_core), sel)
    n_oed = head.local_field(max(5.0, 0.5 * r_oed), sel)
    n_nec = head.local_field(max(4.0, 0.5 * r_core), sel)
    q_core = np.linalg.norm(shape_core @ d, axis=0) / (r_core * np.maximum(0.5, 1.0 + 0.2 * n_core))
    q_oed = np.linalg.norm(shape_oed @ (d - offset), axis=0) / (r_oed * np.maximum(0.4, 1.0 + 0.3 * n_oed))
    # Glioblastoma-like: most cores are necrotic, and the necrosis fills most of the core inside
    # a few-mm enhancing rim (the rim is at least ``rim`` thick, see rho_eff).
    necrotic = rng.random() > 0.12
    enhancing = rng.random() > 0.12
    rho = rng.uniform(0.6, 0.85) if necrotic else 0.0
    rim = max(3.0, 1.5 * v)  # minimum enhancing shell and oedema envelope (mm), >= 1.5 voxels
    rho_eff = np.minimum(rho * (1.0 + 0.15 * n_nec), 1.0 - max(0.12, rim / r_core))
    dq_core, dq_oed = v / r_core, v / r_oed
    csf = weights["csf"][sel]
    oed_q = np.minimum(q_oed, q_core / (1.0 + rim / r_core))
    w_oed = ramp((1.0 - oed_q) / dq_oed) * (1.0 - csf)
    w_core = ramp((1.0 - q_core) / dq_core)
    w_nec = ramp((rho_eff - q_core) / dq_core) if necrotic else np.zeros_like(w_core)
    core_layer = "enhancing" if enhancing else "net"
    for name, w in (("oedema", w_oed), (core_layer, w_core), ("necrosis", w_nec)):
        weights[name][sel] = np.maximum(weights[name][sel], w)
    # Labels: oedema first, then the core (overrides oedema, including another tumour's).
    local = seg[sel]
    local[(oed_q < 1.0) & (csf < 0.5) & (local == 0)] = LABEL_ED
    core = q_core < 1.0
    local[core] = LABEL_ET if enhancing else LABEL_NCR
    local[core & (q_core < rho_eff)] = LABEL_NCR
    seg[sel] = local


def layer_fractions(weights: dict[str, np.ndarray]) -> np.ndarray:
    """f32[K, Nb]: tissue fractions from layer weights painted in ``TISSUES`` order.

    Layer k keeps the fraction w_k * prod_{j > k} (1 - w_j); white matter is the base (w = 1),
    missing layers have weight 0. Fractions sum to 1 at every voxel.
    """
    n = len(next(iter(weights.values())))
    out = np.zeros((len(TISSUES), n), dtype=np.float32)
    keep = np.ones(n, dtype=np.float32)
    for k in range(len(TISSUES) - 1, 0, -1):
        w = weights.get(TISSUES[k])
        if w is not None:
            np.multiply(w, keep, out=out[k])
            keep *= 1.0 - w
    out[0] = keep
    return out


def _anatomy(rng: np.random.Generator, shape: tuple[int, int, int]
             ) -> tuple[_Head, dict[str, np.ndarray], np.ndarray]:
    """(head, tissue layer weights f32[Nb] by name, glioma labels u8[Nb] (BraTS values)) of one
    synthetic brain with one or two gliomas."""
    head = _Head(rng, shape)
    weights = tissue_weights(head, rng)
    for name in ("oedema", "net", "enhancing", "necrosis"):
        weights[name] = np.zeros_like(head.depth)
    seg_b = np.zeros(head.depth.shape, dtype=np.uint8)
    add_tumour(head, rng, weights, seg_b, first=True)
    if rng.random() < 0.3:
        add_tumour(head, rng, weights, seg_b, first=False)
    return head, weights, seg_b


def _render(rng: np.random.Generator, head: _Head, fractions: np.ndarray,
            shape: tuple[int, int, int], columns) -> list[np.ndarray]:
    """i16[X, Y, Z] images (0 outside the brain) of the modality ``columns`` of ``CONTRAST`` (0
    FLAIR, 1 T1, 2 T1ce, 3 T2; in increasing order), from tissue fractions f32[K, Nb]: per-case
    jittered contrasts, a gyral texture, a bias field and Rician noise. The contrast and scale
    draws are those of all four modalities whichever are rendered."""
    contrast = CONTRAST * (1.0 + 0.04 * rng.standard_normal(CONTRAST.shape)).astype(np.float32)
    scale = MODALITY_SCALE * rng.uniform(0.75, 1.3, size=4).astype(np.float32)
    clean = (contrast * scale[None, :]).T @ fractions  # [4, Nb]
    texture = head.fold  # mild intensity variation that follows the gyral pattern
    ix, iy, iz = head.index
    bx, by, bz = head.axes
    n = len(texture)
    out = []
    for m in columns:
        bias = (smooth_curve(rng, bx, 400.0, 2)[ix] + smooth_curve(rng, by, 400.0, 2)[iy]
                + smooth_curve(rng, bz, 300.0, 2)[iz])
        signal = clean[m] * (1.0 + 0.03 * texture) * np.exp(0.06 * bias)
        sigma = np.float32(rng.uniform(0.02, 0.035) * scale[m] * contrast[0, m])
        real = signal + sigma * rng.standard_normal(n, dtype=np.float32)
        imag = sigma * rng.standard_normal(n, dtype=np.float32)
        value = np.clip(np.rint(np.sqrt(real * real + imag * imag)), 1, 32767).astype(np.int16)
        vol = np.zeros(shape, dtype=np.int16)
        vol.ravel()[head.volume_flat] = value
        out.append(vol)
    return out


def synth_case(rng: np.random.Generator, shape: tuple[int, int, int] = DEFAULT_SHAPE
               ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One synthetic case in RAS array orientation.

    Returns:
      images: modality name -> i16[X, Y, Z] (0 outside the brain).
      seg: u8[X, Y, Z] with BraTS 2018-2021 labels {0, 1, 2, 4}.
    """
    head, weights, seg_b = _anatomy(rng, shape)
    volumes = _render(rng, head, layer_fractions(weights), shape, range(len(MODALITY_FILES)))
    seg = np.zeros(shape, dtype=np.uint8)
    seg.ravel()[head.volume_flat] = seg_b
    return dict(zip(MODALITY_FILES, volumes)), seg


def synth_tissue_case(rng: np.random.Generator, shape: tuple[int, int, int] = (64, 64, 64)
                      ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One case of the synthetic brain-tissue task (RAS array orientation).

    Returns:
      images: channel name (``NNUNET_CHANNELS``: T1, T2) -> i16[X, Y, Z] (0 outside the brain).
      labels: u8[X, Y, Z]: 0 background (outside the brain), 1 CSF, 2 grey matter, 3 white
        matter, 4 lesion (``NNUNET_LABELS``).
    """
    head, weights, seg_b = _anatomy(rng, shape)
    fractions = layer_fractions(weights)  # [K, Nb] in TISSUES order
    normal = np.stack([fractions[TISSUES.index("csf")],
                       fractions[TISSUES.index("gm")] + fractions[TISSUES.index("nuclei")],
                       fractions[TISSUES.index("wm")]])
    tissue = (np.argmax(normal, axis=0) + 1).astype(np.uint8)  # 1 CSF, 2 GM, 3 WM
    tissue[seg_b > 0] = NNUNET_LABELS["lesion"]
    labels = np.zeros(shape, dtype=np.uint8)
    labels.ravel()[head.volume_flat] = tissue
    volumes = _render(rng, head, fractions, shape, NNUNET_COLUMNS)
    return dict(zip(NNUNET_CHANNELS, volumes)), labels


# ----------------------------------------------------------------------------------------------
# Writing


def _nifti_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    """Gzip-compressed (level 1, zero mtime) NIfTI-1 file contents for ``data``."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def write_case(folder: Path, case_id: str, seed: int, index: int, shape: tuple[int, int, int]) -> None:
    """Generates case ``index`` of ``seed`` and writes its five files into ``folder/case_id``."""
    rng = np.random.default_rng([seed, index])
    images, seg = synth_case(rng, shape)
    affine = brats_affine(shape)
    case_dir = folder / case_id
    case_dir.mkdir(parents=True)
    volumes = dict(images, seg=seg)
    for name, vol in volumes.items():
        stored = vol[::-1, ::-1, :]  # RAS -> the LPS-like array order of BraTS files
        (case_dir / f"{case_id}_{name}.nii.gz").write_bytes(_nifti_bytes(stored, affine))


def _manifest(seed: int, cases: int, shape: tuple[int, int, int]) -> dict:
    return {
        "generator": "tracin_jax.data.synth",
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "cases": int(cases),
        "shape": [int(s) for s in shape],
        "case_ids": case_ids(cases),
        "labels": "BraTS 2018-2021: 0 background, 1 NCR/NET, 2 ED, 4 ET",
    }


def _read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def nnunet_affine(shape: tuple[int, int, int]) -> np.ndarray:
    """f64[4, 4]: RAS ``diag(spacing)`` for the 240 x 240 x 155 mm field of view."""
    spacing = np.asarray(FOV_MM) / np.asarray(shape, dtype=float)
    return np.diag([*spacing, 1.0])


def nnunet_case_ids(cases: int) -> list[str]:
    """Case ids ``SYN_001``, ... of the synthetic nnU-Net task."""
    return [f"SYN_{i + 1:03d}" for i in range(cases)]


def write_nnunet_case(folder: Path, case_id: str, seed: int, index: int, shape: tuple[int, int, int]) -> None:
    """Generates case ``index`` of ``seed`` of the tissue task and writes its channel files into
    ``folder/imagesTr`` and its label file into ``folder/labelsTr``."""
    rng = np.random.default_rng([seed, index])
    images, labels = synth_tissue_case(rng, shape)
    affine = nnunet_affine(shape)
    for c, name in enumerate(NNUNET_CHANNELS):
        path = folder / "imagesTr" / f"{case_id}_{c:04d}{NNUNET_ENDING}"
        path.write_bytes(_nifti_bytes(images[name], affine))
    (folder / "labelsTr" / f"{case_id}{NNUNET_ENDING}").write_bytes(_nifti_bytes(labels, affine))


def nnunet_description(cases: int) -> dict:
    """The ``dataset.json`` of the synthetic nnU-Net task."""
    return {
        "name": NNUNET_DIR.split("_", 1)[1],
        "description": "synthetic brain tissue segmentation (tracin_jax.data.synth)",
        "channel_names": {str(i): n for i, n in enumerate(NNUNET_CHANNELS)},
        "labels": dict(NNUNET_LABELS),
        "numTraining": int(cases),
        "file_ending": NNUNET_ENDING,
    }


def write_synthetic_nnunet(out_dir, cases: int = 16, seed: int = 0, progress: bool = True, *,
                           shape: tuple[int, int, int] = NNUNET_SHAPE, workers: int | None = None
                           ) -> list[str]:
    """Writes the synthetic brain-tissue task as an nnU-Net v2 raw dataset
    ``out_dir/Dataset900_SynthBrain`` (2 channels T1, T2; classes CSF, grey matter, white
    matter, lesion; see the module docstring); returns its case ids.

    Written like :func:`write_synthetic_dataset`: built in a hidden temporary folder and renamed
    into place, nothing regenerated when the folder holds the same ``seed``, ``cases`` and
    ``shape`` already, InputError when it holds anything else or the output cannot be written.

    Args:
      out_dir: parent folder (created if missing).
      cases: number of cases (>= 1).
      seed: the same seed gives byte-identical files.
      progress: show a tqdm bar over cases.
      shape: volume shape X, Y, Z (default 64 x 64 x 64, each at least 16; the field of view
        stays 240 x 240 x 155 mm).
      workers: generator threads (default: min(4, CPU count)).
    """
    from tracin_jax.paths import check_writable_folder

    check_writable_folder(out_dir, "--out")
    if cases < 1:
        raise InputError(f"synthetic dataset needs at least 1 case, got cases={cases}")
    shape = _check_shape(shape)
    ids = nnunet_case_ids(cases)
    wanted = dict(_manifest(seed, cases, shape), case_ids=ids, format="nnunet",
                  labels=", ".join(f"{v} {k}" for k, v in NNUNET_LABELS.items()))

    def build(tmp: Path, pool, bar) -> None:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        futures = [pool.submit(write_nnunet_case, tmp, cid, seed, i, shape) for i, cid in enumerate(ids)]
        for fut in futures:
            fut.result()
            bar.update(1)
        (tmp / "dataset.json").write_text(json.dumps(nnunet_description(cases), indent=2) + "\n")

    _write_atomically(Path(out_dir), NNUNET_DIR, wanted, build, cases, progress, workers,
                      "writing synthetic nnU-Net cases")
    return ids


def _check_shape(shape) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise InputError(f"synthetic volume shape {shape} must be 3 sizes of at least 16")
    return shape


def _write_atomically(out_dir: Path, name: str, wanted: dict, build, cases: int, progress: bool,
                      workers: int | None, desc: str) -> None:
    """Builds the dataset folder ``out_dir/name`` with ``build(tmp, pool, bar)`` in a hidden
    temporary folder, writes ``wanted`` as its manifest and renames it into place (see
    :func:`write_synthetic_dataset`); a folder whose manifest is ``wanted`` is kept as it is."""
    target = out_dir / name
    if target.exists():
        if _read_manifest(target) == wanted:
            return
        if not target.is_dir() or any(target.iterdir()):
            raise InputError(
                f"{target} already exists and is not a synthetic dataset with seed={wanted['seed']}, "
                f"cases={wanted['cases']}, shape={tuple(wanted['shape'])}: remove it or choose "
                f"another output folder"
            )
        target.rmdir()
    made = not out_dir.exists()  # removed again, if still empty, when this run fails
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out_dir, name)
    tmp = _new_partial(out_dir, name)
    try:
        workers = workers or max(1, min(4, os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
            total=cases, desc=desc, unit="case", disable=not progress
        ) as bar:
            build(tmp, pool, bar)
        (tmp / MANIFEST).write_text(json.dumps(wanted, indent=2) + "\n")
        os.replace(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if made:
            try:
                out_dir.rmdir()
            except OSError:
                pass
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            raise cannot_write(target, e) from None
        raise


def write_synthetic_dataset(out_dir, cases: int = 16, seed: int = 0, progress: bool = True, *,
                            shape: tuple[int, int, int] = DEFAULT_SHAPE, workers: int | None = None
                            ) -> list[str]:
    """Writes a synthetic BraTS 2019-layout training set into ``out_dir``; returns its case ids.

    The dataset is built in a hidden temporary folder next to the target and renamed into place,
    so an interrupted run leaves no half-written dataset (a killed run's temporary folder is
    removed by the next run; folders and files get the ordinary modes, 0o777 / 0o666 minus the
    umask). ``out_dir`` is checked first: a file there or above it, or a folder that cannot be
    written, is a one-line InputError before anything is created; so is a write the file
    system refuses (a full disk), after the temporary folder is removed. If
    ``out_dir/MICCAI_BraTS_2019_Data_Training`` already holds a complete dataset written with the
    same ``seed``, ``cases`` and ``shape`` (its ``synth.json`` says so), nothing is regenerated;
    if it exists with any other content, InputError.

    Args:
      out_dir: parent folder (created if missing).
      cases: number of cases (>= 1).
      seed: the same seed gives byte-identical files.
      progress: show a tqdm bar over cases.
      shape: volume shape (default 240 x 240 x 155 at 1 mm; smaller shapes keep the 240 x 240 x
        155 mm field of view with larger voxels, for tests).
      workers: generator threads (default: min(4, CPU count)).
    """
    from tracin_jax.paths import check_writable_folder

    check_writable_folder(out_dir, "--out")
    if cases < 1:
        raise InputError(f"synthetic dataset needs at least 1 case, got cases={cases}")
    shape = _check_shape(shape)
    wanted = _manifest(seed, cases, shape)
    ids = wanted["case_ids"]

    def build(tmp: Path, pool, bar) -> None:
        grade_dir = tmp / GRADE_DIR
        grade_dir.mkdir()
        futures = [pool.submit(write_case, grade_dir, cid, seed, i, shape) for i, cid in enumerate(ids)]
        for fut in futures:
            fut.result()
            bar.update(1)

    _write_atomically(Path(out_dir), DATASET_DIR, wanted, build, cases, progress, workers,
                      "writing synthetic BraTS cases")
    return list(ids)


PARTIAL = f".{DATASET_DIR}.partial-"


def _partial_prefix(name: str) -> str:
    return f".{name}.partial-"


def _new_partial(out_dir: Path, name: str = DATASET_DIR) -> Path:
    """A fresh temporary folder ``.<dataset>.partial-<pid>-<random>`` in ``out_dir``, made with
    the ordinary mode (0o777 minus the umask, unlike ``tempfile.mkdtemp``'s 0o700), which the
    dataset keeps when renamed into place."""
    while True:
        tmp = out_dir / f"{_partial_prefix(name)}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(tmp)
            return tmp
        except FileExistsError:
            continue


def _remove_stale_partials(out_dir: Path, name: str = DATASET_DIR) -> None:
    """Removes temporary folders of killed runs (a ``<pid>`` that names no running process;
    folders without one, from older versions, too)."""
    prefix = _partial_prefix(name)
    for p in out_dir.glob(f"{prefix}*"):
        m = re.match(r"(\d+)-[0-9a-f]+$", p.name[len(prefix):])
        if m:
            pid = int(m.group(1))
            if pid == os.getpid():
                continue
            try:
                os.kill(pid, 0)
                continue  # a run writing right now
            except ProcessLookupError:
                pass
            except OSError:
                continue  # exists, another user's
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
