"""The report for 3D runs: three orthogonal planes per volume, rank-generic features and
ablation checked against naive loops, one patient = one volume, volume wording on the page."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from tracin_jax.explain import figures, selection
from tracin_jax.explain import faithfulness as fa
from tracin_jax.explain.features import FeatureStore, pairwise_similarity, region_max, region_norm
from tracin_jax.explain.local import planes_of

SHAPE = (8, 12, 8)  # X, Y, Z of the synthetic volumes (RAS)
CLASSES = ("CSF", "grey matter", "white matter", "lesion")


def _blobs(rng: np.random.Generator, n: int, shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """n volumes u8[n, X, Y, Z] of nested ellipsoids (labels 1..4, lesion absent from the first)
    and images f32[n, X, Y, Z, 2] brighter inside."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    labels = np.zeros((n, *shape), np.uint8)
    for t in range(n):
        centre = rng.uniform(0.35, 0.65, 3) * np.array(shape)
        r = np.sqrt((((grid - centre) / np.array(shape)) ** 2).sum(-1))
        labels[t][r < 0.45] = 1
        labels[t][r < 0.33] = 2
        labels[t][r < 0.22] = 3
        if t:
            labels[t][r < 0.1] = 4
    images = rng.normal(0, 0.1, (n, *shape, 2)).astype(np.float32)
    images += labels[..., None] * rng.uniform(0.2, 0.4, 2).astype(np.float32)
    return images, labels


# ---------------------------------------------------------------- planes and their orientation


def test_view_point_rules():
    m = np.zeros((9, 11, 7), bool)
    assert figures.view_point(m) == (4, 5, 3)  # empty: the volume's centre
    m[2:5, 3:8, 1:4] = True
    assert figures.view_point(m) == (3, 5, 2)  # a solid region: its centre of mass
    shell = np.zeros((9, 9, 9), bool)
    g = np.stack(np.meshgrid(*[np.arange(9)] * 3, indexing="ij"), -1) - 4
    r = np.sqrt((g ** 2).sum(-1))
    shell[(r >= 2.5) & (r < 4)] = True
    assert not shell[4, 4, 4]
    assert figures.view_point(shell) == (4, 4, 4)  # outside it, but every plane cuts the shell
    two = np.zeros((10, 6, 6), bool)  # two pieces far apart along x; the larger at x = 7..8
    two[0:2, 1:3, 1:3] = True
    two[7:9, 1:5, 1:5] = True
    x, y, z = figures.view_point(two)
    assert two[x].any() and two[:, y].any() and two[:, :, z].any()
    assert x in (7, 8) and (y, z) == (2, 2)  # the sagittal plane moved to the larger piece


def test_planes_are_ras_with_the_right_sides_marked():
    vol = np.zeros((6, 8, 10), np.float32)
    vol[0, 4, 5] = 1.0  # patient's far left (x = 0)
    vol[3, 7, 5] = 2.0  # front (y = 7)
    vol[3, 4, 9] = 3.0  # top (z = 9)
    point = (3, 4, 5)
    ax_, co, sa = (figures.display_view(figures.plane_of(vol, p, point)) for p in figures.PLANES)
    assert ax_.shape == (8, 6) and co.shape == (10, 6) and sa.shape == (10, 8)
    assert np.argwhere(ax_ == 1.0)[0, 1] == 0 and np.argwhere(ax_ == 2.0)[0, 0] == 0  # L left, A up
    assert np.argwhere(co == 1.0)[0, 1] == 0 and np.argwhere(co == 3.0)[0, 0] == 0  # L left, S up
    assert np.argwhere(sa == 2.0)[0, 1] == 7 and np.argwhere(sa == 3.0)[0, 0] == 0  # A right, S up
    assert [figures.plane_index(p, point) for p in figures.PLANES] == ["z=5", "y=4", "x=3"]
    # three dots: their centre of mass (2, 5, 6) is in none of them, and no plane through it
    # cuts one; each plane moves to the parallel one holding the most (two dots each)
    assert planes_of(vol > 0) == {"axial": 5, "coronal": 4, "sagittal": 3}


