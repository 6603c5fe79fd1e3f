"""Cheap sanity checks (no retraining): model randomisation and the mislabel-detection AUC.

Model randomisation (Adebayo et al. 2018; quanda's ModelRandomizationTest): the influence of
the same run is recomputed, with the same method and gradient (subset, loss, projection,
normalisation, preconditioning, the method's options: rebuilt from the folder's meta.json
``spec`` through the method registry, :mod:`tracin_jax.influence.methods`) but random weights:
the folder's method does it (:meth:`~tracin_jax.influence.methods.base.Method.randomised`; by
default every chosen checkpoint's weights replaced by a fresh initialisation, checkpoint t with
key ``seed + t``, same learning rates; a method that ensembles models re-initialises each of
them). A folder whose meta.json has no spec (written before specs were recorded, or from a
custom gradient function with no loss name: ``spec: null``) is not recomputed: its
randomisation entry says why (``{"skipped": reason, "mean": None}``). For each target (test
slice, class present) the Spearman correlation over training patients of the trained and the
randomised scores is taken; the mean over targets is reported. An attribution that explains the
*model* should give a low value; a high value means the ranking comes from the data alone (for
instance from image statistics that any weights would reproduce).

Mislabel AUC: read from the ``results.json`` of ``python -m experiments.mislabel`` (which runs
on its own run with corrupted labels), whose ``gradients`` entry records, for every gradient it
scores, its influence folder's ``spec`` and the experiment run's last epoch. A folder gets the
slice-level ROC-AUC of the "classwise sum" self-influence of the experiment's gradient whose
spec is the same (:func:`mislabel_match`: method, loss, parameter subset, projection kind and
size, normalisation, preconditioning, RelatIF, the method's options; checkpoints compared as
"the run's last one only" or "several", since the two runs have their own epochs). Folders
without a spec, gradients the experiment does not compute, and normalised or RelatIF gradients
(their normalised self-influence is the same for every slice, so it ranks nothing) get no
value; so does every folder when the results.json predates the ``gradients`` entry.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tracin_jax.errors import InputError
from tracin_jax.evaluate.lds import _nanmean, spearman_columns, target_mask

LDS_LOSSES = ("dice", "ce")  # the losses the ground truth measures
MISLABEL_SCORE = "classwise sum"  # the experiment's row read for a gradient


@dataclass(frozen=True)
class GradientSpec:
    """How an influence folder's scores were computed, read back from its meta.json."""

    params: str
    loss: str  # the loss LDS scores the folder against: dice | ce
    normalise: bool
    projection: dict | None  # {dim, seed, kind, ...} or None (exact)
    epochs: tuple[int, ...]
    method: str = ""  # a registered method's name; "" when meta.json does not say
    gradient_loss: str = ""  # the loss the gradient differentiates, as the spec names it
    precondition: str | None = None  # None | adam | identity
    relatif: bool = False
    options: dict = field(default_factory=dict)  # the method's own arguments (spec "options")

    def describe(self) -> str:
        """One line for the evaluation table: the method's label (its registry entry's
        ``title()``), the loss, the subset, the projection (kind and size), preconditioning,
        cosine, RelatIF, the epoch when there is one checkpoint, then the method's own options
        (``name=value``)."""
        from tracin_jax.influence.methods import METHODS

        cls = METHODS.get(self.method)
        how = cls.title() if cls is not None else self.method
        how = f"{how} " if how else ""
        proj = (f" + {self.projection.get('kind')} {projection_size(self.projection)}"
                if self.projection else "")
        pre = f", {self.precondition}-preconditioned" if self.precondition else ""
        cos = ", cosine" if self.normalise else ""
        rel = ", RelatIF" if self.relatif else ""
        ck = f", epoch {self.epochs[0]} only" if len(self.epochs) == 1 else ""
        opts = "".join(f", {k}={v}" for k, v in self.options.items())
        loss = self.gradient_loss or self.loss
        return f"{how}{loss} {self.params}{proj}{pre}{cos}{rel}{ck}{opts}"


def projection_size(projection: dict) -> int:
    """The size a projection is asked for (``--proj-dim``): its dimension, or its per-layer rank
    for a per-layer projection (:func:`~tracin_jax.influence.methods.base.projection_args`)."""
    from tracin_jax.influence.methods.base import projection_args

    return projection_args(projection)["proj_dim"]


def _precondition(kind) -> str | None:
    return None if kind in (None, "none") else str(kind)


