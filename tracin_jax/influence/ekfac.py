"""EK-FAC influence functions (Grosse et al. 2023; George et al. 2018), class-wise, for the
convolutions of the U-Net.

Influence of training slice z on test slice z' (test class i, training class j)::

    score[z', i, z, j] = sum_t eta_t  g_i(z'; theta_t)^T (F_t + lambda_t I)^-1 g_j(z; theta_t)

with g_c the gradient of the class-c loss (the same class gradients as TracIn, Dice by default),
F_t the EK-FAC approximation of the Fisher at checkpoint t, block-diagonal over layers, and the
sum over the chosen checkpoints weighted by their learning rates as in TracIn (``checkpoints``;
pass only the last epoch for the classical influence function at the trained weights).

Per layer (a 3x3 conv, the 2x2 transposed convs, the 1x1 head, or their 3x3x3, 2x2x2 and
1x1x1 versions in a 3D model; BatchNorm scale and offset have no Kronecker structure and are
left out of the parameter set) the per-example weight gradient
is ``G = sum_p x_p delta_p^T`` over output pixels p, x_p the input patch (kh*kw*Cin numbers,
channel-major, plus a homogeneous 1 when the bias is in the subset) and delta_p the gradient of
the loss w.r.t. the layer's output at p. Fitting, per checkpoint, two passes over the training
slices (batched forward/backward passes; no per-example weight gradient is formed):

1. Kronecker factors ``A = E[sum_p x_p x_p^T]``, ``S = E[sum_p delta_p delta_p^T]`` and their
   eigenvectors Q_A, Q_S. Inputs and output gradients are captured with
   ``flax.linen.intercept_methods`` (a zero perturbation is added to every conv output and
   differentiated), BatchNorm in inference mode.
2. The eigenvalue correction ``Lambda = E_n[(Q_A^T G_n Q_S)^2]`` (elementwise), with
   ``Q_A^T G_n Q_S = sum_p (Q_A^T x_p)(Q_S^T delta_p)^T`` from the same captured arrays.

Then ``F = (Q_A (x) Q_S) diag(Lambda) (Q_A (x) Q_S)^T`` and damping ``lambda = damping *
mean(Lambda)`` per layer (default ``damping = 0.1``, Kronfluence's heuristic). The output
gradients are those of the *true* Fisher by default (``fisher="sampled"``: labels drawn per
pixel from the model's own softmax, the summed pixel cross-entropy differentiated, one draw per
slice and pass, as in Kronfluence) or of the empirical Fisher (``fisher="empirical"``: the sum
of the class losses being scored, at the true labels).

One property to know: a 2x2 stride-2 transposed conv feeds each input pixel to exactly one output
pixel per kernel tap, so its A is four equal tap blocks and has repeated eigenvalues; the
eigenvalue correction then depends on the basis ``eigh`` picks inside each repeated eigenspace
(the same data batched differently can give a slightly different F for those layers, never for
the layers with distinct eigenvalues; the test checks the head).

Scores through the existing engine: each class gradient is *whitened*,
``w = (Q_A^T G Q_S) / sqrt(Lambda + lambda)`` per layer, so that ``<w', w> = g'^T (F + lambda
I)^-1 g`` exactly; these features go through the feature store and the blocked contraction of
:mod:`.engine` unchanged (and through a CountSketch projection when the conv parameters exceed
65536, the engine's rule: inner products of the whitened features are then preserved up to the
sketch's ~2% noise at d = 4096). Self-influence becomes ``g^T (F + lambda I)^-1 g``. The
factors travel to the gradient function inside the checkpoint's variables (collection
``"ekfac"``), so one gradient function serves every checkpoint and the store's fingerprint
covers them; fitted factors are cached per checkpoint in ``<out>/ekfac_factors/`` (a rerun
after an interruption reuses them).

Sign convention as TracIn: positive = proponent (a gradient step on z lowers z''s class loss
in the F^-1 metric).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tracin_jax.atomic import save_npz_atomic
from tracin_jax.errors import InputError
from tracin_jax.influence.grads import ClassGradFunction, make_class_grad_fn, normalised
from tracin_jax.influence.projection import DEFAULT_PROJ_KIND, make_projector
from tracin_jax.influence.subsets import ParamSubset, resolve_subset
from tracin_jax.progress import tqdm

FISHERS = ("sampled", "empirical")
DEFAULT_DAMPING = 0.1
COLLECTION = "ekfac"
HIGHEST = jax.lax.Precision.HIGHEST


@dataclass(frozen=True)
class ConvLayer:
    """One convolution of the model as EK-FAC sees it.

    ``name``: module path (``enc0/conv0``, ``up1``, ``head``); ``kernel_shape`` (kh, kw, Cin,
    Cout), or (kd, kh, kw, Cin, Cout) for a 3D conv; ``has_bias``: the bias is in the parameter
    subset (adds the homogeneous coordinate); ``transpose``: an ``nn.ConvTranspose``;
    ``strides`` and ``padding`` as the module's.
    """

    name: str
    kernel_shape: tuple[int, ...]
    has_bias: bool
    transpose: bool
    strides: tuple[int, ...]
    padding: Any

    @property
    def in_dim(self) -> int:
        return int(np.prod(self.kernel_shape[:-1])) + int(self.has_bias)

    @property
    def out_dim(self) -> int:
        return self.kernel_shape[-1]


def _pairs(v, n=2) -> tuple[int, ...]:
    return (int(v),) * n if isinstance(v, (int, np.integer)) else tuple(int(x) for x in v)


def _lax_padding(layer: ConvLayer):
    """The padding of the (transposed) convolution as ``conv_general_dilated`` takes it."""
    if not layer.transpose:
        return layer.padding
    pads = []
    for k, s in zip(layer.kernel_shape[:-2], layer.strides):  # as lax.conv_transpose
        if layer.padding == "SAME":
            pad_len = k + s - 2
            pad_a = k - 1 if s > k - 1 else int(np.ceil(pad_len / 2))
        else:  # VALID
            pad_len = k + s - 2 + max(k - s, 0)
            pad_a = k - 1
        pads.append((pad_a, pad_len - pad_a))
    return tuple(pads)


def patches(layer: ConvLayer, x: jax.Array) -> jax.Array:
    """Input patches of a layer: x f32[B,H,W,Cin] (f32[B,D,H,W,Cin] for a 3D conv) ->
    f32[B, P, in_dim] (P output pixels or voxels).

    Feature order (Cin, kh, kw) (3D: (Cin, kd, kh, kw)) then the homogeneous 1 when
    ``has_bias``; with :func:`kernel_matrix`, ``patches @ kernel_matrix + bias`` is the layer's
    output.
    """
    window = tuple(layer.kernel_shape[:-2])
    space = "DHW"[3 - len(window):]
    dn = (f"N{space}C", f"{space}IO", f"N{space}C")
    if layer.transpose:
        p = jax.lax.conv_general_dilated_patches(
            x, window, (1,) * len(window), _lax_padding(layer), lhs_dilation=layer.strides,
            dimension_numbers=dn, precision=HIGHEST)
    else:
        p = jax.lax.conv_general_dilated_patches(
            x, window, layer.strides, layer.padding, dimension_numbers=dn, precision=HIGHEST)
    p = p.reshape(p.shape[0], -1, p.shape[-1])
    if layer.has_bias:
        p = jnp.concatenate([p, jnp.ones(p.shape[:2] + (1,), p.dtype)], axis=-1)
    return p


def kernel_matrix(layer: ConvLayer, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """Kernel-shaped leaves -> the layer's weight matrix in patch order.

    kernel f32[*lead, kh, kw, Cin, Cout] (3D: f32[*lead, kd, kh, kw, Cin, Cout]) (and bias
    f32[*lead, Cout] when ``has_bias``) -> f32[*lead, in_dim, out_dim].
    """
    *window, cin, cout = layer.kernel_shape
    nd = len(window)
    lead = kernel.shape[:-(nd + 2)]
    n = len(lead)
    k = jnp.moveaxis(kernel, n + nd, n).reshape(*lead, cin * int(np.prod(window)), cout)
    if layer.has_bias:
        k = jnp.concatenate([k, bias[..., None, :]], axis=-2)
    return k


def matrix_to_leaves(layer: ConvLayer, m: jax.Array) -> list[jax.Array]:
    """Inverse of :func:`kernel_matrix`: f32[*lead, in_dim, out_dim] -> [kernel(, bias)]."""
    *window, cin, cout = layer.kernel_shape
    nd = len(window)
    lead = m.shape[:-2]
    n = len(lead)
    k = m[..., : cin * int(np.prod(window)), :].reshape(*lead, cin, *window, cout)
    out = [jnp.moveaxis(k, n, n + nd)]
    if layer.has_bias:
        out.append(m[..., -1, :])
    return out


def ekfac_subset(params: Any, spec: str) -> tuple[ParamSubset, tuple[str, ...]]:
    """The conv kernels and biases of subset ``spec`` (head | decoder | all | REGEX).

    Returns (subset, left_out): BatchNorm scales and offsets (and any other non-conv
    parameter) are dropped and listed in ``left_out``; InputError when nothing is left.
    """
    full = resolve_subset(params, spec)
    kernels = {p for p, s in zip(full.paths, full.shapes)
               if p.endswith("/kernel") and len(s) in (4, 5)}  # 2D and 3D convolutions
    keep = [(p, s) for p, s in zip(full.paths, full.shapes)
            if p in kernels or (p.endswith("/bias") and p[: -len("bias")] + "kernel" in kernels)]
    kept = {p for p, _ in keep}
    left = tuple(p for p in full.paths if p not in kept)
    if not kernels:
        raise InputError(f"--params {spec!r} holds no convolution kernel: EK-FAC covers conv "
                         "layers only (e.g. head, decoder, all)")
    return ParamSubset(name=spec, paths=tuple(p for p, _ in keep),
                       shapes=tuple(s for _, s in keep)), left


def conv_layers(model: Any, variables: Any, image_shape: Sequence[int],
                subset: ParamSubset) -> tuple[ConvLayer, ...]:
    """The conv layers whose kernel is in ``subset``, in call order (from shapes only).

    Raises InputError for a layer EK-FAC does not handle (dilated or grouped convolutions,
    a transposed kernel, circular padding).
    """
    chosen = {p[: -len("/kernel")] for p in subset.paths if p.endswith("/kernel")}
    biases = {p[: -len("/bias")] for p in subset.paths if p.endswith("/bias")}
    found: dict[str, ConvLayer] = {}

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, (nn.Conv, nn.ConvTranspose)):
            name = "/".join(mod.scope.path)
            if name in chosen:
                found[name] = _describe(name, mod, name in biases)
        return next_fun(*args, **kwargs)

    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    missing = sorted(chosen - set(found))
    if missing:
        raise InputError(f"EK-FAC: kernel {missing[0]}/kernel does not belong to a flax Conv "
                         "or ConvTranspose called by the model")
    shapes = dict(zip(subset.paths, subset.shapes))
    return tuple(ConvLayer(l.name, tuple(shapes[f"{l.name}/kernel"]), l.has_bias, l.transpose,
                           l.strides, l.padding) for l in found.values())


def _describe(name: str, mod: Any, has_bias: bool) -> ConvLayer:
    transpose = isinstance(mod, nn.ConvTranspose)
    nd = len(_pairs(mod.kernel_size, 2))
    strides = _pairs(mod.strides or 1, nd)
    padding = mod.padding
    bad = None
    if nd not in (2, 3):
        bad = f"{nd}-D kernel"
    elif _pairs(mod.kernel_dilation or 1, nd) != (1,) * nd:
        bad = "kernel dilation"
    elif transpose and getattr(mod, "transpose_kernel", False):
        bad = "transpose_kernel=True"
    elif not transpose and (_pairs(mod.input_dilation or 1, nd) != (1,) * nd
                            or mod.feature_group_count != 1):
        bad = "input dilation or feature groups"
    elif isinstance(padding, str) and padding not in ("SAME", "VALID"):
        bad = f"padding {padding}"
    elif transpose and not isinstance(padding, str):
        bad = "explicit padding of a transposed conv"
    if bad:
        raise InputError(f"EK-FAC: layer {name} has {bad}, which it does not handle")
    if not isinstance(padding, str):
        padding = [tuple(int(a) for a in p) for p in (
            [padding] * nd if isinstance(padding, (int, np.integer)) else padding)]
        padding = tuple((p[0], p[0]) if len(p) == 1 else p for p in padding)
    return ConvLayer(name, (0, 0, 0, 0), has_bias, transpose, strides, padding)


def capture(model: Any, variables: Any, images: jax.Array, layers: Sequence[ConvLayer],
            loss: Any) -> tuple[dict, dict]:
    """Inputs and output gradients of the layers.

    ``loss(logits f32[B,*S,K]) -> f32[B]`` (example b's value depending on example b only;
    S = (H, W), or (D, H, W) in 3D); returns ({name: input f32[B,*S_in,Cin]},
    {name: d loss_b / d output f32[B,*S_out,Cout]}).
    BatchNorm in inference mode.
    """
    names = {l.name for l in layers}

    def run(eps):
        inputs = {}

        def interceptor(next_fun, args, kwargs, context):
            mod = context.module
            if context.method_name == "__call__" and isinstance(mod, (nn.Conv, nn.ConvTranspose)):
                name = "/".join(mod.scope.path)
                if name in names:
                    inputs[name] = args[0]
                    y = next_fun(*args, **kwargs)
                    return y + eps[name] if eps is not None else y
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            logits = model.apply(variables, images, train=False)
        return logits, inputs

    shapes = jax.eval_shape(_output_shapes(model, names), variables, images)
    eps = {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}
    (_, inputs), grads = jax.value_and_grad(lambda e: _sum_loss(run, loss, e), has_aux=True)(eps)
    return inputs, grads


def _sum_loss(run, loss, eps):
    logits, inputs = run(eps)
    return jnp.sum(loss(logits)), inputs


def _output_shapes(model, names):
    def fn(variables, images):
        out = {}

        def interceptor(next_fun, args, kwargs, context):
            y = next_fun(*args, **kwargs)
            mod = context.module
            if context.method_name == "__call__" and isinstance(mod, (nn.Conv, nn.ConvTranspose)):
                name = "/".join(mod.scope.path)
                if name in names:
                    out[name] = y
            return y

        with nn.intercept_methods(interceptor):
            model.apply(variables, images, train=False)
        return out

    return fn


def fisher_loss(kind: str, loss_fn: Any, labels: jax.Array, key: jax.Array):
    """``logits f32[B,*S,K] -> f32[B]`` whose gradients give the Fisher's output gradients.

    ``sampled``: summed pixel cross-entropy of labels drawn from the model's softmax (the true
    Fisher); ``empirical``: the class losses ``loss_fn(logits, labels)`` summed over classes.
    """
    if kind == "sampled":
        def loss(logits):
            y = jax.random.categorical(key, jax.lax.stop_gradient(logits), axis=-1)
            logp = jax.nn.log_softmax(logits, axis=-1)
            picked = jnp.take_along_axis(logp, y[..., None], axis=-1)  # [B, *S, 1]
            return -jnp.sum(picked, axis=tuple(range(1, picked.ndim)))
        return loss
    if kind == "empirical":
        return lambda logits: jnp.sum(loss_fn(logits, labels), axis=-1)
    raise InputError(f"--fisher {kind!r} is not one of {', '.join(FISHERS)}")


def _layer_arrays(layer, inputs, grads, mask):
    """(patches f32[B,P,in], output gradients f32[B,P,out]) with padded rows zeroed."""
    x = patches(layer, inputs[layer.name]) * mask[:, None, None]
    d = grads[layer.name]
    d = d.reshape(d.shape[0], -1, d.shape[-1]) * mask[:, None, None]
    return x, d


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _covariance_batch(model, layers, fisher, loss_fn, variables, images, labels, mask, key):
    """Batch sums of sum_p x x^T and sum_p delta delta^T per layer."""
    inputs, grads = capture(model, variables, images, layers,
                            fisher_loss(fisher, loss_fn, labels, key))
    out = {}
    for l in layers:
        x, d = _layer_arrays(l, inputs, grads, mask)
        out[l.name] = (jnp.einsum("bpi,bpj->ij", x, x, precision=HIGHEST),
                       jnp.einsum("bpi,bpj->ij", d, d, precision=HIGHEST))
    return out


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _eigenvalue_batch(model, layers, fisher, loss_fn, variables, bases, images, labels, mask,
                      key):
    """Batch sums of (Q_A^T G_n Q_S)^2 per layer."""
    inputs, grads = capture(model, variables, images, layers,
                            fisher_loss(fisher, loss_fn, labels, key))
    out = {}
    for l in layers:
        x, d = _layer_arrays(l, inputs, grads, mask)
        qa, qs = bases[l.name]
        g = jnp.einsum("bpi,bpo->bio", x @ qa, d @ qs, precision=HIGHEST)
        out[l.name] = jnp.sum(g * g, axis=0)
    return out


def _batches(n: int, batch_size: int):
    for s in range(0, n, batch_size):
        yield s, min(n, s + batch_size)


def _padded(arr: np.ndarray, s: int, e: int, bs: int) -> np.ndarray:
    a = np.asarray(arr[s:e])
    if e - s < bs:
        a = np.concatenate([a, np.zeros((bs - (e - s), *a.shape[1:]), a.dtype)])
    return a


def fit_ekfac(model: Any, variables: Any, images: np.ndarray, labels: np.ndarray,
              layers: Sequence[ConvLayer], *, loss_fn: Any, fisher: str = "sampled",
              batch_size: int = 16, seed: int = 0, progress: bool = False) -> dict:
    """EK-FAC factors of one checkpoint on the given (training) examples.

    images f32[n,*S,Cin], labels int[n,*S] (S = (H, W), or (D, H, W) in 3D). Returns
    ``{layer name: {"qa": f32[in,in], "qs": f32[out,out], "lam": f32[in,out]}}`` (eigenvectors
    of A and S as columns, the corrected eigenvalues E_n[(Q_A^T G_n Q_S)^2]); damping is applied
    later (:func:`whiten`), so one fit serves every damping.
    """
    layers = tuple(layers)
    n = len(images)
    bs = max(1, min(batch_size, n))
    key = jax.random.key(seed)
    sums = None
    total = 2 * n
    bar = tqdm(total=total, desc="EK-FAC factors", unit="ex", disable=not progress,
               dynamic_ncols=True, leave=False)
    for s, e in _batches(n, bs):
        mask = np.arange(bs) < e - s
        part = _covariance_batch(model, layers, fisher, loss_fn, variables,
                                 _padded(images, s, e, bs).astype(np.float32),
                                 _padded(labels, s, e, bs).astype(np.int32),
                                 mask.astype(np.float32), jax.random.fold_in(key, s))
        sums = part if sums is None else jax.tree.map(jnp.add, sums, part)
        bar.update(e - s)
    bases = {}
    for l in layers:
        a, sm = (np.asarray(m, np.float64) for m in sums[l.name])
        bases[l.name] = (jnp.asarray(np.linalg.eigh(a)[1], jnp.float32),
                         jnp.asarray(np.linalg.eigh(sm)[1], jnp.float32))
    lam = None
    key2 = jax.random.fold_in(key, 1 << 30)
    for s, e in _batches(n, bs):
        mask = np.arange(bs) < e - s
        part = _eigenvalue_batch(model, layers, fisher, loss_fn, variables, bases,
                                 _padded(images, s, e, bs).astype(np.float32),
                                 _padded(labels, s, e, bs).astype(np.int32),
                                 mask.astype(np.float32), jax.random.fold_in(key2, s))
        lam = part if lam is None else jax.tree.map(jnp.add, lam, part)
        bar.update(e - s)
    bar.close()
    return {l.name: {"qa": np.asarray(bases[l.name][0]), "qs": np.asarray(bases[l.name][1]),
                     "lam": np.asarray(lam[l.name]) / n} for l in layers}


def whiten(layers: Sequence[ConvLayer], factors: dict, mats: Sequence[jax.Array],
           damping: float) -> list[jax.Array]:
    """Per layer ``(Q_A^T M Q_S) / sqrt(Lambda + damping * mean(Lambda))``.

    ``mats[k]``: f32[*lead, in_dim, out_dim] of layer k (:func:`kernel_matrix`); the inner
    product of two whitened gradients is ``g'^T (F + lambda I)^-1 g`` for that layer's block.
    """
    out = []
    for l, m in zip(layers, mats):
        f = factors[l.name]
        lam = f["lam"]
        scale = jax.lax.rsqrt(lam + damping * jnp.mean(lam))
        rot = jnp.einsum("ia,...ij,jb->...ab", f["qa"], m, f["qs"], precision=HIGHEST)
        out.append(rot * scale)
    return out


def dense_ekfac_fisher(factors: dict, layer: ConvLayer) -> np.ndarray:
    """The layer's EK-FAC Fisher as a dense f64[in*out, in*out] matrix over vec(M) (row-major
    M f32[in_dim, out_dim]); for tests and small layers only."""
    f = factors[layer.name]
    q = np.kron(np.asarray(f["qa"], np.float64), np.asarray(f["qs"], np.float64))
    return q @ np.diag(np.asarray(f["lam"], np.float64).reshape(-1)) @ q.T



def layer_class_gradients(inner: Any, subset: Any, layers: Sequence[ConvLayer],
                          collection: str):
    """``(variables, images, labels) -> (fitted, mats)`` for a method whose fitted arrays
    travel in ``variables[collection]``: ``fitted`` is that entry; ``mats`` the class gradients
    of ``inner`` (a class-gradient function over ``subset``, exact: f32[B, C, P]), taken at the
    other collections, as one kernel matrix per layer of ``layers`` (:func:`kernel_matrix`:
    f32[B, C, k, Cout], bias row last). Traceable (call it under jit)."""
    index = {p: i for i, p in enumerate(subset.paths)}
    offsets = np.concatenate([[0], np.cumsum([int(np.prod(s)) for s in subset.shapes])])

    def leaf(g, path):  # parameter ``path``'s entries of a flat gradient, in its shape
        i = index[path]
        return g[..., offsets[i]:offsets[i + 1]].reshape(*g.shape[:-1], *subset.shapes[i])

    def read(variables, images, labels):
        plain = {k: v for k, v in variables.items() if k != collection}
        g = inner(plain, images, labels)  # f32[B, C, P]
        mats = [kernel_matrix(l, leaf(g, f"{l.name}/kernel"),
                              leaf(g, f"{l.name}/bias") if l.has_bias else None)
                for l in layers]
        return variables[collection], mats

    return read


def make_ekfac_grad_fn(model: Any, subset: ParamSubset, layers: Sequence[ConvLayer], loss_fn: Any,
                       *, damping: float = DEFAULT_DAMPING, proj_dim: int | None = None,
                       proj_seed: int = 0, proj_kind: str | None = DEFAULT_PROJ_KIND,
                       tag: str, examples: str = "auto", class_names=None,
                       class_labels=None) -> ClassGradFunction:
    """Whitened class gradients: ``(variables, images, labels) -> f32[B, C, D]``.

    ``variables`` must carry the factors of :func:`fit_ekfac` as the collection ``"ekfac"``
    (:func:`with_factors`). D = the subset size, or the projection's dimension (the engine's
    default rule: exact up to 65536 numbers, else CountSketch 4096). ``tag`` names the loss and
    the Fisher; the damping and the projection are added to it. ``class_names``/
    ``class_labels``: the loss's C classes (a run's: :func:`~.engine.run_classes`; default
    NCR/NET, ED, ET <- 1, 2, 3).
    """
    check_damping(damping)
    layers = tuple(layers)
    inner = make_class_grad_fn(model, subset, loss_fn, None, examples=examples, tag=tag,
                               class_names=class_names, class_labels=class_labels)
    flat = ParamSubset(subset.name, ("ekfac/whitened",), ((subset.size,),))
    projector = make_projector(flat, proj_dim, proj_seed, proj_kind)
    read = layer_class_gradients(inner, subset, layers, COLLECTION)

    @jax.jit
    def fn(variables, images, labels):
        factors, mats = read(variables, images, labels)
        w = whiten(layers, factors, mats, damping)
        w = jnp.concatenate([m.reshape(*m.shape[:2], -1) for m in w], axis=-1)
        return projector([w]) if projector is not None else w

    proj = "exact" if projector is None else f"{projector.kind}{projector.dim}s{projector.seed}"
    return ClassGradFunction(fn=fn, tag=f"ekfac({tag},damping={damping:g})|{proj}",
                             dim=projector.dim if projector is not None else subset.size,
                             subset=subset, projector=projector,
                             class_names=inner.class_names, class_labels=inner.class_labels)


def check_damping(damping: Any) -> None:
    try:
        ok = float(damping) > 0 and np.isfinite(float(damping))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError(f"--damping {damping!r} must be a positive number (the damping is "
                         "this factor times the mean corrected eigenvalue of each layer)")


def with_factors(variables: Any, factors: dict) -> dict:
    """The checkpoint's variables plus the EK-FAC factors (collection ``"ekfac"``)."""
    return dict(variables, **{COLLECTION: jax.tree.map(jnp.asarray, factors)})


