"""Consistency of class-wise TracIn on a small real run: projection, checkpoints, subsets, identities.

Run (from the repository root)::

    python -m experiments.consistency                  # synthetic default -> runs/consistency/
    python -m experiments.consistency --dims 64,256,1024,4096,16384 --seeds 5   # fuller sweep
    python -m experiments.consistency --workdir runs/demo   # examine an existing (small) run

Time here (2 shared CPU cores): about 4 minutes (data and training 30 s, exact full-model
gradients 1 min, projection sweep 1.5 min, engine and independent checks 1 min).

The run: 20 synthetic cases (16 training patients, 96 slices; 4 test patients, 24 slices) at
the demo's 96 x 96, the ``demo`` config with a U-Net of width 4 and depth 3 (30,592
parameters), so that full-model (``all``) gradients are exact and cheap, 6 epochs, every
checkpoint kept. Test slice a with class i present is a *query*; its ranking is the vector of
same-class scores T_ii over the training slices that contain class i (the others score exactly
0 under every setting, an absent class having a zero gradient) and over patients (sums).

What it reports (``consistency.json``, ``consistency.png``, ``summary.md``):

1. exact vs projected (``all``): for d in ``--dims`` and each projection kind (rademacher, the
   library default, and countsketch), per-query Spearman of the projected ranking against the
   exact one, top-10 proponent overlap, and the relative error of the score entries, over
   ``--seeds`` projection seeds. The projected features are the library's
   :class:`~tracin_jax.influence.Projector` applied to the exact gradients (projection is linear,
   so this is what the engine computes; one engine run with projection checks that);
2. checkpoint choice: rankings from the last checkpoint only, the first half of the checkpoints
   and every second one (the paper's choice), each against all checkpoints (Spearman, top-k
   overlap of proponents and of opponents), for ``head`` and ``all``;
3. ``head`` vs ``all``, and each against the ranking by the training slice's own gradient norm
   sqrt(self-influence) alone, which is the same for every query;
4. query specificity: the mean top-10 proponent overlap between two test queries of the same
   class, for raw TracIn (the method) and cosine TracIn (the library's ``normalised``);
5. identities on the real checkpoints: class-wise scores summed over the 3 x 3 class pairs
   against ordinary TracIn of the summed loss, computed independently with ``jax.grad`` of the
   summed loss (one example at a time); self-influence against the diagonal of the
   train-vs-train scores; one checkpoint divided by its learning rate against plain dot products
   of independently computed class gradients; the engine's files against in-memory features.

What it should show (measured numbers in experiments/README.md): the identities hold to float32
round-off (~1e-7); projected rankings approach the exact ones as d grows (top-10 overlap ~0.87
at d = 64, ~0.98 at d = 4096); the checkpoint choice and the subset move the top of the
rankings more than projection at d >= 1024 does; and raw class-wise TracIn rankings are almost
entirely the training slice's gradient norm (Spearman ~0.99 with it), so every test slice gets
nearly the same proponents, while cosine TracIn gives query-specific ones.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
from tracin_jax.progress import tqdm

from experiments import ranking
from experiments.mislabel import SYNTH_OVERRIDES, SYNTH_SHAPE, _clean_json

CONSISTENCY_OVERRIDES = ("model.width=4", "model.depth=3")


# -- features -------------------------------------------------------------------------------

def features_per_checkpoint(run, grad_fn, images, labels, batch_size: int, progress: bool,
                            desc: str) -> list[np.ndarray]:
    """sqrt(lr_t)-scaled class gradients f32[n, 3, D] at every checkpoint of ``run``."""
    from tracin_jax.influence import sharding
    from tracin_jax.influence.sharding import train_mesh
    from tracin_jax.influence.store import compute_features

    mesh = train_mesh()
    out = []
    for ckpt in tqdm(run.checkpoints, desc=desc, unit="ckpt", disable=not progress, leave=False):
        variables = sharding.replicate(ckpt.variables, mesh)
        out.append(np.asarray(compute_features(grad_fn, variables, ckpt.lr, images, labels,
                                               batch_size, mesh)))
    return out


def per_checkpoint_scores(test_feats: list[np.ndarray], train_feats: list[np.ndarray]) -> np.ndarray:
    """f64[T, n_test, 3, n_train, 3]: the class-wise score tensor of each checkpoint alone."""
    return np.stack([np.einsum("aif,bjf->aibj", te.astype(np.float64), tr.astype(np.float64))
                     for te, tr in zip(test_feats, train_feats)])


def split_leaves(flat: np.ndarray, subset) -> list[np.ndarray]:
    """f[..., D] flattened gradients (leaves in ``subset.paths`` order) -> the leaves."""
    out, start = [], 0
    lead = flat.shape[:-1]
    for shape in subset.shapes:
        size = int(np.prod(shape, dtype=np.int64))
        out.append(flat[..., start:start + size].reshape(*lead, *shape))
        start += size
    return out


def project(feats: list[np.ndarray], subset, dim: int, seed: int, kind: str) -> list[np.ndarray]:
    """Projects per-checkpoint features f32[n, 3, D] with the library's projector (one matrix
    for every checkpoint, as in the engine)."""
    import jax.numpy as jnp

    from tracin_jax.influence import make_projector

    projector = make_projector(subset, dim, seed, kind)
    sizes = [len(f) for f in feats]
    stacked = np.concatenate(feats)
    leaves = [jnp.asarray(l) for l in split_leaves(stacked, subset)]
    p = np.asarray(projector(leaves))
    return np.split(p, np.cumsum(sizes)[:-1])


# -- agreement ------------------------------------------------------------------------------

def queries(test_present: np.ndarray) -> list[tuple[int, int]]:
    """(test slice, class) pairs whose class is present in the test slice's ground truth."""
    return [(a, i) for a in range(test_present.shape[0]) for i in range(test_present.shape[1])
            if test_present[a, i]]


