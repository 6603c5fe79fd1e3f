"""What the stored features and the class axis mean: tags that identify a gradient function,
the class labels a loss scores, the memory the stage may use, and the train-vs-train stream."""

import functools
import json

import jax
import numpy as np
import pytest

from tracin_jax.errors import InputError
from tracin_jax.influence import (class_tracin, compute_influence, make_class_grad_fn,
                                  normalised, resolve_subset)
from tracin_jax.influence.grads import ClassGradFunction, unique_name
from tracin_jax.influence.reference import toy_problem
from tracin_jax.training.losses import classwise_cross_entropy, classwise_dice_loss

@pytest.fixture(scope="module")
def head(toy):
    return resolve_subset(toy.checkpoints[0].variables["params"], "head")


def _run(toy, fn, tmp, name, **kw):
    kw = {"chunk_size": 3, "batch_size": 2, "progress": False, "store_dir": tmp / "store", **kw}
    return compute_influence(fn, toy.checkpoints, toy.train, toy.test, tmp / name, **kw)


def _scaled(k):
    return lambda logits, labels: k * classwise_cross_entropy(logits, labels)[:, 1:]


def _local_loss():
    def loss(logits, labels):
        return classwise_dice_loss(logits, labels)[:, 1:]
    return loss


def test_names_that_do_not_identify_a_loss_give_no_default_tag(toy, head):
    assert unique_name(classwise_dice_loss) == "classwise_dice_loss"
    assert unique_name(functools.partial(classwise_dice_loss, eps=1e-3)) == \
        "classwise_dice_loss(eps=0.001)"
    assert unique_name(_run).startswith(f"{__name__}._run@")
    # A module-level function edited and run again (a notebook cell) is another function.
    namespace: dict = {"__name__": "__main__"}
    exec("def loss(logits, labels):\n    return logits[..., 1:] * 1.0", namespace)
    first = unique_name(namespace["loss"])
    exec("def loss(logits, labels):\n    return logits[..., 1:] * 2.0", namespace)
    assert first.startswith("__main__.loss@") and unique_name(namespace["loss"]) != first
    for fn in (_scaled(1.0), _local_loss(), functools.partial(_scaled(2.0)),
               functools.partial(classwise_dice_loss, 1.0), toy_problem.__call__):
        assert unique_name(fn) is None, fn
    grad = make_class_grad_fn(toy.model, head, loss_fn=_scaled(1.0))
    assert grad.tag is None and normalised(grad).tag is None


def test_two_lambda_losses_never_share_stored_features(toy, head, tmp_path):
    one = make_class_grad_fn(toy.model, head, loss_fn=_scaled(1.0))
    two = make_class_grad_fn(toy.model, head, loss_fn=_scaled(3.0))
    # In memory no tag is needed.
    s1, _ = class_tracin(one, toy.checkpoints, toy.train.images, toy.train.labels,
                         toy.test.images, toy.test.labels)
    for fn in (one, normalised(two), one.fn):  # the store refuses each, writing nothing
        with pytest.raises(InputError, match=r'pass tag="\.\.\."') as e:
            _run(toy, fn, tmp_path, "out", store_dir=None, workdir=tmp_path)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "features").exists()
    # Tagged, each gets its own store and its own scores.
    one = make_class_grad_fn(toy.model, head, loss_fn=_scaled(1.0), tag="ce-x1")
    two = make_class_grad_fn(toy.model, head, loss_fn=_scaled(3.0), tag="ce-x3")
    m1 = _run(toy, one, tmp_path, "a", store_dir=None, workdir=tmp_path)
    m2 = _run(toy, two, tmp_path, "b", store_dir=None, workdir=tmp_path)
    assert m1["store"] != m2["store"]
    np.testing.assert_allclose(np.load(tmp_path / "b" / "scores.npy"),
                               9 * np.load(tmp_path / "a" / "scores.npy"), rtol=1e-4)
    np.testing.assert_allclose(np.load(tmp_path / "a" / "scores.npy"), s1, rtol=1e-5, atol=1e-8)


def test_a_loss_with_background_scores_labels_0_to_3(toy, head, tmp_path):
    four = make_class_grad_fn(toy.model, head, loss_fn=classwise_dice_loss)  # C = 4
    with pytest.raises(InputError, match=r"gives 4 classes.*class_labels=\(0, 1, 2, 3\)"):
        _run(toy, four, tmp_path, "bad")
    assert not (tmp_path / "bad").exists()
    four = make_class_grad_fn(toy.model, head, loss_fn=classwise_dice_loss,
                              class_labels=(0, 1, 2, 3))
    assert four.class_names == ("background", "NCR/NET", "ED", "ET")
    meta = _run(toy, four, tmp_path, "bg", store_dir=tmp_path / "bg-store")
    saved = json.loads((tmp_path / "bg" / "meta.json").read_text())
    assert saved["class_names"] == ["background", "NCR/NET", "ED", "ET"]
    assert saved["class_labels"] == [0, 1, 2, 3] == meta["class_labels"]
    present = np.load(tmp_path / "bg" / "test_present.npy")
    want = np.stack([(toy.test.labels == v).reshape(3, -1).any(1) for v in range(4)], axis=1)
    np.testing.assert_array_equal(present, want)
    assert np.load(tmp_path / "bg" / "scores.npy").shape == (3, 4, 7, 4)
    # The default tumour classes record their labels too.
    meta = _run(toy, make_class_grad_fn(toy.model, head), tmp_path, "tumour",
                store_dir=tmp_path / "tumour-store")
    assert meta["class_names"] == ["NCR/NET", "ED", "ET"] and meta["class_labels"] == [1, 2, 3]
    with pytest.raises(InputError, match="differ in length"):
        ClassGradFunction(fn=four.fn, tag="x", dim=four.dim, class_names=("a",),
                          class_labels=(1, 2))


