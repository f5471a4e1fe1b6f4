"""The ``lenet`` experiment: quick run outputs, resume == uninterrupted, config checks."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from batchnorm.research.engine import loop
from batchnorm.research.engine.runner import read_metrics
from batchnorm.research.experiments import lenet

SUMMARY_KEYS = {
    "experiment",
    "dataset",
    "nets",
    "bn_step_overhead",
    "published",
    "wall_seconds",
    "train_examples",
    "test_examples",
    "steps_per_epoch",
    "bn_layers",
    "config",
}
NET_KEYS = {
    "test_acc",
    "test_loss",
    "best_test_acc",
    "wall_seconds",
    "ms_per_step",
    "epochs",
    "train_acc",
    "test_acc_curve",
    "diverged",
    "steps",
}


def _small(**kw) -> lenet.Config:
    return dataclasses.replace(lenet.Config.quick(), train_subset=384, **kw)


def test_quick_run_writes_the_run_directory(tmp_path):
    from batchnorm.research.engine.report import render_report

    cfg = lenet.Config.quick()
    s = lenet.run(cfg, tmp_path, quiet=True)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(on_disk)
    assert set(on_disk["nets"]) == set(lenet.VARIANTS)
    for r in on_disk["nets"].values():
        assert NET_KEYS <= set(r)
        assert len(r["train_acc"]) == len(r["test_acc_curve"]) == cfg.epochs
        assert 0 <= r["test_acc"] <= 1 and r["ms_per_step"] > 0
    assert on_disk["dataset"] == "digits" and on_disk["bn_layers"] == 4
    assert s["steps_per_epoch"] == s["train_examples"] // cfg.batch_size
    # one metrics record per net and epoch
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert len(recs) == len(lenet.VARIANTS) * cfg.epochs
    assert (tmp_path / "lenet_curves.png").stat().st_size > 1000
    assert render_report(tmp_path).read_text().count("<img") == 1
    # the BN net learns something on digits in 2 epochs (chance is 10%)
    assert s["nets"]["BN"]["test_acc"] > 0.5


def test_resume_after_interruption_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    cfg = _small()
    full = lenet.run(cfg, tmp_path / "full", quiet=True)

    calls = {"n": 0}
    real = loop.save_checkpoint

    def dying(*a, **kw):
        real(*a, **kw)
        calls["n"] += 1
        if calls["n"] == 4:  # mid-way through the second net (BN), after its first epoch
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", dying)
    with pytest.raises(KeyboardInterrupt):
        lenet.run(cfg, tmp_path / "cut", quiet=True)
    monkeypatch.setattr(loop, "save_checkpoint", real)
    assert not (tmp_path / "cut" / "summary.json").exists()
    resumed = lenet.run(cfg, tmp_path / "cut", resume=True, quiet=True)
    for name in lenet.VARIANTS:
        a, b = full["nets"][name], resumed["nets"][name]
        assert a["test_acc_curve"] == b["test_acc_curve"], name
        assert a["train_acc"] == b["train_acc"], name
        assert a["test_loss"] == b["test_loss"], name
    recs = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [(r["arm"], r["step"]) for r in recs] == [
        (r["arm"], r["step"]) for r in read_metrics(tmp_path / "full" / "metrics.jsonl")
    ]


def test_resume_with_other_settings_is_refused(tmp_path):
    cfg = _small(epochs=1)
    lenet.run(cfg, tmp_path, quiet=True)
    with pytest.raises(ValueError, match="other settings"):
        lenet.run(dataclasses.replace(cfg, lr=0.5), tmp_path, resume=True, quiet=True)


def test_variants_follow_the_study_design():
    cfg = lenet.Config(dropout=0.3, recipe_lr_mult=5.0, lr=0.02)
    data = lenet.load(dataclasses.replace(cfg, dataset="digits"))
    vs = {v.name: v for v in lenet.arms(cfg, data)}
    assert list(vs) == list(lenet.VARIANTS)
    drop = {
        k: [m.p for m in v.build().modules() if isinstance(m, torch.nn.Dropout)]
        for k, v in vs.items()
    }
    assert drop == {"no-BN": [0.3, 0.3], "BN": [0.3, 0.3], "BN-recipe": [0.0, 0.0]}
    assert vs["BN-recipe"].lr(0) == pytest.approx(5 * vs["BN"].lr(0)) and vs["BN"].lr(0) == 0.02
    assert all(not v.augment.off for v in vs.values())
    torch_bn = lenet.arms(dataclasses.replace(cfg, bn_impl="torch"), data)[1].build()
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in torch_bn.modules()) == 2


@pytest.mark.parametrize("kw", [{"epochs": 0}, {"dropout": 1.0}, {"lr": 0.0}, {"bn_impl": "cudnn"}])
def test_bad_config_raises_value_error(kw):
    with pytest.raises(ValueError):
        lenet.Config(**kw)


def test_every_config_field_has_help_and_becomes_a_cli_option():
    import argparse

    from batchnorm.research.cli import add_config_options

    for f in dataclasses.fields(lenet.Config):
        assert f.metadata.get("help"), f.name
    p = argparse.ArgumentParser()
    add_config_options(p, lenet.Config)
    args = p.parse_args(["--bn-impl", "torch", "--epochs", "3", "--train-subset", "100"])
    assert (args.bn_impl, args.epochs, args.train_subset) == ("torch", 3, 100)
    with pytest.raises(SystemExit):
        p.parse_args(["--bn-impl", "nope"])
