"""The C++ CPU kernels (``csrc/bn_cpu.cpp``): built on first use, cached on disk.

:func:`load` compiles the extension with ``torch.utils.cpp_extension`` (a C++17 compiler and
ninja; about a minute on 2 cores, once: the build is kept under ``$TORCH_EXTENSIONS_DIR`` or
``~/.cache/torch_extensions``, keyed by the source, its path, the flags and this CPU's
instruction set). Loading it registers the op ``torch.ops.batchnorm.batch_norm``.
:func:`op` calls that same op through the extension's unboxed dispatcher entry (the boxed
``torch.ops`` call parses its twelve arguments in Python: ~8 µs more a call).
Only a CPU input ever triggers the build (``ops/op.py`` asks for it after checking the device).

When it cannot be built, the package says why once (a ``RuntimeWarning``) and every layer runs
PyTorch's own kernel: the same numbers at torch.nn's speed. ``BATCHNORM_NATIVE=0`` skips the
build altogether.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "bn_cpu.cpp"
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17"]  # no -ffast-math: NaN/inf propagate
LDFLAGS = ["-fopenmp"]  # libgomp.so.1: the same OpenMP runtime (and thread pool) torch loads

# The loaded extension, a module whose functions (batch_norm, cache_*) only exist at run time, so
# typed Any; False: not tried yet; None: unavailable.
_ext: Any = False

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def enabled() -> bool:
    """``$BATCHNORM_NATIVE`` (default on): whether to build and use the C++ kernels."""
    raw = os.environ.get("BATCHNORM_NATIVE", "1").strip().lower()
    if raw not in _TRUE + _FALSE:
        raise ValueError(
            f"BATCHNORM_NATIVE must be one of {_TRUE + _FALSE} (0 turns the C++ kernels off), got "
            f"{os.environ['BATCHNORM_NATIVE']!r}"
        )
    return raw in _TRUE


def _build_tag() -> str:
    """A short hash of this CPU's instruction-set flags and of where the source lives:
    -march=native code is only reused on a CPU with the same flags (a home directory shared
    between machines gets one build per kind), and two checkouts do not take turns rebuilding
    one shared build directory (ninja rebuilds whenever the source path changes)."""
    flags = platform.machine() + str(SOURCE)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags += line
                break
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def _built(name: str) -> bool:
    """Whether a build of ``name`` newer than the source is on disk (only to say "compiling"
    when there is none: a first build, or a rebuild after the source changed)."""
    try:
        from torch.utils import cpp_extension

        build = Path(cpp_extension._get_build_directory(name, verbose=False))
        source_time = SOURCE.stat().st_mtime
        return any(so.stat().st_mtime >= source_time for so in build.glob("*.so"))
    except Exception:  # a private helper of torch: if it moves, just don't announce the build
        return True


def load(verbose: bool = False) -> ModuleType | None:
    """The compiled extension, building it on the first call; None (with one warning saying why)
    when it cannot be built, or when ``$BATCHNORM_NATIVE`` disables it."""
    global _ext
    if _ext is not False:
        return _ext
    on = enabled()  # an invalid $BATCHNORM_NATIVE raises here, on every call until it is fixed
    _ext = None
    if not on or sys.platform == "win32":  # MSVC builds are untested: torch's kernel there
        return None
    try:
        from torch.utils import cpp_extension

        name = f"batchnorm_cpu_{_build_tag()}"
        fresh = not _built(name)
        if fresh:
            print(
                "batchnorm: compiling the C++ CPU kernels (once; about a minute on 2 cores; "
                "BATCHNORM_NATIVE=0 skips them)...",
                file=sys.stderr,
                flush=True,
            )
        start = time.monotonic()
        ext = cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=CFLAGS,
            extra_ldflags=LDFLAGS,
            verbose=verbose,
        )
        if fresh:
            print(
                f"batchnorm: C++ kernels built in {time.monotonic() - start:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    except Exception as e:  # no compiler, no ninja, no headers: torch's kernel still works
        warnings.warn(
            f"batchnorm: the C++ CPU kernels could not be built ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}); every layer uses "
            f"PyTorch's own kernel instead (same results, torch.nn's speed). Install a C++ "
            f"compiler and `pip install ninja` for the fast path, or set BATCHNORM_NATIVE=0 to "
            f"silence this.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    from . import buffers

    ext.cache_set_limit(buffers.get_limit())
    _ext = ext
    return _ext


def op(*args: Any) -> tuple[Any, Any, Any]:
    """``batchnorm::batch_norm(*args)`` (schema in ``csrc/bn_cpu.cpp``); the extension must be
    loaded."""
    return _ext.batch_norm(*args)
