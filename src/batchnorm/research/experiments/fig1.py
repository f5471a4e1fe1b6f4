"""Figure 1 of the paper: a sigmoid MLP on MNIST with and without batch normalization.

Section 4.1: 784-100-100-100-10, sigmoid hidden units, small random Gaussian initial weights,
cross-entropy loss, 50,000 steps of 60 examples; the BN network adds BN before each hidden
sigmoid (and drops the linear bias BN's β subsumes). Recorded: test accuracy along training
(Fig. 1a) and the 15th/50th/85th percentiles of the input to one sigmoid of the last hidden
layer over the test set (Figs. 1b, 1c). The paper does not state the optimizer: plain SGD at
learning rate 0.5 for both networks (as a public TensorFlow reproduction did).

Both networks start from the same initial weights and see the same mini-batches. By default
they train in two processes (one thread each); ``workers=1`` trains them one after the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import batchnorm

from ..engine.config import DataConfig, load_tensor_data
from ..engine.data import TensorData
from ..engine.launch import experiment_runner
from ..engine.loop import Arm, every
from ..engine.plots import (
    ARM_COLORS,
    figure_legend,
    percentile_label,
    percentile_linestyle,
    pyplot,
    save_figure,
    scale_note,
    style_handle,
)
from ..engine.report import Claim, Figure, ReportSections, Table, pct
from ..engine.runner import option

ARMS = ("baseline", "bn")
LABELS = {"baseline": "Without BN", "bn": "With BN"}  # in the figure
NAME = "fig1"


_h = option


@dataclass
class Config(DataConfig):
    """Settings of one Figure 1 run (defaults: the paper's setup)."""

    steps: int = field(default=50_000, metadata=_h("training steps (mini-batches)"))
    batch_size: int = field(default=60, metadata=_h("examples per mini-batch"))
    lr: float = field(default=0.5, metadata=_h("SGD learning rate (both networks)"))
    init_std: float = field(default=0.05, metadata=_h("std of the Gaussian initial weights"))
    eval_every: int = field(
        default=500, metadata=_h("steps between test-set evaluations (and checkpoints)")
    )
    unit: int = field(
        default=0, metadata=_h("which sigmoid of the last hidden layer to track (0-99)")
    )
    workers: int = field(
        default=2, metadata=_h("processes: 2 trains both networks at once, 1 in turn")
    )
    threads: int = field(default=1, metadata=_h("torch threads per network"))

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("steps", "batch_size", "eval_every", "threads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.batch_size < 2:
            raise ValueError(
                f"batch_size must be at least 2 (BN needs 2 values per unit), got {self.batch_size}"
            )
        for name in ("lr", "init_std"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if not 0 <= self.unit < 100:
            raise ValueError(
                f"unit must be in 0..99 (the last hidden layer has 100), got {self.unit}"
            )
        if self.workers not in (1, 2):
            raise ValueError(f"workers must be 1 or 2, got {self.workers}")

    @classmethod
    def quick(cls) -> Config:
        """CI-sized: digits, 600 steps, one process."""
        return cls(dataset="digits", steps=600, eval_every=100, workers=1)


# ---------------------------------------------------------------- the network
def build_mlp(use_bn: bool, init_std: float, generator: torch.Generator) -> nn.Sequential:
    """784-100-100-100-10; with ``use_bn``: Linear(bias=False) → BatchNorm1d → Sigmoid per hidden layer.

    Weights ~ N(0, init_std²) drawn in the same order for both variants (same seed → same weights);
    biases start at 0.
    """
    layers: list[nn.Module] = []
    d = 784
    for _ in range(3):
        layers.append(nn.Linear(d, 100, bias=not use_bn))
        if use_bn:
            layers.append(batchnorm.BatchNorm1d(100))
        layers.append(nn.Sigmoid())
        d = 100
    layers.append(nn.Linear(100, 10))
    net = nn.Sequential(*layers)
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, init_std, generator=generator)
                if m.bias is not None:
                    m.bias.zero_()
    return net


@torch.no_grad()
def evaluate(
    net: nn.Sequential, x: torch.Tensor, y: torch.Tensor, unit: int
) -> tuple[float, list[float]]:
    """Test accuracy and the (p15, p50, p85) of the input to sigmoid ``unit`` of the last hidden layer."""
    was_training = net.training
    net.eval()
    last_sigmoid = max(i for i, m in enumerate(net) if isinstance(m, nn.Sigmoid))
    h = x
    pre = None
    for i, m in enumerate(net):
        if i == last_sigmoid:
            pre = h[:, unit]  # (N,) input to the tracked sigmoid
        h = m(h)
    acc = (h.argmax(1) == y).float().mean().item()
    q = torch.quantile(pre.double(), torch.tensor([0.15, 0.5, 0.85], dtype=torch.float64))
    net.train(was_training)
    return acc, [float(v) for v in q]


def load(cfg: Config) -> TensorData:
    data = load_tensor_data(cfg).flat()
    if data.n_train < cfg.batch_size:
        raise ValueError(
            f"batch_size {cfg.batch_size} exceeds the {data.n_train} training examples of {data.name}"
        )
    return data


def arms(cfg: Config, data: TensorData) -> list[Arm]:
    """Both networks: plain SGD, the same initial weights and mini-batches, evaluated (test
    accuracy and the tracked sigmoid input's percentiles) from step 0 every ``eval_every``."""

    def arm(name: str) -> Arm:
        def build() -> nn.Sequential:
            return build_mlp(name == "bn", cfg.init_std, torch.Generator().manual_seed(cfg.seed))

        def measure(net: nn.Module, step: int) -> dict:
            acc, (p15, p50, p85) = evaluate(net, data.test_x, data.test_y, cfg.unit)
            return {"test_acc": acc, "p15": p15, "p50": p50, "p85": p85}

        return Arm(
            name, build, cfg.steps, cfg.batch_size, lambda s: cfg.lr, momentum=0.0,
            evals=every(cfg.eval_every, cfg.steps, start=True), measure=measure, order="fig1",
        )  # fmt: skip

    return [arm(a) for a in ARMS]


def summarize(cfg: Config, data: TensorData, results: dict[str, dict]) -> dict:
    """Per network: the accuracy curve and the percentiles at each evaluation."""
    runs, percentiles = {}, {}
    for arm in ARMS:
        recs = results[arm]["records"]
        runs[arm] = {
            "curve": [[r["step"], r["test_acc"]] for r in recs],
            "final_test_accuracy": recs[-1]["test_acc"],
            "wall_seconds": round(results[arm]["wall_seconds"], 3),
        }
        percentiles[arm] = {"steps": [r["step"] for r in recs]}
        percentiles[arm].update({k: [r[k] for r in recs] for k in ("p15", "p50", "p85")})
    wall = max(r["wall_seconds"] for r in results.values())
    return {"steps": cfg.steps, "runs": runs, "percentiles": percentiles, "wall_seconds": wall}


run = experiment_runner(__name__)


# ---------------------------------------------------------------- plots and report
def plot(summary: dict, out: Path) -> Path:
    """Figure 1 as in the paper: (a) test accuracy of both networks from the first evaluation
    (step 0) over the whole range, with a detail of the later steps where the curves are close;
    (b) without and (c) with BN the 15th/50th/85th percentiles of the tracked sigmoid's input,
    on one y-axis."""
    plt = pyplot()

    fig, axd = plt.subplot_mosaic(
        [["a", "detail"], ["b", "c"]], figsize=(10, 7.2), layout="constrained"
    )
    axd["c"].sharey(axd["b"])
    cfg = summary.get("config", {})
    per_step = f" (mini-batches of {cfg['batch_size']})" if "batch_size" in cfg else ""
    first, last = summary["runs"][ARMS[0]]["curve"][0][0], summary["steps"]
    # the detail: from the first evaluation at or after 20% of training (the paper's Fig. 1a
    # shows steps 10k-50k of 50k), with every evaluation of that range in view
    later = [s for s, _ in summary["runs"][ARMS[0]]["curve"] if s >= 0.2 * last]
    start = later[0] if len(later) >= 2 else first
    for arm in ARMS:
        c = summary["runs"][arm]["curve"]
        kw = {"color": ARM_COLORS[arm], "label": LABELS[arm], "lw": 1.6}
        axd["a"].plot([s for s, _ in c], [a for _, a in c], **kw)
        tail = [(s, a) for s, a in c if s >= start]
        axd["detail"].plot([s for s, _ in tail], [a for _, a in tail], marker=".", **kw)
    axd["a"].set_ylim(0.0, 1.0)  # the whole story: from chance level at step 0 up
    axd["a"].set(
        title=f"(a) Test accuracy ({summary['dataset']}), from step {first:,}",
        xlabel=f"training step{per_step}", ylabel="test accuracy",
    )  # fmt: skip
    axd["detail"].set(
        title=f"(a) detail: steps {start:,} to {last:,}",
        xlabel=f"training step{per_step}", ylabel="test accuracy",
    )  # fmt: skip
    axd["detail"].margins(x=0.02, y=0.08)
    unit = f"sigmoid {cfg['unit']}" if "unit" in cfg else "one sigmoid"
    for tag, arm in (("b", "baseline"), ("c", "bn")):
        ax = axd[tag]
        p = summary["percentiles"][arm]
        for k, q in (("p15", 15), ("p50", 50), ("p85", 85)):
            ax.plot(
                p["steps"], p[k], percentile_linestyle(q), color=ARM_COLORS[arm], lw=1.6,
                label=percentile_label(q),
            )  # fmt: skip
        ax.set(
            title=f"({tag}) {LABELS[arm]}: input to one sigmoid, last hidden layer",
            xlabel=f"training step{per_step}",
            ylabel=f"input to {unit} ({'BN(Wu)' if arm == 'bn' else 'Wu + b'})",
        )
        ax.tick_params(labelleft=True)
    for ax in axd.values():
        ax.grid(alpha=0.3)
        ax.title.set_fontsize(10)
    figure_legend(
        fig,
        [style_handle(LABELS[a], ARM_COLORS[a], lw=1.6) for a in ARMS]
        + [style_handle(percentile_label(q), ls=percentile_linestyle(q)) for q in (15, 50, 85)],
    )
    fig.suptitle("Figure 1: sigmoid MLP 784-100-100-100-10 with and without batch normalization")
    scale_note(fig, summary)
    return save_figure(fig, out / "fig1.png")


def acc_at(summary: dict, arm: str, step: int) -> float | None:
    """Test accuracy at ``step`` (the last evaluation at or before it), None before the first."""
    best = None
    for s, a in summary["runs"][arm]["curve"]:
        if s <= step:
            best = a
    return best


def steps_to_reach(summary: dict, arm: str, target: float) -> int | None:
    for s, a in summary["runs"][arm]["curve"]:
        if a >= target:
            return s
    return None


def median_shift(summary: dict, arm: str) -> float:
    """How far the tracked sigmoid input's median moved over training: |p50(end) − p50(start)|."""
    p = summary["percentiles"][arm]["p50"]
    return abs(p[-1] - p[0])


def spread(summary: dict, arm: str, frac: float) -> float:
    """p85 − p15 at the first evaluation at or after ``frac`` of training."""
    p = summary["percentiles"][arm]
    i = next(i for i, s in enumerate(p["steps"]) if s >= frac * summary["steps"])
    return p["p85"][i] - p["p15"][i]


def describe(summary: dict) -> str:
    """A few lines for the terminal."""
    r = summary["runs"]
    lines = [f"fig1 on {summary['dataset']}, {summary['steps']} steps:"]
    for arm in ARMS:
        lines.append(
            f"  {arm:8s} final test accuracy {r[arm]['final_test_accuracy']:.4f} "
            f"({r[arm]['wall_seconds']:.0f} s wall)"
        )
    return "\n".join(lines)


def report(summary: dict, run_dir: Path) -> ReportSections:
    """The fig1 part of report.html: the figure, paper-vs-ours claims, accuracies at milestones."""
    r = summary["runs"]
    base, bn = r["baseline"]["final_test_accuracy"], r["bn"]["final_test_accuracy"]
    reach = steps_to_reach(summary, "bn", base)
    d_base, d_bn = median_shift(summary, "baseline"), median_shift(summary, "bn")
    sp = {arm: (spread(summary, arm, 0.1), spread(summary, arm, 1.0)) for arm in ARMS}
    data_note = (
        "" if summary["dataset"] == "mnist" else f" (measured on {summary['dataset']}, not MNIST)"
    )
    claims = [
        Claim(
            "BN network reaches higher test accuracy",
            "higher (Fig. 1a); a public reproduction: 98.0% vs 97.69%",
            f"{pct(bn)} with BN vs {pct(base)} without{data_note}",
            "consistent" if bn > base else "not reproduced",
        ),
        Claim(
            "BN network gets there sooner",
            "BN curve above the baseline throughout training (Fig. 1a)",
            f"BN reaches the baseline's final accuracy at step {reach}"
            if reach is not None
            else "BN never reaches the baseline's final accuracy",
            "consistent" if reach is not None and reach < summary["steps"] else "not reproduced",
        ),
        Claim(
            "Input distribution of a sigmoid is stable with BN, drifts without",
            "percentiles drift in the plain network, stay put with BN (Figs. 1b, 1c)",
            f"median moved {d_bn:.2f} with BN vs {d_base:.2f} without over training; 15–85 "
            f"spread from 10% to the end of training: {sp['bn'][0]:.2f} → {sp['bn'][1]:.2f} with "
            f"BN, {sp['baseline'][0]:.2f} → {sp['baseline'][1]:.2f} without",
            ("consistent for the median" if d_bn < d_base else "not reproduced")
            + (
                "; the spread grows more with BN"
                if sp["bn"][1] - sp["bn"][0] > sp["baseline"][1] - sp["baseline"][0]
                else ""
            ),
        ),
    ]
    milestones = [m for m in (5_000, 10_000, 20_000, 50_000) if m <= summary["steps"]] or [
        summary["steps"]
    ]
    rows = [
        [f"{m:,}", pct(acc_at(summary, "baseline", m)), pct(acc_at(summary, "bn", m))]
        for m in milestones
    ]
    rows.append(
        ["wall time (s)", f"{r['baseline']['wall_seconds']:.0f}", f"{r['bn']['wall_seconds']:.0f}"]
    )
    return ReportSections(
        title=f"Figure 1: sigmoid MLP with and without batch normalization ({summary['dataset']})",
        intro=(
            "784-100-100-100-10 network with sigmoid hidden units, Gaussian initial weights, "
            "cross-entropy, mini-batches of 60, plain SGD with the same learning rate for both "
            "networks; BN is inserted before each hidden sigmoid. Both networks start from the "
            "same weights and see the same mini-batches."
        ),
        claims=claims,
        figures=[
            Figure(
                "fig1.png",
                "(a) test accuracy vs training step; (b, c) 15th, 50th and 85th "
                "percentiles of the input to one sigmoid of the last hidden layer, over the test set",
            )
        ],
        tables=[Table("Test accuracy at milestones", ["step", "without BN", "with BN"], rows)],
        notes=[f"Data: {summary['dataset']} from {summary.get('data_source', '?')}."],
    )
