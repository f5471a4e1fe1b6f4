"""The ImageNet experiment, small: a generated image folder, BN-Inception at width 1/4 on
32x32 crops, the whole command under ``torchrun --standalone --nproc_per_node 2`` on CPU (gloo):
summary and report, a kill then a resume on another world size, and what per-process and
``--sync-bn`` statistics must be."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from batchnorm.research.data.images import make_image_folder
from batchnorm.research.engine.runner import read_metrics
from batchnorm.research.experiments import imagenet

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(
        tmp_path_factory.mktemp("imgs"), classes=4, per_class=(24, 8), size=(40, 36), seed=0
    )


def _cmd(nproc: int, data: Path, out: Path, *extra: str) -> list[str]:
    run = [*TORCHRUN, str(nproc)] if nproc > 1 else [sys.executable]
    return [*run, "-m", "batchnorm", "reproduce", "imagenet", "--quick", "--data-dir", str(data),
            "--out", str(out), "--quiet", *extra]  # fmt: skip


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def quick(folder, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run") / "imagenet"
    _run(_cmd(2, folder, out))
    return out, json.loads((out / "summary.json").read_text())


def test_the_quick_command_under_torchrun_writes_the_papers_table(quick):
    out, s = quick
    assert s["world_size"] == 2 and s["experiment"] == "imagenet" and s["classes"] == 4
    assert s["scale"]["kind"] == "quick"
    assert set(s["variants"]) == set(imagenet.VARIANTS)
    for v in s["variants"].values():
        steps = [p for p, _ in v["curve"]]
        assert steps == sorted(steps) and steps[-1] == imagenet.Config.quick().steps
        assert v["max_top1"] == max(a for _, a in v["curve"]) and 0 <= v["max_top1"] <= 1
        assert v["images_per_s"] > 0
    assert s["variants"]["Inception"]["steps_to_baseline_best"] is not None
    e = s["ensemble"]
    assert len(e["members"]) == 2 and 0 <= e["top1"] <= e["top5"] <= 1
    p = s["parameters"]
    assert p["full_width_1000_classes"] > 10_000_000 > p["this_run"]
    page = (out / "report.html").read_text()
    assert "paper: steps" in page and "31.0·10⁶" in page and "<img" in page
    assert (out / "imagenet_accuracy.png").stat().st_size > 1000
    keys = [(r["arm"], r["step"]) for r in read_metrics(out / "metrics.jsonl")]
    assert len(keys) == len(set(keys)), "a record was written by more than one rank"


def test_a_kill_then_a_resume_on_another_world_size(quick, folder, tmp_path):
    """Kill the torchrun group once the first network is done; resume in one process: the
    first network's results are kept as they were, the others finish, no record is doubled."""
    ref, ref_summary = quick
    out = tmp_path / "run"
    proc = subprocess.Popen(
        _cmd(2, folder, out), start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    end = time.monotonic() + 300
    first = out / "checkpoint-Inception.pt"
    while time.monotonic() < end and not (out / "checkpoint-BN-Baseline.pt").exists():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists() and not (out / "summary.json").exists()
    _run(_cmd(1, folder, out, "--resume"))
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 1 and set(s["variants"]) == set(imagenet.VARIANTS)
    assert s["variants"]["Inception"]["curve"] == ref_summary["variants"]["Inception"]["curve"]
    recs = read_metrics(out / "metrics.jsonl")
    keys = [(r["arm"], r["examples"]) for r in recs]
    assert len(keys) == len(set(keys))
    for name in imagenet.VARIANTS:  # every network reached the whole budget of examples
        assert max(r["examples"] for r in recs if r["arm"] == name) == 8 * 32


def _model(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoint-BN-x5.pt", weights_only=True)["model"]


def _rel(a: dict, b: dict, pick) -> float:
    return max(
        ((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-12)).item()
        for k in a
        if pick(k)
    )


def test_sync_bn_is_bn_over_the_global_batch_and_per_process_is_not(folder, tmp_path):
    """One optimizer step of 32 examples: 2 processes x 16 with --sync-bn equal 1 process x 32
    (weights and running statistics); without it each process normalizes its own 16."""
    one_step = ["--variants", "BN-x5", "--ensemble", "0", "--steps", "1", "--eval-every", "1"]
    runs = {
        "one": _cmd(1, folder, tmp_path / "one", *one_step, "--batch-size", "32"),
        "sync": _cmd(2, folder, tmp_path / "sync", *one_step, "--batch-size", "16", "--sync-bn"),
        "per": _cmd(2, folder, tmp_path / "per", *one_step, "--batch-size", "16"),
    }
    for cmd in runs.values():
        _run(cmd)
    one, sync, per = (_model(tmp_path / k) for k in runs)

    def params(k: str) -> bool:
        return "running" not in k and "num_batches" not in k

    def stats(k: str) -> bool:
        return "running_mean" in k

    assert _rel(sync, one, stats) < 1e-4 and _rel(sync, one, params) < 1e-4
    assert _rel(per, one, stats) > 1e-2 and _rel(per, one, params) > 1e-2


def test_a_missing_data_dir_is_a_clear_error(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "batchnorm", "reproduce", "imagenet", "--quick", "--out",
         str(tmp_path / "o")], capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 1 and "--data-dir" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists()


def test_arms_follow_the_papers_variants():
    cfg = imagenet.Config(ensemble=3)
    arms = {a.name: a for a in imagenet.arms(cfg, None)}
    assert list(arms)[:5] == list(imagenet.VARIANTS)
    base = arms["Inception"].lr(0)
    assert base == pytest.approx(0.0015)
    assert arms["BN-Baseline"].lr(0) == base and arms["BN-x5"].lr(0) == pytest.approx(5 * base)
    assert arms["BN-x30"].lr(0) == pytest.approx(30 * base)
    assert arms["BN-x5"].weight_decay == pytest.approx(cfg.weight_decay / 5)
    assert arms["BN-x5"].augment == pytest.approx(arms["Inception"].augment / 2)
    s = 10_000
    assert arms["BN-x5"].lr(s) / arms["BN-x5"].lr(0) == pytest.approx(
        (arms["Inception"].lr(s) / base) ** 6
    )  # decays 6x faster
    assert arms["ensemble-1"].meta["dropout"] == 0.05 and arms["ensemble-1"].meta["final_bn"]
