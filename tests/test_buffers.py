"""The C++ output-buffer cache (csrc/bn_cpu.cpp) behind the op's outputs and dL/dx, and its
controls (ops/buffers.py): an output of >= 1 MiB takes the memory of a freed output of the same
byte size, only once every tensor on it is gone; idle bytes stay under the limit; the outputs are
ordinary tensors."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import batchnorm as B
from batchnorm.ops import buffers, native, op

pytestmark = pytest.mark.skipif(native.load() is None, reason="the C++ kernels are not built here")

BIG = (4, 16, 64, 64)  # 256 Ki float32 values: 1 MiB, the smallest size the cache takes
KEYS = {"limit", "idle_bytes", "idle_buffers", "hits", "misses", "dropped"}


@pytest.fixture(autouse=True)
def _fresh_cache():
    old = buffers.set_limit(1 << 30)
    buffers.empty_cache()
    yield
    buffers.set_limit(old)
    buffers.empty_cache()


def _y(x, act=0, training=True):
    """The op's output for x, without autograd (nothing else holds it)."""
    with torch.no_grad():
        if training:
            return native.op(x, None, None, None, None, None, True, 0.1, 1e-5, act, 0.1, 1)[0]
        c = x.shape[1]
        rm, rv = torch.zeros(c, dtype=x.dtype), torch.ones(c, dtype=x.dtype)
        return native.op(x, None, None, rm, rv, None, False, 0.1, 1e-5, act, 0.1, 1)[0]


def _uncached(fn):
    """fn() with the cache off (fresh torch memory), the limit restored afterwards."""
    old = buffers.set_limit(0)
    try:
        return fn()
    finally:
        buffers.set_limit(old)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_a_freed_output_is_reused_with_the_right_layout_and_values(fmt, dtype, training):
    shape = (8, 16, 64, 64)  # 512 Ki values: 1 MiB in bfloat16, more in the others
    x = (torch.randn(shape) * 2 + 1).to(dtype).contiguous(memory_format=fmt)
    x2 = torch.randn(shape).to(dtype).contiguous(memory_format=fmt)
    first = _y(x, training=training)
    ptr, expect = first.data_ptr(), first.clone()
    assert first.stride() == x.stride() and first.dtype == dtype and ptr % 64 == 0
    del first  # back to the cache
    hits = buffers.info()["hits"]
    again = _y(x2, training=training)
    assert again.data_ptr() == ptr and buffers.info()["hits"] == hits + 1
    assert again.stride() == x.stride()
    # a reused buffer holds exactly what a fresh one would (no stale values from `first`)
    assert torch.equal(again, _uncached(lambda: _y(x2, training=training)))
    assert torch.equal(_y(x, training=training), expect)


def test_channels_last_3d_and_outputs_below_one_mib():
    x = torch.randn(2, 8, 16, 32, 32).contiguous(memory_format=torch.channels_last_3d)
    y = _y(x)
    assert y.stride() == x.stride() and buffers.info()["misses"] >= 1
    before = buffers.info()
    small = _y(torch.randn(4, 16, 64, 63))  # one row short of 1 MiB: plain torch memory
    del small
    after = buffers.info()
    assert (after["misses"], after["hits"], after["idle_buffers"]) == (
        before["misses"],
        before["hits"],
        before["idle_buffers"],
    )


def test_only_an_exact_byte_size_is_reused():
    a = _y(torch.randn(BIG))
    ptr = a.data_ptr()
    del a
    other = _y(torch.randn(4, 16, 64, 65))  # a few KB more: a fresh buffer
    assert other.data_ptr() != ptr and buffers.info()["idle_buffers"] == 1
    same_bytes = _y(torch.randn(2, 16, 64, 64, dtype=torch.float64))  # other shape, same bytes
    assert same_bytes.data_ptr() == ptr


def test_no_reuse_while_any_view_is_alive():
    x = torch.randn(BIG)
    a, b = _y(x), _y(x)
    assert a.data_ptr() != b.data_ptr()
    ptr_a = a.data_ptr()
    view = a[1:]  # keeps a's storage alive
    del a
    c = _y(x)
    assert c.data_ptr() not in (ptr_a, b.data_ptr())
    view.fill_(7.0)  # the old memory is still the view's alone
    assert not (c == 7.0).any()
    del view
    hits = buffers.info()["hits"]
    d = _y(x)
    assert d.data_ptr() == ptr_a and buffers.info()["hits"] == hits + 1  # now free: reused
    assert len({b.data_ptr(), c.data_ptr(), d.data_ptr()}) == 3


