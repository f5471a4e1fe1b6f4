"""The one experiment engine: sampler, arms, resume after SIGKILL (parent alone and the whole
group) with no record lost or doubled, and no code run from any file of a run directory."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from batchnorm.research.engine.loop import Arm, every
from batchnorm.research.engine.runner import read_metrics
from batchnorm.research.engine.sampler import Batches

LINUX = sys.platform.startswith("linux")


def test_batches_are_a_reshuffled_partition_per_epoch_split_over_ranks():
    b = Batches(10, 3, seed=0, tag="x")
    epoch0 = torch.cat([b.indices(s) for s in range(3)])
    epoch1 = torch.cat([b.indices(s) for s in range(3, 6)])
    assert len(set(epoch0.tolist())) == 9 and len(set(epoch1.tolist())) == 9
    assert not torch.equal(epoch0, epoch1)
    assert torch.equal(Batches(10, 3, seed=0, tag="x").indices(4), b.indices(4))  # stateless
    assert not torch.equal(Batches(10, 3, seed=0, tag="y").indices(0), b.indices(0))
    g = Batches(12, 4, seed=1, tag="z")
    shares = [g.indices(5, rank, 2) for rank in range(2)]
    assert torch.equal(torch.cat(shares), g.indices(5))
    with pytest.raises(ValueError, match="batch_size"):
        Batches(2, 3, seed=0, tag="x")


def test_every_lists_the_evaluation_steps():
    assert every(3, 10) == [3, 6, 9, 10]
    assert every(5, 10, start=True) == [0, 5, 10]


def test_an_arm_checks_its_name_and_split():
    net = torch.nn.Linear  # never built here
    with pytest.raises(ValueError, match="arm name"):
        Arm("a b", net, 1, 2, lambda s: 0.1)
    with pytest.raises(ValueError, match="does not split"):
        Arm("a", net, 1, 3, lambda s: 0.1, world=2)
    assert Arm("a", net, 10, 2, lambda s: 0.1, evals=[0, 5, 50]).evals == [0, 5, 10]


# ---------------------------------------------------------------- kills and resume
def _cli(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "batchnorm", "reproduce", "fig1", "--dataset", "digits",
        "--steps", "400", "--eval-every", "20", "--workers", "2", "--out", str(out), "--quiet",
        *extra,
    ]  # fmt: skip


def _records(path: Path) -> list[dict]:
    recs = [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(path)]
    return sorted(recs, key=lambda r: (r["arm"], r["step"]))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    subprocess.run(_cli(out), check=True, capture_output=True)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for its reaper is not running
        return f.read().split(")")[-1].split()[0] != "Z"


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.mark.skipif(not LINUX, reason="workers die with their parent through Linux's prctl")
@pytest.mark.parametrize("kill", ["parent alone", "whole group"])
def test_resume_after_sigkill_loses_no_record(reference, tmp_path, kill):
    """Kill the CLI while both networks train in worker processes, resume, and get exactly the
    uninterrupted run's metrics records (none lost, none doubled) and summary."""
    proc = subprocess.Popen(_cli(tmp_path), start_new_session=True, stderr=subprocess.DEVNULL)
    end = time.monotonic() + 120
    while time.monotonic() < end and not (tmp_path / "checkpoint-bn.pt").exists():
        time.sleep(0.02)
    workers = [c for p in _children(proc.pid) for c in [p, *_children(p)]]
    if kill == "parent alone":
        os.kill(proc.pid, signal.SIGKILL)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    end = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < end:
        time.sleep(0.05)
    assert not any(_alive(w) for w in workers), "a worker outlived its killed parent"
    assert not (tmp_path / "summary.json").exists(), "the kill came too late to test anything"
    subprocess.run(_cli(tmp_path, "--resume"), check=True, capture_output=True)
    assert _records(tmp_path / "metrics.jsonl") == _records(reference / "metrics.jsonl")
    got, want = (json.loads((d / "summary.json").read_text()) for d in (tmp_path, reference))
    assert got["runs"]["bn"]["curve"] == want["runs"]["bn"]["curve"]
    assert got["percentiles"] == want["percentiles"]


# ---------------------------------------------------------------- no code from a run directory
class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_no_command_executes_a_crafted_pickle_in_a_run_directory(reference, tmp_path):
    """Every checkpoint of a real run replaced by a pickle that would run a shell command:
    resume, report and diagnose --from-run refuse with the file's name; nothing executes."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    marker = tmp_path / "pwned"
    for ckpt in run.glob("checkpoint-*.pt"):
        torch.save({"step": 1, "model": _Payload(marker)}, ckpt)
        with open(ckpt.with_suffix(".pkl"), "wb") as f:  # a raw pickle beside it, too
            pickle.dump(_Payload(marker), f)
    commands = [
        _cli(run, "--resume"),
        [sys.executable, "-m", "batchnorm", "report", str(run)],
        [
            sys.executable, "-m", "batchnorm", "reproduce", "diagnose", "--from-run", str(run),
            "--steps", "0", "--measure-points", "1", "--out", str(tmp_path / "d"), "--quiet",
        ],
    ]  # fmt: skip
    outcomes = [subprocess.run(c, capture_output=True, text=True) for c in commands]
    assert not marker.exists(), "a pickle from the run directory was executed"
    for c, o in zip(commands, outcomes, strict=True):
        if c[3] == "report":
            assert o.returncode == 0, o.stderr  # the report reads JSON only
        else:
            assert o.returncode != 0 and "checkpoint-" in o.stderr, (c, o.stderr[-500:])
            assert "Traceback" not in o.stderr, o.stderr[-800:]


def test_quiet_progress_creates_no_multiprocessing_lock():
    """A quiet bar must not be a disabled tqdm: tqdm builds a multiprocessing lock even then,
    which the engine's workers (they leave with os._exit) would leak. In a fresh process, so
    that no earlier tqdm has built the lock already."""
    code = (
        "import multiprocessing, multiprocessing.resource_tracker as rt\n"
        "multiprocessing.set_start_method('spawn')  # as in a spawned worker: locks register\n"
        "calls = []\n"
        "rt.register = lambda *a: calls.append(a)\n"
        "from batchnorm.research.engine.runner import progress\n"
        "bar = progress(total=3, quiet=True)\n"
        "bar.update(1)\n"
        "bar.close()\n"
        "assert list(progress([1, 2], quiet=True)) == [1, 2]\n"
        "print(len(calls))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"
