"""Explanations of class-wise influence scores: local, global, faithfulness, filter selection.

``run_explain(workdir, influence_dir, out)`` writes an offline HTML report (``out/index.html``,
PNG figures, ``out/metrics.json``); the influence folder is read and checked by
:func:`tracin_jax.influence.folder.load_influence`. Modules: ``ranking`` (proponents,
opponents, aggregates), ``features`` (last hidden layer maps, masking, similarity),
``faithfulness`` (FI curves and their statistics), ``selection`` (filter selection and
ablation), ``trust`` (the folder's evaluation against retraining, if any), ``figures``,
``report`` / ``page`` (HTML).
"""

from tracin_jax.explain.api import explain_run, run_explain
from tracin_jax.explain.figures import CLASS_COLORS

__all__ = ["run_explain", "explain_run", "CLASS_COLORS"]
