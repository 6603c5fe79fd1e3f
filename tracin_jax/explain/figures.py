"""Figures of the explanation report (matplotlib; every function writes one PNG and closes its figure).

One colour per tumour class everywhere (``CLASS_COLORS``, from the Okabe-Ito palette, which
stays distinguishable under the common colour-vision deficiencies): NCR/NET vermillion,
ED bluish green, ET sky blue. Neutral / "not selected" items are grey.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import to_rgba
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from tracin_jax.training.losses import CLASS_NAMES

CLASS_COLORS = {"NCR/NET": "#D55E00", "ED": "#009E73", "ET": "#56B4E9"}
NEUTRAL = "#9A9A9A"
OPPONENT = "#505050"
DPI = 110

plt.rcParams.update({"font.size": 9, "axes.titlesize": 9.5, "axes.labelsize": 9,
                     "figure.titlesize": 11, "legend.fontsize": 8})


def color(c: int) -> str:
    """Colour of tumour class c (0 NCR/NET, 1 ED, 2 ET)."""
    return CLASS_COLORS[CLASS_NAMES[c]]


def _save(fig, path: Path) -> str:
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return Path(path).name


def _window(img: np.ndarray) -> tuple[float, float]:
    """Display range from robust percentiles of the slice (background included)."""
    lo, hi = np.percentile(img, [0.5, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def display_view(a: np.ndarray) -> np.ndarray:
    """Arrays are [x, y] in RAS (canonical) order; show them with anterior up, as radiology does.

    ``np.rot90`` puts +y (anterior) at the top and +x (patient's right) on the right
    (neurological convention).
    """
    return np.rot90(a)


def _overlay(ax, img: np.ndarray, labels: np.ndarray, highlight: int | None) -> None:
    """Grey slice, ground truth of every class translucent, the highlighted class outlined."""
    img, labels = display_view(img), display_view(labels)
    lo, hi = _window(img)
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    rgba = np.zeros(labels.shape + (4,))
    for c in range(3):
        m = labels == c + 1
        alpha = 0.6 if c == highlight else 0.3
        rgba[m] = to_rgba(color(c), alpha)
    ax.imshow(rgba, interpolation="nearest")
    if highlight is not None and (labels == highlight + 1).any():
        ax.contour(labels == highlight + 1, levels=[0.5], colors=[color(highlight)], linewidths=1.4)
    ax.set_xticks([])
    ax.set_yticks([])


def _region(ax, img: np.ndarray, mask: np.ndarray, c: int) -> None:
    """Masked intensities: the region at full brightness, the rest of the slice dimmed to 15%."""
    img, mask = display_view(img), display_view(mask)
    lo, hi = _window(img)
    shown = np.where(mask, img, lo + 0.15 * (img - lo))
    ax.imshow(shown, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    if mask.any():
        ax.contour(mask, levels=[0.5], colors=[color(c)], linewidths=1.0)
    else:
        ax.text(0.5, 0.5, f"no {CLASS_NAMES[c]}\nregion", color="white", ha="center", va="center",
                transform=ax.transAxes, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _score(v: float) -> str:
    """Signed score with 3 significant digits, fixed-point where readable."""
    a = abs(v)
    if a == 0 or 0.01 <= a < 1000:
        return f"{v:+.3g}" if a >= 100 else f"{v:+.{max(0, 2 - int(np.floor(np.log10(a))) if a else 2)}f}"
    return f"{v:+.2e}"


def _short(name: str, width: int = 22) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


@dataclass
class Panel:
    """One training item of a local explanation."""

    image: np.ndarray  # f32[H, W] (chosen modality)
    labels: np.ndarray  # u8[H, W]
    patient: str
    slice_id: str
    score: float
    rank: int


def local_explanation(path: Path, *, test_image: np.ndarray, test_labels: np.ndarray, test_id: str,
                      test_class: int, train_class: int, proponents: Sequence[Panel],
                      opponents: Sequence[Panel], level: str, modality: str) -> str:
    """Test slice (ground truth, class-i region) beside k proponents (top row) and k opponents."""
    k = max(len(proponents), len(opponents), 1)
    fig = plt.figure(figsize=(2.0 * (k + 1) + 0.4, 5.0), layout="constrained")
    gs = fig.add_gridspec(2, k + 2, width_ratios=[1.0, 0.08] + [1.0] * k)
    ci, cj = CLASS_NAMES[test_class], CLASS_NAMES[train_class]
    ax = fig.add_subplot(gs[0, 0])
    _overlay(ax, test_image, test_labels, test_class)
    ax.set_title(f"test {_short(test_id)}\nground truth", fontsize=8.5)
    ax = fig.add_subplot(gs[1, 0])
    _region(ax, test_image, test_labels == test_class + 1, test_class)
    ax.set_title(f"test region {ci}", fontsize=8.5, color="black")
    for row, (panels, kind) in enumerate(((proponents, "proponent"), (opponents, "opponent"))):
        for n in range(k):
            ax = fig.add_subplot(gs[row, n + 2])
            if n >= len(panels):
                ax.axis("off")
                if n == len(panels):
                    sign = "positive" if kind == "proponent" else "negative"
                    msg = (f"no {kind}s\n(no {sign} scores)" if n == 0 else
                           f"no more {kind}s\n(no other {sign} scores)")
                    ax.text(0.5, 0.5, msg, ha="center",
                            va="center", transform=ax.transAxes, fontsize=8, color=NEUTRAL)
                continue
            p = panels[n]
            _region(ax, p.image, p.labels == train_class + 1, train_class)
            where = p.slice_id.rsplit("/", 1)[-1]
            ax.set_title(f"{kind} {p.rank}\n{_short(p.patient)} {where}\nscore {_score(p.score)}",
                         fontsize=8)
    unit = "patients" if level == "patient" else "slices"
    fig.suptitle(f"Test class {ci} explained by training class {cj} regions: top {k} proponent "
                 f"(top row) and opponent (bottom row) {unit} ({modality})")
    return _save(fig, path)


def class_matrix(path: Path, matrix: np.ndarray, n_items: Sequence[int]) -> str:
    """Heatmap of the 3 x 3 mean influence matrix (rows test class i, columns training class j)."""
    fig, ax = plt.subplots(figsize=(5.4, 4.4), layout="constrained")
    m = np.asarray(matrix, float)
    vmax = np.nanmax(np.abs(m)) if np.isfinite(m).any() else 1.0
    vmax = vmax if vmax > 0 else 1.0
    im = ax.imshow(m, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    for i in range(3):
        for j in range(3):
            v = m[i, j]
            txt = "n/a" if not np.isfinite(v) else f"{v:.3g}"
            dark = np.isfinite(v) and abs(v) > 0.6 * vmax
            ax.text(j, i, txt, ha="center", va="center", color="white" if dark else "black")
    ax.set_xticks(range(3), CLASS_NAMES)
    ax.set_yticks(range(3), [f"{c}\n(n={n})" for c, n in zip(CLASS_NAMES, n_items)])
    for t, c in zip(ax.get_xticklabels(), range(3)):
        t.set_color(color(c))
    for t, c in zip(ax.get_yticklabels(), range(3)):
        t.set_color(color(c))
    ax.set_xlabel("training class j")
    ax.set_ylabel("test class i (test items with class i)")
    ax.set_title("Mean class-wise influence T_ij over the test set")
    fig.colorbar(im, ax=ax, shrink=0.85, label="mean score per training slice")
    return _save(fig, path)


def topk_frequency(path: Path, prop: np.ndarray, opp: np.ndarray, patients: Sequence[str], k: int,
                   n_items: Sequence[int], max_patients: int = 20) -> str:
    """Per class: how often each patient is a top-k proponent (up) / opponent (down)."""
    fig, axes = plt.subplots(3, 1, figsize=(10.5, 9.6), layout="constrained")
    for c, ax in enumerate(axes):
        total = prop[c] + opp[c]
        order = np.argsort(-total, kind="stable")[:max_patients]
        order = order[total[order] > 0]
        x = np.arange(len(order))
        ax.bar(x, prop[c][order], color=color(c), label=f"top-{k} proponent")
        ax.bar(x, -opp[c][order], color=OPPONENT, label=f"top-{k} opponent")
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(x, [_short(patients[p], 20) for p in order], rotation=35, ha="right",
                      fontsize=7.5)
        ax.set_xlim(-0.7, max(len(order), 1) - 0.3)
        ax.set_ylabel("test items")
        ax.set_title(f"{CLASS_NAMES[c]}: patients most often among the top-{k} "
                     f"(of {n_items[c]} test items with {CLASS_NAMES[c]})", color="black")
        lim = max(1, int(max(prop[c].max(initial=0), opp[c].max(initial=0))))
        ax.set_ylim(-lim * 1.15, lim * 1.15)
        ticks = ax.get_yticks()
        ax.set_yticks(ticks, [f"{abs(t):g}" for t in ticks])
        ax.set_ylim(-lim * 1.15, lim * 1.15)
        ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False)
    return _save(fig, path)


def score_distributions(path: Path, patient_scores: np.ndarray, present: np.ndarray,
                        max_points: int = 20000, seed: int = 0) -> str:
    """Violins of patient-level scores per class pair; one panel per test class i."""
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8), layout="constrained")
    rng = np.random.default_rng(seed)
    for i, ax in enumerate(axes):
        rows = patient_scores[np.asarray(present)[:, i], i]  # [m, P, 3]
        for j in range(3):
            v = rows[..., j].ravel().astype(np.float64)
            if v.size > max_points:
                v = rng.choice(v, max_points, replace=False)
            if v.size == 0:
                continue
            if np.ptp(v) > 0:
                parts = ax.violinplot([v], positions=[j], widths=0.8, showmedians=True)
                for body in parts["bodies"]:
                    body.set_facecolor(color(j))
                    body.set_edgecolor("black")
                    body.set_alpha(0.75)
                for key in ("cbars", "cmins", "cmaxes", "cmedians"):
                    parts[key].set_color("black")
                    parts[key].set_linewidth(0.8)
            else:
                ax.plot([j - 0.3, j + 0.3], [v[0], v[0]], color=color(j), lw=2)
        ax.axhline(0, color=NEUTRAL, lw=0.6, ls="--")
        ax.set_xticks(range(3), CLASS_NAMES)
        for t, c in zip(ax.get_xticklabels(), range(3)):
            t.set_color(color(c))
        ax.set_xlabel("training class j")
        ax.set_title(f"test class {CLASS_NAMES[i]} (n={int(np.asarray(present)[:, i].sum())} items)")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes[0].set_ylabel("patient score (sum over its slices)")
    fig.suptitle("Distribution of patient-level scores per class pair")
    return _save(fig, path)


def fi_curves(path: Path, curves: np.ndarray, n_window: Sequence[int], highlight: Sequence[Sequence[int]],
              stats: Sequence[dict], metric: str) -> str:
    """FI against rank per class: mean over filters with the inter-quartile band, a few filters."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.0), layout="constrained", sharey=True)
    styles = ["--", ":", "-."]
    for c, ax in enumerate(axes):
        fi = curves[c]  # [R, F]
        r = np.arange(1, fi.shape[0] + 1)
        title = CLASS_NAMES[c]
        if fi.size == 0 or not np.isfinite(fi).any():
            ax.text(0.5, 0.5, "no defined similarities", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(title)
            continue
        n = n_window[c]
        R = fi.shape[0]
        for a, b in ((0, n), (R - n, R)):
            ax.axvspan(a + 0.5, b + 0.5, color=color(c), alpha=0.08, lw=0)
        s = (R - n) // 2
        ax.axvspan(s + 0.5, s + n + 0.5, color=NEUTRAL, alpha=0.15, lw=0)
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(fi, axis=1)
                q1, q3 = np.nanpercentile(fi, [25, 75], axis=1)
        ax.fill_between(r, q1, q3, color=color(c), alpha=0.25, lw=0, label="filters: 25-75%")
        for f, ls in zip(highlight[c], styles):
            ax.plot(r, fi[:, f], color="black", lw=0.9, ls=ls, label=f"filter {f}")
        ax.plot(r, mean, color=color(c), lw=2.2, label="mean over filters")
        st = stats[c]
        if st and np.isfinite(st.get("gap", np.nan)):
            title += f"\ngap {st['gap']:+.3f}, permutation p = {st['p_value']:.3g}"
        ax.set_title(title)
        ax.set_xlabel("patient rank (1 = strongest proponent)")
        ax.set_xlim(0.5, R + 0.5)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2, frameon=False)
    axes[0].set_ylabel(f"FI ({metric} similarity)")
    fig.suptitle("Faithfulness: latent similarity of class regions vs influence rank "
                 "(shaded: proponent / opponent windows, grey: neutral middle)")
    return _save(fig, path)


def similarity_vs_score(path: Path, abs_scores: Sequence[np.ndarray], sims: Sequence[np.ndarray],
                        rhos: Sequence[dict], metric: str, max_points: int = 6000, seed: int = 0) -> str:
    """Scatter of |patient score| against S (mean over filters) per class, with Spearman rho."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), layout="constrained")
    rng = np.random.default_rng(seed)
    for c, ax in enumerate(axes):
        x, y = np.asarray(abs_scores[c]).ravel(), np.asarray(sims[c]).ravel()
        ok = np.isfinite(x) & np.isfinite(y)
        x, y = x[ok], y[ok]
        if x.size > max_points:
            pick = rng.choice(x.size, max_points, replace=False)
            x, y = x[pick], y[pick]
        ax.scatter(x, y, s=6, color=color(c), alpha=0.5, lw=0)
        if x.size and x.min() > 0 and x.max() / x.min() > 100:
            ax.set_xscale("log")
        else:
            ax.xaxis.set_major_locator(MaxNLocator(5))
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
        rho = rhos[c].get("rho", float("nan"))
        ax.set_title(f"{CLASS_NAMES[c]}: Spearman rho = {rho:.3f} (n={rhos[c].get('n_pairs', 0)})")
        ax.set_xlabel("|patient score|")
    axes[0].set_ylabel(f"S, mean over filters ({metric})")
    return _save(fig, path)


def ablation_per_filter(path: Path, drops: dict, selected: np.ndarray) -> str:
    """Dice drop when zeroing each filter; rows: splits, columns: classes; selected in class colour."""
    splits = list(drops)
    fig, axes = plt.subplots(len(splits), 3, figsize=(12, 2.9 * len(splits) + 0.4),
                             layout="constrained", squeeze=False)
    for r, split in enumerate(splits):
        for c in range(3):
            ax = axes[r, c]
            d = np.asarray(drops[split][c])
            x = np.arange(d.size)
            cols = [color(c) if s else NEUTRAL for s in selected[c]]
            ax.bar(x, np.nan_to_num(d), color=cols, width=0.85)
            ax.axhline(0, color="black", lw=0.6)
            ax.set_title(f"{CLASS_NAMES[c]} ({split}): {int(selected[c].sum())} selected")
            ax.set_xlabel("filter")
            if c == 0:
                ax.set_ylabel("Dice drop")
            ax.set_xlim(-0.8, d.size - 0.2)
    handles = [Patch(color=color(c), label=f"selected ({CLASS_NAMES[c]})") for c in range(3)]
    handles.append(Patch(color=NEUTRAL, label="not selected"))
    fig.legend(handles=handles, loc="outside lower center", ncols=4, frameon=False)
    fig.suptitle("Per-filter ablation: hard Dice without the filter, subtracted from the full model's")
    return _save(fig, path)


def importance_histograms(path: Path, gaps: np.ndarray, selected: np.ndarray) -> str:
    """log|FI gap| of selected vs not selected filters, per class."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), layout="constrained")
    for c, ax in enumerate(axes):
        g = np.abs(np.asarray(gaps[c], float))
        ok = np.isfinite(g) & (g > 0)
        lg = np.log(g[ok])
        sel = np.asarray(selected[c], bool)[ok]
        if lg.size == 0:
            ax.text(0.5, 0.5, "no defined FI", ha="center", va="center", transform=ax.transAxes)
        else:
            bins = np.linspace(lg.min() - 1e-9, lg.max() + 1e-9, 16)
            h0, _, _ = ax.hist(lg[~sel], bins=bins, color=NEUTRAL, alpha=0.85,
                               label=f"not selected ({(~sel).sum()})")
            top = h0.max(initial=0)
            if sel.any():
                h1, _, _ = ax.hist(lg[sel], bins=bins, color=color(c), alpha=0.8,
                                   label=f"selected ({sel.sum()})")
                top = max(top, h1.max())
            else:
                ax.text(0.97, 0.95, "none selected", ha="right", va="top", transform=ax.transAxes)
            ax.set_ylim(0, top * 1.45 + 0.5)  # room for the legend above the bars
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(loc="upper left", frameon=False)
        ax.set_title(CLASS_NAMES[c])
        ax.set_xlabel("log |FI gap| (extremes - middle)")
    axes[0].set_ylabel("filters")
    return _save(fig, path)


def group_ablation(path: Path, groups: dict) -> str:
    """Dice drop of the selected set, random sets of the same size, and the least important set.

    groups[split][c] = {'selected': float, 'random': [float], 'least': float, 'size': int}.
    """
    splits = list(groups)
    fig, axes = plt.subplots(len(splits), 3, figsize=(11, 2.8 * len(splits) + 0.3),
                             layout="constrained", squeeze=False)
    for r, split in enumerate(splits):
        for c in range(3):
            ax = axes[r, c]
            g = groups[split][c]
            ax.set_title(f"{CLASS_NAMES[c]} ({split}), {g['size']} filters")
            if g["size"] == 0:
                ax.text(0.5, 0.5, "no filters selected", ha="center", va="center", transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            rnd = np.asarray(g["random"], float)
            vals = [g["selected"], float(np.nanmean(rnd)), g["least"]]
            err = [0, float(np.nanstd(rnd)), 0]
            ax.bar(range(3), np.nan_to_num(vals), yerr=err, color=[color(c), NEUTRAL, "white"],
                   edgecolor=[color(c), NEUTRAL, "black"], capsize=4, width=0.65)
            ax.scatter(np.full(rnd.size, 1.0) + np.linspace(-0.15, 0.15, rnd.size), rnd, s=10,
                       color="black", zorder=3)
            ax.axhline(0, color="black", lw=0.6)
            ax.set_xticks(range(3), ["selected", f"random\n({rnd.size} seeds)", "least\nimportant"])
            if c == 0:
                ax.set_ylabel("Dice drop")
    fig.suptitle("Group ablation: zeroing a whole set of filters")
    return _save(fig, path)
