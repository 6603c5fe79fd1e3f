"""Class-wise TracIn, faithfulness and filter selection on each architecture, side by side.

Run (from the repository root)::

    python -m experiments.architectures                       # demo size, synthetic -> runs/architectures/
    python -m experiments.architectures --archs deepseg,resunet,attention_unet   # the journal's three
    python -m experiments.architectures --lds-subsets 16      # also the LDS of each (retrains 16 models each)
    python -m experiments.architectures --data PATH/TO/BraTS2019 --config paper \\
        --checkpoints 6,8,10,12,14                            # paper size (GPU)

Paper size (``--config paper``: 192 x 192 crops of slices 90..99 of the 259 BraTS 2019 HGG
cases, width 64, 30 epochs; 31-33M parameters per architecture, see
:mod:`tracin_jax.models.registry`) needs an accelerator: on the project's 2-core CPU one demo
epoch of the width-8 U-Net already takes several seconds, and the paper model has 64x its
parameters on 4x its pixels. Demo size (the default: the ``demo`` config, 96 x 96 slices, width
8, 6 epochs, on 16 synthetic cases) runs on CPU; its time here is in experiments/README.md.

Every architecture is trained from the same config (only ``model.arch`` differs), on the same
data and split, with the same seed. For each: class-wise TracIn of the ``head`` subset (the
final 1x1 kernel, exact, over ``--checkpoints``), then the report of :mod:`tracin_jax.explain`
(faithfulness FI curves of the last hidden layer, filter selection, ablation). Then:

- ``panel.png``: rows architectures, columns tumour classes; histograms of log|FI| of the
  selected and of the other filters, where a filter's |FI| is the report's importance |gap_k|
  (mean FI over the extreme ranks minus the middle ranks, ``tracin_jax.explain.selection``),
  with the difference of the two means of log|FI| in each title: the journal's figure;
- ``summary.md`` / ``results.json``: per architecture and class, test hard Dice (the last
  checkpoint), the number of selected filters of ``width``, the test Dice drop when the selected
  filters are zeroed against the mean drop for random sets of the same size, and with
  ``--lds-subsets M`` the class-wise LDS of the influence scores against M retrained subset
  models (:func:`tracin_jax.evaluate.run_evaluate`, no leave-out);
- per architecture, its run, influence folder and HTML report in ``<out>/<arch>/``.

A rerun resumes: finished trainings and feature stores are reused.

What it should show: that the pipeline is architecture-agnostic (one code path, no branch on the
architecture), and whether the selected filters matter more (larger log|FI|, larger Dice drop
than random sets) on every architecture, as the journal version reports. At demo size the
models are small and short-trained, so the numbers are a smoke test of the comparison, not a
reproduction (measured numbers in experiments/README.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from experiments._plots import pyplot, save

ARCHS = ("unet", "deepseg", "resunet", "attention_unet")
LABELS = {"unet": "U-Net", "deepseg": "DeepSeg", "resunet": "ResUNet",
          "attention_unet": "Attention U-Net"}


def log_abs(x: np.ndarray) -> np.ndarray:
    """f64[F] natural log of |x|; NaN where x is 0 or undefined."""
    a = np.abs(np.asarray(x, np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(a > 0, np.log(np.where(a > 0, a, 1.0)), np.nan)


def selected_vs_other(gap: np.ndarray, selected: np.ndarray) -> dict:
    """Mean log|FI| of the selected filters and of the others, and their difference (nats).

    gap f64[F] (the report's per-filter gap), selected bool[F]; NaN where a group is empty.
    """
    lg = log_abs(gap)
    sel = np.asarray(selected, bool)
    ok = np.isfinite(lg)
    a = lg[sel & ok]
    b = lg[~sel & ok]
    ma = float(np.mean(a)) if a.size else float("nan")
    mb = float(np.mean(b)) if b.size else float("nan")
    return {"selected_mean_log_fi": ma, "other_mean_log_fi": mb, "difference": ma - mb,
            "n_selected": int(sel.sum()), "n_filters": int(sel.size)}


def architecture_row(metrics: dict) -> dict:
    """Per class: Dice, selection and ablation numbers of one architecture's report metrics."""
    sel = metrics["selection"]
    names = metrics["influence"]["class_names"]
    dice = sel["baseline_dice"]["test"]["baseline"]
    out = {}
    for c, name in enumerate(names):
        pc = sel["per_class"][name]
        g = sel["group_dice_drop"]["test"][c]
        rnd = np.asarray(g["random"], float)
        row = selected_vs_other(np.asarray(pc["gap"], float),
                                np.isin(np.arange(sel["n_filters"]), pc["selected"]))
        row.update({"test_dice": dice[name], "selected_drop": g["selected"] if g["size"] else None,
                    "random_drop_mean": float(np.nanmean(rnd)) if rnd.size else None,
                    "random_drop_std": float(np.nanstd(rnd)) if rnd.size else None})
        out[name] = row
    return out


def lds_entry(evaluation: dict, names) -> tuple[dict, dict]:
    """({class: mean LDS or None}, the overall {"mean", "ci"}) of the one influence folder of an
    ``evaluation.json`` dict (:func:`tracin_jax.evaluate.api.run_evaluate`)."""
    (variant,) = evaluation["variants"].values()
    lds = variant["lds"]
    per_class = {n: lds["per_class"].get(n, {}).get("mean") for n in names}
    return per_class, {"mean": lds["mean"], "ci": lds["ci"],
                       "subsets": evaluation["ground_truth"]["subsets"]}


def plot_panel(per_arch: dict, path: Path) -> None:
    """Rows architectures, columns classes: histograms of log|FI| of selected vs other filters."""
    plt = pyplot()
    archs = list(per_arch)
    names = list(next(iter(per_arch.values()))["classes"])
    fig, axes = plt.subplots(len(archs), len(names), figsize=(3.3 * len(names), 2.3 * len(archs)),
                             squeeze=False)
    for r, arch in enumerate(archs):
        for c, name in enumerate(names):
            ax = axes[r, c]
            gap = np.asarray(per_arch[arch]["gap"][name], float)
            sel = np.asarray(per_arch[arch]["selected"][name], bool)
            lg = log_abs(gap)
            ok = np.isfinite(lg)
            bins = np.linspace(np.nanmin(lg), np.nanmax(lg), 13) if ok.any() else 10
            ax.hist(lg[ok & ~sel], bins=bins, color="#999999", alpha=0.7, label="other filters")
            ax.hist(lg[ok & sel], bins=bins, color="#D55E00", alpha=0.8, label="selected")
            d = per_arch[arch]["classes"][name]["difference"]
            n = per_arch[arch]["classes"][name]["n_selected"]
            ax.set_title(f"{LABELS.get(arch, arch)}, {name}: {n} selected"
                         + (f", Δ {d:+.2f} nats" if np.isfinite(d) else ""))
            if r == len(archs) - 1:
                ax.set_xlabel("log |FI| (filter importance)")
            if c == 0:
                ax.set_ylabel("filters")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, frameon=False)
    save(fig, path, rect=(0, 0.04, 1, 1))


