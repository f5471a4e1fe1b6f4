"""The compiled CPU kernels, numba (ops/cpu.py) and C++ (ops/native.py, csrc/bn_cpu.cpp), against
the reference equations and float64 truth: every test runs once per kernel module."""

from __future__ import annotations

import pytest
import torch

from batchnorm.ops import cpu, library, native, reference

pytest.importorskip("numba")


@pytest.fixture(params=["numba", "native"])
def k(request):
    """The kernel module under test; the C++ one is skipped where it cannot be built."""
    if request.param == "native":
        if library.native_kernels() is None:
            pytest.skip("the C++ kernels are not built here")
        return native
    return cpu

# (shape, channels_last): odd sizes, N=2, H=1, a plane longer than one 4096-value block, rows
# layouts long enough for several sub-blocks, and sizes above the one-thread cut-off.
CASES = [
    ((2, 3), False),
    ((7, 5, 3), False),
    ((2, 3, 1, 5), False),
    ((3, 5, 7, 9), False),
    ((3, 5, 7, 9), True),
    ((2, 3, 1, 1), True),
    ((2, 4, 3, 5, 6), False),
    ((2, 4, 3, 5, 6), True),
    ((2, 3, 9000), False),
    ((4, 3, 120, 120), False),
    ((4, 3, 120, 120), True),
    ((9000, 7), False),
    ((37, 3, 10, 10), False),  # short planes: several samples of one channel per work item
    ((130, 6, 9, 11), False),  # the same above the one-thread cut-off, last item partial
]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
TOL = {torch.float32: 2e-5, torch.float64: 1e-11, torch.bfloat16: 2e-2}


def _make(shape, cl, dtype, seed=0, offset=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + offset
    x = x.to(dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    c = shape[1]
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b, _like(dy, x)


def _like(t, x):
    if x.is_contiguous():
        return t.contiguous()
    return t.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


def _close(a, b, tol):
    a, b = a.double(), b.double()
    scale = b.abs().max().clamp_min(1.0)
    assert (a - b).abs().max() <= tol * scale, f"max error {(a - b).abs().max():.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,cl", CASES)
def test_forward_backward_match_reference(shape, cl, dtype, k):
    x, w, b, dy = _make(shape, cl, dtype)
    assert k.supports(x)
    y, mean, var = k.forward(x, w, b, 1e-5)
    # float64 truth from the reference equations on the same (rounded) input
    yr, mr, vr = reference.forward(x.double(), w.double(), b.double(), 1e-5)
    assert y.dtype == x.dtype and y.stride() == x.stride()
    assert mean.dtype == var.dtype == reference.acc_dtype(dtype)
    _close(mean, mr, TOL[dtype] / 10)
    _close(var, vr, TOL[dtype] / 10)
    _close(y, yr, TOL[dtype])

    dx, dg, db = k.backward(dy, x, mean, var, w, 1e-5)
    dxr, dgr, dbr = reference.backward(dy.double(), x.double(), mr, vr, w.double(), 1e-5)
    assert dx.dtype == x.dtype and dx.stride() == x.stride()
    assert dg.dtype == db.dtype == w.dtype
    _close(dx, dxr, TOL[dtype])
    _close(dg.double(), dgr, TOL[dtype])
    _close(db.double(), dbr, TOL[dtype])


@pytest.mark.parametrize("shape,cl", [((3, 5, 7, 9), False), ((3, 5, 7, 9), True), ((6, 4), False)])
def test_no_affine_and_eval_forward(shape, cl, k):
    x, _, _, dy = _make(shape, cl, torch.float32)
    y, mean, var = k.forward(x, None, None, 1e-3)
    _close(y, reference.forward(x.double(), None, None, 1e-3)[0], 2e-5)
    dx, dg, db = k.backward(dy, x, mean, var, None, 1e-3)
    dxr, dgr, dbr = reference.backward(dy.double(), x.double(), mean.double(), var.double(), None, 1e-3)
    _close(dx, dxr, 2e-5)
    _close(dg, dgr, 2e-5)
    rm, rv = torch.randn(shape[1]), torch.rand(shape[1]) + 0.5
    w, b = torch.randn(shape[1]), torch.randn(shape[1])
    ye = k.eval_forward(x, rm, rv, w, b, 1e-5)
    assert ye.stride() == x.stride()
    _close(ye, reference.eval_forward(x.double(), rm.double(), rv.double(), w.double(), b.double(), 1e-5), 2e-5)


def test_large_mean_offset_keeps_variance_and_gradients_accurate(k):
    # 1e4 ± 1e-2 in float32: E[x²]−E[x]² would lose every digit of σ² (1e8 vs 1e-4)
    g = torch.Generator().manual_seed(1)
    for cl in (False, True):
        x = (1e4 + 1e-2 * torch.randn(16, 4, 33, 17, generator=g, dtype=torch.float64)).float()
        x = _like(x, x.contiguous(memory_format=torch.channels_last)) if cl else x
        y, mean, var = k.forward(x, None, None, 1e-12)
        yr, mr, vr = reference.forward(x.double(), None, None, 1e-12)
        assert ((var.double() - vr).abs() / vr).max() < 1e-4
        assert (y.double() - yr).abs().max() < 1e-3  # x̂ of order 1: no 5e-4/1e-2 = 5% offset
        dy = _like(torch.randn(x.shape, generator=g), x)
        dx, dg, _ = k.backward(dy, x, mean, var, None, 1e-12)
        dxr, dgr, _ = reference.backward(dy.double(), x.double(), mr, vr, None, 1e-12)
        assert ((dg.double() - dgr).abs() / dgr.abs().max()).max() < 1e-3
        assert ((dx.double() - dxr).abs().max() / dxr.abs().max()) < 1e-3


def test_kernel_selection():
    fast = native if library.native_kernels() is not None else cpu  # "auto": C++, else numba
    assert library.kernel_for(torch.randn(4, 3, 2, 2)) is fast
    assert library.kernel_for(torch.randn(4, 3, 2, 2).to(torch.bfloat16)) is fast
    assert library.kernel_for(torch.randn(4, 3).half()) is reference  # float16: not compiled
    assert library.kernel_for(torch.randn(4, 3, 5).transpose(0, 2)) is reference  # odd strides
    for backend, want in (("reference", reference), ("numba", cpu)):
        old = library.set_backend(backend)
        try:
            assert library.kernel_for(torch.randn(4, 3)) is want
        finally:
            library.set_backend(old)


@pytest.mark.parametrize("backend", ["auto", "numba"])
def test_op_gradcheck_float64_through_cpu_kernels(backend, monkeypatch):
    monkeypatch.setattr(library, "_backend", backend)
    x = torch.randn(3, 4, 5, 2, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert library._compiled(library.kernel_for(x))
    assert torch.autograd.gradcheck(lambda *a: library.bn_forward(*a, 1e-5)[0], (x, w, b))
    xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: library.bn_forward(*a, 1e-5)[0], (xc, w, b))


def test_nan_propagates_instead_of_being_hidden(k):
    x = torch.randn(4, 3, 5)
    x[1, 2, 3] = float("nan")
    y, mean, var = k.forward(x, None, None, 1e-5)
    assert torch.isnan(mean[2]) and torch.isnan(y[:, 2]).all()
    assert not torch.isnan(y[:, :2]).any()
