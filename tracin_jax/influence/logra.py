"""Per-layer low-rank gradient projection (LoGra, Choe et al. 2024) without weight gradients.

For a layer whose output is linear in its kernel, ``y[p, o] = sum_k a_p[k] W[k, o]`` (Flax
``Conv`` with a ``(kh, kw, Cin, Cout)`` kernel: k runs over the ``kh*kw*Cin`` numbers of the
input patch at output pixel p; in 3D a ``(kd, kh, kw, Cin, Cout)`` kernel and the
``kd*kh*kw*Cin`` numbers of the patch at output voxel p; ``ConvTranspose`` and ``Dense``
likewise), the gradient of a loss is ``G = sum_p a_p delta_p^T`` with ``delta_p = dL/dy_p``.
LoGra projects it with a Kronecker product of two small matrices, ``P_in`` (k x r_in) and
``P_out`` (Cout x r_out)::

    P_in^T G P_out = sum_p (P_in^T a_p) (P_out^T delta_p)^T          f32[r_in, r_out]

and ``P_in^T a_p`` is the layer itself run with ``P_in`` (reshaped to ``(kh, kw, Cin, r_in)``,
``(kd, kh, kw, Cin, r_in)`` in 3D) as its kernel: one small convolution of the layer's input.
So the projected gradient needs only the forward activations and the backward *output*
gradients; the weight gradient (the ``kh*kw*Cin x Cout`` outer-product sum, a full
weight-gradient pass per class) is never formed.
The input projection is computed once per example and shared by the C classes.

How the class gradients are computed (:func:`make_logra_grad_fn`): ONE batched forward pass in
inference mode under a Flax method interceptor that adds a zero "perturbation" to the output
of every layer whose parameters are in the subset and records the projected layer inputs; the
VJP of the per-example, per-class losses ``f32[B, C]`` w.r.t. those perturbations, vmapped over
the C class cotangents, gives every example's output gradients at once (in inference mode the
examples do not interact, so summing the losses over the batch keeps them apart). No
per-example programs, no per-example weight gradients.

Parameters other than the kernels (convolution and dense biases, BatchNorm/GroupNorm scale and
bias) are few (0.04-0.33% of the U-Net's parameters at widths 64-8) and kept EXACT, from the
same output gradients: ``d bias = sum_p delta_p``; for a norm layer ``y = xhat * scale + bias``,
``d scale = sum_p delta_p * xhat_p`` with ``xhat`` the layer run without scale and bias.

Feature layout (``D`` numbers per example and class): the subset's leaves in ``subset.paths``
order, a kernel as its ``r_in x r_out`` block flattened row-major, any other leaf flattened as
is. Ranks: ``r_in = min(rank, k)`` and ``r_out = min(rank, Cout)``; a side whose size is at most
``rank`` uses the identity (exact, e.g. the head's 4 outputs); otherwise the matrix has
independent Rademacher entries ``+-1/sqrt(r)`` drawn from ``fold_in(key(seed), layer index)``,
so ``E[<P g, P g'>] = <g, g'>`` (P_in and P_out independent, each with E[P P^T] = I).
:meth:`LograProjector.__call__` applies the same projection to explicit gradient leaves (the
reference the tests compare with, and what ``make_class_grad_fn(..., method="vjp")`` does with a
LoGra projector).

Supported layers, 2D and 3D alike: ``nn.Conv``, ``nn.ConvTranspose``, ``nn.Dense`` (kernel,
bias) and ``nn.BatchNorm``/``nn.GroupNorm`` (scale, bias); a subset leaf of any other module is
refused with an InputError naming it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tracin_jax.errors import InputError
from tracin_jax.influence.subsets import ParamSubset

DEFAULT_LOGRA_RANK = 16
LINEAR_LAYERS = (nn.Conv, nn.ConvTranspose, nn.Dense)
NORM_LAYERS = (nn.BatchNorm, nn.GroupNorm)
_HIGHEST = jax.lax.Precision.HIGHEST


def is_kernel(path: str, shape: Sequence[int]) -> bool:
    """True for a leaf LoGra projects: a ``.../kernel`` of rank >= 2 (fan-in axes, then out)."""
    return path.rsplit("/", 1)[-1] == "kernel" and len(shape) >= 2


def layer_ranks(shape: Sequence[int], rank: int) -> tuple[int, int]:
    """Kernel shape (*fan_in_axes, Cout) -> (r_in, r_out) = (min(rank, k), min(rank, Cout))."""
    return min(rank, math.prod(shape[:-1])), min(rank, int(shape[-1]))


def _side(key: jax.Array, n: int, r: int) -> jax.Array:
    """f32[n, r]: identity when r == n, else Rademacher entries +-1/sqrt(r)."""
    if r == n:
        return jnp.eye(n, dtype=jnp.float32)
    return jax.random.rademacher(key, (n, r), jnp.float32) / math.sqrt(r)


@dataclass(frozen=True)
class LograProjector:
    """The per-layer Kronecker projection of a subset's gradient; see the module docstring.

    ``rank`` is the per-layer rank r; ``dim`` the total feature size D (kernels ``r_in*r_out``
    each, other leaves their size). ``projector(leaves)``: explicit gradient leaves aligned with
    ``subset.paths``, each ``f32[*lead, *leaf_shape]`` -> ``f32[*lead, D]``.
    """

    subset: ParamSubset
    rank: int = DEFAULT_LOGRA_RANK
    seed: int = 0
    kind: str = "logra"

    @property
    def dim(self) -> int:
        return int(sum(math.prod(layer_ranks(s, self.rank)) if is_kernel(p, s) else math.prod(s)
                       for p, s in zip(self.subset.paths, self.subset.shapes)))

    def matrices(self, key: jax.Array | None = None) -> dict[str, tuple[jax.Array, jax.Array]]:
        """{kernel path: (P_in f32[k, r_in], P_out f32[Cout, r_out])} for the subset's kernels."""
        key = jax.random.key(self.seed) if key is None else key
        out = {}
        for i, (path, shape) in enumerate(zip(self.subset.paths, self.subset.shapes)):
            if is_kernel(path, shape):
                r_in, r_out = layer_ranks(shape, self.rank)
                k = jax.random.fold_in(key, i)
                out[path] = (_side(jax.random.fold_in(k, 0), math.prod(shape[:-1]), r_in),
                             _side(jax.random.fold_in(k, 1), int(shape[-1]), r_out))
        return out

    def __call__(self, leaves: Sequence[jax.Array]) -> jax.Array:
        mats = self.matrices()
        parts, lead = [], None
        for path, shape, g in zip(self.subset.paths, self.subset.shapes, leaves):
            lead = g.shape[: g.ndim - len(shape)]
            if path in mats:
                p_in, p_out = mats[path]
                g2 = g.reshape(*lead, p_in.shape[0], p_out.shape[0]).astype(jnp.float32)
                blk = jnp.einsum("...ko,kr,os->...rs", g2, p_in, p_out, precision=_HIGHEST)
                parts.append(blk.reshape(*lead, -1))
            else:
                parts.append(g.reshape(*lead, -1).astype(jnp.float32))
        return jnp.concatenate(parts, axis=-1)

    def describe(self) -> dict:
        return {"dim": self.dim, "seed": self.seed, "kind": self.kind, "rank": self.rank}


