"""The ``ablation`` experiment: the six variants' settings, the table logic, a quick run."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from batchnorm import BatchNormBase
from batchnorm.research.experiments import ablation


def _count(model: nn.Module, kind) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def test_six_variants_apply_the_papers_recipe():
    cfg = ablation.Config(
        steps=1000, lr=0.01, weight_decay=5e-4, dropout=0.4, lr_decay=0.5, width=1
    )
    vs = {v.name: v for v in ablation.arms(cfg, None)}  # the arms do not look at the data
    assert tuple(vs) == ablation.VARIANTS
    models = {k: v.build() for k, v in vs.items()}
    for k, m in models.items():
        bn = k.startswith("BN")
        recipe = k in ("BN-x5", "BN-x30", "BN-x5-Sigmoid")
        assert (_count(m, BatchNormBase) > 0) == bn, k
        assert (_count(m, nn.LocalResponseNorm) > 0) == (not recipe), k
        assert [d.p for d in m.modules() if isinstance(d, nn.Dropout)] == [
            0.0 if recipe else 0.4
        ], k
        assert (
            _count(m, nn.Sigmoid if "Sigmoid" in k else nn.ReLU) > 0
            and _count(m, nn.ReLU if "Sigmoid" in k else nn.Sigmoid) == 0
        ), k
        assert vs[k].weight_decay == pytest.approx(1e-4 if recipe else 5e-4), k
        assert vs[k].augment.rotation == (5.0 if recipe else 10.0), k
    base = vs["Baseline"].lr
    assert vs["BN-Baseline"].lr(0) == base(0) == 0.01
    assert vs["BN-x5"].lr(0) == pytest.approx(5 * base(0))
    assert vs["BN-x30"].lr(0) == pytest.approx(30 * base(0))
    # the recipe decays the learning rate 6x faster: lr(t)/lr(0) = decay^(6 t / steps)
    assert base(1000) / base(0) == pytest.approx(0.5)
    assert vs["BN-x5"].lr(1000) / vs["BN-x5"].lr(0) == pytest.approx(0.5**6)
    assert vs["BN-x30"].lr(500) / vs["BN-x30"].lr(0) == pytest.approx(0.5**3)


def _res(accs, step=100, diverged=False):
    evals = [{"step": step * (i + 1), "test_acc": a} for i, a in enumerate(accs)]
    best = max(evals, key=lambda e: e["test_acc"])
    return {
        "records": evals,
        "best_acc": best["test_acc"],
        "best_step": best["step"],
        "final": evals[-1],
        "diverged": diverged,
        "ms_per_step": 1.0,
        "wall_seconds": 1.0,
    }


def test_table_counts_steps_to_the_baselines_best_and_the_speedup():
    results = {
        "Baseline": _res([0.5, 0.7, 0.8, 0.79]),
        "BN-x5": _res([0.75, 0.81, 0.85, 0.86]),
        "Baseline-Sigmoid": _res([0.1, 0.1, 0.1, 0.1]),
    }
    rows = {r["variant"]: r for r in ablation.table(results)}
    assert rows["Baseline"]["steps_to_baseline_best"] == 300 and rows["Baseline"]["speedup"] == 1.0
    assert rows["BN-x5"]["steps_to_baseline_best"] == 200
    assert rows["BN-x5"]["speedup"] == pytest.approx(1.5)
    assert rows["BN-x5"]["max_test_acc"] == 0.86 and rows["BN-x5"]["step_of_max"] == 400
    assert rows["Baseline-Sigmoid"]["steps_to_baseline_best"] is None
    assert rows["Baseline-Sigmoid"]["speedup"] is None


def test_quick_run_writes_table_plot_and_summary(tmp_path):
    from batchnorm.research.engine.report import render_report

    cfg = ablation.Config.quick()
    s = ablation.run(cfg, tmp_path, quiet=True)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert {
        "table",
        "curves",
        "baseline_best_acc",
        "baseline_best_step",
        "paper",
        "wall_seconds",
        "dataset",
        "config",
    } <= set(on_disk)
    assert [r["variant"] for r in on_disk["table"]] == list(ablation.VARIANTS)
    for r in on_disk["table"]:
        assert {"steps_to_baseline_best", "max_test_acc", "speedup", "ms_per_step"} <= set(r)
    assert all(len(c["step"]) == cfg.steps // cfg.eval_every for c in on_disk["curves"].values())
    base = next(r for r in s["table"] if r["variant"] == "Baseline")
    assert base["max_test_acc"] == s["baseline_best_acc"] and base["speedup"] == 1.0
    assert (tmp_path / "ablation_accuracy.png").stat().st_size > 1000
    page = render_report(tmp_path).read_text()
    assert "BN-x30" in page and "<img" in page
    assert "steps to it" in ablation.describe(s)


def test_inception_net_he_init_keeps_the_signal_alive():
    """Without BN, 13 conv layers with He init keep activations O(1) (torch's default shrinks them)."""
    from batchnorm.research.experiments.models import InceptionNet

    m = InceptionNet(bn=False, width=2).eval()
    x = torch.rand(16, 1, 28, 28)
    feats = m.blocks(m.stem(x))
    assert 0.1 < feats.pow(2).mean().sqrt().item() < 10
