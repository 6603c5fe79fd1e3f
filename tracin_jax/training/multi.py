"""Training K models from scratch at once, each on its own subset of the training patients.

A model follows the run's own recipe (``run.config``: epochs, optimiser, learning rate, batch
size, augmentation, 3D patches, initialisation from its training seed) on the training
examples (slices, or a 3D run's volumes: one per patient) of a subset
of patients, given as a mask over the sorted unique ``run.train.cases`` (the order of
:func:`tracin_jax.data.split.patient_index` and of ``patient_scores``' patient axis).

Schedule of model k (training seed ``s``, ``n_k`` slices of its patients, batch size ``B``):
epoch ``e`` visits its slices in the order ``epoch_order(n_k, s, e)`` in ``ceil(n_k / B)``
batches, step ``(e, b)`` uses the augmentation key ``fold_in(fold_in(key(s), e), b)`` and the
batch's indices sorted, exactly as :func:`tracin_jax.training.train.train_and_evaluate`. The one
difference: every batch is full. A final partial batch is completed by wrapping around to the
start of that epoch's order (the base run steps on a smaller last batch instead), so one
compiled program serves every subset. With ``n_k`` a multiple of ``B`` the schedule is the base
run's, step for step.

Two ways to train K models (:func:`train_models`):

- ``sequential``: one model after the other with the base run's jitted train step;
- ``vmap``: the K models' parameters and optimiser states stacked on a leading axis, one
  vmapped train step over the K models; each model gathers its own batch from the training set
  kept on the device. Models with fewer steps than the longest are frozen (``active`` flag,
  ``jnp.where`` on parameters, batch statistics and optimiser state) once their schedule ends.

Both give the same models to float tolerance (tests/test_evaluate_retrain.py). Used by the
counterfactual retrainings of :mod:`tracin_jax.evaluate` and by TRAK's model ensemble.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tracin_jax.config import Config
from tracin_jax.data.split import patient_index
from tracin_jax.errors import InputError
from tracin_jax.models import build_model
from tracin_jax.progress import tqdm
from tracin_jax.training.train import epoch_order, init_variables, make_optimizer, make_train_step
from tracin_jax.training.window import patch_of

MODES = ("auto", "sequential", "vmap")


def run_patients(run) -> tuple[list[str], np.ndarray]:
    """(training patients sorted by id, int32[n_train] each training slice's patient position)."""
    return patient_index(run.train.cases)


def resolve_mode(mode: str) -> str:
    """``auto`` -> ``vmap`` on GPU/TPU, ``sequential`` on CPU."""
    if mode not in MODES:
        raise InputError(f"training mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "auto":
        return "sequential" if jax.default_backend() == "cpu" else "vmap"
    return mode


def model_schedule(examples: np.ndarray, seed: int, epochs: int, batch_size: int,
                   n_steps: int | None = None) -> list[tuple[int, int, np.ndarray]]:
    """The steps of one model: [(epoch, batch, int[batch_size] sorted training indices)].

    ``examples``: int[n] training-slice indices of the model's patients (ascending). Every batch
    is full: the last one of an epoch wraps around to the start of that epoch's order.
    ``n_steps``: None trains ``epochs`` epochs; a number trains exactly that many steps instead,
    going on with further epochs (or stopping inside one) as needed; the steps it shares with
    the ``epochs`` schedule are the same.
    """
    n = len(examples)
    if n == 0:
        raise InputError("a retraining subset has no training slices")
    if n_steps is not None and n_steps < 1:
        raise InputError(f"a retraining needs at least one step, got {n_steps}")
    n_batches = math.ceil(n / batch_size)
    steps = []
    epoch = 0
    while (epoch < epochs) if n_steps is None else (len(steps) < n_steps):
        epoch += 1
        order = np.resize(epoch_order(n, seed, epoch), n_batches * batch_size)
        for b in range(n_batches):
            steps.append((epoch, b, np.sort(examples[order[b * batch_size:(b + 1) * batch_size]])))
    return steps if n_steps is None else steps[:n_steps]


STEP_RULES = ("epochs", "matched")


def check_step_rule(steps: str) -> None:
    """InputError unless ``steps`` is one of :data:`STEP_RULES`."""
    if steps not in STEP_RULES:
        raise InputError(f"--leave-out-steps {steps!r} is not one of {', '.join(STEP_RULES)}")


def full_data_steps(run) -> int:
    """Optimiser steps of a retraining on every training patient: epochs x ceil(slices / B)."""
    cfg = run.config.train
    return cfg.epochs * math.ceil(len(run.train.ids) / cfg.batch_size)


def schedule_steps(run, n_slices: int, steps: str = "epochs") -> int:
    """Optimiser steps of a retraining on ``n_slices`` training slices under the ``steps`` rule
    (the length of its :func:`model_schedule`)."""
    check_step_rule(steps)
    if steps == "matched":
        return full_data_steps(run)
    cfg = run.config.train
    return cfg.epochs * math.ceil(n_slices / cfg.batch_size)


@functools.lru_cache(maxsize=8)
def _train_fns(config: Config, image_shape: tuple[int, ...]):
    """(model, tx, jitted single-model step, jitted K-model vmapped step) for a config;
    ``image_shape`` one example's (H, W, M), or (X, Y, Z, M) for a 3D run (whose steps cut
    ``data.patch`` patches as the base run's do)."""
    model = build_model(config.model)
    tx = make_optimizer(config.train)
    step = make_train_step(model, tx, config.train, image_shape[:2], config.data.downsample,
                           patch=patch_of(config))
    raw = getattr(step, "__wrapped__", step)

    def one(variables, opt_state, idx, key_data, active, images, labels):
        key = jax.random.wrap_key_data(key_data)
        new_vars, new_opt, loss = raw(variables, opt_state, images[idx],
                                      labels[idx].astype(jnp.int32), key)

        def keep(new, old):
            return jnp.where(active, new, old)

        return (jax.tree_util.tree_map(keep, new_vars, variables),
                jax.tree_util.tree_map(keep, new_opt, opt_state), loss)

    many = jax.jit(jax.vmap(one, in_axes=(0, 0, 0, 0, 0, None, None)), donate_argnums=(0, 1))
    # Eager, as in the base run (init_variables may draw on the host from the key's value).
    init = functools.partial(init_variables, model, image_shape=image_shape)
    return model, tx, step, many, init


def _init(fns, seed: int):
    """(key, variables, optimiser state) of a fresh model with training seed ``seed``."""
    _, tx, _, _, init = fns
    key = jax.random.key(seed)
    variables = init(key)
    return key, variables, tx.init(variables["params"])


def _image_shape(run) -> tuple[int, ...]:
    return tuple(int(s) for s in run.train.images.shape[1:])


def _examples_of(mask: np.ndarray, slice_patient: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.asarray(mask, bool)[slice_patient])


def _check_masks(masks: np.ndarray, n_patients: int, seeds: Sequence[int]) -> np.ndarray:
    masks = np.asarray(masks, bool)
    if masks.ndim != 2 or masks.shape[1] != n_patients:
        raise InputError(f"patient masks have shape {masks.shape}, expected [K, {n_patients}]")
    if len(seeds) != masks.shape[0]:
        raise InputError(f"{len(seeds)} training seeds for {masks.shape[0]} models")
    if not masks.any(axis=1).all():
        raise InputError("a retraining subset keeps no training patient")
    return masks


def train_models(run, masks: np.ndarray, seeds: Sequence[int], *, mode: str = "auto",
                 progress: bool = True, timings: dict | None = None,
                 steps: str = "epochs") -> Any:
    """Retrains K models from scratch, model k on the patients of masks[k] with seed seeds[k].

    Args:
      run: a :class:`tracin_jax.run.Run` (its config and training split are used).
      masks: bool[K, P] over the run's training patients (sorted ids).
      seeds: K training seeds (initialisation, epoch order, augmentation keys).
      mode: ``sequential``, ``vmap`` or ``auto`` (vmap on GPU/TPU, sequential on CPU).
      steps: ``epochs`` (the run's epochs over the model's own slices: fewer patients, fewer
        steps) or ``matched`` (exactly as many steps as a model on all training patients,
        :func:`full_data_steps`: the kept slices are visited more often).
      timings: if given, filled with seconds: ``init`` (initialisations), ``first_step`` (the
        first train step of the call, compilation included), ``steps`` (the others, their count
        in ``n_steps``), and ``mode``.
    Returns:
      variables {'params', 'batch_stats'} with every leaf stacked on a leading K axis, on JAX's
      default device (with several JAX processes, this process's first local device: no
      collective is involved, so each process can train its own models).
    """
    check_step_rule(steps)
    patients, slice_patient = run_patients(run)
    masks = _check_masks(masks, len(patients), seeds)
    mode = resolve_mode(mode)
    cfg = run.config
    shape = _image_shape(run)
    fns = _train_fns(cfg, shape)
    _, _, step, many, _ = fns
    n_steps = full_data_steps(run) if steps == "matched" else None
    schedules = [model_schedule(_examples_of(mk, slice_patient), int(s), cfg.train.epochs,
                                cfg.train.batch_size, n_steps) for mk, s in zip(masks, seeds)]
    images, labels = run.train.images, run.train.labels
    clock = {"init": 0.0, "first_step": 0.0, "steps": 0.0, "n_steps": 0, "mode": mode}
    if mode == "sequential":
        outs = []
        bar = tqdm(total=sum(map(len, schedules)), desc="retraining", unit="step",
                   disable=not progress, leave=False, dynamic_ncols=True)
        for sched, s in zip(schedules, seeds):
            t0 = time.perf_counter()
            key, variables, opt_state = _init(fns, int(s))
            clock["init"] += time.perf_counter() - t0
            for epoch, b, idx in sched:
                t0 = time.perf_counter()
                step_key = jax.random.fold_in(jax.random.fold_in(key, epoch), b)
                variables, opt_state, loss = step(variables, opt_state, jnp.asarray(images[idx]),
                                                  jnp.asarray(labels[idx], jnp.int32), step_key)
                _tick(clock, loss, t0)
                bar.update(1)
            outs.append(variables)
        bar.close()
        if timings is not None:
            timings.update(clock)
        return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *outs)

    t0 = time.perf_counter()
    inits = [_init(fns, int(s)) for s in seeds]
    clock["init"] = time.perf_counter() - t0
    stack = functools.partial(jax.tree_util.tree_map, lambda *xs: jnp.stack(xs))
    variables = stack(*[v for _, v, _ in inits])
    opt_state = stack(*[o for _, _, o in inits])
    n_steps = max(map(len, schedules))
    k_models, bs = len(seeds), cfg.train.batch_size
    idx = np.zeros((n_steps, k_models, bs), np.int32)
    active = np.zeros((n_steps, k_models), bool)
    key_data = np.zeros((n_steps, k_models, *jax.random.key_data(inits[0][0]).shape), np.uint32)
    fold = jax.jit(jax.vmap(lambda key, e, b: jax.random.key_data(
        jax.random.fold_in(jax.random.fold_in(key, e), b)), in_axes=(None, 0, 0)))
    for k, (sched, (key, _, _)) in enumerate(zip(schedules, inits)):
        t = len(sched)
        idx[:t, k] = np.stack([i for _, _, i in sched])
        active[:t, k] = True
        key_data[:t, k] = np.asarray(fold(key, np.array([e for e, _, _ in sched], np.int32),
                                          np.array([b for _, b, _ in sched], np.int32)))
        key_data[t:, k] = key_data[t - 1, k]
    dev_images, dev_labels = jnp.asarray(images), jnp.asarray(labels)
    bar = tqdm(total=n_steps, desc=f"retraining {k_models} models (vmap)", unit="step",
               disable=not progress, leave=False, dynamic_ncols=True)
    for t in range(n_steps):
        t0 = time.perf_counter()
        variables, opt_state, loss = many(variables, opt_state, jnp.asarray(idx[t]),
                                          jnp.asarray(key_data[t]), jnp.asarray(active[t]),
                                          dev_images, dev_labels)
        _tick(clock, loss, t0)
        bar.update(1)
    bar.close()
    if timings is not None:
        timings.update(clock)
    return variables


def _tick(clock: dict, loss, t0: float) -> None:
    """Adds one finished step's seconds to ``clock`` (the first step apart: it compiles)."""
    jax.block_until_ready(loss)
    dt = time.perf_counter() - t0
    if clock["n_steps"] == 0 and clock["first_step"] == 0.0:
        clock["first_step"] = dt
    else:
        clock["steps"] += dt
        clock["n_steps"] += 1


def unstack(variables: Any, k: int) -> Any:
    """Model k of variables stacked on a leading axis."""
    return jax.tree_util.tree_map(lambda x: x[k], variables)
