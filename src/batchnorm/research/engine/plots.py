"""Figures: matplotlib on the Agg backend, imported on first use, and atomic saving.

The experiments' figures share one convention: without BN gray, with BN blue
(:data:`ARM_COLORS`); percentile curves 15th dotted, 50th solid, 85th dashed
(:func:`percentile_linestyle`); every figure laid out with ``layout="constrained"`` and its
legend outside the axes (:func:`figure_legend`); a figure from a run that is not the full one
says so in a footnote (:func:`scale_note`).
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .runner import atomic_write_bytes

__all__ = [
    "ARM_COLORS",
    "figure_legend",
    "percentile_label",
    "percentile_linestyle",
    "plot_percentile_runs",
    "plot_tracker",
    "pyplot",
    "save_figure",
    "scale_note",
    "style_handle",
]

# Without BN gray, with BN blue, in every figure.
ARM_COLORS = {"baseline": "tab:gray", "bn": "tab:blue"}

# Percentiles below the median: dotted first, then further patterns; above it: dashed first.
_BELOW = [":", "-.", (0, (1, 4)), (0, (3, 2, 1, 2, 1, 2))]
_ABOVE = ["--", (0, (8, 3)), (0, (5, 1)), (0, (6, 2, 1, 2))]


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed), imported on first
    use so that importing an experiment does not load matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure atomically and close it; the format follows the suffix of
    ``path`` (``.svg``, ``.pdf``, ...), PNG when it has none."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(
        buf, format=Path(path).suffix.lstrip(".").lower() or "png", dpi=dpi, bbox_inches="tight"
    )
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def percentile_linestyle(p: float, percentiles: Sequence[float] = (15, 50, 85)) -> Any:
    """The line style of percentile ``p`` among ``percentiles``: the median solid, the nearest
    one below it dotted and the nearest above dashed (15th, 50th, 85th: dotted, solid, dashed);
    further ones get further patterns, so no two percentiles of one plot share a style."""
    if p == 50:
        return "-"
    side = (
        sorted((q for q in percentiles if q < 50), reverse=True)
        if p < 50
        else sorted(q for q in percentiles if q > 50)
    )
    styles = _BELOW if p < 50 else _ABOVE
    i = side.index(p) if p in side else 0
    return styles[i % len(styles)]


def percentile_label(p: float) -> str:
    """``15th percentile``, ``50th percentile (median)``, ..."""
    n = f"{p:g}"
    suffix = (
        "th"
        if n.endswith(("11", "12", "13")) or not n[-1].isdigit()
        else {"1": "st", "2": "nd", "3": "rd"}.get(n[-1], "th")
    )
    return f"{n}{suffix} percentile" + (" (median)" if p == 50 else "")


def style_handle(label: str, color: str = "0.15", **kw: Any):
    """A legend entry for a line style or colour that several drawn lines share."""
    from matplotlib.lines import Line2D

    return Line2D([], [], color=color, label=label, **kw)


def figure_legend(fig, handles: Sequence[Any], ncols: int | None = None, **kw: Any):
    """One legend for the whole figure, below the axes (never over a curve); needs the figure
    made with ``layout="constrained"``."""
    handles = list(handles)
    if not handles:
        return None
    ncols = ncols or min(len(handles), 5)
    opts = {"loc": "outside lower center", "ncols": ncols, "fontsize": 8, "frameon": False}
    return fig.legend(handles=handles, **{**opts, **kw})


def scale_note(fig, summary: Mapping[str, Any]) -> None:
    """A note over the figure saying the scale it came from, unless it is the full run
    (``summary["scale"]``, as :func:`batchnorm.research.engine.launch.scale_of` writes it).

    It sits above the figure (and its suptitle); ``save_figure``'s tight bounding box takes it
    in. Not under the figure: a figure legend placed "outside lower" follows the bottom edge of
    the saved area and would land on it."""
    scale = summary.get("scale") or {}
    if scale.get("kind", "full") == "full":
        return
    width = max(40, int(fig.get_figwidth() * 14))
    text = textwrap.fill(f"Scale: {scale.get('text') or scale['kind'] + ' run'}", width)
    fig.text(0.01, 1.0, text, ha="left", va="bottom", fontsize=8, color="0.3", style="italic")


def draw_percentiles(ax, rec: Mapping[str, Any], percentiles: Sequence[float], color: str) -> None:
    """The percentile curves of one layer record (as in an ActivationTracker's ``results()``)."""
    steps = rec["steps"]
    series = list(zip(*rec["percentiles"], strict=True)) if rec["percentiles"] else []
    for p, ys in zip(percentiles, series, strict=False):  # no curves before any record
        ax.plot(
            steps, ys, percentile_linestyle(p, percentiles), color=color, lw=1.4,
            label=percentile_label(p),
        )  # fmt: skip


def plot_percentile_runs(
    panels: Mapping[str, Mapping[str, Any] | None],
    percentiles: Sequence[float],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    cols: int = 3,
    colors: str | Mapping[str, str] = "tab:blue",
    sharey: bool | str = False,
    ylabel: str = "pre-activation",
    summary: Mapping[str, Any] | None = None,
) -> Path:
    """Plot ``{panel title: layer record}`` (records as in ``results()["layers"]``) in a grid of
    ``cols`` columns, row by row; a ``None`` record leaves its cell empty. ``colors``: one colour
    or one per panel title; ``sharey``: as :func:`matplotlib.pyplot.subplots` (``"col"``: each
    column one y-range); ``summary``: the run's summary, for the scale footnote."""
    plt = pyplot()
    path = Path(path)
    n = max(len(panels), 1)
    cols = max(1, min(n, cols))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=((4.2 if cols <= 3 else 3.7) * cols, 3.0 * rows + 0.6),
        squeeze=False, sharey=sharey,
        layout="constrained",
    )  # fmt: skip
    for ax, (label, rec) in zip(axes.flat, panels.items(), strict=False):
        if rec is None:
            ax.axis("off")
            continue
        color = colors if isinstance(colors, str) else colors.get(label, "tab:blue")
        draw_percentiles(ax, rec, percentiles, color)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.tick_params(labelleft=True)  # shared y keeps its tick labels: each panel reads alone
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    figure_legend(
        fig,
        [
            style_handle(percentile_label(p), ls=percentile_linestyle(p, percentiles))
            for p in percentiles
        ],
    )
    if title:
        fig.suptitle(title)
    if summary is not None:
        scale_note(fig, summary)
    return save_figure(fig, path)


def _tracker_title(name: str, rec: Mapping[str, Any]) -> str:
    where, module = rec.get("where", "input"), rec.get("module")
    return f"{where} of {module} {name!r}" if module else repr(name)


def plot_tracker(
    results: dict[str, Any], path: str | os.PathLike, layers: Sequence[str] | None = None
) -> Path:
    """One panel per layer of an :class:`batchnorm.diagnostics.ActivationTracker`'s
    ``results()``: its percentile curves over steps, in the style of Figure 1(b, c)."""
    names = list(layers) if layers is not None else list(results["layers"])
    unknown = [n for n in names if n not in results["layers"]]
    if unknown:
        raise ValueError(f"unknown layers {unknown}; tracked layers: {list(results['layers'])}")
    return plot_percentile_runs(
        {_tracker_title(n, results["layers"][n]): results["layers"][n] for n in names},
        results["percentiles"],
        path,
    )
