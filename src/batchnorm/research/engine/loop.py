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

import contextlib
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import Data
from .runner import Stopwatch, append_record, progress, read_checkpoint, save_checkpoint
from .sampler import Batches, step_seed

__all__ = ["Arm", "Runtime", "build", "checkpoint_path", "evaluate", "every", "sgd", "train_arm"]

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
    augment: Any = None  # the data's augmentation setting (an Augment for in-memory images)
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


@dataclass(frozen=True)
class Runtime:
    """Where and how the arms run: the device, mixed precision, memory layout, SyncBatchNorm.

    ``amp`` is "off", "bf16" or "fp16" (fp16 with a gradient scaler; CUDA only); CUDA runs in
    channels_last when ``channels_last``. ``sync_bn`` turns every BN layer into this package's
    SyncBatchNorm when several processes train an arm (default: statistics per process).
    """

    device: str = "cpu"
    amp: str = "off"
    channels_last: bool = False
    sync_bn: bool = False

    def __post_init__(self) -> None:
        if self.amp not in ("off", "bf16", "fp16"):
            raise ValueError(f"amp must be off, bf16 or fp16, got {self.amp!r}")
        if self.amp == "fp16" and not self.device.startswith("cuda"):
            raise ValueError("--amp fp16 needs a CUDA device; use --amp bf16 on CPU, or off")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp == "off":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(torch.device(self.device).type, dtype=dtype)

    def place(self, x: Tensor) -> Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4 and self.device.startswith("cuda"):
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def _all_sum(values: list[float], device: str) -> list[float]:
    """Sum over the processes of the group (identity without one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Data,
    batch_size: int = 1000,
    runtime: Runtime | None = None,
    *,
    rank: int = 0,
    world: int = 1,
) -> dict:
    """Eval-mode test loss, top-1 and top-5 accuracy (float64 sums). With ``world > 1`` every
    process evaluates its shard and the sums are added over the group."""
    rt = runtime or Runtime()
    was = model.training
    model.eval()
    loss, top1, top5, n = 0.0, 0.0, 0.0, 0.0
    for x, y in data.test_batches(batch_size, rank=rank, world=world):
        x, y = rt.place(x), y.to(rt.device)
        with rt.autocast():
            logits = model(x)
        logits = logits.double()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        top1 += int((top[:, 0] == y).sum())
        top5 += int((top == y[:, None]).any(1).sum())
        n += len(y)
    model.train(was)
    if world > 1:
        loss, top1, top5, n = _all_sum([loss, top1, top5, n], rt.device)
    out = {"test_loss": loss / n, "test_acc": top1 / n, "test_top5": top5 / n}
    if not math.isfinite(out["test_loss"]):
        out["test_loss"] = float("inf")
    return out


def _from_rank0(obj: Any) -> Any:
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _median(xs: list[float]) -> float:
    """Median step time: robust to warm-up steps and other processes' bursts."""
    return float(torch.tensor(xs, dtype=torch.float64).median()) if xs else float("nan")


PLAN_STEPS = 10  # steps timed before the estimate of an arm's duration is printed


