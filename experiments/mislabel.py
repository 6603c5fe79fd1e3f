"""Mislabel detection by class-wise self-influence: TracIn's own headline test, made class-wise.

Run (from the repository root)::

    python -m experiments.mislabel                       # synthetic default -> runs/mislabel/
    python -m experiments.mislabel --data PATH/TO/BraTS  # the same on a real dataset
    python -m experiments.mislabel --subsets head        # skip the slow full-model gradients
    python -m experiments.mislabel --ce-subsets head,all # cross-entropy gradients for 'all' too

Time here (2 CPU cores shared with other jobs): 5.6 minutes from scratch (data 30 s, training
2 min, ``all`` influence with projection 2 min, ``head`` influence with Dice and cross-entropy
gradients 20 s, the per-checkpoint diagnostic 35 s, metrics and figures 13 s); up to twice that
when the cores are busy. The EK-FAC, LoGra and TRAK self-scores add about 10 minutes more
(TRAK trains 3 full-data models; measured with two other jobs on the cores: EK-FAC 48-54 s per
loss, LoGra 110 s, TRAK 383 s; ``--ekfac-subsets ''``, ``--logra-rank 0`` and
``--trak-models 0`` skip them). A rerun reuses the data, the trained run, the TRAK models and
the feature stores and takes 1-2 minutes.

What it does:

1. writes a synthetic BraTS-2019-layout dataset (60 cases at 2 mm in-plane, 120 x 120 x 155,
   which gives the demo's 96 x 96 slices without downsampling; the 6 central slices 92..97 of
   the paper's 90..99): 48 training patients (288 slices), 12 test patients; or uses ``--data``;
2. corrupts 20% of the *training* patients (the split is the one training uses, so test
   patients stay clean), cycling through four realistic errors (oedema <-> necrosis swapped,
   enhancing rim relabelled as necrosis, mask shifted by 8 mm, another patient's mask), by
   writing a corrupted copy of the dataset: images and untouched segs are symbolic links, only
   the corrupted segs are rewritten with nibabel (same header and affine); the corrupted slices
   are those whose preprocessed labels differ from the clean ones;
3. trains the ``demo`` config on the corrupted copy (checkpoint every epoch) and computes
   class-wise self-influence (``split='train'``; checkpoints every second epoch ending at the
   last, like the paper's 6, 8, ..., 14) with the method's soft-Dice class gradients for the
   ``head`` subset (exact; also from the last checkpoint alone) and for ``all`` parameters
   (countsketch projection to 4096, the cheapest projection on CPU), and with region
   cross-entropy class gradients (``CE``,
   :func:`tracin_jax.training.losses.tumour_cross_entropy`, plugged into the engine
   as a ``grad_fn``) for ``head``; and both losses again with Adam-aware gradients for ``head``
   (``Dice head adam``, ``CE head adam``: each checkpoint's gradients preconditioned by its
   saved Adam state, :mod:`tracin_jax.influence.precondition`; ``--adam-subsets``), and as
   EK-FAC influence functions, g^T (F + lambda I)^-1 g with factors fitted at each checkpoint
   (``Dice head ekfac``, ``CE head ekfac``; ``--ekfac-subsets``); ``all`` once more with the
   LoGra per-layer projection (``Dice all logra``, rank ``--logra-rank``); and class-wise TRAK's
   self-score phi^T K^-1 phi Q on ``head`` with the run's last checkpoint and
   ``--trak-models`` - 1 full-data retrainings on the corrupted data (``TRAK head``);
4. ranks training slices and patients (patient = sum, or max, over its slices) and reports, per
   corruption type and overall, the fraction of corrupted items found vs the fraction
   inspected, ROC-AUC (with a 5-95% patient-bootstrap interval) and whether the class with the
   largest self-influence is one the corruption changed, beside two baselines: the Dice loss
   at the last checkpoint (per class and summed) and random ranking; and, as a diagnostic, the
   AUC of single-checkpoint ``head`` scores at every epoch.

Scores compared (higher = inspect first), per slice, for each gradient (``Dice head``,
``Dice head last``, ``Dice all``, ``CE head``, and the Adam, EK-FAC, LoGra and TRAK ones):

- ``classwise sum``: sum_j self-influence of class j (the diagonal of the 3 x 3 class matrix);
- ``classwise max-q``: each class's self-influence turned into its quantile among the slices
  where that class is present, then the max over classes ("the most unusual class of the item");
- ``total``: ordinary TracIn self-influence of the summed loss, sum over all 3 x 3 class pairs
  (read from the train-vs-train score tensor; not for TRAK, which scores the test split);
- ``class NCR/NET`` etc.: one class alone (in results.json);
- ``loss sum`` / ``loss max-q``: the same aggregations of the per-class Dice loss at the last
  checkpoint (an absent class has loss 1, so ``loss sum`` favours slices with few classes).

Outputs in ``--out`` (default ``runs/mislabel``): ``results.json`` (every number, the corrupted
patients and slices, timings; ``gradients``: for each gradient, ``{"spec": its influence
folder's meta.json spec, "last_epoch": the run's last epoch}``, which ``tracin-jax evaluate
--mislabel`` matches its folders against), ``summary.md`` (the tables), ``detection_curves.png``,
``auc.png``, ``class_attribution.png``, ``auc_by_checkpoint.png``, ``corruptions.png`` (one
example slice per corruption).

What it should show (measured numbers in experiments/README.md): self-influence from the soft
Dice gradients ranks corrupted slices *below* clean ones (AUC ~0.1-0.2), for ``head`` and
``all`` alike, because the Dice gradient w.r.t. a logit carries the factor p_c (1 - p_c), which
vanishes where the model confidently predicts the true tissue against a wrong label; with
cross-entropy gradients the same machinery detects them (AUC ~0.8), on par with the loss.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from tracin_jax.progress import tqdm

from experiments import ranking
from experiments._plots import legend_below, pyplot, save
from experiments.corruptions import (CORRUPTIONS, DESCRIPTIONS, Corruption, changed_classes,
                                     label_codes, write_corrupted_dataset)

CLASS_NAMES = ("NCR/NET", "ED", "ET")
SYNTH_SHAPE = (120, 120, 155)
# The demo config on 2 mm synthetic volumes: the paper's crop [27:219] at 1 mm is [14:110] at
# 2 mm, which is the demo's 96 x 96 without downsampling.
SYNTH_OVERRIDES = ("data.crop=14,110,14,110", "data.downsample=1", "data.slices=92:98")
GRID = np.linspace(0.0, 1.0, 101)
# Methods drawn in the figures (all are in results.json), with fixed colours and styles.
FIGURE_METHODS = {
    "Dice head classwise sum": ("#0072B2", "-"),
    "Dice head total": ("#0072B2", "--"),
    "Dice all classwise sum": ("#CC79A7", "-"),
    "CE head classwise sum": ("#E69F00", "-"),
    "CE head total": ("#E69F00", "--"),
    "CE all classwise sum": ("#8C564B", "-"),
    "Dice head adam classwise sum": ("#009E73", "-"),
    "CE head adam classwise sum": ("#D55E00", "-"),
    "Dice head ekfac classwise sum": ("#117733", "--"),
    "CE head ekfac classwise sum": ("#882255", "--"),
    "Dice all logra classwise sum": ("#AA4499", ":"),
    "TRAK head classwise sum": ("#44AA99", "-"),
    "loss sum": ("#333333", "-"),
    "loss max-q": ("#333333", ":"),
}
SOURCE_COLOURS = {"Dice head": "#0072B2", "Dice head last": "#56A0D3", "Dice all": "#CC79A7",
                  "CE head": "#E69F00", "CE all": "#8C564B", "Dice head adam": "#009E73",
                  "CE head adam": "#D55E00", "Dice head ekfac": "#117733",
                  "CE head ekfac": "#882255", "Dice all logra": "#AA4499", "TRAK head": "#44AA99",
                  "loss": "#333333", "random": "#999999"}
RANDOM_STYLE = ("#999999", (0, (1, 2)))
SHORT = {"all": "all corruptions", "swap": "swap ED<->NCR", "rim": "rim ET->NCR",
         "shift": "shifted mask", "foreign": "foreign mask"}


# -- planning the corruption -----------------------------------------------------------------

def patient_presence(labels: np.ndarray, cases) -> dict[str, np.ndarray]:
    """{case: bool[3]} whether NCR/NET, ED, ET occur in any of the patient's slices."""
    out: dict[str, np.ndarray] = {}
    for lab, case in zip(labels, cases):
        present = np.array([(lab == c + 1).any() for c in range(3)])
        out[case] = out.get(case, np.zeros(3, bool)) | present
    return out


