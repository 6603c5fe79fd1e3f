"""Random projections of class gradients: D parameters -> d numbers, never a dense D x d matrix.

A projector maps the gradient leaves of a :class:`~tracin_jax.influence.subsets.ParamSubset`
(each ``f32[..., *leaf_shape]``, any leading batch axes) to ``f32[..., d]`` so that inner
products are preserved in expectation, ``E[<Pg, Pg'>] = <g, g'>``. TracIn is then computed on
the projected features exactly as on the exact ones.

The leaves are flattened and concatenated in ``subset.paths`` order into one vector of D
numbers per row (this briefly doubles the memory of the batch's gradients; lower the batch size
if that matters); the projection is defined on that vector, generated on the fly from one PRNG
seed, so test and training features of the same subset and seed always share it. Kinds:

- ``countsketch`` (default): sparse JL: each coordinate goes to one of d buckets with a random
  sign; O(D) work per vector (a scatter-add), no matrix at all. Same variance as ``rademacher``
  (below). For the full U-Net (31.0M parameters, d = 4096) it is the only kind whose cost is
  small next to the gradients themselves: XLA's cost analysis counts 368 GFLOP for the class
  gradients of one 192x192 example and +763 GFLOP for a dense projection to 4096, and generating
  the dense matrix's random signs costs more again on a CPU (about 4x CountSketch's time there).
- ``rademacher``: dense JL with entries +-1/sqrt(d), generated block by block
  (``rows x d`` entries at a time, block i from ``fold_in(key(seed), i)``, inside one
  ``lax.scan``), 32 signs per random word.
- ``gaussian``: the same with N(0, 1/d) entries.
- ``logra``: per-layer Kronecker projection of each kernel's gradient, computed from layer
  inputs and output gradients without the weight gradients (:mod:`tracin_jax.influence.logra`;
  there ``dim`` is the per-layer rank).

Expected error. For one inner product, with cos = <g, g'> / (|g| |g'|):

    Var[<Pg, Pg'>] = (|g|^2 |g'|^2 + <g, g'>^2) / d                          (gaussian)
    Var[<Pg, Pg'>] = (|g|^2 |g'|^2 + <g, g'>^2 - 2 sum_k g_k^2 g'_k^2) / d   (rademacher, countsketch)

so the relative error of an entry, measured against |g| |g'|, is about sqrt((1 + cos^2) / d):
~3.1-4.4% at d = 1024, ~1.6-2.2% at d = 4096, ~0.8-1.1% at d = 16384 (tested in
``tests/test_influence_projection.py``). The same matrix serves every checkpoint, so for a
TracIn sum the standard deviation is at most sqrt(2 / d) * sqrt(sum_t eta_t |g_t|^2) *
sqrt(sum_t eta_t |g'_t|^2) (Cauchy-Schwarz; checked on a UNet in the same tests).

Default: a subset of at most ``EXACT_MAX_PARAMS`` (65536) parameters is used exactly; a larger
one without an explicit dimension is projected to ``DEFAULT_PROJ_DIM`` (4096) with the
``countsketch`` kind: the paper's full model (31.0M parameters) then stores 3 x 4096 float32 per
training slice and checkpoint (about 100 MB for 2070 slices), and entries carry ~2% noise.

The projection matmul runs at the backend's default matmul precision (TF32 on recent NVIDIA
GPUs): its rounding (~1e-3 relative) is far below the projection's own noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp

from tracin_jax.errors import InputError
from tracin_jax.influence.subsets import ParamSubset

EXACT_MAX_PARAMS = 65536
DEFAULT_PROJ_DIM = 4096
KINDS = ("countsketch", "rademacher", "gaussian", "logra")
DEFAULT_PROJ_KIND = "countsketch"
# Elements of one on-the-fly block of a dense projection matrix (64 MiB in float32).
BLOCK_ELEMENTS = 2**24


def _dense_block(key: jax.Array, rows: int, dim: int, kind: str) -> jax.Array:
    """f32[rows, dim]: one block of the projection matrix, unscaled (unit-variance entries)."""
    if kind == "gaussian":
        return jax.random.normal(key, (rows, dim), jnp.float32)
    words = -(-dim // 32)
    bits = jax.random.bits(key, (rows, words), jnp.uint32)
    signs = (bits[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    return (1.0 - 2.0 * signs.astype(jnp.float32)).reshape(rows, words * 32)[:, :dim]


def _project_dense(g: jax.Array, key: jax.Array, dim: int, kind: str) -> jax.Array:
    """g f32[M, n] -> f32[M, dim], scanning over row blocks of the (n x dim) matrix."""
    m, n = g.shape
    rows = max(1, min(n, BLOCK_ELEMENTS // dim))
    nblocks = -(-n // rows)
    g = jnp.pad(g, ((0, 0), (0, nblocks * rows - n))).reshape(m, nblocks, rows).transpose(1, 0, 2)

    def body(acc, xs):
        i, gb = xs
        return acc + gb @ _dense_block(jax.random.fold_in(key, i), rows, dim, kind), None

    acc, _ = jax.lax.scan(body, jnp.zeros((m, dim), jnp.float32), (jnp.arange(nblocks), g))
    return acc / math.sqrt(dim)


def _countsketch_state(key: jax.Array, n: int, dim: int) -> tuple[jax.Array, jax.Array]:
    """(bucket int32[n] in [0, dim), sign f32[n] of +-1): the sketch of n coordinates."""
    bucket = jax.random.randint(jax.random.fold_in(key, 0), (n,), 0, dim)
    sign = jax.random.rademacher(jax.random.fold_in(key, 1), (n,), jnp.float32)
    return bucket, sign


def _project_countsketch(g: jax.Array, state: tuple[jax.Array, jax.Array], dim: int) -> jax.Array:
    """g f32[M, n] -> f32[M, dim]: coordinate k added to bucket h(k) with sign s(k) (a
    scatter-add, O(n) per row; on the CPU as fast as a sorted segment sum, measured)."""
    bucket, sign = state
    return jnp.zeros((g.shape[0], dim), jnp.float32).at[:, bucket].add(g * sign)


@dataclass(frozen=True)
class Projector:
    """Projects the gradient leaves of ``subset`` to ``dim`` numbers (unbiased inner products).

    ``projector(leaves)``: leaves is a sequence aligned with ``subset.paths``, each
    ``f32[*lead, *leaf_shape]`` with the same leading axes; returns ``f32[*lead, dim]``.
    Pure and jit-compatible; the matrices are regenerated from the seed on every call.
    """

    subset: ParamSubset
    dim: int
    seed: int = 0
    kind: str = "countsketch"

    def __call__(self, leaves: Sequence[jax.Array]) -> jax.Array:
        return self.project(leaves, jax.random.key(self.seed))

    def project(self, leaves: Sequence[jax.Array], key: jax.Array) -> jax.Array:
        """As ``__call__`` with an explicit (possibly traced) PRNG key instead of the seed."""
        if self.kind == "countsketch":
            return self.apply_sketch(leaves, self.sketch_state(key))
        lead, g = self._flat(leaves)
        return _project_dense(g, key, self.dim, self.kind).reshape(*lead, self.dim)

    def sketch_state(self, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """CountSketch only: its (bucket, sign) arrays for this key, to reuse over many calls of
        :meth:`apply_sketch` in one program (drawn once, not once per example)."""
        if self.kind != "countsketch":
            raise ValueError(f"sketch_state is for countsketch projectors, not {self.kind!r}")
        return _countsketch_state(key, self.subset.size, self.dim)

    def apply_sketch(self, leaves: Sequence[jax.Array], state) -> jax.Array:
        """CountSketch only: ``leaves`` -> f32[*lead, dim] with a state from :meth:`sketch_state`."""
        lead, g = self._flat(leaves)
        return _project_countsketch(g, state, self.dim).reshape(*lead, self.dim)

    def _flat(self, leaves: Sequence[jax.Array]) -> tuple[tuple[int, ...], jax.Array]:
        """-> (leading axes, f32[M, P]): leaves flattened and concatenated in subset order."""
        first, shape0 = leaves[0], self.subset.shapes[0]
        lead = first.shape[: first.ndim - len(shape0)]
        m = math.prod(lead)
        return lead, jnp.concatenate([l.reshape(m, -1).astype(jnp.float32) for l in leaves], axis=1)

    def describe(self) -> dict:
        return {"dim": self.dim, "seed": self.seed, "kind": self.kind}


def make_projector(subset: ParamSubset, dim: int | None, seed: int = 0,
                   kind: str | None = DEFAULT_PROJ_KIND) -> Projector | None:
    """The projector for ``subset``, or None for exact gradients.

    ``dim=None`` chooses: exact when the subset has at most EXACT_MAX_PARAMS parameters, else
    ``DEFAULT_PROJ_DIM``. ``dim=0`` forces exact gradients whatever the size. ``kind=None`` is
    ``DEFAULT_PROJ_KIND``. ``kind="logra"``: the per-layer projection of
    :mod:`tracin_jax.influence.logra`, where ``dim`` is the per-layer rank (None: 16).
    """
    kind = DEFAULT_PROJ_KIND if kind is None else kind
    if kind not in KINDS:
        raise InputError(f"projection kind {kind!r} is not one of {', '.join(KINDS)}")
    if kind == "logra":
        from tracin_jax.influence.logra import make_logra_projector

        return make_logra_projector(subset, dim, seed)
    if dim is None:
        dim = 0 if subset.size <= EXACT_MAX_PARAMS else DEFAULT_PROJ_DIM
    if int(dim) != dim or dim < 0:
        raise InputError(f"--proj-dim {dim!r} must be a positive integer (or 0 for exact)")
    if dim == 0:
        return None
    return Projector(subset=subset, dim=int(dim), seed=int(seed), kind=kind)
