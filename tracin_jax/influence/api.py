"""``run_influence``: a registered attribution method on a training workdir, from its
checkpoints to an influence folder.

The method is chosen by name from the registry (:data:`~.methods.METHODS`, one module each in
:mod:`.methods`); its options are its ``Options`` dataclass, or keywords mapped onto it; the
arguments every method shares are :class:`~.methods.base.Common`. The method loads the run,
builds its gradient function, fits what it needs and scores through
:func:`~.engine.compute_influence`, which writes the folder (:mod:`.folder`).
"""

from __future__ import annotations

import dataclasses

from tracin_jax.influence import methods


# Keyword arguments of the earlier signature that callers pass with their old default values
# whatever the method: dropped when the chosen method does not take them.
_LEGACY_DEFAULTS = {"damping": None, "fisher": "sampled", "precondition": "none",
                    "relatif": False, "normalise": False, "loss": "dice"}


def run_influence(workdir, out, *, method: str = "tracin", options=None, grad_fn=None,
                  common=None, **kwargs) -> dict:
    """Influence of the run in ``workdir`` by the registered ``method``; writes an influence
    folder (:mod:`.folder`) into ``out`` and returns the meta dict written to ``out/meta.json``.

    Args:
      workdir: a training workdir (see :func:`tracin_jax.load_run`).
      out: output folder (created).
      method: a name of :data:`tracin_jax.influence.methods.METHODS` (default ``tracin``,
        the paper's class-wise TracIn; each method's module documents it). An unknown name is
        a one-line InputError listing the known ones.
      options: the method's options dataclass (e.g. ``TracInOptions(params="all",
        proj_dim=4096)``); None: its defaults, updated by the option keywords below.
      grad_fn: a ClassGradFn replacing the method's featuriser (``tracin`` only); give it a
        ``tag`` so its store is its own, and a ``loss`` name (``make_class_grad_fn(...,
        loss="ce")``) so meta.json gets a ``spec`` (else ``spec: null``).
      common: a :class:`~.methods.base.Common`, or its fields as keywords:
        checkpoints (``"all"``, a list of epochs, or ``"E1,E2"``), split (``test`` or
        ``train``: train-vs-train), topk (K of the streamed top-K; default only when the full
        tensor does not fit, then DEFAULT_TOPK), batch_size (examples per gradient batch,
        rounded up to the device count), chunk_size (training examples per store chunk and
        scoring block), memory_budget_gb (a budget below :func:`~.checks.memory_estimate` is
        refused up front; the full score tensor is kept only when it fits on top of the
        estimate),
        data_dir (overrides the data folder recorded in the workdir), progress (tqdm bars),
        store_dir (feature store folder, default ``<workdir>/features/<key>``).
      **kwargs: the common fields above and the method's option fields, e.g. ``params``
        (``head`` | ``decoder`` | ``all`` | a regular expression), ``proj_dim`` (None: exact up
        to 65536 parameters, else 4096; 0: exact), ``proj_seed``, ``proj_kind`` (countsketch |
        rademacher | gaussian | logra, whose ``proj_dim`` is the per-layer rank), ``loss``
        (``dice`` | ``ce``), ``normalise`` (cosine), and the method's own (its ``Options``
        dataclass). An option the method does not take is a one-line InputError (the
        keywords of the earlier flat signature at their old defaults, e.g.
        ``fisher="sampled"``, are accepted and ignored).
    Returns:
      the meta dict written to ``out/meta.json``.
    """
    cls = methods.get_method(method)
    common_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in methods.COMMON_FIELDS}
    if common is None:
        common = methods.Common(**common_kw)
    elif common_kw:
        common = dataclasses.replace(common, **common_kw)
    fields = methods.option_fields(cls)
    given = {k: v for k, v in kwargs.items()
             if v is not None and not (k not in fields and _LEGACY_DEFAULTS.get(k, ...) == v)}
    if options is None:
        options = methods.make_options(cls, given)
    elif given:
        methods.make_options(cls, given)  # refuses the options it does not take
        options = dataclasses.replace(options, **given)
    return cls(options).run(workdir, out, common, grad_fn=grad_fn)


__all__ = ["run_influence"]
