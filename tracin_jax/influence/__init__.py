"""Class-wise TracIn: scores[z', i, z, j] = sum_t eta_t <grad D_j(z; theta_t), grad D_i(z'; theta_t)>.

Five separable parts; swapping one never touches the others:

1. :mod:`.subsets`: which parameters (``head``, ``decoder``, ``all`` or a regex over paths);
2. :mod:`.grads`: the class-gradient function ``(variables, images, labels) -> f32[B, C, D]``
   (pluggable loss; :func:`normalised` wraps one for cosine TracIn; :mod:`.precondition`
   scales it per checkpoint by the saved Adam state, and normalises training rows RelatIF-style);
3. :mod:`.projection`: optional JL projection to d numbers, generated on the fly;
4. :mod:`.store`: sqrt(eta)-scaled training features on disk, chunked and resumable;
5. :mod:`.scores`: blocked contraction, streaming top-K, patient sums, self-influence,
   sharded over the devices (:mod:`.sharding`, which also documents multi-host runs).

:func:`run_influence` (:mod:`.api`) runs them all for a training workdir;
:func:`compute_influence` (:mod:`.engine`) does the same for given checkpoints and examples;
:func:`class_tracin` is the in-memory version. The influence folder they write, and its
reader, are :mod:`.folder`; the up-front checks of arguments and memory, :mod:`.checks`.

This package exports what a notebook needs; everything else is imported from its module
(e.g. ``from tracin_jax.influence.scores import aggregate_by_patient``).

Attribution methods (TracIn and its variants, EK-FAC, TRAK) are registered in
:mod:`.methods` (one file each, ``docs/extending.md``); ``run_influence(method=NAME, ...)``
and ``tracin-jax influence --method NAME`` choose one.

A notebook swapping the gradient (the region cross-entropy, normalised)::

    import tracin_jax
    from tracin_jax import influence as inf

    run = tracin_jax.load_run("runs/demo")
    subset = inf.resolve_subset(run.checkpoints[-1].variables["params"], "head")
    fn = inf.normalised(inf.make_class_grad_fn(run.model, subset, loss="ce", tag="ce-head"))
    meta = inf.run_influence("runs/demo", "runs/demo/influence-ce-cos", grad_fn=fn)

``loss="ce"`` names the loss, so meta.json's ``spec`` records it (``loss: ce, normalise:
true``) and evaluate's randomisation check recomputes the same gradient.
"""

from tracin_jax.influence.api import run_influence
from tracin_jax.influence.engine import DEFAULT_TOPK, class_tracin, compute_influence, run_grad_fn
from tracin_jax.influence.grads import (LOSSES, ClassGradFn, ClassGradFunction, is_head_subset,
                                        make_class_grad_fn, normalised)
from tracin_jax.influence.methods import METHODS, Common, Method, get_method
from tracin_jax.influence.projection import DEFAULT_PROJ_DIM, DEFAULT_PROJ_KIND, make_projector
from tracin_jax.influence.subsets import resolve_subset

__all__ = [
    "DEFAULT_PROJ_DIM", "DEFAULT_PROJ_KIND", "DEFAULT_TOPK", "LOSSES",
    "METHODS", "Common", "Method", "get_method",
    "ClassGradFn", "ClassGradFunction", "class_tracin", "compute_influence", "is_head_subset",
    "make_class_grad_fn", "make_projector", "normalised", "resolve_subset", "run_grad_fn",
    "run_influence",
]
