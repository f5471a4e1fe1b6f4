"""Figure 1 experiment: summary contract, BN beats the baseline, determinism, exact resume."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from batchnorm.research.engine import loop
from batchnorm.research.engine.runner import read_metrics
from batchnorm.research.experiments import fig1

CFG = fig1.Config(dataset="digits", steps=200, eval_every=50, workers=1)


def _strip_wall(summary: dict) -> dict:
    s = json.loads(json.dumps(summary))
    for key in ("wall_seconds", "session_seconds"):
        s.pop(key)
    for r in s["runs"].values():
        r.pop("wall_seconds")
    return s


def _metrics_without_wall(path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(path)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fig1")
    summary = fig1.run(CFG, out, quiet=True)
    return out, summary


def test_summary_follows_the_contract(run_dir):
    out, summary = run_dir
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["experiment"] == "fig1" and on_disk["dataset"] == "digits"
    assert on_disk["steps"] == 200 and isinstance(on_disk["steps"], int)
    assert set(on_disk["runs"]) == {"baseline", "bn"} == set(on_disk["percentiles"])
    expected_steps = list(range(0, 201, 50))
    for arm in ("baseline", "bn"):
        r = on_disk["runs"][arm]
        assert [s for s, _ in r["curve"]] == expected_steps
        assert all(isinstance(s, int) and 0.0 <= a <= 1.0 for s, a in r["curve"])
        assert r["final_test_accuracy"] == r["curve"][-1][1]
        assert isinstance(r["wall_seconds"], float) and r["wall_seconds"] > 0
        p = on_disk["percentiles"][arm]
        assert p["steps"] == expected_steps
        for lo, mid, hi in zip(p["p15"], p["p50"], p["p85"], strict=True):
            assert lo <= mid <= hi
    for name in (
        "config.json",
        "metrics.jsonl",
        "fig1.png",
        "checkpoint-baseline.pt",
        "checkpoint-bn.pt",
    ):
        assert (out / name).exists(), name


def test_bn_network_beats_the_baseline(run_dir):
    _, s = run_dir
    bn, base = s["runs"]["bn"]["final_test_accuracy"], s["runs"]["baseline"]["final_test_accuracy"]
    assert bn > base + 0.2, (bn, base)
    assert bn > 0.8


def test_percentiles_are_those_of_the_tracked_sigmoid_input(run_dir):
    """Recompute the last recorded percentiles from the saved model, independently of evaluate()."""
    out, s = run_dir
    from batchnorm.research.data import load_dataset

    data = load_dataset("digits")
    for arm in ("baseline", "bn"):
        net = fig1.build_mlp(arm == "bn", CFG.init_std, torch.Generator().manual_seed(0))
        net.load_state_dict(torch.load(out / f"checkpoint-{arm}.pt", weights_only=True)["model"])
        net.eval()
        with torch.no_grad():
            z = net[:-2](data.test_x.flatten(1))[:, CFG.unit].double()  # input of the last sigmoid
        want = torch.quantile(z, torch.tensor([0.15, 0.5, 0.85], dtype=torch.float64))
        got = [s["percentiles"][arm][k][-1] for k in ("p15", "p50", "p85")]
        torch.testing.assert_close(
            torch.tensor(got, dtype=torch.float64), want, rtol=1e-5, atol=1e-6
        )


def test_bn_network_structure():
    g = torch.Generator().manual_seed(0)
    base, bn = (
        fig1.build_mlp(False, 0.05, g.manual_seed(0)),
        fig1.build_mlp(True, 0.05, g.manual_seed(0)),
    )
    lin_b = [m for m in base if isinstance(m, torch.nn.Linear)]
    lin_n = [m for m in bn if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lin_b] == [
        (784, 100),
        (100, 100),
        (100, 100),
        (100, 10),
    ]
    assert [m.bias is None for m in lin_n] == [True, True, True, False]  # β replaces the bias
    assert sum(isinstance(m, __import__("batchnorm").BatchNorm1d) for m in bn) == 3
    for a, b in zip(lin_b, lin_n, strict=True):  # same initial weights in both networks
        assert torch.equal(a.weight, b.weight)
    assert abs(lin_b[0].weight.std().item() - 0.05) < 0.005


def test_same_seed_same_curves(run_dir, tmp_path):
    _, s = run_dir
    again = fig1.run(CFG, tmp_path, quiet=True)
    assert _strip_wall(again) == _strip_wall(s)


def test_resume_after_interrupt_gives_identical_results(run_dir, tmp_path, monkeypatch):
    """Interrupted in the BN network (the baseline finished) after logging step 150 but before
    its checkpoint: the resume drops that record and redoes steps 101-150 exactly."""
    ref_dir, ref = run_dir
    real = loop.append_record

    def interrupt(path, record):
        real(path, record)
        if (record["arm"], record["step"]) == ("bn", 150):
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "append_record", interrupt)
    with pytest.raises(KeyboardInterrupt):
        fig1.run(CFG, tmp_path, quiet=True)
    assert not (tmp_path / "summary.json").exists()
    monkeypatch.setattr(loop, "append_record", real)
    resumed = fig1.run(CFG, tmp_path, resume=True, quiet=True)
    assert _strip_wall(resumed) == _strip_wall(ref)
    got = sorted(
        _metrics_without_wall(tmp_path / "metrics.jsonl"), key=lambda r: (r["arm"], r["step"])
    )
    want = sorted(
        _metrics_without_wall(ref_dir / "metrics.jsonl"), key=lambda r: (r["arm"], r["step"])
    )
    assert got == want  # nothing logged twice, nothing lost


def test_resume_with_other_settings_is_refused(run_dir, tmp_path):
    fig1.run(dataclasses.replace(CFG, steps=100), tmp_path, quiet=True)
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(ValueError, match="other settings"):
        fig1.run(dataclasses.replace(CFG, steps=100, lr=0.1), tmp_path, resume=True, quiet=True)
    assert (tmp_path / "config.json").read_text() == before


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("steps", 0, "steps must be a positive integer"),
        ("batch_size", 1, "batch_size must be at least 2"),
        ("lr", -0.1, "lr must be a positive number"),
        ("lr", float("nan"), "lr must be a positive number"),
        ("unit", 100, "unit must be in 0..99"),
        ("workers", 3, "workers must be 1 or 2"),
        ("dataset", "cifar", "dataset must be"),
    ],
)
def test_bad_config_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(CFG, **{field: value})


def test_two_processes_match_one(run_dir, tmp_path):
    _, s = run_dir
    two = _strip_wall(fig1.run(dataclasses.replace(CFG, workers=2), tmp_path, quiet=True))
    one = _strip_wall(s)
    assert (two["runs"], two["percentiles"]) == (one["runs"], one["percentiles"])