def gradient_spec(meta: dict) -> GradientSpec:
    """The gradient recipe of an influence folder's meta.json, for its description and the loss
    LDS scores it against (``dice`` or ``ce``; any other loss, a margin for instance, is scored
    on Dice). From the meta's ``spec`` when it has one; a folder written before specs (or with
    ``spec: null``) is described from the entries every folder has (``params``, ``gradient``
    tag, ``projection``, ``checkpoints``, and ``method``, ``precondition``, ``relatif`` where
    recorded). The randomisation check and the mislabel match read ``spec`` only."""
    spec = meta.get("spec")
    if spec:
        loss = str(spec.get("loss") or "")
        return GradientSpec(
            params=str(spec.get("params") or "custom"),
            loss=loss if loss in LDS_LOSSES else "dice",
            normalise=bool(spec.get("normalise")), projection=spec.get("projection"),
            epochs=tuple(int(e) for e in spec.get("checkpoints") or ()),
            method=str(spec.get("method") or ""), gradient_loss=loss,
            precondition=_precondition(spec.get("precondition")),
            relatif=bool(spec.get("relatif")), options=dict(spec.get("options") or {}))
    tag = str((meta.get("gradient") or {}).get("tag") or "")
    return GradientSpec(
        params=str((meta.get("params") or {}).get("name", "custom")),
        loss="ce" if "cross_entropy" in tag else "dice",
        normalise=tag.startswith("normalised("),
        projection=meta.get("projection"),
        epochs=tuple(int(c["epoch"]) for c in meta.get("checkpoints", [])),
        method=str(meta.get("method") or ""),
        precondition=_precondition((meta.get("precondition") or {}).get("kind")),
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


@dataclass(frozen=True)
class MislabelGradient:
    """One gradient scored by ``experiments.mislabel``: its name there (``row`` is
    ``f"{name} classwise sum"``), its influence folder's meta.json ``spec``, the last epoch of
    the experiment's run and the slice ROC-AUC of that row (None when the row is missing)."""

    name: str
    spec: dict | None
    last_epoch: int
    auc: float | None

    @property
    def row(self) -> str:
        return f"{self.name} {MISLABEL_SCORE}"


@dataclass(frozen=True)
class MislabelResults:
    """The gradients of one ``experiments.mislabel`` results.json; ``reason`` (one line) says
    why none can be matched (a results.json written before the ``gradients`` entry)."""

    path: str
    gradients: tuple[MislabelGradient, ...] = ()
    reason: str | None = None


def checkpoint_use(epochs, last_epoch: int) -> str | None:
    """How a gradient uses its run's checkpoints, comparable between runs: ``"last"`` (the
    run's last epoch alone), ``"several"``, None otherwise (none, or one earlier epoch)."""
    epochs = [int(e) for e in epochs or ()]
    if len(epochs) > 1:
        return "several"
    return "last" if epochs == [int(last_epoch)] else None


def gradient_identity(spec: dict | None, last_epoch: int) -> tuple | None:
    """What defines a folder's gradient for the mislabel match, from its meta.json ``spec`` in
    a run whose last epoch is ``last_epoch``: (method, loss, params, (projection kind,
    :func:`projection_size`) or None, precondition or None, options, :func:`checkpoint_use`);
    the projection's seed is left out. None when nothing can match: no spec, a normalised or
    RelatIF gradient (its normalised self-influence is the same for every slice: it ranks
    nothing), or checkpoints that are neither the run's last alone nor several."""
    if not spec or spec.get("normalise") or spec.get("relatif"):
        return None
    use = checkpoint_use(spec.get("checkpoints"), last_epoch)
    if use is None:
        return None
    proj = spec.get("projection")
    proj = (str(proj.get("kind")), projection_size(proj)) if proj else None
    options = dict(spec.get("options") or {})
    return (spec.get("method"), spec.get("loss"), spec.get("params"), proj,
            _precondition(spec.get("precondition")), options, use)


def mislabel_match(spec: dict | None, last_epoch: int,
                   gradients) -> MislabelGradient | None:
    """The experiment's gradient (of ``gradients``, :class:`MislabelGradient`) with the same
    :func:`gradient_identity` as the folder's ``spec`` in a run whose last epoch is
    ``last_epoch``; None when there is none."""
    own = gradient_identity(spec, last_epoch)
    if own is None:
        return None
    return next((g for g in gradients if gradient_identity(g.spec, g.last_epoch) == own), None)


def read_mislabel(path: str | Path) -> MislabelResults:
    """The gradients of an ``experiments.mislabel`` results.json with their slice ROC-AUC. One
    written before the experiment recorded its gradients' specs gives no gradient and a
    ``reason``; a missing or foreign file is a one-line InputError."""
    path = Path(path)
    try:
        res = json.loads(path.read_text())
        methods = res["results"]["slices"]["methods"]
        aucs = {name: m["all"]["auc"] for name, m in methods.items()}
        recorded = res.get("gradients")
        if recorded is None:
            return MislabelResults(str(path), reason=(
                f"--mislabel {path}: written before experiments.mislabel recorded its "
                "gradients' specs, so no variant can be matched: no mislabel AUC (rerun "
                "python -m experiments.mislabel)"))
        gradients = tuple(
            MislabelGradient(str(name), g.get("spec"), int(g["last_epoch"]),
                             aucs.get(f"{name} {MISLABEL_SCORE}"))
            for name, g in recorded.items())
    except FileNotFoundError:
        raise InputError(f"--mislabel {path}: file not found") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InputError(f"--mislabel {path}: not a results.json written by "
                         "experiments.mislabel") from None
    return MislabelResults(str(path), gradients)
