"""Per-example class gradients: the features that class-wise TracIn contracts.

The swappable unit is a *class-gradient function*::

    ClassGradFn = (variables, images f32[B,H,W,Cin], labels int[B,H,W]) -> f32[B, C, D]

(for a 3D model, ``model.dims=3``: images f32[B,D,H,W,Cin], labels int[B,D,H,W]; everything
below holds with one more spatial axis, and "pixel" means voxel). Row ``[b, c]`` is the
gradient of the class-c loss of example b with respect to the chosen parameter subset,
flattened (leaves in ``subset.paths`` order) or projected to D = d numbers.
Anything with that signature can replace :func:`make_class_grad_fn`'s result (the feature store
and the scorer only see the arrays); give it a ``tag`` attribute (a string naming what it
computes) so features of different functions never share a store; the store refuses a
function without one, since a ``__name__`` such as ``<lambda>`` does not tell two functions
apart. :class:`ClassGradFunction` carries that tag, the subset, the projector, and the names and
label values of the C classes.

The loss is pluggable: ``loss_fn(logits f32[B,H,W,K], labels int[B,H,W]) -> f32[B, C]``, one
value per example and class, each example's row depending on that example only (default
:func:`~tracin_jax.training.losses.tumour_dice_loss`, C = 3: NCR/NET, ED, ET). A loss can be
named instead (``loss="dice"`` or ``"ce"``, :data:`LOSSES`); the name is recorded on the
result (``ClassGradFunction.loss``) and in an influence folder's meta.json ``spec``.

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
  computed (its sketch indices drawn once per batch); dense projections run once on the stacked
  batch (one pass over the random matrix per batch). Either way XLA's scratch memory still grows
  linearly with B: compiled ``memory_analysis()`` of the unrolled CountSketch program (U-Net
  width 16, P = 1.94M parameters, 96x96, d = 4096, CPU) gives 82, 115, 187 and 349 MiB of
  temporaries at B = 1, 2, 4, 8: 33-41 MiB more per example, 1.5-1.8 x its C x P floats
  (22 MiB), on top of a fixed part; lower the batch size to bound it.
- ``head`` (subsets inside the final 1x1 conv, e.g. ``head``): the logits are
  ``features @ W + b`` pixel by pixel, so ``dD_c/dW = sum_pixels features (x) dD_c/dlogits``
  and ``dD_c/db = sum_pixels dD_c/dlogits``. One batched forward gives the features and logits;
  the loss is a function of the logits alone, so its per-class logit gradients are cheap; then
  one einsum ``bhwf,bchwk->bcfk`` (``bdhwf,bcdhwk->bcfk`` on volumes). No backward pass
  through the network at all.

Precision: the head einsum and all influence contractions run at HIGHEST precision; the
network's own forward/backward passes run at the backend's default (TF32 convolutions on recent
NVIDIA GPUs, as in training). For full float32 there, call under
``with jax.default_matmul_precision("float32"):`` (around ``run_influence`` too).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp

from tracin_jax.errors import InputError
from tracin_jax.influence.projection import Projector
from tracin_jax.influence.subsets import ParamSubset
from tracin_jax.models.interface import features_apply, has_features, head_name
from tracin_jax.training.losses import CLASS_NAMES, tumour_cross_entropy, tumour_dice_loss

ClassGradFn = Callable[[Any, jax.Array, jax.Array], jax.Array]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]



# Label value -> class name of the BraTS label map (label 3 is the remapped ET, see data.labels).
LABEL_NAMES = {0: "background", 1: "NCR/NET", 2: "ED", 3: "ET"}
DEFAULT_CLASS_LABELS = (1, 2, 3)


@dataclass(frozen=True)
class ClassGradFunction:
    """A ClassGradFn plus what the feature store keys on and what its class axis means.

    ``fn(variables, images, labels) -> f32[B, C, dim]``; ``tag`` names what it computes (loss,
    method, any wrapping), None when it cannot be named (a lambda or closure given no tag: fine
    in memory, refused by the feature store); ``subset`` and ``projector`` are None when unknown /
    exact. ``class_labels[c]`` is the label value class c of the loss scores (its presence in a
    slice is tested against that value) and ``class_names[c]`` its name; both have C entries
    (default NCR/NET, ED, ET <- labels 1, 2, 3; a loss with background first: 0, 1, 2, 3).
    """

    fn: Callable = field(repr=False)
    tag: str | None
    dim: int
    subset: ParamSubset | None = None
    projector: Projector | None = None
    class_names: tuple[str, ...] = CLASS_NAMES
    class_labels: tuple[int, ...] = DEFAULT_CLASS_LABELS
    # ((variables, scale), images, labels) -> f32[B, C, dim]: the same features with every class
    # gradient multiplied elementwise by ``scale`` (a list of arrays shaped like the subset's
    # leaves, in ``subset.paths`` order) BEFORE projection; None when ``fn`` cannot do that
    # (a custom function). The feature store's diagonal preconditioner hook calls it.
    scaled_fn: Callable | None = field(default=None, repr=False)
    # The loss by name (one of :data:`LOSSES`: ``dice``, ``ce``) when it is one of the
    # project's; None for any other loss. With ``normalised``, it is what a folder's
    # ``meta.json`` ``spec`` records, so the gradient can be rebuilt (evaluate's randomisation).
    loss: str | None = None
    normalised: bool = False

    def __post_init__(self):
        names, labels = class_axis(self.class_names, self.class_labels)
        object.__setattr__(self, "class_names", names)
        object.__setattr__(self, "class_labels", labels)

    def __call__(self, variables: Any, images: jax.Array, labels: jax.Array) -> jax.Array:
        return self.fn(variables, images, labels)


def class_axis(class_names=None, class_labels=None) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(names, label values) of a loss's class axis: labels default to 1, 2, 3; names default
    to those of the labels (:data:`LABEL_NAMES`)."""
    labels = tuple(int(v) for v in (class_labels if class_labels is not None
                                    else DEFAULT_CLASS_LABELS))
    if class_names is None:
        class_names = [LABEL_NAMES.get(v, f"label {v}") for v in labels]
    names = tuple(str(n) for n in class_names)
    if len(names) != len(labels):
        raise InputError(f"class_names {list(names)} and class_labels {list(labels)} differ "
                         "in length")
    return names, labels


