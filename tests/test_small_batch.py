"""The small-batch study's quick config runs end to end (incl. 2 gloo processes) and reports."""

import json

import pytest

from batchnorm.research.engine.report import render_report
from batchnorm.research.experiments import load_experiment


@pytest.mark.distributed
def test_quick_small_batch_run_writes_summary_table_and_report(tmp_path):
    mod = load_experiment("small-batch")
    cfg = mod.Config.quick()
    summary = mod.run(cfg, tmp_path, quiet=True)
    assert {"table", "results", "batch_sizes", "methods", "dataset"} <= set(summary)
    assert len(summary["results"]) == len(cfg.method_list()) * len(cfg.sizes())
    for label in ("BN", "BatchRenorm", "GhostBN", "SyncBN (2 procs)"):
        for b in cfg.sizes():
            r = summary["table"][label][str(b)]
            assert 0.0 <= r["ema_acc"] <= 1.0 and 0.0 <= r["recomputed_acc"] <= 1.0
    sync = [r for r in summary["results"] if r["method"] == "sync"]
    assert all(r["step_batch"] == 2 * r["batch"] for r in sync)
    assert json.loads((tmp_path / "summary.json").read_text())["experiment"] == "small-batch"
    assert (tmp_path / "small_batch.png").exists() and (tmp_path / "metrics.jsonl").exists()
    assert render_report(tmp_path).exists()
    # resume with everything done trains nothing and gives the same table
    again = mod.run(cfg, tmp_path, resume=True, quiet=True)
    assert again["table"] == summary["table"]


def test_config_rejects_bad_sizes_and_methods():
    mod = load_experiment("small-batch")
    with pytest.raises(ValueError, match="batch_sizes"):
        mod.Config(batch_sizes="1,4")
    with pytest.raises(ValueError, match="methods"):
        mod.Config(methods="bn,layernorm")
