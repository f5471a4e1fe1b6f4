"""Run an experiment: its arms in this process, in worker processes, or as a process group.

An experiment module defines ``NAME``, ``Config`` (a dataclass), ``load(cfg) -> Data``,
``arms(cfg, data) -> list[Arm]``, ``summarize(cfg, data, results) -> dict`` and
``plot(summary, out)``; :func:`run_experiment` does the rest, the same way for all of them:

1. load the data (a missing data set fails before the run directory is touched);
2. claim the run directory (:func:`~.runner.prepare_run_dir`: never someone else's files);
3. keep the metrics each arm logged up to its checkpoint (a resume redoes the rest);
4. train the arms: one after another here; with ``cfg.workers > 1`` in that many spawned
   processes; an arm with ``world > 1`` in ``world`` processes joined by a gloo group (on
   loopback). Every worker dies with its parent (``die_with_parent``), so no orphan writes
   into a directory that a ``--resume`` is reading;
5. read each arm's result from its checkpoint, summarize, write ``summary.json`` (with the
   run's scale) and the figures.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every process runs this same
function: they join one process group (NCCL on CUDA, gloo on CPU), every arm trains on all of
them with DistributedDataParallel (each process keeps the experiment's per-process batch, so
the global batch grows with the world size), evaluation is sharded, and rank 0 alone writes
the run directory, logs and prints. A checkpoint resumes on another world size.

Workers rebuild the experiment from its module name and config (closures do not cross
process boundaries), so the same code runs in one process and in many.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from .loop import Arm, Runtime, checkpoint_path, train_arm
from .runner import (
    Stopwatch,
    atomic_write_json,
    die_with_parent,
    exit_worker,
    jsonable,
    keep_records,
    prepare_run_dir,
    read_checkpoint,
    under_torchrun,
)

__all__ = [
    "RankStopped",
    "experiment_runner",
    "resolve_device",
    "run_experiment",
    "runtime_of",
    "scale_of",
]


# where and how a run executes, not how much it computes: not part of its scale
NOT_SCALE = frozenset(
    {
        "data_dir",
        "device",
        "amp",
        "channels_last",
        "sync_bn",
        "workers",
        "threads",
        "loader_workers",
    }
)


def scale_of(cfg: Any) -> dict[str, Any]:
    """What scale a config runs at, said plainly: the settings that differ from the full run.

    ``kind`` is "full" (the experiment's defaults), "quick" (``Config.quick()``, a CI-sized run
    whose numbers are not the paper's scale) or "custom"; ``text`` is one line for reports.
    """
    cls = type(cfg)
    full, now = dataclasses.asdict(cls()), dataclasses.asdict(cfg)
    changed = {k: v for k, v in now.items() if v != full[k] and k not in NOT_SCALE}
    quick_cfg = dataclasses.asdict(cls.quick()) if hasattr(cls, "quick") else None
    quick = quick_cfg is not None and all(now[k] == quick_cfg[k] for k in now if k not in NOT_SCALE)
    kind = "full" if not changed else "quick" if quick else "custom"
    what = ", ".join(f"{k}={v!r}" for k, v in changed.items())
    if kind == "full":
        text = "full run (the experiment's default settings)"
    elif kind == "quick":
        text = f"--quick run, not the paper's scale: {what}"
    else:
        text = f"custom run: {what} (full run: {', '.join(f'{k}={full[k]!r}' for k in changed)})"
    return {"kind": kind, "changed": changed, "text": text}


def resolve_device(device: str) -> str:
    """``auto``: CUDA when available (this process's GPU under torchrun), else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible; use --device cpu")
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    elif device != "cpu" and not device.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    return device


def runtime_of(cfg: Any) -> Runtime:
    """The :class:`Runtime` a config asks for (configs without those options run on the CPU)."""
    return Runtime(
        device=resolve_device(getattr(cfg, "device", "cpu")),
        amp=getattr(cfg, "amp", "off"),
        channels_last=getattr(cfg, "channels_last", True),
        sync_bn=getattr(cfg, "sync_bn", False),
    )


def _join_torchrun_group(rt: Runtime) -> tuple[int, int, bool] | None:
    """(rank, world size, whether this call created the group) when ``torchrun`` started several
    processes; joins their group."""
    if not under_torchrun():
        return None
    import torch.distributed as dist

    die_with_parent()  # if the torchrun agent is killed, its workers go with it
    created = not dist.is_initialized()
    if created:
        backend = "nccl" if rt.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return dist.get_rank(), dist.get_world_size(), created


def _on_group(arm: Arm, world: int) -> Arm:
    """``arm`` on ``world`` processes: each keeps the arm's per-process batch, and the arm
    trains on the same number of examples, so its steps, evaluation steps and learning-rate
    schedule are rescaled by ``world / arm.world``."""
    k = world / arm.world
    per_process = arm.batch_size // arm.world
    lr = arm.lr
    return dataclasses.replace(
        arm,
        world=world,
        batch_size=per_process * world,
        steps=max(1, round(arm.steps / k)),
        evals=sorted({max(1, round(e / k)) if e else 0 for e in arm.evals}),
        lr=lambda s: lr(s * k),
    )


def _print_plan(exp: ModuleType, arms: list[Arm], rt: Runtime, workers: int) -> None:
    total = sum(a.steps for a in arms)
    at_once = f", {workers} at a time in worker processes" if workers > 1 else ""
    lines = [
        f"{exp.NAME}: {len(arms)} network(s), each on {arms[0].world if arms else 1} "
        f"process(es){at_once}, {rt.device}, amp {rt.amp}; {total:,} training steps in all"
    ]
    lines += [f"  {a.name}: {a.steps:,} steps of {a.batch_size} examples" for a in arms]
    print("\n".join(lines), file=sys.stderr)


def _arm(exp: ModuleType, cfg: Any, data: Any, name: str) -> Arm:
    for arm in exp.arms(cfg, data):
        if arm.name == name:
            return arm
    raise KeyError(f"{exp.NAME}: no arm named {name!r}")


def _worker(job: tuple) -> None:
    """One spawned process: rebuild the experiment, train one arm (or one rank of it)."""
    module, cfg_dict, name, out, resume, threads, position, rank, world, port = job
    die_with_parent()
    torch.set_num_threads(threads)
    exp = importlib.import_module(module)
    cfg = exp.Config(**cfg_dict)
    data = exp.load(cfg)
    arm = _arm(exp, cfg, data, name)
    if world == 1:
        train_arm(
            arm, data, Path(out), seed=cfg.seed, resume=resume, quiet=True, position=position,
            runtime=runtime_of(cfg),
        )  # fmt: skip
        return
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    try:
        rt = runtime_of(cfg)
        train_arm(
            arm, data, Path(out), seed=cfg.seed, resume=resume, quiet=True, rank=rank, runtime=rt
        )
        dist.barrier()  # both ranks done before either tears gloo down
    finally:
        dist.destroy_process_group()
    exit_worker(0)  # every result is on disk


def _rank_entry(rank: int, job: tuple) -> None:  # torch.multiprocessing.spawn passes the rank
    _worker(job[:7] + (rank,) + job[8:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _train_in_workers(jobs: list[tuple], workers: int) -> None:
    import multiprocessing as mp

    pool = mp.get_context("spawn").Pool(workers)
    ok = False
    try:
        pool.map(_worker, jobs, chunksize=1)
        ok = True
        pool.close()
    finally:
        if not ok:
            pool.terminate()
        pool.join()


def run_experiment(
    exp: ModuleType,
    cfg: Any,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train ``exp``'s arms for ``cfg`` into the run directory ``out``; return the summary
    (on every process but rank 0 of a torchrun group: an empty dict)."""
    if not isinstance(cfg, exp.Config):
        raise TypeError(f"{exp.NAME}: expected a {exp.__name__}.Config, got {type(cfg).__name__}")
    rt = runtime_of(cfg)
    group = _join_torchrun_group(rt)
    rank, world, created = group or (0, 1, False)
    lead = rank == 0
    data = exp.load(cfg)
    arms: list[Arm] = exp.arms(cfg, data)
    if group is not None:
        arms = [_on_group(a, world) for a in arms]
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"{exp.NAME}: arm names must be unique, got {names}")
    out = Path(out)
    error: BaseException | None = None
    if lead:
        try:
            out = prepare_run_dir(out, exp.NAME, cfg, resume=resume, overwrite=overwrite)
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the others know
            error = e
    if group is not None:  # the others start once rank 0 holds the run directory (or failed)
        _agree(error is None)
    if error is not None:
        raise error
    clock = Stopwatch()

    def checkpointed(name: str) -> int:
        path = checkpoint_path(out, name)
        return int(read_checkpoint(path)["step"]) if resume and path.exists() else -1

    if lead:
        done = {name: checkpointed(name) for name in names}
        keep_records(
            out / "metrics.jsonl", lambda r: r.get("step", 0) <= done.get(r.get("arm"), -1)
        )
    workers = int(getattr(cfg, "workers", 1))
    if lead and not quiet:
        _print_plan(exp, arms, rt, workers)
    threads = int(getattr(cfg, "threads", 0)) or torch.get_num_threads()
    cfg_dict = dataclasses.asdict(cfg)

    def job(a: Arm, position: int = 0, port: int = 0) -> tuple:
        return (
            exp.__name__,
            cfg_dict,
            a.name,
            str(out),
            resume,
            threads,
            position,
            0,
            a.world,
            port,
        )

    if group is not None:
        for a in arms:
            train_arm(
                a, data, out, seed=cfg.seed, resume=resume, quiet=quiet, runtime=rt, rank=rank
            )
        _agree(True)
        if created:  # every rank is done with the group: close it before any rank exits
            import torch.distributed as dist

            dist.destroy_process_group()
        if not lead:
            return {}
    else:
        local = [a for a in arms if a.world == 1]
        if workers > 1 and len(local) > 1:
            _train_in_workers([job(a, i) for i, a in enumerate(local)], workers)
        else:
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                for a in local:
                    train_arm(a, data, out, seed=cfg.seed, resume=resume, quiet=quiet, runtime=rt)
            finally:
                torch.set_num_threads(before)
        for a in arms:
            if a.world > 1:
                import torch.multiprocessing as tmp

                tmp.spawn(_rank_entry, args=(job(a, 0, _free_port()),), nprocs=a.world)

    results = {name: read_checkpoint(checkpoint_path(out, name))["result"] for name in names}
    summary = exp.summarize(cfg, data, results)
    summary = {
        "experiment": exp.NAME,
        "scale": scale_of(cfg),
        "dataset": data.name,
        "data_source": data.source,
        "world_size": world,
        "device": rt.device,
        **summary,
        "session_seconds": clock.elapsed,
        "config": cfg_dict,
    }
    atomic_write_json(out / "summary.json", jsonable(summary))
    exp.plot(summary, out)
    return summary


class RankStopped(RuntimeError):
    """Rank 0 of a torchrun group stopped with an error; the other ranks stop with this."""


def _agree(ok: bool) -> None:
    """A barrier that also carries rank 0's outcome: when rank 0 could not go on (its error
    is raised there), the other ranks stop with a clear error instead of waiting forever."""
    import torch.distributed as dist

    box = [ok]
    dist.broadcast_object_list(box, src=0)
    if not box[0]:
        raise RankStopped("rank 0 stopped (see its error); this rank stops too")


def experiment_runner(module: str) -> Callable[..., dict[str, Any]]:
    """The ``run`` function of the experiment module named ``module``: write ``run =
    experiment_runner(__name__)`` in it."""

    def run(
        cfg: Any, out: str | Path, *, resume: bool = False, overwrite: bool = False,
        quiet: bool = False,
    ) -> dict[str, Any]:  # fmt: skip
        """Train the experiment's arms for ``cfg`` into the run directory ``out``; write
        summary.json and the figures; return the summary."""
        return run_experiment(
            sys.modules[module], cfg, out, resume=resume, overwrite=overwrite, quiet=quiet
        )

    return run
