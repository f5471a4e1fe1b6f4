"""The experiments' figures read as a reader of the paper expects (issue 14, item 4).

Each experiment's ``plot(summary, out)`` runs on a small fake summary with the structure its
``summarize`` writes (layer names taken from the real networks), with ``save_figure``
patched to keep the matplotlib Figure; the checks introspect it: every axes with data has
x and y labels and a title; every curve and bar lies inside its axes' view; no two lines of
one axes share colour, style and marker; legends sit outside every axes; a run that is not
the full one says its scale; plus the per-figure requirements (Figure 1(a) from step 0 with
its early low accuracies, p15 dotted and p85 dashed, shared y-axes where panels are compared,
diagnose's layers named by role, the same in both networks).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from batchnorm.diagnostics.ics import default_ics_layers
from batchnorm.diagnostics.tracker import ACTIVATIONS
from batchnorm.research.engine import plots
from batchnorm.research.experiments import (
    ablation,
    claims,
    diagnose,
    fig1,
    lenet,
    small_batch,
)
from batchnorm.research.experiments.models import LeNet

MODULES = (fig1, lenet, ablation, claims, small_batch, diagnose)
QUICK = {"kind": "quick", "changed": {"steps": 600}, "text": "--quick run, not the paper's scale: steps=600"}  # fmt: skip
FULL = {"kind": "full", "changed": {}, "text": "full run (the experiment's default settings)"}


@pytest.fixture
def figures(monkeypatch):
    """``{file name: Figure}`` of every figure the plot functions save, drawn (laid out)."""
    plt = plots.pyplot()
    saved: dict[str, object] = {}

    def keep(fig, path, dpi: int = 110) -> Path:
        fig.canvas.draw()
        saved[Path(path).name] = fig
        return Path(path)

    monkeypatch.setattr(plots, "save_figure", keep)
    for mod in MODULES:
        monkeypatch.setattr(mod, "save_figure", keep)
    yield saved
    for fig in saved.values():
        plt.close(fig)


# ---------------------------------------------------------------- fake summaries
def _curve(n: int, start: float, end: float) -> list[float]:
    return [start + (end - start) * (1 - math.exp(-3 * i / max(n - 1, 1))) for i in range(n)]


def fig1_summary(scale: dict = QUICK) -> dict:
    steps = list(range(0, 601, 100))
    base = [0.1, 0.55, 0.8, 0.88, 0.9, 0.91, 0.915]  # low at step 0, then a fast rise
    bn = [0.1, 0.9, 0.94, 0.95, 0.96, 0.965, 0.97]
    pct = {}
    for arm, drift in (("baseline", -0.3), ("bn", 0.0)):
        mid = [drift * i for i in range(len(steps))]
        pct[arm] = {
            "steps": steps,
            "p15": [m - 1.0 for m in mid],
            "p50": mid,
            "p85": [m + 1.0 for m in mid],
        }
    return {
        "experiment": "fig1", "scale": scale, "dataset": "digits", "steps": 600,
        "runs": {
            arm: {"curve": [[s, a] for s, a in zip(steps, acc, strict=True)],
                  "final_test_accuracy": acc[-1], "wall_seconds": 1.0}
            for arm, acc in (("baseline", base), ("bn", bn))
        },
        "percentiles": pct, "config": {"batch_size": 60, "unit": 0},
    }  # fmt: skip


def lenet_summary() -> dict:
    nets = {}
    for i, name in enumerate(lenet.VARIANTS):
        nets[name] = {
            "epochs": [1, 2, 3], "train_acc": _curve(3, 0.5 + 0.1 * i, 0.95),
            "test_acc_curve": _curve(3, 0.6 + 0.1 * i, 0.97), "diverged": False,
        }  # fmt: skip
    return {"scale": QUICK, "dataset": "digits", "nets": nets, "config": {"recipe_lr_mult": 5.0}}


def ablation_summary() -> dict:
    steps = [10, 20, 30]
    curves = {
        v: {"step": steps, "test_acc": _curve(3, 0.1 + 0.05 * i, 0.5 + 0.05 * i)}
        for i, v in enumerate(ablation.VARIANTS)
    }
    return {
        "scale": QUICK, "dataset": "digits", "curves": curves, "test_examples": 297,
        "baseline_best_acc": max(curves["Baseline"]["test_acc"]), "config": {"batch_size": 32},
    }  # fmt: skip


def claims_summary() -> dict:
    def sweep(values: list[float]) -> dict:
        return {
            "values": values,
            "plain": {"acc": [0.4, 0.6, 0.0], "diverged": [False, False, True]},
            "bn": {"acc": [0.76, 0.9, 0.66], "diverged": [False, False, False]},
        }

    reg = {
        f"{arm}/{p}": {"train_acc": 0.9 - 0.1 * i, "test_acc": 0.8 - 0.1 * i}
        for i, (arm, p) in enumerate((a, p) for a in ("plain", "bn") for p in ("none", "dropout"))
    }
    sig = {
        arm: {
            "grad_norms_init": [10.0 ** (-k if arm == "plain" else -1) for k in range(10, 0, -1)],
            "grad_norms_end": [2 * 10.0 ** (-k if arm == "plain" else -1) for k in range(10, 0, -1)],
            "curve": [0.1, 0.1 if arm == "plain" else 0.5, 0.12 if arm == "plain" else 0.8],
            "steps": [8, 16, 25],
        }
        for arm in ("plain", "bn")
    }  # fmt: skip
    ens = {"k": 2, "member_top1_err": [0.15, 0.32], "ensemble_top1_err": 0.16}
    cfg = {
        "depth": 4, "width": 32, "steps": 25, "reg_steps": 25, "reg_examples": 200,
        "dropout": 0.3, "sigmoid_lr": 0.1,
    }  # fmt: skip
    return {
        "scale": QUICK, "dataset": "digits", "config": cfg,
        "learning_rate": sweep([0.01, 0.1, 1.0]), "initialization": sweep([0.1, 1.0, 10.0]),
        "regularization": reg, "sigmoid": sig, "ensemble": ens,
    }  # fmt: skip


def small_batch_summary() -> dict:
    table = {
        label: {
            str(b): {"ema_acc": 0.3 + 0.05 * i + 0.01 * b, "recomputed_acc": 0.35 + 0.05 * i,
                     "steps": 100 // b}
            for b in (2, 4, 8)
        }
        for i, label in enumerate(small_batch.LABELS.values())
    }  # fmt: skip
    return {"scale": QUICK, "dataset": "digits", "table": table, "train_examples": 96}


def _net(model: str, arm: str) -> nn.Module:
    if model == "mlp":
        return fig1.build_mlp(arm == "bn", 0.05, torch.Generator().manual_seed(0))
    return LeNet(bn=arm == "bn")


def diagnose_summary(model: str = "mlp") -> dict:
    """The real networks' module names: nonlinearities and Linear/Conv layers differ by arm."""
    steps = [0, 30, 60]
    arms, pct = {}, {}
    for k, arm in enumerate(diagnose.ARMS):
        net = _net(model, arm)
        weights = default_ics_layers(net)
        acts = [n for n, m in net.named_modules() if isinstance(m, ACTIVATIONS)]
        arms[arm] = {
            "points": [
                {
                    "step": s, "test_accuracy": 0.1 + 0.2 * i * (k + 1),
                    "ics": {
                        "layers": weights,
                        "l2": [10.0 ** (-j - k - i) for j in range(len(weights))],
                        "cosine": [1 - 0.1 * j - 0.05 * i - 0.2 * k for j in range(len(weights))],
                    },
                    "landscape": {
                        "loss_range": 0.3 / (i + 1) / (k + 1), "grad_change": [1.0, 2.0 / (i + 1)],
                        "effective_beta": 2.5 - 0.5 * i * (1 - k),
                    },
                }
                for i, s in enumerate(steps)
            ]
        }  # fmt: skip
        pct[arm] = {
            "percentiles": [15.0, 50.0, 85.0],
            "layers": {
                n: {
                    "module": type(net.get_submodule(n)).__name__, "units": [7],
                    "steps": [0, 10, 20],
                    "percentiles": [[-1.0 + j - 0.1 * t, j + 0.0, 1.0 + j + 0.1 * t] for t in range(3)],
                }
                for j, n in enumerate(acts)
            },
        }  # fmt: skip
    return {
        "scale": QUICK, "dataset": "digits", "model": model, "lr": 0.5,
        "step_sizes": [0.25, 1.0], "measure_steps": steps, "arms": arms, "percentiles": pct,
    }  # fmt: skip


