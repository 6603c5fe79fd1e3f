"""``run_explain``: local, global and faithfulness explanations of an influence folder, as a report.

>>> from tracin_jax.explain import run_explain
>>> metrics = run_explain("runs/demo/run", "runs/demo/influence", "runs/demo/report")

Steps (each in its own module): rankings and aggregates (``ranking``), local explanation
figures, global explanations, faithfulness of the rankings against last-hidden-layer
similarity (``features``, ``faithfulness``), filter selection validated by ablation
(``selection``), the folder's evaluation against retraining if there is one (``trust``), then
``index.html`` + ``metrics.json`` (``report``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import stats
from tracin_jax.progress import tqdm

from tracin_jax.errors import WRITE_ERRNOS, InputError, cannot_write
from tracin_jax.explain import faithfulness as fa
from tracin_jax.explain import figures as fig
from tracin_jax.explain import ranking, report, selection
from tracin_jax.explain.features import SIMILARITIES, FeatureStore
from tracin_jax.explain.global_view import global_explanations
from tracin_jax.explain.local import local_explanations
from tracin_jax.explain.trust import trust_section
from tracin_jax.influence.folder import PRESENT_FILE, Influence, classes_of, load_influence
from tracin_jax.models.interface import head_name

LEVELS = ("patient", "slice")


def _class_arg(value: Any, what: str, names: Sequence[str]) -> int | None:
    """A class given by name or by index into ``names`` -> its index (None stays None)."""
    if value is None:
        return None
    if isinstance(value, str) and value in names:
        return list(names).index(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= int(value) < len(names):
        return int(value)
    raise InputError(f"{what}={value!r}: choose one of {', '.join(names)} "
                     f"(or 0..{len(names) - 1})")


def _pick_checkpoint(run, epoch: int | None):
    if epoch is None:
        return run.checkpoints[-1]
    for c in run.checkpoints:
        if c.epoch == epoch:
            return c
    have = ", ".join(str(c.epoch) for c in run.checkpoints)
    raise InputError(f"epoch={epoch}: the run has no checkpoint for it (have {have})")


def present_classes(labels: np.ndarray, class_labels: Sequence[int]) -> np.ndarray:
    """bool[N, C]: class c (label value class_labels[c]) occurs in example n of labels
    u8[N, *S] (slices or volumes)."""
    labels = np.asarray(labels)
    axes = tuple(range(1, labels.ndim))
    return np.stack([(labels == v).any(axis=axes) for v in class_labels], axis=1)


def _check_present(infl: Influence, labels: np.ndarray) -> None:
    truth = present_classes(labels, infl.class_labels)
    bad = np.argwhere(truth != infl.test_present)
    if bad.size:
        t, c = bad[0]
        raise InputError(f"{infl.dir / PRESENT_FILE}: says {infl.class_names[c]} is "
                         f"{'present' if infl.test_present[t, c] else 'absent'} in {infl.test_ids[t]}, "
                         "the run's ground truth disagrees (influence computed on other data?)")


def _representatives(infl: Influence, train_labels: np.ndarray) -> tuple[list[np.ndarray], str]:
    """Per training class j: int[n_test, C, n_patients] representative slice of each patient."""
    n_pat, n_cls = len(infl.patients), infl.n_classes
    if infl.scores is not None:
        reps = [ranking.representatives(np.asarray(infl.scores[:, :, :, j]), infl.train_patient, n_pat)
                for j in range(n_cls)]
        return reps, "largest |score|"
    fallback = ranking.largest_region_representatives(train_labels, infl.train_patient, n_pat,
                                                      infl.class_labels)
    reps = [np.broadcast_to(fallback[j], (infl.n_test, n_cls, n_pat)) for j in range(n_cls)]
    if infl.topk is None:
        return reps, "largest class region (scores.npy absent)"
    tk = infl.topk
    for j in range(n_cls):
        idx = np.concatenate([tk["proponents_indices"][:, :, j], tk["opponents_indices"][:, :, j]], -1)
        val = np.concatenate([tk["proponents_scores"][:, :, j], tk["opponents_scores"][:, :, j]], -1)
        reps[j] = ranking.representatives_from_topk(reps[j], idx, val, infl.train_patient)
    return reps, ("largest |score| among the top-K slices, else largest class region "
                  "(scores.npy absent)")


def _faithfulness(infl, store, query, train, reps, *, similarity, n_extremes, n_permutations,
                  seed) -> tuple[dict, list[np.ndarray]]:
    """FI curves, Spearman and the permutation gap test for every similarity.

    Returns (metrics part, FI curves of the chosen similarity: per class f32[R_c, F]); the
    metrics part carries the chosen similarity's scatter data under '_scatter' for the figures.
    """
    names, labels = infl.class_names, infl.class_labels
    rs = fa.region_stats(store, query.images, query.labels, train.images, train.labels,
                         test_name=infl.query_split, class_labels=labels)
    present = infl.test_present
    eligible = fa.eligible_patients(train.labels, infl.train_patient, len(infl.patients), labels)
    out: dict = {"similarity": similarity, "metrics": {},
                 "ranked_patients": {names[c]: int(eligible[c].sum()) for c in range(len(names))}}
    chosen_curves = []
    for kind in SIMILARITIES:
        per_class, curves, abs_s, mean_s = {}, [], [], []
        for c in range(len(names)):
            rows = present[:, c]
            sim = fa.similarity(rs, c, kind)  # [n_test, n_train, F]
            order = fa.patient_order(infl.patient_scores, c, eligible[c])
            sbr = fa.by_rank(sim, order, reps[c][:, c, :])[rows]  # [m, R, F]
            curve = fa.fi_curve(sbr) if sbr.shape[0] else np.full(sbr.shape[1:], np.nan)
            curves.append(curve)
            ranked = np.flatnonzero(eligible[c])
            s_pat = fa.nanmean(fa.by_rank(sim, np.broadcast_to(ranked, order.shape),
                                          reps[c][:, c, :])[rows], axis=-1)  # [m, R]
            a_pat = np.abs(infl.patient_scores[rows, c][:, ranked, c])
            abs_s.append(a_pat)
            mean_s.append(s_pat)
            entry = {"spearman_abs_score_vs_S": fa.spearman(a_pat, s_pat),
                     "fi_mean_over_filters": fa.nanmean(curve, axis=1)}
            if sbr.shape[0]:
                entry["gap_test"] = fa.item_permutation_test(fa.nanmean(sbr, axis=-1), n_extremes,
                                                             n_permutations, seed)
            else:
                entry["gap_test"] = {}
            per_class[names[c]] = entry
        pooled = fa.spearman(np.concatenate([a.ravel() for a in abs_s]),
                             np.concatenate([m.ravel() for m in mean_s]))
        out["metrics"][kind] = {"per_class": per_class, "spearman_pooled": pooled}
        if kind == similarity:
            chosen_curves = curves
            chosen_scatter = (abs_s, mean_s)
    out["fi_curves"] = chosen_curves  # [C][R, F]
    out["_scatter"] = chosen_scatter
    return out, chosen_curves


def _selection(curves, store, test, train, variables, *, names, labels, n_extremes, n_permutations,
               seed, z_min, alpha, random_seeds, head="head") -> dict:
    n_f = curves[0].shape[1]
    n_cls = len(names)
    sel = [selection.select_filters(curves[c], n_extremes, n_permutations, seed, z_min, alpha)
           for c in range(n_cls)]
    selected = np.stack([s["selected"] for s in sel])  # [C, F]
    zero = [np.zeros(n_f, bool)] + [selection.group_mask(n_f, [f]) for f in range(n_f)]
    groups_idx = []
    for c in range(n_cls):
        size = int(selected[c].sum())
        g = {"size": size, "selected": np.flatnonzero(selected[c]),
             "least": selection.least_important(sel[c]["z"], size),
             "random": selection.random_sets(n_f, size, range(random_seeds)) if size else []}
        rows = {"selected": len(zero)}
        zero.append(selection.group_mask(n_f, g["selected"]))
        rows["least"] = len(zero)
        zero.append(selection.group_mask(n_f, g["least"]))
        rows["random"] = []
        for r in g["random"]:
            rows["random"].append(len(zero))
            zero.append(selection.group_mask(n_f, r))
        groups_idx.append((g, rows))
    zero = np.stack(zero)
    head = variables["params"][head]
    kernel = np.asarray(head["kernel"]).reshape(n_f, -1)
    bias = np.asarray(head["bias"]) if "bias" in head else np.zeros(kernel.shape[1], np.float32)
    per_filter, groups, dice, comparisons = {}, {}, {}, {}
    for split, ex in (("train", train), ("test", test)):
        d = selection.dice_table(selection.ablation_counts(store, split, ex.images, ex.labels,
                                                           kernel, bias, zero), labels)
        drop = d[0][None] - d  # [G, C]
        dice[split] = {"baseline": dict(zip(names, d[0]))}
        per_filter[split] = drop[1:1 + n_f].T  # [C, F]
        groups[split], comparisons[split] = [], {}
        for c, (g, rows) in enumerate(groups_idx):
            rnd = [drop[r, c] for r in rows["random"]]
            groups[split].append({"size": g["size"], "selected": drop[rows["selected"], c],
                                  "least": drop[rows["least"], c], "random": rnd})
            comparisons[split][names[c]] = selection.mean_difference_test(
                per_filter[split][c], selected[c], n_permutations, seed)
    return {
        "rule": {"n_extremes": n_extremes, "n_window": [s["n"] for s in sel], "z_min": z_min,
                 "alpha": alpha, "n_permutations": n_permutations, "seed": seed,
                 # filters per class passing by chance: min(alpha, P(Z >= z_min)) * F (normal null)
                 "expected_by_chance": min(alpha, float(stats.norm.sf(z_min))) * n_f},
        "per_class": {names[c]: {
            "selected": np.flatnonzero(selected[c]), "n_selected": int(selected[c].sum()),
            "gap": sel[c]["gap"], "z": sel[c]["z"], "p": sel[c]["p"],
            "least_important": groups_idx[c][0]["least"],
            "random_sets": groups_idx[c][0]["random"]} for c in range(n_cls)},
        "n_filters": n_f, "random_seeds": list(range(random_seeds)),
        "baseline_dice": dice, "per_filter_dice_drop": per_filter,
        "group_dice_drop": groups, "single_filter_comparison": comparisons,
        "_selected": selected,
    }


def channels_of(run) -> list[str]:
    """The run's input channel names in the model's order: its task's (BraTS: its
    ``data.modalities``), else the config's modalities (an object without a task)."""
    task = getattr(run, "task", None)
    return list(task.channels) if task is not None else list(run.config.data.modalities)


