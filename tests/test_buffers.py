"""The CPU output-buffer caches: ops/buffers.py (numba kernels) and its C++ twin in csrc/bn_cpu.cpp
(C++ kernels). Both: reuse only after every tensor on a buffer is gone, bounded idle bytes."""

from __future__ import annotations

import io

import pytest
import torch

import batchnorm as B
from batchnorm.ops import buffers, library, native

BIG = (4, 16, 64, 64)  # 1 MiB of float32 values: 4 MiB, above MIN_BYTES


def _native_cache():
    ext = native.load()
    if ext is None:
        pytest.skip("the C++ kernels are not built here")
    return ext.empty_like, lambda: buffers.info()["native"]


@pytest.fixture(params=["python", "native"])
def cache(request):
    """(empty_like, info) of one cache implementation."""
    if request.param == "native":
        return _native_cache()
    return buffers.empty_like, buffers.info


def _hits() -> int:
    info = buffers.info()
    return info["hits"] + info.get("native", {}).get("hits", 0)


@pytest.fixture(autouse=True)
def _fresh_cache():
    old = buffers.set_limit(1 << 30)
    buffers.empty_cache()
    yield
    buffers.set_limit(old)
    buffers.empty_cache()


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_empty_like_matches_torch_layout(fmt, dtype, cache):
    empty_like, _ = cache
    x = torch.randn(BIG, dtype=dtype).contiguous(memory_format=fmt)
    y = empty_like(x)
    ref = torch.empty_like(x)
    assert (y.shape, y.dtype, y.stride()) == (ref.shape, ref.dtype, ref.stride())
    assert y.data_ptr() % 64 == 0
    y.copy_(x)
    assert torch.equal(y, x)


def test_channels_last_3d_and_small_tensors(cache):
    empty_like, info = cache
    x = torch.randn(2, 8, 16, 32, 32).contiguous(memory_format=torch.channels_last_3d)
    assert empty_like(x).stride() == x.stride()
    before = info()
    small = empty_like(torch.randn(10, 10))
    assert small.shape == (10, 10)
    assert info()["misses"] == before["misses"]  # below MIN_BYTES: plain torch memory


def test_no_reuse_while_any_view_is_alive(cache):
    empty_like, info = cache
    x = torch.empty(BIG)
    a = empty_like(x)
    b = empty_like(x)
    assert a.data_ptr() != b.data_ptr()
    ptr_a = a.data_ptr()
    view = a[1:]  # keeps a's storage alive
    del a
    c = empty_like(x)
    assert c.data_ptr() not in (ptr_a, b.data_ptr())
    del view
    hits = info()["hits"]
    d = empty_like(x)
    assert d.data_ptr() == ptr_a  # now free: reused
    assert info()["hits"] == hits + 1
    assert len({b.data_ptr(), c.data_ptr(), d.data_ptr()}) == 3


def test_limit_bounds_idle_bytes_and_zero_disables(cache):
    empty_like, info = cache
    x = torch.empty(BIG)
    size = x.nbytes
    buffers.set_limit(size)  # sets both caches
    ts = [empty_like(x) for _ in range(3)]
    del ts
    now = info()
    assert now["idle_bytes"] == size and now["idle_buffers"] == 1 and now["dropped"] >= 2
    assert now["limit"] == size
    buffers.set_limit(0)
    assert info()["idle_bytes"] == 0
    misses = info()["misses"]
    empty_like(x)
    assert info()["misses"] == misses  # off: torch.empty_like, not counted
    with pytest.raises(ValueError, match=">= 0"):
        buffers.set_limit(-1)


def test_env_limit_parsing(monkeypatch):
    monkeypatch.setenv("BATCHNORM_CPU_CACHE_MB", "2.5")
    assert buffers._env_limit() == int(2.5 * (1 << 20))
    monkeypatch.setenv("BATCHNORM_CPU_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="BATCHNORM_CPU_CACHE_MB"):
        buffers._env_limit()
    monkeypatch.setenv("BATCHNORM_CPU_CACHE_MB", "-1")
    with pytest.raises(ValueError, match=">= 0"):
        buffers._env_limit()


@pytest.mark.parametrize("backend", ["auto", "numba"])
def test_reused_buffers_give_the_same_results_and_gradients(backend, monkeypatch):
    """Stale contents of a reused buffer must never leak into y or dx (compare with the cache off)."""
    monkeypatch.setattr(library, "_backend", backend)  # the old one is restored after the test
    torch.manual_seed(0)
    x = torch.randn(BIG, dtype=torch.float64)
    g = torch.randn(BIG, dtype=torch.float64)

    def run():
        bn = B.BatchNorm2d(16).double()
        xg = x.clone().requires_grad_()
        y = bn(xg)
        y.backward(g)
        return y.detach().clone(), xg.grad.clone(), bn.weight.grad.clone()

    ref = [run() for _ in range(3)]  # the 2nd and 3rd run on reused buffers
    assert _hits() >= 2
    buffers.set_limit(0)
    off = run()
    for r in ref:
        for a, b in zip(r, off, strict=True):
            assert torch.equal(a, b)


def test_cached_grad_accumulates_and_saves():
    x = torch.randn(BIG).requires_grad_()
    bn = B.BatchNorm2d(16)
    g = torch.randn(BIG)
    bn(x).backward(g)
    first = x.grad.clone()
    bn(x).backward(g)  # accumulates into the (cached) x.grad
    torch.testing.assert_close(x.grad, 2 * first)
    buf = io.BytesIO()
    torch.save(x.grad, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf), x.grad)
