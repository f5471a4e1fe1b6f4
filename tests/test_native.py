"""The C++ eager training op (``native.train``, csrc/bn_cpu.cpp): gradients, saved memory, the
running-statistics update against torch.nn, and what a failed call leaves behind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm as B
from batchnorm.ops import library, native, reference

pytestmark = pytest.mark.skipif(
    library.native_kernels() is None, reason="the C++ kernels are not built here"
)


def _train(x, w, b, rm=None, rv=None, nbt=None, momentum=0.1, act=0, slope=0.0, save=1):
    y = library.train_eager(x, w, b, rm, rv, nbt, momentum, 1e-5, act, slope, save)
    assert y is not None
    return y


@pytest.mark.parametrize("act,save", [(0, 1), (0, 2), (0, 0), (1, 1), (1, 0), (2, 1), (2, 2), (2, 0)])
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
@pytest.mark.parametrize("cl", [False, True])
def test_gradcheck_every_activation_and_saved_tensor(act, save, affine, cl):
    x = torch.randn(3, 4, 3, 2, dtype=torch.float64)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_() if affine in ("both", "weight") else None
    b = torch.randn(4, dtype=torch.float64, requires_grad=True) if affine in ("both", "bias") else None
    inputs = tuple(t for t in (x, w, b) if t is not None)

    def f(*ts):
        it = iter(ts)
        xx = next(it)
        ww = next(it) if w is not None else None
        bb = next(it) if b is not None else None
        return _train(xx, ww, bb, act=act, slope=0.3, save=save)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("act,save,keeps", [(0, 1, "x"), (1, 0, "x"), (2, 0, "y"), (0, 0, "y")])
def test_one_activation_saved_and_tiny_gamma_falls_back_to_x(act, save, keeps):
    x = torch.randn(8, 6, 5, 5, requires_grad=True)
    w, b = torch.ones(6, requires_grad=True), torch.zeros(6, requires_grad=True)
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        y = _train(x, w, b, act=act, slope=0.1, save=save)
    big = [t for t in seen if t.shape == x.shape]
    assert len(big) == 1
    assert big[0].data_ptr() == (x if keeps == "x" else y).data_ptr()
    if keeps == "y":  # γ ≈ 0 cannot be inverted: the op keeps x instead
        seen.clear()
        with torch.no_grad():
            w[2] = 1e-9
        with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
            _train(x, w, b, act=act, slope=0.1, save=save)
        assert [t.data_ptr() for t in seen if t.shape == x.shape] == [x.data_ptr()]


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_running_statistics_and_counter_match_torch_nn(momentum, dtype):
    ours = B.BatchNorm2d(5, momentum=momentum).to(dtype)
    ref = nn.BatchNorm2d(5, momentum=momentum).to(dtype)
    for step in range(4):
        x = torch.randn(6, 5, 4, 3, dtype=dtype) * (step + 1) + step
        torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 4


def test_bfloat16_running_buffers_take_the_torch_op_path():
    x = torch.randn(16, 3, 4, 4)
    rm, rv = torch.zeros(3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16)
    _train(x.bfloat16(), None, None, rm, rv, momentum=1.0)
    want = reference.forward(x.bfloat16().double(), None, None, 1e-5)[1]
    torch.testing.assert_close(rm.double(), want, atol=2e-2, rtol=2e-2)


def test_a_failed_call_touches_no_buffer():
    x = torch.randn(4, 3, 2, 2)
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(5)
    before = (rm.clone(), rv.clone(), nbt.clone())
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        _train(x, torch.ones(4), None, rm, rv, nbt)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        library.train_eager(x, None, None, rm, rv, None, None, 1e-5)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        _train(torch.randn(1, 3), None, None, rm, rv, nbt)
    assert all(torch.equal(a, b) for a, b in zip((rm, rv, nbt), before, strict=True))


def test_declines_what_it_does_not_take():
    odd = torch.randn(4, 3, 5).transpose(0, 2)  # neither contiguous nor channels_last
    assert library.train_eager(odd, None, None, None, None, None, 0.1, 1e-5) is None
    assert library.train_eager(torch.randn(4, 3).half(), None, None, None, None, None, 0.1, 1e-5) is None
    old = library.set_backend("numba")
    try:
        assert library.train_eager(torch.randn(4, 3), None, None, None, None, None, 0.1, 1e-5) is None
    finally:
        library.set_backend(old)


def test_large_batch_matches_float64_truth_like_the_numba_kernels():
    """Above the one-thread cut-off (several work items and threads) both kernel sets stay within
    float32 accuracy of a float64 reference run: dγ, dβ sum 25,600 terms of size ~4 per channel."""
    x = torch.randn(64, 8, 20, 20) * 2 + 3
    g = torch.randn_like(x)

    def run(backend, dtype):
        old = library.set_backend(backend)
        try:
            bn = B.BatchNormAct2d(8, "leaky_relu", negative_slope=0.2).to(dtype)
            xg = x.to(dtype, copy=True).requires_grad_()
            y = bn(xg)
            y.backward(g.to(dtype))
            return [t.double() for t in (y.detach(), xg.grad, bn.weight.grad, bn.bias.grad, bn.running_var)]
        finally:
            library.set_backend(old)

    truth = run("reference", torch.float64)
    for backend in ("auto", "numba"):
        got = run(backend, torch.float32)
        for i, (a, t) in enumerate(zip(got, truth, strict=True)):
            atol = 2e-3 if i in (2, 3) else 2e-5  # parameter gradients: float32 sums of 25,600 terms
            torch.testing.assert_close(a, t, rtol=1e-4, atol=atol, msg=f"{backend} output {i}")


def test_cache_limit_reaches_the_cpp_cache():
    from batchnorm.ops import buffers

    old = buffers.set_limit(12345)
    try:
        assert buffers.info()["native"]["limit"] == 12345
    finally:
        buffers.set_limit(old)
    assert native.load() is native._ext


def test_a_failed_build_warns_once_and_the_layers_fall_back_to_numba(monkeypatch):
    """No compiler (or ninja): one RuntimeWarning naming the fix, then the numba kernels."""
    from torch.utils import cpp_extension

    def broken(*_a, **_k):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load", broken)
    monkeypatch.setattr(native, "_built", lambda name: True)
    monkeypatch.setattr(native, "_ext", False)  # not tried yet (restored after the test)
    with pytest.warns(RuntimeWarning, match="numba kernels instead.*pip install ninja"):
        assert native.load() is None
    assert native.load() is None  # tried once: no second build, no second warning
    bn, ref = B.BatchNorm2d(3), nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    assert library.train_eager(x, None, None, None, None, None, 0.1, 1e-5) is None
    assert library.kernel_for(x).__name__.endswith(".cpu")
    torch.testing.assert_close(bn(x), ref(x))
    torch.testing.assert_close(bn.running_var, ref.running_var)


def test_env_switch_turns_the_cpp_kernels_off(monkeypatch):
    monkeypatch.setenv("BATCHNORM_NATIVE", "0")
    monkeypatch.setattr(native, "_ext", False)
    assert not native.enabled()
    assert native.load() is None
