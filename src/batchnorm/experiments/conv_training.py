"""Training pieces shared by the ``lenet``, ``ablation`` and ``claims`` experiments.

Resumable by construction: a step's mini-batch, augmentation and dropout masks depend only on
(seed, variant, step) — epoch permutations and per-step generators are re-derived, never
carried — so a checkpoint needs just the model, the optimizer and the step counter, and a
resumed run repeats the uninterrupted one exactly (same threads, same machine).
"""

from __future__ import annotations

import contextlib
import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.augment import random_affine
from .runner import option

__all__ = [
    "Augment",
    "Batches",
    "DataConfig",
    "Variant",
    "evaluate",
    "jsonable",
    "load_data",
    "sgd",
    "train_step",
    "train_variants",
    "variant_seed",
    "BN_IMPLS",
    "bn_impl",
    "with_bn_impl",
]


def variant_seed(seed: int, tag: str, step: int = 0) -> int:
    """A 62-bit seed for (run seed, variant name, step), stable across processes."""
    return (seed * 1_000_003 + zlib.crc32(tag.encode()) * 65_537 + step * 7_919) % (2**62)


@dataclass
class DataConfig:
    """The two data settings every conv-net experiment's Config starts with (its base class)."""

    dataset: str = field(
        default="", metadata=option("mnist, fashion-mnist or digits; empty: best available")
    )
    data_dir: str = field(
        default="", metadata=option("directory holding the dataset files (optional)")
    )


@dataclass
class Augment:
    """Strengths of ``random_affine`` (degrees, shear factor, relative zoom); all 0 = off."""

    rotation: float = 0.0
    shear: float = 0.0
    zoom: float = 0.0

    def scaled(self, f: float) -> Augment:
        return Augment(self.rotation * f, self.shear * f, self.zoom * f)

    @property
    def off(self) -> bool:
        return self.rotation == 0 and self.shear == 0 and self.zoom == 0


@dataclass
class Batches:
    """Mini-batch indices for step ``t``: epoch ``t // steps_per_epoch`` reshuffles the ``n``
    examples with a generator seeded by (seed, tag, epoch); the last partial batch is dropped."""

    n: int
    batch_size: int
    seed: int
    tag: str
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.batch_size > self.n:
            raise ValueError(
                f"batch_size {self.batch_size} exceeds the {self.n} training examples; "
                "use a smaller --batch-size or more data"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.batch_size

    def indices(self, step: int) -> Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch not in self._cache:
            g = torch.Generator().manual_seed(variant_seed(self.seed, self.tag + "/epoch", epoch))
            self._cache = {epoch: torch.randperm(self.n, generator=g)}
        return self._cache[epoch][i * self.batch_size : (i + 1) * self.batch_size]


def sgd(
    model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 0.0
) -> torch.optim.SGD:
    """Momentum SGD (the paper's optimizer); L2 on conv/linear weights only, not on BN's γ, β or biases."""
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    rest = [p for n, p in model.named_parameters() if p.dim() <= 1]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    lr: float,
    seed: int,
    augment: Augment | None = None,
) -> tuple[float, float, float]:
    """One SGD step on (x, y): returns (loss, batch accuracy, seconds). Loss is NaN/inf on divergence.

    ``seed`` fixes this step's augmentation and dropout masks (torch's global RNG is reseeded).
    """
    t0 = time.perf_counter()
    if augment is not None and not augment.off:
        g = torch.Generator().manual_seed(seed)
        x = random_affine(x, augment.rotation, augment.shear, augment.zoom, generator=g)
    torch.manual_seed(seed)  # dropout masks
    for group in opt.param_groups:
        group["lr"] = lr
    model.train()
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    opt.zero_grad(set_to_none=True)
    if math.isfinite(loss.item()):
        loss.backward()
        opt.step()
    acc = (logits.argmax(1) == y).float().mean().item()
    return loss.item(), acc, time.perf_counter() - t0


