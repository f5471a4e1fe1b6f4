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
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from .loop import Arm, checkpoint_path, train_arm
from .runner import (
    Stopwatch,
    atomic_write_json,
    die_with_parent,
    jsonable,
    keep_records,
    prepare_run_dir,
    read_checkpoint,
)

__all__ = ["run_experiment", "scale_of"]


def scale_of(cfg: Any) -> dict[str, Any]:
    """What scale a config runs at, said plainly: the settings that differ from the full run.

    ``kind`` is "full" (the experiment's defaults), "quick" (``Config.quick()``, a CI-sized run
    whose numbers are not the paper's scale) or "custom"; ``text`` is one line for reports.
    """
    cls = type(cfg)
    full, now = dataclasses.asdict(cls()), dataclasses.asdict(cfg)
    changed = {k: v for k, v in now.items() if v != full[k]}
    quick = hasattr(cls, "quick") and now == dataclasses.asdict(cls.quick())
    kind = "full" if not changed else "quick" if quick else "custom"
    what = ", ".join(f"{k}={v!r}" for k, v in changed.items())
    if kind == "full":
        text = "full run (the experiment's default settings)"
    elif kind == "quick":
        text = f"--quick run, not the paper's scale: {what}"
    else:
        text = f"custom run: {what} (full run: {', '.join(f'{k}={full[k]!r}' for k in changed)})"
    return {"kind": kind, "changed": changed, "text": text}


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
        train_arm(arm, data, Path(out), seed=cfg.seed, resume=resume, quiet=True, position=position)
        return
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    try:
        train_arm(arm, data, Path(out), seed=cfg.seed, resume=resume, quiet=True, rank=rank)
        dist.barrier()  # both ranks done before either tears gloo down
    finally:
        dist.destroy_process_group()
    # Every result is on disk. Leave without the interpreter's and C++ static teardown, where a
    # still-joinable gloo thread once aborted a finished worker (SIGABRT), failing a good run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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
    """Train ``exp``'s arms for ``cfg`` into the run directory ``out``; return the summary."""
    if not isinstance(cfg, exp.Config):
        raise TypeError(f"{exp.NAME}: expected a {exp.__name__}.Config, got {type(cfg).__name__}")
    data = exp.load(cfg)
    arms: list[Arm] = exp.arms(cfg, data)
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"{exp.NAME}: arm names must be unique, got {names}")
    out = prepare_run_dir(out, exp.NAME, cfg, resume=resume, overwrite=overwrite)
    clock = Stopwatch()

    def checkpointed(name: str) -> int:
        path = checkpoint_path(out, name)
        return int(read_checkpoint(path)["step"]) if resume and path.exists() else -1

    done = {name: checkpointed(name) for name in names}
    keep_records(out / "metrics.jsonl", lambda r: r.get("step", 0) <= done.get(r.get("arm"), -1))

    workers = int(getattr(cfg, "workers", 1))
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

    local = [a for a in arms if a.world == 1]
    if workers > 1 and len(local) > 1:
        _train_in_workers([job(a, i) for i, a in enumerate(local)], workers)
    else:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for a in local:
                train_arm(a, data, out, seed=cfg.seed, resume=resume, quiet=quiet)
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
        **summary,
        "session_seconds": clock.elapsed,
        "config": cfg_dict,
    }
    atomic_write_json(out / "summary.json", jsonable(summary))
    exp.plot(summary, out)
    return summary
