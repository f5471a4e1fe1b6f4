"""The one training loop: an :class:`Arm` is a network to train and what to measure on it.

Every experiment is a list of arms. For each, :func:`train_arm` runs SGD steps on the
mini-batches of a :class:`~.sampler.Batches` (stateless, so a resumed run repeats the
uninterrupted one), evaluates at the steps the arm lists, appends one record per evaluation
to ``metrics.jsonl`` and then writes the arm's checkpoint (model, optimizer, records, tracker
state). A resume drops the records logged after the checkpoint and trains on from it, so no
record is lost or doubled whatever killed the run.

Under a process group (``world > 1``, see :mod:`.launch`) each rank trains on its share of
every global mini-batch inside ``DistributedDataParallel``; rank 0 alone evaluates and
writes files.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import Augment, random_affine
from .data import Data
from .runner import Stopwatch, append_record, progress, read_checkpoint, save_checkpoint
from .sampler import Batches, step_seed

__all__ = ["Arm", "build", "checkpoint_path", "evaluate", "every", "sgd", "train_arm"]

Measure = Callable[[nn.Module, int], dict[str, Any]]


def sgd(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
    """Momentum SGD (the paper's optimizer); L2 on conv/linear weights only, not on BN's γ, β
    or biases."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    rest = [p for p in model.parameters() if p.dim() <= 1]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def every(k: int, steps: int, *, start: bool = False) -> list[int]:
    """Evaluation steps k, 2k, ... and always the last (and step 0 with ``start``)."""
    return sorted({*range(k, steps + 1, k), steps} | ({0} if start else set()))


@dataclass
class Arm:
    """One network to train, how, and what to measure on it.

    ``build`` makes the model; arms with the same ``init`` tag start from the same weights
    (torch's RNG is seeded from it before ``build``), arms with the same ``order`` tag see the
    same mini-batches. ``lr(step)`` is the learning rate of each step; ``measure(model, step)``
    returns the numbers recorded at each step of ``evals`` (default: test loss, top-1 and top-5
    accuracy); ``finish(model)`` adds results once training ends; ``track(model)`` returns an
    object with ``attach``/``remove``/``state_dict``/``load_state_dict``/``results`` (e.g.
    :class:`batchnorm.diagnostics.ActivationTracker`) that records during training steps only.
    ``world > 1`` trains the arm in that many processes (DDP, ``batch_size`` is global).
    """

    name: str
    build: Callable[[], nn.Module]
    steps: int
    batch_size: int
    lr: Callable[[int], float]
    momentum: float = 0.9
    weight_decay: float = 0.0
    augment: Augment | None = None
    evals: Sequence[int] = ()  # steps after which to measure; the last step always
    measure: Measure | None = None
    finish: Callable[[nn.Module], dict[str, Any]] | None = None
    track: Callable[[nn.Module], Any] | None = None
    init: str = ""  # default: the arm's name
    order: str = ""  # default: the arm's name
    train_n: int | None = None  # train on the first train_n examples only
    world: int = 1
    divergence: float = 1e4  # a training loss above this (or NaN/inf) stops the arm
    meta: dict[str, Any] = field(default_factory=dict)  # copied into the arm's result

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9._+/-]+", self.name):
            raise ValueError(f"arm name {self.name!r}: use letters, digits and . _ + - / only")
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"arm {self.name}: steps >= 0 and batch_size >= 1 are required")
        if self.batch_size % self.world:
            raise ValueError(
                f"arm {self.name}: batch_size {self.batch_size} does not split over "
                f"{self.world} processes"
            )
        self.evals = sorted({s for s in self.evals if 0 <= s <= self.steps} | {self.steps})


def checkpoint_path(out: Path, arm: str) -> Path:
    return Path(out) / f"checkpoint-{arm.replace('/', '~')}.pt"


def build(arm: Arm, seed: int) -> nn.Module:
    """``arm``'s model at its initial weights (the same for every arm with its ``init`` tag)."""
    torch.manual_seed(step_seed(seed, "init/" + (arm.init or arm.name)))
    return arm.build()


@torch.no_grad()
def evaluate(model: nn.Module, data: Data, batch_size: int = 1000, device: str = "cpu") -> dict:
    """Eval-mode test loss, top-1 and top-5 accuracy (float64 sums)."""
    was = model.training
    model.eval()
    loss, top1, top5, n = 0.0, 0, 0, 0
    for x, y in data.test_batches(batch_size):
        x, y = x.to(device), y.to(device)
        logits = model(x).double()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        top1 += int((top[:, 0] == y).sum())
        top5 += int((top == y[:, None]).any(1).sum())
        n += len(y)
    model.train(was)
    out = {"test_loss": loss / n, "test_acc": top1 / n, "test_top5": top5 / n}
    if not math.isfinite(out["test_loss"]):
        out["test_loss"] = float("inf")
    return out


def _median(xs: list[float]) -> float:
    """Median step time: robust to warm-up steps and other processes' bursts."""
    return float(torch.tensor(xs, dtype=torch.float64).median()) if xs else float("nan")


