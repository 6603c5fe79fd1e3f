"""The evaluation's outputs: ``evaluation.json``, ``evaluation.md`` (the summary table and a
per-class / per-k table with intervals) and figures.

Every file is written to a temporary name and renamed, so an interrupted run leaves either the
previous complete outputs or none.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from tracin_jax.atomic import StagedFiles, writing
from tracin_jax.evaluate.leave_out import SIDES
from tracin_jax.task import BRATS_CLASSES as CLASS_NAMES


def class_names(result: dict) -> list[str]:
    """The C class names of an evaluation (its ``class_names``, the run's task's; results
    written before they were recorded: the per-class keys of the first variant's LDS, else the
    BraTS classes)."""
    if result.get("class_names"):
        return list(result["class_names"])
    for v in (result.get("variants") or {}).values():
        per_class = (v.get("lds") or {}).get("per_class")
        if per_class:
            return list(per_class)
    return list(CLASS_NAMES)


def example_unit(task: dict | None) -> str:
    """What one example of the run is: ``volume`` for a 3D task (``dims`` 3), else ``slice``."""
    return "volume" if int((task or {}).get("dims", 2) or 2) == 3 else "slice"


def _f(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    return f"{x:+.{digits}f}"


def _ci(ci, digits: int = 2) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return ""
    return f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


def verdict(result: dict) -> str:
    """One sentence naming the attribution with the highest LDS and whether its paired
    interval against every other attribution excludes zero."""
    variants = result["variants"]
    scored = [(v["lds"]["mean"], name) for name, v in variants.items() if v["lds"]["mean"] is not None]
    if not scored:
        return "No attribution could be scored (no targets)."
    best_val, best = max(scored)
    if len(variants) == 1:
        return f"One variant scored: `{best}`, LDS {best_val:+.2f}."
    beaten, tied = [], []
    for name, v in variants.items():
        if name == best:
            continue
        # vs_best is LDS(name) - LDS(best): separated when its whole interval is below 0.
        hi = ((v.get("vs_best") or {}).get("ci") or [None, None])[1]
        (beaten if hi is not None and hi < 0 else tied).append(name)
    text = f"Highest LDS: `{best}` ({best_val:+.2f})"
    if not tied:
        return text + ", separated from every other variant (paired 95% intervals exclude 0)."
    if not beaten:
        return text + ", but not separated from any other variant (every paired 95% interval " \
                      "includes 0): with this ground truth the variants cannot be told apart."
    return text + f"; separated from {', '.join(f'`{n}`' for n in beaten)}, not from " \
                  f"{', '.join(f'`{n}`' for n in tied)} (paired 95% intervals)."


def _rows(result: dict) -> dict:
    """The variants, then the attribution-free baselines: every row of the tables and figures."""
    return {**result["variants"], **(result.get("baselines") or {})}


def _leave_out_at(variant: dict, k) -> dict | None:
    """A variant's leave-out entry for k (keyed by str(k) in json, by int in memory)."""
    lo = variant.get("leave_out", {})
    return lo.get(str(k)) or lo.get(k)


def _paired_cell(d: dict | None) -> str:
    """'+0.016 [-0.008, +0.046] (12/16, p=0.033)' for a paired leave-out difference."""
    if not d:
        return ""
    cell = f"{_f(d['mean'], 3)} {_ci(d.get('ci'), 3)}".strip()
    if d.get("wins") is not None:
        p = d.get("wilcoxon_p")
        cell += f" ({d['wins']}/{d['n']}" + (f", p={p:.2g})" if p is not None else ")")
    return cell