_SIMPLE = (int, float, str, bool, type(None))


def code_digest(fn: Any) -> str:
    """8 hex digits of what a plain function's code is: its bytecode, constants and the names
    it reads (another body under the same name gives other digits); '' for a builtin."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return ""

    def describe(c) -> tuple:  # nested code (comprehensions, inner functions) by content
        return (c.co_code, c.co_names, tuple(describe(k) if hasattr(k, "co_code") else repr(k)
                                             for k in c.co_consts))

    text = repr((describe(code), fn.__defaults__, fn.__kwdefaults__)).encode()
    return hashlib.sha1(text).hexdigest()[:8]


def unique_name(fn: Any) -> str | None:
    """A name that identifies what ``fn`` computes, or None when its name does not.

    A function defined at module level is named by its module and qualified name plus a
    digest of its code (so a function edited in a notebook and run again gets another name);
    the project's own losses go by their bare name. A ``functools.partial`` of one adds its
    keyword arguments when those are plain values. Lambdas, local functions and closures,
    bound methods and callable objects (whose behaviour depends on state the name does not
    show), and partials of those, give None: such a function needs an explicit tag.
    """
    kw = {}
    if isinstance(fn, functools.partial):
        if fn.args or not all(isinstance(v, _SIMPLE) for v in fn.keywords.values()):
            return None
        kw = fn.keywords
        fn = fn.func
        if isinstance(fn, functools.partial):
            return None
    fn = inspect.unwrap(fn)  # jax.jit and functools.wraps keep the wrapped function here
    if not (inspect.isfunction(fn) or inspect.isbuiltin(fn)):
        return None
    qualname = getattr(fn, "__qualname__", "")
    if not qualname or "<lambda>" in qualname or "<locals>" in qualname:
        return None
    module = getattr(fn, "__module__", None) or ""
    name = fn.__name__ if module.startswith("tracin_jax.") else \
        f"{module}.{qualname}@{code_digest(fn)}"
    return name + ("(" + ",".join(f"{k}={v}" for k, v in sorted(kw.items())) + ")" if kw else "")


def as_class_grad_function(fn: ClassGradFn, *, class_names=None,
                           class_labels=None) -> ClassGradFunction:
    """``fn`` as a :class:`ClassGradFunction`, whose attributes the rest of the package reads.

    A ClassGradFunction is returned as it is (``class_names``/``class_labels`` are ignored: the
    caller applies its own overrides). Any other callable ``(variables, images, labels) ->
    f32[B, C, D]`` is wrapped with ``tag = unique_name(fn)`` (None for a lambda, a closure or a
    callable object: fine in memory, refused by the feature store), ``dim = -1`` (unknown), no
    subset, projector, ``scaled_fn`` (no preconditioner) or loss name, and the classes given
    here (names default to those of the labels, labels to 1, 2, 3: NCR/NET, ED, ET).
    """
    if isinstance(fn, ClassGradFunction):
        return fn
    names, labels = class_axis(class_names, class_labels)
    return ClassGradFunction(fn=fn, tag=unique_name(fn), dim=-1, class_names=names,
                             class_labels=labels)


def class_logit_grads(loss_fn: LossFn, logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example, per-class gradients of the loss w.r.t. the logits.

    logits f32[B,*S,K], labels int[B,*S] -> f32[B, C, *S, K] (S = (H, W), or (D, H, W) for
    volumes); one loss evaluation per example, its VJP vmapped over the C class cotangents.
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
    """True when every chosen parameter belongs to the model's final 1x1 (1x1x1) conv (named by
    the model, :func:`tracin_jax.models.head_name`) and the model can return the head's input
    (``return_features=True``; see :mod:`tracin_jax.models.interface`)."""
    head = head_name(model)
    if not set(subset.paths) <= {f"{head}/bias", f"{head}/kernel"}:
        return False
    kernel = dict(zip(subset.paths, subset.shapes)).get(f"{head}/kernel")
    if kernel is not None and (len(kernel) < 3 or any(int(k) != 1 for k in kernel[:-2])):
        return False
    return has_features(model)


def check_example_shapes(model: Any, images: Any, labels: Any) -> None:
    """InputError (one line) unless ``images`` are f32[B,*S,Cin] and ``labels`` int[B,*S] with
    S = (H, W) for a 2D model and (D, H, W) for a 3D one (the model's ``dims``; a model without
    that attribute is not checked for it). Shapes only: free inside a traced function."""
    dims = getattr(model, "dims", None)
    shape = tuple(images.shape)
    if isinstance(dims, int) and len(shape) != dims + 2:
        want = {2: "B,H,W,Cin", 3: "B,D,H,W,Cin"}.get(dims, f"B,<{dims} sizes>,Cin")
        raise InputError(f"images of shape {shape} do not fit a {dims}D model (model.dims={dims}"
                         f" takes f32[{want}])")
    if tuple(labels.shape) != shape[:-1]:
        raise InputError(f"labels of shape {tuple(labels.shape)} do not match images of shape "
                         f"{shape}: expected {shape[:-1]}")


def default_examples_mode() -> str:
    """``unroll`` on the CPU backend, ``vmap`` on accelerators (see the module docstring)."""
    return "unroll" if jax.default_backend() == "cpu" else "vmap"


LOSSES = {"dice": tumour_dice_loss, "ce": tumour_cross_entropy}


def loss_name(loss_fn: Any) -> str | None:
    """``dice`` / ``ce`` when ``loss_fn`` is the project's :func:`tumour_dice_loss` (a partial
    of it with keyword arguments included) / :func:`tumour_cross_entropy`, else None."""
    fn = loss_fn.func if isinstance(loss_fn, functools.partial) and not loss_fn.args else loss_fn
    fn = inspect.unwrap(fn) if callable(fn) else fn
    for name, known in LOSSES.items():
        if fn is known:
            return name
    return None


def resolve_loss(loss_fn: LossFn | None, loss: str | None) -> tuple[LossFn, str | None]:
    """(loss function, loss name) from ``make_class_grad_fn``'s ``loss_fn``/``loss``: a name
    alone resolves to the project's loss; a function alone is named when it is one of them; a
    function and a name: the name is declared for that function (its spec records it)."""
    if loss is not None and loss not in LOSSES:
        raise InputError(f"--loss {loss!r} is not one of {', '.join(LOSSES)}")
    if loss_fn is None:
        return LOSSES[loss or "dice"], loss or "dice"
    return loss_fn, loss if loss is not None else loss_name(loss_fn)


def make_class_grad_fn(model: Any, subset: ParamSubset, loss_fn: LossFn | None = None,
                       projector: Projector | None = None, *, method: str = "auto",
                       examples: str = "auto", tag: str | None = None, class_names=None,
                       class_labels=None, loss: str | None = None) -> ClassGradFunction:
    """Builds the jitted ClassGradFn for a Flax model and parameter subset.

    Args:
      model: a Flax linen module following :mod:`tracin_jax.models.interface`, called as
        ``model.apply(variables, x, train=False)`` (the ``head`` method also needs
        ``return_features=True`` -> (logits, features), and reads the head's name from it).
      subset: the parameters to differentiate (see :func:`resolve_subset`).
      loss_fn: ``(logits f32[B,*S,K], labels int[B,*S]) -> f32[B, C]`` (default: the one
        ``loss`` names, else :func:`~tracin_jax.training.losses.tumour_dice_loss`).
      projector: None for exact flattened gradients (D = subset.size), else a Projector
        (D = projector.dim).
      method: ``auto`` (``logra`` with a LoGra projector, else ``head`` when the subset allows
        it, else ``vjp``), ``head``, ``vjp`` or ``logra`` (:mod:`tracin_jax.influence.logra`:
        projected gradients from layer inputs and output gradients, no weight gradients; ``vjp``
        with a LoGra projector projects explicit per-example gradients, same numbers).
      examples: how ``vjp`` goes over the examples of a batch: ``auto`` (``unroll`` on CPU,
        ``vmap`` elsewhere), ``unroll`` or ``vmap``. Same numbers either way.
      tag: names the features for the store; default derived from the loss's name, method and
        projection. A loss whose name does not identify it (a lambda, a local function or
        closure, a bound method, a partial of those) gets no default: pass ``tag="..."`` to use
        the feature store (``run_influence``/``compute_influence``); in memory it is not needed.
      class_names, class_labels: what the loss's C classes are: label values (default 1, 2, 3,
        the tumour classes) and names (default from the labels: 0 background, 1 NCR/NET, 2 ED,
        3 ET). A loss that includes background first: ``class_labels=(0, 1, 2, 3)``.
      loss: ``dice`` | ``ce``: the loss by name (:data:`LOSSES`); alone, it chooses the loss
        function; with ``loss_fn``, it declares that ``loss_fn`` computes that loss. Recorded
        as the result's ``loss`` (a folder's ``meta.json`` ``spec``); a ``loss_fn`` that is none
        of the project's and is given no name leaves it None (the folder gets ``spec: null``).
    Returns:
      ClassGradFunction: ``(variables, images f32[B,*S,Cin], labels int[B,*S]) -> f32[B,C,D]``,
      S = (H, W) for a 2D model and (D, H, W) for a 3D one (``model.dims=3``).
    """
    loss_fn, named = resolve_loss(loss_fn, loss)
    logra = projector is not None and projector.kind == "logra"
    if method == "auto":
        method = "logra" if logra else "head" if is_head_subset(model, subset) else "vjp"
    if method not in ("head", "vjp", "logra"):
        raise ValueError(f"unknown gradient method {method!r} (auto, head, vjp or logra)")
    if method == "logra" and not logra:
        raise ValueError("method='logra' needs a LoGra projector (make_projector(..., kind='logra'))")
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

    def head_grads(variables, images, labels, scale=None):
        logits, feats = features_apply(model, variables, images)
        dlog = class_logit_grads(loss_fn, logits, labels)  # [B, C, *S, K]
        space = "dhw"[3 - (feats.ndim - 2):]  # "hw" for slices, "dhw" for volumes
        leaves = []
        for path in subset.paths:
            if path.endswith("/kernel"):
                gk = jnp.einsum(f"b{space}f,bc{space}k->bcfk", feats, dlog,
                                precision=jax.lax.Precision.HIGHEST)
                # [B, C, 1, 1, F, K] (1, 1, 1 in 3D) like the kernel
                leaves.append(gk.reshape(gk.shape[:2] + (1,) * len(space) + gk.shape[2:]))
            else:
                leaves.append(jnp.sum(dlog, axis=tuple(range(2, 2 + len(space)))))  # [B, C, K]
        if scale is not None:
            leaves = [l * s[None, None] for l, s in zip(leaves, scale)]
        return leaves

    def vjp_per_example(variables, x, y, scale=None):
        """x f32[*S,Cin], y int[*S] -> tuple of [C, *leaf_shape] (subset order), each leaf
        multiplied by ``scale`` (leaf-shaped) when given."""
        params = variables["params"]
        others = {k: v for k, v in variables.items() if k != "params"}

        def class_losses(leaves):
            v = dict(others, params=subset.insert(params, leaves))
            return loss_fn(apply(v, x[None]), y[None])[0]  # f32[C]

        out, vjp = jax.vjp(class_losses, subset.select(params))
        (g,) = jax.vmap(vjp)(jnp.eye(out.shape[0], dtype=out.dtype))
        if scale is not None:
            g = type(g)(l * s[None] for l, s in zip(g, scale))
        return g

    sketch_each = projector is not None and projector.kind == "countsketch"

    def vjp_features(variables, images, labels, scale=None):
        """-> f32[B, C, D]: exact or projected class gradients of every example."""
        if examples == "vmap":
            leaves = list(jax.vmap(lambda x, y: vjp_per_example(variables, x, y, scale))(
                images, labels))
            return _finish(leaves, projector)
        if sketch_each:
            state = projector.sketch_state(jax.random.key(projector.seed))
            rows = [projector.apply_sketch(vjp_per_example(variables, images[b], labels[b], scale),
                                           state)
                    for b in range(images.shape[0])]
            return jnp.stack(rows)
        per = [vjp_per_example(variables, images[b], labels[b], scale)
               for b in range(images.shape[0])]
        leaves = [jnp.stack(parts) for parts in zip(*per)]
        return _finish(leaves, projector)

    if method == "logra":
        from tracin_jax.influence.logra import make_logra_grad_fn

        logra_features = make_logra_grad_fn(model, subset, loss_fn, projector)

    def features(variables, images, labels, scale):
        check_example_shapes(model, images, labels)
        images, labels = images.astype(jnp.float32), labels.astype(jnp.int32)
        if method == "logra":
            if scale is not None:
                raise InputError("--precondition scales parameter-space gradients, which "
                                 "--proj-kind logra never forms; use countsketch or no projection")
            return logra_features(variables, images, labels)
        if method == "head":
            return _finish(head_grads(variables, images, labels, scale), projector)
        return vjp_features(variables, images, labels, scale)

    @jax.jit
    def fn(variables, images, labels):
        return features(variables, images, labels, None)

    @jax.jit
    def scaled_fn(variables_and_scale, images, labels):
        variables, scale = variables_and_scale
        return features(variables, images, labels, list(scale))

    dim = projector.dim if projector is not None else subset.size
    names, labels = class_axis(class_names, class_labels)
    if tag is None and unique_name(loss_fn) is not None:
        proj = ("exact" if projector is None else f"logra-r{projector.rank}s{projector.seed}"
                if logra else f"{projector.kind}{projector.dim}s{projector.seed}")
        tag = f"{unique_name(loss_fn)}|{method}|{proj}"
    return ClassGradFunction(fn=fn, tag=tag, dim=dim, subset=subset, projector=projector,
                             class_names=names, class_labels=labels, scaled_fn=scaled_fn,
                             loss=named)


def normalised(grad_fn: ClassGradFn, eps: float = 1e-12) -> ClassGradFunction:
    """Wraps a ClassGradFn so every class gradient has unit norm (cosine TracIn).

    With projection, the projected vector is normalised. Scores become
    ``sum_t eta_t cos(grad D_j(z), grad D_i(z'))``; self-influence becomes ``sum_t eta_t``.
    A plain callable is read through :func:`as_class_grad_function`.
    """
    inner = as_class_grad_function(grad_fn)
    inner_scaled = inner.scaled_fn

    def unit(g):
        return g / (jnp.linalg.norm(g, axis=-1, keepdims=True) + eps)

    @jax.jit
    def fn(variables, images, labels):
        return unit(inner(variables, images, labels))

    scaled_fn = None
    if inner_scaled is not None:
        @jax.jit
        def scaled_fn(variables_and_scale, images, labels):
            return unit(inner_scaled(variables_and_scale, images, labels))

    return ClassGradFunction(
        fn=fn, tag=f"normalised({inner.tag})" if inner.tag else None, dim=inner.dim,
        subset=inner.subset, projector=inner.projector, class_names=inner.class_names,
        class_labels=inner.class_labels, scaled_fn=scaled_fn, loss=inner.loss, normalised=True)


__all__ = ["DEFAULT_CLASS_LABELS", "LABEL_NAMES", "LOSSES", "ClassGradFn", "ClassGradFunction",
           "LossFn", "as_class_grad_function", "loss_name", "resolve_loss",
           "check_example_shapes", "class_axis", "class_logit_grads", "default_examples_mode",
           "is_head_subset", "make_class_grad_fn", "normalised", "unique_name"]
