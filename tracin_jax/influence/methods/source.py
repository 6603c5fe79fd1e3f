"""Class-wise SOURCE (Bae et al. 2024, "Training Data Attribution via Approximate Unrolled
Differentiation"): training unrolled over segments, each with a stationary Hessian and
gradient, each segment's Hessian the EK-FAC fit of its checkpoint.

**Segments.** The chosen checkpoints t_1 < ... < t_L (``--checkpoints``) end the L segments:
segment l runs from the step of the chosen checkpoint before it (0 for the first) to the step
of checkpoint l, K_l steps, at the step-weighted mean learning rate eta_l of the epochs inside it
(each saved checkpoint's recorded ``lr`` over the steps since the checkpoint saved before it).
Within segment l the training gradient and the Hessian are those of checkpoint l:

    H_l = F_l / n_pix + lambda_l I

with F_l the EK-FAC sampled Fisher of checkpoint l (:mod:`tracin_jax.influence.ekfac`:
eigenbases Q_A, Q_S and corrected eigenvalues Lambda per conv layer, block-diagonal over
layers) divided by the pixels of a slice (voxels of a volume), which makes it the Gauss-Newton
matrix of the pixel-mean cross-entropy (the fit differentiates the cross-entropy summed over
pixels), and ``lambda_l = damping x mean(Lambda / n_pix)`` per layer (default damping 0: the
paper's formula, whose matrix functions stay finite on a zero eigenvalue).

**Score.** For test example z' (class i) and training example z (class j), with g_c the class
gradients of ``loss`` (the same as TracIn's) and theta_L the last chosen checkpoint:

    score[z', i, z, j] = sum_l g_i(z'; theta_L)^T S_L S_{L-1} ... S_{l+1} R_l g_j(z; theta_l)
    S_l = exp(-eta_l K_l P_l H_l)                 (segment l's steps shrink an earlier change)
    R_l = (I - exp(-eta_l K_l P_l H_l)) H_l^-1    (the change segment l's steps make from z)

P_l = I for SGD steps (the paper's formula; ``precondition="none"``, default). The paper's 1/N
is left out (one constant for every score, as TracIn leaves out the batch size), so the sign is
TracIn's (positive = proponent) and the limits are: eta K H -> 0 gives
``sum_l eta_l K_l <g(z'; theta_L), g(z; theta_l)>`` (TracIn with K_l steps per segment and the
query at theta_L); one segment with eta K H -> infinity gives ``g(z')^T H^-1 g(z)``, the
influence function at damping lambda (``--method ekfac`` of that checkpoint, divided by its
learning rate and times n_pix); in between, (1 - exp(-eta K h)) / h is eta K for an
eigenvalue h << 1/(eta K) and 1/h for h >> 1/(eta K), like an influence function damped by about
1/(eta K).

**Adam** (``precondition="adam"``, through the same hook as Adam-aware TracIn:
:func:`~tracin_jax.influence.precondition.adam_preconditioner` reads each checkpoint's
``1/(sqrt(v_hat)+eps)``). An Adam step is, to first order, a step ``eta P g`` with P that
diagonal; the unrolled formula then has P_l H_l in its exponentials and R_l keeps H_l^-1
(``sum_k (I - eta P H)^k eta P = (I - (I - eta P H)^K) H^-1``). A diagonal P that varies inside a
layer is not diagonal in the Kronecker eigenbasis, so P_l is replaced by its diagonal in that
basis, ``p = (Q_A * Q_A)^T P (Q_S * Q_S)`` (elementwise squares; u^T P u for each eigenvector
u = q_a (x) q_s), the same projection EK-FAC's eigenvalue correction makes: P_l H_l becomes
``Q diag(p * (Lambda / n_pix + lambda)) Q^T`` and every matrix function stays elementwise.

**Through the shared engine.** Everything is diagonal in each segment's eigenbasis, so the
score is ``sum_l eta_l <a_l(z'), b_l(z)>`` with, per layer,

    b_l(z)  = w_l * (Q_A^T G_j(z; theta_l) Q_S)            (training features)
    a_l(z') = w_l * (Q_A^T [S_{l+1}...S_L G_i(z'; theta_L)] Q_S)   (query features)
    w_l     = sqrt((1 - exp(-x)) / (eta_l lambda_d)),  x = eta_l K_l p lambda_d,
              lambda_d = Lambda / n_pix + lambda  (w_l^2 -> K_l p as x -> 0)

and each S applied as ``Q_A ((Q_A^T M Q_S) * exp(-x)) Q_S^T``. One gradient function computes
both (:func:`make_source_grad_fn`): the training checkpoints carry segment l's basis and w_l in
their variables (collection ``"source"``), the query checkpoints (:class:`~.base.Fitted`
``query_checkpoints``) carry theta_L's weights, the later segments' S and segment l's basis;
the engine weighs both by sqrt(eta_l) as it does TracIn's learning rates. The features then go
through the feature store (its fingerprint covers the segment's factors), the optional
projection (after the rotation, as EK-FAC's) and the blocked contraction unchanged.
``self_influence.npy`` is the squared norm of the training features,
``sum_l g_l(z)^T R_l g_l(z)`` (each segment's own term, without the later segments'
transport). ``--split train`` is refused: its queries would be the stored training features.

Cost: the EK-FAC fit of every chosen checkpoint (as ``--method ekfac``, cached in
``<out>/ekfac_factors/``), then TracIn's gradients plus two small matrix products per layer and
class gradient, and for each query 2 (L - 1) more per segment.
"""