def default_modality(channels: Sequence[str]) -> str:
    """The channel figures show by default: ``flair`` when the run has it (BraTS), else the
    first channel."""
    return "flair" if "flair" in channels else channels[0]


def explain_run(run, influence_dir: str | os.PathLike, out: str | os.PathLike, *, k: int = 5,
                modality: str | None = None, level: str = "patient",
                train_class: int | str | None = None,
                items_per_class: int = 4, test_items: Sequence[str] | None = None,
                similarity: str = "cosine", n_extremes: int = 10, n_permutations: int = 1000,
                z_min: float = 2.0, alpha: float = 0.05, random_seeds: int = 5, seed: int = 0,
                epoch: int | None = None, batch_size: int | None = None, progress: bool = True,
                evaluation: str | os.PathLike | None = None) -> dict:
    """Writes the explanation report of an opened run (see :func:`run_explain`); returns metrics."""
    from tracin_jax.paths import check_writable_folder

    t0 = time.perf_counter()
    check_writable_folder(out, "--out")
    if int(k) < 1:
        raise InputError(f"k={k}: must be at least 1")
    if level not in LEVELS:
        raise InputError(f"level={level!r}: choose one of {', '.join(LEVELS)}")
    if similarity not in SIMILARITIES:
        raise InputError(f"similarity={similarity!r}: choose one of {', '.join(SIMILARITIES)}")
    modalities = channels_of(run)
    modality = default_modality(modalities) if modality is None else modality
    if modality not in modalities:
        raise InputError(f"modality={modality!r}: the run's channels are {', '.join(modalities)}")
    mod = modalities.index(modality)
    meta0 = _peek_meta(influence_dir)
    check_same_run(run, influence_dir, meta0)
    trust = trust_section(run, influence_dir, out, evaluation)  # refuses before any work
    j_fixed = _class_arg(train_class, "train_class", classes_of(meta0, Path(influence_dir) / "meta.json")[0])
    train = run.train
    query = run.train if str(meta0.get("split", "test")) == "train" else run.test
    infl = load_influence(influence_dir, test_ids=list(query.ids), train_ids=list(train.ids),
                          train_cases=list(train.cases))
    _check_present(infl, np.asarray(query.labels))
    names = infl.class_names
    example = "volume" if np.ndim(query.labels) == 4 else "slice"  # what one example of the run is
    ckpt = _pick_checkpoint(run, epoch)
    tmp = report.start(out)
    try:
        reps, rep_rule = _representatives(infl, np.asarray(train.labels))
        if example == "volume" and np.bincount(infl.train_patient).max(initial=0) <= 1:
            rep_rule = "its volume (one per patient)"
        steps = tqdm(total=4, desc="explain", disable=not progress)
        local = local_explanations(infl, query, train, reps, k=int(k), level=level, train_class=j_fixed,
                       items_per_class=items_per_class, test_items=test_items, mod=mod,
                       modality=modality, folder=tmp, progress=progress)
        steps.update()
        glob = global_explanations(infl, int(k), tmp, example=example)
        steps.update()
        if batch_size is None:
            batch_size = 2 if example == "volume" else 16
        store = FeatureStore(run.features, ckpt.variables, batch_size, progress=progress)
        faith, curves = _faithfulness(infl, store, query, train, reps, similarity=similarity,
                                      n_extremes=n_extremes, n_permutations=n_permutations,
                                      seed=seed)
        steps.update()
        sel = _selection(curves, store, run.test, train, ckpt.variables, n_extremes=n_extremes,
                         n_permutations=n_permutations, seed=seed, z_min=z_min, alpha=alpha,
                         random_seeds=random_seeds, names=names, labels=infl.class_labels,
                         head=head_name(getattr(run, "model", None)))
        steps.update()
        steps.close()
        metrics = _assemble(run, infl, ckpt, local, glob, faith, sel, rep_rule, tmp, t0,
                            options=dict(k=int(k), modality=modality, level=level,
                                         train_class=None if j_fixed is None else names[j_fixed],
                                         items_per_class=items_per_class, similarity=similarity,
                                         n_extremes=n_extremes, n_permutations=n_permutations,
                                         z_min=z_min, alpha=alpha, random_seeds=random_seeds,
                                         seed=seed, epoch=ckpt.epoch))
        metrics["trust"] = trust
        from tracin_jax.explain.page import render

        metrics = report.jsonable(metrics)
        report.write_metrics(tmp, metrics)
        (tmp / "index.html").write_text(render(metrics), encoding="utf-8")
        report.finish(tmp, out)
    except BaseException as e:
        report.abandon(tmp)
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:  # a full disk: one line, the
            raise cannot_write(f"--out {out}", e) from None     # earlier report kept
        raise
    return metrics


