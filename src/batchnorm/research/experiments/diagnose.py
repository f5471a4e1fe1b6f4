"""``batchnorm reproduce diagnose``: is it internal covariate shift, or a smoother loss landscape?

Trains two networks from the same initial weights on the same mini-batches — the fig1 sigmoid
MLP (784-100-100-100-10) or a small LeNet-style convnet, each without and with BN — or continues
the two networks of a finished ``fig1`` run (``--from-run DIR``). At ``measure_points`` evenly
spaced steps it measures, on the same fixed training batches for both networks:

- internal covariate shift per Linear/Conv layer (Santurkar et al. 2018): ℓ2 distance and cosine
  between the layer's gradient before and after the earlier layers take their SGD step;
- the loss landscape along −∇L for step sizes ``lr × step_multipliers``: loss variation, gradient
  change and effective β-smoothness;
- BN health of the BN network on test images (batch vs running statistics, low-variance
  channels, γ collapse);

and, throughout training, percentiles of every sigmoid/ReLU input (Figure 1(b, c)). Writes
``summary.json``, ``metrics.jsonl``, ``percentiles.png``, ``ics.png``, ``landscape.png`` and
``report.html``; the report says in plain words which explanation the numbers support.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...diagnostics.health import bn_health, bn_layers
from ...diagnostics.ics import default_ics_layers, internal_covariate_shift
from ...diagnostics.landscape import gradient_landscape
from ...diagnostics.tracker import ActivationTracker
from ..engine.config import DataConfig, load_tensor_data
from ..engine.data import TensorData
from ..engine.launch import run_experiment
from ..engine.loop import Arm
from ..engine.plots import (
    ARM_COLORS,
    figure_legend,
    plot_percentile_runs,
    pyplot,
    save_figure,
    scale_note,
    style_handle,
)
from ..engine.report import Claim, Figure, ReportSections, Table
from ..engine.runner import option, read_checkpoint, read_json
from ..engine.sampler import step_seed

NAME = "diagnose"
ARMS = ("baseline", "bn")
LABELS = {"baseline": "without BN", "bn": "with BN"}
DEFAULT_LR = {"mlp": 0.5, "convnet": 0.05}


_h = option


@dataclass
class Config(DataConfig):
    """Settings of one diagnose run."""

    model: str = field(
        default="mlp",
        metadata=_h(
            "mlp (the fig1 sigmoid MLP) or convnet (LeNet with ReLU)", choices=("mlp", "convnet")
        ),
    )
    from_run: str | None = field(
        default=None,
        metadata=_h(
            "a finished fig1 run directory: continue its two networks instead of training from scratch",
            metavar="DIR",
        ),
    )
    steps: int = field(default=3000, metadata=_h("training steps per network (0: measure only)"))
    batch_size: int = field(default=60, metadata=_h("examples per mini-batch"))
    lr: float | None = field(
        default=None,
        metadata=_h("SGD learning rate for both networks (default: 0.5 for mlp, 0.05 for convnet)"),
    )
    init_std: float = field(default=0.05, metadata=_h("std of the mlp's Gaussian initial weights"))
    measure_points: int = field(
        default=6, metadata=_h("measurements, evenly spaced from the first to the last step")
    )
    measure_batches: int = field(
        default=3, metadata=_h("training batches each measurement averages over")
    )
    step_multipliers: str = field(
        default="0.25,0.5,1,2,4",
        metadata=_h("landscape step sizes as multiples of lr, comma-separated", metavar="LIST"),
    )
    track_every: int = field(default=10, metadata=_h("steps between activation-percentile records"))
    threads: int = field(default=1, metadata=_h("torch threads"))

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("batch_size", "measure_points", "measure_batches", "track_every", "threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {self.steps!r}")
        if self.batch_size < 2:
            raise ValueError(
                f"batch_size must be at least 2 (BN needs 2 values per unit), got {self.batch_size}"
            )
        if self.model not in DEFAULT_LR:
            raise ValueError(f"model must be mlp or convnet, got {self.model!r}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (math.isfinite(self.init_std) and self.init_std > 0):
            raise ValueError(f"init_std must be a positive number, got {self.init_std!r}")
        self.multipliers()  # validates the list
        if self.from_run is not None and self.model != "mlp":
            raise ValueError(
                "--from-run loads a fig1 run, whose networks are the mlp; drop --model convnet"
            )

    def multipliers(self) -> list[float]:
        try:
            vals = [float(v) for v in str(self.step_multipliers).split(",") if v.strip()]
        except ValueError:
            raise ValueError(
                f"step_multipliers must be comma-separated numbers like 0.5,1,2, got {self.step_multipliers!r}"
            ) from None
        if not vals or any(not (math.isfinite(v) and v > 0) for v in vals):
            raise ValueError(
                f"step_multipliers must be positive numbers, got {self.step_multipliers!r}"
            )
        return vals

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.model]

    @classmethod
    def quick(cls) -> Config:
        """CI-sized: digits, 60 steps, 2 measurements of 1 batch."""
        return cls(
            dataset="digits",
            steps=60,
            measure_points=2,
            measure_batches=1,
            step_multipliers="0.5,2",
            track_every=5,
        )


# ---------------------------------------------------------------- networks and data
def _fig1_run(cfg: Config) -> tuple[Path, dict] | None:
    """The fig1 run directory ``--from-run`` names and its saved config, checked."""
    if cfg.from_run is None:
        return None
    run_dir = Path(cfg.from_run)
    if not (run_dir / "config.json").exists():
        raise FileNotFoundError(f"{run_dir / 'config.json'} is missing: not a fig1 run directory")
    saved = read_json(run_dir / "config.json")
    if saved.get("experiment") != "fig1":
        raise ValueError(
            f"{run_dir} holds a {saved.get('experiment')!r} run; --from-run needs a fig1 run"
        )
    for arm in ARMS:
        if not (run_dir / f"checkpoint-{arm}.pt").exists():
            raise FileNotFoundError(
                f"{run_dir / f'checkpoint-{arm}.pt'} is missing; run "
                f"`batchnorm reproduce fig1 --out {run_dir}` first"
            )
    return run_dir, saved.get("config", {})


def build_network(cfg: Config, arm: str) -> nn.Module:
    """The ``arm`` network; both arms start from the same weights (the BN net has no bias
    before BN). With ``--from-run``: the fig1 run's network at its checkpoint."""
    from . import fig1
    from .models import LeNet

    run = _fig1_run(cfg)
    if run is not None or cfg.model == "mlp":
        net = fig1.build_mlp(arm == "bn", cfg.init_std, torch.Generator().manual_seed(cfg.seed))
        if run is not None:
            net.load_state_dict(read_checkpoint(run[0] / f"checkpoint-{arm}.pt")["model"])
        return net
    torch.manual_seed(step_seed(cfg.seed, "init/lenet"))
    base, net = LeNet(bn=False), LeNet(bn=True)
    if arm == "baseline":
        return base
    base_w = [m for m in base.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    bn_w = [m for m in net.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    with torch.no_grad():
        for a, b in zip(base_w, bn_w, strict=True):
            b.weight.copy_(a.weight)
            if b.bias is not None:
                b.bias.copy_(a.bias)
    return net


def start_step(cfg: Config) -> int:
    """The step the networks start at: 0, or the fig1 run's (earlier) checkpoint step."""
    run = _fig1_run(cfg)
    if run is None:
        return 0
    return min(int(read_checkpoint(run[0] / f"checkpoint-{a}.pt")["step"]) for a in ARMS)


def _measure_steps(start: int, steps: int, points: int) -> list[int]:
    """``points`` steps evenly spaced over [start, start + steps] (just the end for one point)."""
    if steps == 0 or points == 1:
        return [start + steps]
    return sorted({start + round(i * steps / (points - 1)) for i in range(points)})


# ---------------------------------------------------------------- measurements
def measure(
    net: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    lr: float,
    etas: list[float],
    test_x: torch.Tensor,
    test_y: torch.Tensor,
) -> dict[str, Any]:
    """ICS, landscape (each averaged over ``batches``), test accuracy and BN health at this point."""
    layers = default_ics_layers(net)
    ics = [internal_covariate_shift(net, b, lr, layers=layers) for b in batches]
    land = [gradient_landscape(net, b, etas) for b in batches]

    def avg(rows: list[dict], key: str) -> Any:
        vals = [r[key] for r in rows]
        if isinstance(vals[0], list):
            return [sum(col) / len(col) for col in zip(*vals, strict=True)]
        return sum(vals) / len(vals)

    net.eval()
    with torch.no_grad():
        acc = (net(test_x).argmax(1) == test_y).float().mean().item()
    net.train()
    health = bn_health(net, test_x[:500]) if bn_layers(net) else None
    return {
        "test_accuracy": acc,
        "ics": {
            "layers": layers,
            **{k: avg(ics, k) for k in ("l2", "cosine", "relative", "grad_norm")},
        },
        "landscape": {
            "step_sizes": etas,
            **{
                k: avg(land, k)
                for k in (
                    "loss",
                    "grad_norm",
                    "losses",
                    "loss_range",
                    "grad_change",
                    "beta",
                    "effective_beta",
                )
            },
        },
        "health": health,
    }


# ---------------------------------------------------------------- the experiment
def load(cfg: Config) -> TensorData:
    run = _fig1_run(cfg)
    if run is not None and cfg.dataset == "auto":  # the fig1 run's data unless given
        cfg = dataclasses.replace(cfg, dataset=run[1].get("dataset", "auto"))
    data = load_tensor_data(cfg)
    if data.n_train < cfg.batch_size:
        raise ValueError(
            f"batch_size {cfg.batch_size} exceeds the {data.n_train} training examples"
        )
    return data.flat() if cfg.model == "mlp" else data


def arms(cfg: Config, data: TensorData) -> list[Arm]:
    """Both networks: plain SGD on the same mini-batches; at ``measure_points`` steps, ICS,
    landscape, test accuracy and BN health on the same fixed training batches; percentiles of
    every nonlinearity's input recorded during training."""
    lr = cfg.learning_rate()
    etas = [lr * m for m in cfg.multipliers()]
    g = torch.Generator().manual_seed(step_seed(cfg.seed, "measure"))
    probe = [
        torch.randperm(data.n_train, generator=g)[: cfg.batch_size]
        for _ in range(cfg.measure_batches)
    ]
    batches = [(data.train_x[i], data.train_y[i]) for i in probe]
    start = start_step(cfg)

    def measure_at(net: nn.Module, step: int) -> dict:
        return measure(net, batches, lr, etas, data.test_x, data.test_y)

    def track(net: nn.Module) -> ActivationTracker:
        tracker = ActivationTracker(net, every=cfg.track_every, units=1, seed=cfg.seed)
        tracker.step = start
        return tracker

    return [
        Arm(
            arm,
            lambda arm=arm: build_network(cfg, arm),
            cfg.steps,
            cfg.batch_size,
            lambda s: lr,
            momentum=0.0,
            evals=_measure_steps(0, cfg.steps, cfg.measure_points),
            measure=measure_at,
            track=track,
            order="diagnose",
            init="diagnose",
            meta={"start_step": start},  # summarize reads it here, not from the fig1 files again
        )  # fmt: skip
        for arm in ARMS
    ]


def run(
    cfg: Config, out: str | Path, *, resume: bool = False, overwrite: bool = False,
    quiet: bool = False,
) -> dict:  # fmt: skip
    """Train (or continue) both networks, measure, write the run directory; the summary."""
    run = _fig1_run(cfg) if isinstance(cfg, Config) else None
    if run is not None and cfg.lr is None and run[1].get("lr"):  # the fig1 run's learning rate
        cfg = dataclasses.replace(cfg, lr=float(run[1]["lr"]))
    return run_experiment(
        sys.modules[__name__], cfg, out, resume=resume, overwrite=overwrite, quiet=quiet
    )


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(cfg: Config, data: TensorData, results: dict[str, dict]) -> dict:
    """Per-arm measurements (steps counted from the start), aggregates, the plain statement."""
    start = results[ARMS[0]]["start_step"]
    agg: dict[str, dict[str, float]] = {}
    points = {}
    for arm, res in results.items():
        pts = [{**r, "step": start + r["step"]} for r in res["records"]]
        points[arm] = pts
        after = [p for p in pts if p["step"] > start] or pts  # after training starts
        agg[arm] = {
            "ics_l2": _mean([_mean(p["ics"]["l2"][1:]) for p in after]),  # layer 0: none before
            "ics_relative": _mean([_mean(p["ics"]["relative"][1:]) for p in after]),
            "ics_cosine": _mean([_mean(p["ics"]["cosine"][1:]) for p in after]),
            "loss_range": _mean([p["landscape"]["loss_range"] for p in after]),
            "grad_change": _mean([p["landscape"]["grad_change"][-1] for p in after]),
            "effective_beta": _mean([p["landscape"]["effective_beta"] for p in after]),
            "final_test_accuracy": pts[-1]["test_accuracy"],
        }
    return {
        "model": cfg.model,
        "start_step": start,
        "steps": cfg.steps,
        "lr": cfg.learning_rate(),
        "step_sizes": [cfg.learning_rate() * m for m in cfg.multipliers()],
        "measure_steps": [p["step"] for p in points[ARMS[0]]],
        "arms": {arm: {"points": pts} for arm, pts in points.items()},
        "percentiles": {arm: res["track"] for arm, res in results.items()},
        "aggregate": agg,
        "statement": statement(agg),
        "wall_seconds": sum(r["wall_seconds"] for r in results.values()),
    }


def statement(agg: dict[str, dict[str, float]]) -> str:
    """What the measurements say about ICS vs smoothness, in plain words."""
    b, n = agg["baseline"], agg["bn"]

    def ratio(key: str) -> float:
        return n[key] / b[key] if b[key] > 0 else float("inf")

    ics_r, rel_r, beta_r, var_r = (
        ratio("ics_l2"),
        ratio("ics_relative"),
        ratio("effective_beta"),
        ratio("loss_range"),
    )
    ics_says = (
        "BN reduced internal covariate shift"
        if ics_r < 1 and rel_r < 1 and n["ics_cosine"] >= b["ics_cosine"]
        else "BN did not reduce internal covariate shift"
    )
    smooth_says = (
        "the loss landscape along the gradient was smoother with BN"
        if beta_r < 1 and var_r < 1
        else "the loss landscape along the gradient was not smoother with BN on both counts"
    )
    return (
        f"{ics_says} as Santurkar et al. measure it: the ℓ2 change of a layer's gradient when the "
        f"layers before it are updated was {ics_r:.2g}× the plain network's ({rel_r:.2g}× relative to "
        f"the gradient's size; cosine {n['ics_cosine']:.3f} with BN vs {b['ics_cosine']:.3f} without). "
        f"Meanwhile {smooth_says}: effective β-smoothness {n['effective_beta']:.3g} vs "
        f"{b['effective_beta']:.3g} ({beta_r:.2g}×), loss variation along −∇L {n['loss_range']:.3g} vs "
        f"{b['loss_range']:.3g} ({var_r:.2g}×)."
    )


# ---------------------------------------------------------------- plots and report
def _module_types(summary: dict, arm: str) -> dict[str, str]:
    """``{module name: class name}`` of the ``arm`` network (rebuilt untrained, for its
    structure only); empty when the summary's model is not one this module builds."""
    from . import fig1
    from .models import LeNet

    model = summary.get("model", "mlp")
    if model == "mlp":
        net: nn.Module = fig1.build_mlp(arm == "bn", 0.05, torch.Generator().manual_seed(0))
    elif model == "convnet":
        net = LeNet(bn=arm == "bn")
    else:
        return {}
    return {name: type(m).__name__ for name, m in net.named_modules()}


def layer_names(summary: dict, arm: str) -> tuple[dict[str, str], dict[str, str]]:
    """Display names by role, the same in both networks (the module names differ: the BN net
    has a BN module before each nonlinearity): ``(nonlinearities, weight layers)``.

    Weight layers (Linear/Conv, those ICS is measured on) are numbered from the input,
    "Linear 2", "Conv 1", the last one marked "(output)"; nonlinearities by their order among
    the nonlinearities, with the weight layer they follow: "sigmoid 1 (hidden layer 1)" in the
    MLP, "ReLU 3 (after Linear 3)" in the convnet."""
    types = _module_types(summary, arm)
    order = list(types)
    weights = summary["arms"][arm]["points"][0]["ics"]["layers"]

    def kind(name: str) -> str:
        t = types.get(name, "")
        return "Conv" if t.startswith("Conv") else "Linear" if t == "Linear" else "layer"

    wnames = {
        n: f"{kind(n)} {i}" + (" (output)" if i == len(weights) and i > 1 else "")
        for i, n in enumerate(weights, start=1)
    }
    acts = list(summary["percentiles"][arm]["layers"])
    if all(n in types for n in acts):
        acts.sort(key=order.index)
    mlp = bool(types) and all(kind(n) == "Linear" for n in weights)
    anames = {}
    for i, n in enumerate(acts, start=1):
        module = summary["percentiles"][arm]["layers"][n].get("module", "nonlinearity")
        label = f"{module.lower() if module == 'Sigmoid' else module} {i}"
        before = [
            w for w in weights if w in types and n in types and order.index(w) < order.index(n)
        ]
        if mlp:
            label += f" (hidden layer {i})"
        elif before:
            label += f" (after {wnames[before[-1]].removesuffix(' (output)')})"
        anames[n] = label
    return anames, wnames


def plot(summary: dict, out: Path) -> list[Path]:
    """percentiles.png (Figure 1(b, c) for every tracked layer, the two networks one above the
    other, one y-axis per layer), ics.png, landscape.png."""
    plt = pyplot()

    names = {arm: layer_names(summary, arm) for arm in ARMS}
    pct = summary["percentiles"]
    ordered = {arm: sorted(pct[arm]["layers"], key=list(names[arm][0]).index) for arm in ARMS}
    cols = max(len(v) for v in ordered.values())
    panels: dict[str, dict | None] = {}
    colors = {}
    for arm in ARMS:
        for j in range(cols):
            if j >= len(ordered[arm]):
                panels[f"{arm} {j}"] = None
                continue
            name = ordered[arm][j]
            rec = pct[arm]["layers"][name]
            unit = f", unit {rec['units'][0]}" if len(rec.get("units") or []) == 1 else ""
            title = f"{LABELS[arm]}: {names[arm][0][name]}{unit}"
            panels[title], colors[title] = rec, ARM_COLORS[arm]
    paths = [
        plot_percentile_runs(
            panels, pct[ARMS[0]]["percentiles"], out / "percentiles.png", cols=cols,
            colors=colors, sharey="col", ylabel="input to the nonlinearity",
            title="Percentiles of one unit's input to each nonlinearity over training "
            "(cf. Figure 1(b, c)); top: without BN, bottom: with BN",
            summary=summary,
        )
    ]  # fmt: skip
    steps = summary["measure_steps"]
    xlabel = "training step"

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), layout="constrained")
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1, 1, 1)), "v")]
    layer_handles: dict[str, Any] = {}
    for arm in ARMS:
        pts = summary["arms"][arm]["points"]
        layers = pts[0]["ics"]["layers"]
        for j, name in enumerate(layers[1:], start=1):  # the first layer has no layers before it
            ls, marker = styles[(j - 1) % len(styles)]
            label = names[arm][1][name]
            kw = {"ls": ls, "marker": marker, "ms": 4, "color": ARM_COLORS[arm]}
            axes[0].plot(steps, [p["ics"]["l2"][j] for p in pts], label=label, **kw)
            axes[1].plot(steps, [p["ics"]["cosine"][j] for p in pts], label=label, **kw)
            layer_handles.setdefault(label, style_handle(label, ls=ls, marker=marker, ms=4))
    axes[0].set(
        title="(a) ICS: ‖G − G′‖₂, change of a layer's gradient", xlabel=xlabel,
        ylabel="‖G − G′‖₂ (log scale)", yscale="log",
    )  # fmt: skip
    axes[1].set(title="(b) ICS: cos(G, G′) (1 = no shift)", xlabel=xlabel, ylabel="cos(G, G′)")
    for ax in axes:
        ax.title.set_fontsize(10)
        ax.grid(alpha=0.3)
    arm_handles = [style_handle(LABELS[a], ARM_COLORS[a], lw=2) for a in ARMS]
    figure_legend(fig, arm_handles + list(layer_handles.values()), ncols=5)
    fig.suptitle(
        "Internal covariate shift per layer (Santurkar et al. 2018): G, G′ = the layer's "
        "gradient before, after the earlier layers' SGD step",
        fontsize=10,
    )
    scale_note(fig, summary)
    paths.append(save_figure(fig, out / "ics.png"))

    fig, grid = plt.subplots(2, 2, figsize=(10, 7.2), layout="constrained")
    axes = list(grid.flat)
    for arm in ARMS:
        pts = summary["arms"][arm]["points"]
        kw = {"color": ARM_COLORS[arm], "label": LABELS[arm], "marker": "o", "ms": 3}
        axes[0].plot(steps, [p["landscape"]["loss_range"] for p in pts], **kw)
        axes[1].plot(steps, [p["landscape"]["grad_change"][-1] for p in pts], **kw)
        axes[2].plot(steps, [p["landscape"]["effective_beta"] for p in pts], **kw)
        axes[3].plot(steps, [p["test_accuracy"] for p in pts], **kw)
    eta = summary["step_sizes"][-1]
    axes[0].set(
        title="(a) Loss variation along −∇L", ylabel="max − min loss (log scale)", yscale="log"
    )
    axes[1].set(
        title=f"(b) Gradient change at η = {eta:g}", ylabel="‖∇L(x − ηg) − ∇L(x)‖ (log scale)",
        yscale="log",
    )  # fmt: skip
    axes[2].set(title="(c) Effective β-smoothness", ylabel="effective β (log scale)", yscale="log")
    axes[3].set(title="(d) Test accuracy", ylabel="test accuracy", ylim=(0, 1))
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.title.set_fontsize(10)
        ax.grid(alpha=0.3)
    figure_legend(fig, axes[0].get_lines(), ncols=2)
    fig.suptitle(
        "Loss landscape along −∇L, step sizes η = "
        + ", ".join(f"{e:g}" for e in summary["step_sizes"])
        + f" (lr {summary['lr']:g} × multipliers)",
        fontsize=11,
    )
    scale_note(fig, summary)
    paths.append(save_figure(fig, out / "landscape.png"))
    return paths


