"""Local explanations: for chosen test examples and classes, the top-k proponents and opponents.

For test example t and test class i (training class j, default j = i), training patients are
ranked by ``patient_scores[t, i, :, j]`` (or training examples by ``scores[t, i, :, j]``); each
patient is shown by its representative example. One figure per (test example, class).

An example is a slice (images f32[N, H, W, M], labels u8[N, H, W]) or, in a 3D run, a whole
volume (images f32[N, X, Y, Z, M], labels u8[N, X, Y, Z], canonical RAS axes as the loader
gives them): a patient is then its one volume, shown by three orthogonal planes
(:func:`figures.local_explanation_3d`), and the planes drawn are recorded with each item.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from tracin_jax.progress import tqdm

from tracin_jax.errors import InputError
from tracin_jax.explain import figures as fig
from tracin_jax.explain import ranking


def _top_k_from_lists(tk: dict, t: int, i: int, j: int, k: int) -> ranking.TopK:
    """Slice-level top-k from the influence stage's top-K files (same sign rule as top_k)."""
    pi, ps = tk["proponents_indices"][t, i, j, :k], tk["proponents_scores"][t, i, j, :k]
    oi, os_ = tk["opponents_indices"][t, i, j, :k], tk["opponents_scores"][t, i, j, :k]
    keep_p = (pi >= 0) & (ps > 0)
    keep_o = (oi >= 0) & (os_ < 0)
    return ranking.TopK(pi[keep_p].astype(np.int64), ps[keep_p], oi[keep_o].astype(np.int64), os_[keep_o])


def _file_part(name: str) -> str:
    """A class name as part of a file name ('NCR/NET' -> 'NCR-NET')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "class"


def local_explanations(infl, query, train, reps, *, k, level, train_class, items_per_class,
                       test_items, mod, modality, folder: Path, progress) -> dict:
    """Top-k tables and one figure per chosen (test example, class); returns the metrics part.

    reps: per training class j, int[n_test, C, n_patients] representative examples; mod: the
    channel shown; test_items: test example ids (default: per class, the ``items_per_class``
    examples with the largest class region). Items whose class is absent are skipped and
    counted. For volumes every item, proponent and opponent records ``planes``: the
    ``{"axial": z, "coronal": y, "sagittal": x}`` indices its figure shows (through
    :func:`figures.view_point` of its class region).
    """
    volumes = np.ndim(query.labels) == 4
    if level == "slice" and infl.scores is None and infl.topk is None:
        raise InputError(f"{infl.dir}: level='slice' needs scores.npy or the topk_*.npy files, "
                         "which this folder lacks (use level='patient')")
    present = infl.test_present
    names, labels = infl.class_names, infl.class_labels
    if test_items:
        pos = {t: n for n, t in enumerate(infl.test_ids)}
        missing = [t for t in test_items if t not in pos]
        if missing:
            raise InputError(f"test item {missing[0]!r} is not a test "
                             f"{'volume' if volumes else 'slice'} of this run")
        chosen = [[pos[t] for t in test_items] for _ in names]
    else:
        chosen = ranking.largest_region_items(query.labels, items_per_class, labels)
    out = {"level": level, "k": k, "modality": modality,
           "example": "volume" if volumes else "slice", "items": [],
           "skipped_absent": {}, "not_ranked_absent": {}}
    jobs = []
    for i, name in enumerate(names):
        keep = [t for t in chosen[i] if present[t, i]]
        out["skipped_absent"][name] = len(chosen[i]) - len(keep)
        out["not_ranked_absent"][name] = int((~present[:, i]).sum())
        jobs += [(t, i) for t in keep]
    for t, i in tqdm(jobs, desc="local explanations", disable=not progress, leave=False):
        j = i if train_class is None else train_class
        if level == "patient":
            top = ranking.top_k(infl.patient_scores[t, i, :, j], k)
        elif infl.scores is not None:
            top = ranking.top_k(np.asarray(infl.scores[t, i, :, j]), k)
        else:
            top = _top_k_from_lists(infl.topk, t, i, j, k)

        def entries(idx, scores):
            rows = []
            for r, (u, s) in enumerate(zip(idx, scores), start=1):
                n = int(reps[j][t, i, u]) if level == "patient" else int(u)
                patient = infl.patients[u] if level == "patient" else infl.train_cases[u]
                row = {"rank": r, "patient": patient, "slice": infl.train_ids[n],
                       "slice_index": n, "score": float(s)}
                if volumes:
                    row["planes"] = planes_of(train.labels[n] == labels[j])
                rows.append(row)
            return rows

        props = entries(top.proponents, top.proponent_scores)
        opps = entries(top.opponents, top.opponent_scores)

        def panels(rows):
            return [fig.Panel(train.images[e["slice_index"], ..., mod], train.labels[e["slice_index"]],
                              e["patient"], e["slice"], e["score"], e["rank"]) for e in rows]

        name = f"local_{_file_part(names[i])}_{t:04d}.png"
        fig.local_explanation(folder / name, test_image=query.images[t, ..., mod],
                              test_labels=query.labels[t], test_id=infl.test_ids[t], test_class=i,
                              train_class=j, proponents=panels(props), opponents=panels(opps),
                              level=level, modality=modality, class_names=names,
                              class_labels=labels)
        item = {"test_id": infl.test_ids[t], "test_index": int(t),
                "test_class": names[i], "train_class": names[j],
                "class_area": int((query.labels[t] == labels[i]).sum()),
                "proponents": props, "opponents": opps, "figure": name}
        if volumes:
            item["planes"] = planes_of(query.labels[t] == labels[i])
        out["items"].append(item)
    return out


def planes_of(region: np.ndarray) -> dict[str, int]:
    """{"axial": z, "coronal": y, "sagittal": x}: the planes a volume's figure shows for a class
    region bool[X, Y, Z] (through :func:`figures.view_point`)."""
    point = fig.view_point(region)
    return {plane: int(point[fig.PLANE_AXES[plane][2]]) for plane in fig.PLANES}