@torch.no_grad()
def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000, return_probs: bool = False
) -> dict:
    """Eval-mode loss, top-1 and top-5 accuracy (and softmax probabilities if asked) on (x, y)."""
    model.eval()
    losses, top1, top5, probs = 0.0, 0, 0, []
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size]).double()
        t = y[i : i + batch_size]
        losses += F.cross_entropy(logits, t, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        top1 += (top[:, 0] == t).sum().item()
        top5 += (top == t[:, None]).any(1).sum().item()
        if return_probs:
            probs.append(logits.softmax(1).float())
    n = len(x)
    out = {"loss": losses / n, "acc": top1 / n, "top5": top5 / n}
    if not math.isfinite(out["loss"]):
        out["loss"] = float("inf")
    if return_probs:
        out["probs"] = torch.cat(probs)
    return out


def load_data(
    dataset: str, data_dir: str = "", train_subset: int = 0, test_subset: int = 0, seed: int = 0
):
    """``batchnorm.data.load_dataset`` (``""`` = best available), optionally cut to fixed random
    subsets; returns (Dataset, train_x, train_y, test_x, test_y)."""
    from ..data import best_available, load_dataset

    dd = data_dir or None
    ds = load_dataset(dataset or best_available(dd), dd)
    tx, ty, vx, vy = ds.train_x, ds.train_y, ds.test_x, ds.test_y
    g = torch.Generator().manual_seed(variant_seed(seed, "subset"))
    if 0 < train_subset < len(tx):
        idx = torch.randperm(len(tx), generator=g)[:train_subset]
        tx, ty = tx[idx], ty[idx]
    if 0 < test_subset < len(vx):
        idx = torch.randperm(len(vx), generator=g)[:test_subset]
        vx, vy = vx[idx], vy[idx]
    return ds, tx, ty, vx, vy


# ---------------------------------------------------------------- several variants, resumable
@dataclass
class Variant:
    """One network to train: how to build it and its optimizer settings."""

    name: str
    build: Callable[[], nn.Module]
    lr: Callable[[int], float]  # step -> learning rate
    momentum: float = 0.9
    weight_decay: float = 0.0
    augment: Augment | None = None
    steps: int | None = None  # None: the shared budget
    train_n: int | None = None  # train on the first train_n examples only (None: all)
    # called once training ends: (model, test_x, test_y) -> extra results (tensors allowed)
    finish: Callable[[nn.Module, Tensor, Tensor], dict] | None = None


def train_variants(
    out: Path,
    variants: list[Variant],
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    *,
    steps: int,
    eval_every: int,
    batch_size: int,
    seed: int,
    resume: bool,
    quiet: bool,
    save_checkpoint: Callable[..., object],
) -> dict[str, dict]:
    """Train ``variants`` one after another; evaluate on the test split every ``eval_every`` steps.

    Writes one record per evaluation to ``out/metrics.jsonl`` and a checkpoint after each, so
    ``resume`` continues mid-variant. Returns {name: {"evals": [...], "wall_seconds",
    "ms_per_step" (median), "diverged", "final": last eval, "best_acc", "best_step", **finish(...)}}.
    A variant whose loss becomes NaN/inf stops there and is marked ``diverged``.
    """
    from .runner import MetricsLog, Stopwatch, load_checkpoint, progress

    tx, ty, vx, vy = data
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must be unique, got {names}")
    ckpt = load_checkpoint(out / "checkpoint.pt") if resume else None
    results: dict[str, dict] = dict(ckpt["results"]) if ckpt else {}
    current = ckpt.get("current") if ckpt else None

    def keep(r: dict) -> bool:
        if r.get("variant") in results:
            return True
        return (
            current is not None
            and r.get("variant") == current["name"]
            and r["step"] <= current["step"]
        )

    log = MetricsLog(out / "metrics.jsonl", keep=keep if ckpt else None)
    for v in variants:
        if v.name in results:
            continue
        budget = v.steps if v.steps is not None else steps
        tag = f"variant/{v.name}"
        torch.manual_seed(variant_seed(seed, tag + "/init"))
        model = v.build()
        opt = sgd(model, v.lr(0), v.momentum, v.weight_decay)
        n_train = len(tx) if v.train_n is None else min(v.train_n, len(tx))
        batches = Batches(n_train, batch_size, seed, tag)
        state = {"step": 0, "evals": [], "elapsed": 0.0, "step_s": [], "diverged": False}
        if current is not None and current["name"] == v.name:
            model.load_state_dict(current["model"])
            opt.load_state_dict(current["opt"])
            state = {k: current[k] for k in state}
        current = None
        clock = Stopwatch(state["elapsed"])
        loss_sum = acc_sum = 0.0
        n_window = 0
        bar = progress(total=budget, desc=v.name, initial=state["step"], quiet=quiet)
        step = state["step"]
        while step < budget and not state["diverged"]:
            idx = batches.indices(step)
            loss, acc, secs = train_step(
                model,
                opt,
                tx[idx],
                ty[idx],
                lr=v.lr(step),
                seed=variant_seed(seed, tag, step),
                augment=v.augment,
            )
            state["step_s"].append(secs)
            step += 1
            bar.update(1)
            if not math.isfinite(loss) or loss > 1e4:
                state["diverged"] = True
            loss_sum, acc_sum, n_window = loss_sum + loss, acc_sum + acc, n_window + 1
            if step % eval_every == 0 or step == budget or state["diverged"]:
                ev = evaluate(model, vx, vy)
                rec = {
                    "variant": v.name,
                    "step": step,
                    "epoch": step / batches.steps_per_epoch,
                    "lr": v.lr(step - 1),
                    "train_loss": loss_sum / n_window,
                    "train_acc": acc_sum / n_window,
                    "test_loss": ev["loss"],
                    "test_acc": ev["acc"],
                    "test_top5": ev["top5"],
                    "seconds": clock.elapsed,
                }
                log.append(rec)
                state["evals"].append(rec)
                loss_sum = acc_sum = 0.0
                n_window = 0
                state["step"], state["elapsed"] = step, clock.elapsed
                save_checkpoint(
                    out / "checkpoint.pt",
                    step=step,
                    results=results,
                    current={
                        "name": v.name,
                        "model": model.state_dict(),
                        "opt": opt.state_dict(),
                        **state,
                    },
                )
        bar.close()
        evals = state["evals"]
        best = max(evals, key=lambda r: r["test_acc"]) if evals else {"test_acc": 0.0, "step": 0}
        res = {
            "evals": evals,
            "wall_seconds": clock.elapsed,
            "steps": step,
            "ms_per_step": 1000 * _median(state["step_s"]),
            "diverged": state["diverged"],
            "final": evals[-1] if evals else None,
            "best_acc": best["test_acc"],
            "best_step": best["step"],
        }
        if v.finish is not None:
            res.update(v.finish(model, vx, vy))
        results[v.name] = res
        save_checkpoint(out / "checkpoint.pt", step=step, results=results, current=None)
    return results


def _median(xs: list[float]) -> float:
    """Median step time: robust to the first steps' warm-up and to other processes' bursts."""
    return float(torch.tensor(xs, dtype=torch.float64).median()) if xs else float("nan")


def jsonable(obj):
    """``obj`` without tensors (dropped) and with non-finite floats as None, for summary.json."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items() if not isinstance(v, Tensor)}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


BN_IMPLS = ("batchnorm", "torch")


@contextlib.contextmanager
def bn_impl(name: str):
    """Select which BN code the experiment's layers run, restoring the backend afterwards.

    ``batchnorm``: this package's layers, backend "auto" (the C++ kernels where they apply);
    ``torch``: the models are converted to ``torch.nn.BatchNorm*`` (see :func:`with_bn_impl`).
    """
    from ..ops import set_backend

    if name not in BN_IMPLS:
        raise ValueError(f"bn_impl must be one of {BN_IMPLS}, got {name!r}")
    old = set_backend("auto")
    try:
        yield
    finally:
        set_backend(old)


def with_bn_impl(build: Callable[[], nn.Module], name: str) -> Callable[[], nn.Module]:
    """``build`` whose model uses ``torch.nn.BatchNorm*`` when ``name == "torch"``."""
    if name != "torch":
        return build

    def converted() -> nn.Module:
        from ..tools import convert_model

        return convert_model(build(), to="torch")

    return converted
