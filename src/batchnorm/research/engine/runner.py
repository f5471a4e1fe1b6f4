"""Building blocks every experiment uses: run directory, atomic files, metrics, checkpoints, RNG.

A run directory holds ``config.json`` (the experiment name, its config, library versions),
``metrics.jsonl`` (one JSON object per evaluation, appended as training goes),
``checkpoint-<arm>.pt`` (one per network, written atomically after each evaluation's record;
tensors and plain data only), ``summary.json``, ``*.png`` and ``report.html``.

The training loop (:mod:`.loop`) and the experiment driver (:mod:`.launch`) use these; an
experiment module never writes a run directory's files itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

__all__ = [
    "append_record",
    "keep_records",
    "jsonable",
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "die_with_parent",
    "env_info",
    "CheckpointError",
    "read_checkpoint",
    "prepare_run_dir",
    "progress",
    "read_json",
    "read_metrics",
    "RunDirError",
    "save_checkpoint",
    "Stopwatch",
]


# ---------------------------------------------------------------- atomic files
def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same directory and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """JSON (indented, UTF-8), written atomically."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` written atomically (a kill mid-write leaves the old file intact)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------- metrics
def keep_records(path: str | os.PathLike, keep: Callable[[dict], bool]) -> list[dict]:
    """Rewrite a metrics.jsonl (atomically) with only the records ``keep`` accepts; a resume
    drops what was logged after the checkpoints it goes on from. Returns the kept records."""
    path = Path(path)
    kept = [r for r in read_metrics(path) if keep(r)] if path.exists() else []
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
    return kept


def append_record(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line and flush it to disk before returning: a record is either whole
    in the file or (after a kill mid-write) a torn last line that :func:`read_metrics` skips."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All complete records of a metrics.jsonl (a torn last line from a kill is ignored)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


# ---------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | os.PathLike, *, step: int, **state: Any) -> Path:
    """Atomically save ``state`` (state_dicts, tensors, plain data) plus ``step``. No RNG state:
    every draw of a run is seeded from (seed, tag, step), so a resume needs none."""
    return atomic_save({"step": int(step), **state}, path)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read safely: damaged, truncated, or holding objects other
    than tensors and plain data (which ``weights_only`` loading refuses to execute)."""


def read_checkpoint(path: str | os.PathLike) -> dict:
    """``torch.load(path, weights_only=True)``: tensors and plain data only, so no code in the
    file ever runs. A file that does not load gets a :class:`CheckpointError` naming it."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage, a pickle with code in it, an old format
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else e}. It is damaged, or not a "
            f"checkpoint this version wrote (only tensors and plain data are loaded; nothing in "
            f"it is executed). Delete it to restart that part of the run, or rerun without "
            f"--resume into a new --out directory."
        ) from None
    if not isinstance(ckpt, dict) or "step" not in ckpt:
        raise CheckpointError(
            f"{path} is not a checkpoint of this package (no 'step' entry); "
            f"delete it, or use a new --out directory"
        )
    return ckpt


# ---------------------------------------------------------------- run directory and config
def option(help: str, **kw: Any) -> dict:
    """``field(metadata=option("..."))``: the help text the CLI shows for a Config field."""
    return {"help": help, **kw}


