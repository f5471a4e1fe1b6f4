"""The CPU output-buffer cache (ops/buffers.py): reuse only after every tensor on a buffer is gone."""

from __future__ import annotations

import io

import pytest
import torch

import batchnorm as B
from batchnorm.ops import buffers

BIG = (4, 16, 64, 64)  # 1 MiB of float32 values: 4 MiB, above MIN_BYTES


@pytest.fixture(autouse=True)
def _fresh_cache():
    old = buffers.set_limit(1 << 30)
    buffers.empty_cache()
    yield
    buffers.set_limit(old)
    buffers.empty_cache()


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_empty_like_matches_torch_layout(fmt, dtype):
    x = torch.randn(BIG, dtype=dtype).contiguous(memory_format=fmt)
    y = buffers.empty_like(x)
    ref = torch.empty_like(x)
    assert (y.shape, y.dtype, y.stride()) == (ref.shape, ref.dtype, ref.stride())
    assert y.data_ptr() % 64 == 0
    y.copy_(x)
    assert torch.equal(y, x)


def test_channels_last_3d_and_small_tensors():
    x = torch.randn(2, 8, 16, 32, 32).contiguous(memory_format=torch.channels_last_3d)
    assert buffers.empty_like(x).stride() == x.stride()
    before = buffers.info()
    small = buffers.empty_like(torch.randn(10, 10))
    assert small.shape == (10, 10)
    assert buffers.info()["misses"] == before["misses"]  # below MIN_BYTES: plain torch memory


def test_no_reuse_while_any_view_is_alive():
    x = torch.empty(BIG)
    a = buffers.empty_like(x)
    b = buffers.empty_like(x)
    assert a.data_ptr() != b.data_ptr()
    ptr_a = a.data_ptr()
    view = a[1:]  # keeps a's storage alive
    del a
    c = buffers.empty_like(x)
    assert c.data_ptr() not in (ptr_a, b.data_ptr())
    del view
    hits = buffers.info()["hits"]
    d = buffers.empty_like(x)
    assert d.data_ptr() == ptr_a  # now free: reused
    assert buffers.info()["hits"] == hits + 1
    assert len({b.data_ptr(), c.data_ptr(), d.data_ptr()}) == 3


def test_limit_bounds_idle_bytes_and_zero_disables():
    x = torch.empty(BIG)
    size = x.nbytes
    buffers.set_limit(size)
    ts = [buffers.empty_like(x) for _ in range(3)]
    del ts
    info = buffers.info()
    assert info["idle_bytes"] == size and info["idle_buffers"] == 1 and info["dropped"] >= 2
    buffers.set_limit(0)
    assert buffers.info()["idle_bytes"] == 0
    misses = buffers.info()["misses"]
    buffers.empty_like(x)
    assert buffers.info()["misses"] == misses  # off: torch.empty_like, not counted
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


def test_reused_buffers_give_the_same_results_and_gradients():
    """Stale contents of a reused buffer must never leak into y or dx (compare with the cache off)."""
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
    assert buffers.info()["hits"] >= 2
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
