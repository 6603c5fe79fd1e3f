"""Every stage after training takes its classes from the run's task, not from BraTS.

End to end in 2D on the synthetic nnU-Net task (2 channels T1, T2; 4 classes CSF, grey matter,
white matter, lesion): `tracin-jax train`, `influence`, the report and `evaluate --small`. The
influence folder, the report (names, colours, legends) and the evaluation tables carry C = 4
and the task's names; the head scores equal the brute-force jax.grad loop of
:mod:`tracin_jax.influence.reference`.
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from tracin_jax.errors import InputError

SHAPE = (24, 24, 16)  # the synthetic task at test size (as in test_data_nnunet.py)
NAMES = ["CSF", "grey matter", "white matter", "lesion"]
CHANNELS = ["T1", "T2"]
FAST_EXPLAIN = dict(k=2, items_per_class=1, n_permutations=50, random_seeds=2, progress=False)


def cli(*args) -> int:
    from tracin_jax.cli import main

    try:
        return main([str(a) for a in args])
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def task_run(tmp_path_factory) -> Path:
    """`tracin-jax train` (tiny config, 2 epochs) on 6 synthetic nnU-Net cases."""
    from tracin_jax.data import write_synthetic_nnunet
    from tracin_jax.data.synth import NNUNET_DIR

    root = tmp_path_factory.mktemp("task")
    write_synthetic_nnunet(root / "data", cases=6, seed=0, progress=False, shape=SHAPE)
    work = root / "run"
    assert cli("train", "--data", root / "data" / NNUNET_DIR, "--workdir", work, "--config",
               "tiny", "--set", "data.downsample=1", "--set", "train.epochs=2",
               "--set", "train.batch_size=8") == 0
    return work


@pytest.fixture(scope="module")
def task_influence(task_run) -> Path:
    out = task_run.parent / "influence" / "head"
    assert cli("influence", "--workdir", task_run, "--out", out) == 0
    return out


def test_the_influence_folder_has_the_task_classes_and_the_brute_force_scores(task_run,
                                                                                task_influence):
    from tracin_jax import load_run
    from tracin_jax.influence.reference import brute_force_tracin
    from tracin_jax.influence.subsets import resolve_subset
    from tracin_jax.training.losses import tumour_dice_loss

    run = load_run(task_run)
    assert run.class_names == tuple(NAMES) and list(run.task.channels) == CHANNELS
    meta = json.loads((task_influence / "meta.json").read_text())
    assert meta["class_names"] == NAMES and meta["class_labels"] == [1, 2, 3, 4]
    assert meta["task"] == run.task.to_dict() and meta["task"]["format"] == "nnunet"
    assert meta["spec"] is not None and meta["spec"]["params"] == "head"
    n_train, n_test = len(run.train.ids), len(run.test.ids)
    scores = np.load(task_influence / "scores.npy")
    assert scores.shape == (n_test, 4, n_train, 4)
    assert np.load(task_influence / "patient_scores.npy").shape[1::2] == (4, 4)
    present = np.load(task_influence / "test_present.npy")
    want_present = np.stack([(run.test.labels == c).reshape(n_test, -1).any(1)
                             for c in (1, 2, 3, 4)], axis=1)
    np.testing.assert_array_equal(present, want_present)

    # The brute-force loop on a few slices of each split (C = 4 from the loss itself).
    tr, te = slice(0, 6), slice(0, 4)
    subset = resolve_subset(run.checkpoints[0].variables["params"], "head")
    loss = partial(tumour_dice_loss, eps=run.config.train.dice_eps)
    want, want_self = brute_force_tracin(run.model, subset, run.checkpoints, run.train.images[tr],
                                         run.train.labels[tr], run.test.images[te],
                                         run.test.labels[te], loss_fn=loss)
    assert want.shape == (4, 4, 6, 4)
    scale = np.abs(want).max()
    assert scale > 0
    np.testing.assert_allclose(scores[te, :, tr], want, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(np.load(task_influence / "self_influence.npy")[tr], want_self,
                               rtol=1e-4, atol=1e-5 * np.abs(want_self).max())


def test_every_method_scores_the_task_classes(task_run):
    import jax.numpy as jnp

    from tracin_jax import load_run
    from tracin_jax.influence import methods
    from tracin_jax.influence.trak import out_to_loss, region_margin

    run = load_run(task_run)
    for name, opts in (("tracin", {"params": "all", "proj_dim": 64}), ("trak", {}),
                       ("ekfac", {"params": "head"})):
        cls = methods.get_method(name)
        fn = cls(methods.make_options(cls, opts)).featuriser(run)
        assert fn.class_names == tuple(NAMES) and fn.class_labels == (1, 2, 3, 4), name
        assert cls(methods.make_options(cls, opts)).spec(fn, [1]) is not None, name
    logits = jnp.zeros((2, 4, 4, 5))
    labels = jnp.ones((2, 4, 4), jnp.int32)
    assert region_margin(logits, labels).shape == out_to_loss(logits, labels).shape == (2, 4)


def test_a_task_that_does_not_fit_the_model_is_refused(task_run, tmp_path):
    from tracin_jax import load_run

    work = tmp_path / "run"
    shutil.copytree(task_run, work, ignore=shutil.ignore_patterns("features", "ground_truth"))
    info = json.loads((work / "run.json").read_text())
    info["task"] = {**info["task"], "classes": NAMES[:3], "values": [1, 2, 3]}
    (work / "run.json").write_text(json.dumps(info))
    with pytest.raises(InputError, match=r"3 classes .*model.num_classes=5") as e:
        load_run(work)
    assert "\n" not in str(e.value) and "run.json" in str(e.value)


def test_class_colours_are_distinct_for_any_number_of_classes():
    from tracin_jax.explain.figures import CLASS_COLORS, class_colors

    assert class_colors(["NCR/NET", "ED", "ET"]) == list(CLASS_COLORS.values())
    assert class_colors(["background", "NCR/NET", "ED", "ET"])[1:] == list(CLASS_COLORS.values())
    for n in (1, 4, 7, 8, 30):
        names = [f"class {k}" for k in range(n)]
        colours = class_colors(names)
        assert len(set(c.lower() for c in colours)) == n and "#000000" not in colours
        assert class_colors(names) == colours  # the same names, the same colours
    mixed = class_colors(["ED", *(f"c{k}" for k in range(8))])
    assert len(set(mixed)) == 9 and mixed[0] == CLASS_COLORS["ED"]


def _figure_record(fig) -> dict:
    """Every text of a figure, and its legends' (label, face colour) entries."""
    from matplotlib.colors import to_hex
    from matplotlib.text import Text

    legends = [*fig.legends, *(a.get_legend() for a in fig.axes if a.get_legend() is not None)]
    entries = []
    for leg in legends:
        for text, handle in zip(leg.get_texts(), leg.legend_handles):
            face = handle.get_facecolor() if hasattr(handle, "get_facecolor") else None
            entries.append((text.get_text(), to_hex(face, keep_alpha=False) if face is not None
                            else None))
    return {"texts": {t.get_text() for t in fig.findobj(Text)}, "legend": entries}


