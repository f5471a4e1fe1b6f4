"""CUDA path: PyTorch's native CUDA batch-norm primitives behind the same interface as ``cpu.py``.

The same four primitives ``torch.nn.SyncBatchNorm`` uses: ``batch_norm_stats`` (Welford, so no
E[x²]−E[x]² cancellation), ``batch_norm_elemt`` (y = γ·(x−μ)·invstd + β),
``batch_norm_backward_reduce`` (Σdy and Σdy·(x−μ) per channel) and ``batch_norm_backward_elemt``
(dL/dx from those sums — the paper's Section 3 equations, collapsed). They keep the input's memory
format and compute half/bfloat16 input with float32 statistics.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import values_per_channel


def supports(x: Tensor) -> bool:
    """CUDA tensors of a floating dtype the native kernels handle."""
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (y, μ_B, biased σ²_B)."""
    mean, invstd = torch.batch_norm_stats(x, eps)
    y = torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps)
    var = invstd.pow(-2) - eps  # σ²_B from 1/sqrt(σ²_B + ε)
    return y, mean, var.clamp_min(0)


def backward(
    dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dL/dx, dL/dγ, dL/dβ)."""
    invstd = torch.rsqrt(var + eps)
    # The native channels-last backward kernels insist on float32 parameters for half input.
    weight = weight.to(mean.dtype) if weight is not None else None
    has_w = weight is not None
    sum_dy, sum_dy_xmu, dgamma, dbeta = torch.batch_norm_backward_reduce(
        dy, x, mean, invstd, weight, True, has_w, has_w
    )
    if not has_w:  # the native reduce skips them without γ; same sums, Section 3's formulas
        dgamma = sum_dy_xmu * invstd  # dL/dγ = Σ dy·x̂
        dbeta = sum_dy  # dL/dβ = Σ dy
    count = torch.tensor([values_per_channel(x)], dtype=torch.int32, device=x.device)
    dx = torch.batch_norm_backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count)
    return dx, dgamma, dbeta