def test_a_budget_below_the_stage_estimate_is_refused_up_front(toy, head, tmp_path, monkeypatch):
    from tracin_jax.influence import checks, engine

    calls = []
    monkeypatch.setattr(engine, "featurise_checkpoint", lambda *a, **k: calls.append(1))
    fn = make_class_grad_fn(toy.model, head)
    with pytest.raises(InputError, match=r"--memory-budget-gb 1e-06: the influence stage needs "
                       r"about 0\.00 GB \(.*batch gradients.*\); use --proj-dim 4096") as e:
        _run(toy, fn, tmp_path, "out", memory_budget_gb=1e-6)
    assert "\n" not in str(e.value) and not calls
    assert not (tmp_path / "out").exists() and not (tmp_path / "store").exists()
    est = checks.memory_estimate(n_test=3, n_train=7, num_classes=3, dim=fn.dim,
                                 n_checkpoints=2, chunk_size=3, batch_size=2,
                                 grad_params=head.size, split="test")
    f, row = 4, 3 * 2 * fn.dim * 4
    assert est["query_features"] == 2 * 3 * row and est["train_block"] == 3 * 3 * row
    assert est["batch_gradients"] == 2 * 2 * 3 * head.size * f
    assert est["total"] == sum(v for k, v in est.items() if k != "total")


def test_train_vs_train_streams_the_queries_in_store_blocks(toy, head, tmp_path, monkeypatch):
    from tracin_jax.influence import engine

    rows = []
    real = engine.score_blocks

    def spy(test_feats, *a, **kw):
        rows.append(np.shape(test_feats)[0])
        return real(test_feats, *a, **kw)

    monkeypatch.setattr(engine, "score_blocks", spy)
    fn = make_class_grad_fn(toy.model, head)
    compute_influence(fn, toy.checkpoints, toy.train, toy.train, tmp_path / "tt", split="train",
                      chunk_size=3, batch_size=2, topk=3, progress=False,
                      store_dir=tmp_path / "store")
    assert rows == [3, 3, 1]  # never the whole training set at once
    want, want_self = class_tracin(fn, toy.checkpoints, toy.train.images, toy.train.labels,
                                   toy.train.images, toy.train.labels)
    got = np.load(tmp_path / "tt" / "scores.npy")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    np.testing.assert_allclose(np.load(tmp_path / "tt" / "self_influence.npy"), want_self,
                               rtol=1e-5)
    assert np.load(tmp_path / "tt" / "topk_proponents_indices.npy").shape == (7, 3, 3, 3)
    assert np.load(tmp_path / "tt" / "patient_scores.npy").shape[0] == 7


def test_two_concurrent_runs_on_one_store_compute_each_chunk_once(toy, head, tmp_path, capsys):
    import threading
    import time

    inner = make_class_grad_fn(toy.model, head)
    batches = []

    def slow(variables, images, labels):
        if not isinstance(images, jax.core.Tracer):  # feature_shape traces it once per run
            batches.append(len(images))
        time.sleep(0.2)  # long enough that the second run arrives while the first computes
        return inner(variables, images, labels)

    fn = ClassGradFunction(fn=slow, tag="slow-head", dim=inner.dim, subset=head)
    metas, errors = {}, []

    def one(name):
        try:
            metas[name] = compute_influence(fn, toy.checkpoints, toy.train, toy.train,
                                            tmp_path / name, chunk_size=3, batch_size=3,
                                            split="train", progress=False,
                                            store_dir=tmp_path / "store")
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert not errors, errors
    computed = [metas[n]["timings"]["train_features"]["chunks_computed"] for n in "ab"]
    assert sum(computed) == 3 * len(toy.checkpoints)  # 3 chunks x 2 checkpoints, each once
    assert sum(batches) == 7 * len(toy.checkpoints)
    assert "waiting for it" in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "scores.npy"),
                                  np.load(tmp_path / "b" / "scores.npy"))


@pytest.mark.parametrize("method,examples", [("head", "auto"), ("vjp", "vmap")])
def test_gradients_compile_once_per_batch_shape_across_batches_and_checkpoints(
        toy, head, tmp_path, method, examples):
    import chex

    # Traced once per distinct batch shape: the shape probe (1), training batches (2; the last,
    # short one is padded) and the test set (3, one batch of its own size). A retrace per batch
    # or per checkpoint would exceed this.
    chex.clear_trace_counter()  # counts are kept per code location, across parametrisations
    loss = chex.assert_max_traces(
        lambda logits, labels: classwise_dice_loss(logits, labels)[:, 1:], n=3)
    fn = make_class_grad_fn(toy.model, head, loss_fn=loss, method=method, examples=examples,
                            tag=f"traced-{method}")
    _run(toy, fn, tmp_path, "out", batch_size=2)  # 4 training batches x 2 checkpoints


def test_public_boundaries_check_shapes(toy, head):
    from tracin_jax.influence.scores import contract

    from tracin_jax.errors import InputError

    fn = make_class_grad_fn(toy.model, head)
    with pytest.raises(InputError, match="neither slices"):  # labels of rank 2
        class_tracin(fn, toy.checkpoints, toy.train.images, toy.train.labels[:, 0],
                     toy.test.images, toy.test.labels)
    with pytest.raises(AssertionError):  # images of another rank than the labels
        class_tracin(fn, toy.checkpoints, toy.train.images[:, 0], toy.train.labels,
                     toy.test.images, toy.test.labels)
    with pytest.raises(AssertionError):
        contract(np.zeros((2, 3, 5), np.float32), np.zeros((4, 3, 6), np.float32))
