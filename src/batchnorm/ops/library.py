"""torch.library custom ops for batch normalization's training path.

``batchnorm::bn_forward`` computes Algorithm 1 and returns (y, μ_B, σ²_B); its backward is
``batchnorm::bn_backward``, the chain rule of Section 3. Both have fake (meta) implementations,
so ``torch.compile`` and ``torch.export`` trace through them without graph breaks.

Which code computes them is chosen per call by :func:`kernel_for`: the compiled CPU kernels
(``ops/cpu.py``) for CPU tensors they support, PyTorch's native CUDA primitives (``ops/cuda.py``)
on CUDA, the reference equations (``ops/reference.py``) everywhere else. ``BATCHNORM_BACKEND=reference`` (or :func:`set_backend`) forces the reference.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch
from torch import Tensor

from . import reference

_BACKENDS = ("auto", "reference")
_backend = os.environ.get("BATCHNORM_BACKEND", "auto")


def set_backend(name: str) -> str:
    """Select ``"auto"`` (compiled CPU kernels where they apply) or ``"reference"``; returns the old one."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    old, _backend = _backend, name
    return old


def get_backend() -> str:
    """The backend selected by :func:`set_backend` or ``$BATCHNORM_BACKEND``."""
    return _backend


def kernel_for(x: Tensor) -> ModuleType:
    """The module whose ``forward``/``backward`` compute this call: compiled CPU or reference."""
    if _backend == "auto" and x.device.type == "cuda":
        from . import cuda  # PyTorch's native CUDA primitives (verified in tests/test_cuda.py)

        if cuda.supports(x):
            return cuda
    if _backend == "auto" and x.device.type == "cpu":
        try:
            from . import cpu
        except ImportError:  # numba missing: the reference path still works
            return reference
        if cpu.supports(x):
            return cpu
    return reference


def _stat_dtype(x: Tensor) -> torch.dtype:
    return reference.acc_dtype(x.dtype)


# ---------------------------------------------------------------- forward (Algorithm 1)
@torch.library.custom_op("batchnorm::bn_forward", mutates_args=())
def bn_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BN: returns y (x's dtype and memory format), μ_B and biased σ²_B (float32/64)."""
    return kernel_for(x).forward(x, weight, bias, eps)


@bn_forward.register_fake
def _(x, weight, bias, eps):
    c = x.shape[1]
    stat = x.new_empty((c,), dtype=_stat_dtype(x))
    return torch.empty_like(x), stat, stat.clone()


# ---------------------------------------------------------------- backward (Section 3)
@torch.library.custom_op("batchnorm::bn_backward", mutates_args=())
def bn_backward(
    dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dL/dx, dL/dγ, dL/dβ) from the saved input and batch statistics."""
    return kernel_for(x).backward(dy, x, mean, var, weight, eps)


@bn_backward.register_fake
def _(dy, x, mean, var, weight, eps):
    c = x.shape[1]
    pdtype = weight.dtype if weight is not None else _stat_dtype(x)
    return torch.empty_like(x), x.new_empty((c,), dtype=pdtype), x.new_empty((c,), dtype=pdtype)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, eps = inputs
    _, mean, var = output
    ctx.save_for_backward(x, weight, mean, var)  # x, γ, μ_B, σ²_B: all backward needs
    ctx.eps = eps
    ctx.has_bias = bias is not None


def _backward(ctx, dy, _dmean, _dvar):
    x, weight, mean, var = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if not (need_x or need_w or need_b):
        return None, None, None, None
    dx, dgamma, dbeta = bn_backward(dy.contiguous(memory_format=_fmt(x)), x, mean, var, weight, ctx.eps)
    dw = dgamma.to(weight.dtype) if (weight is not None and need_w) else None
    db = dbeta.to(weight.dtype if weight is not None else dbeta.dtype) if need_b else None
    return (dx if need_x else None), dw, db, None


def _fmt(x: Tensor) -> torch.memory_format:
    """The memory format x is laid out in (kernels expect dy in the same one)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


bn_forward.register_autograd(_backward, setup_context=_setup_context)
