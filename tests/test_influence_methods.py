"""The attribution-method protocol: every registered method on the toy problem (shapes,
determinism, agreement with per-example loops), the registry's one-line refusals, and the
variant spec of meta.json (round trip; evaluate's randomisation reads it)."""

from __future__ import annotations

import dataclasses
import inspect
import json
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest

from tracin_jax.cli import main
from tracin_jax.errors import InputError
from tracin_jax.influence import methods
from tracin_jax.influence.grads import make_class_grad_fn, normalised
from tracin_jax.influence.methods import Common, from_spec, get_method, make_options
from tracin_jax.influence.reference import brute_force_class_grads
from tracin_jax.influence.subsets import resolve_subset
from tracin_jax.task import Task
from tracin_jax.training.losses import tumour_cross_entropy, tumour_dice_loss

EPS = inspect.signature(tumour_dice_loss).parameters["eps"].default
# Per method: options for the toy problem (head subset, exact gradients).
TOY_OPTIONS = {"tracin": {"params": "head"}, "ekfac": {"params": "head", "damping": 0.5},
               "trak": {"params": "head", "proj_dim": 0, "models_from": "checkpoints"},
               "source": {"params": "head", "damping": 0.5}}


def _stepped(checkpoints):
    """The toy checkpoints with the training step a run records (10 steps per epoch)."""
    return [SimpleNamespace(**vars(c), step=10 * c.epoch) for c in checkpoints]


@pytest.fixture(scope="module")
def toy_run(toy):
    return SimpleNamespace(model=toy.model, image_shape=toy.train.images.shape[1:],
                           config=SimpleNamespace(train=SimpleNamespace(dice_eps=EPS)),
                           train=toy.train, test=toy.test)


def _compute(method, toy, toy_run, out, grad_fn=None):
    return method.compute(toy_run, _stepped(toy.checkpoints), out,
                          Common(store_dir=out.parent / (out.name + "-store"), batch_size=4,
                                 progress=False), grad_fn=grad_fn)


def test_every_method_is_registered_with_checked_default_options():
    assert set(TOY_OPTIONS) == set(methods.METHODS)
    flags = methods.all_option_flags()
    assert len(set(flags.values())) == len(flags)  # one flag per option name
    for name, cls in methods.METHODS.items():
        assert cls.name == name and cls.summary and dataclasses.is_dataclass(cls.Options)
        cls.Options().check()
        assert not set(methods.option_fields(cls)) & set(methods.COMMON_FIELDS)


@pytest.mark.parametrize("name", sorted(TOY_OPTIONS))
def test_protocol_shapes_determinism_and_scorer(name, toy, toy_run, tmp_path):
    cls = get_method(name)
    method = cls(make_options(cls, TOY_OPTIONS[name]))
    a = _compute(method, toy, toy_run, tmp_path / "a")
    n_test, n_train = len(toy.test.ids), len(toy.train.ids)
    assert a["files"]["scores.npy"] == [n_test, 3, n_train, 3]
    assert a["files"]["self_influence.npy"] == [n_train, 3]
    assert a["spec"]["method"] == name and a["spec"]["checkpoints"] == [1, 3]
    b = _compute(cls(make_options(cls, TOY_OPTIONS[name])), toy, toy_run, tmp_path / "b")
    for f in ("scores.npy", "self_influence.npy", "patient_scores.npy"):
        np.testing.assert_array_equal(np.load(tmp_path / "a" / f), np.load(tmp_path / "b" / f))
    if name not in ("ekfac", "source"):
        return  # tracin: against jax.grad below; trak: tests/test_influence_trak.py
    # The blocked scorer against a float64 loop over the method's own per-example features
    # (the query side at the fitted query checkpoints when the method has its own).
    grad_fn = method.featuriser(toy_run)
    fitted = method.fit(toy_run, grad_fn, _stepped(toy.checkpoints), tmp_path / "a", Common())
    want = np.zeros((n_test, 3, n_train, 3))
    for ck, qk in zip(fitted.checkpoints, fitted.query_checkpoints or fitted.checkpoints):
        def feats(ex, variables):
            return np.stack([np.asarray(grad_fn(variables, ex.images[i:i + 1],
                                                ex.labels[i:i + 1])[0], np.float64)
                             for i in range(len(ex.ids))])
        want += ck.lr * np.einsum("aid,bjd->aibj", feats(toy.test, qk.variables),
                                  feats(toy.train, ck.variables))
    np.testing.assert_allclose(np.load(tmp_path / "a" / "scores.npy"), want, rtol=2e-4,
                               atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("options", [{}, {"normalise": True, "relatif": True},
                                     {"loss": "ce", "precondition": "identity"}])
def test_tracin_variants_agree_with_jax_grad_loops(options, toy, toy_run, tmp_path):
    method = methods.TracIn(make_options(methods.TracIn, {"params": "head", **options}))
    meta = _compute(method, toy, toy_run, tmp_path / "out")
    subset = resolve_subset(toy.checkpoints[0].variables["params"], "head")
    loss_fn = tumour_cross_entropy if options.get("loss") == "ce" else partial(tumour_dice_loss,
                                                                               eps=EPS)
    want = np.zeros((len(toy.test.ids), 3, len(toy.train.ids), 3))
    for ck in toy.checkpoints:
        g = [brute_force_class_grads(toy.model, subset, ck.variables, ex.images, ex.labels,
                                     loss_fn) for ex in (toy.test, toy.train)]
        if options.get("normalise"):
            g = [x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-12) for x in g]
        want += ck.lr * np.einsum("aid,bjd->aibj", *g)
    self_inf = np.load(tmp_path / "out" / "self_influence.npy")
    if options.get("relatif"):
        root = np.sqrt(self_inf)[None, None]  # zero self-influence: zero scores
        want = np.divide(want, root, out=np.zeros_like(want), where=root > 0)
    np.testing.assert_allclose(np.load(tmp_path / "out" / "scores.npy"), want, rtol=2e-4,
                               atol=1e-6 * np.abs(want).max())
    spec = meta["spec"]
    assert spec["loss"] == options.get("loss", "dice") and spec["params"] == "head"
    assert spec["normalise"] == bool(options.get("normalise"))
    assert spec["relatif"] == bool(options.get("relatif"))
    assert spec["precondition"] == options.get("precondition", "none")
    again = from_spec(spec)  # the round trip: the same gradient, the same spec
    assert again.spec(again.featuriser(toy_run), [1, 3]) == spec


