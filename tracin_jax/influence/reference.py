"""Naive reference implementations, for tests and for checking a new gradient function.

One ``jax.grad`` per example, per class and per checkpoint, then plain dot products in
float64: slow, but independent of the vmapped/VJP/einsum machinery of :mod:`.grads` and the
blocked scorer of :mod:`.scores`. Every function takes slices (images f32[n,H,W,Cin], labels
int[n,H,W]) or, for a 3D model, volumes (f32[n,D,H,W,Cin], int[n,D,H,W]).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tracin_jax.influence.subsets import ParamSubset
from tracin_jax.training.losses import tumour_dice_loss


def single_class_grad_fn(model, subset: ParamSubset, loss_fn):
    """jit((variables, image, label, c) -> f32[D]): grad of one class loss of one example."""

    def loss_c(leaves, variables, image, label, c):
        v = dict(variables, params=subset.insert(variables["params"], leaves))
        return loss_fn(model.apply(v, image[None], train=False), label[None])[0, c]

    @jax.jit
    def grad(variables, image, label, c):
        g = jax.grad(loss_c)(subset.select(variables["params"]), variables, image, label, c)
        return jnp.concatenate([x.reshape(-1) for x in g])

    return grad


def loss_classes(model, loss_fn, variables: Any, images, labels) -> int:
    """C, the number of classes ``loss_fn`` scores (its output f32[B, C]) for this model, from
    shapes only (``jax.eval_shape``; the project's losses: the model's outputs minus
    background)."""
    x = jax.ShapeDtypeStruct((1, *np.shape(images)[1:]), jnp.float32)
    y = jax.ShapeDtypeStruct((1, *np.shape(labels)[1:]), jnp.int32)
    out = jax.eval_shape(lambda v, a, b: loss_fn(model.apply(v, a, train=False), b),
                         variables, x, y)
    return int(out.shape[1])


def brute_force_class_grads(model, subset: ParamSubset, variables: Any, images, labels,
                            loss_fn=tumour_dice_loss, num_classes: int | None = None,
                            grad=None) -> np.ndarray:
    """f64[n, C, D]: one jax.grad per example and class (``grad``: a reused
    :func:`single_class_grad_fn`, to compile once). ``num_classes`` None: the loss's C
    (:func:`loss_classes`)."""
    if num_classes is None:
        num_classes = loss_classes(model, loss_fn, variables, images, labels)
    grad = grad or single_class_grad_fn(model, subset, loss_fn)
    out = []
    for x, y in zip(np.asarray(images, np.float32), np.asarray(labels, np.int32)):
        out.append([np.asarray(grad(variables, x, y, c), np.float64) for c in range(num_classes)])
    return np.asarray(out)


def brute_force_tracin(model, subset: ParamSubset, checkpoints: Sequence[Any], train_images,
                       train_labels, test_images, test_labels, loss_fn=tumour_dice_loss,
                       num_classes: int | None = None, grads: list | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(scores f64[n_test, C, n_train, C], self-influence f64[n_train, C]) by explicit loops:
    sum over checkpoints of lr * <grad D_j(train b), grad D_i(test a)>.

    ``num_classes`` None: the loss's C (:func:`loss_classes`; BraTS models: 3). ``grads``:
    optional list, one (train f[n_train, C, D], test f[n_test, C, D]) per checkpoint, from
    :func:`brute_force_class_grads`; computed when absent.
    """
    if num_classes is None:
        num_classes = (np.shape(grads[0][0])[1] if grads else
                       loss_classes(model, loss_fn, checkpoints[0].variables, train_images,
                                    train_labels))
    n_test, n_train = len(test_images), len(train_images)
    scores = np.zeros((n_test, num_classes, n_train, num_classes))
    self_inf = np.zeros((n_train, num_classes))
    grad = single_class_grad_fn(model, subset, loss_fn) if grads is None else None
    for t, ckpt in enumerate(checkpoints):
        if grads is not None:
            gtr, gte = grads[t]
        else:
            gtr = brute_force_class_grads(model, subset, ckpt.variables, train_images,
                                          train_labels, loss_fn, num_classes, grad=grad)
            gte = brute_force_class_grads(model, subset, ckpt.variables, test_images,
                                          test_labels, loss_fn, num_classes, grad=grad)
        for a in range(n_test):
            for i in range(num_classes):
                for b in range(n_train):
                    for j in range(num_classes):
                        scores[a, i, b, j] += ckpt.lr * float(np.dot(gte[a, i], gtr[b, j]))
        for b in range(n_train):
            for j in range(num_classes):
                self_inf[b, j] += ckpt.lr * float(np.dot(gtr[b, j], gtr[b, j]))
    return scores, self_inf


