"""The one model interface that training, influence and explanation use.

A segmentation model is a Flax linen module, channels-last, called as::

    logits = model.apply(variables, x, train=False)                          # f32[B,H,W,K]
    logits, features = model.apply(variables, x, train=False, return_features=True)
                                                   # features f32[B,H,W,F]: the head's input

whose last layer is a 1x1 ``nn.Conv`` (kernel f32[1,1,F,K], bias f32[K]) named by the module's
``head_name`` attribute (default ``"head"``), so that ``logits = features @ kernel + bias``
pixel by pixel.

A 3D model (``model.dims=3``) is the same with one more spatial axis: ``x`` f32[B,D,H,W,Cin] ->
logits f32[B,D,H,W,K] and features f32[B,D,H,W,F], the head a 1x1x1 ``nn.Conv`` (kernel
f32[1,1,1,F,K]); its build function reads ``model_config.dims`` and it is registered with
``register_architecture(name, build, dims=(2, 3))`` (or ``dims=(3,)``).

``train=True`` with ``mutable=["batch_stats"]`` is a training step (BatchNorm on batch
statistics); ``train=False`` is inference mode (running statistics), which is how the
influence and explanation stages call it. Variables are ``{'params', 'batch_stats'}`` (the
latter may be empty). Every built-in architecture (:mod:`tracin_jax.models.registry`) follows
this; so can a user's own module, which :func:`register_architecture` then makes available as
``model.arch=<name>`` to every stage (training, influence, explanation, evaluation).

The stages never look at the architecture: they call :func:`features_apply` for
``(logits, features)``, :func:`head_name` for the head's parameter name, and
:func:`has_features` to know whether the head fast path of the class gradients applies (a module
without ``return_features`` still gets exact gradients by backpropagation, but no feature-map
analyses).
"""

from __future__ import annotations

import inspect
from typing import Any

import jax

HEAD = "head"


def head_name(model: Any) -> str:
    """The name of the model's final 1x1 conv in its params tree (``head_name``, else 'head')."""
    return str(getattr(model, "head_name", HEAD) or HEAD)


def has_features(model: Any) -> bool:
    """True when ``model.__call__`` accepts ``return_features`` (-> (logits, features))."""
    call = getattr(type(model), "__call__", None)
    try:
        return "return_features" in inspect.signature(call).parameters
    except (TypeError, ValueError):
        return False


def features_apply(model: Any, variables: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inference mode: images f32[B,*S,Cin] -> (logits f32[B,*S,K], features f32[B,*S,F]);
    S = (H, W) for a 2D model, (D, H, W) for a 3D one."""
    return model.apply(variables, images, train=False, return_features=True)


def head_params(model: Any, params: Any) -> tuple[Any, Any]:
    """(kernel f32[1,1,F,K] (f32[1,1,1,F,K] in 3D), bias f32[K] or None) of the model's head in
    a params tree."""
    head = params[head_name(model)]
    return head["kernel"], head.get("bias")
