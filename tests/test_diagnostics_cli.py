"""`batchnorm diagnose`: a short run end to end (digits data, no download)."""

from __future__ import annotations

import json
import math

import pytest

from batchnorm.research.experiments import diagnose as D


def _diagnose_cli(argv: list[str]) -> int:
    """`batchnorm reproduce diagnose ARGS` (diagnose is registered once, like every experiment)."""
    from batchnorm.research import cli

    return cli.main(["reproduce", "diagnose", *argv])


def test_diagnose_cli_writes_run_directory_with_summary_keys(tmp_path, capsys):
    out = tmp_path / "run"
    rc = _diagnose_cli(
        ["--quick", "--steps", "20", "--measure-points", "2", "--out", str(out), "--quiet"]
    )
    assert rc == 0
    for name in (
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "report.html",
        "percentiles.png",
        "ics.png",
        "landscape.png",
    ):
        assert (out / name).stat().st_size > 0, name
    s = json.loads((out / "summary.json").read_text())
    assert {
        "experiment",
        "model",
        "dataset",
        "measure_steps",
        "arms",
        "percentiles",
        "aggregate",
        "statement",
        "step_sizes",
        "wall_seconds",
    } <= set(s)
    assert s["experiment"] == "diagnose" and s["dataset"] == "digits"
    assert s["measure_steps"] == [0, 20]
    for arm in ("baseline", "bn"):
        agg = s["aggregate"][arm]
        assert {"ics_l2", "ics_cosine", "effective_beta", "loss_range"} <= set(agg)
        assert all(math.isfinite(v) for v in agg.values())
        pts = s["arms"][arm]["points"]
        assert [p["step"] for p in pts] == [0, 20]
        assert pts[0]["ics"]["l2"][0] == 0.0  # the first layer has no earlier layers
        assert len(pts[0]["ics"]["layers"]) == 4  # the MLP's four Linear layers
        assert len(s["percentiles"][arm]["layers"]) == 3  # its three sigmoids
    assert s["arms"]["bn"]["points"][-1]["health"] is not None
    assert s["arms"]["baseline"]["points"][-1]["health"] is None
    assert "covariate shift" in s["statement"] and "smooth" in s["statement"]
    assert "report:" in capsys.readouterr().out


@pytest.mark.parametrize("model", ["mlp", "convnet"])
def test_diagnose_networks_share_initial_weights_and_measure_reproducibly(model):
    import torch
    from torch import nn

    cfg = D.Config(model=model, seed=3)
    nets = {arm: D.build_network(cfg, arm) for arm in D.ARMS}
    assert D.start_step(cfg) == 0
    layers = {
        arm: [m for m in net.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
        for arm, net in nets.items()
    }
    for a, b in zip(layers["baseline"], layers["bn"], strict=True):
        assert torch.equal(a.weight, b.weight)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 28, 28, generator=g)
    x = x.flatten(1) if model == "mlp" else x
    y = torch.randint(0, 10, (16,), generator=g)
    args = ([(x, y)], cfg.learning_rate(), [0.1, 0.4], x[:8], y[:8])
    first = D.measure(nets["bn"], *args)
    again = D.measure(D.build_network(cfg, "bn"), *args)
    assert first == again
    assert math.isfinite(first["landscape"]["effective_beta"])


def test_diagnose_cli_rejects_unknown_options_and_bad_values(capsys):
    with pytest.raises(SystemExit) as e:
        _diagnose_cli(["--no-such-option", "1"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        _diagnose_cli(["--step-multipliers", "1,x"])
    assert e.value.code == 2 and "step_multipliers" in capsys.readouterr().err


def test_diagnose_config_rejects_bad_values():
    with pytest.raises(ValueError, match="step_multipliers"):
        D.Config(step_multipliers="1,x")
    with pytest.raises(ValueError, match="steps"):
        D.Config(steps=-1)
    with pytest.raises(ValueError, match="from-run"):
        D.Config(model="convnet", from_run="somewhere")


def test_diagnose_from_a_fig1_run_directory(tmp_path):
    import torch

    from batchnorm.research.engine.runner import atomic_write_json
    from batchnorm.research.experiments import fig1

    run = tmp_path / "fig1"
    run.mkdir()
    atomic_write_json(
        run / "config.json", {"experiment": "fig1", "config": {"dataset": "digits", "lr": 0.3}}
    )
    nets = {}
    for arm in ("baseline", "bn"):
        nets[arm] = fig1.build_mlp(arm == "bn", 0.05, torch.Generator().manual_seed(7))
        torch.save({"step": 123, "model": nets[arm].state_dict()}, run / f"checkpoint-{arm}.pt")
    cfg = D.Config(
        from_run=str(run), steps=0, measure_points=1, measure_batches=1, step_multipliers="1"
    )
    s = D.run(cfg, tmp_path / "diag", quiet=True)
    assert s["start_step"] == 123 and s["measure_steps"] == [123]
    assert s["dataset"] == "digits" and s["lr"] == 0.3  # taken from the fig1 run
    # the measurement used the loaded weights: the gradient norm matches a direct computation
    lay = s["arms"]["bn"]["points"][0]["landscape"]
    assert lay["step_sizes"] == [0.3] and math.isfinite(lay["effective_beta"])
