"""Figures: every text inside the figure, ids whole, orientation markers on every brain image."""

import matplotlib.pyplot as plt
import numpy as np
import pytest

from tracin_jax.explain import figures

LONG_IDS = ["BraTS-GLI-00001-000", "BraTS-GLI-90001-000", "BraTS-SSA-00123-001", "BraTS-MEN-01234-000"]


def _outside(record, tol=4.0):
    """Texts reaching more than ``tol`` pixels (about half a character) beyond the figure.

    The PNG is saved with bbox_inches='tight', which would also keep a few pixels of overflow;
    a clipped title (the fault this guards against) loses whole words.
    """
    box = record["bbox"]
    return [(text, tuple(round(v) for v in e.extents)) for text, e, _ in record["texts"]
            if e.x0 < box.x0 - tol or e.x1 > box.x1 + tol or e.y0 < box.y0 - tol or e.y1 > box.y1 + tol]


def _panel(rng, patient, z, score, rank):
    labels = np.zeros((32, 32), np.uint8)
    labels[10:20, 8:18] = 2
    labels[12:16, 10:14] = 1
    return figures.Panel(rng.normal(size=(32, 32)).astype(np.float32), labels, patient,
                         f"{patient}/z{z}", score, rank)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_local_figure_text_fits_and_ids_whole(drawn, tmp_path, k):
    rng = np.random.default_rng(0)
    panels = [_panel(rng, LONG_IDS[n % 4], 95 + n, 0.123 * (k - n), n + 1) for n in range(k)]
    opp = [_panel(rng, LONG_IDS[(n + 1) % 4], 60 + n, -0.5 * (n + 1), n + 1) for n in range(k - 1)]
    test_id = "BraTS-GLI-90001-000/z90"
    figures.local_explanation(tmp_path / "a.png", test_image=rng.normal(size=(32, 32)),
                              test_labels=panels[0].labels, test_id=test_id, test_class=1,
                              train_class=1, proponents=panels, opponents=opp, level="patient",
                              modality="flair")
    rec = drawn[-1]
    assert _outside(rec) == []
    joined = "\n".join(t for t, _, _ in rec["texts"])
    flat = joined.replace("\n", "")
    assert test_id in flat  # whole, possibly wrapped
    for p in panels + opp:
        assert p.patient in joined.split("\n") or p.patient in flat
    assert "…" not in joined


def test_other_figures_fit_with_long_patient_ids(drawn, tmp_path):
    rng = np.random.default_rng(1)
    names = ["background", "NCR/NET", "ED", "ET"]
    for cls in (names[1:], names):
        c = len(cls)
        ps = rng.normal(size=(6, c, 4, c)).astype(np.float32)
        present = np.ones((6, c), bool)
        figures.class_matrix(tmp_path / "m.png", rng.normal(size=(c, c)), [6] * c, cls)
        figures.topk_frequency(tmp_path / "t.png", rng.integers(0, 4, (c, 4)), rng.integers(0, 4, (c, 4)),
                               LONG_IDS, 2, [6] * c, names=cls)
        figures.score_distributions(tmp_path / "s.png", ps, present, names=cls)
        curves = [rng.normal(size=(12, 8)) for _ in range(c)]
        gaps = [{"gap": 0.1, "p_value": 0.04}] * c
        figures.fi_curves(tmp_path / "f.png", curves, [2] * c, [[0, 1]] * c, gaps, "max_product", names=cls)
        figures.similarity_vs_score(tmp_path / "v.png", [rng.random(20)] * c, [rng.random(20)] * c,
                                    [{"rho": 0.3, "n_pairs": 20}] * c, "max_product", names=cls)
        sel = rng.random((c, 8)) > 0.6
        figures.ablation_per_filter(tmp_path / "a.png", {"train": rng.normal(size=(c, 8)),
                                                         "test": rng.normal(size=(c, 8))}, sel, cls)
        figures.importance_histograms(tmp_path / "h.png", rng.normal(size=(c, 8)), sel, cls)
        g = {"size": 2, "selected": 0.1, "least": 0.0, "random": [0.01, 0.02, 0.0]}
        figures.group_ablation(tmp_path / "g.png", {"train": [g] * c, "test": [g] * c}, cls)
    assert len(drawn) == 16
    for rec in drawn:
        assert _outside(rec) == [], rec["bbox"].extents
    tick_text = "\n".join(t for t, _, _ in drawn[1]["texts"])
    assert all(p in tick_text for p in LONG_IDS)  # patient names whole on the frequency plot


