"""recompute_population_stats: Algorithm 2 against float64 by hand; split/order invariance; state."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from batchnorm import BatchNorm1d, BatchNorm2d, GhostBatchNorm1d, recompute_population_stats


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6), BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3), nn.BatchNorm1d(3)
    ).double()


def _direct(model, batches):
    """Algorithm 2 by hand in float64: per-batch train-mode forward, pooled statistics."""
    fc1, fc2 = model[0], model[3]
    acc = {1: [], 4: []}
    for x in batches:
        h = fc1(x)
        acc[1].append((len(h), h.mean(0), h.var(0, unbiased=False)))
        h = torch.relu(
            (h - h.mean(0)) / (h.var(0, unbiased=False) + 1e-5).sqrt() * model[1].weight
            + model[1].bias
        )
        h = fc2(h)
        acc[4].append((len(h), h.mean(0), h.var(0, unbiased=False)))
    out = {}
    for i, stats in acc.items():
        m_tot = sum(m for m, _, _ in stats)
        out[i] = (
            sum(m * mu for m, mu, _ in stats) / m_tot,  # Σ m_k μ_k / Σ m_k
            sum(m * v for m, _, v in stats) / sum(m - 1 for m, _, _ in stats),
        )
    return out


def test_equals_direct_float64_computation_with_unequal_batches():
    model = _mlp()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2)
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(50, 4, dtype=torch.float64, generator=gen) * 2 + 1
    batches = list(torch.split(data, [16, 16, 5, 13]))
    with torch.no_grad():
        expect = _direct(model, batches)
    report = recompute_population_stats(model, batches)
    for i, (mean, var) in expect.items():
        torch.testing.assert_close(model[i].running_mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model[i].running_var, var, rtol=1e-12, atol=1e-12)
    assert set(report) == {"1", "4"} and report["1"].batches == 4
    assert report["1"].values_per_channel == 50
    assert report["1"].max_abs_mean_diff == pytest.approx(float(expect[1][0].abs().max()))


def test_equal_batches_are_algorithm_2_exactly():
    model = nn.Sequential(nn.BatchNorm2d(3)).double()
    batches = [torch.randn(4, 3, 5, 5, dtype=torch.float64) + k for k in range(3)]
    recompute_population_stats(model, batches)
    m = 4 * 5 * 5
    means = torch.stack([b.mean((0, 2, 3)) for b in batches])
    bvars = torch.stack([b.var((0, 2, 3), unbiased=False) for b in batches])
    torch.testing.assert_close(model[0].running_mean, means.mean(0))  # E_B[μ_B]
    torch.testing.assert_close(
        model[0].running_var, m / (m - 1) * bvars.mean(0)
    )  # m/(m−1)·E_B[σ²_B]


@settings(max_examples=20, deadline=None)
@given(sizes=st.lists(st.integers(2, 9), min_size=1, max_size=5), seed=st.integers(0, 1000))
def test_first_layer_mean_does_not_depend_on_how_data_is_split(sizes, seed):
    gen = torch.Generator().manual_seed(seed)
    data = torch.randn(sum(sizes), 3, dtype=torch.float64, generator=gen)
    a, b = nn.BatchNorm1d(3).double(), nn.BatchNorm1d(3).double()
    recompute_population_stats(a, torch.split(data, sizes))
    recompute_population_stats(b, [data])
    torch.testing.assert_close(a.running_mean, data.mean(0))
    torch.testing.assert_close(b.running_mean, data.mean(0))


@pytest.mark.parametrize("sizes", [(3, 3), (2, 4), (2, 5)])
def test_variance_averaged_over_every_split_equals_the_data_variance(sizes):
    # Var[x] is the pooled within-batch variance, so it depends on the split; averaged over every
    # way of splitting the data into batches of these sizes it is exactly the unbiased variance.
    gen = torch.Generator().manual_seed(sum(sizes))
    n = sum(sizes)
    data = torch.randn(n, 3, dtype=torch.float64, generator=gen) * 2 + 1
    estimates, means = [], []
    for first in itertools.combinations(range(n), sizes[0]):
        rest = [i for i in range(n) if i not in first]
        bn = nn.BatchNorm1d(3).double()
        recompute_population_stats(bn, [data[list(first)], data[rest]])
        estimates.append(bn.running_var.clone())
        means.append(bn.running_mean.clone())
    torch.testing.assert_close(torch.stack(estimates).mean(0), data.var(0))
    for m in means:  # the mean is the same for every split
        torch.testing.assert_close(m, data.mean(0))


def test_invariant_to_batch_order_and_order_within_batches():
    model_a, model_b = _mlp(), _mlp()
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(8, 4, dtype=torch.float64, generator=gen) for _ in range(5)]
    shuffled = [b[torch.randperm(8, generator=gen)] for b in reversed(batches)]
    recompute_population_stats(model_a, batches)
    recompute_population_stats(model_b, iter(shuffled))
    for i in (1, 4):
        torch.testing.assert_close(model_a[i].running_mean, model_b[i].running_mean)
        torch.testing.assert_close(model_a[i].running_var, model_b[i].running_var)


def test_restores_momentum_mode_hooks_counter_and_weights():
    model = _mlp().eval()
    model[1].momentum = None
    model[4].momentum = 0.3
    params = [p.clone() for p in model.parameters()]
    nbt = model[1].num_batches_tracked.clone()
    batches = [(torch.randn(6, 4, dtype=torch.float64), torch.zeros(6)) for _ in range(3)]
    recompute_population_stats(model, batches, num_batches=2)
    assert model[1].momentum is None and model[4].momentum == 0.3
    assert not any(m.training for m in model.modules())
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(model[1].num_batches_tracked, nbt)
    assert all(torch.equal(p, q) for p, q in zip(params, model.parameters(), strict=True))


def test_a_failing_batch_changes_nothing():
    model = _mlp().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)]
    with pytest.raises(RuntimeError):
        recompute_population_stats(model, batches)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert model.training and model[1].momentum == 0.1
    assert all(not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(ValueError, match="no batch"):
        recompute_population_stats(model, [])


def test_report_measures_ema_error_and_ghost_layers_use_virtual_batches():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), BatchNorm2d(3)).train()
    data = [torch.randn(8, 2, 6, 6) * 3 + 2 for _ in range(4)]
    for x in data:  # a short EMA run: far from converged
        model(x)
    report = recompute_population_stats(model, data)
    assert report["1"].max_abs_mean_diff > 0.1 and report["1"].max_rel_var_diff > 0.1
    again = recompute_population_stats(model, data)  # now the stored values are the exact ones
    assert again["1"].max_abs_mean_diff < 1e-6 and again["1"].max_rel_var_diff < 1e-5

    ghost = GhostBatchNorm1d(2, virtual_batch_size=4).double()
    x = torch.randn(16, 2, dtype=torch.float64)
    recompute_population_stats(ghost, [x])
    chunks = x.split(4)
    torch.testing.assert_close(ghost.running_var, torch.stack([c.var(0) for c in chunks]).mean(0))
