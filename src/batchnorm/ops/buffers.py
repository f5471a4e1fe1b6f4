"""A cache of large CPU output buffers, reused once every tensor that used one is freed.

Why: glibc's ``malloc`` serves a block above its mmap threshold (dynamic, at most 32 MB) with a
fresh ``mmap`` and hands it back to the kernel on ``free``. The next output of that size then
page-faults on every 4 KB page as it is first written: about 20 ms for a 51 MB activation on the
project's 2-core machine, several times what the kernels themselves take (``docs/performance.md``).
``torch`` has no CPU caching allocator, so every BN output and every ``dL/dx`` pays this.

What: :func:`empty_like` returns an uninitialised tensor with ``x``'s shape, dtype and strides.
At or above :data:`MIN_BYTES` its memory comes from this cache: a buffer of exactly that byte size
whose previous tensor (and all its views) have been freed, else a new one. When the last tensor on
a buffer dies, a ``weakref.finalize`` hands the buffer back, unless that would push the bytes held
idle past the limit (then it is freed as usual). A buffer is never given out while any tensor on it
is alive: its numpy array is the tensor's storage owner, and the finalizer runs only once that
array is gone. The same idea as PyTorch's CUDA caching allocator, for the few large CPU outputs
this package makes.

The limit on idle bytes is ``$BATCHNORM_CPU_CACHE_MB`` (default 1024; ``0`` turns the cache off);
change it at run time with :func:`set_limit`, drop idle buffers with :func:`empty_cache`, and see
hits, misses and bytes with :func:`info`.

Caveat: tensors made here wrap numpy memory, so their storage cannot be resized
(``y.resize_(bigger)`` raises); every other tensor operation, autograd and ``torch.save`` work.
"""

from __future__ import annotations

import os
import threading
import weakref

import numpy as np
import torch
from torch import Tensor

MIN_BYTES = 1 << 20  # below this glibc's heap reuses memory without page faults
_ALIGN = 64  # bytes: a cache line / AVX-512 vector, as torch's own CPU allocator


def _env_limit() -> int:
    raw = os.environ.get("BATCHNORM_CPU_CACHE_MB", "1024")
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(
            f"BATCHNORM_CPU_CACHE_MB must be a number of megabytes (0 disables the cache), got {raw!r}"
        ) from None
    if mb < 0:
        raise ValueError(f"BATCHNORM_CPU_CACHE_MB must be >= 0 (0 disables the cache), got {raw!r}")
    return int(mb * (1 << 20))


_lock = threading.RLock()  # re-entrant: a GC pass inside a locked section may run a finalizer
_idle: dict[int, list[np.ndarray]] = {}  # byte size -> idle aligned uint8 buffers
_stats = {"idle_bytes": 0, "hits": 0, "misses": 0, "dropped": 0}
_limit = _env_limit()


def set_limit(nbytes: int) -> int:
    """Set the most bytes kept idle (0 turns caching off and frees idle buffers); returns the old."""
    global _limit
    if nbytes < 0:
        raise ValueError(f"the cache limit must be >= 0 bytes (0 disables it), got {nbytes}")
    old, _limit = _limit, int(nbytes)
    _trim()
    ext = _native()
    if ext is not None:
        ext.cache_set_limit(_limit)
    return old


def get_limit() -> int:
    """The most bytes kept idle (``$BATCHNORM_CPU_CACHE_MB`` or the last :func:`set_limit`)."""
    return _limit


def _native():
    """The C++ extension's cache (its outputs' twin of this one) if it is loaded, else None."""
    from . import native

    return native._ext or None


def empty_cache() -> None:
    """Free every idle buffer (buffers in use stay with their tensors)."""
    with _lock:
        _idle.clear()
        _stats["idle_bytes"] = 0
    ext = _native()
    if ext is not None:
        ext.cache_empty()


def info() -> dict:
    """{'limit', 'idle_bytes', 'idle_buffers', 'hits', 'misses', 'dropped'} since import, and the
    same counters of the C++ kernels' cache under 'native' once those are loaded."""
    with _lock:
        out = {"limit": _limit, "idle_buffers": sum(map(len, _idle.values())), **_stats}
    ext = _native()
    if ext is not None:
        out["native"] = dict(ext.cache_info())
    return out


def _trim() -> None:
    with _lock:
        for size in sorted(_idle, reverse=True):  # largest first: fewest buffers to drop
            bufs = _idle[size]
            while bufs and _stats["idle_bytes"] > _limit:
                bufs.pop()
                _stats["idle_bytes"] -= size
                _stats["dropped"] += 1
            if not bufs:
                del _idle[size]


def _release(buf: np.ndarray) -> None:
    """Finalizer of a handed-out array: keep its buffer for reuse if the idle limit allows."""
    size = buf.nbytes
    with _lock:
        if _stats["idle_bytes"] + size <= _limit:
            _idle.setdefault(size, []).append(buf)
            _stats["idle_bytes"] += size
        else:
            _stats["dropped"] += 1


def _take(size: int) -> np.ndarray:
    with _lock:
        bufs = _idle.get(size)
        if bufs:
            _stats["idle_bytes"] -= size
            _stats["hits"] += 1
            return bufs.pop()
        _stats["misses"] += 1
    raw = np.empty(size + _ALIGN, np.uint8)
    off = (-raw.ctypes.data) % _ALIGN
    return raw[off : off + size]


def empty_like(x: Tensor) -> Tensor:
    """Uninitialised tensor like dense ``x`` (shape, dtype, strides), cached when ≥ MIN_BYTES."""
    size = x.numel() * x.element_size()
    if size < MIN_BYTES or _limit == 0 or x.device.type != "cpu":
        return torch.empty_like(x)
    buf = _take(size)
    arr = buf[:]  # a fresh view: its death, not buf's, tells us the tensor is gone
    weakref.finalize(arr, _release, buf).atexit = False
    flat = torch.from_numpy(arr).view(x.dtype)  # uint8 → dtype (bfloat16 has no numpy dtype)
    if x.is_contiguous():
        return flat.view(x.shape)
    return flat.as_strided(x.shape, x.stride())
