"""Last-hidden-layer feature maps: extraction, masking by a class region, per-filter similarity.

The last hidden layer is what the 1x1 (1x1x1) ``head`` conv sees: ``features: f32[N, *S, F]``
with ``S`` the spatial axes of one example (``H, W`` for a slice, ``D, H, W`` for a volume) and
F = model width (64 in the paper). A class region is a ground-truth mask ``bool[N, *S]``. Every
function here reduces over all the spatial axes, whatever their number.

Per-filter similarity S_k between a test region and a training region (both on the same voxel
grid) comes in three flavours (``SIMILARITIES``):

- ``cosine`` (default; the 2023 text): cosine similarity of the two masked maps,
  S_k = <a_k, b_k> / (|a_k| |b_k|), a_k = features[..., k] * mask flattened over voxels;
- ``max_ratio`` (the journal figure reduces each masked map to its maximum first):
  with a = max of the masked map, S_k = 1 - |a - b| / max(|a|, |b|)  (= min/max for ReLU maps);
- ``max_product``: the product-normalised variant, S_k = 2ab / (a^2 + b^2).

All three are 1 for identical inputs. The cosine compares the maps voxel by voxel on the common
grid, so regions that do not overlap score 0 whatever the filters see there: it measures
position and response together. The max variants ignore position.

S_k is undefined (NaN, left out of every mean) when a region is empty or a filter is silent
(all zero) in one of the two regions (cosine), or in both (max variants).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from tracin_jax.progress import tqdm

SIMILARITIES = ("cosine", "max_ratio", "max_product")


def spatial_axes(mask: np.ndarray) -> tuple[int, ...]:
    """The spatial axes of a batch of masks bool[N, *S] (or labels): every axis but the first."""
    return tuple(range(1, np.ndim(mask)))


def flat_voxels(x):
    """Collapses the spatial axes: f32[N, *S, F] -> f32[N, V, F], V = prod(S) (a numpy or jax
    array, as given)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def masked(features: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """features f32[N, *S, F] * mask bool[N, *S] -> f32[N, *S, F] (zero outside the region)."""
    xp = jnp if isinstance(features, jax.Array) else np
    return features * xp.asarray(mask, features.dtype)[..., None]


def region_max(features: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """f32[N, F]: maximum of each filter inside the region (features f32[N, *S, F], mask
    bool[N, *S]); NaN where the region is empty."""
    f = np.asarray(features)
    m = np.asarray(mask, bool)
    ax = spatial_axes(m)
    vals = np.where(m[..., None], f, -np.inf).max(axis=ax)
    vals[~m.any(axis=ax)] = np.nan
    return vals.astype(np.float32)


def region_norm(features: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """f32[N, F]: L2 norm of each masked map (features f32[N, *S, F], mask bool[N, *S]); NaN
    where the region is empty."""
    m = np.asarray(mask, bool)
    ax = spatial_axes(m)
    n = np.sqrt((masked(np.asarray(features, np.float64), m) ** 2).sum(axis=ax))
    n[~m.any(axis=ax)] = np.nan
    return n.astype(np.float32)


def cosine_from_dots(dots: np.ndarray, norm_a: np.ndarray, norm_b: np.ndarray) -> np.ndarray:
    """f32[A, B, F] cosine similarities from dots f32[A, B, F] and norms f32[A, F], f32[B, F].

    NaN where either norm is zero or NaN (empty region or silent filter).
    """
    den = norm_a[:, None, :].astype(np.float64) * norm_b[None, :, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den > 0, dots / np.where(den > 0, den, 1.0), np.nan)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def max_similarity(a: np.ndarray, b: np.ndarray, kind: str = "max_ratio") -> np.ndarray:
    """Similarity of region maxima; a and b broadcast (e.g. f32[A, 1, F] with f32[1, B, F]).

    ``max_ratio``: 1 - |a - b| / max(|a|, |b|); ``max_product``: 2ab / (a^2 + b^2).
    NaN where both are zero or either is NaN.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "max_ratio":
            den = np.maximum(np.abs(a), np.abs(b))
            out = np.where(den > 0, 1.0 - np.abs(a - b) / np.where(den > 0, den, 1.0), np.nan)
        elif kind == "max_product":
            den = a * a + b * b
            out = np.where(den > 0, 2.0 * a * b / np.where(den > 0, den, 1.0), np.nan)
        else:
            raise ValueError(f"unknown max similarity {kind!r}")
    return out.astype(np.float32)


def pairwise_similarity(fa: np.ndarray, ma: np.ndarray, fb: np.ndarray, mb: np.ndarray,
                        kind: str = "cosine") -> np.ndarray:
    """f32[A, B, F]: S_k between every region of ``a`` and every region of ``b`` (reference version).

    fa f32[A, *S, F], ma bool[A, *S]; fb, mb likewise (the same spatial shape S, of any rank).
    Used for small inputs and tests; the report streams the same computation over blocks (see
    ``faithfulness.region_stats``).
    """
    if kind == "cosine":
        dots = np.einsum("avk,bvk->abk", flat_voxels(masked(np.asarray(fa, np.float64), ma)),
                         flat_voxels(masked(np.asarray(fb, np.float64), mb)))
        return cosine_from_dots(dots, region_norm(fa, ma), region_norm(fb, mb))
    return max_similarity(region_max(fa, ma)[:, None], region_max(fb, mb)[None], kind)


class FeatureStore:
    """Last hidden features of a run's images, computed in blocks; kept in memory when small.

    ``blocks(name, images)`` yields ``(start, f32[b, *S, F])`` for images f32[N, *S, M] (slices
    or volumes). The network runs once per split
    while the split's features fit in ``cache_bytes`` (later passes read the cache); otherwise
    every pass recomputes them block by block, so memory stays bounded by one block.
    """

    def __init__(self, features_fn: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]],
                 variables: Any, batch_size: int = 16, cache_bytes: float = 2e9,
                 progress: bool = True):
        self._fn = jax.jit(lambda v, x: features_fn(v, x)[1])
        self.variables = variables
        self.batch_size = max(1, int(batch_size))
        self.cache_bytes = cache_bytes
        self.progress = progress
        self._cache: dict[str, np.ndarray] = {}

    def compute(self, images: np.ndarray) -> np.ndarray:
        """f32[N, *S, F] for a small array of images f32[N, *S, M] (no caching)."""
        return np.concatenate([f for _, f in self._iter(images, None)], axis=0)

    def _iter(self, images: np.ndarray, desc: str | None) -> Iterator[tuple[int, np.ndarray]]:
        n = len(images)
        starts = range(0, n, self.batch_size)
        for s in tqdm(starts, desc=desc, disable=not self.progress or desc is None, leave=False,
                      unit="batch"):
            yield s, np.asarray(self._fn(self.variables, jnp.asarray(images[s:s + self.batch_size])))

    def blocks(self, name: str, images: np.ndarray, desc: str | None = None
               ) -> Iterator[tuple[int, np.ndarray]]:
        if name in self._cache:
            feats = self._cache[name]
            for s in range(0, len(feats), self.batch_size):
                yield s, feats[s:s + self.batch_size]
            return
        keep: list[np.ndarray] | None = []
        for s, f in self._iter(images, desc):
            if keep is not None:
                keep.append(f)
                if f.nbytes * len(images) / max(1, len(f)) > self.cache_bytes:
                    keep = None
            yield s, f
        if keep is not None and keep:
            self._cache[name] = np.concatenate(keep, axis=0)
