"""``render(metrics) -> str``: the report's ``index.html`` from the metrics dict (no computation).

Every number on the page is read from ``metrics`` (which is also written as ``metrics.json``).
"""

from __future__ import annotations

import json
from itertools import zip_longest
from typing import Any


from tracin_jax.explain.figures import class_colors
from tracin_jax.explain.report import Raw, esc, figure, fmt, page, table
from tracin_jax.task import BRATS_CLASSES as CLASS_NAMES

_COLORS: dict[str, str] = {}


def _names(m: dict) -> list[str]:
    """The report's class names (the influence folder's; the tumour classes for older metrics)."""
    names = list(m["influence"].get("class_names") or CLASS_NAMES)
    _COLORS.update(zip(names, class_colors(names)))
    return names


def _volumes(m: dict) -> bool:
    """Whether the report's examples are volumes (a 3D run); metrics written before 3D runs
    existed are of slices."""
    return m["influence"].get("example", "slice") == "volume"


def _cls(name: str) -> Raw:
    colour = _COLORS.get(name) or class_colors([name])[0]
    return Raw(f'<span class="swatch" style="background:{colour}"></span>{esc(name)}')


def _flat(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            rows += _flat(v, key + ".")
        else:
            rows.append((key, v))
    return rows


def _short_json(v: Any, limit: int = 160) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s if len(s) <= limit else s[:limit - 1] + "…"


def _subset(meta: dict) -> str:
    p = meta.get("params")
    if isinstance(p, dict):
        size = p.get("size")
        paths = p.get("paths")
        where = f": {', '.join(paths[:4])}{' …' if len(paths) > 4 else ''}" if isinstance(paths, list) else ""
        return f"{p.get('name', '?')} ({fmt(size)} numbers){where}"
    return _short_json(p) if p is not None else "not recorded"


def _task(m: dict) -> str:
    """One line on the run's task (name, format, channels, classes), from the metrics or the
    influence folder's meta.json; the BraTS default for metrics written before tasks were."""
    raw = m["run"].get("task") or m["influence"]["meta"].get("task")
    if not raw:
        return "BraTS (not recorded)"
    try:
        from tracin_jax.task import Task

        return Task.from_dict(raw).describe()
    except Exception:  # noqa: BLE001 - a malformed entry is shown, not fatal to the page
        return _short_json(raw)


def _header(m: dict) -> str:
    names = _names(m)
    run, infl, opt = m["run"], m["influence"], m["options"]
    ex = "volume" if _volumes(m) else "slice"
    cfg_rows = [(k, _short_json(v)) for k, v in _flat(run.get("config", {}))]
    meta_rows = [(k, _short_json(v)) for k, v in _flat(infl["meta"])]
    ck = [(c["epoch"], c["lr"]) for c in infl["meta"].get("checkpoints", [])
          if isinstance(c, dict) and "epoch" in c] or [(c["epoch"], c["lr"]) for c in run["checkpoints"]]
    return "\n".join([
        "<h1>Class-wise TracIn explanations</h1>",
        table(["", ""], [
            ("run", run["workdir"]), ("task", _task(m)), ("influence folder", infl["dir"]),
            ("test items (rows of the score tensor)", f"{infl['n_test']} ({infl['query_split']} split)"),
            (f"training {ex}s / patients", f"{infl['n_train']} / {infl['n_patients']}"),
            ("parameter subset (influence gradients)", _subset(infl["meta"])),
            ("projection", _short_json(infl["meta"].get("projection")) if infl["meta"].get("projection")
             else "none (exact gradients)"),
            (f"per-{ex} scores available", fmt(infl["has_scores"])),
            (("patient shown by", infl["representative_slice"]) if _volumes(m) else
             ("patient shown by its slice with", infl["representative_slice"])),
            ("feature maps from checkpoint (epoch, lr)",
             f"{run['features_checkpoint']['epoch']}, {fmt(run['features_checkpoint']['lr'])}"),
            ("report built in", f"{m['seconds']:.1f} s"),
        ], left=2),
        "<p>Classes: " + " ".join(str(_cls(n)) for n in names) + ". Scores T_ij: test class i, "
        "training class j; positive = proponent (training on it lowered the test loss), negative = "
        f"opponent. Test classes absent from a {ex}'s ground truth are never ranked.</p>",
        "<h3>Checkpoints used by the influence scores</h3>",
        table(["epoch", "learning rate"], ck, left=0),
        "<details><summary>Influence settings (meta.json)</summary>",
        table(["key", "value"], meta_rows, left=2), "</details>",
        "<details><summary>Run configuration</summary>",
        table(["key", "value"], cfg_rows, left=2), "</details>",
        "<details><summary>Report options</summary>",
        table(["option", "value"], [(k, _short_json(v)) for k, v in opt.items()], left=2), "</details>",
    ])


def _interval(ci, digits: int = 3) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return "n/a"
    return f"[{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]"


def _trust(m: dict) -> str:
    """How far to trust the scores: the folder's evaluation against retraining, if any."""
    t = m.get("trust")
    if t is None:  # metrics written before the section existed
        return ""
    head = "<h2>How far to trust these scores</h2>"
    if not t["checked"]:
        cmds = t["commands"]
        return "\n".join([head, f'<p class="verdict">These scores have not been checked against '
                          f"retraining: run <code>{esc(cmds[0])}</code>, then "
                          f"<code>{esc(cmds[1])}</code>.</p>"])
    lds, level = t["lds"] or {}, fmt(100 * (t.get("level") or 0.95), 3)
    rows = [("all classes", lds.get("mean"), Raw(esc(_interval(lds.get("ci")))),
             lds.get("n_targets"))]
    rows += [(_cls(c), e.get("mean"), Raw(esc(_interval(e.get("ci")))), e.get("n_targets"))
             for c, e in (lds.get("per_class") or {}).items()]
    parts = [head,
             f"<p>Checked against retraining by <code>{esc(t['evaluation'])}</code> "
             f"({'given' if t.get('given') else 'found beside the run'}; this folder is its "
             f"variant <code>{esc(t['variant'])}</code>, scored on the {esc(t.get('loss'))} loss): "
             f"{fmt(t.get('subsets'))} random subsets of the training patients (each keeping a "
             f"fraction {fmt(t.get('fraction'))} of them), each retrained from scratch with "
             f"{fmt(t.get('seeds'))} seed(s). LDS: mean over (test "
             f"{'volume' if _volumes(m) else 'slice'}, class) targets of the Spearman correlation, over "
             "the retrained models, between the loss these scores predict and the loss measured "
             "(1: the scores rank the subsets as retraining does; 0: no relation); "
             f"{level}% intervals: percentile bootstrap over the retrained models"
             + (f"; noise ceiling (the best any attribution can reach with this many seeds): "
                f"{fmt(t['noise_ceiling'], 3)}" if t.get("noise_ceiling") is not None else "")
             + ".</p>",
             table(["class", "LDS", f"{level}% interval", "targets"], rows, left=1)]
    vb, base = t.get("vs_baseline"), t.get("baseline")
    if vb and base:
        lo, hi = (vb.get("ci") or [None, None])[:2]
        verdict = ("above the baseline (the interval excludes 0)" if lo is not None and lo > 0
                   else "below the baseline (the interval excludes 0)" if hi is not None and hi < 0
                   else "not separated from the baseline (the interval includes 0): these scores "
                        "have not shown more than how much of each class a patient has")
        parts.append(
            f"<p>Against the model-free baseline <code>{esc(base['name'])}</code> (each training "
            "patient scored by its voxels of the query's class; LDS "
            f"{fmt((base.get('lds') or {}).get('mean'), 3)}): LDS difference, paired on the same "
            f"retrained models, {fmt(vb.get('mean'), 3)} {esc(_interval(vb.get('ci')))}, "
            f"{verdict}.</p>")
    else:
        parts.append("<p>No comparison with the model-free baseline (the evaluation ran "
                     "without it).</p>")
    lo = t.get("leave_out")
    if lo:
        cell = lambda d: Raw(esc(f"{fmt(d.get('mean'), 3)} {_interval(d.get('ci'))}"))  # noqa: E731

        def paired(d):
            if not d:
                return None
            text = f"{fmt(d.get('mean'), 3)} {_interval(d.get('ci'))}"
            if d.get("wins") is not None:
                text += f" ({d['wins']}/{d.get('n')} queries above 0)"
            return Raw(esc(text))

        rows = [(k, *(cell(r[s]) if s in r else None for s in ("proponents", "random",
                                                               "opponents")),
                 paired(r.get("proponents_minus_random")),
                 paired(r.get("proponents_minus_opponents"))) for k, r in lo.items()]
        parts += [f"<p>Leave-top-k-out on {fmt(t.get('leave_out_queries'))} queries: change of "
                  "the query's class loss after retraining without the k top proponents, k "
                  "random patients or the k top opponents (positive: the loss rose; proponents "
                  "should raise it most). Intervals: bootstrap over queries.</p>",
                  table(["k", "proponents", "random", "opponents", "proponents − random",
                         "proponents − opponents"], rows, left=1)]
    else:
        parts.append("<p>No leave-top-k-out for this folder in that evaluation.</p>")
    return "\n".join(parts)


_AXIS = {"axial": "z", "coronal": "y", "sagittal": "x"}  # the RAS axis each plane is fixed on
VOLUME_VIEW = ("Each volume is shown by three orthogonal planes through the centre of mass of "
               "its class region (a plane through it that would miss the region, as for a "
               "shell, is moved to the parallel plane holding the most of the region), one "
               "above the other, each labelled with its index: axial (the patient's left on "
               "the left of the image, anterior at the top), coronal (left on the left, "
               "superior at the top) and sagittal (posterior on the left, anterior on the "
               "right, superior at the top), as the arrays are stored (canonical RAS); every "
               "plane is marked with the letters of its sides (L/R, A/P, S/I). ")


def _local(m: dict) -> str:
    names = _names(m)
    loc = m["local"]
    if _volumes(m):
        unit = "patient" if loc["level"] == "patient" else "volume"
        intro = (f"<p>For each chosen test volume and class i: the top {loc['k']} proponent and "
                 f"opponent training {unit}s by T_ij ({loc['modality']} shown; each training "
                 "item shows its class-j region at full brightness, the rest of its volume "
                 "dimmed). One example is one patient's whole volume, so a patient's score is "
                 "its volume's. " + VOLUME_VIEW + "</p>")
    else:
        intro = (f"<p>For each chosen test slice and class i: the top {loc['k']} proponent and opponent "
                 f"training {loc['level']}s by T_ij ({loc['modality']} shown; each training item shows "
                 "its class-j region at full brightness, the rest of its slice dimmed). Slices are "
                 "shown in the neurological convention: the patient's left on the left of the image "
                 "(marked L/R), anterior at the top (A/P), as the arrays are stored (canonical RAS). "
                 + ("A patient's score is the sum over its slices; it is shown by its slice with the "
                    "largest |score|. " if loc["level"] == "patient" else "")
                 + "</p>")
    parts = ["<h2>1. Local explanations</h2>", intro,
             table(["class", "chosen items skipped (class absent)", "test items never ranked (class absent)"],
                   [(_cls(c), loc["skipped_absent"][c], loc["not_ranked_absent"][c]) for c in names])]
    for c in names:
        items = [it for it in loc["items"] if it["test_class"] == c]
        if not items:
            continue
        parts.append(f"<h3>Test class {esc(c)}</h3>")
        for it in items:
            rows = []
            for r, (p, o) in enumerate(zip_longest(it["proponents"], it["opponents"], fillvalue={}),
                                       start=1):
                if _volumes(m):
                    rows.append((r, p.get("patient", "–"), p.get("score", ""),
                                 o.get("patient", "–"), o.get("score", "")))
                else:
                    rows.append((r, p.get("patient", "–"), p.get("slice", ""), p.get("score", ""),
                                 o.get("patient", "–"), o.get("slice", ""), o.get("score", "")))
            if _volumes(m):
                planes = it.get("planes") or {}
                where = ", ".join(f"{k} {_AXIS.get(k, '')}={v}" for k, v in planes.items())
                parts.append(f"<p><b>{esc(it['test_id'])}</b>, class {esc(c)} "
                             f"({it['class_area']} voxels; planes {esc(where)}), "
                             f"training class {esc(it['train_class'])}</p>")
            else:
                parts.append(f"<p><b>{esc(it['test_id'])}</b>, class {esc(c)} ({it['class_area']} pixels), "
                             f"training class {esc(it['train_class'])}</p>")
            parts.append(figure(it["figure"], f"local explanation {it['test_id']} {c}"))
            parts.append(table(["rank", "proponent", "score", "opponent", "score"], rows, left=2)
                         if _volumes(m) else
                         table(["rank", "proponent", "slice", "score", "opponent", "slice", "score"],
                               rows, left=3))
    return "\n".join(parts)


def _global(m: dict) -> str:
    names = _names(m)
    g = m["global"]
    mat = g["class_matrix"]
    rows = [(_cls(names[i]), g["n_items"][names[i]], *mat[i]) for i in range(len(names))]
    dom = []
    for c in names:
        d = g["dominating_patients"][c]
        fmt_list = lambda xs: ", ".join(f"{x['patient']} ({x['count']})" for x in xs) or "none"  # noqa: E731
        dom.append((_cls(c), fmt_list(d["proponents"]), fmt_list(d["opponents"])))
    dist = [(k.replace("<-", " ← "), v.get("n"), v.get("mean"), v.get("median"), v.get("std"),
             v.get("fraction_positive")) for k, v in g["score_distribution"].items()]
    ex = "volume" if _volumes(m) else "slice"
    parts = [
        "<h2>2. Global explanations</h2>",
        "<h3>Class × class matrix</h3>",
        ("<p>M[i, j] = mean over test items with class i present of the mean over training volumes "
         "(one per patient) of T_ij.</p>" if _volumes(m) else
         "<p>M[i, j] = mean over test items with class i present of the mean over training slices of "
         "T_ij (computed from the patient scores: their sum over patients equals the sum over slices).</p>"),
        table(["test class i", "items", *[f"← {c}" for c in names]], rows, left=1),
        figure(g["figures"]["class_matrix"], "class matrix"),
        f"<h3>Patients that dominate the rankings (top {g['topk']}, j = i)</h3>",
        table(["class", "most frequent proponents (count)", "most frequent opponents (count)"], dom, left=3),
        figure(g["figures"]["topk_frequency"], "top-k frequency"),
        "<h3>Score distributions (patient level)</h3>",
        table(["test class ← training class", "n", "mean", "median", "std", "fraction > 0"], dist),
        figure(g["figures"]["score_distributions"], "score distributions"),
    ]
    if "self_influence_top" in g:
        top = g["self_influence_top"]
        rows = [(_cls(c), ", ".join(f"{e['slice']} ({fmt(e['value'], 3)})" for e in top[c]))
                for c in names]
        parts += [f"<h3>Highest self-influence (training {ex}s)</h3>",
                  table(["class", f"{ex}s (self-influence)"], rows, left=2)]
    return "\n".join(parts)


def _faithfulness(m: dict) -> str:
    names = _names(m)
    f = m["faithfulness"]
    kind = f["similarity"]
    rows = []
    for k, v in f["metrics"].items():
        for c in names:
            e = v["per_class"][c]
            gt, sp = e["gap_test"], e["spearman_abs_score_vs_S"]
            rows.append((k + (" (figures)" if k == kind else ""), _cls(c), sp["rho"], sp["p_value"],
                         sp["n_pairs"], gt.get("proponents"), gt.get("middle"), gt.get("opponents"),
                         gt.get("gap"), gt.get("p_value")))
        sp = v["spearman_pooled"]
        rows.append((k, "all classes", sp["rho"], sp["p_value"], sp["n_pairs"], None, None, None, None, None))
    n = m["selection"]["rule"]["n_window"]
    vol = _volumes(m)
    return "\n".join([
        "<h2>3. Faithfulness</h2>",
        (f"<p>Last hidden layer feature maps (what the {'1×1×1' if vol else '1×1'} head sees), "
         "masked by each item's ground-truth region of the class. For test class i, training "
         "patients are ranked by T_ii (rank 1 = strongest proponent) and represented by "
         f"{'their volume' if vol else 'one slice'}. ") +
        "S_k: <code>cosine</code> = cosine similarity of the two masked maps of filter k; "
        "<code>max_ratio</code> = 1 − |a − b| / max(|a|, |b|) and <code>max_product</code> = "
        "2ab / (a² + b²), with a, b the maxima of the masked maps. Undefined pairs (empty region, "
        "silent filter) are left out. FI_k,i(r) = mean over test items of S_k with the r-th ranked "
        f"patient. The cosine compares the maps {'voxel by voxel' if vol else 'pixel by pixel'} "
        "on the common grid, so it is 0 when "
        "the two regions do not overlap: it mixes the position of the regions with what the filters "
        "respond to. The max variants do not depend on position.</p>",
        f"<p>Only patients with a class-i region in {'their volume' if vol else 'some slice'} "
        "are ranked (" +
        ", ".join(f"{c}: {f['ranked_patients'][c]}" for c in names) + " patients); for the "
        "others every class-i gradient is zero, so their score is exactly 0.</p>",
        f"<p>Windows of N ranks (N = {', '.join(str(x) for x in n)} for "
        f"{', '.join(names)}): proponents = ranks 1..N, opponents = the last N, middle = the N "
        "central ranks. Gap = mean S over both extreme windows − mean S over the middle (S averaged "
        "over filters). p: one-sided permutation test, each test item's ranking shuffled "
        "independently. Spearman: |patient score| against S (mean over filters) over all "
        "(test item, patient) pairs; its p-value treats pairs as independent, which they are not "
        "(pairs share test items), so read it as indicative.</p>",
        table(["similarity", "class", "Spearman rho", "p", "pairs", "S proponents", "S middle",
               "S opponents", "gap", "permutation p"], rows, left=2),
        figure(f["figures"]["fi_curves"], "FI curves"),
        figure(f["figures"]["similarity_vs_score"], "similarity against score"),
    ])


def _selection(m: dict) -> str:
    names = _names(m)
    s = m["selection"]
    r = s["rule"]
    sel_rows = [(_cls(c), s["per_class"][c]["n_selected"], s["n_filters"],
                 ", ".join(str(x) for x in s["per_class"][c]["selected"]) or "none")
                for c in names]
    base_rows = [(split, *[s["baseline_dice"][split]["baseline"][c] for c in names])
                 for split in s["baseline_dice"]]
    single_rows, group_rows, lines = [], [], []
    for split in s["group_dice_drop"]:
        for ci, c in enumerate(names):
            cmp = s["single_filter_comparison"][split][c]
            single_rows.append((split, _cls(c), cmp["selected_mean"], cmp["other_mean"],
                                cmp["difference"], cmp["p_value"]))
            v = s["verdict"][split][c]
            if v["size"] == 0:
                group_rows.append((split, _cls(c), 0, None, None, None, None, "no filters selected"))
                continue
            group_rows.append((split, _cls(c), v["size"], v["selected_drop"], v["random_mean"],
                               v["random_std"], v["least_drop"],
                               "yes" if v["selected_beats_random"] else "no"))
            lines.append(f"{split}, {c}: zeroing the {v['size']} selected filters lowers Dice by "
                         f"{fmt(v['selected_drop'], 3)} vs {fmt(v['random_mean'], 3)} ± "
                         f"{fmt(v['random_std'], 3)} for random sets of the same size "
                         f"({'more' if v['selected_beats_random'] else 'not more'}; "
                         f"{fmt(100 * v['fraction_random_below_selected'], 3)}% of random sets "
                         f"below) and {fmt(v['least_drop'], 3)} for the least important.")
    verdicts = [s["verdict"][split][c] for split in s["verdict"] for c in names]
    n_all = sum(1 for v in verdicts if v["size"])
    n_yes = sum(1 for v in verdicts if v.get("selected_beats_random"))
    n_every = sum(1 for v in verdicts if v.get("selected_beats_every_random"))
    summary = (f"Zeroing the selected filters costs more Dice than the mean of random sets of the "
               f"same size in {n_yes} of {n_all} (split, class) cases with a selection, and more than "
               f"every random set in {n_every} of {n_all}." if n_all else
               "No filter was selected for any class, so there is no group comparison.")
    return "\n".join([
        "<h2>4. Feature selection and ablation</h2>",
        f"<p><b>Rule.</b> For class i and filter k, gap_k = mean FI_k,i over the 2N extreme ranks − "
        f"mean over the N middle ranks. Its null distribution comes from {r['n_permutations']} "
        f"shuffles of the rank positions of the FI curve (seed {r['seed']}). A filter is selected "
        f"when z_k ≥ {fmt(r['z_min'])} and the one-sided permutation p_k ≤ {fmt(r['alpha'])}. "
        "Filter importance in the histograms: |gap_k| (selected filters have larger gaps by "
        "construction, so the histogram describes the selection rather than testing it; the "
        "ablation below is the test). There is no correction for testing every filter: with no "
        f"relation at all, about {fmt(r['expected_by_chance'], 2)} of the {s['n_filters']} "
        "filters per class would pass by chance.</p>",
        table(["class", "selected", "of", "filters"], sel_rows, left=1),
        "<p><b>Ablation.</b> One filter (or a set) of the last hidden layer is zeroed and the head "
        "re-applied (logits = features · W + b); hard Dice over the whole split, drop = full model − "
        "ablated (positive = the filters mattered).</p>",
        table(["split", *names], base_rows),
        f'<p class="verdict">{esc(summary)}<br>' + "<br>".join(esc(x) for x in lines) + "</p>",
        table(["split", "class", "filters", "drop: selected", "random mean", "random std",
               "least important", "selected > random mean"], group_rows, left=2),
        "<p>Single-filter ablation: mean Dice drop of selected vs other filters (one-sided "
        "label-shuffle p).</p>",
        table(["split", "class", "selected mean drop", "other mean drop", "difference", "p"],
              single_rows, left=2),
        figure(s["figures"]["ablation_per_filter"], "per-filter ablation"),
        figure(s["figures"]["importance_histograms"], "log FI histograms"),
        figure(s["figures"]["group_ablation"], "group ablation"),
    ])


def render(metrics: dict) -> str:
    """index.html of the report."""
    return page("Class-wise TracIn explanations",
                [_header(metrics), _trust(metrics), _local(metrics), _global(metrics), _faithfulness(metrics),
                 _selection(metrics),
                 '<p class="note">All numbers: metrics.json in this folder.</p>'])