# ---------------------------------------------------------------- generic checks
def _data_axes(fig) -> list:
    return [
        ax
        for ax in fig.axes
        if ax.get_visible() and ax.axison and (ax.lines or ax.patches or ax.collections)
    ]


def _style(line) -> tuple:
    from matplotlib.colors import to_hex

    return (
        to_hex(line.get_color()),
        line.get_linestyle(),
        str(line.get_marker()),
        str(getattr(line, "_unscaled_dash_pattern", None)),
    )


def check_figure(name: str, fig, scale_kind: str = "quick") -> None:
    axes = _data_axes(fig)
    assert axes, name
    renderer = fig.canvas.get_renderer()
    in_data = 0
    for ax in axes:
        where = f"{name}, axes {ax.get_title()!r}"
        assert ax.get_xlabel().strip(), f"{where}: no x label"
        assert ax.get_ylabel().strip(), f"{where}: no y label"
        assert ax.get_title().strip(), f"{name}: a panel without a title"
        x0, x1 = sorted(ax.get_xlim())
        y0, y1 = sorted(ax.get_ylim())
        tol_x, tol_y = 1e-9 * max(1.0, abs(x1)), 1e-9 * max(1.0, abs(y1))
        for line in ax.lines:  # every point of every curve in view: nothing clipped away
            if line.get_transform() is not ax.transData or len(line.get_xdata()) == 0:
                continue
            xs = [float(v) for v in line.get_xdata()]
            ys = [float(v) for v in line.get_ydata()]
            assert x0 - tol_x <= min(xs) and max(xs) <= x1 + tol_x, f"{where}: x clipped"
            assert y0 - tol_y <= min(ys) and max(ys) <= y1 + tol_y, (
                f"{where}: {line.get_label()!r} spans {min(ys):g}..{max(ys):g}, "
                f"the view {y0:g}..{y1:g}"
            )
            in_data += 1
        for bar in ax.patches:
            top, bottom = bar.get_y() + bar.get_height(), bar.get_y()
            assert y0 - tol_y <= min(top, bottom) and max(top, bottom) <= y1 + tol_y, where
        drawn = [ln for ln in ax.lines if len(ln.get_xdata()) > 0]
        styles = [_style(ln) for ln in drawn]
        assert len(set(styles)) == len(styles), f"{where}: two lines share one style {styles}"
        assert ax.get_legend() is None, f"{where}: a legend inside the axes"
    assert in_data or any(ax.patches for ax in axes), name
    if any(len(ax.lines) > 1 for ax in axes):
        assert fig.legends, f"{name}: several curves and no legend"
    for leg in fig.legends:
        box = leg.get_window_extent(renderer)
        for ax in fig.axes:
            if ax.get_visible() and ax.axison:
                assert not box.overlaps(ax.get_window_extent(renderer)), (
                    f"{name}: the legend covers axes {ax.get_title()!r}"
                )
    notes = [t.get_text() for t in fig.texts]
    if scale_kind == "full":
        assert not any("Scale:" in t for t in notes), f"{name}: a full run marked as not full"
    else:
        assert any(scale_kind in t for t in notes), f"{name}: does not say it is a {scale_kind} run"


