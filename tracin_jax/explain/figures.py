"""Figures of the explanation report (matplotlib; every function writes one PNG and closes its figure).

One colour per class everywhere (:func:`class_colors`, from the Okabe-Ito palette, which
stays distinguishable under the common colour-vision deficiencies): NCR/NET vermillion,
ED bluish green, ET sky blue (``CLASS_COLORS``); other classes of an influence folder (e.g.
background, or the classes of any other task) take the Okabe-Ito colours not used by those, in
order, then further distinct hues: any number of classes gets distinct colours, the same for
the same list of names. Neutral / "not selected" items are grey. Functions take the class
names (and, for images, the label value of each class) of the influence folder.

Brain slices are shown in the neurological convention: the patient's left on the left of the
image, anterior at the top (``display_view``); every image carries L/R and A/P markers.
A volume (a 3D run's example, f32[X, Y, Z] in canonical RAS order) is shown by three
orthogonal planes through one point (``view_point``: its class region's centre of mass):
axial (patient's left on the left, anterior up: the 2D view), coronal (left on the left,
superior up) and sagittal (posterior on the left, anterior on the right, superior up), each
marked with the letters of its sides (``PLANE_SIDES``).
Titles are wrapped to the width they have, and ids are shown whole (wrapped when long).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from tracin_jax.task import BRATS_CLASSES as CLASS_NAMES

CLASS_COLORS = {"NCR/NET": "#D55E00", "ED": "#009E73", "ET": "#56B4E9"}
# The other Okabe-Ito colours (black left out: it draws text, axes and "overall" entries).
OTHER_COLORS = ("#E69F00", "#0072B2", "#CC79A7", "#F0E442")
NEUTRAL = "#9A9A9A"
OPPONENT = "#505050"
DPI = 110

plt.rcParams.update({"font.size": 9, "axes.titlesize": 9.5, "axes.labelsize": 9,
                     "figure.titlesize": 11, "legend.fontsize": 8})


def extra_hue(k: int) -> str:
    """The k-th colour beyond the Okabe-Ito palette: hues spaced by the golden ratio (each new
    one far from the previous ones), saturation and value fixed; distinct for every k."""
    from matplotlib.colors import hsv_to_rgb, to_hex

    return to_hex(hsv_to_rgb(((0.11 + 0.618034 * k) % 1.0, 0.75, 0.8)))


def class_colors(names: Sequence[str] = CLASS_NAMES) -> list[str]:
    """One distinct colour per class name, for any number of classes: the fixed tumour-class
    colours (``CLASS_COLORS``) for those names; every other name takes, in order, the next
    Okabe-Ito colour that no name of ``names`` has (``OTHER_COLORS``, then the tumour-class
    colours themselves), then :func:`extra_hue` colours."""
    taken = {CLASS_COLORS[n] for n in names if n in CLASS_COLORS}
    free = [c for c in (*OTHER_COLORS, *CLASS_COLORS.values()) if c not in taken]
    out, k = [], 0
    for n in names:
        if n in CLASS_COLORS:
            out.append(CLASS_COLORS[n])
        elif free:
            out.append(free.pop(0))
        else:
            out.append(extra_hue(k))
            k += 1
    return out


def color(c: int, names: Sequence[str] = CLASS_NAMES) -> str:
    """Colour of class c of ``names`` (default: 0 NCR/NET, 1 ED, 2 ET)."""
    return class_colors(names)[c]


CHAR_EM = 0.62  # width of an average character of the default font, in font sizes (measured upper bound)


def wrap(text: str, width_in: float, fontsize: float) -> str:
    """Wraps each line of ``text`` to fit ``width_in`` inches at ``fontsize`` points.

    Breaks at spaces first, then inside long words after '/', '-' or '_' (ids), so an id is
    shown whole over several lines rather than cut.
    """
    chars = max(8, int(width_in * 72 / (CHAR_EM * fontsize)))
    out = []
    for line in text.split("\n"):
        for piece in textwrap.wrap(line, chars, break_on_hyphens=False, break_long_words=False) or [""]:
            while len(piece) > chars:
                cut = max(piece.rfind(ch, 0, chars) for ch in "/-_")
                cut = cut + 1 if cut > 0 else chars
                out.append(piece[:cut])
                piece = piece[cut:]
            out.append(piece)
    return "\n".join(out)


def _suptitle(fig, text: str, size: float | None = None) -> None:
    size = size or plt.rcParams["figure.titlesize"]
    fig.suptitle(wrap(text, fig.get_figwidth() - 0.3, size), fontsize=size)


def _title(ax, text: str, width_in: float, size: float | None = None, **kw) -> None:
    size = size or plt.rcParams["axes.titlesize"]
    ax.set_title(wrap(text, width_in, size), fontsize=size, **kw)


# The three planes of a volume [X, Y, Z] (RAS: x left -> right, y posterior -> anterior,
# z inferior -> superior): the RAS axis shown left to right, the one shown bottom to top, and
# the axis the plane is fixed on.
PLANES = ("axial", "coronal", "sagittal")
PLANE_AXES = {"axial": (0, 1, 2), "coronal": (0, 2, 1), "sagittal": (1, 2, 0)}
# Letters at the (left, right, bottom, top) edges of each plane as displayed.
PLANE_SIDES = {"axial": ("L", "R", "P", "A"), "coronal": ("L", "R", "I", "S"),
               "sagittal": ("P", "A", "I", "S")}


def _orient(ax, plane: str = "axial") -> None:
    """Side markers on an image shown by ``display_view``: L/R and A/P on an axial slice
    (neurological convention), L/R and I/S on a coronal plane, P/A and I/S on a sagittal one
    (``PLANE_SIDES``); each text's gid is ``orient-<letter>``."""
    fx = [patheffects.withStroke(linewidth=1.6, foreground="black")]
    kw = dict(transform=ax.transAxes, color="white", fontsize=6.5, fontweight="bold",
              path_effects=fx, clip_on=True)
    left, right, bottom, top = PLANE_SIDES[plane]
    ax.text(0.02, 0.5, left, ha="left", va="center", gid=f"orient-{left}", **kw)
    ax.text(0.98, 0.5, right, ha="right", va="center", gid=f"orient-{right}", **kw)
    ax.text(0.5, 0.98, top, ha="center", va="top", gid=f"orient-{top}", **kw)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", gid=f"orient-{bottom}", **kw)