def eligible(kind: str, present: np.ndarray) -> bool:
    """Whether a corruption of ``kind`` changes a patient whose slices hold ``present``."""
    if kind == "swap":
        return bool(present[0] or present[1])
    if kind == "rim":
        return bool(present[2])
    return bool(present.any())


def plan_corruptions(train_cases: list[str], presence: dict[str, np.ndarray], fraction: float,
                     seed: int, kinds=CORRUPTIONS, shift_mm: float = 8.0) -> list[Corruption]:
    """Chooses round(fraction * n) training patients (at least 1) and a corruption for each.

    Kinds are assigned in turn (swap, rim, shift, foreign, swap, ...) to patients in a random
    order, each to the next patient it would change; a ``foreign`` donor is a random uncorrupted
    training patient with tumour; a ``shift`` goes ``shift_mm`` along one in-plane axis, in a
    random direction.
    """
    rng = np.random.default_rng(seed)
    patients = sorted(train_cases)
    n = max(1, int(round(fraction * len(patients))))
    if n >= len(patients):
        raise ValueError(f"fraction {fraction} would corrupt all {len(patients)} training patients")
    order = [patients[i] for i in rng.permutation(len(patients))]
    chosen: list[Corruption] = []
    used: set[str] = set()
    for k in range(n):
        kind = kinds[k % len(kinds)]
        case = next((p for p in order if p not in used and eligible(kind, presence[p])), None)
        if case is None:
            continue
        used.add(case)
        chosen.append(Corruption(case=case, kind=kind))
    for c in chosen:
        if c.kind == "shift":
            axis, sign = int(rng.integers(2)), float(rng.choice([-1.0, 1.0]))
            c.shift_mm = (sign * shift_mm, 0.0) if axis == 0 else (0.0, sign * shift_mm)
        elif c.kind == "foreign":
            donors = [p for p in patients if p not in used and presence[p].any()]
            c.donor = donors[int(rng.integers(len(donors)))]
    return chosen


# -- scores --------------------------------------------------------------------------------

def self_influence_matrices(influence_dir: Path) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """(S f32[n, 3, 3], self f32[n, 3], present bool[n, 3]) of a ``split='train'`` influence
    folder: S[b, i, j] = sum_t eta_t <g_i(b), g_j(b)>, the diagonal blocks of the train-vs-train
    score tensor; ``self`` is the engine's self_influence.npy (= the diagonal of S). A TRAK
    folder (test split) has no train-vs-train tensor: S is None and ``self`` is its self-score."""
    blocks = None
    if (influence_dir / "scores.npy").exists() and json.loads(
            (influence_dir / "meta.json").read_text()).get("split") == "train":
        scores = np.load(influence_dir / "scores.npy", mmap_mode="r")  # [n, 3, n, 3]
        n = scores.shape[0]
        blocks = np.stack([np.asarray(scores[b, :, b, :]) for b in range(n)])
    self_inf = np.load(influence_dir / "self_influence.npy")
    present = np.load(influence_dir / "train_present.npy")
    return blocks, self_inf, present


