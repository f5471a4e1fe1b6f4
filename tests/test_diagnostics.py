"""batchnorm.diagnostics: tracker, ICS, loss landscape, BN health (library parts, fast)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchnorm as B
from batchnorm.diagnostics import (
    ActivationTracker,
    bn_health,
    gradient_landscape,
    health_table,
    internal_covariate_shift,
)
from batchnorm.research.engine.plots import plot_tracker


def mlp(bn: bool = False, seed: int = 0, dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    width = 12
    for i in range(3):
        layers.append(nn.Linear(8 if i == 0 else width, width, bias=not bn))
        if bn:
            layers.append(B.BatchNorm1d(width))
        layers.append(nn.Sigmoid())
        if dropout:
            layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(width, 4))
    return nn.Sequential(*layers)


def batch(n: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for s in range(steps):
        x, y = batch(seed=100 + s)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


# ---------------------------------------------------------------------------- tracker
def test_tracker_percentiles_equal_torch_quantile_of_the_preactivation():
    model = mlp()
    x, _ = batch(50)
    q = torch.tensor([0.15, 0.5, 0.85], dtype=torch.float64)
    with ActivationTracker(model, units=1000, max_values=10**6) as tr:
        model(x)
    res = tr.results()
    assert set(res["layers"]) == {"2", "4", "6"}  # the three Sigmoids
    h = x
    for lin, act in ((1, "2"), (3, "4"), (5, "6")):
        pre = model[lin](h)  # (N, 12): the sigmoid's input, computed without hooks
        want = torch.quantile(pre.detach().double().flatten(), q)
        got = torch.tensor(res["layers"][act]["percentiles"][0], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert res["layers"][act]["mean"][0] == pytest.approx(pre.double().mean().item(), abs=1e-6)
        h = torch.sigmoid(pre)


def test_tracker_samples_fixed_units_and_percentiles_match_recorded_values():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with ActivationTracker(model, units=5, max_values=64, keep_values=True, seed=3) as tr:
        train_steps(model, opt, 4)
    rec = tr.results()["layers"]["6"]
    values = tr.values("6")
    assert len(values) == 4 and all(v.numel() == min(64, 32 * 5) for v in values)
    assert len(rec["units"]) == 5
    for v, pct in zip(values, rec["percentiles"], strict=True):
        want = torch.quantile(v.double(), torch.tensor([0.15, 0.5, 0.85], dtype=torch.float64))
        torch.testing.assert_close(torch.tensor(pct, dtype=torch.float64), want)
    # with max_values large the kept values are exactly the chosen units' columns
    model2 = mlp()
    x, _ = batch(10)
    with ActivationTracker(model2, units=5, max_values=10**6, keep_values=True, seed=3) as tr2:
        model2(x)
    units = tr2.results()["layers"]["2"]["units"]
    pre = model2[1](x).detach()
    torch.testing.assert_close(tr2.values("2")[0], pre[:, units].reshape(-1))


def test_tracker_every_counts_training_steps_only():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ActivationTracker(model, every=3) as tr:
        train_steps(model, opt, 7)
        model.eval()
        with torch.no_grad():
            model(batch()[0])
        model.train()
    assert tr.results()["layers"]["4"]["steps"] == [0, 3, 6]
    assert tr.step == 7


def test_tracker_explicit_layer_records_module_output():
    model = mlp()
    x, _ = batch(20)
    with ActivationTracker(model, layers=["5", "6"], units=100, max_values=10**6) as tr:
        model(x)
    res = tr.results()["layers"]
    assert res["5"]["where"] == "output" and res["6"]["where"] == "input"
    assert res["5"]["percentiles"] == res["6"]["percentiles"]  # Linear output = Sigmoid input


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_tracker_removes_hooks_even_on_exception(tmp_path):
    model = mlp()
    with pytest.raises(RuntimeError, match="boom"), ActivationTracker(model) as tr:
        model(batch()[0])
        assert _hook_count(model) > 0
        raise RuntimeError("boom")
    assert _hook_count(model) == 0
    assert tr.results()["layers"]["2"]["steps"] == [0]  # what was recorded stays readable
    assert plot_tracker(tr.results(), tmp_path / "p.png").stat().st_size > 0


def test_tracker_rejects_bad_arguments():
    bare = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="no activation modules"):
        ActivationTracker(bare)
    with pytest.raises(ValueError, match="no modules named"):
        ActivationTracker(mlp(), layers=["nope"])
    with pytest.raises(ValueError, match="every"):
        ActivationTracker(mlp(), every=0)
    with pytest.raises(ValueError, match="percentiles"):
        ActivationTracker(mlp(), percentiles=(150,))


# ---------------------------------------------------------------------------- ICS
@pytest.mark.parametrize("bn", [False, True])
def test_ics_is_zero_when_earlier_layers_do_not_move(bn):
    model = mlp(bn=bn)
    data = batch()
    res = internal_covariate_shift(model, data, 0.0)  # lr 0: nothing moves
    assert res["layers"] == (["1", "4", "7", "10"] if bn else ["1", "3", "5", "7"])
    assert max(res["l2"]) < 1e-7 and min(res["cosine"]) > 1 - 1e-7
    # requires_grad False on every layer before the last one: ICS of the last layer is zero
    frozen = mlp(bn=bn)
    for p in list(frozen.parameters())[:-2]:
        p.requires_grad_(False)
    last = res["layers"][-1]
    res2 = internal_covariate_shift(frozen, data, 1.0, layers=[last])
    assert res2["l2"] == [0.0]
    # the first layer has no earlier layers: always zero; later layers move when lr > 0
    res3 = internal_covariate_shift(model, data, 1.0)
    assert res3["l2"][0] == 0.0 and min(res3["l2"][1:]) > 1e-6


def test_ics_matches_a_hand_written_sgd_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4))
    x, y = batch()
    lr = 0.7
    res = internal_covariate_shift(model, (x, y), lr, layers=["2"])
    w0, b0, w1, b1 = (p.detach().double().clone().requires_grad_() for p in model.parameters())
    xd = x.double()

    def loss(w0, b0, w1):
        return F.cross_entropy(torch.tanh(xd @ w0.T + b0) @ w1.T + b1, y)

    gw0, gb0, g = torch.autograd.grad(loss(w0, b0, w1), [w0, b0, w1])
    (g_after,) = torch.autograd.grad(loss(w0 - lr * gw0, b0 - lr * gb0, w1), [w1])
    assert res["l2"][0] == pytest.approx((g_after - g).norm().item(), rel=1e-4, abs=1e-9)
    cos = F.cosine_similarity(g.flatten(), g_after.flatten(), dim=0).item()
    assert res["cosine"][0] == pytest.approx(cos, abs=1e-6)


def test_ics_leaves_model_and_optimizer_unchanged():
    model = mlp(bn=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    train_steps(model, opt, 3)
    before, opt_before = state(model), copy.deepcopy(opt.state_dict())
    rng = torch.get_rng_state()
    res = internal_covariate_shift(model, batch(), opt)
    assert all(v >= 0 for v in res["l2"]) and len(res["l2"]) == 4
    assert_same_state(model, before)
    for k, v in opt.state_dict()["state"].items():
        assert torch.equal(v["momentum_buffer"], opt_before["state"][k]["momentum_buffer"])
    assert torch.equal(torch.get_rng_state(), rng)
    with pytest.raises(TypeError, match="optimizer"):
        internal_covariate_shift(model, batch(), "sgd")


# ---------------------------------------------------------------------------- landscape
def test_landscape_beta_is_the_curvature_along_g_for_a_quadratic():
    torch.manual_seed(0)
    model = nn.Linear(5, 1, bias=False).double()
    x = torch.randn(40, 5, dtype=torch.float64)
    y = torch.randn(40, 1, dtype=torch.float64)
    res = gradient_landscape(model, (x, y), (0.01, 0.1, 1.0), loss_fn=F.mse_loss)
    w = model.weight.detach().flatten()
    hess = 2 * x.T @ x / 40  # MSE: L = mean((Xw - y)^2)
    g = hess @ w - 2 * x.T @ y.flatten() / 40
    want = (hess @ g).norm().item() / g.norm().item()
    assert res["beta"] == pytest.approx([want] * 3, rel=1e-9)
    assert res["effective_beta"] == pytest.approx(want, rel=1e-9)
    assert res["grad_norm"] == pytest.approx(g.norm().item(), rel=1e-9)


@pytest.mark.parametrize("bn", [False, True])
def test_landscape_finite_reproducible_and_leaves_model_unchanged(bn):
    model = mlp(bn=bn, dropout=0.2)
    before = state(model)
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    a = gradient_landscape(model, batch())
    assert torch.equal(torch.get_rng_state(), rng)  # global RNG untouched
    torch.manual_seed(5)
    b = gradient_landscape(model, batch())
    assert a == b
    vals = [a["loss"], a["loss_range"], a["effective_beta"], *a["losses"], *a["grad_change"]]
    assert all(torch.isfinite(torch.tensor(vals)))
    assert a["effective_beta"] == max(a["beta"]) > 0
    assert_same_state(model, before)
    with pytest.raises(ValueError, match="step_sizes"):
        gradient_landscape(model, batch(), (0.1, -1.0))


# ---------------------------------------------------------------------------- health
@pytest.mark.parametrize("to", ["batchnorm", "torch"])
def test_health_drift_low_variance_and_gamma_collapse(to):
    torch.manual_seed(0)
    model = B.convert_model(
        nn.Sequential(nn.Conv2d(3, 6, 3), B.BatchNorm2d(6), nn.ReLU(), nn.Flatten()), to=to
    )
    x = torch.randn(16, 3, 8, 8)
    bn = model[1]
    pre = model[0](x).detach().double()
    with torch.no_grad():  # running stats = this batch's exact statistics: no drift
        bn.running_mean.copy_(pre.mean(dim=(0, 2, 3)))
        bn.running_var.copy_(pre.var(dim=(0, 2, 3), correction=0))
        bn.running_var[0] = 1e-6
        bn.weight[:2] = 0.001
    before = state(model)
    rows = bn_health(model, x, train_mode=True)
    assert_same_state(model, before)
    assert model.training
    (row,) = rows
    assert row["layer"] == "1" and row["channels"] == 6
    assert row["low_var_channels"] == 1 and row["gamma_collapsed"] == 2
    # channel 0's running var was made tiny: its ratio is huge; the others are ~1, shift ~0
    assert row["var_ratio_max"] > 1e3
    assert row["var_ratio_min"] == pytest.approx(1.0, abs=1e-4)
    assert row["mean_shift_max"] < 1e-3
    assert "|γ|≈0" in health_table(rows)
    assert bn_health(model)[0]["mean_shift_mean"] is None
    with pytest.raises(ValueError, match="no BatchNorm"):
        bn_health(nn.Linear(2, 2))


def test_tracker_plot_format_follows_the_suffix(tmp_path):
    model = mlp()
    with ActivationTracker(model) as tr:
        model(batch()[0])
    assert plot_tracker(tr.results(), tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_tracker(tr.results(), tmp_path / "p.svg").read_text().lstrip().startswith("<?xml")
    assert plot_tracker(tr.results(), tmp_path / "p.pdf").read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "p.pdf",
        "p.png",
        "p.svg",
    ]  # no temp files
