"""Small-batch study: BN, Batch Renormalization, Ghost BN and SyncBN at per-device batches 2..32,
with the moving-average (EMA) population statistics vs the exact ones of Algorithm 2.

One small convnet (conv 16 → BN → ReLU → pool → conv 32 → BN → ReLU → pool → FC 10), the same
initialization, data order and number of training examples for every run; momentum SGD with the
learning rate scaled linearly with the batch an optimizer step sees (``lr`` is for 32). Methods
at per-device batch b:

- ``bn``: one device, batch b, statistics over b;
- ``renorm``: the same with BatchRenorm2d (r_max, d_max relaxed from (1, 0) during training);
- ``ghost``: one device, batch ``ghost_batch`` (32) with virtual batches of b — the statistics
  noise of b with the gradient of a big batch;
- ``sync``: 2 processes (gloo, loopback) under DDP, b each, SyncBatchNorm over the global 2b
  (equal, by construction, to BN over batch 2b in one process).

Each trained net is evaluated twice: with its EMA running statistics, and after
``recompute_population_stats`` over ``population_examples`` training examples in batches of the
size its BN saw in training (b; 2b for sync; virtual batches of b for ghost).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ...layers import BatchNorm2d, BatchRenorm2d, GhostBatchNorm2d, SyncBatchNorm
from ...tools import recompute_population_stats
from ..engine.config import DataConfig, load_tensor_data
from ..engine.data import TensorData
from ..engine.launch import experiment_runner
from ..engine.loop import Arm, evaluate
from ..engine.plots import figure_legend, pyplot, save_figure, scale_note
from ..engine.report import Claim, Figure, ReportSections, Table, pct
from ..engine.runner import option

NAME = "small-batch"
METHODS = ("bn", "renorm", "ghost", "sync")
LABELS = {"bn": "BN", "renorm": "BatchRenorm", "ghost": "GhostBN", "sync": "SyncBN (2 procs)"}


_h = option


@dataclass
class Config(DataConfig):
    """Settings of the small-batch study."""

    batch_sizes: str = field(
        default="2,4,8,32", metadata=_h("per-device batch sizes, comma-separated")
    )
    methods: str = field(
        default="bn,renorm,ghost,sync", metadata=_h("subset of bn,renorm,ghost,sync")
    )
    train_subset: int = field(default=4000, metadata=_h("training examples used (0: all)"))
    test_subset: int = field(default=2000, metadata=_h("test examples used (0: all)"))
    epochs: int = field(default=2, metadata=_h("passes over the training examples, every run"))
    lr: float = field(default=0.05, metadata=_h("SGD learning rate at batch 32, scaled linearly"))
    momentum: float = field(default=0.9, metadata=_h("SGD momentum"))
    bn_momentum: float = field(
        default=0.01, metadata=_h("BN running-statistics momentum (PyTorch's)")
    )
    r_max: float = field(default=3.0, metadata=_h("BatchRenorm final r_max"))
    d_max: float = field(default=5.0, metadata=_h("BatchRenorm final d_max"))
    renorm_warmup: float = field(
        default=0.1, metadata=_h("BatchRenorm: fraction of steps at (1, 0)")
    )
    renorm_relax: float = field(default=0.3, metadata=_h("BatchRenorm: fraction of steps to relax"))
    ghost_batch: int = field(default=32, metadata=_h("GhostBN: examples per optimizer step"))
    population_examples: int = field(
        default=4000, metadata=_h("examples for recomputed statistics")
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        sizes = self.sizes()
        if not sizes or min(sizes) < 2:
            raise ValueError(f"batch_sizes must be integers >= 2, got {self.batch_sizes!r}")
        bad = [m for m in self.method_list() if m not in METHODS]
        if bad or not self.method_list():
            raise ValueError(
                f"methods must be a subset of {','.join(METHODS)}, got {self.methods!r}"
            )
        if self.epochs < 1 or self.lr <= 0 or self.population_examples < 2:
            raise ValueError("epochs >= 1, lr > 0 and population_examples >= 2 are required")
        if self.ghost_batch < max(sizes):
            raise ValueError(f"ghost_batch ({self.ghost_batch}) must be >= the largest batch size")

    def sizes(self) -> list[int]:
        try:
            return [int(s) for s in self.batch_sizes.split(",") if s.strip()]
        except ValueError:
            raise ValueError(
                f"batch_sizes must be comma-separated integers, got {self.batch_sizes!r}"
            ) from None

    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]

    @classmethod
    def quick(cls) -> Config:
        """CI size: digits, batches 4 and 8, 96 examples, every method (2 processes for sync)."""
        return cls(
            dataset="digits",
            batch_sizes="4,8",
            train_subset=96,
            test_subset=100,
            epochs=1,
            population_examples=48,
            ghost_batch=16,
        )


# ---------------------------------------------------------------- model
def make_net(norm) -> nn.Module:
    """The study's convnet on 28×28 inputs; ``norm(c)`` builds each BN layer."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        norm(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        norm(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )


