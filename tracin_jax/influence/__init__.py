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

:func:`run_influence` runs them all for a training workdir; :func:`compute_influence` does the
same for given checkpoints and examples; :func:`class_tracin` is the in-memory version.

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

from tracin_jax.influence.engine import (DEFAULT_TOPK, class_present, class_tracin,
                                         compute_influence, parse_checkpoints, run_grad_fn,
                                         run_influence)
from tracin_jax.influence.grads import (LOSSES, ClassGradFn, ClassGradFunction, class_logit_grads,
                                        default_examples_mode, is_head_subset,
                                        make_class_grad_fn, normalised)
from tracin_jax.influence.methods import METHODS, Common, Method, get_method
from tracin_jax.influence.precondition import (AdamPreconditioner, IdentityPreconditioner,
                                               RelatIFBlocks, adam_diagonal,
                                               adam_preconditioner)
from tracin_jax.influence.projection import (DEFAULT_PROJ_DIM, DEFAULT_PROJ_KIND, EXACT_MAX_PARAMS,
                                             Projector, make_projector)
from tracin_jax.influence.scores import (aggregate_by_patient, contract, finalise_topk,
                                         influence_scores, init_topk, merge_topk, patient_index,
                                         score_blocks, squared_norms, topk_from_scores)
from tracin_jax.influence.sharding import train_mesh
from tracin_jax.influence.store import (FeatureStore, compute_features, featurise,
                                        featurise_checkpoint, make_header, store_key)
from tracin_jax.influence.subsets import NAMED_SUBSETS, ParamSubset, param_paths, resolve_subset

__all__ = [
    "DEFAULT_PROJ_DIM", "DEFAULT_PROJ_KIND", "DEFAULT_TOPK", "EXACT_MAX_PARAMS", "LOSSES",
    "METHODS", "NAMED_SUBSETS", "Common", "Method", "get_method",
    "AdamPreconditioner", "IdentityPreconditioner", "RelatIFBlocks", "adam_diagonal",
    "adam_preconditioner",
    "ClassGradFn", "ClassGradFunction", "FeatureStore", "ParamSubset", "Projector",
    "aggregate_by_patient", "class_logit_grads", "class_present", "class_tracin",
    "compute_features", "compute_influence", "contract", "default_examples_mode", "featurise",
    "featurise_checkpoint", "finalise_topk", "influence_scores", "init_topk", "is_head_subset",
    "make_class_grad_fn", "make_header", "make_projector", "merge_topk", "normalised",
    "param_paths", "parse_checkpoints", "patient_index", "resolve_subset", "run_grad_fn",
    "run_influence", "score_blocks", "squared_norms", "store_key", "topk_from_scores",
    "train_mesh",
]