from __future__ import annotations

import dataclasses
import numbers
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tracin_jax.errors import InputError
from tracin_jax.influence.methods.base import Common, FeatureOptions, Fitted, Method, option
from tracin_jax.influence.projection import DEFAULT_PROJ_KIND

COLLECTION = "source"


@dataclass(frozen=True)
class SourceOptions(FeatureOptions):
    loss: str = option("dice", "dice (the training loss, the paper) | ce (region cross-entropy)")
    damping: float = option(0.0, "damping relative to the mean eigenvalue, per layer")
    fisher_seed: int = option(0, "seed of the sampled Fisher's labels")
    precondition: Any = option(None, "none | adam (Adam's 1/(sqrt(v_hat)+eps) of each "
                               "checkpoint's saved state)")

    def check(self) -> None:
        from tracin_jax.influence.checks import check_loss
        from tracin_jax.influence.precondition import PRECONDITIONERS, make_preconditioner

        super().check()
        check_loss(self.loss)
        d = self.damping
        if isinstance(d, bool) or not isinstance(d, numbers.Real) or not (
                np.isfinite(float(d)) and float(d) >= 0):
            raise InputError(f"--damping {d!r} must be a number >= 0 (the damping is this factor "
                             "times the mean eigenvalue of each layer)")
        s = self.fisher_seed
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise InputError(f"--fisher-seed {s!r} must be an integer")
        pre = self.precondition
        if isinstance(pre, str) and pre not in (*PRECONDITIONERS, "identity"):
            raise InputError(f"--precondition {pre!r} is not one of {', '.join(PRECONDITIONERS)}")
        if not (pre is None or isinstance(pre, str)):
            make_preconditioner(pre)  # a preconditioner object, checked


@dataclass(frozen=True)
class Segment:
    """Segment l of training: steps ``first_step`` (exclusive) to ``last_step`` (inclusive),
    ended by the checkpoint of ``epoch``, at mean learning rate ``lr``."""

    epoch: int
    first_step: int
    last_step: int
    lr: float

    @property
    def steps(self) -> int:
        return self.last_step - self.first_step

    def describe(self) -> dict:
        return {"epoch": self.epoch, "first_step": self.first_step, "last_step": self.last_step,
                "steps": self.steps, "mean_lr": self.lr}