def agreement(ref: np.ndarray, other: np.ndarray, qs, patient_of: np.ndarray | None = None,
              k: int = 10, train_present: np.ndarray | None = None) -> dict:
    """How well ``other`` reproduces the rankings of ``ref`` (both f[n_test, 3, n_train, 3]).

    Per query (a, i): Spearman of the same-class rankings ref[a, i, :, i] vs other[a, i, :, i],
    top-k overlap of proponents and of opponents; over training slices, and over patients when
    ``patient_of`` (int[n_train]) is given (k halved, at least 3). With ``train_present``
    (bool[n_train, 3]) only the training slices (patients) that contain class i are ranked: the
    others score exactly 0 under every setting (an absent class has a zero gradient), and their
    block of ties would inflate the agreement. Also the relative error of all entries,
    ||other - ref|| / ||ref||. Reports means and the 10th percentile over queries.
    """
    def summary(vals):
        v = np.asarray([x for x in vals if np.isfinite(x)])
        return {"mean": float(v.mean()) if len(v) else None,
                "p10": float(np.percentile(v, 10)) if len(v) else None}

    n_train = ref.shape[2]
    present = np.ones((n_train, ref.shape[1]), bool) if train_present is None else np.asarray(train_present, bool)
    out = {"n_queries": len(qs),
           "relative_error": float(np.linalg.norm(other - ref) / max(np.linalg.norm(ref), 1e-300))}
    levels = [("slices", None, k)]
    if patient_of is not None:
        levels.append(("patients", patient_of, max(3, k // 2)))
    for name, groups, kk in levels:
        sp, pro, opp, sizes = [], [], [], []
        for a, i in qs:
            x, y, keep = ref[a, i, :, i], other[a, i, :, i], present[:, i]
            if groups is not None:
                n = int(groups.max()) + 1
                x = np.bincount(groups, weights=x, minlength=n)
                y = np.bincount(groups, weights=y, minlength=n)
                keep = np.bincount(groups, weights=keep, minlength=n) > 0
            x, y = x[keep], y[keep]
            sizes.append(len(x))
            sp.append(ranking.spearman(x, y))
            pro.append(ranking.topk_overlap(x, y, kk, largest=True))
            opp.append(ranking.topk_overlap(x, y, kk, largest=False))
        out[name] = {"k": kk, "mean_candidates": float(np.mean(sizes)) if sizes else 0.0,
                     "spearman": summary(sp), "top_proponents": summary(pro),
                     "top_opponents": summary(opp)}
    return out


def query_overlap(scores: np.ndarray, test_present: np.ndarray, train_present: np.ndarray,
                  k: int = 10) -> dict:
    """How query-specific the top-k proponents are: for each class i, the mean over pairs of
    test queries (a, i), (a', i) of |top-k(a) ∩ top-k(a')| / k among the training slices that
    contain class i (1 = every test slice gets the same proponents), beside the value expected
    for random top-k sets, k / n_candidates."""
    out = {}
    for i in range(scores.shape[1]):
        qa = np.flatnonzero(test_present[:, i])
        cand = np.flatnonzero(train_present[:, i])
        kk = min(k, len(cand))
        if len(qa) < 2 or kk == 0:
            continue
        tops = [set(cand[np.argsort(-scores[a, i, cand, i], kind="stable")[:kk]].tolist()) for a in qa]
        pairs = [len(tops[x] & tops[y]) / kk for x in range(len(tops)) for y in range(x + 1, len(tops))]
        out[str(i)] = {"queries": int(len(qa)), "candidates": int(len(cand)),
                       "mean_overlap": float(np.mean(pairs)), "random": kk / len(cand)}
    vals = [v["mean_overlap"] for v in out.values()]
    rnd = [v["random"] for v in out.values()]
    return {"per_class": out, "mean_overlap": float(np.mean(vals)) if vals else None,
            "random": float(np.mean(rnd)) if rnd else None}


def cosine_features(feats: list[np.ndarray], lrs: list[float]) -> list[np.ndarray]:
    """sqrt(lr_t) g_t / |g_t| from sqrt(lr_t)-scaled features: what the library's
    ``normalised(grad_fn)`` gives (cosine TracIn, sum_t lr_t cos_t)."""
    out = []
    for f, lr in zip(feats, lrs):
        f = f.astype(np.float64)
        n = np.linalg.norm(f, axis=-1, keepdims=True)
        out.append(np.sqrt(lr) * f / np.maximum(n, 1e-30))
    return out


def checkpoint_sets(epochs: list[int]) -> dict[str, list[int]]:
    """Named checkpoint choices: all, last, first half, every second (ending at the last)."""
    half = epochs[: max(1, len(epochs) // 2)]
    return {"all": list(epochs), "last": [epochs[-1]], "first half": half,
            "every second": sorted(epochs[::-1][::2])}


# -- independent reference gradients --------------------------------------------------------

def make_independent_grad(run, subset, total: bool):
    """A jitted ``(variables, image, label[, c]) -> f32[D]``: one ``jax.grad`` of the summed
    class loss (``total``) or of class c's loss, for one example; written here, apart from the
    library's gradient code (no vmap, no VJP over class cotangents, no projection)."""
    import jax
    import jax.numpy as jnp

    def loss(leaves, variables, x, y):
        v = dict(variables, params=subset.insert(variables["params"], leaves))
        return run.classwise_loss(run.apply(v, x[None]), y[None])[0]  # f32[3]

    def flat(g):
        return jnp.concatenate([l.reshape(-1) for l in g])

    if total:
        return jax.jit(lambda v, x, y: flat(jax.grad(
            lambda p: jnp.sum(loss(p, v, x, y)))(subset.select(v["params"]))))
    # c is traced (not static): one program for the three classes.
    return jax.jit(lambda v, x, y, c: flat(jax.grad(
        lambda p: loss(p, v, x, y)[c])(subset.select(v["params"]))))


def independent_grads(fn, variables, images, labels, total: bool) -> np.ndarray:
    """f64[n, D] (``total``) or f64[n, 3, D]: ``fn`` from :func:`make_independent_grad`, one
    example (and class) at a time."""
    out = []
    for x, y in zip(np.asarray(images, np.float32), np.asarray(labels, np.int32)):
        if total:
            out.append(np.asarray(fn(variables, x, y), np.float64))
        else:
            out.append([np.asarray(fn(variables, x, y, c), np.float64) for c in range(3)])
    return np.asarray(out)


def rel_err(a, b) -> float:
    """max |a - b| / max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


# -- figure ---------------------------------------------------------------------------------

def plot(summary: dict, path: Path) -> None:
    from experiments._plots import legend_below, pyplot, save

    plt = pyplot(legend_fontsize=7.5)
    fig, axes = plt.subplots(2, 4, figsize=(18, 7.6))
    colours = {"rademacher": "#0072B2", "countsketch": "#E69F00"}
    proj = summary["projection"]
    dims = proj["dims"]
    ax, ax2 = axes[0][0], axes[0][1]
    for kind in proj["kinds"]:
        for level, ls in (("slices", "-"), ("patients", "--")):
            m = np.array([[r[level]["spearman"]["mean"] for r in proj["runs"][kind][str(d)]] for d in dims])
            ax.errorbar(dims, m.mean(1), yerr=m.std(1), color=colours[kind], ls=ls, marker="o", ms=3,
                        capsize=2, label=f"{kind}, {level}")
        e = np.array([[r["relative_error"] for r in proj["runs"][kind][str(d)]] for d in dims])
        ax2.errorbar(dims, e.mean(1), yerr=e.std(1), color=colours[kind], marker="o", ms=3, capsize=2,
                     label=kind)
        t = np.array([[r["slices"]["top_proponents"]["mean"] for r in proj["runs"][kind][str(d)]] for d in dims])
        ax.plot(dims, t.mean(1), color=colours[kind], ls=":", marker="s", ms=3,
                label=f"{kind}, top-10 proponent overlap")
    lows = [r[level]["spearman"]["mean"] for kind in proj["kinds"] for d in dims
            for r in proj["runs"][kind][str(d)] for level in ("slices", "patients")]
    lows += [r["slices"]["top_proponents"]["mean"] for kind in proj["kinds"] for d in dims
             for r in proj["runs"][kind][str(d)]]
    ax.set_ylim(max(0.0, math.floor(min(lows) * 10) / 10 - 0.1), 1.01)
    d = np.array(dims, float)
    ax2.plot(d, np.sqrt(2.0 / d) * proj["scale_ratio"], color="#999999", ls="--",
             label="sqrt(2/d) x |g||g'| / |T| (theory, upper)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("projection dimension d")
    ax.set_title(f"exact vs projected ('all', D={proj['param_count']}): per-query agreement")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("projection dimension d")
    ax2.set_title("relative error of the score entries")
    ax2.grid(alpha=0.3)
    ax2.legend()

    ax = axes[0][2]
    ident = summary["identities"]
    for name, colour in (("head", "#0072B2"), ("all", "#CC79A7")):
        pts = ident[name]["scatter"]
        ax.scatter(pts["total"], pts["classwise_sum"], s=7, color=colour, alpha=0.6,
                   label=f"{name}: max rel. err {ident[name]['sum_vs_total_max_rel_err']:.1e}")
    lim = [min(min(ident[n]["scatter"]["total"]) for n in ("head", "all")),
           max(max(ident[n]["scatter"]["total"]) for n in ("head", "all"))]
    ax.plot(lim, lim, color="#999999", lw=1)
    ax.set_xscale("symlog", linthresh=1e-6)
    ax.set_yscale("symlog", linthresh=1e-6)
    ax.set_xlabel("TracIn of the summed loss (independent jax.grad)")
    ax.set_ylabel("class-wise scores summed over the 3 x 3 pairs")
    ax.set_title("sum-to-total identity on the real checkpoints")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)

    for ax, subset in ((axes[1][0], "head"), (axes[1][1], "all")):
        ck = summary["checkpoints"][subset]
        names = [n for n in ck if n != "all"]
        metrics = [("slices", "spearman", "Spearman, slices"), ("patients", "spearman", "Spearman, patients"),
                   ("slices", "top_proponents", "top-10 proponents"), ("slices", "top_opponents", "top-10 opponents"),
                   ("patients", "top_proponents", "top-5 patient proponents")]
        width = 0.8 / len(metrics)
        x = np.arange(len(names))
        for k, (lvl, key, label) in enumerate(metrics):
            vals = [ck[n][lvl][key]["mean"] for n in names]
            ax.bar(x + (k - (len(metrics) - 1) / 2) * width, vals, width, label=label,
                   color=plt.cm.viridis(k / len(metrics)))
        ax.set_xticks(x)
        ax.set_xticklabels([f"{n}\n{summary['checkpoint_sets'][n]}" for n in names])
        ax.set_ylim(0, 1.02)
        ax.set_title(f"'{subset}': each checkpoint choice vs all checkpoints")
        ax.grid(axis="y", alpha=0.3)

    ax = axes[1][2]
    labels = ["Spearman\nslices", "Spearman\npatients", "top-10\nprop.", "top-10\nopp.",
              "top-5 patient\nprop."]
    keys = [("slices", "spearman"), ("patients", "spearman"), ("slices", "top_proponents"),
            ("slices", "top_opponents"), ("patients", "top_proponents")]
    series = [("'head' vs 'all'", summary["head_vs_all"], "#009E73"),
              ("|grad| alone vs 'head'", summary["norm_only"]["head"], "#56B4E9"),
              ("|grad| alone vs 'all'", summary["norm_only"]["all"], "#CC79A7")]
    width = 0.8 / len(series)
    for k, (label, a, colour) in enumerate(series):
        x = np.arange(len(keys)) + (k - (len(series) - 1) / 2) * width
        ax.bar(x, [a[l][m]["mean"] for l, m in keys], width, color=colour, label=label)
        ax.scatter(x, [a[l][m]["p10"] for l, m in keys], color="black", marker="_", s=60, zorder=3,
                   label="10th percentile over queries" if k == 0 else None)
    ax.set_xticks(np.arange(len(keys)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylim(0, 1.35)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_title("subsets, and the training gradient norm alone (all checkpoints)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", fontsize=7, ncol=2)
    fig.suptitle("Consistency of class-wise TracIn on a small trained run "
                 f"({summary['n_train']} training / {summary['n_test']} test slices, "
                 f"{summary['n_queries']} test queries)")
    ax = axes[0][3]
    spec = summary["query_specificity"]
    names = list(spec)
    x = np.arange(len(names))
    ax.bar(x - 0.2, [spec[n]["raw"]["mean_overlap"] for n in names], 0.4, color="#0072B2",
           label="raw TracIn (the method)")
    ax.bar(x + 0.2, [spec[n]["cosine"]["mean_overlap"] for n in names], 0.4, color="#E69F00",
           label="cosine TracIn (normalised gradients)")
    ax.scatter(x, [spec[n]["raw"]["random"] for n in names], color="black", marker="_", s=400, zorder=3,
               label="random top-k sets")
    ax.set_xticks(x)
    ax.set_xticklabels([f"'{n}'" for n in names])
    ax.set_ylim(0, 1.35)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("mean top-10 overlap between two test queries")
    ax.set_title("are the proponents specific to the test slice?")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", fontsize=7)
    ax = axes[1][3]
    ax.axis("off")
    rows = ["Identities (max relative error)", ""]
    for name, ident in summary["identities"].items():
        rows.append(f"'{name}': class-wise sum vs total TracIn  {ident['sum_vs_total_max_rel_err']:.1e}")
        rows.append(f"'{name}': 1 checkpoint / lr vs dot products  "
                    f"{ident['one_checkpoint_over_lr_vs_dot_products_max_rel_err']:.1e}")
    rows.append("")
    for key, v in summary["engine"].items():
        if isinstance(v, float):
            rows.append(f"engine: {key.replace('_', ' ')}  {v:.1e}")
    ax.text(0.0, 1.0, "\n".join(rows), va="top", ha="left", fontsize=7.5, family="monospace",
            transform=ax.transAxes)
    legend_below(fig, axes[1][0], bbox_to_anchor=(0.3, 0.0))
    save(fig, path, rect=(0, 0.04, 1, 0.96))


# -- the experiment ------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.consistency",
                                description="Consistency checks of class-wise TracIn on a small run.")
    p.add_argument("--out", default="runs/consistency")
    p.add_argument("--workdir", default=None,
                   help="an existing trained run to examine (e.g. runs/demo); default: train one in --out")
    p.add_argument("--data", default=None, help="a BraTS dataset (default: synthetic)")
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--synth-seed", type=int, default=1)
    p.add_argument("--shape", type=lambda s: tuple(int(v) for v in s.split(",")), default=SYNTH_SHAPE)
    p.add_argument("--config", default="demo")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--dims", default="64,256,1024,4096", help="projection dimensions")
    p.add_argument("--kinds", default="rademacher,countsketch", help="projection kinds")
    p.add_argument("--seeds", type=int, default=3, help="projection seeds per (kind, d)")
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--identity-examples", default="6,24", help="test,train examples of the independent check")
    p.add_argument("--batch-size", type=int, default=16,
                   help="gradient batch of the in-memory features and of the engine runs")
    p.add_argument("--check-dim", type=int, default=1024,
                   help="projection dimension of the engine-vs-in-memory check (section 5)")
    p.add_argument("--max-memory-gb", type=float, default=4.0, help="limit for the exact 'all' features")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def build_config(args):
    from tracin_jax.config import apply_overrides, get_config

    base = list(CONSISTENCY_OVERRIDES) if args.config == "demo" else []
    if args.data is None and tuple(args.shape) == SYNTH_SHAPE:
        base = list(SYNTH_OVERRIDES) + base
    return apply_overrides(get_config(args.config), base + list(args.set or []))


def run(args) -> dict:
    import jax

    import tracin_jax
    from tracin_jax.data import write_synthetic_dataset
    from tracin_jax.influence import make_class_grad_fn, resolve_subset, run_influence
    from tracin_jax.influence.folder import class_present
    from tracin_jax.influence.scores import patient_index
    from tracin_jax.training.train import train_and_evaluate

    progress = not args.no_progress
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    config = build_config(args)

    t = time.perf_counter()
    if args.workdir:
        workdir = Path(args.workdir)
        run_ = tracin_jax.load_run(workdir, args.data)
        config = run_.config
    else:
        data_dir = Path(args.data) if args.data else out / "data"
        if args.data is None:
            write_synthetic_dataset(data_dir, cases=args.cases, seed=args.synth_seed, progress=progress,
                                    shape=tuple(args.shape))
        workdir = out / "run"
        train_and_evaluate(config, data_dir, workdir, progress=progress,
                           log=lambda s: print(s, file=sys.stderr))
        run_ = tracin_jax.load_run(workdir)
    timings["data_and_training_s"] = time.perf_counter() - t

    train, test = run_.train, run_.test
    epochs = [c.epoch for c in run_.checkpoints]
    lrs = {c.epoch: c.lr for c in run_.checkpoints}
    params = run_.checkpoints[-1].variables["params"]
    subsets = {name: resolve_subset(params, name) for name in ("head", "all")}
    test_present = class_present(test.labels)
    train_present = class_present(train.labels)
    qs = queries(test_present)
    _, patient_of = patient_index(train.cases)

    # 1. exact in-memory features, every checkpoint, both subsets.
    need = (len(train) + len(test)) * 3 * subsets["all"].size * 4 * len(epochs)
    if need > args.max_memory_gb * 2**30:
        from tracin_jax.errors import InputError

        raise InputError(f"exact 'all' gradients of this run need {need / 2**30:.1f} GiB "
                         f"(> --max-memory-gb {args.max_memory_gb}): use a narrower model "
                         "(e.g. --set model.width=4 --set model.depth=3) or fewer examples")
    t = time.perf_counter()
    feats, per_ckpt = {}, {}
    for name, subset in subsets.items():
        fn = make_class_grad_fn(run_.model, subset)
        tr = features_per_checkpoint(run_, fn, train.images, train.labels, args.batch_size, progress,
                                     f"{name} train gradients")
        te = features_per_checkpoint(run_, fn, test.images, test.labels, args.batch_size, progress,
                                     f"{name} test gradients")
        feats[name] = (tr, te)
        per_ckpt[name] = per_checkpoint_scores(te, tr)
    timings["exact_features_s"] = time.perf_counter() - t
    exact_all = {name: s.sum(axis=0) for name, s in per_ckpt.items()}

    # 2. projection sweep ('all').
    t = time.perf_counter()
    dims = [int(d) for d in args.dims.split(",") if d.strip()]
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    tr, te = feats["all"]
    runs: dict = {k: {} for k in kinds}
    todo = [(k, d, s) for k in kinds for d in dims for s in range(args.seeds)]
    for kind, d, seed in tqdm(todo, desc="projections", disable=not progress, leave=False):
        ptr = project(tr, subsets["all"], d, seed, kind)
        pte = project(te, subsets["all"], d, seed, kind)
        scores = per_checkpoint_scores(pte, ptr).sum(axis=0)
        runs[kind].setdefault(str(d), []).append(agreement(exact_all["all"], scores, qs, patient_of, args.topk, train_present))
    # Expected scale of the entry error: sqrt((1 + cos^2)/d) |g||g'| per checkpoint, relative to |T|.
    norm_te = np.sqrt(sum((f.astype(np.float64) ** 2).sum(-1) for f in te))  # [n_test, 3]
    norm_tr = np.sqrt(sum((f.astype(np.float64) ** 2).sum(-1) for f in tr))
    scale_ratio = float(np.linalg.norm(np.einsum("ai,bj->aibj", norm_te, norm_tr))
                        / np.linalg.norm(exact_all["all"]))
    timings["projection_sweep_s"] = time.perf_counter() - t

    # 3. checkpoint choices and subsets.
    sets = checkpoint_sets(epochs)
    ck = {}
    for name in subsets:
        ref = exact_all[name]
        ck[name] = {}
        for set_name, eps in sets.items():
            idx = [epochs.index(e) for e in eps]
            ck[name][set_name] = agreement(ref, per_ckpt[name][idx].sum(axis=0), qs, patient_of, args.topk,
                                            train_present)
    head_vs_all = agreement(exact_all["all"], exact_all["head"], qs, patient_of, args.topk, train_present)
    # How much of a query's ranking is the training slice's own gradient norm (the same for
    # every query)? Rank by sqrt(self-influence) of the class alone and compare.
    norm_only = {}
    for name, (tr_f, te_f) in feats.items():
        norms = np.sqrt(sum((f.astype(np.float64) ** 2).sum(-1) for f in tr_f))  # [n_train, 3]
        fake = np.broadcast_to(norms[None, None], exact_all[name].shape)
        norm_only[name] = agreement(exact_all[name], fake, qs, patient_of, args.topk, train_present)
    # Are the proponents specific to the query? Raw TracIn vs cosine TracIn.
    specificity = {}
    lr_list = [lrs[e] for e in epochs]
    for name, (tr_f, te_f) in feats.items():
        cos = per_checkpoint_scores(cosine_features(te_f, lr_list), cosine_features(tr_f, lr_list)).sum(axis=0)
        specificity[name] = {"raw": query_overlap(exact_all[name], test_present, train_present, args.topk),
                             "cosine": query_overlap(cos, test_present, train_present, args.topk),
                             "cosine_vs_raw": agreement(exact_all[name], cos, qs, patient_of, args.topk,
                                                        train_present)}

    # 4. engine and independent checks.
    t = time.perf_counter()
    last = epochs[-1]
    eng = {}
    engine = partial(run_influence, workdir, data_dir=args.data if args.workdir else None,
                     batch_size=args.batch_size, progress=progress)
    meta = engine(out / "engine-head", params="head", split="test", store_dir=out / "features-head")
    eng["head_all_checkpoints_vs_in_memory"] = rel_err(np.load(out / "engine-head" / "scores.npy"),
                                                       exact_all["head"])
    engine(out / "engine-head-train", params="head", split="train", store_dir=out / "features-head")
    s_tt = np.load(out / "engine-head-train" / "scores.npy")
    self_inf = np.load(out / "engine-head-train" / "self_influence.npy")
    eng["self_influence_vs_train_diagonal"] = rel_err(
        self_inf, np.stack([s_tt[b, :, b, :].diagonal() for b in range(len(self_inf))]))
    eng["train_vs_train_symmetry"] = rel_err(s_tt, s_tt.transpose(2, 3, 0, 1))
    engine(out / "engine-all-exact", params="all", proj_dim=0, checkpoints=[last], split="test",
           store_dir=out / "features-all-exact")
    eng["all_exact_last_vs_in_memory"] = rel_err(np.load(out / "engine-all-exact" / "scores.npy"),
                                                 per_ckpt["all"][-1])
    d_check = args.check_dim
    meta_p = engine(out / "engine-all-projected", params="all", proj_dim=d_check, proj_kind="rademacher",
                    checkpoints=[last], split="test", store_dir=out / "features-all-projected")
    mem = per_checkpoint_scores(project([te[-1]], subsets["all"], d_check, 0, "rademacher"),
                                project([tr[-1]], subsets["all"], d_check, 0, "rademacher"))[0]
    eng["all_projected_last_vs_in_memory_projection"] = rel_err(
        np.load(out / "engine-all-projected" / "scores.npy"), mem)
    eng["projection_checked"] = meta_p["projection"]

    n_te, n_tr = (int(v) for v in args.identity_examples.split(","))
    n_te, n_tr = min(n_te, len(test)), min(n_tr, len(train))
    identities = {}
    for name, subset in subsets.items():
        total = np.zeros((n_te, n_tr))
        g_total = make_independent_grad(run_, subset, total=True)
        for ckpt in tqdm(run_.checkpoints, desc=f"{name}: jax.grad of the summed loss",
                         disable=not progress, leave=False):
            v = ckpt.variables
            gte = independent_grads(g_total, v, test.images[:n_te], test.labels[:n_te], True)
            gtr = independent_grads(g_total, v, train.images[:n_tr], train.labels[:n_tr], True)
            total += ckpt.lr * gte @ gtr.T
        classwise = exact_all[name][:n_te, :, :n_tr, :].sum(axis=(1, 3))
        v = run_.checkpoints[-1].variables
        g_class = make_independent_grad(run_, subset, total=False)
        cte = independent_grads(g_class, v, test.images[:n_te], test.labels[:n_te], False)
        ctr = independent_grads(g_class, v, train.images[:n_tr], train.labels[:n_tr], False)
        dots = np.einsum("aif,bjf->aibj", cte, ctr)
        identities[name] = {
            "n_test": n_te, "n_train": n_tr,
            "sum_vs_total_max_rel_err": rel_err(classwise, total),
            "one_checkpoint_over_lr_vs_dot_products_max_rel_err": rel_err(
                per_ckpt[name][-1][:n_te, :, :n_tr, :] / lrs[last], dots),
            "scatter": {"total": total.ravel().tolist(), "classwise_sum": classwise.ravel().tolist()},
        }
    timings["checks_s"] = time.perf_counter() - t

    metrics_path = workdir / "metrics.jsonl"
    metrics_lines = ([json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]
                     if metrics_path.exists() else [])
    summary = {"workdir": str(workdir),
        "config": config.to_dict(), "n_train": len(train), "n_test": len(test),
        "n_train_patients": int(patient_of.max()) + 1, "n_queries": len(qs),
        "epochs": epochs, "learning_rates": [lrs[e] for e in epochs],
        "training": metrics_lines[-1] if metrics_lines else None,
        "projection": {"dims": dims, "kinds": kinds, "seeds": args.seeds,
                       "param_count": subsets["all"].size, "scale_ratio": scale_ratio, "runs": runs},
        "checkpoint_sets": sets, "checkpoints": ck, "head_vs_all": head_vs_all, "norm_only": norm_only,
        "query_specificity": specificity,
        "engine": eng, "identities": identities, "backend": jax.default_backend(),
        "engine_timings_head": meta["timings"],
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    (out / "consistency.json").write_text(json.dumps(_clean_json(summary), indent=1) + "\n")
    plot(summary, out / "consistency.png")
    text = summary_text(summary)
    (out / "summary.md").write_text(text)
    print(text)
    return summary


def _f(v, digits=3):
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def summary_text(s: dict) -> str:
    lines = [f"Consistency on {s['n_train']} training / {s['n_test']} test slices, {s['n_queries']} "
             f"queries, checkpoints {s['epochs']}.", "",
             "Exact vs projected ('all', D=%d): mean per-query Spearman (slices / patients), top-%d "
             "proponent overlap, relative entry error; mean over %d seeds:" % (
                 s["projection"]["param_count"], s["checkpoints"]["head"]["all"]["slices"]["k"],
                 s["projection"]["seeds"]), "",
             "| kind | d | Spearman slices | Spearman patients | top-k proponents | rel. error |",
             "|---|---|---|---|---|---|"]
    for kind in s["projection"]["kinds"]:
        for d in s["projection"]["dims"]:
            rs = s["projection"]["runs"][kind][str(d)]
            mean = lambda f: float(np.mean([f(r) for r in rs]))  # noqa: E731
            lines.append(f"| {kind} | {d} | {_f(mean(lambda r: r['slices']['spearman']['mean']))} | "
                         f"{_f(mean(lambda r: r['patients']['spearman']['mean']))} | "
                         f"{_f(mean(lambda r: r['slices']['top_proponents']['mean']))} | "
                         f"{_f(mean(lambda r: r['relative_error']))} |")
    lines += ["", "Checkpoint choice vs all checkpoints (mean per query):", "",
              "| subset | checkpoints | Spearman slices | Spearman patients | top-k proponents | "
              "top-k opponents | top patient proponents |", "|---|---|---|---|---|---|---|"]
    for name, ck in s["checkpoints"].items():
        for set_name, a in ck.items():
            if set_name == "all":
                continue
            lines.append(f"| {name} | {set_name} {s['checkpoint_sets'][set_name]} | "
                         f"{_f(a['slices']['spearman']['mean'])} | {_f(a['patients']['spearman']['mean'])} | "
                         f"{_f(a['slices']['top_proponents']['mean'])} | {_f(a['slices']['top_opponents']['mean'])} | "
                         f"{_f(a['patients']['top_proponents']['mean'])} |")
    a = s["head_vs_all"]
    lines.append(f"| head vs all | all | {_f(a['slices']['spearman']['mean'])} | "
                 f"{_f(a['patients']['spearman']['mean'])} | {_f(a['slices']['top_proponents']['mean'])} | "
                 f"{_f(a['slices']['top_opponents']['mean'])} | {_f(a['patients']['top_proponents']['mean'])} |")
    for name, a in s["norm_only"].items():
        lines.append(f"| |grad| alone vs {name} | all | {_f(a['slices']['spearman']['mean'])} | "
                     f"{_f(a['patients']['spearman']['mean'])} | {_f(a['slices']['top_proponents']['mean'])} | "
                     f"{_f(a['slices']['top_opponents']['mean'])} | {_f(a['patients']['top_proponents']['mean'])} |")
    lines += ["", "Query specificity: mean top-%d proponent overlap between two test queries of the same "
              "class (1 = identical proponents for every test slice; random sets in brackets):" % (
                  s["checkpoints"]["head"]["all"]["slices"]["k"]), ""]
    for name, sp in s["query_specificity"].items():
        lines.append(f"- {name}: raw TracIn {_f(sp['raw']['mean_overlap'])} (random {_f(sp['raw']['random'])}); "
                     f"cosine TracIn {_f(sp['cosine']['mean_overlap'])}; cosine vs raw per-query Spearman "
                     f"{_f(sp['cosine_vs_raw']['slices']['spearman']['mean'])}")
    lines += ["", "Identities (max relative error):", ""]
    for name, ident in s["identities"].items():
        lines.append(f"- {name}: class-wise sum vs total-loss TracIn (independent jax.grad, "
                     f"{ident['n_test']}x{ident['n_train']} pairs, all checkpoints) "
                     f"{ident['sum_vs_total_max_rel_err']:.1e}; one checkpoint / lr vs plain dot "
                     f"products {ident['one_checkpoint_over_lr_vs_dot_products_max_rel_err']:.1e}")
    for key, v in s["engine"].items():
        if isinstance(v, float):
            lines.append(f"- engine: {key.replace('_', ' ')} {v:.1e}")
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in s["timings"].items()), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    from experiments._cli import run_main

    return run_main("experiments.consistency", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