def _norm(method: str, b: int, cfg: Config, steps: int):
    mom = cfg.bn_momentum
    if method == "renorm":
        warm, relax = int(cfg.renorm_warmup * steps), int(cfg.renorm_relax * steps)
        return lambda c: BatchRenorm2d(
            c, momentum=mom, r_max=cfg.r_max, d_max=cfg.d_max, warmup_steps=warm, relax_steps=relax
        )
    if method == "ghost":
        return lambda c: GhostBatchNorm2d(c, virtual_batch_size=b, momentum=mom)
    if method == "sync":
        return lambda c: SyncBatchNorm(c, momentum=mom, timeout=120.0)
    return lambda c: BatchNorm2d(c, momentum=mom)


def _step_batch(method: str, b: int, cfg: Config) -> int:
    """Examples per optimizer step (all devices)."""
    return {"ghost": cfg.ghost_batch, "sync": 2 * b}.get(method, b)


# ---------------------------------------------------------------- the arms
def load(cfg: Config) -> TensorData:
    data = load_tensor_data(cfg).subset(cfg.train_subset, cfg.test_subset, cfg.seed)
    if max(cfg.ghost_batch, 2 * max(cfg.sizes())) > data.n_train:
        raise ValueError(
            f"the {data.n_train} training examples are fewer than one batch; raise train_subset"
        )
    return data


def arms(cfg: Config, data: TensorData) -> list[Arm]:
    """One arm per (method, batch size): the same initial weights and data order for all; the
    learning rate scaled linearly with the examples an optimizer step sees."""
    out = []
    for method in cfg.method_list():
        for b in cfg.sizes():
            sb = _step_batch(method, b, cfg)
            steps = cfg.epochs * (data.n_train // sb)
            lr = cfg.lr * sb / 32
            out.append(Arm(
                f"{method}-b{b}", lambda m=method, b=b, n=steps: make_net(_norm(m, b, cfg, n)),
                steps, sb, lambda s, lr=lr: lr, cfg.momentum, init="net", order="data",
                world=2 if method == "sync" else 1, meta={"method": method, "batch": b},
                finish=lambda model, m=method, b=b: _population(model, m, b, cfg, data),
            ))  # fmt: skip
    return out


def _population(model: nn.Module, method: str, b: int, cfg: Config, data: TensorData) -> dict:
    """Test accuracy with the EMA statistics and with statistics recomputed (Algorithm 2) over
    ``population_examples`` training examples in batches of the size BN saw in training."""
    if method == "sync":  # one process here: plain BN over batches of 2b computes the same
        pop = make_net(lambda c: BatchNorm2d(c, momentum=cfg.bn_momentum))
        pop.load_state_dict(model.state_dict())
    else:
        pop = copy.deepcopy(model)
    pb = {"sync": 2 * b, "ghost": cfg.ghost_batch}.get(method, b)
    n = min(cfg.population_examples, data.n_train) // pb * pb
    tx = data.train_x
    report = recompute_population_stats(pop, [tx[i : i + pb] for i in range(0, n, pb)])
    return {
        "ema_acc": evaluate(model, data)["test_acc"],
        "recomputed_acc": evaluate(pop, data)["test_acc"],
        "ema_mean_shift_std": max(r.max_mean_shift_std for r in report.values()),
        "ema_rel_var_diff": max(r.max_rel_var_diff for r in report.values()),
    }


def summarize(cfg: Config, data: TensorData, results: dict[str, dict]) -> dict:
    done = [
        {
            "method": r["method"],
            "batch": r["batch"],
            "step_batch": _step_batch(r["method"], r["batch"], cfg),
            "steps": r["steps"],
            "ema_acc": r["ema_acc"],
            "recomputed_acc": r["recomputed_acc"],
            "ema_mean_shift_std": r["ema_mean_shift_std"],
            "ema_rel_var_diff": r["ema_rel_var_diff"],
            "train_seconds": r["wall_seconds"],
        }  # fmt: skip
        for r in results.values()
    ]
    table = {
        LABELS[m]: {
            str(r["batch"]): {k: r[k] for k in ("ema_acc", "recomputed_acc", "steps")}
            for r in done
            if r["method"] == m
        }
        for m in cfg.method_list()
    }
    return {
        "train_examples": data.n_train,
        "test_examples": len(data.test_x),
        "batch_sizes": cfg.sizes(),
        "methods": [LABELS[m] for m in cfg.method_list()],
        "results": done,
        "table": table,
        "wall_seconds": sum(r["train_seconds"] for r in done),
    }


run = experiment_runner(__name__)


# ---------------------------------------------------------------- plots and report
MARKERS = ("o", "s", "^", "D", "v", "P")


def plot(summary: dict, out: Path) -> None:
    """small_batch.png: test accuracy vs per-device batch size, EMA vs recomputed statistics,
    on one y-axis."""
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True, layout="constrained")
    sizes = sorted({int(b) for rows in summary["table"].values() for b in rows})
    for i, (label, rows) in enumerate(summary["table"].items()):
        bs = sorted(rows, key=int)
        for ax, key in zip(axes, ("ema_acc", "recomputed_acc"), strict=True):
            ax.plot(
                [int(b) for b in bs], [rows[b][key] for b in bs], color=f"C{i}",
                marker=MARKERS[i % len(MARKERS)], ms=5, lw=1.6, label=label,
            )  # fmt: skip
    for ax, t in zip(
        axes,
        ("(a) Evaluated with the EMA running statistics",
         "(b) Evaluated with recomputed statistics (Algorithm 2)"),
        strict=True,
    ):  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.minorticks_off()
        ax.set_xlabel("per-device batch size (log scale)")
        ax.set_ylabel("test accuracy")
        ax.set_title(t, fontsize=10)
        ax.tick_params(labelleft=True)
        ax.grid(alpha=0.3)
    figure_legend(fig, axes[0].get_lines(), ncols=4)
    fig.suptitle(
        f"Small batches on {summary['dataset']}: the same convnet, "
        f"{summary.get('train_examples', '?')} training examples"
    )
    scale_note(fig, summary)
    save_figure(fig, out / "small_batch.png")