def segments(checkpoints: Sequence[Any], records: Sequence[Any] | None = None) -> list[Segment]:
    """The segments the chosen ``checkpoints`` end (each with ``epoch``, ``step``, ``lr``, in
    training order). ``records``: every saved checkpoint of the run (``epoch``, ``step``,
    ``lr``; a run's ``checkpoints``), whose learning rates give each segment's step-weighted
    mean; None: the chosen ones only. A checkpoint without a step, or two at the same step, is a
    one-line InputError."""
    points: dict[int, float] = {}
    chosen = []
    for c in checkpoints:
        step = getattr(c, "step", None)
        if step is None:
            raise InputError(f"--method source: the checkpoint of epoch {c.epoch} records no "
                             "training step (a run's checkpoints do: meta 'step')")
        chosen.append((int(c.epoch), int(step), float(c.lr)))
        points[int(step)] = float(c.lr)
    for r in records or ():
        step = getattr(r, "step", None)
        if step is not None:
            points.setdefault(int(step), float(r.lr))
    out, first, prev_epoch = [], 0, None
    for epoch, step, _ in chosen:
        if step <= first:
            where = (f"epoch {prev_epoch} (step {first})" if prev_epoch is not None
                     else "the start of training")
            raise InputError(f"--method source: the checkpoint of epoch {epoch} is at step "
                             f"{step}, not after {where}; every segment needs at least one step")
        inside = sorted(s for s in points if first < s <= step)
        total, last = 0.0, first
        for s in inside:
            total += points[s] * (s - last)
            last = s
        out.append(Segment(epoch, first, step, total / (step - first)))
        first, prev_epoch = step, epoch
    return out


def phi1(x: np.ndarray) -> np.ndarray:
    """(1 - exp(-x)) / x elementwise for x >= 0, with its limit 1 at 0 (float64)."""
    x = np.asarray(x, np.float64)
    small = x < 1e-8
    safe = np.where(small, 1.0, x)
    return np.where(small, 1.0 - x / 2, -np.expm1(-safe) / safe)


