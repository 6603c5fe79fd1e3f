"""Cheap sanity checks (no retraining): model randomisation and the mislabel-detection AUC.

Model randomisation (Adebayo et al. 2018; quanda's ModelRandomizationTest): the influence of
the same run is recomputed, with the same gradient function (subset, loss, projection,
normalisation) and the same checkpoints' learning rates, but every checkpoint's weights replaced
by a fresh random initialisation (checkpoint t gets key ``seed + t``). For each target (test
slice, class present) the Spearman correlation over training patients of the trained and the
randomised scores is taken; the mean over targets is reported. An attribution that explains the
*model* should give a low value; a high value means the ranking comes from the data alone (for
instance from image statistics that any weights would reproduce).

Mislabel AUC: read from the ``results.json`` of ``python -m experiments.mislabel`` (which runs
on its own run with corrupted labels), matched by gradient: Dice or CE loss, ``head`` or
``all`` parameters, all checkpoints or the last only, plain, Adam-aware or EK-FAC, LoGra
``all``, TRAK ``head`` on seed models (:func:`mislabel_method`); the slice-level ROC-AUC of the
"classwise sum" self-influence. Variants the experiment does not compute (cosine and RelatIF,
whose normalised self-influence is constant, other subsets) get no value. A TRAK folder
(meta.json ``method: trak``) is randomised by recomputing TRAK with as many re-initialised
models as it ensembles
(:func:`tracin_jax.influence.trak.randomised_trak`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tracin_jax.errors import InputError
from tracin_jax.evaluate.lds import _nanmean, spearman_columns, target_mask


@dataclass(frozen=True)
class GradientSpec:
    """How an influence folder's scores were computed, read back from its meta.json."""

    params: str
    loss: str  # dice | ce
    normalise: bool
    projection: dict | None  # {dim, seed, kind} or None (exact)
    epochs: tuple[int, ...]
    method: str = "tracin"  # tracin | trak | ekfac (meta.json's "method" / "ekfac" entry)
    models: int = 0  # TRAK: models ensembled
    models_from: str = ""  # TRAK: seeds | checkpoints
    precondition: str | None = None  # None | adam | identity
    relatif: bool = False

    def describe(self) -> str:
        proj = f" + {self.projection['kind']} {self.projection['dim']}" if self.projection else ""
        if self.method == "trak":
            return f"TRAK {self.params}{proj}, {self.models} models"
        pre = f", {self.precondition}-preconditioned" if self.precondition else ""
        cos = ", cosine" if self.normalise else ""
        rel = ", RelatIF" if self.relatif else ""
        ck = f", epoch {self.epochs[0]} only" if len(self.epochs) == 1 else ""
        how = "EK-FAC " if self.method == "ekfac" else ""
        return f"{how}{self.loss} {self.params}{proj}{pre}{cos}{rel}{ck}"


def gradient_spec(meta: dict) -> GradientSpec:
    """The gradient recipe of an influence folder's meta.json (written by the engine)."""
    tag = str((meta.get("gradient") or {}).get("tag") or "")
    return GradientSpec(
        params=str((meta.get("params") or {}).get("name", "custom")),
        loss="ce" if "cross_entropy" in tag else "dice",
        normalise=tag.startswith("normalised("),
        projection=meta.get("projection"),
        epochs=tuple(int(c["epoch"]) for c in meta.get("checkpoints", [])),
        method="ekfac" if meta.get("ekfac") else str(meta.get("method", "tracin")),
        models=len((meta.get("trak") or {}).get("models", [])),
        models_from=str((meta.get("trak") or {}).get("models_from", "")),
        precondition=(meta.get("precondition") or {}).get("kind"),
        relatif=bool(meta.get("relatif", False)))


@dataclass
class _RandomCheckpoint:
    epoch: int
    lr: float
    variables: Any


def randomised_checkpoints(run, spec: GradientSpec, seed: int = 0) -> list:
    """The checkpoints of ``spec`` (same epochs and learning rates) with re-initialised weights."""
    import jax

    from tracin_jax.training.train import init_variables

    out = []
    for e in spec.epochs:
        ck = run.checkpoint(e)
        out.append(_RandomCheckpoint(e, ck.lr, init_variables(run.model, jax.random.key(seed + e),
                                                              run.image_shape)))
    return out


def rank_agreement(scores_a: np.ndarray, scores_b: np.ndarray, present: np.ndarray) -> dict:
    """Per-target Spearman over patients of two score tensors.

    scores_a, scores_b f32[n_test, C, P, C]; present bool[n_test, C] -> {"mean", "per_class":
    {class index: mean}, "n_targets"}; each target's patient score sums the training classes.
    """
    a, i = target_mask(present)
    sa = np.asarray(scores_a, np.float64).sum(axis=-1)[a, i].T  # [P, T]
    sb = np.asarray(scores_b, np.float64).sum(axis=-1)[a, i].T
    rho = spearman_columns(sa, sb)
    return {"mean": _nanmean(rho), "n_targets": int(len(a)),
            "per_class": {int(c): _nanmean(rho[i == c]) for c in range(np.shape(present)[1])}}


