import jax
import jax.numpy as jnp
import numpy as np

from tracin_jax.training.losses import (absent_class_predictions, classwise_cross_entropy,
                                        classwise_dice_loss, dice_from_counts, hard_dice_counts,
                                        training_loss, tumour_dice_loss)


def _numpy_dice(logits, labels, eps):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    out = np.zeros(logits.shape[0:1] + logits.shape[-1:])
    for b in range(logits.shape[0]):
        for c in range(logits.shape[-1]):
            y = (labels[b] == c).astype(np.float64)
            out[b, c] = 1 - 2 * np.sum(y * p[b, ..., c]) / (np.sum(y**2) + np.sum(p[b, ..., c] ** 2) + eps)
    return out


def test_dice_matches_numpy_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 8, 8, 4)).astype(np.float32)
    labels = rng.integers(0, 4, size=(3, 8, 8))
    labels[2][labels[2] == 3] = 0  # class 3 absent from example 2
    got = classwise_dice_loss(jnp.asarray(logits), jnp.asarray(labels), 1e-6)
    np.testing.assert_allclose(got, _numpy_dice(logits.astype(np.float64), labels, 1e-6), rtol=1e-5)
    assert tumour_dice_loss(jnp.asarray(logits), jnp.asarray(labels)).shape == (3, 3)
    # An absent class has D = 1 exactly and carries no gradient.
    assert float(got[2, 3]) == 1.0
    g = jax.grad(lambda l: classwise_dice_loss(l, jnp.asarray(labels))[2, 3])(jnp.asarray(logits))
    assert float(jnp.abs(g).max()) == 0.0


def test_training_loss_is_mean_over_tumour_classes():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 6, 6, 4)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 4, size=(2, 6, 6)))
    per = classwise_dice_loss(logits, labels)
    np.testing.assert_allclose(training_loss(logits, labels), jnp.mean(per[:, 1:]), rtol=1e-6)
    np.testing.assert_allclose(training_loss(logits, labels, background_weight=1.0), jnp.mean(per), rtol=1e-6)


def test_region_cross_entropy_sums_to_pixel_mean_ce():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(2, 5, 5, 4)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 4, size=(2, 5, 5)))
    ce = classwise_cross_entropy(logits, labels)
    ref = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1), axis=(1, 2, 3))
    np.testing.assert_allclose(ce.sum(-1), ref, rtol=1e-5)


def test_hard_dice_counts():
    pred = np.array([[[0, 1], [2, 3]]])
    true = np.array([[[0, 1], [1, 3]]])
    c = np.asarray(hard_dice_counts(jnp.asarray(pred), jnp.asarray(true)))
    dice = dice_from_counts(c)
    assert dice[0] == 1.0 and dice[3] == 1.0
    assert abs(dice[1] - 2 * 1 / (1 + 2)) < 1e-9
    assert dice[2] is None  # absent from the truth: undefined, even with a false positive
    assert dice_from_counts(np.zeros((3, 4)))[1] is None  # absent in both: undefined, not 0 or 1
    assert absent_class_predictions(c) == [None, None, 1, None]


def test_one_dice_convention_whatever_the_prediction():
    """A class absent from the truth is undefined (None) both when the model predicts nothing
    and when it predicts false positives; present but missed is 0."""
    true = np.zeros((1, 4, 4), int)
    true[0, 0, 0] = 2
    quiet = np.asarray(hard_dice_counts(jnp.zeros((1, 4, 4), jnp.int32), jnp.asarray(true)))
    noisy_pred = np.zeros((1, 4, 4), int)
    noisy_pred[0, 1, 1] = 3
    noisy = np.asarray(hard_dice_counts(jnp.asarray(noisy_pred), jnp.asarray(true)))
    assert dice_from_counts(quiet)[1:] == [None, 0.0, None]
    assert dice_from_counts(noisy)[1:] == [None, 0.0, None]
    assert absent_class_predictions(quiet)[1:] == [0, None, 0]
    assert absent_class_predictions(noisy)[1:] == [0, None, 1]


def test_dice_plus_ce_is_the_sum_and_keeps_a_dying_class_alive():
    labels = jnp.zeros((1, 4, 4), jnp.int32).at[0, 0, :].set(3)
    logits = jnp.zeros((1, 4, 4, 4)).at[..., 3].set(-12.0)  # p_ET ~ 1e-5 everywhere: a dying class
    # jitted: one program per loss (eagerly, every primitive would compile on its own)
    loss = {k: jax.jit(lambda z, k=k: training_loss(z, labels, kind=k)) for k in ("dice", "ce", "dice+ce")}
    both = loss["dice+ce"](logits)
    np.testing.assert_allclose(both, loss["dice"](logits) + loss["ce"](logits), rtol=1e-6)
    grad = {k: jax.jit(jax.grad(loss[k]))(logits)[0, 0, 0, 3] for k in ("dice", "dice+ce")}
    assert abs(grad["dice"]) < 1e-4  # the soft Dice gradient vanishes with p_ET
    assert grad["dice+ce"] < -1e-2  # cross-entropy still pushes the ET logit up on ET voxels
