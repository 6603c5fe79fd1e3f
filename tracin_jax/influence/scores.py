"""Class-wise TracIn scores from features: blocked contraction, top-K, patients, self-influence.

With features ``F_t(z) = sqrt(eta_t) * g_t(z)`` of shape f32[C, D] per example and checkpoint,
concatenated over checkpoints into f32[C, T*D]:

    scores[a, i, b, j] = sum_t eta_t < g_t(train b, class j), g_t(test a, class i) >
                       = < F(train b)[j], F(test a)[i] >

Layouts (C classes: the run's foreground classes, e.g. the BraTS tumour classes NCR/NET, ED, ET):

- ``scores``: f32[n_test, C, n_train, C] (test example, test class, train example, train class);
- ``self_influence``: f32[n_train, C], ``sum_t eta_t |g_t(b, j)|^2`` (the diagonal of the
  train-vs-train scores);
- ``patient_scores``: f32[n_test, C, n_patients, C], the sum over each patient's slices;
- top-K: f32/int32[n_test, C, C, K] (test example, test class, train class, rank); proponents
  in decreasing score, opponents in increasing score (most negative first); ties broken by the
  lower training index. Entries of a test class absent from the test slice's ground truth
  (``test_present[a, i]`` False) are never ranked: index -1, value NaN. So are ranks beyond
  n_train.

Training blocks are processed one at a time on device (sharded over the ``train`` mesh axis);
the full tensor reaches the host only when it fits the memory budget, otherwise only the
streaming top-K state (O(n_test * C * C * K)) and the patient sums are kept.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from tracin_jax.progress import tqdm

from tracin_jax.data.split import patient_index  # noqa: F401 (also this module's API)
from tracin_jax.influence import sharding

HIGHEST = jax.lax.Precision.HIGHEST
NO_INDEX = np.iinfo(np.int32).max  # sorts after every real index


@jax.jit
def contract(test_feats: jax.Array, train_feats: jax.Array) -> jax.Array:
    """f32[n_test, C, F] x f32[nb, C, F] -> f32[n_test, C, nb, C]."""
    chex.assert_rank([test_feats, train_feats], 3)
    chex.assert_equal_shape_suffix([test_feats, train_feats], 2)  # same classes and features
    return jnp.einsum("aif,bjf->aibj", test_feats, train_feats, precision=HIGHEST)


@jax.jit
def squared_norms(feats: jax.Array) -> jax.Array:
    """f32[n, C, F] -> f32[n, C]: self-influence of each example and class."""
    return jnp.sum(jnp.square(feats), axis=-1)


def aggregate_by_patient(scores: Any, train_cases: Sequence[Any]) -> tuple[np.ndarray, list]:
    """Sums slice scores over each training patient's slices.

    scores f32[n_test, C, n_train, C], train_cases [n_train] -> (f32[n_test, C, n_patients, C],
    patients: the case ids, sorted, matching the third axis).
    """
    patients, index = patient_index(train_cases)
    onehot = np.eye(len(patients), dtype=np.float32)[index]  # [n_train, n_patients]
    out = jnp.einsum("aibj,bp->aipj", jnp.asarray(scores, jnp.float32), onehot, precision=HIGHEST)
    return np.asarray(out), patients


@jax.jit
def _patient_block(acc, block_scores, onehot):
    return acc + jnp.einsum("aibj,bp->aipj", block_scores, onehot, precision=HIGHEST)


# -- top-K ------------------------------------------------------------------------------
# The running state holds sort keys (score for opponents, -score for proponents, so both
# sort ascending) and training indices, f32/int32[n_test, C, C, K]; a merge sorts the state
# together with a new block by (key, index) and keeps the first K.

def init_topk(n_test: int, num_classes: int, k: int) -> dict:
    shape = (n_test, num_classes, num_classes, k)
    fill = {"key": jnp.full(shape, jnp.inf, jnp.float32), "idx": jnp.full(shape, NO_INDEX, jnp.int32)}
    return {"proponents": dict(fill), "opponents": dict(fill)}


@partial(jax.jit, static_argnames=("k",))
def merge_topk(state: dict, block_scores: jax.Array, block_idx: jax.Array, k: int) -> dict:
    """Merges a block into the running top-K.

    block_scores f32[n_test, C, nb, C]; block_idx int32[nb] global training indices, -1 for
    padding rows (never ranked).
    """
    s = jnp.moveaxis(block_scores, 2, 3)  # [n_test, C, C, nb]
    idx = jnp.broadcast_to(block_idx, s.shape)
    pad = idx < 0
    idx = jnp.where(pad, NO_INDEX, idx)
    out = {}
    for name, sign in (("proponents", -1.0), ("opponents", 1.0)):
        key = sign * s
        key = jnp.where(pad, jnp.inf, jnp.where(key == 0, 0.0, key))  # -0.0 ties with 0.0
        keys = jnp.concatenate([state[name]["key"], key], axis=-1)
        ids = jnp.concatenate([state[name]["idx"], idx], axis=-1)
        keys, ids = jax.lax.sort((keys, ids), dimension=-1, num_keys=2)
        out[name] = {"key": keys[..., :k], "idx": ids[..., :k]}
    return out


def finalise_topk(state: dict, test_present: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Running state -> {'proponents_indices', 'proponents_scores', 'opponents_indices',
    'opponents_scores'}: int32 / f32[n_test, C, C, K]; -1 / NaN where not ranked."""
    out = {}
    for name, sign in (("proponents", -1.0), ("opponents", 1.0)):
        idx = np.array(sharding.to_host(state[name]["idx"]), dtype=np.int64)
        val = sign * np.array(sharding.to_host(state[name]["key"]), dtype=np.float32)
        bad = idx == NO_INDEX
        if test_present is not None:
            bad |= ~np.asarray(test_present, bool)[:, :, None, None]
        idx[bad] = -1
        val[bad] = np.nan
        out[f"{name}_indices"] = idx.astype(np.int32)
        out[f"{name}_scores"] = val
    return out


