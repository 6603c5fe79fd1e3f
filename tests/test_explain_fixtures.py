"""Small stand-ins shared by the explanation tests: a fake run and hand-made influence folders.

``FakeRun`` has the interface the explanation stage uses from :class:`tracin_jax.run.Run`
(config, checkpoints, features, train/test examples) around a real tiny U-Net, without data
files or training. ``write_influence`` writes an influence folder in the documented format.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np

from tracin_jax.config import get_config
from tracin_jax.explain.ranking import aggregate_patients
from tracin_jax.models import build_unet
from tracin_jax.training.train import init_variables


def random_variables(model, image_shape, seed: int = 0) -> dict:
    """He-initialised variables filled with numpy (compiling ``model.init`` is slow on small CPUs)."""
    shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), image_shape))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(path[-1])
        if "kernel" in name:
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        if "scale" in name or "var" in name:
            return np.ones(leaf.shape, np.float32)
        return np.zeros(leaf.shape, np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def synthetic_examples(cases: list[str], slices: int, hw: int, rng: np.random.Generator,
                       drop_et: set[str] = frozenset()) -> SimpleNamespace:
    """Blob tumours (ED ring, NCR core, ET rim) on noisy brains; ET left out for ``drop_et`` slices."""
    n = len(cases) * slices
    yy, xx = np.mgrid[:hw, :hw]
    images = rng.normal(0, 0.1, (n, hw, hw, 4)).astype(np.float32)
    labels = np.zeros((n, hw, hw), np.uint8)
    ids, case_of = [], []
    for ci, case in enumerate(cases):
        for s in range(slices):
            t = ci * slices + s
            cy, cx = rng.integers(hw // 3, 2 * hw // 3, size=2)
            r = np.hypot(yy - cy, xx - cx)
            big = rng.uniform(hw / 5, hw / 3.5)
            labels[t][r < big] = 2
            labels[t][r < big * 0.6] = 3
            labels[t][r < big * 0.35] = 1
            sid = f"{case}/z{90 + s}"
            if sid in drop_et:
                labels[t][labels[t] == 3] = 1
            images[t] += (labels[t] > 0)[..., None] * rng.uniform(0.4, 1.0, 4)
            images[t, ..., 0] += 0.3 * (labels[t] == 2)
            ids.append(sid)
            case_of.append(case)
    return SimpleNamespace(images=images, labels=labels, ids=ids, cases=case_of)


class FakeRun:
    """A run-like object: tiny config, one 'checkpoint' of random U-Net weights, synthetic splits."""

    def __init__(self, n_train_cases: int = 5, n_test_cases: int = 2, slices: int = 2, seed: int = 0):
        self.config = get_config("tiny")
        self.workdir = Path("fake-run")
        self.model = build_unet(self.config.model)
        hw = 32
        variables = random_variables(self.model, (hw, hw, 4), seed)
        self.checkpoints = [SimpleNamespace(epoch=1, lr=3e-3, variables=variables)]
        rng = np.random.default_rng(seed)
        self.train = synthetic_examples([f"train{c:02d}" for c in range(n_train_cases)], slices, hw, rng)
        self.test = synthetic_examples([f"test{c:02d}" for c in range(n_test_cases)], slices, hw, rng,
                                       drop_et={"test00/z90"})

    def apply(self, variables, images):
        return self.model.apply(variables, images, train=False)

    def features(self, variables, images):
        return self.model.apply(variables, images, train=False, return_features=True)


def write_influence(folder: Path, run, *, seed: int = 0, scores: np.ndarray | None = None,
                    with_scores: bool = True, class_names=("NCR/NET", "ED", "ET"),
                    class_labels=None, workdir=None) -> np.ndarray:
    """Writes an influence folder for ``run`` with random (or given) slice scores; returns them.

    ``class_labels`` None writes no ``class_labels`` key (as older folders), meaning 1, 2, 3.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_test, n_train = len(run.test.ids), len(run.train.ids)
    patients = sorted(set(run.train.cases))
    train_patient = np.array([patients.index(c) for c in run.train.cases])
    n_cls = len(class_names)
    if scores is None:
        scores = np.random.default_rng(seed).normal(size=(n_test, n_cls, n_train, n_cls)).astype(np.float32)
    values = (1, 2, 3) if class_labels is None else class_labels
    present = np.stack([(run.test.labels == c).any(axis=(1, 2)) for c in values], axis=1)
    if with_scores:
        np.save(folder / "scores.npy", scores)
    np.save(folder / "patient_scores.npy", aggregate_patients(scores, train_patient, len(patients)))
    np.save(folder / "test_present.npy", present)
    np.save(folder / "self_influence.npy", np.abs(scores[0, 0]).astype(np.float32))
    meta = {"class_names": list(class_names), "test_ids": list(run.test.ids),
            "train_ids": list(run.train.ids), "train_cases": list(run.train.cases),
            "patients": patients, "checkpoints": [{"epoch": 1, "lr": 3e-3}],
            "params": {"name": "head", "size": 16}, "proj_dim": None, "proj_seed": 0}
    if class_labels is not None:
        meta["class_labels"] = list(class_labels)
    if workdir is not None:
        meta["workdir"] = str(workdir)
    (folder / "meta.json").write_text(json.dumps(meta))
    return scores


def test_fake_run_has_all_classes_and_one_absent_et():
    run = FakeRun()
    for split in (run.train, run.test):
        assert split.images.shape[1:] == (32, 32, 4)
        assert {1, 2, 3} <= set(np.unique(split.labels))
    assert not (run.test.labels[0] == 3).any()
