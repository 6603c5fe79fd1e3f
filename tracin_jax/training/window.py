"""Whole volumes through a network trained on patches: a sliding window.

A 3D run with ``data.patch`` trains on random patches of its volumes (``training.augment.
random_patch``); every later use of the model (the per-epoch metrics, ``Run.apply`` and
``Run.features``, influence, the report, the retrainings of ``evaluate``) sees whole volumes
through :class:`SlidingWindow`, which wraps the network:

- along each axis of length n, windows of the patch's length p start at k evenly spread
  positions from 0 to n - p (both included), k the fewest whose step is at most
  ``p * (1 - overlap)`` (:func:`window_starts`; one window when p = n);
- every window of every volume goes through the network in one batched call (inference mode:
  an example's output does not depend on the rest of its batch);
- each voxel's logits (and last hidden features) are the mean over the windows that hold it.

The head is a 1x1x1 convolution, so the averaged logits are the head applied to the averaged
features voxel by voxel: the class gradients of the head subset (``influence.grads``, computed
from the features and logits) are exact for the windowed model, and the gradients of any other
subset are those of this function of the parameters. The wrapper shares its network's variables
(``flax.linen.share_scope``): the same ``{'params', 'batch_stats'}`` tree, so checkpoints load
into either. :func:`inference_model` gives the model every stage uses for a config.

Per-layer methods that read one layer call per example (LoGra, EK-FAC) do not apply to the
windowed model (a layer sees the windows, not the volume): they are refused in one line
(:func:`check_per_layer_method`).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from tracin_jax.errors import InputError
from tracin_jax.models import build_model
from tracin_jax.models.interface import has_features, head_name


def window_starts(n: int, p: int, overlap: float) -> tuple[int, ...]:
    """Start positions of windows of length ``p`` covering an axis of length ``n`` (p <= n):
    the fewest k evenly spread starts from 0 to n - p whose step is at most
    ``max(1, floor(p * (1 - overlap)))``; position i is ``round(i * (n - p) / (k - 1))``."""
    n, p = int(n), int(p)
    if not 0 < p <= n:
        raise InputError(f"a window of {p} voxels does not fit an axis of {n} voxels")
    if p == n:
        return (0,)
    step = max(1, int(math.floor(p * (1.0 - float(overlap)))))
    k = math.ceil((n - p) / step) + 1
    return tuple(int(round(i * (n - p) / (k - 1))) for i in range(k))


def windows(shape, patch, overlap: float) -> list[tuple[slice, ...]]:
    """The windows (one slice per spatial axis) of a volume of spatial ``shape``, in C order of
    their starts (:func:`window_starts` per axis)."""
    starts = [window_starts(n, p, overlap) for n, p in zip(shape, patch)]
    return [tuple(slice(s, s + p) for s, p in zip(corner, patch))
            for corner in itertools.product(*starts)]


def coverage(shape, patch, overlap: float) -> np.ndarray:
    """f32[*shape]: how many windows hold each voxel (>= 1 everywhere)."""
    count = np.zeros(tuple(int(n) for n in shape), np.float32)
    for w in windows(shape, patch, overlap):
        count[w] += 1.0
    return count


def stitch(outputs: jnp.ndarray, shape, patch, overlap: float) -> jnp.ndarray:
    """Per-window outputs f32[B, n_windows, *patch, K] -> f32[B, *shape, K], the mean over the
    windows holding each voxel."""
    b, k = outputs.shape[0], outputs.shape[-1]
    total = jnp.zeros((b, *shape, k), outputs.dtype)
    for i, w in enumerate(windows(shape, patch, overlap)):
        total = total.at[(slice(None), *w)].add(outputs[:, i])
    inv = 1.0 / coverage(shape, patch, overlap)
    return total * jnp.asarray(inv, outputs.dtype)[None, ..., None]


def gather(x: jnp.ndarray, patch, overlap: float) -> jnp.ndarray:
    """Volumes f32[B, *S, M] -> their windows f32[B * n_windows, *patch, M] (volume-major)."""
    shape = x.shape[1:-1]
    parts = [x[(slice(None), *w)] for w in windows(shape, patch, overlap)]
    stacked = jnp.stack(parts, axis=1)  # [B, n_windows, *patch, M]
    return stacked.reshape(-1, *stacked.shape[2:])


class SlidingWindow(nn.Module):
    """``net`` applied to whole volumes by a sliding window of ``window`` voxels whose windows
    overlap by ``overlap`` of their size (module docstring). x: f32[B, X, Y, Z, M] (each axis at
    least the window's) -> logits f32[B, X, Y, Z, K] (and features f32[B, X, Y, Z, F] with
    ``return_features``). ``train=True`` calls ``net`` on x as it is (a training step sees
    patches already). Same variables as ``net``."""

    net: nn.Module
    window: tuple[int, ...]
    overlap: float = 0.5
    head_name: str = "head"
    dims: int = 3

    def setup(self):
        nn.share_scope(self, self.net)

    def __call__(self, x, train: bool = False, return_features: bool = False):
        kw = {"return_features": True} if return_features else {}
        shape = tuple(x.shape[1:-1])
        if train or shape == tuple(self.window):
            return self.net(x, train=train, **kw)
        out = self.net(gather(x, self.window, self.overlap), train=False, **kw)
        parts = out if return_features else (out,)
        b, n = x.shape[0], len(windows(shape, self.window, self.overlap))
        merged = [stitch(o.reshape(b, n, *o.shape[1:]), shape, self.window, self.overlap)
                  for o in parts]
        return tuple(merged) if return_features else merged[0]


def patch_of(config: Any) -> tuple[int, ...] | None:
    """The training patch of a 3D config (``data.patch``), None for whole volumes or 2D."""
    if int(getattr(config.model, "dims", 2)) != 3:
        return None
    patch = tuple(int(n) for n in getattr(config.data, "patch", (0, 0, 0)))
    return patch if any(patch) else None


def inference_model(config: Any) -> Any:
    """The model every stage after training applies to whole examples: ``build_model(config.
    model)``, wrapped in :class:`SlidingWindow` when the run trains on patches
    (``data.patch``, 3D only)."""
    net = build_model(config.model)
    patch = patch_of(config)
    if patch is None:
        return net
    if not has_features(net):
        raise InputError(f"model.arch={config.model.arch!r} does not return its features "
                         "(return_features), which the sliding window of data.patch needs")
    return SlidingWindow(net, patch, float(config.data.patch_overlap), head_name(net), 3)


def is_windowed(model: Any) -> bool:
    """Whether ``model`` is a :class:`SlidingWindow`."""
    return isinstance(model, SlidingWindow)


def check_per_layer_method(model: Any, what: str, instead: str) -> None:
    """One-line InputError when ``what`` (LoGra, EK-FAC) is asked of a windowed model; the
    line ends by suggesting ``instead``."""
    if is_windowed(model):
        raise InputError(f"{what} reads each layer once per example, but this run trained on "
                         f"patches (data.patch) and sees each volume through a sliding window "
                         f"of {'x'.join(map(str, model.window))} voxels, so a layer is called "
                         f"on the windows, not the volume; use {instead}")