def _by_title(fig, prefix: str):
    found = [ax for ax in fig.axes if ax.get_title().startswith(prefix)]
    assert len(found) == 1, (prefix, [ax.get_title() for ax in fig.axes])
    return found[0]


def _line(ax, label: str):
    found = [ln for ln in ax.lines if ln.get_label().startswith(label)]
    assert len(found) == 1, (label, [ln.get_label() for ln in ax.lines])
    return found[0]


def _shared_y(a, b) -> bool:
    return a.get_shared_y_axes().joined(a, b)


# ---------------------------------------------------------------- per experiment
def test_fig1_shows_the_whole_story(figures, tmp_path):
    s = fig1_summary()
    fig1.plot(s, tmp_path)
    fig = figures["fig1.png"]
    check_figure("fig1.png", fig)
    a = _by_title(fig, "(a) Test accuracy")
    first_step = min(c[0][0] for c in (r["curve"] for r in s["runs"].values()))
    assert a.get_xlim()[0] <= first_step
    for arm in fig1.ARMS:
        assert a.get_ylim()[0] <= s["runs"][arm]["curve"][0][1], "the early accuracies are cut"
    b, c = _by_title(fig, "(b)"), _by_title(fig, "(c)")
    assert _shared_y(b, c)
    for ax in (b, c):
        p15, p50, p85 = (_line(ax, f"{q}th percentile") for q in (15, 50, 85))
        assert p15.get_linestyle() == ":" and p50.get_linestyle() == "-"
        assert p85.get_linestyle() == "--"


