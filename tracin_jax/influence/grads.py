"""Per-example class gradients: the features that class-wise TracIn contracts.

The swappable unit is a *class-gradient function*::

    ClassGradFn = (variables, images f32[B,H,W,Cin], labels int[B,H,W]) -> f32[B, C, D]

row ``[b, c]`` is the gradient of the class-c loss of example b with respect to the chosen
parameter subset, flattened (leaves in ``subset.paths`` order) or projected to D = d numbers.
Anything with that signature can replace :func:`make_class_grad_fn`'s result (the feature store
and the scorer only see the arrays); give it a ``tag`` attribute (a string naming what it
computes) so features of different functions never share a store. :class:`ClassGradFunction`
carries that tag, the subset and the projector.

The loss is pluggable: ``loss_fn(logits f32[B,H,W,K], labels int[B,H,W]) -> f32[B, C]``, one
value per example and class, each example's row depending on that example only (default
:func:`~tracin_jax.training.losses.tumour_dice_loss`, C = 3: NCR/NET, ED, ET).

Two ways to get the gradients, same numbers:

- ``vjp`` (any subset): ONE forward pass per example and its VJP, vmapped over the C one-hot
  class cotangents (the forward's residuals are shared by the C backward passes). Over the
  examples of a batch, ``examples`` chooses:

  * ``unroll`` (default on CPU): one batch-1 program per example, unrolled inside the one jitted
    function (compilation grows with the batch: 1.4-2.8x ``vmap``'s at batch 4-16). Measured on
    a 2-core CPU (``benchmarks/README.md``; U-Net width 16 and 64, 96x96, batch 8 and 4):
    0.86-1.10x the FLOP rate of a plain batched training step, against 0.50-0.70x for ``vmap``;
    a ``lax.map``/``lax.scan`` loop over the examples (an XLA while loop) ran at 0.07-0.09x and
    is not offered.
  * ``vmap`` (default on GPU/TPU): the per-example function vmapped over the batch, which keeps
    the accelerator's batched kernels (not yet measured on an accelerator in this project).

  With a ``countsketch`` projector, each example's gradient is projected as soon as it is
  computed (its sketch indices drawn once per batch), so a batch never holds B x C x P floats;
  dense projections run once on the stacked batch (one pass over the random matrix per batch).
- ``head`` (subsets inside the final 1x1 conv, e.g. ``head``): the logits are
  ``features @ W + b`` pixel by pixel, so ``dD_c/dW = sum_pixels features (x) dD_c/dlogits``
  and ``dD_c/db = sum_pixels dD_c/dlogits``. One batched forward gives the features and logits;
  the loss is a function of the logits alone, so its per-class logit gradients are cheap; then
  one einsum ``bhwf,bchwk->bcfk``. No backward pass through the network at all.

Precision: the head einsum and all influence contractions run at HIGHEST precision; the
network's own forward/backward passes run at the backend's default (TF32 convolutions on recent
NVIDIA GPUs, as in training). For full float32 there, call under
``with jax.default_matmul_precision("float32"):`` (around ``run_influence`` too).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp

from tracin_jax.influence.projection import Projector
from tracin_jax.influence.subsets import ParamSubset
from tracin_jax.training.losses import tumour_dice_loss

ClassGradFn = Callable[[Any, jax.Array, jax.Array], jax.Array]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]

HEAD_PATHS = ("head/bias", "head/kernel")


@dataclass(frozen=True)
class ClassGradFunction:
    """A ClassGradFn plus what the feature store keys on.

    ``fn(variables, images, labels) -> f32[B, C, dim]``; ``tag`` names what it computes (loss,
    method, any wrapping); ``subset`` and ``projector`` are None when unknown / exact.
    """

    fn: Callable = field(repr=False)
    tag: str
    dim: int
    subset: ParamSubset | None = None
    projector: Projector | None = None

    def __call__(self, variables: Any, images: jax.Array, labels: jax.Array) -> jax.Array:
        return self.fn(variables, images, labels)


def _loss_name(loss_fn: LossFn) -> str:
    base = getattr(loss_fn, "func", loss_fn)  # functools.partial
    name = getattr(base, "__name__", type(base).__name__)
    kw = getattr(loss_fn, "keywords", None)
    return name + ("(" + ",".join(f"{k}={v}" for k, v in sorted(kw.items())) + ")" if kw else "")


def class_logit_grads(loss_fn: LossFn, logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example, per-class gradients of the loss w.r.t. the logits.

    logits f32[B,H,W,K], labels int[B,H,W] -> f32[B, C, H, W, K]; one loss evaluation per
    example, its VJP vmapped over the C class cotangents.
    """

    def one(lg, y):
        out, vjp = jax.vjp(lambda l: loss_fn(l[None], y[None])[0], lg)
        (dl,) = jax.vmap(vjp)(jnp.eye(out.shape[0], dtype=out.dtype))
        return dl

    return jax.vmap(one)(logits, labels)