def test_unknown_method_and_option_misuse_are_one_line(tmp_path, capsys):
    with pytest.raises(InputError, match=r"^--method 'nope' is not one of tracin, trak, ekfac, "
                       "source$"):
        get_method("nope")
    with pytest.raises(InputError, match=r"^--damping is an option of --method trak, ekfac, "
                       "source; options of other methods do not apply to --method tracin$"):
        make_options(methods.TracIn, {"damping": 0.1})
    with pytest.raises(InputError, match=r"--relatif is an option of --method tracin;"):
        make_options(methods.Ekfac, {"relatif": True})
    with pytest.raises(InputError, match=r"^lr_scale=2 is no method's option \(--method tracin"):
        make_options(methods.TracIn, {"lr_scale": 2})
    with pytest.raises(InputError, match="--fisher 'exact'"):
        methods.Ekfac(methods.Ekfac.Options(fisher="exact"))
    base = ["influence", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "o")]
    for extra, words in ((["--damping", "0.1"], "do not apply to --method tracin"),
                         (["--method", "nope"], "is not one of tracin, trak, ekfac, source"),
                         (["--method", "trak", "--normalised"], "--normalised is an option")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err, err
    assert not (tmp_path / "o").exists()


def test_custom_gradient_specs(toy):
    subset = resolve_subset(toy.checkpoints[0].variables["params"], "head")
    ce_cos = normalised(make_class_grad_fn(toy.model, subset, loss="ce", tag="ce-cos"))
    assert ce_cos.loss == "ce" and ce_cos.normalised and ce_cos.tag == "normalised(ce-cos)"
    spec = methods.TracIn().spec(ce_cos, [1, 3])
    assert spec["loss"] == "ce" and spec["normalise"] and spec["params"] == "head"
    custom = make_class_grad_fn(toy.model, subset, loss_fn=lambda lg, y: tumour_dice_loss(lg, y),
                                tag="mine")
    assert custom.loss is None and methods.TracIn().spec(custom, [1]) is None
    four = make_class_grad_fn(toy.model, subset, loss="dice", class_labels=(0, 1, 2, 3))
    assert methods.TracIn().spec(four, [1]) is None  # the featuriser gives 3 classes
    # Two of a 3-class run's classes: labels 1..2 look complete, the run's task says they are not.
    two = make_class_grad_fn(toy.model, subset, loss="dice", class_labels=(1, 2))
    brats = SimpleNamespace(task=Task("BraTS", "brats2023", ("flair",), ("NCR/NET", "ED", "ET"),
                                      (1, 2, 3)))
    assert methods.TracIn().spec(two, [1]) is not None
    assert methods.TracIn().recorded_spec(two, [1], brats) is None
    assert methods.TracIn().recorded_spec(ce_cos, [1], brats) == spec | {"checkpoints": [1]}
    with pytest.raises(InputError, match="--loss 'l1'"):
        make_class_grad_fn(toy.model, subset, loss="l1")


def _folder(tmp_path, toy, meta):
    folder = tmp_path / "infl"
    folder.mkdir()
    (folder / "meta.json").write_text(json.dumps(meta))
    rng = np.random.default_rng(0)
    np.save(folder / "patient_scores.npy", rng.normal(size=(len(toy.test.ids), 3, 4, 3)))
    np.save(folder / "test_present.npy", np.ones((len(toy.test.ids), 3), bool))
    return folder


def test_randomisation_rebuilds_the_spec_and_skips_without_one(toy, toy_run, tmp_path,
                                                              monkeypatch):
    from tracin_jax.evaluate import report, sanity

    subset = resolve_subset(toy.checkpoints[0].variables["params"], "head")
    ce_cos = normalised(make_class_grad_fn(toy.model, subset, loss="ce", tag="ce-cos"))
    meta = {"gradient": {"tag": ce_cos.tag}, "spec": methods.TracIn().spec(ce_cos, [1, 3])}
    seen = {}

    def compute(self, run, checkpoints, out, common, **kw):  # records, writes random scores
        fn = self.featuriser(run)
        seen.update(loss=fn.loss, normalised=fn.normalised, epochs=[c.epoch for c in checkpoints])
        out.mkdir(parents=True)
        np.save(out / "patient_scores.npy", np.random.default_rng(1).normal(
            size=(len(toy.test.ids), 3, 4, 3)))
        (out / "meta.json").write_text("{}")

    monkeypatch.setattr(methods.TracIn, "compute", compute)
    run = SimpleNamespace(**vars(toy_run), checkpoint=lambda e: next(
        c for c in toy.checkpoints if c.epoch == e))
    res = sanity.model_randomisation(run, _folder(tmp_path, toy, meta), tmp_path / "rnd")
    assert seen == {"loss": "ce", "normalised": True, "epochs": [1, 3]}
    assert res["mean"] is not None and "skipped" not in res
    assert sanity.gradient_spec(meta).loss == "ce"  # LDS against cross-entropy too

    old = {"gradient": {"tag": "tumour_dice_loss|head|exact"}, "params": {"name": "head"},
           "checkpoints": [{"epoch": 1}]}
    skipped = sanity.model_randomisation(run, _folder(tmp_path / "o", toy, old) if (
        tmp_path / "o").mkdir() is None else None, tmp_path / "rnd2")
    assert skipped["mean"] is None and "no spec in meta.json" in skipped["skipped"]
    assert not (tmp_path / "rnd2").exists()
    assert sanity.gradient_spec(old).describe() == "dice head, epoch 1 only"
    lds = {"mean": 0.3, "ci": [0.2, 0.4], "n_targets": 9,
           "per_class": {c: {"mean": 0.3, "ci": [None, None], "n_targets": 3}
                         for c in report.CLASS_NAMES}}
    md = report.markdown({
        "workdir": "w", "ground_truth": {"patients": 4, "n_test": 3, "targets": 9, "subsets": 8,
                                         "fraction": 0.5, "seeds": 1, "seed": 0,
                                         "noise_ceiling": {"dice": None, "ce": None}},
        "variants": {"old": {"gradient": "dice head", "lds": lds, "vs_best": None,
                             "randomisation": skipped, "mislabel_auc": None}}})
    assert f"skipped: {skipped['skipped']}" in md


def test_study_variants_are_the_registry_presets():
    """experiments.evaluate_variants studies every method's presets (the earlier study's
    variants first, in their order); each preset's options are valid for its method."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from experiments import evaluate_variants as ev

    found = methods.presets()
    assert list(ev.VARIANTS) == list(ev.EARLIER_ORDER) + [n for n in found
                                                          if n not in ev.EARLIER_ORDER]
    assert ev.VARIANTS == found  # the same entries, nothing added or lost
    for name, kw in found.items():
        cls = get_method(kw["method"])
        assert name in cls.presets
        given = {k: v for k, v in kw.items() if k not in ("method", "checkpoints")}
        cls(make_options(cls, given))  # checked options
        assert kw.get("checkpoints", "last") == "last"
    assert {"source-dice", "head-source"} <= set(methods.METHODS["source"].presets)