def table_rows(summary: dict) -> list[list[str]]:
    rows = []
    for label, per_b in summary["table"].items():
        for b in sorted(per_b, key=int):
            r = per_b[b]
            rows.append([label, b, pct(r["ema_acc"]), pct(r["recomputed_acc"]), str(r["steps"])])
    return rows


def describe(summary: dict) -> str:
    lines = [
        f"small-batch study on {summary['dataset']} ({summary['train_examples']} train examples)",
        f"{'method':18s} {'batch':>5s} {'EMA':>7s} {'recomp.':>7s}",
    ]
    lines += [f"{r[0]:18s} {r[1]:>5s} {r[2]:>7s} {r[3]:>7s}" for r in table_rows(summary)]
    return "\n".join(lines)


def report(summary: dict, run_dir: Path) -> ReportSections:
    res = {(r["method"], r["batch"]): r for r in summary["results"]}
    sizes = summary["batch_sizes"]
    lo, hi = min(sizes), max(sizes)
    claims = []
    if ("bn", lo) in res and ("bn", hi) in res:
        a, z = res[("bn", lo)]["ema_acc"], res[("bn", hi)]["ema_acc"]
        claims.append(
            Claim(
                "BN degrades at tiny batches",
                "Ioffe 2017: BN suffers at batch 4 per worker",
                f"BN at {lo}: {pct(a)} vs at {hi}: {pct(z)} (EMA)",
                "consistent" if a < z else "not here",
            )
        )
    for m in ("renorm", "sync"):
        if (m, lo) in res and ("bn", lo) in res:
            a, z = res[(m, lo)]["ema_acc"], res[("bn", lo)]["ema_acc"]
            claims.append(
                Claim(
                    f"{LABELS[m]} recovers small-batch accuracy",
                    "Ioffe 2017 (renorm); global statistics (sync)",
                    f"{LABELS[m]} {pct(a)} vs BN {pct(z)} at batch {lo}",
                    "consistent" if a > z else "not here",
                )
            )
    gaps = [r["recomputed_acc"] - r["ema_acc"] for r in res.values()]
    if gaps:
        claims.append(
            Claim(
                "recomputed population statistics close the train/eval gap",
                "Wu & Johnson 2021 (PreciseBN); the paper's Algorithm 2",
                f"mean change in test accuracy {100 * sum(gaps) / len(gaps):+.2f} points "
                f"over {len(gaps)} runs",
                "consistent" if sum(gaps) > 0 else "not here",
            )
        )
    return ReportSections(
        title=f"Small batches: BN, Batch Renormalization, Ghost BN, SyncBN ({summary['dataset']})",
        intro=(
            "The same convnet trained on the same examples at per-device batch sizes "
            f"{', '.join(map(str, sizes))} with four normalizations, then evaluated with the "
            "EMA running statistics and with statistics recomputed by Algorithm 2. GhostBN takes "
            f"steps of {summary['config']['ghost_batch']} examples normalized in virtual batches "
            "of the given size; SyncBN runs 2 gloo processes under DDP (global batch 2x)."
        ),
        claims=claims,
        figures=[Figure("small_batch.png", "test accuracy vs per-device batch size")],
        tables=[
            Table(
                "Test accuracy",
                ["method", "per-device batch", "EMA stats", "recomputed stats", "steps"],
                table_rows(summary),
            )
        ],
        notes=[
            f"data: {summary['data_source']}; {summary['train_examples']} training examples, "
            f"{summary['config']['epochs']} epochs, lr {summary['config']['lr']} at 32 scaled "
            "linearly; one seed, so differences of a point or two are within noise"
        ],
    )