def describe(summary: dict) -> str:
    return summary["statement"]


def _g(v: float | None) -> str:
    return "—" if v is None else f"{v:.3g}"


def report(summary: dict, run_dir: Path) -> ReportSections:
    """The diagnose part of report.html."""
    a = summary["aggregate"]
    b, n = a["baseline"], a["bn"]
    ics_ok = n["ics_l2"] < b["ics_l2"]
    smooth_ok = n["effective_beta"] < b["effective_beta"] and n["loss_range"] < b["loss_range"]
    claims = [
        Claim(
            "BN reduces internal covariate shift (the paper's explanation)",
            "the motivation of BN; not measured in the paper. Santurkar et al.: not reduced",
            f"ICS ℓ2 {_g(n['ics_l2'])} with BN vs {_g(b['ics_l2'])} without; cosine "
            f"{n['ics_cosine']:.3f} vs {b['ics_cosine']:.3f}",
            "reduced here" if ics_ok else "not reduced here (as Santurkar et al. found)",
        ),
        Claim(
            "BN smooths the loss landscape (Santurkar et al.)",
            "loss variation and effective β-smoothness much lower with BN",
            f"effective β {_g(n['effective_beta'])} vs {_g(b['effective_beta'])}; loss variation "
            f"{_g(n['loss_range'])} vs {_g(b['loss_range'])}",
            "consistent" if smooth_ok else "not reproduced here",
        ),
        Claim(
            "BN networks reach higher accuracy",
            "Figure 1(a)",
            f"{100 * n['final_test_accuracy']:.2f}% vs {100 * b['final_test_accuracy']:.2f}%",
            "consistent"
            if n["final_test_accuracy"] > b["final_test_accuracy"]
            else "not reproduced",
        ),
    ]
    rows = []
    for arm in ARMS:
        for p in summary["arms"][arm]["points"]:
            rows.append(
                [
                    LABELS[arm],
                    p["step"],
                    f"{100 * p['test_accuracy']:.2f}%",
                    ", ".join(_g(v) for v in p["ics"]["l2"]),
                    ", ".join(f"{v:.3f}" for v in p["ics"]["cosine"]),
                    _g(p["landscape"]["loss_range"]),
                    _g(p["landscape"]["effective_beta"]),
                ]
            )
    tables = [
        Table(
            "Measurements (each averaged over the measurement batches)",
            [
                "network",
                "step",
                "test acc",
                "ICS ℓ2 per layer",
                "ICS cosine per layer",
                "loss variation",
                "effective β",
            ],
            rows,
        )
    ]
    health = summary["arms"]["bn"]["points"][-1]["health"] or []
    if health:
        tables.append(
            Table(
                f"BN health at step {summary['measure_steps'][-1]} (test images, eval mode)",
                [
                    "layer",
                    "channels",
                    "mean shift (mean / max, running σ)",
                    "var ratio (min / max)",
                    "running var < 1e-4",
                    "|γ| < 1e-2",
                    "mean |γ|",
                ],
                [
                    [
                        r["layer"],
                        r["channels"],
                        f"{_g(r['mean_shift_mean'])} / {_g(r['mean_shift_max'])}",
                        f"{_g(r['var_ratio_min'])} / {_g(r['var_ratio_max'])}",
                        r["low_var_channels"],
                        r["gamma_collapsed"],
                        _g(r["gamma_abs_mean"]),
                    ]
                    for r in health
                ],
            )
        )
    model = (
        "sigmoid MLP 784-100-100-100-10 (fig1)"
        if summary["model"] == "mlp"
        else "LeNet convnet (ReLU)"
    )
    return ReportSections(
        title=f"Diagnose: internal covariate shift vs loss smoothness — {model}, {summary['dataset']}",
        intro=summary["statement"],
        claims=claims,
        figures=[
            Figure(
                "ics.png",
                "Internal covariate shift (Santurkar et al. 2018) per layer: ℓ2 distance and "
                "cosine between a layer's gradient before and after the earlier layers' SGD step "
                "on the same batch. The first layer has no earlier layers and is left out.",
            ),
            Figure(
                "landscape.png",
                "Along −∇L with step sizes lr × multipliers: loss variation (max − min), "
                "gradient change at the largest step, effective β-smoothness; and test accuracy.",
            ),
            Figure(
                "percentiles.png",
                "15th, 50th and 85th percentiles of one (random, fixed) unit's input to "
                "each nonlinearity over training mini-batches, like the paper's Figure 1(b, c).",
            ),
        ],
        tables=tables,
        notes=[
            f"Both networks: SGD lr {summary['lr']:g}, same initial weights, same mini-batches; "
            f"measurements on the same fixed training batches; step sizes {summary['step_sizes']}.",
            "ICS and landscape aggregates average every measurement after the start, over layers 2..k.",
            f"Data: {summary['dataset']} from {summary.get('data_source', '?')}.",
        ],
    )
