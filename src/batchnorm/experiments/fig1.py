"""Figure 1 of the paper: a sigmoid MLP on MNIST with and without batch normalization.

Section 4.1: 784-100-100-100-10, sigmoid hidden units, small random Gaussian initial weights,
cross-entropy loss, 50,000 steps of 60 examples; the BN network adds BN before each hidden
sigmoid (and drops the linear bias BN's β subsumes). Recorded: test accuracy along training
(Fig. 1a) and the 15th/50th/85th percentiles of the input to one sigmoid of the last hidden
layer over the test set (Figs. 1b, 1c). The paper does not state the optimizer: plain SGD at
learning rate 0.5 for both networks (as a public TensorFlow reproduction did).

Both networks see the same initial weights and the same sequence of mini-batches. By default they
train in two processes (one thread each); ``workers=1`` trains them one after the other here.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import batchnorm
from batchnorm.data import Dataset, best_available, load_dataset

from .report import Claim, Figure, ReportSections, Table, pyplot, save_figure
from .runner import (
    MetricsLog,
    Stopwatch,
    atomic_write_json,
    die_with_parent,
    load_checkpoint,
    option,
    prepare_run_dir,
    progress,
    read_checkpoint,
    save_checkpoint,
)

ARMS = ("baseline", "bn")
NAME = "fig1"


_opt = option


@dataclass
class Config:
    """Settings of one Figure 1 run (defaults: the paper's setup)."""

    dataset: str = field(
        default="auto",
        metadata=_opt(
            "mnist, fashion-mnist, digits, or auto (the best available)",
            choices=("auto", "mnist", "fashion-mnist", "digits"),
        ),
    )
    data_dir: str | None = field(
        default=None,
        metadata=_opt(
            "directory with the IDX files (else $BATCHNORM_DATA, the user cache, a download)",
            metavar="DIR",
        ),
    )
    steps: int = field(default=50_000, metadata=_opt("training steps (mini-batches)"))
    batch_size: int = field(default=60, metadata=_opt("examples per mini-batch"))
    lr: float = field(default=0.5, metadata=_opt("SGD learning rate (both networks)"))
    init_std: float = field(default=0.05, metadata=_opt("std of the Gaussian initial weights"))
    seed: int = field(default=0, metadata=_opt("seed for weights and batch order"))
    eval_every: int = field(default=500, metadata=_opt("steps between test-set evaluations"))
    checkpoint_every: int = field(default=5_000, metadata=_opt("steps between checkpoints"))
    unit: int = field(
        default=0, metadata=_opt("which sigmoid of the last hidden layer to track (0-99)")
    )
    workers: int = field(
        default=2, metadata=_opt("processes: 2 trains both networks at once, 1 in turn")
    )
    threads: int = field(default=1, metadata=_opt("torch threads per network"))

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "eval_every", "checkpoint_every", "threads")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.batch_size < 2:
            raise ValueError(
                f"batch_size must be at least 2 (BN needs 2 values per unit), got {self.batch_size}"
            )
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (
            isinstance(self.init_std, (int, float))
            and math.isfinite(self.init_std)
            and self.init_std > 0
        ):
            raise ValueError(f"init_std must be a positive number, got {self.init_std!r}")
        if self.checkpoint_every % self.eval_every:
            raise ValueError(
                f"checkpoint_every ({self.checkpoint_every}) must be a multiple of eval_every "
                f"({self.eval_every}), so that a resumed run evaluates at the same steps"
            )
        if not 0 <= self.unit < 100:
            raise ValueError(
                f"unit must be in 0..99 (the last hidden layer has 100), got {self.unit}"
            )
        if self.workers not in (1, 2):
            raise ValueError(f"workers must be 1 or 2, got {self.workers}")
        if self.dataset not in ("auto", "mnist", "fashion-mnist", "digits"):
            raise ValueError(
                f"dataset must be auto, mnist, fashion-mnist or digits, got {self.dataset!r}"
            )

    @classmethod
    def quick(cls) -> Config:
        """CI-sized: digits, 600 steps, one process."""
        return cls(dataset="digits", steps=600, eval_every=100, checkpoint_every=200, workers=1)


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


def _after_step(arm: str, step: int) -> None:
    """Called after every completed step (tests replace it to simulate an interrupt)."""