def _save(fig, path: Path) -> str:
    """Writes the PNG; the saved area grows to any text the layout left outside the figure.

    The figure is drawn once (layout included) and that drawing is written when everything lies
    inside the figure, as it does after the layout and the wrapping above. Otherwise the figure
    is saved with ``bbox_inches="tight"``, which draws it twice, to measure and to render.
    """
    canvas = FigureCanvasAgg(fig)  # whatever the session's backend: a canvas with pixels
    fig.set_dpi(DPI)
    canvas.draw()
    tight = fig.get_tightbbox(canvas.get_renderer())  # inches
    w, h = fig.get_size_inches()
    if tight.x0 >= 0 and tight.y0 >= 0 and tight.x1 <= w and tight.y1 <= h:
        _write_canvas(canvas, path)
    else:
        fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.06)
    plt.close(fig)
    return Path(path).name


def _write_canvas(canvas: FigureCanvasAgg, path: Path) -> None:
    """An Agg canvas as it was last drawn -> an RGBA PNG with the figure's resolution."""
    from PIL import Image

    buf = np.asarray(canvas.buffer_rgba())
    Image.fromarray(buf, "RGBA").save(path, format="png", dpi=(DPI, DPI))


def _window(img: np.ndarray) -> tuple[float, float]:
    """Display range from robust percentiles of the slice (background included)."""
    lo, hi = np.percentile(img, [0.5, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def display_view(a: np.ndarray) -> np.ndarray:
    """[x, y] in canonical RAS order (x: patient's left -> right, y: posterior -> anterior) ->
    the displayed [row, column] array.

    ``np.rot90`` puts +y (anterior) at the top and +x (towards the patient's right) on the
    right of the image: the neurological convention (patient's left on the viewer's left),
    not the radiological one.
    """
    return np.rot90(a)


def view_point(mask: np.ndarray) -> tuple[int, ...]:
    """The voxel the three planes of a volume go through, for a region bool[X, Y, Z].

    The region's centre of mass, rounded. When the centre of mass falls outside the region (a
    shell, a crescent, several pieces) and a plane through it would miss the region, that
    plane is replaced by the parallel one holding the most region voxels (ties: the nearest to
    the centre of mass), so that every plane shown cuts the region. An empty region gives the
    volume's centre.
    """
    m = np.asarray(mask, bool)
    if not m.any():
        return tuple(int(n // 2) for n in m.shape)
    com = np.array([i.mean() for i in np.nonzero(m)])
    point = [int(v) for v in np.clip(np.rint(com), 0, np.array(m.shape) - 1)]
    if m[tuple(point)]:
        return tuple(point)
    for a in range(m.ndim):
        area = m.sum(axis=tuple(b for b in range(m.ndim) if b != a))  # region voxels per plane
        if area[point[a]] == 0:
            best = np.flatnonzero(area == area.max())
            point[a] = int(best[np.argmin(np.abs(best - com[a]))])
    return tuple(point)


def plane_of(volume: np.ndarray, plane: str, point: Sequence[int]) -> np.ndarray:
    """The 2D array [across, up] of one plane through ``point`` of a volume [X, Y, Z, ...] in
    RAS order, ready for :func:`display_view` (axial [X, Y] at z, coronal [X, Z] at y, sagittal
    [Y, Z] at x)."""
    fixed = PLANE_AXES[plane][2]
    return np.take(np.asarray(volume), int(point[fixed]), axis=fixed)


def plane_index(plane: str, point: Sequence[int]) -> str:
    """'z=12' for the axial plane through point (x, y, z), 'y=..' coronal, 'x=..' sagittal."""
    fixed = PLANE_AXES[plane][2]
    return f"{'xyz'[fixed]}={int(point[fixed])}"


def _overlay(ax, img: np.ndarray, labels: np.ndarray, highlight: int | None,
             class_labels: Sequence[int], colors: Sequence[str], plane: str = "axial") -> None:
    """Grey slice, ground truth of every class translucent, the highlighted class outlined.

    img f32[H, W], labels u8[H, W] in RAS order (a slice, or a ``plane`` of a volume from
    :func:`plane_of`); class c has label value class_labels[c]. A class with label 0
    (background) is only outlined when highlighted, never tinted.
    """
    img, labels = display_view(img), display_view(labels)
    lo, hi = _window(img)
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    rgba = np.zeros(labels.shape + (4,))
    for c, v in enumerate(class_labels):
        if v == 0:
            continue
        m = labels == v
        alpha = 0.6 if c == highlight else 0.3
        rgba[m] = to_rgba(colors[c], alpha)
    ax.imshow(rgba, interpolation="nearest")
    if highlight is not None:
        m = labels == class_labels[highlight]
        if m.any() and not m.all():
            ax.contour(m, levels=[0.5], colors=[colors[highlight]], linewidths=1.4)
    ax.set_xticks([])
    ax.set_yticks([])
    _orient(ax, plane)


def _region(ax, img: np.ndarray, mask: np.ndarray, colour: str, name: str,
            plane: str = "axial") -> None:
    """Masked intensities: the region at full brightness, the rest of the slice dimmed to 15%
    (img f32[H, W], mask bool[H, W]: a slice, or a ``plane`` of a volume)."""
    img, mask = display_view(img), display_view(mask)
    lo, hi = _window(img)
    shown = np.where(mask, img, lo + 0.15 * (img - lo))
    ax.imshow(shown, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    if mask.any() and not mask.all():
        ax.contour(mask, levels=[0.5], colors=[colour], linewidths=1.0)
    elif not mask.any():
        ax.text(0.5, 0.5, f"no {name}\nregion", color="white", ha="center", va="center",
                transform=ax.transAxes, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    _orient(ax, plane)


def _score(v: float) -> str:
    """Signed score with 3 significant digits, fixed-point where readable."""
    a = abs(v)
    if a == 0 or 0.01 <= a < 1000:
        return f"{v:+.3g}" if a >= 100 else f"{v:+.{max(0, 2 - int(np.floor(np.log10(a))) if a else 2)}f}"
    return f"{v:+.2e}"


@dataclass
class Panel:
    """One training item of a local explanation."""

    image: np.ndarray  # f32[H, W] (chosen modality); a volume: f32[X, Y, Z] in RAS order
    labels: np.ndarray  # u8[H, W]; a volume: u8[X, Y, Z]
    patient: str
    slice_id: str
    score: float
    rank: int


def class_legend(names: Sequence[str], class_labels: Sequence[int],
                 colors: Sequence[str]) -> list[Patch]:
    """Legend entries of the ground-truth overlay: one patch per tinted class (label value not
    0), in the class's colour, labelled with its name."""
    return [Patch(color=to_rgba(colors[c], 0.6), label=name)
            for c, (name, v) in enumerate(zip(names, class_labels)) if v != 0]


def local_explanation(path: Path, *, test_image: np.ndarray, test_labels: np.ndarray, test_id: str,
                      test_class: int, train_class: int, proponents: Sequence[Panel],
                      opponents: Sequence[Panel], level: str, modality: str,
                      class_names: Sequence[str] = CLASS_NAMES,
                      class_labels: Sequence[int] = (1, 2, 3)) -> str:
    """Test slice (ground truth, class-i region) beside k proponents (top row) and k opponents.

    test_image f32[H, W], test_labels u8[H, W]; test_class / train_class index ``class_names``,
    whose label values are ``class_labels``. Volumes (test_image f32[X, Y, Z], test_labels
    u8[X, Y, Z] and the panels' arrays in RAS order) are drawn by :func:`local_explanation_3d`.
    """
    if np.ndim(test_image) == 3:
        return local_explanation_3d(path, test_image=test_image, test_labels=test_labels,
                                    test_id=test_id, test_class=test_class,
                                    train_class=train_class, proponents=proponents,
                                    opponents=opponents, level=level, modality=modality,
                                    class_names=class_names, class_labels=class_labels)
    k = max(len(proponents), len(opponents), 1)
    fig = plt.figure(figsize=(2.0 * (k + 1) + 0.4, 5.4), layout="constrained")
    gs = fig.add_gridspec(2, k + 2, width_ratios=[1.0, 0.08] + [1.0] * k)
    colors = class_colors(class_names)
    ci, cj = class_names[test_class], class_names[train_class]
    panel_w = 1.85  # inches of title width above one image
    ax = fig.add_subplot(gs[0, 0])
    _overlay(ax, test_image, test_labels, test_class, class_labels, colors)
    _title(ax, f"test {test_id}\nground truth", panel_w, 8.5)
    ax = fig.add_subplot(gs[1, 0])
    _region(ax, test_image, test_labels == class_labels[test_class], colors[test_class], ci)
    _title(ax, f"test region {ci}", panel_w, 8.5, color="black")
    for row, (panels, kind) in enumerate(((proponents, "proponent"), (opponents, "opponent"))):
        for n in range(k):
            ax = fig.add_subplot(gs[row, n + 2])
            if n >= len(panels):
                ax.axis("off")
                if n == len(panels):
                    sign = "positive" if kind == "proponent" else "negative"
                    msg = (f"no {kind}s\n(no {sign} scores)" if n == 0 else
                           f"no more {kind}s\n(no other {sign} scores)")
                    ax.text(0.5, 0.5, wrap(msg, panel_w, 8), ha="center",
                            va="center", transform=ax.transAxes, fontsize=8, color=NEUTRAL)
                continue
            p = panels[n]
            _region(ax, p.image, p.labels == class_labels[train_class], colors[train_class], cj)
            where = p.slice_id.rsplit("/", 1)[-1]
            _title(ax, f"{kind} {p.rank}\n{p.patient}\n{where}, score {_score(p.score)}", panel_w, 8)
    unit = "patients" if level == "patient" else "slices"
    handles = class_legend(class_names, class_labels, colors)
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6),
                   frameon=False, title="ground truth")
    _suptitle(fig, f"Test class {ci} explained by training class {cj} regions: top {k} proponent "
                   f"(top row) and opponent (bottom row) {unit} ({modality}; "
                   "patient's left on the left, anterior up)")
    return _save(fig, path)


def _missing(ax, kind: str, first: bool, width_in: float) -> None:
    """The empty cell after the last proponent (opponent): says why there are no more."""
    ax.axis("off")
    sign = "positive" if kind == "proponent" else "negative"
    msg = (f"no {kind}s\n(no {sign} scores)" if first else
           f"no more {kind}s\n(no other {sign} scores)")
    ax.text(0.5, 0.5, wrap(msg, width_in, 8), ha="center", va="center", transform=ax.transAxes,
            fontsize=8, color=NEUTRAL)


VOLUME_VIEW = ("each volume by three planes through the centre of mass of its class region: axial "
               "(patient's left on the left, anterior up), coronal (left on the left, superior "
               "up), sagittal (anterior on the right, superior up); letters mark the sides: "
               "L/R left/right, A/P anterior/posterior, S/I superior/inferior")


def local_explanation_3d(path: Path, *, test_image: np.ndarray, test_labels: np.ndarray,
                         test_id: str, test_class: int, train_class: int,
                         proponents: Sequence[Panel], opponents: Sequence[Panel], level: str,
                         modality: str, class_names: Sequence[str] = CLASS_NAMES,
                         class_labels: Sequence[int] = (1, 2, 3)) -> str:
    """:func:`local_explanation` for volumes: every item is shown by its axial, coronal and
    sagittal planes (one above the other) through :func:`view_point` of its class region (the
    test volume: class i; a training volume: class j), each plane marked with its sides and
    labelled with its index.

    test_image f32[X, Y, Z], test_labels u8[X, Y, Z] and the panels' image / labels, all in
    RAS order. Each image axes has gid ``plane-<axial|coronal|sagittal>``.
    """
    k = max(len(proponents), len(opponents), 1)
    fig = plt.figure(figsize=(2.0 * (k + 1) + 0.9, 11.6), layout="constrained")
    gs = fig.add_gridspec(6, k + 2, width_ratios=[1.0, 0.08] + [1.0] * k)
    colors = class_colors(class_names)
    ci, cj = class_names[test_class], class_names[train_class]
    panel_w = 1.85  # inches of title width above one image

    def column(col: int, row0: int, image, labels, value: int, title: str, draw) -> None:
        point = view_point(np.asarray(labels) == value)
        for r, plane in enumerate(PLANES):
            ax = fig.add_subplot(gs[row0 + r, col])
            ax.set_gid(f"plane-{plane}")
            draw(ax, plane_of(image, plane, point), plane_of(labels, plane, point), plane)
            ax.set_ylabel(f"{plane} {plane_index(plane, point)}", fontsize=7)
            if r == 0:
                _title(ax, title, panel_w, 8)

    vi, vj = class_labels[test_class], class_labels[train_class]
    column(0, 0, test_image, test_labels, vi, f"test {test_id}\nground truth",
           lambda ax, im, lab, pl: _overlay(ax, im, lab, test_class, class_labels, colors, pl))
    column(0, 3, test_image, test_labels, vi, f"test region {ci}",
           lambda ax, im, lab, pl: _region(ax, im, lab == vi, colors[test_class], ci, pl))
    for half, (panels, kind) in enumerate(((proponents, "proponent"), (opponents, "opponent"))):
        for n in range(k):
            if n >= len(panels):
                if n == len(panels):
                    _missing(fig.add_subplot(gs[3 * half:3 * half + 3, n + 2]), kind, n == 0,
                             panel_w)
                continue
            p = panels[n]
            column(n + 2, 3 * half, p.image, p.labels, vj,
                   f"{kind} {p.rank}\n{p.patient}\nscore {_score(p.score)}",
                   lambda ax, im, lab, pl: _region(ax, im, lab == vj, colors[train_class], cj, pl))
    unit = "patients" if level == "patient" else "volumes"
    handles = class_legend(class_names, class_labels, colors)
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6),
                   frameon=False, title="ground truth")
    _suptitle(fig, f"Test class {ci} explained by training class {cj} regions: top {k} proponent "
                   f"(upper half) and opponent (lower half) {unit} ({modality}; {VOLUME_VIEW})")
    return _save(fig, path)


def _tick_style(names: Sequence[str]) -> dict:
    """Keyword arguments of ``set_xticks`` for class names under narrow columns: names longer
    than 8 characters (e.g. 'white matter') are slanted so that neighbours do not overlap;
    short ones (the tumour classes) stay level."""
    if max(len(n) for n in names) > 8:
        return {"rotation": 25, "ha": "right", "rotation_mode": "anchor"}
    return {}


def class_matrix(path: Path, matrix: np.ndarray, n_items: Sequence[int],
                 names: Sequence[str] = CLASS_NAMES, example: str = "slice") -> str:
    """Heatmap of the C x C mean influence matrix f32[C, C] (rows test class i, columns training
    class j); ``example``: what one training example is ("slice", or "volume" in 3D)."""
    extra = len(names) - 3
    fig, ax = plt.subplots(figsize=(5.4 + 1.0 * max(extra, 0), 4.4 + 0.8 * max(extra, 0)),
                           layout="constrained")
    m = np.asarray(matrix, float)
    vmax = np.nanmax(np.abs(m)) if np.isfinite(m).any() else 1.0
    vmax = vmax if vmax > 0 else 1.0
    im = ax.imshow(m, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    for i in range(len(names)):
        for j in range(len(names)):
            v = m[i, j]
            txt = "n/a" if not np.isfinite(v) else f"{v:.3g}"
            dark = np.isfinite(v) and abs(v) > 0.6 * vmax
            ax.text(j, i, txt, ha="center", va="center", color="white" if dark else "black")
    ax.set_xticks(range(len(names)), names, **_tick_style(names))
    ax.set_yticks(range(len(names)), [f"{c}\n(n={n})" for c, n in zip(names, n_items)])
    for t, c in zip(ax.get_xticklabels(), range(len(names))):
        t.set_color(color(c, names))
    for t, c in zip(ax.get_yticklabels(), range(len(names))):
        t.set_color(color(c, names))
    ax.set_xlabel("training class j")
    ax.set_ylabel("test class i (test items with class i)")
    fig.colorbar(im, ax=ax, shrink=0.85, label=f"mean score per training {example}")
    _title(ax, "Mean class-wise influence T_ij over the test set", fig.get_figwidth() - 0.6)
    return _save(fig, path)


def topk_frequency(path: Path, prop: np.ndarray, opp: np.ndarray, patients: Sequence[str], k: int,
                   n_items: Sequence[int], max_patients: int = 20,
                   names: Sequence[str] = CLASS_NAMES) -> str:
    """Per class: how often each patient is a top-k proponent (up) / opponent (down).

    prop, opp: int[C, n_patients]; patient names are shown whole (rotated).
    """
    fig, axes = plt.subplots(len(names), 1, figsize=(10.5, 3.2 * len(names)), layout="constrained",
                             squeeze=False)
    axes = axes[:, 0]
    for c, ax in enumerate(axes):
        total = prop[c] + opp[c]
        order = np.argsort(-total, kind="stable")[:max_patients]
        order = order[total[order] > 0]
        x = np.arange(len(order))
        ax.bar(x, prop[c][order], color=color(c, names), label=f"top-{k} proponent")
        ax.bar(x, -opp[c][order], color=OPPONENT, label=f"top-{k} opponent")
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(x, [patients[p] for p in order], rotation=35, ha="right",
                      rotation_mode="anchor", fontsize=7.5)
        ax.set_xlim(-0.7, max(len(order), 1) - 0.3)
        ax.set_ylabel("test items")
        _title(ax, f"{names[c]}: patients most often among the top-{k} "
                   f"(of {n_items[c]} test items with {names[c]})", 8.5, color="black")
        lim = max(1, int(max(prop[c].max(initial=0), opp[c].max(initial=0))))
        ax.set_ylim(-lim * 1.15, lim * 1.15)
        ticks = ax.get_yticks()
        ax.set_yticks(ticks, [f"{abs(t):g}" for t in ticks])
        ax.set_ylim(-lim * 1.15, lim * 1.15)
        ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False)
    return _save(fig, path)


def score_distributions(path: Path, patient_scores: np.ndarray, present: np.ndarray,
                        max_points: int = 20000, seed: int = 0,
                        names: Sequence[str] = CLASS_NAMES, example: str = "slice") -> str:
    """Violins of patient-level scores per class pair; one panel per test class i.

    patient_scores f32[n_test, C, n_patients, C], present bool[n_test, C]; ``example``: what
    one example is ("slice": a patient's score sums its slices; "volume": it is its volume's).
    """
    n_cls = len(names)
    fig, axes = plt.subplots(1, n_cls, figsize=(11 / 3 * n_cls, 3.8), layout="constrained",
                             squeeze=False)
    axes = axes[0]
    panel_w = fig.get_figwidth() / n_cls - 0.35
    rng = np.random.default_rng(seed)
    for i, ax in enumerate(axes):
        rows = patient_scores[np.asarray(present)[:, i], i]  # [m, P, 3]
        for j in range(len(names)):
            v = rows[..., j].ravel().astype(np.float64)
            if v.size > max_points:
                v = rng.choice(v, max_points, replace=False)
            if v.size == 0:
                continue
            if np.ptp(v) > 0:
                parts = ax.violinplot([v], positions=[j], widths=0.8, showmedians=True)
                for body in parts["bodies"]:
                    body.set_facecolor(color(j, names))
                    body.set_edgecolor("black")
                    body.set_alpha(0.75)
                for key in ("cbars", "cmins", "cmaxes", "cmedians"):
                    parts[key].set_color("black")
                    parts[key].set_linewidth(0.8)
            else:
                ax.plot([j - 0.3, j + 0.3], [v[0], v[0]], color=color(j, names), lw=2)
        ax.axhline(0, color=NEUTRAL, lw=0.6, ls="--")
        ax.set_xticks(range(len(names)), names, **_tick_style(names))
        for t, c in zip(ax.get_xticklabels(), range(len(names))):
            t.set_color(color(c, names))
        ax.set_xlabel("training class j")
        _title(ax, f"test class {names[i]} (n={int(np.asarray(present)[:, i].sum())} items)", panel_w)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes[0].set_ylabel("patient score (its volume's)" if example == "volume"
                       else f"patient score (sum over its {example}s)")
    _suptitle(fig, "Distribution of patient-level scores per class pair")
    return _save(fig, path)


def fi_curves(path: Path, curves: np.ndarray, n_window: Sequence[int], highlight: Sequence[Sequence[int]],
              stats: Sequence[dict], metric: str, names: Sequence[str] = CLASS_NAMES) -> str:
    """FI against rank per class (curves: C arrays f32[R, F]): mean over filters with the
    inter-quartile band, a few filters."""
    n_cls = len(names)
    fig, axes = plt.subplots(1, n_cls, figsize=(4 * n_cls, 4.0), layout="constrained", sharey=True,
                             squeeze=False)
    axes = axes[0]
    panel_w = fig.get_figwidth() / n_cls - 0.35
    styles = ["--", ":", "-."]
    for c, ax in enumerate(axes):
        fi = curves[c]  # [R, F]
        r = np.arange(1, fi.shape[0] + 1)
        title = names[c]
        if fi.size == 0 or not np.isfinite(fi).any():
            ax.text(0.5, 0.5, "no defined similarities", ha="center", va="center", transform=ax.transAxes)
            _title(ax, title, panel_w)
            continue
        n = n_window[c]
        R = fi.shape[0]
        for a, b in ((0, n), (R - n, R)):
            ax.axvspan(a + 0.5, b + 0.5, color=color(c, names), alpha=0.08, lw=0)
        s = (R - n) // 2
        ax.axvspan(s + 0.5, s + n + 0.5, color=NEUTRAL, alpha=0.15, lw=0)
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(fi, axis=1)
                q1, q3 = np.nanpercentile(fi, [25, 75], axis=1)
        ax.fill_between(r, q1, q3, color=color(c, names), alpha=0.25, lw=0, label="filters: 25-75%")
        for f, ls in zip(highlight[c], styles):
            ax.plot(r, fi[:, f], color="black", lw=0.9, ls=ls, label=f"filter {f}")
        ax.plot(r, mean, color=color(c, names), lw=2.2, label="mean over filters")
        st = stats[c]
        if st and np.isfinite(st.get("gap", np.nan)):
            title += f"\ngap {st['gap']:+.3f}, permutation p = {st['p_value']:.3g}"
        _title(ax, title, panel_w)
        ax.set_xlabel("patient rank (1 = strongest proponent)")
        ax.set_xlim(0.5, R + 0.5)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2, frameon=False)
    fig.supylabel(f"FI ({metric} similarity)", fontsize=plt.rcParams["axes.labelsize"])
    _suptitle(fig, "Faithfulness: latent similarity of class regions vs influence rank "
                 "(shaded: proponent / opponent windows, grey: neutral middle)")
    return _save(fig, path)


def similarity_vs_score(path: Path, abs_scores: Sequence[np.ndarray], sims: Sequence[np.ndarray],
                        rhos: Sequence[dict], metric: str, max_points: int = 6000, seed: int = 0,
                        names: Sequence[str] = CLASS_NAMES) -> str:
    """Scatter of |patient score| against S (mean over filters) per class, with Spearman rho."""
    n_cls = len(names)
    fig, axes = plt.subplots(1, n_cls, figsize=(4 * n_cls, 3.8), layout="constrained", squeeze=False)
    axes = axes[0]
    panel_w = fig.get_figwidth() / n_cls - 0.35
    rng = np.random.default_rng(seed)
    for c, ax in enumerate(axes):
        x, y = np.asarray(abs_scores[c]).ravel(), np.asarray(sims[c]).ravel()
        ok = np.isfinite(x) & np.isfinite(y)
        x, y = x[ok], y[ok]
        if x.size > max_points:
            pick = rng.choice(x.size, max_points, replace=False)
            x, y = x[pick], y[pick]
        ax.scatter(x, y, s=6, color=color(c, names), alpha=0.5, lw=0)
        if x.size and x.min() > 0 and x.max() / x.min() > 100:
            ax.set_xscale("log")
        else:
            ax.xaxis.set_major_locator(MaxNLocator(5))
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
        rho = rhos[c].get("rho", float("nan"))
        rho_txt = "n/a" if rho is None or not np.isfinite(rho) else f"{rho:.3f}"
        _title(ax, f"{names[c]}: Spearman rho = {rho_txt} (n={rhos[c].get('n_pairs', 0)})", panel_w)
        ax.set_xlabel("|patient score|")
    axes[0].set_ylabel(f"S, mean over filters ({metric})")
    return _save(fig, path)


def ablation_per_filter(path: Path, drops: dict, selected: np.ndarray,
                        names: Sequence[str] = CLASS_NAMES) -> str:
    """Dice drop when zeroing each filter; rows: splits, columns: classes; selected in class colour.

    drops[split]: f32[C, F]; selected: bool[C, F].
    """
    splits = list(drops)
    n_cls = len(names)
    fig, axes = plt.subplots(len(splits), n_cls, figsize=(4 * n_cls, 2.9 * len(splits) + 0.4),
                             layout="constrained", squeeze=False)
    panel_w = fig.get_figwidth() / n_cls - 0.35
    for r, split in enumerate(splits):
        for c in range(len(names)):
            ax = axes[r, c]
            d = np.asarray(drops[split][c])
            x = np.arange(d.size)
            cols = [color(c, names) if s else NEUTRAL for s in selected[c]]
            ax.bar(x, np.nan_to_num(d), color=cols, width=0.85)
            ax.axhline(0, color="black", lw=0.6)
            _title(ax, f"{names[c]} ({split}): {int(selected[c].sum())} selected", panel_w)
            ax.set_xlabel("filter")
            if c == 0:
                ax.set_ylabel("Dice drop")
            ax.set_xlim(-0.8, d.size - 0.2)
    handles = [Patch(color=color(c, names), label=f"selected ({names[c]})") for c in range(len(names))]
    handles.append(Patch(color=NEUTRAL, label="not selected"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), frameon=False)
    _suptitle(fig, "Per-filter ablation: hard Dice without the filter, subtracted from the full model's")
    return _save(fig, path)


def importance_histograms(path: Path, gaps: np.ndarray, selected: np.ndarray,
                          names: Sequence[str] = CLASS_NAMES) -> str:
    """log|FI gap| (gaps f32[C, F]) of selected vs not selected (bool[C, F]) filters, per class."""
    n_cls = len(names)
    fig, axes = plt.subplots(1, n_cls, figsize=(4 * n_cls, 3.6), layout="constrained", squeeze=False)
    axes = axes[0]
    for c, ax in enumerate(axes):
        g = np.abs(np.asarray(gaps[c], float))
        ok = np.isfinite(g) & (g > 0)
        lg = np.log(g[ok])
        sel = np.asarray(selected[c], bool)[ok]
        if lg.size == 0:
            ax.text(0.5, 0.5, "no defined FI", ha="center", va="center", transform=ax.transAxes)
        else:
            bins = np.linspace(lg.min() - 1e-9, lg.max() + 1e-9, 16)
            h0, _, _ = ax.hist(lg[~sel], bins=bins, color=NEUTRAL, alpha=0.85,
                               label=f"not selected ({(~sel).sum()})")
            top = h0.max(initial=0)
            if sel.any():
                h1, _, _ = ax.hist(lg[sel], bins=bins, color=color(c, names), alpha=0.8,
                                   label=f"selected ({sel.sum()})")
                top = max(top, h1.max())
            else:
                ax.text(0.97, 0.95, "none selected", ha="right", va="top", transform=ax.transAxes)
            ax.set_ylim(0, top * 1.45 + 0.5)  # room for the legend above the bars
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(loc="upper left", frameon=False)
        ax.set_title(names[c])
        ax.set_xlabel("log |FI gap| (extremes - middle)")
    axes[0].set_ylabel("filters")
    return _save(fig, path)


def group_ablation(path: Path, groups: dict, names: Sequence[str] = CLASS_NAMES) -> str:
    """Dice drop of the selected set, random sets of the same size, and the least important set.

    groups[split][c] = {'selected': float, 'random': [float], 'least': float, 'size': int}.
    """
    splits = list(groups)
    n_cls = len(names)
    fig, axes = plt.subplots(len(splits), n_cls, figsize=(11 / 3 * n_cls, 2.8 * len(splits) + 0.3),
                             layout="constrained", squeeze=False)
    panel_w = fig.get_figwidth() / n_cls - 0.35
    for r, split in enumerate(splits):
        for c in range(len(names)):
            ax = axes[r, c]
            g = groups[split][c]
            _title(ax, f"{names[c]} ({split}), {g['size']} filters", panel_w)
            if g["size"] == 0:
                ax.text(0.5, 0.5, "no filters selected", ha="center", va="center", transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            rnd = np.asarray(g["random"], float)
            vals = [g["selected"], float(np.nanmean(rnd)), g["least"]]
            err = [0, float(np.nanstd(rnd)), 0]
            ax.bar(range(3), np.nan_to_num(vals), yerr=err, color=[color(c, names), NEUTRAL, "white"],
                   edgecolor=[color(c, names), NEUTRAL, "black"], capsize=4, width=0.65)
            ax.scatter(np.full(rnd.size, 1.0) + np.linspace(-0.15, 0.15, rnd.size), rnd, s=10,
                       color="black", zorder=3)
            ax.axhline(0, color="black", lw=0.6)
            ax.set_xticks(range(3), ["selected", f"random\n({rnd.size} seeds)", "least\nimportant"])
            if c == 0:
                ax.set_ylabel("Dice drop")
    _suptitle(fig, "Group ablation: zeroing a whole set of filters")
    return _save(fig, path)
