"""Controls of the C++ kernels' output cache (``csrc/bn_cpu.cpp``, "output-buffer cache").

Why a cache: glibc's ``malloc`` serves a block above its mmap threshold (dynamic, at most 32 MB)
with a fresh ``mmap`` and hands it back to the kernel on ``free``. The next output of that size
then page-faults on every 4 KB page as it is first written: about 20 ms for a 51 MB activation
on a 2-core machine, several times what the kernels themselves take (``docs/performance.md``).
``torch`` has no CPU caching allocator, so every BN output and every ``dL/dx`` would pay this.

What: outputs of 1 MiB or more take the memory of a freed output of exactly the same byte size,
once every tensor on it is gone; the idle bytes kept are bounded by a limit. The outputs are
ordinary tensors with their own resizable storage: in-place ops, views, ``resize_`` and
``torch.save`` work on them as on any other tensor.

The limit is ``$BATCHNORM_CPU_CACHE_MB`` (default 1024; ``0`` turns the cache off); change it at
run time with :func:`set_limit`, drop idle buffers with :func:`empty_cache`, and see hits,
misses and bytes with :func:`info`.
"""

from __future__ import annotations

import math
import os

_MAX_MB = 1 << 30  # a petabyte: anything larger is a typo


def _env_limit() -> int:
    raw = os.environ.get("BATCHNORM_CPU_CACHE_MB", "1024")
    try:
        mb = float(raw)
    except ValueError:
        mb = math.nan
    if not (0 <= mb <= _MAX_MB):  # also catches nan and inf
        raise ValueError(
            f"BATCHNORM_CPU_CACHE_MB must be a number of megabytes from 0 (no cache) to {_MAX_MB}, "
            f"got {raw!r}; unset it for the default of 1024"
        )
    return int(mb * (1 << 20))


_limit = _env_limit()


def _ext():
    """The C++ extension if it is loaded (the cache lives there), else None."""
    from . import native

    return native._ext or None


def set_limit(nbytes: int) -> int:
    """Set the most idle bytes kept (0 turns caching off and frees idle buffers); returns the old."""
    global _limit
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(
            f"the cache limit must be an int >= 0 bytes (0 disables it), got {nbytes!r}"
        )
    old, _limit = _limit, nbytes
    ext = _ext()
    if ext is not None:
        ext.cache_set_limit(_limit)
    return old


def get_limit() -> int:
    """The most idle bytes kept (``$BATCHNORM_CPU_CACHE_MB`` or the last :func:`set_limit`)."""
    return _limit


def empty_cache() -> None:
    """Free every idle buffer (buffers in use stay with their tensors)."""
    ext = _ext()
    if ext is not None:
        ext.cache_empty()


def info() -> dict[str, int]:
    """{'limit', 'idle_bytes', 'idle_buffers', 'hits', 'misses', 'dropped'}; zero counters while
    the C++ kernels are not loaded."""
    ext = _ext()
    if ext is None:
        return {
            "limit": _limit,
            "idle_bytes": 0,
            "idle_buffers": 0,
            "hits": 0,
            "misses": 0,
            "dropped": 0,
        }
    return dict(ext.cache_info())