def total_loss_tracin(model, subset: ParamSubset, checkpoints: Sequence[Any], train_images,
                      train_labels, test_images, test_labels,
                      loss_fn=tumour_dice_loss) -> np.ndarray:
    """f64[n_test, n_train]: ordinary TracIn of the summed loss sum_c D_c."""

    def total(leaves, variables, image, label):
        v = dict(variables, params=subset.insert(variables["params"], leaves))
        return jnp.sum(loss_fn(model.apply(v, image[None], train=False), label[None]))

    @jax.jit
    def grad(variables, image, label):
        g = jax.grad(total)(subset.select(variables["params"]), variables, image, label)
        return jnp.concatenate([x.reshape(-1) for x in g])

    out = np.zeros((len(test_images), len(train_images)))
    for ckpt in checkpoints:
        gtr = np.asarray([grad(ckpt.variables, x, y) for x, y in
                          zip(np.asarray(train_images, np.float32), np.asarray(train_labels, np.int32))],
                         np.float64)
        gte = np.asarray([grad(ckpt.variables, x, y) for x, y in
                          zip(np.asarray(test_images, np.float32), np.asarray(test_labels, np.int32))],
                         np.float64)
        out += ckpt.lr * gte @ gtr.T
    return out


def toy_problem(n_train: int = 5, n_test: int = 3, size: int = 16, n_checkpoints: int = 2,
                seed: int = 0, width: int = 4, depth: int = 2, dims: int = 2,
                channels: int = 4):
    """A tiny UNet with perturbed 'checkpoints' and random slices, for tests and examples.

    Returns a namespace with ``model``, ``checkpoints`` (each ``epoch``, ``lr``, ``variables``),
    ``train`` and ``test`` (each ``images`` f32[n,size,size,channels], ``labels``
    u8[n,size,size], ``ids``, ``cases``). Class 3 (ET) is absent from test slice 1 and class 1
    (NCR/NET) from training slice 2; BatchNorm statistics are perturbed so inference mode
    matters. ``dims=3``: a 3D UNet and volumes f32[n,size,size,size,channels], u8[n,size,size,size].
    """
    from types import SimpleNamespace

    from flax import traverse_util

    from tracin_jax.models import UNet
    from tracin_jax.training.train import init_variables

    model = UNet(width=width, depth=depth, dims=dims)
    space = (size,) * dims
    # Shapes only: a numpy draw is much faster to build than tracing the Flax initialisers.
    shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), (*space, channels)))
    rng = np.random.default_rng(seed)

    def draw(tree, stats=False):
        out = {}
        for path, leaf in traverse_util.flatten_dict(tree).items():
            noise = rng.normal(size=leaf.shape).astype(np.float32)
            if stats:  # running mean ~ N(0, 0.2), running var in [0.5, 1.5]
                out[path] = (0.5 + rng.random(leaf.shape) if path[-1] == "var"
                             else 0.2 * noise).astype(np.float32)
            elif path[-1] == "scale":
                out[path] = 1.0 + 0.1 * noise
            else:  # kernels ~ N(0, 1/fan_in); biases ~ N(0, 0.1)
                fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 100
                out[path] = noise / np.sqrt(fan_in)
        return traverse_util.unflatten_dict(out)

    checkpoints = []
    for t in range(n_checkpoints):
        variables = {"params": draw(shapes["params"]),
                     "batch_stats": draw(shapes["batch_stats"], stats=True)
                     if shapes["batch_stats"] else {}}
        lr = float((1 + t) * 10.0 ** -(2 + t % 3))
        checkpoints.append(SimpleNamespace(epoch=2 * t + 1, lr=lr, variables=variables))

    def examples(n, prefix, absent_row, absent_class):
        images = rng.normal(size=(n, *space, channels)).astype(np.float32)
        labels = rng.choice(4, size=(n, *space), p=[0.55, 0.15, 0.15, 0.15]).astype(np.uint8)
        if n > absent_row:
            labels[absent_row][labels[absent_row] == absent_class] = 0
        ids = [f"{prefix}{k:03d}" for k in range(n)]
        cases = [f"{prefix}case{k // 2}" for k in range(n)]
        return SimpleNamespace(images=images, labels=labels, ids=ids, cases=cases)

    return SimpleNamespace(model=model, checkpoints=checkpoints,
                           train=examples(n_train, "tr", 2, 1), test=examples(n_test, "te", 1, 3))


def dense_logra(subset: ParamSubset, projector: Any, grads: np.ndarray) -> np.ndarray:
    """LoGra's projection by its definition: f64[n, C, P] flat exact gradients (leaves in
    ``subset.paths`` order) -> f64[n, C, D], each kernel gradient G (k x Cout, k = the kernel's
    other axes times Cin, row-major) replaced by P_in^T G P_out with the matrices of
    ``projector.matrices()``, every other leaf unchanged; plain numpy, leaf by leaf."""
    mats = {p: (np.asarray(a, np.float64), np.asarray(b, np.float64))
            for p, (a, b) in projector.matrices().items()}
    out, start = [], 0
    for path, shape in zip(subset.paths, subset.shapes):
        size = int(np.prod(shape))
        g = np.asarray(grads[..., start:start + size], np.float64)
        start += size
        if path in mats:
            p_in, p_out = mats[path]
            g = g.reshape(*g.shape[:2], p_in.shape[0], p_out.shape[0])
            g = np.einsum("nckr,kp,rq->ncpq", g, p_in, p_out).reshape(*g.shape[:2], -1)
        out.append(g)
    return np.concatenate(out, axis=-1)

