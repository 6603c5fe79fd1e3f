"""Global explanations: class x class influence matrix, dominating patients, score distributions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tracin_jax.explain import figures as fig
from tracin_jax.explain import ranking
from tracin_jax.influence.folder import Influence


def global_explanations(infl: Influence, k: int, folder: Path, example: str = "slice") -> dict:
    """Aggregates over the test set (figures written into ``folder``); returns the metrics part.

    ``example``: what one example of the run is, "slice" or (3D) "volume", for the figures'
    wording."""
    present = infl.test_present
    names = infl.class_names
    n_cls = len(names)
    n_items = [int(present[:, i].sum()) for i in range(n_cls)]
    matrix = ranking.class_matrix(infl.patient_scores, present, infl.n_train)
    prop, opp = ranking.topk_frequency(infl.patient_scores, present, k)
    dominating = {}
    for i in range(n_cls):
        def top(counts):
            order = np.argsort(-counts, kind="stable")[:5]
            return [{"patient": infl.patients[p], "count": int(counts[p]),
                     "fraction": counts[p] / n_items[i] if n_items[i] else None}
                    for p in order if counts[p] > 0]
        dominating[names[i]] = {"proponents": top(prop[i]), "opponents": top(opp[i])}
    dist = {}
    for i in range(n_cls):
        for j in range(n_cls):
            v = infl.patient_scores[present[:, i], i, :, j].astype(np.float64).ravel()
            key = f"{names[i]}<-{names[j]}"
            dist[key] = ({"n": int(v.size), "mean": v.mean(), "median": np.median(v), "std": v.std(),
                          "min": v.min(), "max": v.max(), "fraction_positive": (v > 0).mean()}
                         if v.size else {"n": 0})
    out = {"n_items": dict(zip(names, n_items)), "class_matrix": matrix,
           "class_matrix_axes": "rows: test class i, columns: training class j",
           "topk": k, "topk_proponent_counts": prop, "topk_opponent_counts": opp,
           "dominating_patients": dominating, "score_distribution": dist,
           "figures": {
               "class_matrix": fig.class_matrix(folder / "class_matrix.png", matrix, n_items, names,
                                                example=example),
               "topk_frequency": fig.topk_frequency(folder / "topk_frequency.png", prop, opp,
                                                    infl.patients, k, n_items, names=names),
               "score_distributions": fig.score_distributions(folder / "score_distributions.png",
                                                              infl.patient_scores, present,
                                                              names=names, example=example)}}
    if infl.self_influence is not None:
        si = infl.self_influence
        out["self_influence_top"] = {
            names[j]: [{"slice": infl.train_ids[n], "value": float(si[n, j])}
                       for n in np.argsort(-si[:, j], kind="stable")[:5]] for j in range(n_cls)}
    return out