def train_arm(
    arm: Arm,
    data: Data,
    out: Path,
    *,
    seed: int,
    resume: bool,
    quiet: bool = True,
    device: str = "cpu",
    rank: int = 0,
    position: int = 0,
) -> dict[str, Any]:
    """Train ``arm`` (resuming from its checkpoint when ``resume``); return its result."""
    ckpt_file = checkpoint_path(out, arm.name)
    ckpt = read_checkpoint(ckpt_file) if resume and ckpt_file.exists() else None
    if ckpt is not None and ckpt.get("result") is not None:
        return ckpt["result"]  # finished before the interruption

    model = build(arm, seed).to(device)
    opt = sgd(model, arm.lr(0), arm.momentum, arm.weight_decay)
    state: dict[str, Any] = {
        "step": 0,
        "records": [],
        "elapsed": 0.0,
        "step_s": [],
        "diverged": False,
    }
    tracker = arm.track(model) if arm.track is not None else None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        state = {k: ckpt[k] for k in state}
        if tracker is not None:
            tracker.load_state_dict(ckpt["tracker"])
    net: nn.Module = model
    if arm.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model)
    n = data.n_train if arm.train_n is None else min(arm.train_n, data.n_train)
    batches = Batches(n, arm.batch_size, seed, "order/" + (arm.order or arm.name))
    clock = Stopwatch(state["elapsed"])
    records: list[dict] = state["records"]
    lead = rank == 0
    measure = arm.measure or (lambda m, s: evaluate(m, data, device=device))

    def record(step: int, loss: float | None, acc: float | None) -> None:
        if tracker is not None:
            tracker.remove()  # measurements' forward passes are not training steps
        rec = {
            "arm": arm.name,
            "step": step,
            "epoch": step / batches.steps_per_epoch,
            "lr": arm.lr(max(step - 1, 0)),
            "train_loss": loss,
            "train_acc": acc,
            **measure(model, step),
            "seconds": round(clock.elapsed, 3),
        }
        if tracker is not None:
            tracker.attach()
        records.append(rec)
        append_record(out / "metrics.jsonl", rec)

    def checkpoint(step: int, result: dict | None = None) -> None:
        state.update(step=step, elapsed=clock.elapsed)
        save_checkpoint(
            ckpt_file,
            step=step,
            model=model.state_dict(),
            optimizer=opt.state_dict(),
            tracker=tracker.state_dict() if tracker is not None else None,
            result=result,
            **{k: v for k, v in state.items() if k != "step"},
        )

    step = state["step"]
    if tracker is not None:
        tracker.attach()
    try:
        if lead and step == 0 and 0 in arm.evals:
            record(0, None, None)
        bar = progress(
            total=arm.steps, desc=arm.name, initial=step, quiet=quiet or not lead, position=position
        )
        loss_sum = acc_sum = 0.0
        window = 0
        stream = data.train_batches(batches, step, arm.steps, rank, arm.world)
        for x, y in stream:
            t0 = time.perf_counter()
            x, y = x.to(device), y.to(device)
            if arm.augment is not None and not arm.augment.off:
                g = torch.Generator().manual_seed(step_seed(seed, "augment/" + arm.name, step))
                x = random_affine(
                    x, arm.augment.rotation, arm.augment.shear, arm.augment.zoom, generator=g
                )
            torch.manual_seed(
                step_seed(seed, "step/" + arm.name, step * arm.world + rank)
            )  # dropout
            for group in opt.param_groups:
                group["lr"] = arm.lr(step)
            net.train()
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            value = loss.item()
            if math.isfinite(value):
                loss.backward()
                opt.step()
            acc = (logits.argmax(1) == y).float().mean().item()
            state["step_s"].append(time.perf_counter() - t0)
            step += 1
            bar.update(1)
            loss_sum, acc_sum, window = loss_sum + value, acc_sum + acc, window + 1
            if not math.isfinite(value) or value > arm.divergence:
                state["diverged"] = True
            if step in arm.evals or state["diverged"]:
                if lead:
                    record(step, loss_sum / window, acc_sum / window)
                    checkpoint(step)
                loss_sum = acc_sum = 0.0
                window = 0
            if state["diverged"]:
                break
        bar.close()
    finally:
        if tracker is not None:
            tracker.remove()
    if not lead:
        return {}
    with_acc = [r for r in records if r.get("test_acc") is not None and r["step"] > 0] or records
    best = max(with_acc, key=lambda r: r.get("test_acc", 0.0)) if with_acc else {}
    result: dict[str, Any] = {
        "arm": arm.name,
        "records": records,
        "steps": step,
        "wall_seconds": clock.elapsed,
        "ms_per_step": 1000 * _median(state["step_s"]),
        "diverged": state["diverged"],
        "final": records[-1] if records else None,
        "best_acc": best.get("test_acc"),
        "best_step": best.get("step"),
        **arm.meta,
    }
    if tracker is not None:
        result["track"] = tracker.results()
    if arm.finish is not None:
        result.update(arm.finish(model))
    checkpoint(step, result)
    return result