# ---------------------------------------------------------------- one network's training
def train_arm(
    arm: str,
    cfg: Config,
    dataset: str,
    out: Path,
    *,
    resume: bool,
    quiet: bool,
    position: int = 0,
    data: Dataset | None = None,
) -> dict:
    """Train one network (``"baseline"`` or ``"bn"``); returns its curve, percentiles and wall time."""
    torch.set_num_threads(cfg.threads)
    if data is None:
        data = load_dataset(dataset, cfg.data_dir)
    x_train = data.train_x.reshape(len(data.train_x), -1).contiguous()  # (N, 784)
    x_test = data.test_x.reshape(len(data.test_x), -1).contiguous()
    y_train, y_test = data.train_y, data.test_y
    n = len(x_train)
    if n < cfg.batch_size:
        raise ValueError(
            f"batch_size {cfg.batch_size} exceeds the {n} training examples of {dataset}"
        )

    g_init = torch.Generator().manual_seed(cfg.seed)
    g_data = torch.Generator().manual_seed(cfg.seed + 1)
    net = build_mlp(arm == "bn", cfg.init_std, g_init)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr)
    ckpt_path = out / f"checkpoint-{arm}.pt"
    hist = {"steps": [], "acc": [], "p15": [], "p50": [], "p85": []}
    perm, pos, start, before, cpu_before = torch.randperm(n, generator=g_data), 0, 0, 0.0, 0.0
    ckpt = load_checkpoint(ckpt_path, generators=[g_data]) if resume else None
    if ckpt is not None:
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        perm, pos, start, before, hist = (
            ckpt["perm"],
            ckpt["pos"],
            ckpt["step"],
            ckpt["wall"],
            ckpt["hist"],
        )
        cpu_before = ckpt.get("cpu", 0.0)
    clock = Stopwatch(before)
    cpu0 = time.process_time()  # CPU time: a measure that other load on the machine inflates less
    log = open(out / "metrics.jsonl", "a", encoding="utf-8")

    def record(step: int, loss: float | None) -> None:
        acc, (p15, p50, p85) = evaluate(net, x_test, y_test, cfg.unit)
        for k, v in zip(
            ("steps", "acc", "p15", "p50", "p85"), (step, acc, p15, p50, p85), strict=True
        ):
            hist[k].append(v)
        log.write(
            json.dumps(
                {
                    "arm": arm,
                    "step": step,
                    "test_accuracy": acc,
                    "train_loss": loss,
                    "p15": p15,
                    "p50": p50,
                    "p85": p85,
                    "wall_seconds": round(clock.elapsed, 3),
                }
            )
            + "\n"
        )
        log.flush()

    try:
        if start == 0:
            record(0, None)
        loss_sum = torch.zeros(())
        bar = progress(
            range(start, cfg.steps),
            f"fig1 {arm:8s}",
            total=cfg.steps,
            initial=start,
            quiet=quiet,
            position=position,
        )
        for step in bar:
            if pos + cfg.batch_size > n:  # new epoch: reshuffle
                perm, pos = torch.randperm(n, generator=g_data), 0
            idx = perm[pos : pos + cfg.batch_size]
            pos += cfg.batch_size
            loss = F.cross_entropy(net(x_train.index_select(0, idx)), y_train.index_select(0, idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            done = step + 1
            if done % cfg.eval_every == 0 or done == cfg.steps:
                k = done % cfg.eval_every or cfg.eval_every
                record(done, loss_sum.item() / k)
                loss_sum.zero_()
                if not quiet:
                    bar.set_postfix(test_acc=f"{hist['acc'][-1]:.4f}", refresh=False)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                save_checkpoint(
                    ckpt_path,
                    step=done,
                    generators=[g_data],
                    model=net.state_dict(),
                    optimizer=opt.state_dict(),
                    perm=perm,
                    pos=pos,
                    wall=clock.elapsed,
                    cpu=cpu_before + time.process_time() - cpu0,
                    hist=hist,
                )
            _after_step(arm, done)
        bar.close()
    finally:
        log.close()
    return {
        "arm": arm,
        "hist": hist,
        "wall_seconds": clock.elapsed,
        "source": data.source,
        "cpu_seconds": cpu_before + time.process_time() - cpu0,
    }


def _worker(args: tuple) -> dict:
    die_with_parent()
    arm, cfg, dataset, out, resume, quiet, position = args
    return train_arm(arm, cfg, dataset, out, resume=resume, quiet=quiet, position=position)


# ---------------------------------------------------------------- the experiment
def run(
    cfg: Config,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict:
    """Train both networks, write the run directory (summary.json, fig1.png), return the summary."""
    if not isinstance(cfg, Config):
        raise TypeError(f"run() expects a fig1.Config, got {type(cfg).__name__}")
    dataset = cfg.dataset if cfg.dataset != "auto" else best_available(cfg.data_dir)
    data = load_dataset(dataset, cfg.data_dir)  # fails before the run directory is touched
    out = prepare_run_dir(out, NAME, cfg, resume=resume, overwrite=overwrite)
    clock = Stopwatch()
    # keep the metrics each network logged up to its checkpoint; drop the rest (they are redone)
    done = {}
    for arm in ARMS:
        p = out / f"checkpoint-{arm}.pt"
        done[arm] = read_checkpoint(p)["step"] if resume and p.exists() else -1
    MetricsLog(out / "metrics.jsonl", keep=lambda r: r.get("step", 0) <= done.get(r.get("arm"), -1))
    jobs = [(arm, cfg, dataset, out, resume, quiet, i) for i, arm in enumerate(ARMS)]
    results = None
    if cfg.workers == 1:
        threads = torch.get_num_threads()
        try:
            results = [
                train_arm(arm, cfg, dataset, out, resume=resume, quiet=quiet, data=data)
                for arm in ARMS
            ]
        finally:
            torch.set_num_threads(threads)
    else:
        pool = mp.get_context("spawn").Pool(2)  # each worker sets cfg.threads itself
        try:
            results = pool.map(_worker, jobs)
            pool.close()
        finally:
            pool.terminate() if results is None else None
            pool.join()
    summary = make_summary(dataset, cfg, {r["arm"]: r for r in results}, clock.elapsed)
    atomic_write_json(out / "summary.json", summary)
    plot(summary, out / "fig1.png")
    return summary


def make_summary(dataset: str, cfg: Config, results: dict, wall: float) -> dict:
    """The summary.json contract (see the project issue): runs and percentiles per network."""
    runs, pct = {}, {}
    for arm in ARMS:
        h = results[arm]["hist"]
        runs[arm] = {
            "curve": [[s, a] for s, a in zip(h["steps"], h["acc"], strict=True)],
            "final_test_accuracy": h["acc"][-1],
            "wall_seconds": round(results[arm]["wall_seconds"], 3),
            "cpu_seconds": round(results[arm]["cpu_seconds"], 3),
        }
        pct[arm] = {"steps": list(h["steps"]), "p15": h["p15"], "p50": h["p50"], "p85": h["p85"]}
    return {
        "experiment": NAME,
        "dataset": dataset,
        "steps": cfg.steps,
        "runs": runs,
        "percentiles": pct,
        "wall_seconds": round(wall, 3),
        "data_source": results[ARMS[0]]["source"],
    }


# ---------------------------------------------------------------- plots and report
def plot(summary: dict, path: Path) -> Path:
    """Three panels like the paper's Figure 1: (a) test accuracy, (b) baseline and (c) BN percentiles."""
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colors = {"baseline": "tab:gray", "bn": "tab:blue"}
    labels = {"baseline": "Without BN", "bn": "With BN"}
    for arm in ARMS:
        c = summary["runs"][arm]["curve"]
        axes[0].plot([s for s, _ in c], [a for _, a in c], color=colors[arm], label=labels[arm])
    accs = [a for arm in ARMS for _, a in summary["runs"][arm]["curve"][1:]]
    if accs:
        lo = sorted(accs)[len(accs) // 20]  # ignore the first few points' very low accuracy
        axes[0].set_ylim(max(0.0, lo - 0.02), min(1.0, max(accs) + 0.01))
    axes[0].set(title=f"(a) test accuracy ({summary['dataset']})", xlabel="step")
    axes[0].legend(loc="lower right")
    ys = [v for arm in ARMS for k in ("p15", "p85") for v in summary["percentiles"][arm][k]]
    for ax, arm, tag in ((axes[1], "baseline", "(b)"), (axes[2], "bn", "(c)")):
        p = summary["percentiles"][arm]
        for k, ls in (("p15", "--"), ("p50", "-"), ("p85", "--")):
            ax.plot(p["steps"], p[k], ls, color=colors[arm], label=k)
        ax.set(
            title=f"{tag} {labels[arm]}: input to one sigmoid",
            xlabel="step",
            ylim=(min(ys) - 0.5, max(ys) + 0.5),
        )
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


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
            f"({r[arm]['wall_seconds']:.0f} s wall, {r[arm].get('cpu_seconds', 0):.0f} s CPU)"
        )
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}%"


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
            f"{_pct(bn)} with BN vs {_pct(base)} without{data_note}",
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
        [f"{m:,}", _pct(acc_at(summary, "baseline", m)), _pct(acc_at(summary, "bn", m))]
        for m in milestones
    ]
    rows.append(
        ["wall time (s)", f"{r['baseline']['wall_seconds']:.0f}", f"{r['bn']['wall_seconds']:.0f}"]
    )
    if "cpu_seconds" in r["bn"]:
        rows.append(
            ["CPU time (s)", f"{r['baseline']['cpu_seconds']:.0f}", f"{r['bn']['cpu_seconds']:.0f}"]
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