def _finish(leaves, projector: Projector | None) -> jax.Array:
    """Leaves [B, C, *leaf_shape] (subset order) -> f32[B, C, D]: projected or flattened."""
    if projector is not None:
        return projector(leaves)
    b, c = leaves[0].shape[:2]
    return jnp.concatenate([l.reshape(b, c, -1) for l in leaves], axis=-1)


def is_head_subset(model: Any, subset: ParamSubset) -> bool:
    """True when every chosen parameter belongs to the final 1x1 conv ``head`` and the model
    can return the head's input (``return_features=True``)."""
    if not set(subset.paths) <= set(HEAD_PATHS):
        return False
    kernel = dict(zip(subset.paths, subset.shapes)).get("head/kernel")
    if kernel is not None and tuple(kernel[:2]) != (1, 1):
        return False
    call = getattr(type(model), "__call__", None)
    try:
        return "return_features" in inspect.signature(call).parameters
    except (TypeError, ValueError):
        return False


def default_examples_mode() -> str:
    """``unroll`` on the CPU backend, ``vmap`` on accelerators (see the module docstring)."""
    return "unroll" if jax.default_backend() == "cpu" else "vmap"


def make_class_grad_fn(model: Any, subset: ParamSubset, loss_fn: LossFn = tumour_dice_loss,
                       projector: Projector | None = None, *, method: str = "auto",
                       examples: str = "auto", tag: str | None = None) -> ClassGradFunction:
    """Builds the jitted ClassGradFn for a Flax model and parameter subset.

    Args:
      model: a Flax linen module called as ``model.apply(variables, x, train=False)``
        (the ``head`` method also needs ``return_features=True`` -> (logits, features)).
      subset: the parameters to differentiate (see :func:`resolve_subset`).
      loss_fn: ``(logits f32[B,H,W,K], labels int[B,H,W]) -> f32[B, C]``.
      projector: None for exact flattened gradients (D = subset.size), else a Projector
        (D = projector.dim).
      method: ``auto`` (``head`` when the subset allows it, else ``vjp``), ``head`` or ``vjp``.
      examples: how ``vjp`` goes over the examples of a batch: ``auto`` (``unroll`` on CPU,
        ``vmap`` elsewhere), ``unroll`` or ``vmap``. Same numbers either way.
      tag: names the features for the store; default derived from loss, method and subset.
    Returns:
      ClassGradFunction: ``(variables, images f32[B,H,W,Cin], labels int[B,H,W]) -> f32[B,C,D]``.
    """
    if method == "auto":
        method = "head" if is_head_subset(model, subset) else "vjp"
    if method not in ("head", "vjp"):
        raise ValueError(f"unknown gradient method {method!r} (auto, head or vjp)")
    if method == "head" and not is_head_subset(model, subset):
        raise ValueError(f"subset {subset.name!r} is not inside the 1x1 head; use method='vjp'")
    if examples == "auto":
        examples = default_examples_mode()
    if examples not in ("unroll", "vmap"):
        raise ValueError(f"unknown examples mode {examples!r} (auto, unroll or vmap)")

    # BatchNorm runs in inference mode (train=False: running averages, no state update) for two
    # reasons. The gradient must be that of the function the checkpoint actually computes at
    # test time, which is the inference-mode network. And per-example gradients must not mix
    # examples: with batch statistics, example b's output (hence its loss) would depend on the
    # other examples of the batch, so its "own" gradient would change with the batch it sits in.
    def apply(variables, x):
        return model.apply(variables, x, train=False)

    def head_grads(variables, images, labels):
        logits, feats = model.apply(variables, images, train=False, return_features=True)
        dlog = class_logit_grads(loss_fn, logits, labels)  # [B, C, H, W, K]
        leaves = []
        for path in subset.paths:
            if path == "head/kernel":
                gk = jnp.einsum("bhwf,bchwk->bcfk", feats, dlog,
                                precision=jax.lax.Precision.HIGHEST)
                leaves.append(gk[:, :, None, None])  # [B, C, 1, 1, F, K] like the kernel
            else:
                leaves.append(jnp.sum(dlog, axis=(2, 3)))  # [B, C, K]
        return leaves

    def vjp_per_example(variables, x, y):
        """x f32[H,W,Cin], y int[H,W] -> tuple of [C, *leaf_shape] (subset order)."""
        params = variables["params"]
        others = {k: v for k, v in variables.items() if k != "params"}

        def class_losses(leaves):
            v = dict(others, params=subset.insert(params, leaves))
            return loss_fn(apply(v, x[None]), y[None])[0]  # f32[C]

        out, vjp = jax.vjp(class_losses, subset.select(params))
        (g,) = jax.vmap(vjp)(jnp.eye(out.shape[0], dtype=out.dtype))
        return g

    sketch_each = projector is not None and projector.kind == "countsketch"

    def vjp_features(variables, images, labels):
        """-> f32[B, C, D]: exact or projected class gradients of every example."""
        if examples == "vmap":
            leaves = list(jax.vmap(lambda x, y: vjp_per_example(variables, x, y))(images, labels))
            return _finish(leaves, projector)
        if sketch_each:
            state = projector.sketch_state(jax.random.key(projector.seed))
            rows = [projector.apply_sketch(vjp_per_example(variables, images[b], labels[b]), state)
                    for b in range(images.shape[0])]
            return jnp.stack(rows)
        per = [vjp_per_example(variables, images[b], labels[b]) for b in range(images.shape[0])]
        leaves = [jnp.stack(parts) for parts in zip(*per)]
        return _finish(leaves, projector)

    @jax.jit
    def fn(variables, images, labels):
        images, labels = images.astype(jnp.float32), labels.astype(jnp.int32)
        if method == "head":
            return _finish(head_grads(variables, images, labels), projector)
        return vjp_features(variables, images, labels)

    dim = projector.dim if projector is not None else subset.size
    if tag is None:
        proj = "exact" if projector is None else f"{projector.kind}{projector.dim}s{projector.seed}"
        tag = f"{_loss_name(loss_fn)}|{method}|{proj}"
    return ClassGradFunction(fn=fn, tag=tag, dim=dim, subset=subset, projector=projector)


def normalised(grad_fn: ClassGradFn, eps: float = 1e-12) -> ClassGradFunction:
    """Wraps a ClassGradFn so every class gradient has unit norm (cosine TracIn).

    With projection, the projected vector is normalised. Scores become
    ``sum_t eta_t cos(grad D_j(z), grad D_i(z'))``; self-influence becomes ``sum_t eta_t``.
    """
    inner = grad_fn

    @jax.jit
    def fn(variables, images, labels):
        g = inner(variables, images, labels)
        return g / (jnp.linalg.norm(g, axis=-1, keepdims=True) + eps)

    return ClassGradFunction(
        fn=fn, tag=f"normalised({getattr(grad_fn, 'tag', _loss_name(grad_fn))})",
        dim=getattr(grad_fn, "dim", -1), subset=getattr(grad_fn, "subset", None),
        projector=getattr(grad_fn, "projector", None))


__all__ = ["ClassGradFn", "ClassGradFunction", "LossFn", "class_logit_grads",
           "default_examples_mode", "is_head_subset", "make_class_grad_fn", "normalised"]