def checkpoint_losses(run, variables, batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """f32[n_train, 3]: per-class Dice loss of every training slice under ``variables``
    (inference mode, as the gradients)."""
    import jax
    import jax.numpy as jnp

    cached = _LOSS_FNS.get(id(run))
    if cached is None or cached[0] is not run:
        cached = _LOSS_FNS[id(run)] = (run, jax.jit(lambda v, x, y: run.classwise_loss(run.apply(v, x), y)))
    fn = cached[1]
    images, labels = run.train.images, run.train.labels
    out = []
    for s in tqdm(range(0, len(images), batch_size), desc="losses", unit="batch",
                  disable=not progress, leave=False):
        out.append(np.asarray(fn(variables, jnp.asarray(images[s:s + batch_size]),
                                 jnp.asarray(labels[s:s + batch_size], jnp.int32))))
    return np.concatenate(out)


def label_confidence(run, variables, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Per training slice: the mean softmax probability of the *labelled* class over its tumour
    pixels, and the fraction of those pixels where it is below 0.1 (NaN without tumour).

    Where that probability is ~0 the soft-Dice gradient w.r.t. the logits (factor p (1 - p))
    vanishes while the cross-entropy gradient (p - y) does not: the diagnostic behind the
    Dice / CE contrast.
    """
    import jax
    import jax.numpy as jnp

    images, labels = run.train.images, run.train.labels
    mean, low = np.full(len(images), np.nan), np.full(len(images), np.nan)
    for s in range(0, len(images), batch_size):
        p = np.asarray(jax.nn.softmax(run.apply(variables, jnp.asarray(images[s:s + batch_size])), -1))
        lab = labels[s:s + batch_size].astype(np.int64)
        py = np.take_along_axis(p, lab[..., None], -1)[..., 0]
        for k in range(len(lab)):
            tum = lab[k] > 0
            if tum.any():
                mean[s + k] = py[k][tum].mean()
                low[s + k] = (py[k][tum] < 0.1).mean()
    return mean, low


_GRAD_FNS: dict = {}
_LOSS_FNS: dict = {}


def class_grad_fn(run, subset_name: str, loss: str, proj_dim: int | None, proj_kind: str | None):
    """The engine's class-gradient function for a subset, with the Dice (training) loss or the
    region cross-entropy, optionally projected (one per run and setting, so it compiles once)."""
    key = (id(run), subset_name, loss, proj_dim, proj_kind)
    cached = _GRAD_FNS.get(key)
    if cached is None or cached[0] is not run:  # the run is kept alive, so its id is not reused
        cached = _GRAD_FNS[key] = (run, _build_class_grad_fn(run, subset_name, loss, proj_dim, proj_kind))
    return cached[1]


def _build_class_grad_fn(run, subset_name, loss, proj_dim, proj_kind):
    from tracin_jax.influence import run_grad_fn

    return run_grad_fn(run, subset_name, proj_dim=proj_dim, proj_kind=proj_kind,
                       loss={"Dice": "dice", "CE": "ce"}[loss])


def per_checkpoint_auc(run, positive: np.ndarray, progress: bool = True) -> dict:
    """Slice ROC-AUC at every saved epoch of: 'head' self-influence with Dice and with CE
    gradients (summed over classes), and the summed Dice loss."""
    from tracin_jax.influence import class_tracin

    fns = {loss: class_grad_fn(run, "head", loss, None, None) for loss in ("Dice", "CE")}
    out = {"epochs": [], "Dice head classwise sum": [], "CE head classwise sum": [], "loss sum": []}
    images, labels = run.train.images, run.train.labels
    for ckpt in tqdm(run.checkpoints, desc="per-checkpoint AUC", disable=not progress, leave=False):
        out["epochs"].append(ckpt.epoch)
        for loss, fn in fns.items():
            _, self_inf = class_tracin(fn, [ckpt], images, labels, images[:1], labels[:1])
            out[f"{loss} head classwise sum"].append(ranking.roc_auc(self_inf.sum(axis=1), positive))
        losses = checkpoint_losses(run, ckpt.variables, progress=False)
        out["loss sum"].append(ranking.roc_auc(losses.sum(axis=1), positive))
    return out


def method_scores(blocks: dict[str, tuple], losses: np.ndarray, present: np.ndarray
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Slice scores of every method, and the per-class score matrix used for class attribution.

    ``blocks``: subset name -> (S [n, 3, 3], self [n, 3]).
    Returns ({method: f64[n]}, {per-class source: f64[n, 3]}).
    """
    scores, per_class = {}, {}
    for name, (S, self_inf) in blocks.items():
        scores[f"{name} classwise sum"] = self_inf.sum(axis=1)
        scores[f"{name} classwise max-q"] = ranking.quantile_normalise(self_inf, present).max(axis=1)
        if S is not None:
            scores[f"{name} total"] = S.sum(axis=(1, 2))
        per_class[name] = self_inf
        for c, cname in enumerate(CLASS_NAMES):
            scores[f"{name} class {cname}"] = self_inf[:, c]
    scores["loss sum"] = losses.sum(axis=1)
    scores["loss max-q"] = ranking.quantile_normalise(losses, present).max(axis=1)
    for c, cname in enumerate(CLASS_NAMES):
        scores[f"loss class {cname}"] = losses[:, c]
    per_class["loss"] = losses
    return scores, per_class


# -- metrics -------------------------------------------------------------------------------

def ranking_metrics(score: np.ndarray, positive: np.ndarray, kind_of: np.ndarray, fraction: float,
                    kinds) -> dict:
    """AUC, found@{fraction, 10%, 30%} and the detection curve, overall and per kind (positives
    of that kind against the clean items)."""
    out = {}
    groups = [("all", np.ones(len(score), bool))]
    groups += [(k, (~positive) | (kind_of == k)) for k in kinds]
    for name, keep in groups:
        pos = positive[keep]
        s = score[keep]
        out[name] = {
            "n_items": int(keep.sum()), "n_corrupted": int(pos.sum()),
            "auc": ranking.roc_auc(s, pos),
            "found_at_corrupted_fraction": ranking.found_at(s, pos, pos.mean()) if pos.any() else None,
            "found_at_10pct": ranking.found_at(s, pos, 0.10) if pos.any() else None,
            "found_at_30pct": ranking.found_at(s, pos, 0.30) if pos.any() else None,
            "curve": [round(float(v), 4) for v in ranking.curve_on_grid(s, pos, GRID)] if pos.any() else None,
        }
    return out


def bootstrap_auc(score: np.ndarray, positive: np.ndarray, groups, reps: int = 1000,
                  seed: int = 0) -> tuple[float, float]:
    """5%-95% interval of the AUC when patients (``groups``) are resampled with replacement,
    corrupted and clean patients separately (so every replicate has both)."""
    rng = np.random.default_rng(seed)
    groups = np.asarray([str(g) for g in groups])
    ids = np.unique(groups)
    members = {g: np.flatnonzero(groups == g) for g in ids}
    bad = [g for g in ids if positive[members[g]].any()]
    good = [g for g in ids if not positive[members[g]].any()]
    if not bad or not good:
        return float("nan"), float("nan")
    vals = []
    for _ in range(reps):
        pick = list(rng.choice(bad, len(bad))) + list(rng.choice(good, len(good)))
        idx = np.concatenate([members[g] for g in pick])
        vals.append(ranking.roc_auc(score[idx], positive[idx]))
    lo, hi = np.nanpercentile(vals, [5, 95])
    return float(lo), float(hi)


def random_spread(positive: np.ndarray, reps: int = 1000, seed: int = 0) -> dict:
    """Mean and sd of AUC and of found@corrupted-fraction over random orders (chance level and
    its noise for this number of corrupted items)."""
    rng = np.random.default_rng(seed)
    aucs, found = [], []
    for _ in range(reps):
        s = rng.random(len(positive))
        aucs.append(ranking.roc_auc(s, positive))
        found.append(ranking.found_at(s, positive, positive.mean()))
    return {"auc_mean": float(np.mean(aucs)), "auc_sd": float(np.std(aucs)),
            "found_at_corrupted_fraction_mean": float(np.mean(found)),
            "found_at_corrupted_fraction_sd": float(np.std(found))}


def class_attribution(per_class: np.ndarray, changed: np.ndarray, present: np.ndarray,
                      kind_of: np.ndarray, kinds) -> dict:
    """Fraction of corrupted slices whose top class (argmax over the classes present in the
    training label) is one the corruption changed; per kind and overall."""
    corrupted = changed.sum(axis=1) > 0
    masked = np.where(present, per_class, -np.inf)
    top = np.argmax(masked, axis=1)
    hit = changed[np.arange(len(top)), top] > 0
    out = {}
    for name in ("all", *kinds):
        sel = corrupted & present.any(axis=1) & ((kind_of == name) if name != "all" else True)
        out[name] = {"n": int(sel.sum()), "hit_rate": float(hit[sel].mean()) if sel.any() else None}
    return out


def random_attribution(changed: np.ndarray, present: np.ndarray, kind_of: np.ndarray, kinds) -> dict:
    """Expected hit rate of a class drawn uniformly among the present classes."""
    corrupted = changed.sum(axis=1) > 0
    p = np.where(present.any(axis=1),
                 ((changed > 0) & present).sum(axis=1) / np.maximum(present.sum(axis=1), 1), 0.0)
    out = {}
    for name in ("all", *kinds):
        sel = corrupted & present.any(axis=1) & ((kind_of == name) if name != "all" else True)
        out[name] = {"n": int(sel.sum()), "hit_rate": float(p[sel].mean()) if sel.any() else None}
    return out


# -- figures -------------------------------------------------------------------------------


def plot_detection_curves(results: dict, kinds, path: Path) -> None:
    plt = pyplot()
    levels = [("slices", "slices"), ("patients (sum)", "patients_sum")]
    cols = ["all", *kinds]
    fig, axes = plt.subplots(len(levels), len(cols), figsize=(3.0 * len(cols), 3.0 * len(levels)),
                             sharex=True, sharey=True, squeeze=False)
    for r, (title, key) in enumerate(levels):
        for c, group in enumerate(cols):
            ax = axes[r][c]
            ax.plot([0, 1], [0, 1], color=RANDOM_STYLE[0], ls=RANDOM_STYLE[1], lw=1.2, label="random")
            n_bad = None
            for method, (colour, ls) in FIGURE_METHODS.items():
                m = results[key]["methods"].get(method)
                if m is None or m[group]["curve"] is None:
                    continue
                n_bad = m[group]["n_corrupted"]
                ax.plot(GRID, m[group]["curve"], color=colour, ls=ls, lw=1.4, label=method)
            ax.set_title(f"{title}: {SHORT[group]}" + (f" (n={n_bad})" if n_bad is not None else ""),
                         fontsize=8.5)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.01)
            ax.grid(alpha=0.3)
            if r == len(levels) - 1:
                ax.set_xlabel("fraction inspected")
            if c == 0:
                ax.set_ylabel("fraction of corrupted found")
    legend_below(fig, axes[0][0])
    fig.suptitle("Mislabel detection: training items ranked by self-influence (Dice: the class-wise "
                 "Dice gradients of the method; CE: region cross-entropy gradients) vs the loss")
    save(fig, path, rect=(0, 0.06, 1, 0.96))


def plot_auc(results: dict, kinds, path: Path) -> None:
    plt = pyplot()
    methods = [m for m in FIGURE_METHODS if m in results["slices"]["methods"]]
    groups = ["all", *kinds]
    levels = [("slices", "slices"), ("patients (sum over slices)", "patients_sum"),
              ("patients (max over slices)", "patients_max")]
    fig, axes = plt.subplots(1, len(levels), figsize=(5.0 * len(levels), 3.6), sharey=True)
    width = 0.8 / (len(methods) + 1)
    x = np.arange(len(groups))
    for ax, (title, key) in zip(axes, levels):
        for k, method in enumerate(methods):
            colour, ls = FIGURE_METHODS[method]
            vals = [results[key]["methods"][method][g]["auc"] for g in groups]
            hatch = {"-": None, ":": "...", "--": "///"}[ls]
            ax.bar(x + (k - len(methods) / 2) * width, vals, width, color=colour,
                   alpha=0.55 if hatch else 0.9, hatch=hatch, edgecolor="white", lw=0, label=method)
        ax.axhline(0.5, color=RANDOM_STYLE[0], ls="--", lw=1, label="random (0.5)")
        ax.set_xticks(x - width / 2)
        ax.set_xticklabels(["all"] + [k for k in kinds])
        ax.set_ylim(0, 1)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("ROC-AUC")
    legend_below(fig, axes[0])
    fig.suptitle("ROC-AUC of corrupted vs clean training items, per corruption type "
                 "(swap: ED<->NCR, rim: ET->NCR, shift, foreign mask)")
    save(fig, path, rect=(0, 0.1, 1, 0.93))


def plot_class_attribution(attr: dict, kinds, path: Path) -> None:
    plt = pyplot()
    sources = [s for s in SOURCE_COLOURS if s in attr]
    colours = SOURCE_COLOURS
    groups = ["all", *kinds]
    fig, ax = plt.subplots(figsize=(8.5, 4.0))
    width = 0.8 / len(sources)
    x = np.arange(len(groups))
    for k, s in enumerate(sources):
        vals = [attr[s][g]["hit_rate"] if attr[s][g]["hit_rate"] is not None else np.nan for g in groups]
        ax.bar(x + (k - (len(sources) - 1) / 2) * width, vals, width, color=colours[s],
               label={"random": "random present class", "loss": "largest loss at last checkpoint"}.get(
                   s, f"largest self-influence ({s})"))
    ax.set_xticks(x)
    ax.set_xticklabels([f"{g}\n(n={attr[sources[0]][g]['n']})" for g in groups])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction of corrupted slices")
    ax.set_title("Is the top class of a corrupted slice one that the corruption changed?")
    ax.grid(axis="y", alpha=0.3)
    legend_below(fig, ax, ncol=3)
    save(fig, path, rect=(0, 0.15, 1, 1))


def plot_auc_by_checkpoint(by_epoch: dict, used: list[int], path: Path) -> None:
    """Slice AUC of single-checkpoint scores at every saved epoch."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for name in ("Dice head classwise sum", "CE head classwise sum", "loss sum"):
        colour, ls = FIGURE_METHODS[name]
        ax.plot(by_epoch["epochs"], by_epoch[name], color=colour, ls=ls, marker="o", ms=4,
                label=name.replace("classwise sum", "self-influence"))
    ax.axhline(0.5, color=RANDOM_STYLE[0], ls="--", lw=1, label="random")
    for e in used:
        ax.axvline(e, color="#dddddd", lw=3, zorder=0)
    ax.set_ylim(0, 1)
    ax.set_xlabel("epoch of the single checkpoint (grey: checkpoints used for TracIn)")
    ax.set_ylabel("ROC-AUC, slices")
    ax.set_title("Mislabel detection from one checkpoint at a time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower right")
    save(fig, path)


def plot_examples(clean, corrupted, changed: np.ndarray, kind_of: np.ndarray, kinds, path: Path) -> None:
    """One corrupted slice per kind (the most changed): FLAIR, clean labels, corrupted labels."""
    plt = pyplot()
    from matplotlib.colors import to_rgba
    from matplotlib.patches import Patch

    from tracin_jax.explain.figures import CLASS_COLORS

    def overlay(ax, img, lab):
        lo, hi = np.percentile(img, [0.5, 99.5])
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
        rgba = np.zeros(lab.shape + (4,))
        for c, name in enumerate(CLASS_NAMES):
            rgba[lab == c + 1] = to_rgba(CLASS_COLORS[name], 0.65)
        ax.imshow(rgba, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])

    shown = [k for k in kinds if (kind_of == k).any()]
    fig, axes = plt.subplots(2, max(1, len(shown)), figsize=(2.6 * max(1, len(shown)), 5.4), squeeze=False)
    for col, k in enumerate(shown):
        idx = np.flatnonzero(kind_of == k)
        b = idx[np.argmax(changed[idx].sum(axis=1))]
        overlay(axes[0][col], clean.images[b, :, :, 0], clean.labels[b])
        overlay(axes[1][col], corrupted.images[b, :, :, 0], corrupted.labels[b])
        axes[0][col].set_title(f"{DESCRIPTIONS[k]}\n{clean.ids[b]}", fontsize=7.5)
    axes[0][0].set_ylabel("clean label")
    axes[1][0].set_ylabel("corrupted label")
    fig.legend(handles=[Patch(color=CLASS_COLORS[n], label=n) for n in CLASS_NAMES],
               loc="lower center", ncol=3, frameon=False)
    save(fig, path, rect=(0, 0.05, 1, 1))


# -- the experiment ------------------------------------------------------------------------

def every_second_epoch(epochs: list[int], count: int = 5) -> list[int]:
    """Up to ``count`` epochs, every second one counting back from the last (6 -> 2, 4, 6)."""
    chosen = epochs[::-1][::2][:count]
    return sorted(chosen)


def build_config(args):
    from tracin_jax.config import apply_overrides, get_config

    overrides = list(SYNTH_OVERRIDES) if args.data is None and tuple(args.shape) == SYNTH_SHAPE else []
    return apply_overrides(get_config(args.config), overrides + list(args.set or []))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.mislabel",
                                description="Mislabel detection by class-wise self-influence.")
    p.add_argument("--out", default="runs/mislabel", help="output folder (data, run, results)")
    p.add_argument("--data", default=None, help="a clean BraTS dataset (default: synthetic)")
    p.add_argument("--cases", type=int, default=60, help="synthetic cases")
    p.add_argument("--synth-seed", type=int, default=0)
    p.add_argument("--shape", type=lambda s: tuple(int(v) for v in s.split(",")), default=SYNTH_SHAPE,
                   help="synthetic volume shape (default 120,120,155: 2 mm in-plane)")
    p.add_argument("--config", default="demo", help="paper | demo | tiny")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--fraction", type=float, default=0.2, help="fraction of training patients corrupted")
    p.add_argument("--kinds", default=",".join(CORRUPTIONS), help="corruptions, assigned in turn")
    p.add_argument("--shift-mm", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=0, help="seed of the corruption plan")
    p.add_argument("--checkpoints", default=None,
                   help="epochs for TracIn, e.g. 2,4,6 (default: every second epoch ending at the last)")
    p.add_argument("--subsets", default="head,all", help="parameter subsets (Dice gradients): head and/or all")
    p.add_argument("--ce-subsets", default="head",
                   help="subsets also run with region cross-entropy gradients ('' for none; 'head,all')")
    p.add_argument("--adam-subsets", default="head",
                   help="subsets also scored with Adam-preconditioned gradients (Dice and CE; "
                        "empty: none)")
    p.add_argument("--ekfac-subsets", default="head",
                   help="subsets also scored with EK-FAC influence functions, g^T (F + lambda I)^-1 g "
                        "(Dice and CE; empty: none)")
    p.add_argument("--logra-rank", type=int, default=16,
                   help="per-layer rank of a LoGra-projected 'all' Dice gradient (0: none)")
    p.add_argument("--trak-models", type=int, default=4,
                   help="models of a class-wise TRAK self-score on 'head' (the run + N-1 full-data "
                        "retrainings; 0: none)")
    p.add_argument("--proj-dim", type=int, default=4096, help="projection dimension for 'all'")
    p.add_argument("--proj-kind", default="countsketch",
                   help="projection for 'all' (countsketch is cheapest on CPU; rademacher, gaussian)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--bootstrap", type=int, default=1000, help="patient-bootstrap replicates of the AUC")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def run(args) -> dict:
    import tracin_jax
    from tracin_jax.data import discover_cases, load_dataset, write_synthetic_dataset
    from tracin_jax.data.labels import LAYOUT_CONVENTION
    from tracin_jax.influence import run_influence
    from tracin_jax.training.train import train_and_evaluate

    progress = not args.no_progress
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    for k in kinds:
        if k not in CORRUPTIONS:
            raise SystemExit(f"--kinds: unknown corruption {k!r} (one of {', '.join(CORRUPTIONS)})")
    subsets = [s.strip() for s in args.subsets.split(",") if s.strip()]
    ce_subsets = [s.strip() for s in args.ce_subsets.split(",") if s.strip()]
    adam_subsets = [s.strip() for s in args.adam_subsets.split(",") if s.strip()]
    ekfac_subsets = [s.strip() for s in args.ekfac_subsets.split(",") if s.strip()]
    timings: dict[str, float] = {}
    config = build_config(args)

    # 1. clean data.
    t = time.perf_counter()
    if args.data is None:
        data_dir = out / "data"
        write_synthetic_dataset(data_dir, cases=args.cases, seed=args.synth_seed, progress=progress,
                                shape=tuple(args.shape))
    else:
        data_dir = Path(args.data)
    clean = load_dataset(data_dir, config.data, progress=progress)
    timings["data_s"] = time.perf_counter() - t

    # 2. corrupted copy: only training patients, through the real files.
    t = time.perf_counter()
    layout, cases = discover_cases(data_dir, config.data.layout, config.data.grades)
    cases = [c for c in cases if c.case_id in set(clean.info["train_cases"]) | set(clean.info["test_cases"])]
    presence = patient_presence(clean.train.labels, clean.train.cases)
    train_patients = sorted(set(clean.info["train_cases"]))
    for p in train_patients:
        presence.setdefault(p, np.zeros(3, bool))
    plan = plan_corruptions(train_patients, presence, args.fraction, args.seed, kinds, args.shift_mm)
    codes = label_codes(LAYOUT_CONVENTION[layout])
    corrupt_dir = out / "data-corrupted"
    write_corrupted_dataset(cases, corrupt_dir, plan, codes)
    corrupted = load_dataset(corrupt_dir, config.data, progress=progress)
    if corrupted.train.ids != clean.train.ids or not np.array_equal(corrupted.test.labels, clean.test.labels):
        raise RuntimeError("the corrupted copy does not keep the split / test labels of the clean data")
    changed = changed_classes(clean.train.labels, corrupted.train.labels)
    kind_by_case = {c.case: c.kind for c in plan}
    slice_bad = changed.sum(axis=1) > 0
    kind_of = np.array([kind_by_case.get(c, "") if bad else "" for c, bad in zip(clean.train.cases, slice_bad)])
    timings["corrupt_s"] = time.perf_counter() - t

    # 3. training on the corrupted copy.
    t = time.perf_counter()
    workdir = out / "run"
    train_and_evaluate(config, corrupt_dir, workdir, progress=progress,
                       log=lambda s: print(s, file=sys.stderr))
    timings["train_s"] = time.perf_counter() - t
    run_ = tracin_jax.load_run(workdir)
    epochs = [c.epoch for c in run_.checkpoints]
    ckpts = ([int(e) for e in args.checkpoints.split(",")] if args.checkpoints
             else every_second_epoch(epochs))
    metrics_lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines() if l.strip()]

    # 4. self-influence (train vs train): Dice gradients (the paper's, the engine's default) per
    # subset, the last checkpoint alone for 'head', and region cross-entropy gradients.
    blocks, metas, gradients = {}, {}, {}
    present = None
    variants = []  # (name, subset, loss, checkpoints, precondition, method, projection)
    def proj(subset):  # 'all' is projected, 'head' exact
        return (args.proj_dim, args.proj_kind) if subset == "all" else (None, None)

    for loss in ("Dice", "CE"):
        for s in (subsets if loss == "Dice" else ce_subsets):
            variants.append((f"{loss} {s}", s, loss, ckpts, None, "tracin", proj(s)))
            if s == "head" and loss == "Dice" and len(ckpts) > 1:
                variants.append(("Dice head last", "head", loss, [ckpts[-1]], None, "tracin",
                                 proj(s)))
        # Adam-aware TracIn: each checkpoint's gradients preconditioned by its Adam state.
        for s in adam_subsets:
            variants.append((f"{loss} {s} adam", s, loss, ckpts, "adam", "tracin", proj(s)))
        # EK-FAC influence functions: g^T (F + lambda I)^-1 g, factors fitted per checkpoint.
        for s in ekfac_subsets:
            variants.append((f"{loss} {s} ekfac", s, loss, ckpts, None, "ekfac", proj(s)))
    if args.logra_rank > 0:
        variants.append(("Dice all logra", "all", "Dice", ckpts, None, "tracin",
                         (args.logra_rank, "logra")))
    if args.trak_models > 0:
        variants.append(("TRAK head", "head", "Dice", ckpts, None, "trak", (None, None)))
    for name, subset, loss, eps, precondition, method, projection in variants:
        t = time.perf_counter()
        folder = out / f"influence-{name.replace(' ', '-')}"
        if method == "trak":
            # TRAK's self-score phi^T K^-1 phi Q of every training slice, from the run's last
            # checkpoint and trak_models - 1 models retrained on the same (corrupted) data.
            # (the models' training is announced on stderr)
            meta = run_influence(workdir, folder, method="trak", models_from="seeds",
                                 models=args.trak_models, params=subset,
                                 batch_size=args.batch_size, progress=progress)
        elif method == "ekfac":
            meta = run_influence(workdir, folder, checkpoints=eps, split="train", method="ekfac",
                                 params=subset, proj_dim=projection[0],
                                 proj_kind=projection[1] or "countsketch",
                                 loss={"Dice": "dice", "CE": "ce"}[loss],
                                 batch_size=args.batch_size, progress=progress)
        else:
            grad_fn = class_grad_fn(run_, subset, loss, *projection)
            meta = run_influence(workdir, folder, checkpoints=eps, split="train", grad_fn=grad_fn,
                                 batch_size=args.batch_size, progress=progress,
                                 precondition=precondition)
        S, self_inf, present = self_influence_matrices(folder)
        diag_err = (None if S is None else
                    float(np.max(np.abs(np.einsum("bii->bi", S) - self_inf)) /
                          max(float(np.max(np.abs(self_inf))), 1e-30)))
        blocks[name] = (S, self_inf)
        metas[name] = {"checkpoints": eps, "params": subset, "loss": loss, "method": method,
                       "precondition": precondition,
                       "param_count": meta["params"].get("size"), "projection": meta["projection"],
                       "gradient_tag": meta["gradient"]["tag"],
                       "trak_models": (meta.get("trak") or {}).get("models"),
                       "timings": meta["timings"], "wall_s": time.perf_counter() - t,
                       "self_influence_vs_diagonal_max_rel_err": diag_err}
        # What `tracin-jax evaluate --mislabel` matches a folder of another run against: the
        # folder's spec, and this run's last epoch (last checkpoint alone vs several).
        gradients[name] = {"spec": meta.get("spec"), "last_epoch": int(epochs[-1])}
        timings[f"influence_{name.replace(' ', '_')}_s"] = time.perf_counter() - t

    # Diagnostic: AUC of single-checkpoint 'head' self-influence (Dice and CE) and of the loss,
    # at every saved epoch.
    t = time.perf_counter()
    by_epoch = per_checkpoint_auc(run_, slice_bad, progress) if "head" in subsets else None
    timings["per_checkpoint_s"] = time.perf_counter() - t

    # 5. baselines and scores.
    t = time.perf_counter()
    losses = checkpoint_losses(run_, run_.checkpoints[-1].variables, progress=progress)
    scores, per_class = method_scores(blocks, losses, present)
    cases_arr = np.asarray(clean.train.cases)
    results: dict = {"slices": {"methods": {}}, "patients_sum": {"methods": {}},
                     "patients_max": {"methods": {}}}
    patients, _ = ranking.group_scores(np.zeros(len(cases_arr)), cases_arr)
    pat_bad = np.array([slice_bad[cases_arr == p].any() for p in patients])
    pat_kind = np.array([kind_by_case.get(p, "") if b else "" for p, b in zip(patients, pat_bad)])
    for method, sc in scores.items():
        m = ranking_metrics(sc, slice_bad, kind_of, args.fraction, kinds)
        m["all"]["auc_interval_90"] = bootstrap_auc(sc, slice_bad, cases_arr, args.bootstrap)
        results["slices"]["methods"][method] = m
        for how in ("sum", "max"):
            _, ps = ranking.group_scores(sc, cases_arr, how)
            pm = ranking_metrics(ps, pat_bad, pat_kind, args.fraction, kinds)
            results[f"patients_{how}"]["methods"][method] = pm
    results["slices"]["random"] = random_spread(slice_bad)
    results["patients_sum"]["random"] = results["patients_max"]["random"] = random_spread(pat_bad)
    attribution = {name: class_attribution(pc, changed, present, kind_of, kinds)
                   for name, pc in per_class.items()}
    attribution["random"] = random_attribution(changed, present, kind_of, kinds)
    conf_mean, conf_low = label_confidence(run_, run_.checkpoints[-1].variables)
    confidence = {}
    for name in ("clean", *kinds):
        sel = (kind_of == "") if name == "clean" else (kind_of == name)
        confidence[name] = {"n": int(sel.sum()),
                            "mean_p_label": float(np.nanmean(conf_mean[sel])) if sel.any() else None,
                            "fraction_p_label_below_0.1": float(np.nanmean(conf_low[sel])) if sel.any() else None}
    timings["metrics_s"] = time.perf_counter() - t

    # 6. files.
    t = time.perf_counter()
    plot_detection_curves(results, kinds, out / "detection_curves.png")
    plot_auc(results, kinds, out / "auc.png")
    plot_class_attribution(attribution, kinds, out / "class_attribution.png")
    plot_examples(clean.train, corrupted.train, changed, kind_of, kinds, out / "corruptions.png")
    if by_epoch is not None:
        plot_auc_by_checkpoint(by_epoch, ckpts, out / "auc_by_checkpoint.png")
    timings["figures_s"] = time.perf_counter() - t

    corrupted_slices = [
        {"id": i, "case": c, "kind": k, "changed_pixels": dict(zip(CLASS_NAMES, map(int, ch)))}
        for i, c, k, ch, bad in zip(clean.train.ids, clean.train.cases, kind_of, changed, slice_bad) if bad]
    summary = {
        "config": config.to_dict(),
        "data_dir": str(data_dir), "corrupted_data_dir": str(corrupt_dir),
        "n_train_slices": len(clean.train), "n_train_patients": len(train_patients),
        "n_test_slices": len(clean.test), "fraction": args.fraction, "kinds": list(kinds),
        "corrupted_patients": [
            {"case": c.case, "kind": c.kind, "shift_mm": c.shift_mm, "donor": c.donor, **c.extra,
             "changed_slices": int(slice_bad[cases_arr == c.case].sum())} for c in plan],
        "n_corrupted_slices": int(slice_bad.sum()), "n_corrupted_patients_effective": int(pat_bad.sum()),
        "corrupted_slices": corrupted_slices,
        "checkpoints": ckpts, "training": metrics_lines[-1] if metrics_lines else None,
        "influence": metas, "gradients": gradients, "auc_by_checkpoint": by_epoch,
        "grid": [float(g) for g in GRID],
        "results": results, "class_attribution": attribution, "label_confidence": confidence,
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    (out / "results.json").write_text(json.dumps(_clean_json(summary), indent=1) + "\n")
    table = summary_tables(summary, kinds)
    (out / "summary.md").write_text(table)
    print(table)
    return summary


def _clean_json(obj):
    if isinstance(obj, dict):
        return {str(k): _clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_json(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(f"{float(obj):.7g}")
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _clean_json(obj.tolist())
    return obj


def _f(v, digits=2):
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def summary_tables(summary: dict, kinds) -> str:
    """Markdown tables: AUC and found@corrupted-fraction per method and kind, class attribution."""
    res = summary["results"]
    lines = [f"Mislabel detection: {summary['n_train_patients']} training patients "
             f"({summary['n_train_slices']} slices), {len(summary['corrupted_patients'])} corrupted "
             f"({summary['n_corrupted_slices']} slices changed); checkpoints {summary['checkpoints']}.", ""]
    methods = [m for m in res["slices"]["methods"] if " class " not in m]
    for key, title in (("slices", "slices"), ("patients_sum", "patients, sum over slices"),
                       ("patients_max", "patients, max over slices")):
        counts = res[key]["methods"][methods[0]]
        head = " | ".join(f"{k} (n={counts[k]['n_corrupted']})" for k in ("all", *kinds))
        lines += [f"ROC-AUC, {title} (found at the corrupted fraction in brackets):", "",
                  f"| method | {head} |", "|---" * (len(kinds) + 2) + "|"]
        for m in methods:
            r = res[key]["methods"][m]
            cells = [f"{_f(r[k]['auc'])} ({_f(r[k]['found_at_corrupted_fraction'])})" for k in ("all", *kinds)]
            if key == "slices":
                lo, hi = r["all"]["auc_interval_90"]
                cells[0] += f" [{_f(lo)}-{_f(hi)}]"
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        rnd = res[key]["random"]
        lines.append(f"| random | {_f(rnd['auc_mean'])}±{_f(rnd['auc_sd'])} "
                     f"({_f(rnd['found_at_corrupted_fraction_mean'])}) |" + " |" * len(kinds))
        lines.append("")
    attr = summary["class_attribution"]
    lines += ["Top class of a corrupted slice is one the corruption changed (fraction of slices):", "",
              "| scores | " + " | ".join(f"{k} (n={attr['random'][k]['n']})" for k in ("all", *kinds)) + " |",
              "|---" * (len(kinds) + 2) + "|"]
    for name, a in attr.items():
        lines.append(f"| {name} | " + " | ".join(_f(a[k]["hit_rate"]) for k in ("all", *kinds)) + " |")
    conf = summary["label_confidence"]
    lines += ["", "Last checkpoint, tumour pixels of each slice: mean probability of the labelled class "
              "(fraction of pixels below 0.1):", "",
              "| " + " | ".join(f"{k} (n={v['n']})" for k, v in conf.items()) + " |",
              "|---" * len(conf) + "|",
              "| " + " | ".join(f"{_f(v['mean_p_label'])} ({_f(v['fraction_p_label_below_0.1'])})"
                                for v in conf.values()) + " |"]
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in summary["timings"].items()), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    from experiments._cli import run_main

    return run_main("experiments.mislabel", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