def env_info() -> dict:
    """Library versions and machine facts for config.json and the report."""
    import batchnorm

    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "batchnorm": getattr(batchnorm, "__version__", "?"),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    for mod in ("matplotlib", "sklearn"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            pass
    return info


class RunDirError(ValueError):
    """``--out`` names a directory this run must not write into (nothing in it was changed)."""


_RUN_FILES = ("metrics.jsonl", "summary.json", "report.html")


def prepare_run_dir(
    out: str | os.PathLike,
    name: str,
    cfg: Any,
    *,
    resume: bool,
    overwrite: bool = False,
) -> Path:
    """Create ``out`` (or take an empty one) and write ``config.json``.

    A directory that already holds files is only used when it is a run of the same experiment,
    and then only with ``resume`` (the saved config must equal ``cfg``: resuming with other
    settings would not reproduce anything) or ``overwrite`` (the earlier run's checkpoints,
    metrics, summary and report are removed; its other files stay). Anything else is refused
    with a :class:`RunDirError` before a single file changes: the user's own files are never
    deleted or overwritten.
    """
    out = Path(out)
    cfg_dict = dataclasses.asdict(cfg)
    cfg_path = out / "config.json"
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        saved = None
        if cfg_path.is_file():
            try:
                saved = read_json(cfg_path)
            except (OSError, ValueError):
                saved = None
        if not isinstance(saved, dict) or saved.get("experiment") != name:
            what = (
                f"a {saved['experiment']!r} run"
                if isinstance(saved, dict) and saved.get("experiment")
                else "files that are not a run of this package"
            )
            raise RunDirError(
                f"--out {out} is not empty and holds {what}, not a {name!r} run; nothing was "
                f"changed. Choose a new or empty --out directory."
            )
        if resume:
            if saved.get("config") != cfg_dict:
                diff = {
                    k: (saved.get("config", {}).get(k), v)
                    for k, v in cfg_dict.items()
                    if saved.get("config", {}).get(k) != v
                }
                raise RunDirError(
                    f"--resume: {out} holds a run of {name!r} with other settings (saved vs "
                    f"requested: {diff}); resume with the same options, or use another --out"
                )
        elif overwrite:
            for p in list(out.glob("checkpoint*.pt")) + [out / f for f in _RUN_FILES]:
                p.unlink(missing_ok=True)
        else:
            raise RunDirError(
                f"--out {out} already holds a {name!r} run; nothing was changed. Add --resume to "
                f"continue it, --overwrite to start it again, or choose another --out."
            )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg_path, {"experiment": name, "config": cfg_dict, "env": env_info()})
    return out


def die_with_parent() -> None:
    """Call first thing in a worker process: the kernel kills it when its parent dies, even by
    SIGKILL, so no orphan goes on writing into a run directory that a ``--resume`` is reading
    (Linux ``prctl(PR_SET_PDEATHSIG)``; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before the call: nobody will read our results
        os._exit(1)


def under_torchrun() -> bool:
    """Whether ``torchrun`` started this process as one of several (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def exit_worker(code: int) -> NoReturn:
    """End a distributed worker whose results are on disk, without the interpreter's and C++
    static teardown: there a still-joinable gloo thread can abort a finished worker (SIGABRT,
    "terminate called without an active exception") and fail a good run."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ---------------------------------------------------------------- progress and time
def progress(
    iterable: Iterable | None = None,
    desc: str = "",
    *,
    total: int | None = None,
    initial: int = 0,
    quiet: bool = False,
    position: int | None = None,
):
    """A tqdm bar (to stderr), or a silent pass-through when ``quiet``.

    A quiet bar is not a disabled tqdm: tqdm builds a multiprocessing lock even then, and a
    worker process that leaves with ``os._exit`` (as the engine's do) never releases it, so the
    resource tracker warns of leaked semaphores at shutdown."""
    if quiet:
        return _NoBar(iterable)
    from tqdm.auto import tqdm

    return tqdm(
        iterable,
        desc=desc,
        total=total,
        initial=initial,
        disable=quiet,
        position=position,
        leave=True,
        dynamic_ncols=True,
        mininterval=0.5,
    )


class _NoBar:
    """What the engine uses of a tqdm bar, doing nothing."""

    def __init__(self, iterable: Iterable | None) -> None:
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable if self.iterable is not None else ())

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class Stopwatch:
    """Wall time that survives a resume: ``elapsed`` = time before the checkpoint + time since."""

    def __init__(self, before: float = 0.0):
        self.before = float(before)
        self.t0 = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.t0


def jsonable(obj: Any) -> Any:
    """``obj`` without tensors (dropped) and with non-finite floats as None, for summary.json."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items() if not isinstance(v, torch.Tensor)}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