def make_logra_projector(subset: ParamSubset, rank: int | None = None,
                         seed: int = 0) -> LograProjector:
    """The LoGra projector of ``subset`` at per-layer ``rank`` (None: DEFAULT_LOGRA_RANK)."""
    rank = DEFAULT_LOGRA_RANK if rank is None else rank
    if isinstance(rank, bool) or int(rank) != rank or rank < 1:
        raise InputError(f"--proj-dim {rank!r}: with --proj-kind logra it is the per-layer rank, "
                         "a positive integer (default 16)")
    return LograProjector(subset=subset, rank=int(rank), seed=int(seed))


def _module_path(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.path)


def _unbound(module: nn.Module, **changes) -> nn.Module:
    return module.clone(parent=None, **changes)


def _layer_plan(model: Any, variables: Any, subset: ParamSubset, x: jax.Array) -> dict[str, tuple]:
    """{module path: (kind 'linear'|'norm', leaf names in the subset, output shape)} of the
    modules that own subset leaves (shape-only trace). Raises InputError for a leaf whose
    module LoGra does not handle."""
    owners: dict[str, set[str]] = {}
    for path in subset.paths:
        mod, _, leaf = path.rpartition("/")
        owners.setdefault(mod, set()).add(leaf)
    plan: dict[str, tuple] = {}

    def record(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            path = _module_path(context.module)
            if path in owners:
                if isinstance(context.module, LINEAR_LAYERS):
                    kind = "linear"
                elif isinstance(context.module, NORM_LAYERS):
                    kind = "norm"
                else:
                    kind = type(context.module).__name__
                if path in plan:
                    raise InputError(f"LoGra: module {path} is called more than once per forward "
                                     "pass; choose a subset without it (--params)")
                plan[path] = (kind, frozenset(owners[path]), tuple(y.shape))
        return y

    def fwd(v, x):
        with nn.intercept_methods(record):
            return model.apply(v, x, train=False)

    jax.eval_shape(fwd, variables, x)
    for path in subset.paths:
        mod, _, leaf = path.rpartition("/")
        kind = plan.get(mod, ("not called",))[0]
        ok = (kind == "linear" and leaf in ("kernel", "bias")) or (
            kind == "norm" and leaf in ("scale", "bias"))
        if not ok:
            raise InputError(f"LoGra handles Conv/ConvTranspose/Dense kernels and biases and "
                             f"BatchNorm/GroupNorm scales and biases; parameter {path} belongs to "
                             f"a {kind} module: choose another --params subset or --proj-kind")
    return plan


def make_logra_grad_fn(model: Any, subset: ParamSubset, loss_fn, projector: LograProjector):
    """``(variables, images f32[B,*S,Cin], labels int[B,*S]) -> f32[B, C, projector.dim]``
    (S = (H, W), or (D, H, W) for a 3D model):
    LoGra class gradients of ``loss_fn`` (``(logits, labels) -> f32[B, C]``) from one batched
    forward and C batched output-gradient passes (see the module docstring). Not jitted here."""

    def fn(variables, images, labels):
        images, labels = images.astype(jnp.float32), labels.astype(jnp.int32)
        plan = _layer_plan(model, variables, subset, images)
        mats = projector.matrices()
        zeros = {p: jnp.zeros(shape, jnp.float32) for p, (_, _, shape) in plan.items()}

        def forward(perturb):
            side = {}  # path -> projected layer input f32[B, *spatial, r_in] or xhat
            busy = []  # set while a side computation applies a clone (itself intercepted)

            def intercept(next_fun, args, kwargs, context):
                path = _module_path(context.module) if context.method_name == "__call__" else None
                if busy or path not in perturb:
                    return next_fun(*args, **kwargs)
                busy.append(path)
                mod, x = context.module, args[0]
                kind, leaves, _ = plan[path]
                if kind == "linear" and "kernel" in leaves:
                    p_in = mats[f"{path}/kernel"][0]
                    k_shape = tuple(mod.variables["params"]["kernel"].shape[:-1])
                    proj = _unbound(mod, features=p_in.shape[1], use_bias=False)
                    side[path] = proj.apply({"params": {"kernel": p_in.reshape(*k_shape, -1)}}, x)
                elif kind == "norm" and "scale" in leaves:
                    plain = _unbound(mod, use_scale=False, use_bias=False)
                    state = {k: v for k, v in mod.variables.items() if k != "params"}
                    side[path] = plain.apply(state, x, **kwargs)
                busy.pop()
                return next_fun(*args, **kwargs) + perturb[path]

            with nn.intercept_methods(intercept):
                out = loss_fn(model.apply(variables, images, train=False), labels)
            return out, side

        out, vjp, side = jax.vjp(forward, zeros, has_aux=True)
        n_cls = out.shape[1]
        eye = jnp.broadcast_to(jnp.eye(n_cls, dtype=out.dtype)[:, None, :], (n_cls, *out.shape))
        (deltas,) = jax.vmap(vjp)(eye)  # path -> f32[C, B, *out_shape[1:]]

        parts = []
        for path in subset.paths:
            mod, _, leaf = path.rpartition("/")
            d = deltas[mod]
            c, b = d.shape[:2]
            d = d.reshape(c, b, -1, d.shape[-1])  # [C, B, pixels, Cout]
            if leaf == "bias":
                g = jnp.sum(d, axis=2)
            elif leaf == "scale":
                xhat = side[mod].reshape(b, -1, d.shape[-1])
                g = jnp.einsum("cbpo,bpo->cbo", d, xhat, precision=_HIGHEST)
            else:
                p_out = mats[path][1]
                a = side[mod].reshape(b, -1, side[mod].shape[-1])  # [B, pixels, r_in]
                dp = jnp.einsum("cbpo,os->cbps", d, p_out, precision=_HIGHEST)
                g = jnp.einsum("bpr,cbps->cbrs", a, dp, precision=_HIGHEST)
            parts.append(g.reshape(c, b, -1))
        return jnp.concatenate(parts, axis=-1).transpose(1, 0, 2)

    return fn


__all__ = ["DEFAULT_LOGRA_RANK", "LograProjector", "is_kernel", "layer_ranks",
           "make_logra_grad_fn", "make_logra_projector"]