def layer_preconditioner(layer: Any, diag: Sequence[np.ndarray], subset: Any,
                         qa: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """A diagonal preconditioner's diagonal in a layer's Kronecker eigenbasis:
    ``(Q_A * Q_A)^T P (Q_S * Q_S)`` f64[in_dim, out_dim], with P the layer's part of ``diag``
    (arrays shaped like ``subset``'s leaves) as a matrix in patch order."""
    from tracin_jax.influence.ekfac import kernel_matrix

    leaves = dict(zip(subset.paths, diag))
    pm = np.asarray(kernel_matrix(layer, np.asarray(leaves[f"{layer.name}/kernel"], np.float64),
                                  np.asarray(leaves[f"{layer.name}/bias"], np.float64)
                                  if layer.has_bias else None), np.float64)
    qa, qs = np.asarray(qa, np.float64), np.asarray(qs, np.float64)
    return (qa * qa).T @ pm @ (qs * qs)


def segment_spectrum(layers: Sequence[Any], factors: dict, segment: Segment, pixels: int,
                     damping: float, precond: dict | None = None) -> dict:
    """Per layer, the matrix functions of segment ``segment`` in its EK-FAC eigenbasis:
    ``{name: {"qa", "qs", "weight": w_l f32[in,out], "decay": exp(-x) f32[in,out],
    "x": x f64[in,out]}}`` with x = eta K p lambda_d (module docstring); ``precond``: {name: p}
    (None: p = 1)."""
    out = {}
    for layer in layers:
        f = factors[layer.name]
        lam = np.asarray(f["lam"], np.float64) / pixels
        lam_d = lam + damping * lam.mean()
        p = 1.0 if precond is None else precond[layer.name]
        rate = segment.steps * p  # K p: the small-x limit of w^2
        x = segment.lr * rate * lam_d
        out[layer.name] = {"qa": np.asarray(f["qa"], np.float32),
                           "qs": np.asarray(f["qs"], np.float32),
                           "weight": np.sqrt(rate * phi1(x)).astype(np.float32),
                           "decay": np.exp(-x).astype(np.float32), "x": x}
    return out


def make_source_grad_fn(model: Any, subset: Any, layers: Sequence[Any], loss_fn: Any, *,
                        proj_dim: int | None = None, proj_seed: int = 0,
                        proj_kind: str | None = DEFAULT_PROJ_KIND, tag: str,
                        loss: str | None = None, class_names=None, class_labels=None) -> Any:
    """SOURCE's features: ``(variables, images, labels) -> f32[B, C, D]``.

    ``variables`` carry the collection ``"source"``: ``{"transport": [{layer: {"qa", "qs",
    "decay"}}, ...], "basis": {layer: {"qa", "qs", "weight"}}}``. Per layer, the class
    gradients' matrix M (f32[B, C, in_dim, out_dim], :func:`~..ekfac.kernel_matrix`) goes
    through every transport in order, ``M <- Q_A ((Q_A^T M Q_S) * decay) Q_S^T``, then becomes
    ``(Q_A^T M Q_S) * weight``; the layers are concatenated (D = the subset's size) and
    projected (D = the projection's dimension; the engine's rule: exact up to 65536 numbers,
    else CountSketch 4096). One program serves every checkpoint with the same number of
    transports.
    """
    import jax
    import jax.numpy as jnp

    from tracin_jax.influence.ekfac import HIGHEST, layer_class_gradients
    from tracin_jax.influence.grads import ClassGradFunction, make_class_grad_fn
    from tracin_jax.influence.projection import make_projector
    from tracin_jax.influence.subsets import ParamSubset

    layers = tuple(layers)
    inner = make_class_grad_fn(model, subset, loss_fn, None, tag=tag, class_names=class_names,
                               class_labels=class_labels)
    flat = ParamSubset(subset.name, ("source/rotated",), ((subset.size,),))
    projector = make_projector(flat, proj_dim, proj_seed, proj_kind)
    read = layer_class_gradients(inner, subset, layers, COLLECTION)

    def rotate(f, m):
        return jnp.einsum("ia,...ij,jb->...ab", f["qa"], m, f["qs"], precision=HIGHEST)

    def transport(f, m):
        r = rotate(f, m) * f["decay"]
        return jnp.einsum("ia,...ab,jb->...ij", f["qa"], r, f["qs"], precision=HIGHEST)

    @jax.jit
    def fn(variables, images, labels):
        src, mats = read(variables, images, labels)
        for step in src["transport"]:
            mats = [transport(step[l.name], m) for l, m in zip(layers, mats)]
        w = [rotate(src["basis"][l.name], m) * src["basis"][l.name]["weight"]
             for l, m in zip(layers, mats)]
        w = jnp.concatenate([m.reshape(*m.shape[:2], -1) for m in w], axis=-1)
        return projector([w]) if projector is not None else w

    proj = "exact" if projector is None else f"{projector.kind}{projector.dim}s{projector.seed}"
    return ClassGradFunction(fn=fn, tag=f"source({tag})|{proj}",
                             dim=projector.dim if projector is not None else subset.size,
                             subset=subset, projector=projector, loss=loss,
                             class_names=inner.class_names, class_labels=inner.class_labels)


@dataclass
class SourceCheckpoint:
    """A checkpoint as the engine sees it: ``lr`` the segment's mean learning rate,
    ``variables`` the weights plus the ``"source"`` collection."""

    epoch: int
    lr: float
    step: int
    variables: Any


def _identity_transport(layers: Sequence[Any]) -> dict:
    return {l.name: {"qa": np.eye(l.in_dim, dtype=np.float32),
                     "qs": np.eye(l.out_dim, dtype=np.float32),
                     "decay": np.ones((l.in_dim, l.out_dim), np.float32)} for l in layers}


def _x_summary(spectrum: dict) -> dict:
    x = np.concatenate([np.ravel(s["x"]) for s in spectrum.values()])
    return {"min": float(x.min()), "median": float(np.median(x)), "max": float(x.max())}


class Source(Method):
    """SOURCE over the conv kernels and biases of ``params`` (BatchNorm parameters are left
    out), one segment per chosen checkpoint (module docstring)."""

    name = "source"
    summary = "SOURCE: training unrolled over segments, EK-FAC Hessians (Bae et al. 2024)"
    Options = SourceOptions
    presets = {
        "source-dice": {"params": "all"},
        "head-source": {"params": "head"},
        "head-source-adam": {"params": "head", "precondition": "adam"},
    }

    def spec_loss(self, grad_fn: Any) -> str:
        return self.options.loss

    def spec_fields(self) -> dict:
        pre = self.options.precondition
        kind = pre if isinstance(pre, str) or pre is None else getattr(pre, "name", "custom")
        return {"precondition": "none" if kind is None else kind}

    def spec_options(self) -> dict:
        return {"damping": float(self.options.damping),
                "fisher_seed": int(self.options.fisher_seed)}

    def featuriser(self, run: Any) -> Any:
        from tracin_jax.influence.ekfac import ekfac_setup

        o = self.options
        base = ekfac_setup(run, o.params, loss=o.loss, fisher="sampled",
                           fisher_seed=o.fisher_seed, proj_dim=0)
        pre = o.precondition
        pre_name = "none" if pre is None else pre if isinstance(pre, str) else getattr(
            pre, "name", "custom")
        grad_fn = make_source_grad_fn(
            run.model, base.subset, base.layers, base.loss_fn, proj_dim=o.proj_dim,
            proj_seed=o.proj_seed, proj_kind=o.proj_kind, loss=o.loss,
            tag=(f"{base.loss_tag},fisher=sampleds{o.fisher_seed},damping={float(o.damping):g},"
                 f"precondition={pre_name}"),
            class_names=base.grad_fn.class_names, class_labels=base.grad_fn.class_labels)
        self.setup = dataclasses.replace(base, grad_fn=grad_fn, damping=float(o.damping))
        return grad_fn

    def fit(self, run: Any, grad_fn: Any, checkpoints: Sequence[Any], out: Path,
            common: Common, progress: bool = False) -> Fitted:
        from tracin_jax.influence.ekfac import COLLECTION as EKFAC
        from tracin_jax.influence.ekfac import factored_checkpoints
        from tracin_jax.influence.precondition import checkpoint_diagonal, make_preconditioner

        if common.split != "test":
            raise InputError(f"--split {common.split!r}: --method source scores the test split "
                             "only (its query gradients are taken at the last checkpoint)")
        checkpoints = list(checkpoints)
        segs = segments(checkpoints, getattr(run, "checkpoints", None))
        setup, o = self.setup, self.options
        pre = make_preconditioner(o.precondition, run)
        t = time.perf_counter()
        folder = Path(out) / "ekfac_factors"
        factored = factored_checkpoints(run, setup, checkpoints, folder,
                                        batch_size=common.batch_size, progress=progress)
        pixels = int(np.prod(run.image_shape[:-1]))
        spectra = []
        for c, fc, seg in zip(checkpoints, factored, segs):
            factors = fc.variables[EKFAC]
            p = None
            if pre is not None:
                diag = checkpoint_diagonal(pre, c, setup.subset)
                p = {l.name: layer_preconditioner(l, diag, setup.subset, factors[l.name]["qa"],
                                                  factors[l.name]["qs"]) for l in setup.layers}
            spectra.append(segment_spectrum(setup.layers, factors, seg, pixels,
                                            float(o.damping), p))
        plain = [{k: v for k, v in fc.variables.items() if k != EKFAC} for fc in factored]

        def basis(sp):
            return {n: {k: sp[n][k] for k in ("qa", "qs", "weight")} for n in sp}

        def decay(sp):
            return {n: {k: sp[n][k] for k in ("qa", "qs", "decay")} for n in sp}

        n = len(segs)
        train, query = [], []
        for l, seg in enumerate(segs):
            train.append(SourceCheckpoint(seg.epoch, seg.lr, seg.last_step, {
                **plain[l], COLLECTION: {"transport": [], "basis": basis(spectra[l])}}))
            later = [decay(spectra[k]) for k in range(n - 1, l, -1)]  # S_L first
            later += [_identity_transport(setup.layers)] * (n - 1 - len(later))
            query.append(SourceCheckpoint(seg.epoch, seg.lr, seg.last_step, {
                **plain[-1], COLLECTION: {"transport": later, "basis": basis(spectra[l])}}))
        meta = {"source": {
            **setup.describe(), "fisher": "sampled",
            "hessian": "EK-FAC sampled Fisher / pixels per example + damping x mean, per layer",
            "pixels": pixels, "precondition": pre.describe() if pre is not None else None,
            "query_epoch": segs[-1].epoch, "factors": str(folder),
            "segments": [{**s.describe(), "x": _x_summary(sp)}
                         for s, sp in zip(segs, spectra)]}}
        return Fitted(train, meta=meta, query_checkpoints=query,
                      timings={"source_fit_s": round(time.perf_counter() - t, 3)})


__all__ = ["COLLECTION", "Segment", "Source", "SourceCheckpoint", "SourceOptions",
           "layer_preconditioner", "make_source_grad_fn", "phi1", "segment_spectrum",
           "segments"]