@dataclass
class _FactoredCheckpoint:
    epoch: int
    lr: float
    variables: Any


@dataclass(frozen=True)
class EkfacSetup:
    """What an EK-FAC influence run computes, before any checkpoint: the whitened gradient
    function and the parameters of its fit."""

    grad_fn: Any
    subset: ParamSubset
    left_out: tuple[str, ...]
    layers: tuple[ConvLayer, ...]
    loss_fn: Any
    loss_tag: str
    damping: float
    fisher: str
    fisher_seed: int
    normalise: bool

    def describe(self) -> dict:
        """The ``"ekfac"`` entry of meta.json."""
        return {"damping": self.damping, "damping_rule": "damping x mean(Lambda) per layer",
                "fisher": self.fisher, "fisher_seed": self.fisher_seed,
                "loss": self.loss_tag, "params": self.subset.name,
                "layers": [l.name for l in self.layers], "left_out": list(self.left_out),
                "normalised": self.normalise}


def ekfac_setup(run: Any, params: str = "all", *, loss: str = "dice",
                damping: float = DEFAULT_DAMPING, fisher: str = "sampled", fisher_seed: int = 0,
                proj_dim: int | None = None, proj_seed: int = 0,
                proj_kind: str | None = DEFAULT_PROJ_KIND, normalise: bool = False) -> EkfacSetup:
    """The EK-FAC gradient function for a loaded run (:class:`~tracin_jax.run.Run`), over the
    C classes of its task."""
    from tracin_jax.influence.engine import run_classes
    from tracin_jax.training.losses import tumour_cross_entropy, tumour_dice_loss
    from tracin_jax.training.train import init_variables
    from tracin_jax.training.window import check_per_layer_method

    check_damping(damping)
    if fisher not in FISHERS:
        raise InputError(f"--fisher {fisher!r} is not one of {', '.join(FISHERS)}")
    check_per_layer_method(run.model, "EK-FAC (--method ekfac)", "--method tracin or trak")
    shapes = jax.eval_shape(lambda: init_variables(run.model, jax.random.key(0), run.image_shape))
    subset, left_out = ekfac_subset(shapes["params"], params)
    layers = conv_layers(run.model, shapes, run.image_shape, subset)
    eps = run.config.train.dice_eps
    if loss == "dice":
        loss_fn, loss_tag = partial(tumour_dice_loss, eps=eps), f"tumour_dice_loss(eps={eps:g})"
    elif loss == "ce":
        loss_fn, loss_tag = tumour_cross_entropy, "tumour_cross_entropy"
    else:
        raise InputError(f"--loss {loss!r} is not one of dice, ce")
    grad_fn = make_ekfac_grad_fn(run.model, subset, layers, loss_fn, damping=float(damping),
                                 proj_dim=proj_dim, proj_seed=proj_seed, proj_kind=proj_kind,
                                 tag=f"{loss_tag},fisher={fisher}s{fisher_seed}",
                                 **run_classes(run))
    if normalise:
        grad_fn = normalised(grad_fn)
    return EkfacSetup(grad_fn, subset, left_out, layers, loss_fn, loss_tag, float(damping),
                      fisher, int(fisher_seed), bool(normalise))


