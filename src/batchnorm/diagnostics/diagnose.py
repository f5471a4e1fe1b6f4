"""``batchnorm diagnose``: is it internal covariate shift, or a smoother loss landscape?

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import best_available, load_dataset
from ..experiments.report import Claim, Figure, ReportSections, Table, pyplot, save_figure
from ..experiments.runner import (
    MetricsLog,
    Stopwatch,
    atomic_write_json,
    option,
    prepare_run_dir,
    progress,
    read_checkpoint,
    read_json,
)
from .health import bn_health, bn_layers
from .ics import default_ics_layers, internal_covariate_shift
from .landscape import gradient_landscape
from .tracker import ActivationTracker, plot_percentile_runs

NAME = "diagnose"
ARMS = ("baseline", "bn")
LABELS = {"baseline": "without BN", "bn": "with BN"}
DEFAULT_LR = {"mlp": 0.5, "convnet": 0.05}


_opt = option


@dataclass
class Config:
    """Settings of one diagnose run."""

    model: str = field(
        default="mlp",
        metadata=_opt(
            "mlp (the fig1 sigmoid MLP) or convnet (LeNet with ReLU)", choices=("mlp", "convnet")
        ),
    )
    dataset: str = field(
        default="auto",
        metadata=_opt(
            "mnist, fashion-mnist, digits, or auto (the best available)",
            choices=("auto", "mnist", "fashion-mnist", "digits"),
        ),
    )
    data_dir: str | None = field(
        default=None, metadata=_opt("directory with the IDX files", metavar="DIR")
    )
    from_run: str | None = field(
        default=None,
        metadata=_opt(
            "a finished fig1 run directory: continue its two networks instead of training from scratch",
            metavar="DIR",
        ),
    )
    steps: int = field(default=3000, metadata=_opt("training steps per network (0: measure only)"))
    batch_size: int = field(default=60, metadata=_opt("examples per mini-batch"))
    lr: float | None = field(
        default=None,
        metadata=_opt(
            "SGD learning rate for both networks (default: 0.5 for mlp, 0.05 for convnet)"
        ),
    )
    init_std: float = field(
        default=0.05, metadata=_opt("std of the mlp's Gaussian initial weights")
    )
    seed: int = field(
        default=0, metadata=_opt("seed for weights, batch order and measurement batches")
    )
    measure_points: int = field(
        default=6, metadata=_opt("measurements, evenly spaced from the first to the last step")
    )
    measure_batches: int = field(
        default=3, metadata=_opt("training batches each measurement averages over")
    )
    step_multipliers: str = field(
        default="0.25,0.5,1,2,4",
        metadata=_opt("landscape step sizes as multiples of lr, comma-separated", metavar="LIST"),
    )
    track_every: int = field(
        default=10, metadata=_opt("steps between activation-percentile records")
    )
    threads: int = field(default=1, metadata=_opt("torch threads"))

    def __post_init__(self) -> None:
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
        if self.dataset not in ("auto", "mnist", "fashion-mnist", "digits"):
            raise ValueError(
                f"dataset must be auto, mnist, fashion-mnist or digits, got {self.dataset!r}"
            )
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
def build_networks(cfg: Config, fig1_dir: Path | None = None) -> tuple[dict[str, nn.Module], int]:
    """The baseline and BN networks with the same initial weights, and the step they start at."""
    from ..experiments import fig1
    from ..experiments.models import LeNet

    if fig1_dir is not None:
        saved = read_json(fig1_dir / "config.json")
        if saved.get("experiment") != "fig1":
            raise ValueError(
                f"{fig1_dir} holds a {saved.get('experiment')!r} run; --from-run needs a fig1 run"
            )
        nets, start = {}, None
        for arm in ARMS:
            path = fig1_dir / f"checkpoint-{arm}.pt"
            if not path.exists():
                raise FileNotFoundError(
                    f"{path} is missing; run `batchnorm reproduce fig1 --out {fig1_dir}` first"
                )
            ckpt = read_checkpoint(path)
            net = fig1.build_mlp(arm == "bn", cfg.init_std, torch.Generator().manual_seed(0))
            net.load_state_dict(ckpt["model"])
            nets[arm] = net
            start = ckpt["step"] if start is None else min(start, ckpt["step"])
        return nets, int(start)
    if cfg.model == "mlp":
        return {
            arm: fig1.build_mlp(arm == "bn", cfg.init_std, torch.Generator().manual_seed(cfg.seed))
            for arm in ARMS
        }, 0
    torch.manual_seed(cfg.seed)
    nets = {arm: LeNet(bn=arm == "bn") for arm in ARMS}
    base_w = [m for m in nets["baseline"].modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    bn_w = [m for m in nets["bn"].modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    with torch.no_grad():  # same initial weights for both (the BN net has no bias before BN)
        for a, b in zip(base_w, bn_w, strict=True):
            b.weight.copy_(a.weight)
            if b.bias is not None:
                b.bias.copy_(a.bias)
    return nets, 0


def _inputs(cfg: Config, x: torch.Tensor) -> torch.Tensor:
    return x.reshape(len(x), -1).contiguous() if cfg.model == "mlp" else x.contiguous()


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
def run(
    cfg: Config,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict:
    """Train (or continue) both networks, measure, write the run directory; returns the summary.

    Runs take minutes, so ``resume`` starts over (it only checks the settings match).
    """
    if not isinstance(cfg, Config):
        raise TypeError(f"run() expects a diagnose.Config, got {type(cfg).__name__}")
    fig1_dir = Path(cfg.from_run) if cfg.from_run else None
    dataset = cfg.dataset
    if fig1_dir is not None:  # the fig1 run's data and learning rate unless given
        if not (fig1_dir / "config.json").exists():
            raise FileNotFoundError(
                f"{fig1_dir / 'config.json'} is missing: not a fig1 run directory"
            )
        saved = read_json(fig1_dir / "config.json").get("config", {})
        dataset = saved.get("dataset", "auto") if dataset == "auto" else dataset
        if cfg.lr is None and saved.get("lr"):
            cfg = dataclasses.replace(cfg, lr=float(saved["lr"]))
    if dataset == "auto":
        dataset = best_available(cfg.data_dir)
    data = load_dataset(dataset, cfg.data_dir)  # fails before the run dir is touched
    nets, start = build_networks(cfg, fig1_dir)
    out = prepare_run_dir(out, NAME, cfg, resume=resume, overwrite=overwrite)
    log = MetricsLog(out / "metrics.jsonl")
    clock = Stopwatch()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        arms = {
            arm: _train_and_measure(arm, nets[arm], cfg, data, start, log, quiet) for arm in ARMS
        }
    finally:
        torch.set_num_threads(threads)
    summary = make_summary(cfg, dataset, data.source, start, arms, clock.elapsed)
    atomic_write_json(out / "summary.json", summary)
    plot(summary, out)
    return summary


def _train_and_measure(
    arm: str, net: nn.Module, cfg: Config, data: Any, start: int, log: MetricsLog, quiet: bool
) -> dict[str, Any]:
    lr = cfg.learning_rate()
    etas = [lr * m for m in cfg.multipliers()]
    x_train, y_train = _inputs(cfg, data.train_x), data.train_y
    test_x, test_y = _inputs(cfg, data.test_x), data.test_y
    n = len(x_train)
    if n < cfg.batch_size:
        raise ValueError(f"batch_size {cfg.batch_size} exceeds the {n} training examples")
    g_data = torch.Generator().manual_seed(cfg.seed + 1)  # same batches for both networks
    g_meas = torch.Generator().manual_seed(cfg.seed + 2)
    probe = [
        torch.randperm(n, generator=g_meas)[: cfg.batch_size] for _ in range(cfg.measure_batches)
    ]
    batches = [(x_train[i], y_train[i]) for i in probe]
    when = _measure_steps(start, cfg.steps, cfg.measure_points)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    net.train()
    points: list[dict[str, Any]] = []
    torch.manual_seed(cfg.seed + 3)
    perm, pos = torch.randperm(n, generator=g_data), 0
    with ActivationTracker(net, every=cfg.track_every, units=1, seed=cfg.seed) as tracker:
        tracker.step = start
        bar = progress(range(start, start + cfg.steps + 1), f"diagnose {arm:8s}", quiet=quiet)
        for step in bar:
            if step in when:
                tracker.remove()  # measurements run forward passes that must not be recorded
                m = {"step": step, **measure(net, batches, lr, etas, test_x, test_y)}
                tracker.attach()
                points.append(m)
                log.append(
                    {
                        "arm": arm,
                        "step": step,
                        "test_accuracy": m["test_accuracy"],
                        "ics_l2": m["ics"]["l2"],
                        "ics_cosine": m["ics"]["cosine"],
                        "loss_range": m["landscape"]["loss_range"],
                        "effective_beta": m["landscape"]["effective_beta"],
                    }
                )
            if step == start + cfg.steps:
                break
            if pos + cfg.batch_size > n:
                perm, pos = torch.randperm(n, generator=g_data), 0
            idx = perm[pos : pos + cfg.batch_size]
            pos += cfg.batch_size
            loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        bar.close()
    return {"points": points, "tracker": tracker.results()}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def make_summary(
    cfg: Config, dataset: str, source: str, start: int, arms: dict, wall: float
) -> dict:
    """summary.json: per-arm measurements, aggregates over measurements, and the plain statement."""
    agg: dict[str, dict[str, float]] = {}
    for arm, res in arms.items():
        pts = [p for p in res["points"] if p["step"] > start] or res[
            "points"
        ]  # after training starts
        agg[arm] = {
            "ics_l2": _mean(
                [_mean(p["ics"]["l2"][1:]) for p in pts]
            ),  # layer 0 has no earlier layers
            "ics_relative": _mean([_mean(p["ics"]["relative"][1:]) for p in pts]),
            "ics_cosine": _mean([_mean(p["ics"]["cosine"][1:]) for p in pts]),
            "loss_range": _mean([p["landscape"]["loss_range"] for p in pts]),
            "grad_change": _mean([p["landscape"]["grad_change"][-1] for p in pts]),
            "effective_beta": _mean([p["landscape"]["effective_beta"] for p in pts]),
            "final_test_accuracy": res["points"][-1]["test_accuracy"],
        }
    return {
        "experiment": NAME,
        "model": cfg.model,
        "dataset": dataset,
        "data_source": source,
        "start_step": start,
        "steps": cfg.steps,
        "lr": cfg.learning_rate(),
        "step_sizes": [cfg.learning_rate() * m for m in cfg.multipliers()],
        "measure_steps": [p["step"] for p in arms[ARMS[0]]["points"]],
        "arms": {arm: {"points": res["points"]} for arm, res in arms.items()},
        "percentiles": {arm: res["tracker"] for arm, res in arms.items()},
        "aggregate": agg,
        "statement": statement(agg),
        "wall_seconds": round(wall, 3),
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
def plot(summary: dict, out: Path) -> list[Path]:
    """percentiles.png (Figure 1(b, c) for every tracked layer), ics.png, landscape.png."""
    plt = pyplot()

    pct = summary["percentiles"]
    panels = {
        f"{LABELS[arm]}: input to {rec.get('module', '')} '{name}'": rec
        for arm in ARMS
        for name, rec in pct[arm]["layers"].items()
    }
    cols = max(len(pct[arm]["layers"]) for arm in ARMS)
    paths = [
        plot_percentile_runs(
            panels,
            pct[ARMS[0]]["percentiles"],
            out / "percentiles.png",
            cols=cols,
            title="Percentiles of one unit's pre-activation over training",
        )
    ]
    colors = {"baseline": "tab:gray", "bn": "tab:blue"}
    steps = summary["measure_steps"]

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for arm in ARMS:
        pts = summary["arms"][arm]["points"]
        layers = pts[0]["ics"]["layers"]
        for j, name in enumerate(layers[1:], start=1):
            ls = ["-", "--", ":", "-."][j % 4]
            axes[0].plot(
                steps,
                [p["ics"]["l2"][j] for p in pts],
                ls,
                color=colors[arm],
                label=f"{LABELS[arm]} layer {name}",
            )
            axes[1].plot(steps, [p["ics"]["cosine"][j] for p in pts], ls, color=colors[arm])
    axes[0].set(title="ICS: ‖G − G′‖₂ per layer", xlabel="step", yscale="log")
    axes[1].set(title="ICS: cos(G, G′) per layer (1 = no shift)", xlabel="step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(save_figure(fig, out / "ics.png"))

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for arm in ARMS:
        pts = summary["arms"][arm]["points"]
        kw = {"color": colors[arm], "label": LABELS[arm], "marker": "o", "ms": 3}
        axes[0].plot(steps, [p["landscape"]["loss_range"] for p in pts], **kw)
        axes[1].plot(steps, [p["landscape"]["grad_change"][-1] for p in pts], **kw)
        axes[2].plot(steps, [p["landscape"]["effective_beta"] for p in pts], **kw)
        axes[3].plot(steps, [p["test_accuracy"] for p in pts], **kw)
    eta = summary["step_sizes"][-1]
    axes[0].set(title="loss variation along −∇L", xlabel="step", yscale="log")
    axes[1].set(title=f"‖∇L(x − ηg) − ∇L(x)‖, η = {eta:g}", xlabel="step", yscale="log")
    axes[2].set(title="effective β-smoothness", xlabel="step", yscale="log")
    axes[3].set(title="test accuracy", xlabel="step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
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


# ---------------------------------------------------------------- CLI hook
def add_command(sub: Any) -> None:
    """Add ``batchnorm diagnose`` to the ``batchnorm`` command (see ``cli.EXTRA_COMMANDS``)."""
    from ..cli import add_config_options

    p = sub.add_parser(
        "diagnose",
        help="ICS vs loss smoothness: measure BN's effect inside the networks",
        allow_abbrev=False,
        description=(__doc__ or "").strip().splitlines()[0],
    )
    add_config_options(p, Config)
    p.add_argument(
        "--quick",
        action="store_true",
        help="a small CI-sized run (prints the settings it changes); its numbers are "
        "not the paper's scale",
    )
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/diagnose)")
    p.add_argument(
        "--resume", action="store_true", help="accepted for symmetry; a diagnose run restarts"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start the run in --out again, replacing its metrics and report",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_diagnose, _parser=p)


def _cmd_diagnose(args: Any) -> int:
    import sys

    from ..experiments.report import render_report

    base = Config.quick() if args.quick else Config()
    if args.quick:
        from ..cli import announce_quick

        announce_quick(Config, "diagnose")
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(Config)
        if getattr(args, f.name, None) is not None
    }
    try:
        cfg = dataclasses.replace(base, **overrides)
    except (ValueError, TypeError) as e:
        args._parser.error(str(e))
    out = args.out or Path("runs") / NAME
    try:
        summary = run(cfg, out, resume=args.resume, overwrite=args.overwrite, quiet=args.quiet)
    except (ValueError, FileNotFoundError) as e:
        print(f"batchnorm diagnose: error: {e}", file=sys.stderr)
        return 1
    page = render_report(out)
    if not args.quiet:
        print(describe(summary))
    print(f"report: {page.resolve()}")
    return 0
