"""Cheap sanity checks (no retraining): model randomisation and the mislabel-detection AUC.

Model randomisation (Adebayo et al. 2018; quanda's ModelRandomizationTest): the influence of
the same run is recomputed, with the same method and gradient (subset, loss, projection,
normalisation, preconditioning: rebuilt from the folder's meta.json ``spec`` through the method
registry, :mod:`tracin_jax.influence.methods`) and the same checkpoints' learning rates, but
every checkpoint's weights replaced by a fresh random initialisation (checkpoint t gets key
``seed + t``). A folder whose meta.json has no spec (written before specs were recorded, or
from a custom gradient function with no loss name: ``spec: null``) is not recomputed: its
randomisation entry says why (``{"skipped": reason, "mean": None}``). For each target (test
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
(spec method ``trak``) is randomised by recomputing TRAK with as many re-initialised
models as it ensembles (:func:`tracin_jax.influence.trak.randomised_trak`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

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
    method: str = "tracin"  # a registered method's name (meta.json's "method" / "ekfac" entry)
    models: int = 0  # TRAK: models ensembled
    models_from: str = ""  # TRAK: seeds | checkpoints
    precondition: str | None = None  # None | adam | identity
    relatif: bool = False

    def describe(self) -> str:
        """One line for the evaluation table: the method's label (its registry entry's
        ``title()``), the loss, subset, projection and options."""
        from tracin_jax.influence.methods import METHODS

        proj = f" + {self.projection['kind']} {self.projection['dim']}" if self.projection else ""
        cls = METHODS.get(self.method)
        how = cls.title() if cls is not None else self.method
        how = f"{how} " if how else ""
        if self.models:  # an ensemble of models (TRAK)
            return f"{how}{self.params}{proj}, {self.models} models"
        pre = f", {self.precondition}-preconditioned" if self.precondition else ""
        cos = ", cosine" if self.normalise else ""
        rel = ", RelatIF" if self.relatif else ""
        ck = f", epoch {self.epochs[0]} only" if len(self.epochs) == 1 else ""
        return f"{how}{self.loss} {self.params}{proj}{pre}{cos}{rel}{ck}"


def gradient_spec(meta: dict) -> GradientSpec:
    """The gradient recipe of an influence folder's meta.json, for its description, the loss
    LDS scores it against (``dice`` or ``ce``: TRAK's margin and an unknown loss are scored on
    Dice) and the mislabel match. From the meta's ``spec`` when it has one; a folder written
    before specs (or with ``spec: null``) is described from its other entries. The
    randomisation check reads ``spec`` only (:func:`model_randomisation`)."""
    spec = meta.get("spec")
    if spec:
        proj = spec.get("projection")
        opts = spec.get("options") or {}
        pre = spec.get("precondition")
        return GradientSpec(
            params=str(spec.get("params") or "custom"),
            loss=spec["loss"] if spec.get("loss") in ("dice", "ce") else "dice",
            normalise=bool(spec.get("normalise")), projection=proj,
            epochs=tuple(int(e) for e in spec.get("checkpoints") or ()),
            method=str(spec["method"]),
            models=(len((meta.get("trak") or {}).get("models", [])) if spec["method"] == "trak"
                    else 0),
            models_from=str(opts.get("models_from", "")),
            precondition=None if pre in (None, "none") else str(pre),
            relatif=bool(spec.get("relatif")))
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


def randomised_checkpoints(run, spec: GradientSpec, seed: int = 0) -> list:
    """The checkpoints of ``spec`` (same epochs and learning rates) with re-initialised weights."""
    from tracin_jax.influence.methods import random_checkpoints

    return random_checkpoints(run, spec.epochs, seed)


def randomisation_skipped(meta: dict) -> str | None:
    """Why a folder's randomisation cannot be recomputed (one line), None when it can."""
    if "spec" not in meta:
        return "no spec in meta.json (written by an earlier version): gradient unknown"
    if not meta["spec"]:
        return "spec null in meta.json (custom gradient function without a loss name)"
    return None


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
    ones (:func:`rank_agreement`). The method and its options come from meta.json's ``spec``
    (:func:`tracin_jax.influence.methods.from_spec`); without one, nothing is computed and the
    result is ``{"skipped": reason, "mean": None, "per_class": {}, "n_targets": 0}``.
    """
    from tracin_jax.influence.methods import from_spec

    influence_dir, out_dir = Path(influence_dir), Path(out_dir)
    meta = json.loads((influence_dir / "meta.json").read_text())
    reason = randomisation_skipped(meta)
    if reason is not None:
        return {"skipped": reason, "mean": None, "per_class": {}, "n_targets": 0,
                "seed": int(seed), "folder": None}
    method = from_spec(meta["spec"])
    out_dir = out_dir / randomised_key(meta, seed)
    if not (out_dir / "meta.json").exists() or not (out_dir / "patient_scores.npy").exists():
        method.randomised(run, meta, out_dir, seed=seed, progress=progress)
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
    if spec.normalise or spec.relatif or spec.params not in ("head", "all") \
            or spec.loss not in ("dice", "ce"):
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
