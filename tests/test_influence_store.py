"""The feature store and the engine core: files, chunking, reuse, and resuming after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tracin_jax.errors import InputError
from tracin_jax.influence import class_tracin, compute_influence, make_class_grad_fn, resolve_subset
from tracin_jax.influence.scores import aggregate_by_patient, topk_from_scores
from conftest import TOY

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def head_fn(toy):
    return make_class_grad_fn(toy.model, resolve_subset(toy.checkpoints[0].variables["params"], "head"))


def _run(toy, fn, tmp, name, test=None, **kw):
    kw = {"chunk_size": 3, "batch_size": 2, "progress": False, **kw}
    kw.setdefault("store_dir", tmp / "store")
    meta = compute_influence(fn, toy.checkpoints, toy.train, test or toy.test, tmp / name, **kw)
    return meta, tmp / name


def test_files_meta_and_values(toy, head_fn, tmp_path):
    meta, out = _run(toy, head_fn, tmp_path, "out", topk=2)
    scores = np.load(out / "scores.npy")
    assert scores.shape == (3, 3, 7, 3) and scores.dtype == np.float32
    want, want_self = class_tracin(head_fn, toy.checkpoints, toy.train.images, toy.train.labels,
                                   toy.test.images, toy.test.labels)
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    np.testing.assert_allclose(np.load(out / "self_influence.npy"), want_self, rtol=1e-5)
    present = np.load(out / "test_present.npy")
    assert present.dtype == bool and present.shape == (3, 3)
    assert not present[1, 2] and present[0].all()  # ET absent from test slice 1
    assert not np.load(out / "train_present.npy")[2, 0]
    pat, patients = aggregate_by_patient(scores, toy.train.cases)
    np.testing.assert_allclose(np.load(out / "patient_scores.npy"), pat, rtol=1e-5, atol=1e-7)
    top = topk_from_scores(scores, 2, present)
    for name, arr in top.items():
        np.testing.assert_array_equal(np.load(out / f"topk_{name}.npy"), arr)
        assert (out / f"topk_patients_{name}.npy").exists()
    assert np.all(np.load(out / "topk_proponents_indices.npy")[1, 2] == -1)

    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == json.loads(json.dumps(meta))
    assert meta["class_names"] == ["NCR/NET", "ED", "ET"]
    assert meta["train_ids"] == toy.train.ids and meta["test_ids"] == toy.test.ids
    assert meta["patients"] == patients and meta["train_cases"] == toy.train.cases
    assert meta["checkpoints"] == [{"epoch": c.epoch, "lr": c.lr} for c in toy.checkpoints]
    assert meta["params"]["name"] == "head" and meta["params"]["size"] == 16
    assert meta["params"]["paths"] == ["head/kernel"] and meta["projection"] is None
    assert set(meta["files"]) >= {"scores.npy", "self_influence.npy", "test_present.npy",
                                  "patient_scores.npy", "topk_proponents_indices.npy"}
    assert meta["device_count"] >= 1 and meta["timings"]["train_features"]["chunks_computed"] == 6
    assert not list(out.glob("*.tmp"))

    # The store: 3 chunks per checkpoint, a manifest entry per chunk.
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert len(manifest["chunks"]) == 6 and manifest["header"]["chunk_size"] == 3
    entry = manifest["chunks"][f"{toy.checkpoints[1].epoch}/2"]
    assert entry["shape"] == [1, 3, 16] and entry["start"] == 6 and entry["lr"] == toy.checkpoints[1].lr
    assert manifest["checkpoints"][str(toy.checkpoints[0].epoch)]["lr"] == toy.checkpoints[0].lr


def test_chunk_and_batch_sizes_do_not_change_results(toy, head_fn, tmp_path):
    _, a = _run(toy, head_fn, tmp_path, "a", chunk_size=2, batch_size=1, store_dir=tmp_path / "s1")
    _, b = _run(toy, head_fn, tmp_path, "b", chunk_size=7, batch_size=4, store_dir=tmp_path / "s2")
    for name in ("scores.npy", "self_influence.npy", "patient_scores.npy"):
        x, y = np.load(a / name), np.load(b / name)
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6 * np.abs(y).max())


def test_store_is_reused_for_another_test_set_and_tracks_checkpoints(toy, head_fn, tmp_path):
    _run(toy, head_fn, tmp_path, "first")
    other = SimpleNamespace(images=toy.train.images[:2], labels=toy.train.labels[:2],
                            ids=["q0", "q1"], cases=["qc", "qc"])
    meta, out = _run(toy, head_fn, tmp_path, "second", test=other)
    stats = meta["timings"]["train_features"]
    assert stats["chunks_computed"] == 0 and stats["chunks_reused"] == 6
    assert np.load(out / "scores.npy").shape == (2, 3, 7, 3)
    # A checkpoint whose variables changed on disk is recomputed; the other one is kept.
    changed = [toy.checkpoints[0], SimpleNamespace(
        epoch=toy.checkpoints[1].epoch, lr=toy.checkpoints[1].lr,
        variables={**toy.checkpoints[1].variables, "params": toy.checkpoints[0].variables["params"]})]
    meta = compute_influence(head_fn, changed, toy.train, other, tmp_path / "third",
                             store_dir=tmp_path / "store", chunk_size=3, batch_size=2,
                             progress=False)
    assert meta["timings"]["train_features"]["chunks_computed"] == 3
    # A store holding other features is refused with one line.
    manifest = tmp_path / "store" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["header"]["dim"] = 99
    manifest.write_text(json.dumps(data))
    with pytest.raises(InputError, match="features of another setting"):
        _run(toy, head_fn, tmp_path, "fourth")


def test_split_train_gives_symmetric_scores_with_self_influence_on_the_diagonal(toy, head_fn, tmp_path):
    meta, out = _run(toy, head_fn, tmp_path, "tt", test=toy.train, split="train")
    scores = np.load(out / "scores.npy")
    np.testing.assert_allclose(np.einsum("bjbj->bj", scores), np.load(out / "self_influence.npy"),
                               rtol=1e-5)
    np.testing.assert_allclose(scores, scores.transpose(2, 3, 0, 1), rtol=1e-5, atol=1e-9)
    assert meta["split"] == "train" and meta["timings"]["test_features_s"] == 0


def _stage_only_budget(toy, fn) -> float:
    """A budget (GB) that holds the stage's working memory but not the full score tensor."""
    from tracin_jax.influence import sharding
    from tracin_jax.influence.checks import gradient_workspace, memory_estimate

    workspace = gradient_workspace(fn, toy.checkpoints[0].variables, toy.train.images,
                                   toy.train.labels, 2, sharding.train_mesh())
    est = memory_estimate(n_test=3, n_train=7, num_classes=3, dim=fn.dim,
                          n_checkpoints=len(toy.checkpoints), chunk_size=3, batch_size=2,
                          grad_params=fn.subset.size, split="test", workspace_bytes=workspace)
    return est["total"] / 2**30