def test_local_figure_of_volumes_has_three_marked_planes_per_item(drawn, tmp_path):
    rng = np.random.default_rng(0)
    images, labels = _blobs(rng, 4)
    panel = lambda n, s: figures.Panel(images[n, ..., 0], labels[n], f"case_{n:03d}",  # noqa: E731
                                       f"case_{n:03d}", s, 1)
    figures.local_explanation(tmp_path / "a.png", test_image=images[0, ..., 1],
                              test_labels=labels[0], test_id="case_000", test_class=1,
                              train_class=3, proponents=[panel(1, 0.5), panel(2, 0.25)],
                              opponents=[panel(3, -0.1)], level="patient", modality="T2",
                              class_names=CLASSES, class_labels=(1, 2, 3, 4))
    rec = drawn[-1]
    planes = [ax for ax in rec["axes"] if ax.images]
    # test ground truth + test region + 2 proponents + 1 opponent, three planes each
    assert [ax.get_gid() for ax in planes] == ["plane-axial", "plane-coronal", "plane-sagittal"] * 5
    for ax in planes:
        sides = figures.PLANE_SIDES[ax.get_gid().split("-")[1]]
        marks = {t.get_gid(): t.get_window_extent() for t in ax.texts
                 if (t.get_gid() or "").startswith("orient-")}
        assert set(marks) == {f"orient-{s}" for s in sides}
        left, right, bottom, top = (marks[f"orient-{s}"] for s in sides)
        box = ax.get_window_extent()
        assert left.x1 < box.x0 + box.width / 2 < right.x0
        assert bottom.y1 < box.y0 + box.height / 2 < top.y0
    text = "\n".join(t for t, *_ in rec["texts"])
    box = rec["bbox"]
    assert all(box.x0 - 4 <= e.x0 and e.x1 <= box.x1 + 4 and box.y0 - 4 <= e.y0
               and e.y1 <= box.y1 + 4 for _, e, _ in rec["texts"])  # every text inside the figure
    for name in CLASSES:  # the legend names every class
        assert name in text
    assert "axial" in text and "coronal" in text and "sagittal" in text
    assert "slice" not in text.replace("\n", " ")


# ------------------------------------------------- features and ablation against naive loops


def test_region_statistics_of_volumes_match_a_naive_loop():
    rng = np.random.default_rng(1)
    fa_ = np.abs(rng.normal(size=(3, *SHAPE, 5))).astype(np.float32)
    fb = np.abs(rng.normal(size=(4, *SHAPE, 5))).astype(np.float32)
    fb[1, ..., 2] = 0.0  # a silent filter
    _, la = _blobs(rng, 3)
    _, lb = _blobs(rng, 4)
    for c in (1, 4):
        ma, mb = la == c, lb == c
        cos, mx = pairwise_similarity(fa_, ma, fb, mb, "cosine"), region_max(fa_, ma)
        np.testing.assert_array_equal(np.isnan(region_norm(fa_, ma)[:, 0]), ~ma.any(axis=(1, 2, 3)))
        for a in range(3):
            for b in range(4):
                for k in range(5):
                    u, v = (fa_[a, ..., k] * ma[a]).ravel(), (fb[b, ..., k] * mb[b]).ravel()
                    den = np.linalg.norm(u) * np.linalg.norm(v)
                    want = np.nan if den == 0 else u @ v / den
                    np.testing.assert_allclose(cos[a, b, k], want, rtol=1e-5, atol=1e-6)
                want = fa_[a][ma[a]].max(axis=0) if ma[a].any() else np.full(5, np.nan)
                np.testing.assert_allclose(mx[a], want)
    # the streamed pass of the report equals the reference, for every similarity
    store = FeatureStore(lambda v, x: (x, x), None, batch_size=3, progress=False)  # features = input
    rs = fa.region_stats(store, fa_, la, fb, lb, class_labels=(1, 2, 3, 4))
    for c in range(4):
        for kind in ("cosine", "max_ratio", "max_product"):
            ref = pairwise_similarity(fa_, la == c + 1, fb, lb == c + 1, kind)
            np.testing.assert_allclose(fa.similarity(rs, c, kind), ref, rtol=1e-5, atol=1e-6)
    assert fa.eligible_patients(lb, np.arange(4), 4, (1, 4)).tolist() == [[True] * 4,
                                                                          [False, True, True, True]]


def test_ablation_of_volume_features_matches_a_naive_loop():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(3, *SHAPE, 6)).astype(np.float32)
    _, labels = _blobs(rng, 3)
    kernel = rng.normal(size=(6, 5)).astype(np.float32)
    bias = rng.normal(size=5).astype(np.float32) * 0.1
    zero = np.stack([np.zeros(6, bool), selection.group_mask(6, [1]), selection.group_mask(6, [0, 4])])
    store = FeatureStore(lambda v, x: (x, x), None, batch_size=2, progress=False)
    got = selection.ablation_counts(store, "train", feats, labels, kernel, bias, zero)
    for g, z in enumerate(zero):
        pred = np.argmax(feats @ (kernel * ~z[:, None]) + bias, -1)
        for c in range(5):
            p, y = pred == c, labels == c
            np.testing.assert_allclose(got[g, :, c], [(p & y).sum(), p.sum(), y.sum()])


