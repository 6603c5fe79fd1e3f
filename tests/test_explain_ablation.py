import jax.numpy as jnp
import numpy as np

from test_explain_fixtures import FakeRun
from tracin_jax.explain import selection
from tracin_jax.explain.features import FeatureStore
from tracin_jax.training.losses import dice_from_counts, hard_dice_counts


def _onehot_world(seed: int = 0):
    """Features = one-hot of the labels (filters 0-3) + a noise filter 4; head = 10 * identity."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, (6, 8, 8)).astype(np.uint8)
    feats = np.concatenate([np.eye(4, dtype=np.float32)[labels],
                            rng.uniform(size=(6, 8, 8, 1)).astype(np.float32)], axis=-1)
    kernel = np.zeros((5, 4), np.float32)
    kernel[:4] = 10 * np.eye(4)
    store = FeatureStore(lambda v, x: (x, x), None, batch_size=4, progress=False)  # features = input
    return store, feats, labels, kernel, np.zeros(4, np.float32)


def test_ablating_a_used_filter_drops_dice_an_unused_one_does_not():
    store, feats, labels, kernel, bias = _onehot_world()
    zero = np.stack([np.zeros(5, bool)] + [selection.group_mask(5, [f]) for f in range(5)])
    dice = selection.dice_table(selection.ablation_counts(store, "x", feats, labels, kernel, bias, zero))
    np.testing.assert_allclose(dice[0], 1.0)  # the full head is perfect
    drop = dice[0] - dice
    np.testing.assert_allclose(drop[1 + 4], 0.0)  # filter 4 has zero head weights
    assert drop[1 + 2, 1] == 1.0  # filter 2 carries ED: ED is never predicted without it
    np.testing.assert_allclose(drop[1 + 2, [0, 2]], 0.0)
    # zeroing the group {1, 3} removes NCR/NET and ET
    d = selection.dice_table(selection.ablation_counts(store, "x", feats, labels, kernel, bias,
                                                       selection.group_mask(5, [1, 3])[None]))
    np.testing.assert_allclose(d[0], [0.0, 1.0, 0.0])


def test_head_reapplication_matches_the_network():
    """Unablated Dice from cached features @ W + b equals Dice of the network's own logits."""
    run = FakeRun(n_train_cases=2, n_test_cases=1)
    variables = run.checkpoints[0].variables
    head = variables["params"]["head"]
    w = np.asarray(head["kernel"])[0, 0]
    # make one filter unused by the head: ablating it cannot change anything
    w = w.copy()
    w[1] = 0.0
    variables = {"params": {**variables["params"], "head": {"kernel": w[None, None], "bias": head["bias"]}},
                 "batch_stats": variables["batch_stats"]}
    store = FeatureStore(run.features, variables, batch_size=2, progress=False)
    ex = run.train
    counts = selection.ablation_counts(store, "train", ex.images, ex.labels, w, np.asarray(head["bias"]),
                                       np.stack([np.zeros(4, bool), selection.group_mask(4, [1])]))
    logits = run.apply(variables, jnp.asarray(ex.images))
    direct = hard_dice_counts(jnp.argmax(logits, -1), jnp.asarray(ex.labels, jnp.int32))
    np.testing.assert_allclose(counts[0], np.asarray(direct))
    np.testing.assert_allclose(counts[1], counts[0])
    assert dice_from_counts(counts[0])[1:] == list(selection.dice_table(counts[:1])[0])
