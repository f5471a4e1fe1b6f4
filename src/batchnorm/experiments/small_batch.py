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
import dataclasses
import datetime
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import BatchNorm2d, BatchRenorm2d, GhostBatchNorm2d, SyncBatchNorm
from ..tools import recompute_population_stats
from . import conv_training as T
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
    save_checkpoint,
)

NAME = "small-batch"
METHODS = ("bn", "renorm", "ghost", "sync")
LABELS = {"bn": "BN", "renorm": "BatchRenorm", "ghost": "GhostBN", "sync": "SyncBN (2 procs)"}


_h = option


@dataclass
class Config(T.DataConfig):
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
    seed: int = field(default=0, metadata=_h("random seed (init and data order)"))

    def __post_init__(self) -> None:
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


# ---------------------------------------------------------------- training
def _train_local(method: str, b: int, cfg: Config, tx, ty) -> tuple[nn.Module, int]:
    sb = _step_batch(method, b, cfg)
    steps = cfg.epochs * (len(tx) // sb)
    torch.manual_seed(T.variant_seed(cfg.seed, "init"))  # same init for every run
    model = make_net(_norm(method, b, cfg, steps))
    opt = T.sgd(model, cfg.lr * sb / 32, cfg.momentum)
    batches = T.Batches(len(tx), sb, cfg.seed, "order")
    model.train()
    for step in range(steps):
        idx = batches.indices(step)
        loss = F.cross_entropy(model(tx[idx]), ty[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model, steps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_worker(
    rank: int, world: int, port: int, cfg_dict: dict, sizes: list[int], out: str
) -> None:
    """One DDP rank: for each b, b examples of each global batch of world·b, SyncBatchNorm."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    die_with_parent()
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    try:
        cfg = Config(**cfg_dict)
        _, tx, ty, _, _ = T.load_data(
            cfg.dataset, cfg.data_dir, cfg.train_subset, cfg.test_subset, seed=cfg.seed
        )
        for b in sizes:
            t0 = time.perf_counter()
            sb = world * b
            steps = cfg.epochs * (len(tx) // sb)
            torch.manual_seed(T.variant_seed(cfg.seed, "init"))
            model = DDP(make_net(_norm("sync", b, cfg, steps)))
            opt = T.sgd(model, cfg.lr * sb / 32, cfg.momentum)
            batches = T.Batches(len(tx), sb, cfg.seed, "order")
            model.train()
            for step in range(steps):
                idx = batches.indices(step)[rank * b : (rank + 1) * b]  # this rank's share
                loss = F.cross_entropy(model(tx[idx]), ty[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()  # DDP averages the gradients: the global batch's mean loss
                opt.step()
            if rank == 0:
                torch.save(
                    {
                        "state": model.module.state_dict(),
                        "steps": steps,
                        "seconds": time.perf_counter() - t0,
                    },
                    os.path.join(out, f"b{b}.pt"),
                )
        dist.barrier()  # both ranks done before either tears down gloo (a rank leaving early
        # while its peer is still in a collective can abort the peer)
    finally:
        dist.destroy_process_group()
    # Success: every result is on disk. Leave without the interpreter's and C++ static teardown,
    # where a still-joinable library thread once aborted a finished worker with SIGABRT
    # ("terminate called without an active exception"), failing a run that had succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _train_sync(sizes: list[int], cfg: Config) -> dict[int, tuple[nn.Module, int, float]]:
    """Train the sync nets for every b in one launch of 2 processes: {b: (model, steps, s)}."""
    import torch.multiprocessing as mp

    out = {}
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_sync_worker, args=(2, _free_port(), dataclasses.asdict(cfg), sizes, d), nprocs=2)
        for b in sizes:
            saved = torch.load(os.path.join(d, f"b{b}.pt"), weights_only=True)
            model = make_net(lambda c: SyncBatchNorm(c))  # no process group here: local BN path
            model.load_state_dict(saved["state"])
            out[b] = (model, saved["steps"], saved["seconds"])
    return out


def _accuracy(model: nn.Module, vx, vy) -> float:
    return T.evaluate(model, vx, vy)["acc"]


def run_one(method: str, b: int, cfg: Config, data, trained=None) -> dict:
    """Train one (method, b) net (or take ``trained`` = (model, steps, seconds)); test accuracy
    with EMA and with recomputed statistics."""
    tx, ty, vx, vy = data
    if trained is None:
        t0 = time.perf_counter()
        model, steps = _train_local(method, b, cfg, tx, ty)
        trained = (model, steps, time.perf_counter() - t0)
    model, steps, train_s = trained
    ema_acc = _accuracy(model, vx, vy)
    pop = copy.deepcopy(model)
    pb = {"sync": 2 * b, "ghost": cfg.ghost_batch}.get(method, b)  # batches as seen in training
    n = min(cfg.population_examples, len(tx)) // pb * pb
    report = recompute_population_stats(pop, [tx[i : i + pb] for i in range(0, n, pb)])
    return {
        "method": method,
        "batch": b,
        "step_batch": _step_batch(method, b, cfg),
        "steps": steps,
        "ema_acc": ema_acc,
        "recomputed_acc": _accuracy(pop, vx, vy),
        "ema_mean_shift_std": max(r.max_mean_shift_std for r in report.values()),
        "ema_rel_var_diff": max(r.max_rel_var_diff for r in report.values()),
        "train_seconds": train_s,
    }


def run(
    cfg: Config, out: Path, *, resume: bool = False, overwrite: bool = False, quiet: bool = False
) -> dict:
    """Every (method, batch size) run; one metrics record and a checkpoint after each."""
    clock = Stopwatch()
    out = prepare_run_dir(out, NAME, cfg, resume=resume, overwrite=overwrite)
    ds, tx, ty, vx, vy = T.load_data(
        cfg.dataset, cfg.data_dir, cfg.train_subset, cfg.test_subset, seed=cfg.seed
    )
    if max(cfg.ghost_batch, 2 * max(cfg.sizes())) > len(tx):
        raise ValueError(
            f"the {len(tx)} training examples are fewer than one batch; raise train_subset"
        )
    ckpt = load_checkpoint(out / "checkpoint.pt") if resume else None
    done: list[dict] = list(ckpt["results"]) if ckpt else []
    keys = {(r["method"], r["batch"]) for r in done}
    log = MetricsLog(
        out / "metrics.jsonl", keep=(lambda r: (r["method"], r["batch"]) in keys) if ckpt else None
    )
    todo = [(m, b) for m in cfg.method_list() for b in cfg.sizes() if (m, b) not in keys]
    sync_sizes = [b for m, b in todo if m == "sync"]
    synced = _train_sync(sync_sizes, cfg) if sync_sizes else {}  # one launch for all sizes
    for m, b in progress(todo, desc=NAME, quiet=quiet):
        rec = run_one(m, b, cfg, (tx, ty, vx, vy), synced.get(b) if m == "sync" else None)
        log.append(rec)
        done.append(rec)
        save_checkpoint(out / "checkpoint.pt", step=len(done), results=done)
    table = {
        LABELS[m]: {
            str(r["batch"]): {k: r[k] for k in ("ema_acc", "recomputed_acc", "steps")}
            for r in done
            if r["method"] == m
        }
        for m in cfg.method_list()
    }
    summary = {
        "experiment": NAME,
        "dataset": ds.name,
        "data_source": ds.source,
        "train_examples": len(tx),
        "test_examples": len(vx),
        "batch_sizes": cfg.sizes(),
        "methods": [LABELS[m] for m in cfg.method_list()],
        "results": done,
        "table": table,
        "wall_seconds": sum(r["train_seconds"] for r in done),
        "session_seconds": clock.elapsed,
        "config": dataclasses.asdict(cfg),
    }
    plot(summary, out / "small_batch.png")
    atomic_write_json(out / "summary.json", T.jsonable(summary))
    return summary


# ---------------------------------------------------------------- plots and report
def plot(summary: dict, path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for i, (label, rows) in enumerate(summary["table"].items()):
        bs = sorted(rows, key=int)
        for ax, key in zip(axes, ("ema_acc", "recomputed_acc"), strict=True):
            ax.plot(
                [int(b) for b in bs], [rows[b][key] for b in bs], "o-", color=f"C{i}", label=label
            )
    for ax, t in zip(axes, ("EMA running statistics", "recomputed (Algorithm 2)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("per-device batch size")
        ax.set_title(f"test accuracy, {t}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[0].legend()
    fig.suptitle(f"Small batches on {summary['dataset']}")
    save_figure(fig, path)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def table_rows(summary: dict) -> list[list[str]]:
    rows = []
    for label, per_b in summary["table"].items():
        for b in sorted(per_b, key=int):
            r = per_b[b]
            rows.append([label, b, _pct(r["ema_acc"]), _pct(r["recomputed_acc"]), str(r["steps"])])
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
                f"BN at {lo}: {_pct(a)} vs at {hi}: {_pct(z)} (EMA)",
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
                    f"{LABELS[m]} {_pct(a)} vs BN {_pct(z)} at batch {lo}",
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