def overall_lds_lines(per_arch: dict) -> str:
    """Markdown lines: each architecture's overall class-wise LDS with its 95% interval (empty
    without ``--lds-subsets``)."""
    lines = []
    for arch, a in per_arch.items():
        o = a.get("lds_all")
        if o and o["mean"] is not None:
            lo, hi = o["ci"]
            lines.append(f"- {LABELS.get(arch, arch)}: LDS {o['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}] "
                         f"against {o['subsets']} retrained subset models")
    return ("\n\nClass-wise LDS over all (test slice, class) targets:\n\n" + "\n".join(lines)
            if lines else "")


def summary_table(per_arch: dict) -> str:
    """Markdown: one row per architecture and class."""
    lines = ["| architecture | parameters | class | test Dice | selected / filters | "
             "mean log\\|FI\\| selected − other (nats) | Dice drop, selected | Dice drop, random (mean ± sd) | LDS |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def f(v, d=3):
        return "–" if v is None or not np.isfinite(v) else f"{v:.{d}f}"

    for arch, a in per_arch.items():
        for name, row in a["classes"].items():
            lds = a.get("lds", {}).get(name)
            rnd = ("–" if row["random_drop_mean"] is None
                   else f"{f(row['random_drop_mean'])} ± {f(row['random_drop_std'])}")
            lines.append(f"| {LABELS.get(arch, arch)} | {a['parameters']:,} | {name} | "
                         f"{f(row['test_dice'], 2)} | {row['n_selected']} / {row['n_filters']} | "
                         f"{f(row['difference'], 2)} | {f(row['selected_drop'])} | {rnd} | {f(lds, 2)} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.architectures",
                                description="Class-wise TracIn and filter selection per architecture.")
    p.add_argument("--out", default="runs/architectures", help="output folder")
    p.add_argument("--data", default=None, help="a BraTS dataset (default: synthetic)")
    p.add_argument("--cases", type=int, default=16, help="synthetic cases")
    p.add_argument("--synth-seed", type=int, default=0)
    p.add_argument("--config", default="demo", help="paper | demo | tiny")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--archs", default=",".join(ARCHS), help="architectures, comma-separated")
    p.add_argument("--params", default="head", help="parameter subset of the influence")
    p.add_argument("--checkpoints", default="all", help="epochs for TracIn (all | E1,E2,...)")
    p.add_argument("--n-permutations", type=int, default=1000)
    p.add_argument("--random-seeds", type=int, default=5, help="random filter sets per class")
    p.add_argument("--lds-subsets", type=int, default=0,
                   help="M retrained subset models per architecture for the LDS (0: skip)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def run(args) -> dict:
    import tracin_jax
    from tracin_jax.config import apply_overrides, get_config
    from tracin_jax.data import write_synthetic_dataset
    from tracin_jax.errors import InputError
    from tracin_jax.explain import run_explain
    from tracin_jax.explain.report import jsonable
    from tracin_jax.influence import run_influence
    from tracin_jax.models import count_params, known_architectures
    from tracin_jax.training.train import train_and_evaluate

    progress = not args.no_progress
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    for a in archs:
        if a not in known_architectures():
            raise InputError(f"--archs: {a!r} is not one of {', '.join(known_architectures())}")
    base = apply_overrides(get_config(args.config), list(args.set or []))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.data is None:
        data_dir = out / "data"
        if not (data_dir / ".complete").exists():
            write_synthetic_dataset(data_dir, cases=args.cases, seed=args.synth_seed, progress=progress)
            (data_dir / ".complete").write_text("")
    else:
        data_dir = Path(args.data)
    per_arch, timings = {}, {}
    for arch in archs:
        config = apply_overrides(base, [f"model.arch={arch}"])
        folder = out / arch
        t0 = time.perf_counter()
        train_and_evaluate(config, data_dir, folder / "run", progress=progress,
                           log=lambda s: print(f"[{arch}] {s}", file=sys.stderr))
        t1 = time.perf_counter()
        run_influence(folder / "run", folder / "influence", params=args.params,
                      checkpoints=args.checkpoints, progress=progress)
        t2 = time.perf_counter()
        metrics = run_explain(folder / "run", folder / "influence", folder / "report",
                              n_permutations=args.n_permutations, random_seeds=args.random_seeds,
                              progress=progress)
        t3 = time.perf_counter()
        run_ = tracin_jax.load_run(folder / "run")
        shapes = run_.variable_shapes
        sel = metrics["selection"]
        names = metrics["influence"]["class_names"]
        entry = {"parameters": count_params(shapes["params"]), "classes": architecture_row(metrics),
                 "gap": {n: np.asarray(sel["per_class"][n]["gap"], float) for n in names},
                 "selected": {n: np.isin(np.arange(sel["n_filters"]),
                                         sel["per_class"][n]["selected"]).tolist() for n in names}}
        if args.lds_subsets:
            from tracin_jax.evaluate.api import run_evaluate

            ev = run_evaluate(folder / "run", [folder / "influence"], folder / "evaluation",
                              subsets=args.lds_subsets, leave_out_queries=0, randomisation=False,
                              progress=progress, log=lambda s: print(f"[{arch}] {s}", file=sys.stderr))
            entry["lds"], entry["lds_all"] = lds_entry(ev, names)
        timings[arch] = {"train_s": round(t1 - t0, 1), "influence_s": round(t2 - t1, 1),
                         "report_s": round(t3 - t2, 1), "lds_s": round(time.perf_counter() - t3, 1)}
        per_arch[arch] = entry
    plot_panel(per_arch, out / "panel.png")
    results = {"config": base.to_dict(), "archs": archs, "per_arch": per_arch, "timings": timings,
               "params": args.params, "checkpoints": args.checkpoints}
    (out / "results.json").write_text(json.dumps(jsonable(results), indent=1))
    table = summary_table(per_arch) + overall_lds_lines(per_arch)
    (out / "summary.md").write_text("# Architectures\n\n" + table + "\n\nTimings (s): "
                                    + json.dumps(timings) + "\n")
    print(table)
    return results


def main(argv=None) -> int:
    from experiments._cli import run_main

    return run_main("experiments.architectures", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