def test_streaming_topk_without_the_full_tensor(toy, head_fn, tmp_path):
    _, full = _run(toy, head_fn, tmp_path, "full", topk=4)
    budget = _stage_only_budget(toy, head_fn)
    meta, small = _run(toy, head_fn, tmp_path, "small", memory_budget_gb=budget, topk=4)
    assert not (small / "scores.npy").exists() and "scores.npy" not in meta["files"]
    assert not (small / "patient_scores.npy").exists()
    for side in ("proponents", "opponents"):
        np.testing.assert_array_equal(np.load(small / f"topk_{side}_indices.npy"),
                                      np.load(full / f"topk_{side}_indices.npy"))
    # Without --topk, a budget overflow still yields the default top-K.
    meta, out = _run(toy, head_fn, tmp_path, "default", memory_budget_gb=budget)
    assert meta["topk"] == 7  # DEFAULT_TOPK = 10, clamped to the 7 training slices
    assert np.load(out / "topk_opponents_scores.npy").shape == (3, 3, 3, 7)


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import numpy as np
    from tracin_jax.influence import compute_influence, make_class_grad_fn, resolve_subset, store
    from tracin_jax.influence.reference import toy_problem

    toy = toy_problem(**{toy})
    fn = make_class_grad_fn(toy.model, resolve_subset(toy.checkpoints[0].variables["params"],
                                                      {params!r}))
    calls = []
    real = store.save_npy_atomic

    def dying(path, array):
        if str(path).endswith(".npy") and "chunk_" in str(path):
            calls.append(path)
            if len(calls) > {kill_after}:
                # Half of the data reaches the temporary file, then the process dies.
                tmp = Path(str(path) + ".tmp")
                np.lib.format.open_memmap(tmp, mode="w+", dtype=array.dtype,
                                          shape=array.shape)[: len(array) // 2] = array[: len(array) // 2]
                os.kill(os.getpid(), signal.SIGKILL)
        real(path, array)

    store.save_npy_atomic = dying
    compute_influence(fn, toy.checkpoints, toy.train, toy.test, sys.argv[1], store_dir=sys.argv[2],
                      chunk_size=2, batch_size=2, progress=False)
    print("finished")
""")


def test_resume_after_sigkill_equals_an_uninterrupted_run(toy, tmp_path):
    params = "dec0/.*|head/kernel"  # a backward pass through part of the network
    fn = make_class_grad_fn(toy.model, resolve_subset(toy.checkpoints[0].variables["params"], params))
    script = KILLED_RUN.format(toy=TOY, params=params, kill_after=5)
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "killed"),
                           str(tmp_path / "store")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "finished" not in proc.stdout
    store = tmp_path / "store"
    done = sorted(store.glob("epoch_*/chunk_*.npy"))
    assert len(done) == 5 and len(list(store.glob("epoch_*/*.tmp"))) == 1
    assert not (tmp_path / "killed" / "meta.json").exists()

    meta = compute_influence(fn, toy.checkpoints, toy.train, toy.test, tmp_path / "resumed",
                             store_dir=store, chunk_size=2, batch_size=2, progress=False)
    stats = meta["timings"]["train_features"]
    assert stats["chunks_reused"] == 5 and stats["chunks_computed"] == 2 * 4 - 5
    assert not list(store.glob("epoch_*/*.tmp"))
    clean = compute_influence(fn, toy.checkpoints, toy.train, toy.test, tmp_path / "clean",
                              store_dir=tmp_path / "fresh", chunk_size=2, batch_size=2,
                              progress=False)
    assert clean["timings"]["train_features"]["chunks_computed"] == 8
    for name in ("scores.npy", "self_influence.npy", "patient_scores.npy"):
        np.testing.assert_allclose(np.load(tmp_path / "resumed" / name),
                                   np.load(tmp_path / "clean" / name), rtol=1e-6, atol=0)


def test_a_set_smaller_than_a_batch_is_not_padded_to_a_whole_batch():
    """Padded rows are computed in full, so 3 examples with batch 16 run as a batch of 3."""
    import jax
    import jax.numpy as jnp

    from tracin_jax.influence.sharding import train_mesh
    from tracin_jax.influence.store import compute_features

    seen = []

    def grad_fn(variables, images, labels):
        seen.append(images.shape[0])
        return jnp.broadcast_to(images[:, :1, 0, :1], (images.shape[0], 3, 1)) * variables

    mesh = train_mesh(jax.devices()[:1])
    x = np.arange(3 * 2 * 2 * 1, dtype=np.float32).reshape(3, 2, 2, 1)
    y = np.zeros((3, 2, 2), np.int32)
    out = compute_features(grad_fn, jnp.float32(2.0), 4.0, x, y, 16, mesh)
    assert seen == [3] and out.shape == (3, 3, 1)
    np.testing.assert_allclose(np.asarray(out)[:, 0, 0], 2.0 * 2.0 * x[:, 0, 0, 0])  # sqrt(lr)
    seen.clear()
    compute_features(grad_fn, jnp.float32(1.0), 1.0, np.concatenate([x] * 7),
                     np.concatenate([y] * 7), 16, mesh)
    assert seen == [16, 16]  # 21 examples: a full batch, then the last one padded to 16