def factored_checkpoints(run: Any, setup: EkfacSetup, checkpoints: Sequence[Any], folder: Path,
                         *, batch_size: int = 16, progress: bool = False) -> list:
    """Checkpoints (``epoch``, ``lr``, ``variables``) whose variables carry their EK-FAC
    factors, fitted on the run's training slices (cached in ``folder``, keyed by the weights,
    the subset, the Fisher and the training ids)."""
    from tracin_jax.influence.store import variables_fingerprint

    train = run.train
    out = []
    for c in checkpoints:
        variables = c.variables
        blob = json.dumps({"paths": list(setup.subset.paths), "fisher": setup.fisher,
                           "loss": setup.loss_tag, "ids": [str(i) for i in train.ids],
                           "seed": setup.fisher_seed, "weights": variables_fingerprint(variables)},
                          sort_keys=True)
        key = hashlib.sha1(blob.encode()).hexdigest()[:12]
        fit = partial(fit_ekfac, run.model, variables, train.images, train.labels, setup.layers,
                      loss_fn=setup.loss_fn, fisher=setup.fisher, batch_size=batch_size,
                      seed=setup.fisher_seed + int(c.epoch), progress=progress)
        factors = load_or_fit(Path(folder), key, int(c.epoch), fit)
        out.append(_FactoredCheckpoint(c.epoch, c.lr, with_factors(variables, factors)))
    return out