def randomised_key(meta: dict, seed: int) -> str:
    """Short hash of what the randomised scores depend on: gradient, checkpoints, ids, seed."""
    keep = {k: meta.get(k) for k in ("gradient", "params", "projection", "checkpoints",
                                     "train_ids", "test_ids")}
    blob = json.dumps({**keep, "seed": int(seed)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def model_randomisation(run, influence_dir: Path, out_dir: Path, *, seed: int = 0,
                        progress: bool = False) -> dict:
    """Recomputes ``influence_dir``'s scores with random weights into
    ``out_dir/<randomised_key>`` (resumable through its feature store, which is removed once
    the scores are written; a finished folder is reused) and compares them with the trained
    ones (:func:`rank_agreement`).
    """
    from tracin_jax.influence import compute_influence, run_grad_fn
    from tracin_jax.influence.precondition import make_preconditioner

    influence_dir, out_dir = Path(influence_dir), Path(out_dir)
    meta = json.loads((influence_dir / "meta.json").read_text())
    spec = gradient_spec(meta)
    out_dir = out_dir / randomised_key(meta, seed)
    proj = spec.projection or {}
    if spec.method == "trak":
        from tracin_jax.influence.trak import randomised_trak

        if not (out_dir / "patient_scores.npy").exists():
            randomised_trak(run, meta, out_dir, seed=seed, progress=progress)
    else:
        checkpoints = randomised_checkpoints(run, spec, seed)
        if spec.method == "ekfac":  # factors refitted at the random weights
            from tracin_jax.influence.ekfac import ekfac_setup, factored_checkpoints

            e = meta["ekfac"]
            setup = ekfac_setup(run, spec.params, loss=spec.loss, damping=e["damping"],
                                fisher=e["fisher"], fisher_seed=e["fisher_seed"],
                                proj_dim=proj.get("dim", 0) if proj else 0,
                                proj_seed=proj.get("seed", 0), proj_kind=proj.get("kind"),
                                normalise=spec.normalise)
            grad_fn = setup.grad_fn
        else:
            proj_dim = proj.get("rank", proj.get("dim", 0)) if proj else 0  # logra: its rank
            grad_fn = run_grad_fn(run, spec.params, proj_dim=proj_dim,
                                  proj_seed=proj.get("seed", 0), proj_kind=proj.get("kind"),
                                  loss=spec.loss, normalise=spec.normalise)
        if not (out_dir / "meta.json").exists() or not (out_dir / "patient_scores.npy").exists():
            if spec.method == "ekfac":
                checkpoints = factored_checkpoints(run, setup, checkpoints, out_dir / "ekfac_factors")
            # A preconditioner stays that of the trained checkpoints (read by epoch from the run).
            # The folder's batch size: the same gradient programs, compiled once.
            compute_influence(grad_fn, checkpoints, run.train, run.test,
                              out_dir, store_dir=out_dir / "features", progress=progress,
                              batch_size=int(meta.get("batch_size", 16)),
                              precondition=make_preconditioner(spec.precondition, run),
                              relatif=spec.relatif)
        shutil.rmtree(out_dir / "features", ignore_errors=True)
    trained = np.load(influence_dir / "patient_scores.npy")
    randomised = np.load(out_dir / "patient_scores.npy")
    present = np.load(influence_dir / "test_present.npy")
    return {**rank_agreement(trained, randomised, present), "seed": int(seed),
            "folder": str(out_dir)}


def mislabel_method(spec: GradientSpec, last_epoch: int) -> str | None:
    """The name ``experiments.mislabel`` gives the same gradient, or None if it has none.

    The experiment scores plain, Adam-aware and EK-FAC self-influence (Dice and CE) on
    ``head`` and ``all`` (CountSketch), a LoGra-projected ``all`` Dice gradient, and TRAK on
    ``head`` with full-data seed models. Cosine and RelatIF variants have none: their
    normalised self-influence is 1 for every slice.
    """
    if spec.normalise or spec.relatif or spec.params not in ("head", "all"):
        return None
    kind = (spec.projection or {}).get("kind")
    if spec.method == "trak":
        ok = spec.params == "head" and spec.models_from == "seeds" and not spec.projection
        return "TRAK head classwise sum" if ok else None
    if spec.precondition not in (None, "adam") or spec.method not in ("tracin", "ekfac"):
        return None
    last = len(spec.epochs) == 1 and spec.epochs[0] == last_epoch
    loss = "CE" if spec.loss == "ce" else "Dice"
    if spec.params == "all" and kind == "logra":
        ok = spec.method == "tracin" and loss == "Dice" and not spec.precondition and not last
        return "Dice all logra classwise sum" if ok else None
    if spec.params == "all" and kind != "countsketch":
        return None  # the experiment's other `all` gradients are CountSketch-projected
    if spec.method == "ekfac":
        return f"{loss} {spec.params} ekfac classwise sum" if not last else None
    if last and (spec.params != "head" or spec.precondition):
        return None
    adam = " adam" if spec.precondition else ""
    return f"{loss} {spec.params}{adam}{' last' if last else ''} classwise sum"


def read_mislabel(path: str | Path) -> dict:
    """{method: slice ROC-AUC} from an ``experiments.mislabel`` results.json."""
    path = Path(path)
    try:
        res = json.loads(path.read_text())
        methods = res["results"]["slices"]["methods"]
        return {name: m["all"]["auc"] for name, m in methods.items()}
    except FileNotFoundError:
        raise InputError(f"--mislabel {path}: file not found") from None
    except (ValueError, KeyError, TypeError):
        raise InputError(f"--mislabel {path}: not a results.json written by "
                         "experiments.mislabel") from None
