"""The layers on CUDA against torch.nn.BatchNorm* and the float64 reference. On CUDA every call
runs PyTorch's own kernel (ops/op.py: the C++ op is CPU-only, and a CUDA input never builds it).

Skipped without a GPU; run on one with ``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchnorm
from batchnorm.ops import native, op, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


@pytest.fixture(autouse=True)
def _no_build(monkeypatch):
    """No CUDA call may build or load the C++ extension."""

    def forbidden(*_a, **_k):
        raise AssertionError("native.load() was called for a CUDA input")

    monkeypatch.setattr(native, "load", forbidden)


def _pair(ours, theirs, c, dtype):
    ours, theirs = ours.to("cuda", dtype), theirs.to("cuda", dtype)
    with torch.no_grad():
        w = torch.rand(c, device="cuda", dtype=dtype) + 0.5
        b = torch.randn(c, device="cuda", dtype=dtype)
        for m in (ours, theirs):
            m.weight.copy_(w)
            m.bias.copy_(b)
    return ours, theirs


LAYERS = [
    (
        (16, 7),
        lambda c: batchnorm.BatchNorm1d(c),
        lambda c: nn.BatchNorm1d(c),
        torch.contiguous_format,
    ),
    (
        (8, 5, 9),
        lambda c: batchnorm.BatchNorm1d(c, momentum=None),
        lambda c: nn.BatchNorm1d(c, momentum=None),
        torch.contiguous_format,
    ),
    (
        (4, 6, 5, 3),
        lambda c: batchnorm.BatchNorm2d(c),
        lambda c: nn.BatchNorm2d(c),
        torch.contiguous_format,
    ),
    (
        (4, 6, 5, 3),
        lambda c: batchnorm.BatchNorm2d(c),
        lambda c: nn.BatchNorm2d(c),
        torch.channels_last,
    ),
    (
        (2, 3, 4, 5, 2),
        lambda c: batchnorm.BatchNorm3d(c),
        lambda c: nn.BatchNorm3d(c),
        torch.channels_last_3d,
    ),
    (
        (4, 6, 5, 3),
        lambda c: batchnorm.BatchNormAct2d(c, "leaky_relu", negative_slope=0.1),
        lambda c: nn.Sequential(nn.BatchNorm2d(c), nn.LeakyReLU(0.1)),
        torch.channels_last,
    ),
]


def _bn(m):
    return m[0] if isinstance(m, nn.Sequential) else m


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str
)
@pytest.mark.parametrize(
    "shape,make_ours,make_torch,fmt",
    LAYERS,
    ids=["1d", "1d-cumulative", "2d", "2d-cl", "3d-cl", "act-2d-cl"],
)
def test_cuda_layers_match_torch_nn(shape, make_ours, make_torch, fmt, dtype):
    x = (torch.randn(shape, device="cuda") * 3 + 1).to(dtype).contiguous(memory_format=fmt)
    assert not op.fast_path_applies(x, None, None, None, None)
    ours, theirs = make_ours(shape[1]), make_torch(shape[1])
    if isinstance(theirs, nn.Sequential):
        _pair(ours, theirs[0], shape[1], dtype)
        theirs = theirs.to("cuda", dtype)
    else:
        ours, theirs = _pair(ours, theirs, shape[1], dtype)
    tol = TOL[dtype]
    for _ in range(2):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        assert ya.is_contiguous(memory_format=fmt) and ya.dtype == dtype
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        torch.testing.assert_close(ya, yb, atol=tol, rtol=tol)
        torch.testing.assert_close(xa.grad, xb.grad, atol=tol * 10, rtol=tol)
    bn = _bn(theirs)
    torch.testing.assert_close(ours.weight.grad, bn.weight.grad, atol=tol * 10, rtol=tol)
    torch.testing.assert_close(ours.bias.grad, bn.bias.grad, atol=tol * 10, rtol=tol)
    torch.testing.assert_close(ours.running_mean, bn.running_mean, atol=tol, rtol=tol)
    torch.testing.assert_close(ours.running_var, bn.running_var, atol=tol, rtol=tol)
    assert int(ours.num_batches_tracked) == int(bn.num_batches_tracked) == 2
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=tol, rtol=tol)


@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_cuda_autocast_matches_torch_nn(amp, fmt):
    """Under AMP a conv hands BN a half-precision input with float32 parameters and buffers."""

    def model(bn):
        torch.manual_seed(0)
        conv = nn.Conv2d(3, 8, 3, bias=False)
        return nn.Sequential(conv, bn, nn.ReLU()).cuda().to(memory_format=fmt)

    ours, theirs = model(batchnorm.BatchNorm2d(8)), model(nn.BatchNorm2d(8))
    x = torch.randn(4, 3, 10, 10, device="cuda").contiguous(memory_format=fmt)
    for _ in range(2):
        with torch.autocast("cuda", dtype=amp):
            ya, yb = ours(x), theirs(x)
        assert ya.dtype == yb.dtype == amp
        torch.testing.assert_close(ya, yb)
        ya.float().square().sum().backward()
        yb.float().square().sum().backward()
    for (na, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=na)
    for (na, a), (_, b) in zip(ours.named_buffers(), theirs.named_buffers(), strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, msg=na)


def test_cuda_matches_float64_reference_with_large_offset():
    torch.manual_seed(1)
    x64 = 1e4 + 1e-2 * torch.randn(32, 4, 8, 8, dtype=torch.float64, device="cuda")
    x32 = x64.float()  # float32 rounds 1e4 + noise to ~1e-3 steps: compare on the rounded input
    y, mean, var = op.batch_norm_train(x32, None, None, 1e-5)
    y_ref, mean_ref, var_ref = reference.forward(x32.double(), None, None, 1e-5)
    # Statistics: no E[x²]−E[x]² cancellation (which would lose the 1e-4 variance entirely).
    torch.testing.assert_close(mean.double(), mean_ref, atol=1e-3, rtol=0)
    # (torch's CUDA Welford in float32 measured 1.2% here; E[x²]−E[x]² would be off by > 100%)
    torch.testing.assert_close(var.double(), var_ref, atol=0, rtol=5e-2)
    # Output: float32's x − μ carries one ulp of 1e4 (~1e-3), i.e. ~0.1 of one σ = 1e-2.
    torch.testing.assert_close(y.double(), y_ref, atol=0.15, rtol=0)


def test_cuda_without_weight_gets_functional_bias_grad():
    x = torch.randn(8, 3, 4, 4, device="cuda", dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, device="cuda", dtype=torch.float64, requires_grad=True)
    y = batchnorm.functional.batch_norm(x, None, None, None, b, training=True)
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    b2 = b.detach().clone().requires_grad_()
    reference.forward(x2, None, b2, 1e-5)[0].square().sum().backward()  # autograd, equations
    torch.testing.assert_close(y, reference.forward(x2.detach(), None, b2.detach(), 1e-5)[0])
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


def test_cuda_gradcheck_float64():
    x = torch.randn(4, 3, 3, 2, device="cuda", dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, device="cuda", dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, device="cuda", dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return batchnorm.functional.batch_norm(x, None, None, w, b, training=True)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_cuda_compiled_model_matches_eager():
    pytest.importorskip("triton")
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), batchnorm.BatchNorm2d(8), nn.ReLU())
    model = model.cuda()
    x = torch.randn(4, 3, 10, 10, device="cuda")
    ref = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU()).cuda()
    ref.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model[1].running_mean, ref[1].running_mean)
    torch.testing.assert_close(model[1].running_var, ref[1].running_var)


def test_cuda_tensor_never_builds_the_cpu_kernels():
    x = torch.randn(4, 3, 5, 5, device="cuda")
    assert op.fast_batch_norm(x, None, None, None, None, True, 0.1, 1e-5) is None
    y, mean, var = op.batch_norm_train(x, None, None, 1e-5)
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True))
    assert var.dtype == torch.float64
