"""Retraining from scratch on subsets of the training patients: the counterfactual models.

:func:`patient_subsets` draws the subsets; the models are trained by
:func:`tracin_jax.training.multi.train_models` (the K-model trainer, its schedules and modes:
see that module), and :func:`test_outputs` measures what scoring needs from each on the run's
test split. The trainer's names are re-exported here, so ``from tracin_jax.evaluate.retrain
import train_models`` keeps working.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tracin_jax.errors import InputError
from tracin_jax.training.window import inference_model
from tracin_jax.training.losses import (dice_from_counts, hard_dice_counts, tumour_cross_entropy,
                                        tumour_dice_loss)
from tracin_jax.training.multi import (  # noqa: F401  (re-exported)
    MODES, STEP_RULES, check_step_rule, full_data_steps, model_schedule, resolve_mode,
    run_patients, schedule_steps, train_models, unstack)


def patient_subsets(n_patients: int, m: int, fraction: float, seed: int) -> np.ndarray:
    """M random subsets of P patients, each of round(fraction * P) patients (clipped to [1, P-1]).

    Returns bool[M, P] (row j: the patients kept in subset j). Deterministic in ``seed``.
    """
    if n_patients < 2:
        raise InputError(f"need at least 2 training patients to draw subsets, got {n_patients}")
    if m < 1:
        raise InputError(f"number of subsets {m} must be at least 1")
    if not 0.0 < fraction < 1.0:
        raise InputError(f"subset fraction {fraction} must lie in (0, 1)")
    size = int(min(max(round(fraction * n_patients), 1), n_patients - 1))
    rng = np.random.default_rng(seed)
    masks = np.zeros((m, n_patients), bool)
    for j in range(m):
        masks[j, rng.permutation(n_patients)[:size]] = True
    return masks


@functools.lru_cache(maxsize=8)
def _eval_fn(config, eps: float):
    model = inference_model(config)  # the network; a sliding window for a run trained on patches

    @jax.jit
    def fn(variables, images, labels):
        labels = labels.astype(jnp.int32)
        logits = model.apply(variables, images, train=False)
        counts = hard_dice_counts(jnp.argmax(logits, -1), labels, logits.shape[-1])
        return tumour_dice_loss(logits, labels, eps), tumour_cross_entropy(logits, labels), counts

    return fn


def test_outputs(run, variables_k: Any, batch_size: int = 32) -> dict:
    """What scoring needs from one model, on the run's test split (n_test slices).

    Returns {"dice_loss": f32[n_test, C] (tumour_dice_loss with the run's dice_eps),
    "ce_loss": f32[n_test, C] (tumour_cross_entropy), "dice": f32[C] hard Dice per foreground
    class over the whole test split (global counts; NaN where the class is absent from both
    prediction and ground truth)}, C = the model's outputs minus background (the run's task's
    classes; BraTS: 3).
    """
    fn = _eval_fn(run.config, float(run.config.train.dice_eps))
    images, labels = run.test.images, run.test.labels
    n = len(images)
    dice_loss, ce_loss, counts = [], [], 0.0
    for s in range(0, n, batch_size):
        d, c, k = fn(variables_k, jnp.asarray(images[s:s + batch_size]),
                     jnp.asarray(labels[s:s + batch_size]))
        dice_loss.append(np.asarray(d))
        ce_loss.append(np.asarray(c))
        counts = counts + np.asarray(k, np.float64)
    c = int(run.config.model.num_classes) - 1
    empty = np.zeros((0, c), np.float32)
    dice = (dice_from_counts(counts)[1:] if n else [None] * c)
    return {
        "dice_loss": np.concatenate(dice_loss).astype(np.float32) if n else empty,
        "ce_loss": np.concatenate(ce_loss).astype(np.float32) if n else empty,
        "dice": np.array([np.nan if v is None else v for v in dice], np.float32),
    }


test_outputs.__test__ = False  # not a pytest test despite the name
