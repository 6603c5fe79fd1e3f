"""Matplotlib set-up and the figure ending shared by the experiments' figures (PNG, 110 dpi)."""

from __future__ import annotations

from pathlib import Path


def pyplot(legend_fontsize: float = 8):
    """matplotlib.pyplot on the Agg backend (files only), with the experiments' font sizes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 9.5, "legend.fontsize": legend_fontsize})
    return plt


def legend_below(fig, ax, **kwargs) -> None:
    """One figure legend centred along the bottom, from the labelled artists of ``ax``
    (``ncol`` defaults to one column per entry; other keywords go to ``fig.legend``)."""
    handles, labels = ax.get_legend_handles_labels()
    kwargs.setdefault("ncol", len(labels))
    fig.legend(handles, labels, loc="lower center", frameon=False, **kwargs)


def save(fig, path: Path, rect: tuple[float, float, float, float] | None = None) -> None:
    """Lays the figure out inside ``rect`` (figure fraction; None = all of it), writes it to
    ``path`` and closes it."""
    import matplotlib.pyplot as plt

    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=110)
    plt.close(fig)
