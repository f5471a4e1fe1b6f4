"""The C++ CPU kernels (``csrc/bn_cpu.cpp``): built on first use, cached, numba as the fallback.

``load()`` compiles the extension with ``torch.utils.cpp_extension`` (a C++17 compiler and ninja;
about a minute on 2 cores, once: the build is kept under ``$TORCH_EXTENSIONS_DIR`` or
``~/.cache/torch_extensions``, keyed by the source, its path, the flags and this CPU's
instruction set).
When it cannot be built the package says why once (a ``RuntimeWarning``) and uses the numba
kernels (``ops/cpu.py``); ``BATCHNORM_NATIVE=0`` skips the build altogether.

The module exposes the same entry points as ``ops/cpu.py`` (``supports``, ``forward``,
``forward_act``, ``backward``, ``backward_act``, ``eval_forward``). The extension's own ``train``
is the whole eager training step (statistics, normalization, running-statistics update, the
``num_batches_tracked`` count and the autograd node) in one C++ call, which is what makes small
batches cheap (docs/performance.md); it is called through ``library.train_eager``.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import warnings
from pathlib import Path
from types import ModuleType

from torch import Tensor

from .reference import acc_dtype, as_dtype

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "bn_cpu.cpp"
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17"]  # no -ffast-math: NaN/inf propagate
LDFLAGS = ["-fopenmp"]  # libgomp.so.1: the same OpenMP runtime (and thread pool) torch loads

ACT_NONE, ACT_RELU, ACT_LEAKY = 0, 1, 2
SAVED_X, SAVED_X_ACT, SAVED_Y = 0, 1, 2

_ext: ModuleType | None | bool = False  # False: not tried yet; None: unavailable


def enabled() -> bool:
    """False when ``$BATCHNORM_NATIVE`` is 0/false/no/off."""
    return os.environ.get("BATCHNORM_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


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
    """Whether a build of ``name`` is already on disk (only to say "compiling" when it is not)."""
    try:
        from torch.utils import cpp_extension

        return any(Path(cpp_extension._get_build_directory(name, verbose=False)).glob("*.so"))
    except Exception:  # a private helper of torch: if it moves, just don't announce the build
        return True


def load(verbose: bool = False) -> ModuleType | None:
    """The compiled extension, building it on the first call; None (with one warning saying why)
    when it cannot be built, or when ``$BATCHNORM_NATIVE`` disables it."""
    global _ext
    if _ext is not False:
        return _ext
    _ext = None
    if not enabled() or sys.platform == "win32":  # MSVC builds are untested: numba there
        return None
    try:
        from torch.utils import cpp_extension

        name = f"batchnorm_cpu_{_build_tag()}"
        if not _built(name):
            print("batchnorm: compiling the C++ CPU kernels (once, about a minute)...",
                  file=sys.stderr, flush=True)
        _ext = cpp_extension.load(
            name=name, sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
            verbose=verbose,
        )
    except Exception as e:  # no compiler, no ninja, no headers: the numba kernels still work
        warnings.warn(
            f"batchnorm: the C++ CPU kernels could not be built ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}); using the numba "
            f"kernels instead. Install a C++ compiler and `pip install ninja` to get them, or set "
            f"BATCHNORM_NATIVE=0 to silence this.",
            RuntimeWarning, stacklevel=2,
        )
        return None
    from . import buffers

    _ext.cache_set_limit(buffers.get_limit())
    return _ext


def supports(x: Tensor) -> bool:
    """float32/float64/bfloat16 CPU tensors of rank 2–5, contiguous or channels_last, non-empty."""
    return _ext.supports(x)


def forward_act(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, act: int, slope: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training forward with a fused activation: (act(γ x̂ + β), μ_B, σ²_B biased in float64)."""
    return _ext.forward_act(x, weight, bias, eps, act, slope)


def forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Algorithm 1 on a training batch: (y, μ_B, σ²_B biased), y in x's dtype and memory format."""
    y, mean, var = _ext.forward_act(x, weight, bias, eps, ACT_NONE, 0.0)
    sd = acc_dtype(x.dtype)
    return y, as_dtype(mean, sd), as_dtype(var, sd)


def eval_forward(
    x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None,
    bias: Tensor | None, eps: float, act: int = ACT_NONE, slope: float = 0.0,
) -> Tensor:
    """Inference: one pass y = act((x − E[x])·γ/sqrt(Var[x]+ε) + β) (Algorithm 2)."""
    return _ext.eval_forward(x, running_mean, running_var, weight, bias, eps, act, slope)


def backward_act(
    dy: Tensor, saved: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
    bias: Tensor | None, eps: float, mode: int, slope: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dL/dx, dL/dγ, dL/dβ) from x (mode SAVED_X / SAVED_X_ACT) or from y (SAVED_Y); dγ, dβ in
    γ's dtype (float32/64 by x's dtype without γ), as ``reference.backward``."""
    dx, dgamma, dbeta = _ext.backward_act(dy, saved, mean, var, weight, bias, eps, mode, slope)
    dt = weight.dtype if weight is not None else acc_dtype(saved.dtype)
    return dx, as_dtype(dgamma, dt), as_dtype(dbeta, dt)


def backward(
    dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Section 3's chain rule: (dL/dx, dL/dγ, dL/dβ)."""
    return backward_act(dy, x, mean, var, weight, None, eps, SAVED_X, 1.0)


if __name__ == "__main__":  # `python -m batchnorm.ops.native`: build now (make setup does)
    ext = load(verbose="-v" in sys.argv)
    print("batchnorm C++ kernels:", "ready" if ext is not None else "unavailable (numba is used)")