def test_no_reuse_while_autograd_keeps_the_output():
    """A fused layer that saves y for backward (leaky ReLU) keeps it alive after the caller's
    reference is gone; its gradients equal those computed with the cache off."""
    x = torch.randn(BIG, requires_grad=True)
    bn = B.BatchNormAct2d(16, "leaky_relu", negative_slope=0.1)
    g = torch.randn(BIG)
    out = bn(x)
    loss = (out * g).sum()
    ptr = out.data_ptr()
    del out
    other = _y(torch.randn(BIG) * 5)
    assert other.data_ptr() != ptr
    loss.backward()
    grads = (x.grad.clone(), bn.weight.grad.clone())

    def fresh():
        bn.weight.grad = None
        xx = x.detach().clone().requires_grad_()
        (bn(xx) * g).sum().backward()
        return xx.grad, bn.weight.grad

    ref = _uncached(fresh)
    assert torch.equal(grads[0], ref[0]) and torch.equal(grads[1], ref[1])


def test_limit_bounds_idle_bytes_and_zero_disables():
    x = torch.empty(BIG)
    size = x.nbytes
    assert buffers.set_limit(size) == 1 << 30  # returns the previous limit
    assert buffers.get_limit() == size == native._ext.cache_info()["limit"]
    dropped = buffers.info()["dropped"]
    ts = [_y(x) for _ in range(3)]
    del ts
    now = buffers.info()
    assert now["idle_bytes"] == size and now["idle_buffers"] == 1
    assert now["dropped"] == dropped + 2 and now["limit"] == size
    buffers.set_limit(0)
    assert buffers.info()["idle_bytes"] == 0 and buffers.info()["idle_buffers"] == 0
    misses, hits = buffers.info()["misses"], buffers.info()["hits"]
    y = _y(x)
    del y
    assert (buffers.info()["misses"], buffers.info()["hits"]) == (misses, hits)  # off: not counted
    assert buffers.info()["idle_bytes"] == 0
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match=">= 0"):
            buffers.set_limit(bad)
    assert buffers.get_limit() == 0


def test_lowering_the_limit_frees_the_largest_idle_buffers_first():
    big, small = _y(torch.randn(8, 16, 64, 64)), _y(torch.randn(BIG))
    nb, ns = big.nbytes, small.nbytes
    del big, small
    assert buffers.info()["idle_bytes"] == nb + ns
    buffers.set_limit(ns)
    assert buffers.info()["idle_bytes"] == ns and buffers.info()["idle_buffers"] == 1
    hits = buffers.info()["hits"]
    _y(torch.randn(BIG))
    assert buffers.info()["hits"] == hits + 1  # the small one stayed


def test_info_and_empty_cache():
    info = buffers.info()
    assert set(info) == KEYS and all(isinstance(v, int) for v in info.values())
    ys = [_y(torch.randn(BIG)) for _ in range(2)]
    del ys
    assert buffers.info()["idle_buffers"] == 2
    assert buffers.info()["idle_bytes"] == 2 * torch.empty(BIG).nbytes
    buffers.empty_cache()
    assert buffers.info()["idle_buffers"] == 0 and buffers.info()["idle_bytes"] == 0
    misses = buffers.info()["misses"]
    _y(torch.randn(BIG))
    assert buffers.info()["misses"] == misses + 1  # emptied: a fresh buffer


def test_info_without_the_extension(monkeypatch):
    monkeypatch.setattr(native, "_ext", None)
    assert buffers.info() == {
        "limit": buffers.get_limit(),
        "idle_bytes": 0,
        "idle_buffers": 0,
        "hits": 0,
        "misses": 0,
        "dropped": 0,
    }
    buffers.empty_cache()  # nothing to free: no error
    assert buffers.set_limit(123) == 1 << 30 and buffers.get_limit() == 123


def test_cached_outputs_are_ordinary_tensors():
    """In-place ops, views, resize_ and torch.save work on a cached output as on any tensor."""
    x = torch.randn(BIG)
    y = _y(x)
    want = _uncached(lambda: _y(x))
    y.mul_(2).add_(1)
    torch.testing.assert_close(y, want * 2 + 1)
    flat = y.view(-1)
    flat[:10] = 0
    assert (y[0, 0, 0, :10] == 0).all()
    buf = io.BytesIO()
    torch.save({"y": y, "view": y[1]}, buf)
    buf.seek(0)
    loaded = torch.load(buf)
    assert torch.equal(loaded["y"], y) and torch.equal(loaded["view"], y[1])
    assert loaded["y"].data_ptr() != y.data_ptr()

    snapshot = y.clone()
    y.resize_(2, 16, 64, 64)  # smaller: keeps its storage
    assert torch.equal(y, snapshot[:2])
    idle = buffers.info()["idle_buffers"]
    y.resize_(8, 16, 64, 64)  # bigger: moves to fresh memory, the old block goes back
    assert torch.equal(y[:2], snapshot[:2]) and y.shape == (8, 16, 64, 64)
    assert buffers.info()["idle_buffers"] == idle + 1
    y.fill_(3.0)  # the new memory is its own
    hits = buffers.info()["hits"]
    z = _y(x)
    assert buffers.info()["hits"] == hits + 1 and torch.equal(z, want)
    assert (y == 3.0).all()


