"""The oracle checks itself: the hand-written Section 3 backward against autograd through the
forward equations, statistics against float64 math, and the numerics of hard inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batchnorm.ops import reference as R

SHAPES = [(2, 3), (5, 4), (2, 3, 1), (3, 2, 7), (2, 3, 1, 1), (4, 3, 5, 2), (2, 2, 3, 1, 2)]


def paper_forward(x, w, b, eps):
    """Algorithm 1 in float64 autograd-able primitives, independent of the module under test."""
    dims = [0, *range(2, x.dim())]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mu = x.mean(dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dims, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w.view(shape) + b.view(shape)


@pytest.mark.parametrize("shape", SHAPES)
def test_backward_equals_autograd_through_forward_equations(shape):
    c = shape[1]
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).requires_grad_()
    w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(c, dtype=torch.float64).requires_grad_()
    dy = torch.randn(shape, dtype=torch.float64)
    paper_forward(x, w, b, 1e-5).backward(dy)
    y, mean, var = R.forward(x.detach(), w.detach(), b.detach(), 1e-5)
    torch.testing.assert_close(y, paper_forward(x, w, b, 1e-5).detach())
    dx, dw, db = R.backward(dy, x.detach(), mean, var, w.detach(), 1e-5)
    torch.testing.assert_close(dx, x.grad, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(dw, w.grad, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(db, b.grad, atol=1e-10, rtol=1e-9)


def test_backward_without_weight_is_unit_gamma():
    x = torch.randn(4, 3, 2, dtype=torch.float64)
    dy = torch.randn_like(x)
    _, mean, var = R.forward(x, None, None, 1e-5)
    dx0, dw0, db0 = R.backward(dy, x, mean, var, None, 1e-5)
    dx1, dw1, db1 = R.backward(dy, x, mean, var, torch.ones(3, dtype=torch.float64), 1e-5)
    torch.testing.assert_close(dx0, dx1)
    torch.testing.assert_close(dw0, dw1)
    torch.testing.assert_close(db0, db1)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=2, max_size=5).filter(
        lambda s: s[0] * (s[2] if len(s) > 2 else 1) >= 2
    )
)
def test_batch_stats_match_float64_var_mean(shape):
    x = torch.randn(shape, dtype=torch.float64) * 2 + 5
    mean, var = R.batch_stats(x)
    dims = R.reduce_dims(x)
    want_var, want_mean = torch.var_mean(x, dim=dims, correction=0)
    torch.testing.assert_close(mean, want_mean)
    torch.testing.assert_close(var, want_var)
    assert R.values_per_channel(x) == x.numel() // shape[1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_statistics_dtype_and_output_dtype(dtype):
    x = torch.randn(4, 3, 2, 2).to(dtype)
    y, mean, var = R.forward(x, None, None, 1e-5)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert y.dtype == dtype and mean.dtype == acc and var.dtype == acc
    w = torch.ones(3, dtype=dtype)
    _, dw, db = R.backward(torch.ones_like(x), x, mean, var, w, 1e-5)
    assert dw.dtype == dtype and db.dtype == dtype  # as the op's fake implementation declares


@pytest.mark.parametrize("shape", [(64, 3), (8, 3, 5, 5), (4, 2, 3, 4, 5)])
def test_float32_large_mean_offset_is_accurate(shape):
    """1e4 + 1e-2·randn: a float32 mean is rounded by ~5e-4 (5% of σ); re-centring fixes it."""
    x = (1e4 + 1e-2 * torch.randn(shape, dtype=torch.float64)).float()
    x64 = x.double()  # the same values, exactly
    y, mean, var = R.forward(x, None, None, 1e-8)
    want_var, want_mean = torch.var_mean(x64, dim=R.reduce_dims(x), correction=0)
    want = R.normalize(x64, want_mean, want_var, None, None, 1e-8)
    assert (y.double() - want).abs().max() < 1e-4  # torch.nn.BatchNorm: ~4e-2 here
    torch.testing.assert_close(var.double(), want_var, rtol=1e-4, atol=0)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-7, atol=0)
    dy = torch.randn(shape, dtype=torch.float64)
    dx, dw, db = R.backward(dy.float(), x, mean, var, None, 1e-8)
    xr = x64.clone().requires_grad_()
    paper_forward(
        xr,
        torch.ones(shape[1], dtype=torch.float64),
        torch.zeros(shape[1], dtype=torch.float64),
        1e-8,
    ).backward(dy)
    scale = xr.grad.abs().max()
    assert ((dx.double() - xr.grad).abs().max() / scale) < 1e-4
    assert ((dw.double() - (dy * want).sum(R.reduce_dims(x))).abs().max()) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_in_the_hundreds_stay_finite_and_accurate(dtype):
    """x² of 300 ± 100 overflows float16 (max 65504); statistics accumulate in float32."""
    x = (300 + 100 * torch.randn(16, 4, 6, 6, dtype=torch.float64)).to(dtype)
    x64 = x.double()
    y, mean, var = R.forward(x, None, None, 1e-5)
    assert torch.isfinite(y).all() and torch.isfinite(var).all()
    want_var, want_mean = torch.var_mean(x64, dim=R.reduce_dims(x), correction=0)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-5, atol=0)
    torch.testing.assert_close(var.double(), want_var, rtol=1e-5, atol=0)
    ulp = {torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    want = R.normalize(x64, want_mean, want_var, None, None, 1e-5)
    # output within one rounding of the exact float64 result (|y| < 8 here)
    assert (y.double() - want).abs().max() <= 8 * ulp
    dx, _, _ = R.backward(torch.ones_like(x), x, mean, var, None, 1e-5)
    assert torch.isfinite(dx).all()


def test_centered_recovers_exact_deviation_from_a_rounded_mean():
    x = torch.randn(50, 2, dtype=torch.float64)
    true = x - x.mean(0)
    xc, corr = R.centered(x, x.mean(0) + 0.3)  # a deliberately wrong shift
    torch.testing.assert_close(xc, true)
    torch.testing.assert_close(corr, torch.full((2,), -0.3, dtype=torch.float64))
