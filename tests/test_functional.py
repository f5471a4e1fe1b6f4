"""``batchnorm.functional``: torch.nn.functional parity, gradcheck, momentum convention, properties."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import batchnorm.functional as BF
from batchnorm.ops import op

F64 = torch.float64
PROPS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _params(c, dtype=F64):
    return (
        torch.rand(c, dtype=dtype) + 0.5,
        torch.randn(c, dtype=dtype),
        torch.randn(c, dtype=dtype),
        torch.rand(c, dtype=dtype) + 0.5,
    )


@pytest.mark.parametrize("shape", [(2, 3), (3, 4, 5), (2, 3, 1, 4), (2, 2, 3, 1, 2)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("momentum", [0.1, 0.0, 1.0])
def test_matches_torch_functional(bn_core_backend, shape, training, momentum):
    x = torch.randn(shape, dtype=F64) * 2 + 1
    w, b, rm, rv = _params(shape[1])
    rm2, rv2 = rm.clone(), rv.clone()
    y = BF.batch_norm(x, rm, rv, w, b, training, momentum, 1e-3)
    want = F.batch_norm(x, rm2, rv2, w, b, training, momentum, 1e-3)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)


def test_training_without_running_stats_uses_batch_stats(bn_core_backend):
    x = torch.randn(4, 3, 2, dtype=F64)
    torch.testing.assert_close(
        BF.batch_norm(x, None, None, training=True), F.batch_norm(x, None, None, training=True)
    )


def test_cumulative_momentum_none_with_counter():
    x1, x2 = torch.randn(5, 2, dtype=F64), torch.randn(7, 2, dtype=F64) + 3
    rm, rv = torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64)
    nbt = torch.tensor(0)
    for x in (x1, x2):
        BF.batch_norm(x, rm, rv, training=True, momentum=None, num_batches_tracked=nbt)
    assert nbt.item() == 2
    torch.testing.assert_close(rm, (x1.mean(0) + x2.mean(0)) / 2)
    torch.testing.assert_close(rv, (x1.var(0) + x2.var(0)) / 2)


# ---------------------------------------------------------------- gradcheck (float64)
@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 4), (2, 3, 2, 3), (2, 2, 2, 1, 3)])
def test_gradcheck_training(bn_core_backend, shape):
    c = shape[1]
    x = (torch.randn(shape, dtype=F64) * 2).requires_grad_()
    w = (torch.rand(c, dtype=F64) + 0.5).requires_grad_()
    b = torch.randn(c, dtype=F64).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w, b: BF.batch_norm(x, None, None, w, b, training=True, eps=1e-3), (x, w, b)
    )
    assert torch.autograd.gradcheck(lambda x: op.batch_norm_train(x, None, None, 1e-3)[0], (x,))
    assert torch.autograd.gradgradcheck(
        lambda x, w, b: BF.batch_norm(x, None, None, w, b, training=True, eps=1e-3), (x, w, b)
    )


def test_gradcheck_channels_last(bn_core_backend):
    x = torch.randn(2, 3, 2, 3, dtype=F64).to(memory_format=torch.channels_last)
    x.requires_grad_()
    w = (torch.rand(3, dtype=F64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w: BF.batch_norm(x, None, None, w, None, training=True), (x, w)
    )


def test_gradcheck_eval():
    x = torch.randn(2, 3, 2, dtype=F64, requires_grad=True)
    w, b, rm, rv = (t.requires_grad_() for t in _params(3))
    assert torch.autograd.gradcheck(
        lambda x, w, b: BF.batch_norm(x, rm.detach(), rv.detach(), w, b, training=False), (x, w, b)
    )


def test_bias_without_weight_gets_its_gradient(bn_core_backend):
    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    b = torch.randn(3, dtype=F64, requires_grad=True)
    (BF.batch_norm(x, None, None, None, b, training=True) * torch.arange(3.0)).sum().backward()
    torch.testing.assert_close(b.grad, torch.arange(3.0, dtype=F64) * 4)


# ---------------------------------------------------------------- momentum convention
@given(m=st.floats(0.0, 1.0))
def test_momentum_decay_round_trip(m):
    d = BF.decay_from_momentum(m)
    assert d == pytest.approx(1 - m)
    assert BF.momentum_from_decay(d) == pytest.approx(m, abs=1e-15)


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_decay_conversion_rejects_out_of_range(bad):
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        BF.momentum_from_decay(bad)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        BF.decay_from_momentum(bad)


@settings(max_examples=30, deadline=None)
@given(momentum=st.floats(0.0, 1.0), n=st.integers(2, 6), spatial=st.integers(1, 3))
def test_running_update_is_pytorch_momentum_with_unbiased_variance(momentum, n, spatial):
    """r ← (1−momentum)·r + momentum·stat, stat = μ_B and m/(m−1)·σ²_B (unbiased)."""
    x = torch.randn(n, 3, spatial, dtype=F64)
    rm, rv = torch.randn(3, dtype=F64), torch.rand(3, dtype=F64) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    BF.batch_norm(x, rm, rv, training=True, momentum=momentum)
    m = n * spatial
    biased = x.var(dim=(0, 2), correction=0)
    torch.testing.assert_close(rm, (1 - momentum) * rm0 + momentum * x.mean(dim=(0, 2)))
    torch.testing.assert_close(rv, (1 - momentum) * rv0 + momentum * biased * m / (m - 1))


def test_momentum_one_stores_unbiased_batch_variance_exactly():
    x = torch.randn(3, 2, 5, dtype=F64)
    rm, rv = torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64)
    BF.batch_norm(x, rm, rv, training=True, momentum=1.0)
    torch.testing.assert_close(rv, x.var(dim=(0, 2), correction=1), rtol=1e-14, atol=0)
    torch.testing.assert_close(rm, x.mean(dim=(0, 2)), rtol=1e-14, atol=1e-15)


# ---------------------------------------------------------------- properties
@PROPS
@given(n=st.integers(2, 6), c=st.integers(1, 4), h=st.integers(1, 3), seed=st.integers(0, 99))
def test_permuting_the_batch_permutes_the_output(bn_core_backend, n, c, h, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, 2, dtype=F64, generator=g)
    w, b, _, _ = _params(c)
    perm = torch.randperm(n, generator=g)
    y = BF.batch_norm(x, None, None, w, b, training=True)
    torch.testing.assert_close(BF.batch_norm(x[perm], None, None, w, b, training=True), y[perm])


@PROPS
@given(
    n=st.integers(2, 6),
    c=st.integers(1, 4),
    seed=st.integers(0, 99),
    log_scale=st.lists(st.floats(-2, 2), min_size=4, max_size=4),
)
def test_positive_per_channel_scaling_of_input_leaves_output_unchanged(
    bn_core_backend, n, c, seed, log_scale
):
    """BN(a·x) = BN(x) for a > 0 per channel, up to eps (here eps ≪ var, so tightly)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, 3, dtype=F64, generator=g) + 1
    a = torch.tensor(log_scale[:c], dtype=F64).exp().view(1, c, 1)
    y = BF.batch_norm(x, None, None, training=True, eps=1e-12)
    torch.testing.assert_close(BF.batch_norm(a * x, None, None, training=True, eps=1e-12), y)
    # and the same holds for gradients w.r.t. the layer's weights before it: dL/d(a·x) = dL/dx / a
    xr, xs = x.clone().requires_grad_(), (a * x).detach().requires_grad_()
    dy = torch.randn_like(x)
    BF.batch_norm(xr, None, None, training=True, eps=1e-12).backward(dy)
    BF.batch_norm(xs, None, None, training=True, eps=1e-12).backward(dy)
    torch.testing.assert_close(xs.grad * a, xr.grad)


def test_scaling_invariance_breaks_only_through_eps():
    """With a large eps the invariance visibly fails: the test above is not vacuous."""
    x = torch.randn(8, 2, dtype=F64) * 0.01
    y1 = BF.batch_norm(x, None, None, training=True, eps=1e-3)
    y2 = BF.batch_norm(100 * x, None, None, training=True, eps=1e-3)
    assert (y1 - y2).abs().max() > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_update_running_stats_is_the_unbiased_ema(dtype):
    """The variants' EMA step: lerp towards μ_B and m/(m−1)·σ²_B, also on a strided buffer."""
    mean, var = torch.randn(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64) + 0.1
    base = torch.randn(12, dtype=dtype)
    rm, rv = base[::2], torch.rand(6, dtype=dtype) + 1  # non-contiguous running mean
    expect_m = rm + 0.3 * (mean.to(dtype) - rm)
    expect_v = rv + 0.3 * ((var * 10 / 9).to(dtype) - rv)
    BF.update_running_stats(rm, rv, mean, var, 10, 0.3)
    torch.testing.assert_close(base[::2], expect_m)
    torch.testing.assert_close(rv, expect_v)
