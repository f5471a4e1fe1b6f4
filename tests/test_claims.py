"""The ``claims`` experiment: verdict rules, ensemble errors, gradient norms, a quick run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from batchnorm.research.experiments import claims
from batchnorm.research.experiments.models import DeepMLP

VERDICTS = {"reproduced", "partly", "not reproduced"}


def test_ensemble_errors_average_probabilities():
    y = torch.tensor([0, 1, 2, 3])
    a = torch.tensor(
        [[0.7, 0.3, 0, 0], [0.6, 0.4, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]
    )  # wrong on #1
    b = torch.tensor([[0.4, 0.6, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])  # wrong on #0
    e = claims.ensemble_errors([a, b], y)
    assert e["member_top1_err"] == [0.25, 0.25]
    assert e["ensemble_top1_err"] == 0.0  # mean: [.55,.45] on #0, [.3,.7] on #1
    assert e["best_member"] == 0 and e["k"] == 2
    v, txt = claims.verdict_ensemble(e)
    assert v == "reproduced" and "0.00%" in txt


def _sweep(plain, bn, values=(0.01, 0.1, 1.0)):
    res = {}
    for arm, accs in (("plain", plain), ("bn", bn)):
        for v, a in zip(values, accs, strict=True):
            res[f"lr/{arm}/{v:g}"] = {
                "diverged": a is None,
                "final": {"test_acc": a or 0.0, "train_loss": 1.0},
            }
    return claims._sweep(res, "lr", list(values))


def test_lr_verdict_needs_bn_to_train_at_higher_rates():
    s = _sweep([0.9, 0.7, None], [0.9, 0.92, 0.91])
    assert s["plain"]["trains"] == [True, False, False] and s["plain"]["diverged"][2]
    assert claims.verdict_lr(s)[0] == "reproduced"
    assert claims.verdict_lr(_sweep([0.9, 0.9, 0.9], [0.9, 0.9, 0.9]))[0] == "not reproduced"
    assert claims.verdict_lr(_sweep([0.9, 0.9, 0.2], [0.2, 0.9, 0.2]))[0] == "not reproduced"
    assert claims.verdict_init(_sweep([0.9, 0.5, 0.2], [0.9, 0.9, 0.9]))[0] == "reproduced"
    assert claims.verdict_init(_sweep([0.9, 0.5, 0.2], [0.9, 0.9, 0.2]))[0] == "partly"


def test_regularization_and_sigmoid_verdicts():
    g = {
        "plain/none": {"train_acc": 1.0, "test_acc": 0.80, "gap": 0.20},
        "plain/dropout": {"train_acc": 0.95, "test_acc": 0.83, "gap": 0.12},
        "bn/none": {"train_acc": 0.95, "test_acc": 0.85, "gap": 0.10},
        "bn/dropout": {"train_acc": 0.9, "test_acc": 0.84, "gap": 0.06},
    }
    assert claims.verdict_reg(g)[0] == "reproduced"
    g["bn/none"] = {"train_acc": 1.0, "test_acc": 0.79, "gap": 0.21}
    assert claims.verdict_reg(g)[0] == "not reproduced"
    sg = {
        "plain": {"test_acc": 0.11, "grad_norms_init": [1e-6, 1.0]},
        "bn": {"test_acc": 0.9, "grad_norms_init": [0.5, 1.0]},
    }
    v, txt = claims.verdict_sigmoid(sg)
    assert v == "reproduced" and "1e-06" in txt


def test_layer_grad_norms_match_autograd():
    torch.manual_seed(0)
    m = DeepMLP(depth=4, width=16, activation="sigmoid")
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    norms = claims.layer_grad_norms(m, x, y)
    grads = torch.autograd.grad(
        F.cross_entropy(m(x), y), [lin.weight for lin in m.hidden_linears()]
    )
    assert norms == pytest.approx([g.norm().item() for g in grads], rel=1e-5)
    assert all(p.grad is None for p in m.parameters())  # leaves no gradients behind
    assert norms[0] < norms[-1]  # sigmoid: the gradient shrinks toward the input


def test_bad_sweeps_raise_value_error():
    with pytest.raises(ValueError, match="lrs"):
        claims.Config(lrs="0.1,abc")
    with pytest.raises(ValueError, match="init_scales"):
        claims.Config(init_scales="-1,1")
    with pytest.raises(ValueError, match="ensemble"):
        claims.Config(ensemble=1)


def test_default_sweeps_span_the_required_ranges():
    c = claims.Config()
    lrs, scales = claims._floats(c.lrs, "lrs"), claims._floats(c.init_scales, "s")
    assert len(lrs) >= 5 and max(lrs) / min(lrs) >= 100
    assert min(scales) <= 0.1 and max(scales) >= 10 and c.depth == 10


def test_quick_run_writes_every_claims_plot_and_verdict(tmp_path):
    from batchnorm.research.engine.report import render_report

    s = claims.run(claims.Config.quick(), tmp_path, quiet=True)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert set(on_disk["verdicts"]) == {
        "learning_rate",
        "initialization",
        "regularization",
        "sigmoid",
        "ensemble",
    }
    for v in on_disk["verdicts"].values():
        assert v["verdict"] in VERDICTS and v["numbers"]
    for p in claims.PLOTS:
        assert (tmp_path / p).stat().st_size > 1000, p
    assert len(s["sigmoid"]["bn"]["grad_norms_init"]) == 10
    assert len(s["learning_rate"]["bn"]["acc"]) == 3 and s["ensemble"]["k"] == 2
    assert "probs" not in json.dumps(on_disk)
    assert render_report(tmp_path).read_text().count("<img") == len(claims.PLOTS)