def test_a_full_run_carries_no_scale_note(figures, tmp_path):
    fig1.plot(fig1_summary(FULL), tmp_path)
    check_figure("fig1.png", figures["fig1.png"], scale_kind="full")


def test_lenet_train_and_test_accuracy_share_y(figures, tmp_path):
    lenet.plot(lenet_summary(), tmp_path)
    fig = figures["lenet_curves.png"]
    check_figure("lenet_curves.png", fig)
    train, test = _data_axes(fig)
    assert _shared_y(train, test)


def test_ablation_figure(figures, tmp_path):
    ablation.plot(ablation_summary(), tmp_path)
    check_figure("ablation_accuracy.png", figures["ablation_accuracy.png"])


def test_claims_figures(figures, tmp_path):
    claims.plot(claims_summary(), tmp_path)
    assert set(figures) == set(claims.PLOTS)
    for name, fig in figures.items():
        check_figure(name, fig)
    for name in claims.PLOTS[:2]:  # accuracy sweeps: the whole range, a diverged net at 0
        (ax,) = _data_axes(figures[name])
        assert ax.get_ylim()[0] < 0 and ax.get_ylim()[1] > 1
    (bars,) = _data_axes(figures[claims.PLOTS[2]])
    assert bars.get_ylim()[0] == 0  # bars start at 0


def test_small_batch_ema_and_recomputed_share_y(figures, tmp_path):
    small_batch.plot(small_batch_summary(), tmp_path)
    fig = figures["small_batch.png"]
    check_figure("small_batch.png", fig)
    ema, recomputed = _data_axes(fig)
    assert _shared_y(ema, recomputed)


@pytest.mark.parametrize(
    "model, roles, ics_layers",
    [
        (
            "mlp",
            ["sigmoid 1 (hidden layer 1)", "sigmoid 2 (hidden layer 2)", "sigmoid 3 (hidden layer 3)"],
            ["Linear 2", "Linear 3", "Linear 4 (output)"],
        ),
        (
            "convnet",
            ["ReLU 1 (after Conv 1)", "ReLU 2 (after Conv 2)", "ReLU 3 (after Linear 3)",
             "ReLU 4 (after Linear 4)"],
            ["Conv 2", "Linear 3", "Linear 4", "Linear 5 (output)"],
        ),
    ],
)  # fmt: skip
def test_diagnose_names_layers_by_role_and_shares_y_per_layer(
    figures, tmp_path, model, roles, ics_layers
):
    s = diagnose_summary(model)
    diagnose.plot(s, tmp_path)
    assert set(figures) == {"percentiles.png", "ics.png", "landscape.png"}
    for name, fig in figures.items():
        check_figure(name, fig)

    fig = figures["percentiles.png"]
    grid = [ax for ax in fig.axes if ax.axison]
    n = len(roles)
    assert len(grid) == 2 * n  # one row per network, one column per nonlinearity
    for j, role in enumerate(roles):
        top, bottom = grid[j], grid[n + j]
        assert top.get_title().startswith("without BN: ") and role in top.get_title()
        assert bottom.get_title().startswith("with BN: ") and role in bottom.get_title()
        assert _shared_y(top, bottom), role
        assert _line(top, "15th").get_linestyle() == ":"
        assert _line(top, "85th").get_linestyle() == "--"
    raw = {m for arm in diagnose.ARMS for m in s["percentiles"][arm]["layers"]}
    titles = " ".join(ax.get_title() for ax in grid)
    assert not any(f"'{m}'" in titles for m in raw), titles

    (legend,) = figures["ics.png"].legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["without BN", "with BN", *ics_layers]
    for ax in _data_axes(figures["ics.png"]):  # one line per network and layer, named by role
        assert sorted(ln.get_label() for ln in ax.lines) == sorted(ics_layers * 2)


def test_percentile_styles_are_distinct_for_any_percentiles():
    ps = [5, 15, 25, 50, 75, 85, 95]
    styles = [str(plots.percentile_linestyle(p, ps)) for p in ps]
    assert len(set(styles)) == len(ps)
    assert [plots.percentile_linestyle(p) for p in (15, 50, 85)] == [":", "-", "--"]