# ------------------------------------------ end to end: synth -> train -> influence -> explain


def _cli(*args) -> None:
    from tracin_jax.cli import main

    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    assert rc in (0, None), args


@pytest.fixture(scope="module")
def run_3d(tmp_path_factory):
    """A 3D run of the synthetic nnU-Net task (6 volumes of 12 x 12 x 8 after downsampling, one
    epoch), its head influence and its report; every figure's plane axes recorded as drawn."""
    d = tmp_path_factory.mktemp("explain3d")
    _cli("synth", "--out", d / "data", "--format", "nnunet", "--cases", 6, "--shape", "24,24,16")
    data = next((d / "data").glob("Dataset*"))
    _cli("train", "--data", data, "--workdir", d / "run", "--config", "tiny", "--set",
         "model.dims=3", "--set", "data.downsample=2", "--set", "train.epochs=1")
    _cli("influence", "--workdir", d / "run", "--out", d / "infl", "--params", "head")
    drawn, save = {}, figures._save

    def record(fig, path):
        drawn[Path(path).name] = [ax.get_gid() for ax in fig.axes if ax.images]
        return save(fig, path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(figures, "_save", record)
        _cli("explain", "--workdir", d / "run", "--influence", d / "infl", "--out", d / "report",
             "--k", 2)
    return d, drawn


def test_explain_end_to_end_on_a_3d_run(run_3d):
    from tracin_jax.run import load_run

    d, drawn = run_3d
    run = load_run(d / "run")
    out = d / "report"
    m = json.loads((out / "metrics.json").read_text())
    page = (out / "index.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    manifest = json.loads((out / "report_manifest.json").read_text())["files"]
    assert set(images) <= set(manifest) and all((out / name).is_file() for name in manifest)
    assert run.test.images.ndim == 5 and m["influence"]["example"] == "volume"
    # one example per case, named by its case: a patient is its volume
    assert all("/" not in i for i in run.train.ids) and run.train.ids == run.train.cases
    meta = json.loads((d / "infl" / "meta.json").read_text())
    assert meta["patients"] == sorted(run.train.ids)
    assert m["influence"]["representative_slice"] == "its volume (one per patient)"
    scores = np.load(d / "infl" / "patient_scores.npy")
    items = m["local"]["items"]
    assert {it["test_class"] for it in items} == {  # every class some test volume has
        name for c, name in enumerate(run.class_names) if (run.test.labels == c + 1).any()}
    for it in items:
        t, c = it["test_index"], list(run.class_names).index(it["test_class"])
        order = np.argsort(-scores[t, c, :, c])
        assert [p["patient"] for p in it["proponents"]] == [
            meta["patients"][n] for n in order[:2] if scores[t, c, n, c] > 0]
        assert it["planes"] == planes_of(run.test.labels[t] == c + 1)
        assert it["class_area"] == int((run.test.labels[t] == c + 1).sum())
        panels = it["proponents"] + it["opponents"]
        for p in panels:
            assert p["slice"] == p["patient"]  # shown by its one volume
            assert p["planes"] == planes_of(run.train.labels[p["slice_index"]] == c + 1)
        # three planes (axial, coronal, sagittal) for the test's two images and each panel
        assert drawn[it["figure"]] == ["plane-axial", "plane-coronal", "plane-sagittal"] * (
            2 + len(panels))
    # faithfulness and ablation ran on the 3D feature maps
    width = run.config.model.width
    ranked = list(m["faithfulness"]["ranked_patients"].values())
    assert [np.array(c).shape for c in m["faithfulness"]["fi_curves"]] == [(r, width) for r in ranked]
    assert np.array(m["selection"]["per_filter_dice_drop"]["train"]).shape == (4, width)
    for name in run.class_names:
        assert name in page
    for wording in ("training volumes / patients", "per-volume scores available", "axial",
                    "coronal", "sagittal", "voxels", "1×1×1 head"):
        assert wording in page
    prose = re.sub(r"<[^>]+>", " ", re.sub(r"(?s)<details>.*?</details>", "", page))
    assert "slice" not in prose  # (the settings tables, folded away, name config keys)
    assert "pixel" not in page and "neurological view" not in page