def load_or_fit(folder: Path, key: str, epoch: int, fit) -> dict:
    """Factors of checkpoint ``epoch`` from ``folder/epoch{E}-{key}.npz``, else ``fit()``
    (then saved atomically, so an interrupted run resumes from the checkpoints already fitted)."""
    from tracin_jax.influence import sharding

    path = folder / f"epoch{epoch}-{key}.npz"
    factors = None
    if not path.exists() and sharding.is_writer():  # several processes: process 0 fits, the
        factors = fit()                               # others read its file (the same numbers)
        folder.mkdir(parents=True, exist_ok=True)
        save_npz_atomic(path, **{f"{name}::{part}": v for name, d in factors.items()
                                 for part, v in d.items()})
    sharding.barrier(f"ekfac-factors-{epoch}")
    if factors is not None:
        return factors
    with np.load(path) as z:
        out: dict = {}
        for k in z.files:
            name, part = k.rsplit("::", 1)
            out.setdefault(name, {})[part] = z[k]
        return out


__all__ = ["ConvLayer", "DEFAULT_DAMPING", "EkfacSetup", "FISHERS", "ekfac_setup",
           "factored_checkpoints", "capture", "conv_layers",
           "dense_ekfac_fisher", "ekfac_subset", "fisher_loss", "fit_ekfac", "kernel_matrix",
           "layer_class_gradients",
           "make_ekfac_grad_fn", "matrix_to_leaves", "patches", "whiten",
           "with_factors"]