def topk_from_scores(scores: Any, k: int, test_present: np.ndarray | None = None) -> dict:
    """Top-K proponents/opponents of a full score tensor (slices or patients).

    scores f32[n_test, C, n, C] -> dict of int32 / f32[n_test, C, C, min(k, n)]; absent test
    classes are marked (-1 / NaN), see :func:`finalise_topk`.
    """
    scores = jnp.asarray(scores, jnp.float32)
    n_test, c, n, _ = scores.shape
    k = min(int(k), n)
    state = merge_topk(init_topk(n_test, c, k), scores, jnp.arange(n, dtype=jnp.int32), k)
    return finalise_topk(state, test_present)


# -- the blocked scorer ------------------------------------------------------------------

def score_blocks(test_feats: jax.Array, read_block: Callable[[int], np.ndarray],
                 blocks: Sequence[tuple[int, int]], *, mesh, scores_out: np.ndarray | None = None,
                 collect_scores: bool | None = None, topk: int | None = None, patient_of: np.ndarray | None = None,
                 n_patients: int = 0, progress: bool = False, self_influence: bool = True) -> dict:
    """Contracts test features with training blocks, one block at a time, on device.

    Args:
      test_feats: f32[n_test, C, F] (features concatenated over checkpoints).
      read_block: k -> f32[stop-start, C, F] host array of training block k.
      blocks: [(start, stop)] row ranges of the blocks, covering the training set in order.
      mesh: the ``train`` mesh; training rows are sharded over it, test features replicated.
      scores_out: f32[n_test, C, n_train, C] array (e.g. a memmap) to fill, or None.
      collect_scores: fetch every block's scores to the host (default: scores_out given); with
        several processes all must collect, while only the writer passes scores_out.
      topk: K for the streaming top-K, or None.
      patient_of: int32[n_train] patient position of every slice (None: no patient sums).
      self_influence: also compute the training blocks' squared norms (else None).
    Returns:
      {"self_influence": f32[n_train, C], "topk_state": state or None,
       "patient_scores": f32[n_test, C, n_patients, C] or None} (device arrays for the last two).
    """
    if collect_scores is None:
        collect_scores = scores_out is not None
    test = sharding.replicate(jnp.asarray(test_feats), mesh)
    n_test, c, _ = test.shape
    n_train = blocks[-1][1] if blocks else 0
    k = min(int(topk), n_train) if topk else None
    state = sharding.replicate(init_topk(n_test, c, k), mesh) if k else None
    pat = (sharding.replicate(np.zeros((n_test, c, n_patients, c), np.float32), mesh)
           if patient_of is not None else None)
    self_parts = []  # device arrays, fetched once at the end (no per-block sync)
    width = sharding.padded_size(max(stop - start for start, stop in blocks), mesh)
    bar = tqdm(total=n_train, desc="scores", unit="ex", disable=not progress, leave=False,
               dynamic_ncols=True)
    for kb, (start, stop) in enumerate(blocks):
        rows = stop - start
        block = np.asarray(read_block(kb), np.float32)
        # Every block is padded to one width so that one compiled program serves them all.
        if width > rows:  # (no copy of a full block)
            block = np.concatenate([block, np.zeros((width - rows, *block.shape[1:]),
                                                    np.float32)])
        idx = np.full(width, -1, np.int32)
        idx[:rows] = np.arange(start, stop, dtype=np.int32)
        train = sharding.shard_rows(block, mesh)
        s = contract(test, train)  # [n_test, C, width, C], sharded on the training axis
        if self_influence:
            self_parts.append((rows, squared_norms(train)))
        if state is not None:
            state = merge_topk(state, s, sharding.shard_rows(idx, mesh), k)
        if pat is not None:
            onehot = np.zeros((width, n_patients), np.float32)
            onehot[np.arange(rows), patient_of[start:stop]] = 1.0
            pat = _patient_block(pat, s, sharding.shard_rows(onehot, mesh))
        if collect_scores:
            host = sharding.to_host(s)
            if scores_out is not None:
                scores_out[:, :, start:stop, :] = host[:, :, :rows, :]
        bar.update(rows)
    bar.close()
    self_inf = None
    if self_influence:
        self_inf = (np.concatenate([sharding.to_host(p)[:r] for r, p in self_parts])
                    if self_parts else np.zeros((0, c), np.float32))
    return {"self_influence": self_inf, "topk_state": state, "patient_scores": pat}


def influence_scores(test_feats: Any, train_feats: Any) -> np.ndarray:
    """In-memory convenience: f32[n_test, C, F] x f32[n_train, C, F] -> f32[n_test, C, n_train, C]."""
    return np.asarray(contract(jnp.asarray(test_feats, jnp.float32),
                               jnp.asarray(train_feats, jnp.float32)))
