"""Line charts as PNG files, for the plots a job returns (training curves, a loss curve).

For plugins: a figure of a fixed size in pixels with one or more panels side by side, a title
naming what was trained, and one legend outside the axes (it never covers the last points)::

    fig, (loss, accuracy) = figure("cnn on 1,437 images", (1000, 420), panels=2)
    plot_series(loss, [("train", points), ("validation", val_points)], x_label="epoch", y_label="loss")
    ...
    save_png(fig, path)

matplotlib and Pillow (the `train` extra) are imported inside these functions, never when
this module is: the worker loads every plugin at start and most jobs draw nothing. They use
matplotlib's object API (a `Figure` drawn by the Agg canvas), not pyplot: nothing global (the
backend, pyplot's current figure) changes in the worker process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

DPI = 100
MARKERS_UP_TO = 60  # points per line; longer lines are drawn without markers

Points = Sequence[tuple[float, float | None]]  # (x, y); a y that is None or not finite is not drawn


def figure(title: str, size: tuple[int, int], panels: int = 1):
    """A matplotlib Figure of exactly `size` (width, height) pixels with `title` above `panels`
    axes side by side; returns (figure, [axes, ...])."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title)
    return fig, list(fig.subplots(1, panels, squeeze=False)[0])


def plot_series(ax, series: Sequence[tuple[str, Points]], *, x_label: str, y_label: str, title: str = "",
                y_range: tuple[float | None, float | None] | None = None,
                dots: Sequence[tuple[str, Points]] = ()) -> None:
    """Draw each (label, [(x, y), ...]) of `series` as a line (with markers up to 60 points) on
    `ax`, then each of `dots` as large markers alone (a few evaluations, say).

    Points whose y is None or not finite are left out; a series left empty is not drawn (an
    axes with nothing says "no data"). Colours follow the order of `series` then `dots` (C0,
    C1, ...), the same in every panel. x ticks are whole numbers (epochs, rounds, steps): each x
    drawn where there are at most 10. `y_range` (low, high), either None for automatic, is
    widened by 2% so that points on a bound stay whole."""
    from matplotlib.ticker import MaxNLocator

    if title:
        ax.set_title(title)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    drawn: set[float] = set()  # the x values drawn
    for i, (label, points) in enumerate([*series, *dots]):
        xs, ys = _finite(points)
        if not xs:
            continue
        drawn.update(xs)
        if i < len(series):
            ax.plot(xs, ys, color=f"C{i}", label=label, linewidth=2,
                    marker="o" if len(xs) <= MARKERS_UP_TO else None, markersize=4)
        else:
            ax.plot(xs, ys, color=f"C{i}", label=label, linestyle="none", marker="o", markersize=8, zorder=3)
    if not drawn:
        ax.text(0.5, 0.5, "no data", color="gray", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    if len(drawn) <= 10:  # one epoch alone too, where a locator would tick 0.95 to 1.05
        ax.set_xticks(sorted(drawn))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, color="0.9")
    ax.set_axisbelow(True)
    if y_range is not None:
        (low, high), (auto_low, auto_high) = y_range, ax.get_ylim()
        pad = 0.02 * ((auto_high if high is None else high) - (auto_low if low is None else low))
        ax.set_ylim(auto_low if low is None else low - pad, auto_high if high is None else high + pad)


def save_png(fig, path: Path) -> None:
    """One legend for the whole figure (each label once, in the order drawn) to the right of
    the last axes, outside them, then write an RGB PNG (no alpha, as the charts drawn with
    Pillow before) at the figure's size."""
    from PIL import Image

    handles: dict[str, object] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.axes[-1].legend(list(handles.values()), list(handles), loc="upper left", bbox_to_anchor=(1.02, 1),
                            borderaxespad=0)
    fig.canvas.draw()
    with Image.frombuffer("RGBA", fig.canvas.get_width_height(), fig.canvas.buffer_rgba()) as image:
        image.convert("RGB").save(path, format="PNG", optimize=True)


def plot_lines(path: Path, title: str, series: Sequence[tuple[str, Points]], *, x_label: str, y_label: str = "",
               y_range: tuple[float | None, float | None] | None = None, size: tuple[int, int] = (640, 420)) -> None:
    """A PNG with one chart of lines (see `plot_series`): e.g. a federated model's accuracy per
    round."""
    fig, (ax,) = figure(title, size)
    plot_series(ax, series, x_label=x_label, y_label=y_label, y_range=y_range)
    save_png(fig, path)


def _finite(points: Points) -> tuple[list[float], list[float]]:
    kept = [(x, y) for x, y in points if y is not None and math.isfinite(y)]
    return [x for x, _ in kept], [y for _, y in kept]