def _detail_table(result: dict, ks) -> list[str]:
    """Per-class LDS with its 95% interval, and the leave-out changes with intervals over
    queries for every k (the main table keeps the means and the largest k)."""
    has_base = bool(result.get("baselines"))
    names = class_names(result)
    head = ["variant", *(f"{c} [95% CI]" for c in names)]
    if has_base:
        head += ["Spearman with the baseline"]
    for k in ks:
        head += [f"remove top-{k}: {side} [95% CI]" for side in ("prop.", "random", "opp.")]
        head += [f"top-{k}: prop. - {o}, paired [95% CI] (wins, Wilcoxon p)"
                 for o in ("random", "opp.")]
    lines = ["Per class and per k, with intervals (LDS: bootstrap over subsets; leave-out: "
             "bootstrap over queries):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, v in _rows(result).items():
        pc = v["lds"]["per_class"]
        row = [f"`{name}`", *(f"{_f(pc[c]['mean'])} {_ci(pc[c]['ci'])}".strip()
                              for c in names)]
        if has_base:
            row.append(_f(v.get("baseline_rho")))
        for k in ks:
            lo = _leave_out_at(v, k)
            row += [f"{_f(lo[s]['mean'], 3)} {_ci(lo[s].get('ci'), 3)}".strip()
                    if lo and s in lo else "" for s in SIDES]
            row += [_paired_cell(lo.get(s)) if lo else ""
                    for s in ("proponents_minus_random", "proponents_minus_opponents")]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def markdown(result: dict) -> str:
    """The table a person reads, with the settings it depends on."""
    gt = result["ground_truth"]
    ks = result.get("leave_out", {}).get("k", [])
    kmax = max(ks) if ks else None
    names = class_names(result)
    task = result.get("task") or {}
    item = example_unit(task)
    lines = [
        "# Evaluation: class-wise LDS, leave-top-k-out, sanity checks", "",
        f"Run `{result['workdir']}`: {gt['patients']} training patients, {gt['n_test']} test "
        f"{item}s, {gt['targets']} ({item}, class) targets. Ground truth: {gt['subsets']} subsets of "
        f"{gt['fraction']:.0%} of the patients x {gt['seeds']} training seed(s), seed {gt['seed']}.",
        "",
        (f"Task {task.get('name', '?')}: " if task else "Classes: ")
        + f"{len(names)} classes, " + ", ".join(names) + ".",
        "",
    ]
    ceil = gt.get("noise_ceiling") or {}
    if any(v is not None for v in ceil.values()):
        lines.append("Noise ceiling (mean of R-1 seeds predicting the held-out seed): "
                     + ", ".join(f"{loss} loss {_f(v['mean'])}" for loss, v in ceil.items() if v)
                     + ".")
    else:
        lines.append("Noise ceiling: needs --seeds 2 or more (not measured).")
    lines += ["", verdict(result), ""]
    has_base = bool(result.get("baselines"))
    head = ["variant", "gradient", "LDS [95% CI]", *names, "LDS - best [95% CI]"]
    if has_base:
        head += ["LDS - baseline [95% CI]"]
    if kmax:
        head += [f"remove top-{kmax}: prop. / random / opp."]
    head += ["randomisation rho", "mislabel AUC"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, v in _rows(result).items():
        l = v["lds"]
        row = [f"`{name}`", v["gradient"], f"{_f(l['mean'])} {_ci(l['ci'])}",
               *(_f(l["per_class"][c]["mean"]) for c in names),
               (f"{_f(v['vs_best']['mean'])} {_ci(v['vs_best']['ci'])}" if v.get("vs_best")
                else "best")]
        if has_base:
            vb = v.get("vs_baseline")
            row.append(f"{_f(vb['mean'])} {_ci(vb['ci'])}".strip() if vb else "")
        if kmax:
            lo = _leave_out_at(v, kmax)
            row.append(" / ".join(_f(lo[s]["mean"], 3) for s in ("proponents", "random", "opponents"))
                       if lo else "")
        rnd = v.get("randomisation")
        rnd_cell = (f"skipped: {rnd['skipped']}" if rnd and rnd.get("skipped")
                    else _f(rnd["mean"]) if rnd else "")
        row += [rnd_cell, f"{v['mislabel_auc']:.2f}"
                if v.get("mislabel_auc") is not None else ""]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", *_detail_table(result, ks)]
    lines += [
        "",
        "LDS: mean over targets of the Spearman correlation, over the retrained subsets, between "
        "the loss the scores predict and the loss measured (each variant against the loss it "
        "differentiates); intervals: percentile bootstrap over subsets. LDS - best: paired "
        "difference with the highest-LDS variant on the same subsets.",
    ]
    if has_base:
        lines.append(
            "`baseline-class-voxels` uses no model: each training patient scores its voxels of "
            f"the query's class, for every test {item} (scored on the Dice loss). LDS - baseline: "
            "a variant's paired difference with it on the variant's own loss; a variant whose "
            "interval includes 0 has not shown more than how much of each class a patient has. "
            "Spearman with the baseline: mean over targets of the rank correlation over patients "
            "between the variant's scores and the baseline's.")
    if kmax:
        lo = result["leave_out"]
        lines.append(
            f"Leave-top-k-out: mean change of the query's class loss after retraining without "
            f"its top-{kmax} proponent patients / {kmax} random patients / top-{kmax} opponents "
            f"({lo['queries_n']} queries, seed {lo['seed']}; positive = loss rises; "
            + ("every model trained as many steps as on all patients"
               if lo.get("steps") == "matched" else "every model trained the run's epochs")
            + "). A faithful attribution: proponents > random > opponents.")
    lines.append("Randomisation rho: mean Spearman over patients between the scores of the trained "
                 "checkpoints and of re-initialised weights (low is good).")
    lines.append(f"Mislabel AUC: {item} ROC-AUC of class-wise self-influence for corrupted labels, "
                 "from `experiments.mislabel` (blank: not given or not computed there).")
    return "\n".join(lines) + "\n"


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with writing(tmp, path):
        tmp.write_text(text)
        os.replace(tmp, path)


def _save_fig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.stem + ".tmp.png")
    try:
        with writing(tmp, path):
            fig.tight_layout()
            fig.savefig(tmp, dpi=110)
            os.replace(tmp, path)
    finally:
        plt.close(fig)


def plot_lds(result: dict, path: Path) -> None:
    """LDS per variant with its 95% interval, per class beside overall; noise ceiling dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tracin_jax.explain.figures import class_colors

    rows = _rows(result)
    names = list(rows)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(names) + 2), 3.4))
    names_c = class_names(result)
    groups = ("overall", *names_c)
    colours = ["black", *class_colors(names_c)]  # the report's class colours
    width = 0.8 / len(groups)
    for g, group in enumerate(groups):
        labelled = False  # the group's first point carries its legend entry
        for n, name in enumerate(names):
            l = rows[name]["lds"]
            entry = l if group == "overall" else l["per_class"][group]
            if entry["mean"] is None:
                continue
            x = n + (g - (len(groups) - 1) / 2) * width
            ci = entry.get("ci") or [None, None]
            err = None
            if ci[0] is not None:
                err = [[entry["mean"] - ci[0]], [ci[1] - entry["mean"]]]
            ax.errorbar(x, entry["mean"], yerr=err, fmt="o", color=colours[g], capsize=2,
                        label=None if labelled else group)
            labelled = True
    for loss, c in (result["ground_truth"].get("noise_ceiling") or {}).items():
        if c and c["mean"] is not None:
            ax.axhline(c["mean"], ls="--", color="grey", lw=0.8)
            ax.text(len(names) - 0.5, c["mean"], f"noise ceiling ({loss})", fontsize=7,
                    ha="right", va="bottom", color="grey")
    for bname, b in (result.get("baselines") or {}).items():  # what a model-free score gets
        if b["lds"]["mean"] is not None:
            ax.axhline(b["lds"]["mean"], ls=":", color="black", lw=0.8)
            ax.text(-0.5, b["lds"]["mean"], f"{bname} (overall)", fontsize=7, ha="left",
                    va="bottom")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("class-wise LDS (Spearman)")
    ax.set_title("Linear datamodeling score, 95% bootstrap intervals over subsets", fontsize=9)
    ax.legend(fontsize=7, ncol=min(len(groups), 4))
    _save_fig(fig, path)


def plot_leave_out(result: dict, path: Path) -> None:
    """Mean loss change after removing top-k proponents / k random / top-k opponents vs k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(result)
    names = [n for n, v in rows.items() if v.get("leave_out")]
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names) + 0.5, 2.8),
                             sharey=True, squeeze=False)
    colours = {"proponents": "#D55E00", "random": "#777777", "opponents": "#0072B2"}
    for ax, name in zip(axes[0], names):
        lo = rows[name]["leave_out"]
        ks = sorted(int(k) for k in lo)
        for side, colour in colours.items():
            m = [lo[str(k)][side]["mean"] for k in ks]
            ci = [lo[str(k)][side]["ci"] for k in ks]
            err = [[(mm - c[0]) if c[0] is not None and mm is not None else 0 for mm, c in zip(m, ci)],
                   [(c[1] - mm) if c[1] is not None and mm is not None else 0 for mm, c in zip(m, ci)]]
            ax.errorbar(ks, [mm if mm is not None else float("nan") for mm in m], yerr=err,
                        marker="o", color=colour, capsize=2, label=side)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(ks)
        ax.set_xlabel("k patients removed")
        ax.set_title(name, fontsize=8)
    axes[0][0].set_ylabel("change of the query's class loss")
    axes[0][0].legend(fontsize=7)
    _save_fig(fig, path)


def write_outputs(result: dict, out: Path) -> None:
    """evaluation.json, evaluation.md, lds.png and (with leave-out) leave_out.png; json last."""
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staged = StagedFiles(out)  # nothing is replaced until every file is written
    try:
        plot_lds(result, staged.path("lds.png"))
        staged.adopt("lds.png")
        plot_leave_out(result, staged.path("leave_out.png"))
        if staged.path("leave_out.png").exists():
            staged.adopt("leave_out.png")
        _write_text_atomic(staged.path("evaluation.md"), markdown(result))
        staged.adopt("evaluation.md")
        staged.json("evaluation.json", result, indent=1)
    except BaseException:
        staged.discard()
        if created:
            try:
                out.rmdir()  # only if this run left it empty
            except OSError:
                pass
        raise
    staged.commit(first=("evaluation.json",), remove=("leave_out.png",), last="evaluation.json")