def test_reused_buffers_give_the_same_results_and_gradients():
    """Stale contents of a reused buffer never leak into y or dx (compared with the cache off)."""
    x = torch.randn(BIG, dtype=torch.float64)
    g = torch.randn(BIG, dtype=torch.float64)

    def run():
        bn = B.BatchNorm2d(16).double()
        xg = x.clone().requires_grad_()
        y = bn(xg)
        y.backward(g)
        return y.detach().clone(), xg.grad.clone(), bn.weight.grad.clone()

    ref = [run() for _ in range(3)]  # the 2nd and 3rd run on reused buffers (y and dx)
    assert buffers.info()["hits"] >= 2
    off = _uncached(run)
    for r in ref:
        for a, b in zip(r, off, strict=True):
            assert torch.equal(a, b)


def test_cached_grad_accumulates_and_saves():
    x = torch.randn(BIG).requires_grad_()
    bn = B.BatchNorm2d(16)
    g = torch.randn(BIG)
    misses = buffers.info()["misses"]
    bn(x).backward(g)
    assert buffers.info()["misses"] >= misses + 2  # y and dL/dx
    first = x.grad.clone()
    bn(x).backward(g)  # accumulates into the (cached) x.grad
    torch.testing.assert_close(x.grad, 2 * first)
    buf = io.BytesIO()
    torch.save(x.grad, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf), x.grad)


def test_env_limit_parsing(monkeypatch):
    for raw, want in (("2.5", int(2.5 * (1 << 20))), ("0", 0), ("1024", 1 << 30)):
        monkeypatch.setenv("BATCHNORM_CPU_CACHE_MB", raw)
        assert buffers._env_limit() == want
    for raw in ("lots", "nan", "inf", "-inf", "-1", "1e20", ""):
        monkeypatch.setenv("BATCHNORM_CPU_CACHE_MB", raw)
        with pytest.raises(ValueError, match="BATCHNORM_CPU_CACHE_MB"):
            buffers._env_limit()
    monkeypatch.delenv("BATCHNORM_CPU_CACHE_MB")
    assert buffers._env_limit() == 1 << 30  # the default: 1024 MB


def test_env_limit_in_a_fresh_process():
    """A bad ``$BATCHNORM_CPU_CACHE_MB`` fails the import with a ValueError that names it; a good
    one becomes the C++ cache's limit once the extension loads."""
    script = textwrap.dedent("""
        import importlib, os, sys
        for bad in ("nan", "inf", "-1", "1e20", "lots"):
            os.environ["BATCHNORM_CPU_CACHE_MB"] = bad
            try:
                importlib.import_module("batchnorm.ops.buffers")
            except ValueError as e:
                assert "BATCHNORM_CPU_CACHE_MB" in str(e) and repr(bad) in str(e), e
            else:
                sys.exit(f"{bad!r} was accepted")
            assert "batchnorm.ops.buffers" not in sys.modules
        os.environ["BATCHNORM_CPU_CACHE_MB"] = "3"
        from batchnorm.ops import buffers, native
        assert buffers.get_limit() == 3 << 20
        assert native.load() is not None
        assert native._ext.cache_info()["limit"] == 3 << 20 == buffers.info()["limit"]
        print("OK")
    """)
    env = dict(os.environ, BATCHNORM_CPU_CACHE_MB="nan")
    env.pop("BATCHNORM_NATIVE", None)
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr[-3000:]


def test_the_layers_use_the_cache():
    """The layers' outputs and gradients come from the op, and so from the cache."""
    assert op.get_backend() == "auto"
    bn = B.BatchNorm2d(16)
    x = torch.randn(BIG, requires_grad=True)
    y = bn(x)
    ptr = y.data_ptr()
    del y
    hits = buffers.info()["hits"]
    with torch.no_grad():
        y2 = bn(x)
    assert y2.data_ptr() == ptr and buffers.info()["hits"] == hits + 1