def _peek_meta(influence_dir) -> dict:
    """The influence folder's meta.json, or {} when unreadable (load_influence reports that)."""
    try:
        meta = json.loads((Path(influence_dir) / "meta.json").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _same_folder(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def _case_of(example_id: str) -> str:
    """The case of an example id: ``<case>`` of a slice id ``<case>/z<index>``; a volume's id
    (no ``/``) is its case."""
    return str(example_id).rsplit("/", 1)[0]


def check_same_run(run, influence_dir: str | os.PathLike, meta: dict) -> None:
    """Refuses (InputError, one line naming both folders) an influence folder of another run.

    Compared with the run's own record (``run.json``: the split's slice ids) and folder: the
    meta.json ``workdir`` (when it names an existing folder, it must be the run's, paths
    resolved), ``train_ids`` and ``test_ids`` (the training ids when the influence queries were
    training slices), ``patients`` (the cases of the training ids), the checkpoints' epochs
    and learning rates, and the run identity the folder recorded (:mod:`tracin_jax.identity`:
    the config, the split and the weights of every checkpoint it used), whether or not the
    workdir that computed it still exists.
    """
    d = Path(influence_dir)
    wd = Path(getattr(run, "workdir", ""))
    other = meta.get("workdir")
    if isinstance(other, str) and other and Path(other).is_dir() and wd.is_dir() \
            and not _same_folder(other, wd):
        raise InputError(f"--influence {d} was computed from the run {Path(other).resolve()}, "
                         f"not from --workdir {wd.resolve()}")
    info = getattr(run, "info", None) or {}
    own_train, own_test = info.get("train_ids"), info.get("test_ids")
    query_own = own_train if str(meta.get("split", "test")) == "train" else own_test
    for key, own in (("train_ids", own_train), ("test_ids", query_own)):
        theirs = meta.get(key)
        if not isinstance(own, list) or not isinstance(theirs, list) or theirs == own:
            continue
        diff = next((f"{a!r} vs {b!r}" for a, b in zip(theirs, own) if a != b),
                    f"{len(theirs)} vs {len(own)} slices")
        raise InputError(f"--influence {d} does not belong to --workdir {wd}: its {key} differ from "
                         f"the run's run.json (first difference: {diff})")
    patients = meta.get("patients")
    if isinstance(own_train, list) and isinstance(patients, list):
        own_cases = {_case_of(i) for i in own_train}
        if set(map(str, patients)) != own_cases:
            odd = sorted(set(map(str, patients)) ^ own_cases)[0]
            raise InputError(f"--influence {d} does not belong to --workdir {wd}: patient {odd!r} is "
                             "in one of them only")
    if hasattr(run, "config") and hasattr(run, "checkpoint"):  # a Run: its recorded identity
        from tracin_jax import identity

        identity.check_same_run(meta.get("run_identity"), run, f"--influence {d}")
    have = {(int(c.epoch), float(c.lr)) for c in getattr(run, "checkpoints", [])}
    for c in meta.get("checkpoints") or []:
        try:
            key = (int(c["epoch"]), float(c["lr"]))
        except (TypeError, KeyError, ValueError):
            continue
        if have and not any(e == key[0] and np.isclose(lr, key[1], rtol=1e-6, atol=0) for e, lr in have):
            raise InputError(f"--influence {d} does not belong to --workdir {wd}: it used checkpoint "
                             f"epoch {key[0]} (lr {key[1]:g}), which the run does not have")


def _assemble(run, infl, ckpt, local, glob, faith, sel, rep_rule, folder, t0, options) -> dict:
    scatter = faith.pop("_scatter")
    curves = faith["fi_curves"]
    selected = sel.pop("_selected")
    kind = faith["similarity"]
    per_class = faith["metrics"][kind]["per_class"]
    names = infl.class_names
    highlight = []
    for c in range(len(names)):
        z = np.asarray(sel["per_class"][names[c]]["z"], float)
        highlight.append([int(f) for f in np.argsort(-np.where(np.isfinite(z), z, -np.inf))[:3]
                          if np.isfinite(z[f])])
    faith["figures"] = {
        "fi_curves": fig.fi_curves(folder / "fi_curves.png", curves,
                                   sel["rule"]["n_window"], highlight,
                                   [per_class[n]["gap_test"] for n in names], kind, names=names),
        "similarity_vs_score": fig.similarity_vs_score(
            folder / "similarity_vs_score.png", scatter[0], scatter[1],
            [per_class[n]["spearman_abs_score_vs_S"] for n in names], kind, names=names)}
    sel["figures"] = {
        "ablation_per_filter": fig.ablation_per_filter(folder / "ablation_per_filter.png",
                                                       sel["per_filter_dice_drop"], selected, names),
        "importance_histograms": fig.importance_histograms(
            folder / "importance_histograms.png",
            np.stack([sel["per_class"][n]["gap"] for n in names]), selected, names),
        "group_ablation": fig.group_ablation(folder / "group_ablation.png", sel["group_dice_drop"],
                                             names)}
    sel["verdict"] = _verdict(sel, names)
    meta = {k: v for k, v in infl.meta.items()
            if k not in ("test_ids", "train_ids", "train_cases", "test_cases", "patients")}
    return {
        "run": {"workdir": str(getattr(run, "workdir", "")),
                "task": (run.task.to_dict() if getattr(run, "task", None) is not None
                         else None),
                "config": run.config.to_dict() if hasattr(run.config, "to_dict") else {},
                "checkpoints": [{"epoch": c.epoch, "lr": c.lr} for c in run.checkpoints],
                "features_checkpoint": {"epoch": ckpt.epoch, "lr": ckpt.lr}},
        "influence": {"dir": str(infl.dir), "meta": meta, "class_names": list(names),
                      "class_labels": list(infl.class_labels), "n_test": infl.n_test,
                      "n_train": infl.n_train, "n_patients": len(infl.patients),
                      "query_split": infl.query_split, "has_scores": infl.scores is not None,
                      "representative_slice": rep_rule, "example": local["example"]},
        "options": options,
        "local": local, "global": glob, "faithfulness": faith, "selection": sel,
        "seconds": time.perf_counter() - t0,
    }


def _verdict(sel: dict, names: Sequence[str]) -> dict:
    """Per split and class: does zeroing the selected set cost more Dice than random sets?"""
    out = {}
    for split, rows in sel["group_dice_drop"].items():
        out[split] = {}
        for c, g in enumerate(rows):
            if g["size"] == 0:
                out[split][names[c]] = {"size": 0, "selected_beats_random": None,
                                              "selected_beats_every_random": None}
                continue
            rnd = np.asarray(g["random"], float)
            out[split][names[c]] = {
                "size": g["size"], "selected_drop": g["selected"], "random_mean": float(np.nanmean(rnd)),
                "random_std": float(np.nanstd(rnd)), "least_drop": g["least"],
                "selected_beats_random": bool(g["selected"] > np.nanmean(rnd)),
                "selected_beats_every_random": bool(np.all(g["selected"] > rnd)),
                "fraction_random_below_selected": float(np.mean(rnd < g["selected"]))}
    return out


def run_explain(workdir: str | os.PathLike, influence_dir: str | os.PathLike, out: str | os.PathLike,
                *, k: int = 5, modality: str | None = None,
                data_dir: str | os.PathLike | None = None,
                progress: bool = True, evaluation: str | os.PathLike | None = None,
                **options) -> dict:
    """Explanation report of the influence folder ``influence_dir`` of the run in ``workdir``.

    Writes ``out/index.html`` (offline; figures as PNG files beside it) and ``out/metrics.json``
    (every number in the report); returns the metrics dict. ``k``: proponents/opponents shown and
    counted; ``modality``: the channel shown in figures (a name of the run's task's channels;
    None: ``flair`` for BraTS, else the first channel). Further keyword options (defaults):
    level='patient' | 'slice', train_class=None (j = i), items_per_class=4, test_items=None
    (test example ids to explain instead), similarity='cosine' | 'max_ratio' | 'max_product',
    n_extremes=10, n_permutations=1000, z_min=2.0, alpha=0.05, random_seeds=5, seed=0,
    epoch=None (last checkpoint's features), batch_size=None (examples per forward pass of the
    feature maps: 16 slices, or 2 volumes for a 3D run).

    A 3D run (examples are volumes: images f32[N, X, Y, Z, M], RAS) gets the same report: one
    example is one patient's volume, figures show three orthogonal planes through each region
    (:func:`figures.local_explanation_3d`), and the feature maps f32[N, X, Y, Z, width] are
    compared and ablated over all their voxels.

    ``evaluation``: the ``tracin-jax evaluate --out`` folder (or its ``evaluation.json``) that
    scored this influence folder of this run; the report then shows its class-wise LDS with
    95% intervals, its paired difference with the model-free baseline and its leave-top-k-out
    row (metrics ``"trust"``). None: the newest such evaluation found beside the run or the
    influence folder (:mod:`.trust`), else the report says the scores have not been checked
    against retraining and how to check them.

    Raises InputError (one line) for a bad influence folder or option, an ``evaluation`` that
    is unreadable, of another run or did not score this folder, an ``out`` that cannot
    be written (checked first, before any work) or a write the file system refuses (a full
    disk: the report's temporary folder is removed, an earlier report in ``out`` stays).
    """
    from tracin_jax.paths import check_writable_folder
    from tracin_jax.run import load_run

    check_writable_folder(out, "--out")
    return explain_run(load_run(workdir, data_dir), influence_dir, out, k=k, modality=modality,
                       progress=progress, evaluation=evaluation, **options)