def train_arm(
    arm: Arm,
    data: Data,
    out: Path,
    *,
    seed: int,
    resume: bool,
    quiet: bool = True,
    runtime: Runtime | None = None,
    rank: int = 0,
    position: int = 0,
) -> dict[str, Any]:
    """Train ``arm`` (resuming from its checkpoint when ``resume``); return its result.

    With ``arm.world > 1`` this is one process of a group (``torch.distributed`` initialized):
    it trains on its share of every mini-batch inside DistributedDataParallel, evaluates its
    shard of the test set, and only rank 0 writes records and checkpoints.
    """
    rt = runtime or Runtime()
    ckpt_file = checkpoint_path(out, arm.name)
    ckpt = read_checkpoint(ckpt_file) if resume and rank == 0 and ckpt_file.exists() else None
    if arm.world > 1:  # rank 0's reading, for every rank (no shared file system needed)
        ckpt = _from_rank0(ckpt)
    if ckpt is not None and ckpt.get("result") is not None:
        return ckpt["result"]  # finished before the interruption

    model = build(arm, seed)
    if arm.world > 1 and rt.sync_bn:
        from ...layers import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)
    model = model.to(rt.device)
    if rt.channels_last and rt.device.startswith("cuda"):
        model = model.to(memory_format=torch.channels_last)
    opt = sgd(model, arm.lr(0), arm.momentum, arm.weight_decay)
    scaler = torch.amp.GradScaler(enabled=rt.amp == "fp16")
    state: dict[str, Any] = {
        "step": 0, "records": [], "elapsed": 0.0, "step_s": [], "diverged": False,
    }  # fmt: skip
    tracker = arm.track(model) if arm.track is not None else None
    if ckpt is not None:  # any world size: the model's own state_dict, the same optimizer
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        state = {k: ckpt[k] for k in state}
        saved_world = int(ckpt.get("world", arm.world))
        if saved_world != arm.world:  # resumed on another world size: the same examples seen
            state["step"] = round(state["step"] * saved_world / arm.world)
        if tracker is not None:
            tracker.load_state_dict(ckpt["tracker"])
    net: nn.Module = model
    if arm.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        cuda = rt.device.startswith("cuda")
        net = DDP(model, device_ids=[torch.device(rt.device).index] if cuda else None)
    n = data.n_train if arm.train_n is None else min(arm.train_n, data.n_train)
    batches = Batches(n, arm.batch_size, seed, "order/" + (arm.order or arm.name))
    clock = Stopwatch(state["elapsed"])
    records: list[dict] = state["records"]
    lead = rank == 0

    def measure(step: int) -> dict[str, Any] | None:
        """The numbers of an evaluation: every rank shares the default one; a custom measure
        runs on rank 0 alone."""
        if arm.measure is None:
            return evaluate(model, data, runtime=rt, rank=rank, world=arm.world)
        return arm.measure(model, step) if lead else None

    def record(step: int, loss: float | None, acc: float | None) -> None:
        if tracker is not None:
            tracker.remove()  # measurements' forward passes are not training steps
        numbers = measure(step)
        if tracker is not None:
            tracker.attach()
        if not lead:
            return
        rec = {
            "arm": arm.name, "step": step, "examples": step * arm.batch_size,
            "epoch": step / batches.steps_per_epoch,
            "lr": arm.lr(max(step - 1, 0)), "train_loss": loss, "train_acc": acc,
            **(numbers or {}), "seconds": round(clock.elapsed, 3),
        }  # fmt: skip
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
            world=arm.world,
            **{k: v for k, v in state.items() if k != "step"},
        )

    step = state["step"]
    if tracker is not None:
        tracker.attach()
    try:
        if step == 0 and 0 in arm.evals:
            record(0, None, None)
        bar = progress(
            total=arm.steps, desc=arm.name, initial=step, quiet=quiet or not lead, position=position
        )
        loss_sum = acc_sum = 0.0
        window = timed = 0
        stream = data.train_batches(
            batches, step, arm.steps, rank=rank, world=arm.world, augment=arm.augment, tag=arm.name
        )
        for x, y in stream:
            t0 = time.perf_counter()
            x, y = rt.place(x), y.to(rt.device, non_blocking=True)
            torch.manual_seed(step_seed(seed, "step/" + arm.name, step * arm.world + rank))
            for group in opt.param_groups:
                group["lr"] = arm.lr(step)
            net.train()
            with rt.autocast():
                logits = net(x)
                loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            value = loss.item()
            if math.isfinite(value):
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            acc = (logits.argmax(1) == y).float().mean().item()
            state["step_s"].append(time.perf_counter() - t0)
            step += 1
            timed += 1
            bar.update(1)
            if timed == PLAN_STEPS and lead and not quiet:
                _print_estimate(arm, step, state["step_s"][-PLAN_STEPS:])
            loss_sum, acc_sum, window = loss_sum + value, acc_sum + acc, window + 1
            if not math.isfinite(value) or value > arm.divergence:
                state["diverged"] = True
            if step in arm.evals or state["diverged"]:
                record(step, loss_sum / window, acc_sum / window)
                if lead:
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
    ms = 1000 * _median(state["step_s"])
    result: dict[str, Any] = {
        "arm": arm.name,
        "records": records,
        "steps": step,
        "wall_seconds": clock.elapsed,
        "ms_per_step": ms,
        "images_per_s": arm.batch_size * 1000 / ms if ms > 0 else None,
        "world": arm.world,
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


def _print_estimate(arm: Arm, step: int, seconds: list[float]) -> None:
    """The measured speed over the first timed steps and what it means for the arm."""
    per_step = _median(seconds)
    left = max(arm.steps - step, 0) * per_step
    print(
        f"{arm.name}: {arm.batch_size / per_step:,.1f} images/s over {len(seconds)} steps "
        f"({arm.world} process{'es' if arm.world > 1 else ''}); {arm.steps - step:,} steps "
        f"left, about {left / 3600:.2f} h (training only; evaluations add to it)",
        file=sys.stderr,
    )