def test_every_brain_image_has_orientation_markers_on_the_right_sides(drawn, tmp_path):
    """RAS arrays: x = axis 0 runs from the patient's left to right, y = axis 1 posterior to anterior."""
    img = np.zeros((32, 32), np.float32)
    img[:4, 14:18] = 10.0  # a bright spot at the patient's far left (x small), mid y
    img[14:18, -4:] = 5.0  # a dimmer one at the front (y large), mid x
    shown = figures.display_view(img)
    rows, cols = np.nonzero(shown == 10.0)
    assert cols.max() < 4  # patient's left appears on the viewer's left: neurological view
    rows, cols = np.nonzero(shown == 5.0)
    assert rows.max() < 4  # anterior at the top
    labels = np.zeros((32, 32), np.uint8)
    labels[10:20, 10:20] = 3
    p = figures.Panel(img, labels, "BraTS-GLI-00001-000", "BraTS-GLI-00001-000/z95", 0.5, 1)
    q = figures.Panel(img, labels, "BraTS-GLI-00002-000", "BraTS-GLI-00002-000/z80", -0.5, 1)
    figures.local_explanation(tmp_path / "a.png", test_image=img, test_labels=labels,
                              test_id="BraTS-GLI-90001-000/z90", test_class=2, train_class=2,
                              proponents=[p, p], opponents=[q], level="patient", modality="flair")
    rec = drawn[-1]
    images = [ax for ax in rec["axes"] if ax.images]
    assert len(images) == 5  # test ground truth, test region, 2 proponents, 1 opponent
    for ax in images:
        marks = {t.get_gid(): t.get_window_extent() for t in ax.texts
                 if (t.get_gid() or "").startswith("orient-")}
        assert set(marks) == {"orient-L", "orient-R", "orient-A", "orient-P"}
        box = ax.get_window_extent()
        assert marks["orient-L"].x1 < box.x0 + box.width / 2 < marks["orient-R"].x0
        assert marks["orient-P"].y1 < box.y0 + box.height / 2 < marks["orient-A"].y0
        for e in marks.values():
            assert box.x0 - 1 <= e.x0 and e.x1 <= box.x1 + 1 and box.y0 - 1 <= e.y0 and e.y1 <= box.y1 + 1


def test_wrap_keeps_ids_whole():
    text = figures.wrap("test BraTS-GLI-90001-000/z90 ground truth", 1.0, 8.5)
    lines = text.split("\n")
    assert "".join(lines).replace(" ", "") == "testBraTS-GLI-90001-000/z90groundtruth"
    assert max(len(x) for x in lines) <= int(72 / (figures.CHAR_EM * 8.5))


def test_save_writes_the_drawn_figure_and_grows_to_text_outside(tmp_path):
    from PIL import Image

    def figure(text_x, layout):
        fig, ax = plt.subplots(figsize=(3.0, 2.0), layout=layout)
        ax.imshow(np.arange(16.0).reshape(4, 4))
        ax.text(text_x, 0.5, "a label placed by hand", transform=ax.transAxes)
        return fig

    # Everything inside: the single drawing is written, at the figure's own size and resolution.
    figures._save(figure(0.05, "constrained"), tmp_path / "inside.png")
    with Image.open(tmp_path / "inside.png") as im:
        assert im.size == (round(3.0 * figures.DPI), round(2.0 * figures.DPI))
        assert im.mode == "RGBA" and im.info["dpi"] == pytest.approx((figures.DPI, figures.DPI), abs=0.01)
        assert len(np.unique(np.asarray(im).reshape(-1, 4), axis=0)) > 10  # not blank
    # A text past the right edge: the saved area grows to hold it.
    figures._save(figure(1.5, None), tmp_path / "outside.png")  # no layout moves it in
    with Image.open(tmp_path / "outside.png") as im:
        assert im.size[0] > round(3.0 * figures.DPI)
    assert not plt.get_fignums()  # both figures closed