def test_the_report_shows_the_task_names_and_colours(task_run, task_influence, tmp_path,
                                                     monkeypatch):
    from tracin_jax.explain import figures, run_explain

    saved, original = {}, figures._save

    def spy(fig, path):
        saved[path.name] = _figure_record(fig)
        return original(fig, path)

    monkeypatch.setattr(figures, "_save", spy)
    m = run_explain(task_run, task_influence, tmp_path / "report", **FAST_EXPLAIN)
    assert m["influence"]["class_names"] == NAMES and m["run"]["task"]["classes"] == NAMES
    assert m["options"]["modality"] == "T1"  # no flair channel: the task's first one
    colours = figures.class_colors(NAMES)
    page = (tmp_path / "report" / "index.html").read_text()
    for name, colour in zip(NAMES, colours):
        assert f'background:{colour}"></span>{name}' in page
    assert "Dataset900_SynthBrain (nnunet, 2D): 2 channels [T1, T2]" in page
    assert "lesion (4)" in page and "NCR/NET" not in page
    hexes = [c.lower() for c in colours]
    assert set(NAMES) <= saved["class_matrix.png"]["texts"]  # its tick labels
    for figure in ("topk_frequency.png", "score_distributions.png", "fi_curves.png"):
        texts = " ".join(saved[figure]["texts"])
        assert all(n in texts for n in NAMES), figure
    local = [rec for name, rec in saved.items() if name.startswith("local_")]
    assert local
    for rec in local:  # the ground-truth legend: every class in its colour
        assert [e for e in rec["legend"] if e[0] in NAMES] == list(zip(NAMES, hexes))
    selection = dict(saved["ablation_per_filter.png"]["legend"])
    assert [selection[f"selected ({n})"] for n in NAMES] == hexes
    with pytest.raises(InputError, match="the run's channels are T1, T2"):
        run_explain(task_run, task_influence, tmp_path / "r2", modality="flair", **FAST_EXPLAIN)


def test_the_evaluation_tables_carry_the_task_classes(task_run, task_influence, tmp_path):
    out = tmp_path / "eval"
    assert cli("evaluate", "--workdir", task_run, "--influence", task_influence, "--out", out,
               "--small", "--subsets", 4, "--leave-out-queries", 0) == 0
    saved = json.loads((out / "evaluation.json").read_text())
    assert saved["class_names"] == NAMES and saved["class_labels"] == [1, 2, 3, 4]
    assert saved["task"]["name"] == "Dataset900_SynthBrain"
    v = saved["variants"]["head"]
    assert sorted(v["lds"]["per_class"]) == sorted(NAMES)  # (json keys are sorted)
    assert sum(v["lds"]["per_class"][n]["n_targets"] for n in NAMES) == v["lds"]["n_targets"] > 0
    assert sorted(saved["baselines"]["baseline-class-voxels"]["lds"]["per_class"]) == sorted(NAMES)
    assert sorted(saved["ground_truth"]["targets_per_class"]) == sorted(NAMES)
    assert sorted(v["randomisation"]["per_class"]) == sorted(NAMES)
    md = (out / "evaluation.md").read_text()
    assert "| CSF | grey matter | white matter | lesion |" in md
    assert "CSF [95% CI] | grey matter [95% CI] | white matter [95% CI] | lesion [95% CI]" in md
    assert "Task Dataset900_SynthBrain: 4 classes" in md and "NCR/NET" not in md
    assert (out / "lds.png").is_file()

    # A folder whose classes are not the run's is refused before anything is trained.
    other = tmp_path / "other-classes"
    shutil.copytree(task_influence, other)
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "class_names": ["NCR/NET", "ED", "ET",
                                                                         "x"]}))
    from tracin_jax.evaluate.api import run_evaluate

    with pytest.raises(InputError, match="its classes .* are not the run's") as e:
        run_evaluate(task_run, [other], tmp_path / "e2", small=True, progress=False,
                     log=lambda s: None)
    assert "\n" not in str(e.value) and not (tmp_path / "e2").exists()
