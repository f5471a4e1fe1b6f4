"""Figures: matplotlib on the Agg backend, imported on first use, and atomic saving."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .runner import atomic_write_bytes

__all__ = ["plot_percentile_runs", "plot_tracker", "pyplot", "save_figure"]


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


def plot_percentile_runs(
    panels: dict[str, dict[str, Any]],
    percentiles: Sequence[float],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    cols: int = 3,
) -> Path:
    """Plot ``{panel title: layer record}`` (records as in ``results()["layers"]``) side by side."""
    plt = pyplot()
    path = Path(path)
    n = max(len(panels), 1)
    cols = max(1, min(n, cols))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (label, rec) in zip(axes.flat, panels.items(), strict=False):
        steps = rec["steps"]
        pct = list(zip(*rec["percentiles"], strict=True)) if rec["percentiles"] else []
        for p, series in zip(percentiles, pct, strict=False):  # no curves before any record
            ax.plot(steps, series, label=f"{p:g}th", lw=1.2)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].set_ylabel("pre-activation")
    if axes.flat[0].lines:
        axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


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
        {n: results["layers"][n] for n in names}, results["percentiles"], path
    )
