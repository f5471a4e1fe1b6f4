"""The paper's equations in plain tensor code: the oracle every kernel is tested against.

Ioffe & Szegedy (2015), Algorithm 1 (forward) and the chain rule of Section 3 (backward).
Channel axis is 1; statistics are taken over every other axis, so a (N, C, H, W) map has
m' = N·H·W values per channel (Section 3.2). Low-precision inputs (float16, bfloat16) are
computed in float32; float64 stays float64.
"""

from __future__ import annotations

import torch
from torch import Tensor


def reduce_dims(x: Tensor) -> list[int]:
    """Axes that a channel's statistics are taken over: batch and every spatial axis."""
    return [0, *range(2, x.dim())]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype, without the call when it already is (microseconds that matter on small batches)."""
    return t if t.dtype == dtype else t.to(dtype)


def channel_view(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-channel vector (C,) so it broadcasts against x (N, C, *spatial)."""
    return v.reshape((1, -1) + (1,) * (x.dim() - 2))


def values_per_channel(x: Tensor) -> int:
    """m: how many values each channel's statistics average over (N·∏spatial)."""
    return x.numel() // max(x.shape[1], 1) if x.dim() >= 2 else x.numel()


def centered(xa: Tensor, approx_mean: Tensor) -> tuple[Tensor, Tensor]:
    """x_i − μ_B accurately, given a rounded μ_B; also returns the correction mean(x − approx).

    A float32 mean of data like 1e4 ± 1e-2 is itself rounded by ~5e-4 (its ulp), i.e. 5% of σ.
    Shifting by that rounded mean first is exact for clustered data (Sterbenz), and the mean of
    the small differences is accurate, so (x − shift) − mean(x − shift) keeps full precision.
    """
    dims = reduce_dims(xa)
    d = xa - channel_view(approx_mean.to(xa.dtype), xa)
    correction = d.mean(dim=dims)
    return d - channel_view(correction, xa), correction


def _stats_and_centered(xa: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    dims = reduce_dims(xa)
    shift = xa.mean(dim=dims)  # μ_B = 1/m Σ x_i (rounded; refined below)
    xc, correction = centered(xa, shift)  # x_i − μ_B
    var = xc.square().mean(dim=dims)  # σ²_B = 1/m Σ (x_i − μ_B)²
    return shift + correction, var, xc


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """μ_B and the biased σ²_B per channel, two-pass (no E[x²]−E[x]² cancellation)."""
    mean, var, _ = _stats_and_centered(x.to(acc_dtype(x.dtype)))
    return mean, var


def normalize(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """y = γ·(x − μ)/sqrt(σ² + ε) + β, computed in the accumulation dtype, returned in x's."""
    xa = x.to(acc_dtype(x.dtype))
    return _scale_shift(xa - channel_view(mean.to(xa.dtype), x), var, weight, bias, eps).to(x.dtype)


def _scale_shift(
    xc: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    invstd = torch.rsqrt(var.to(xc.dtype) + eps)
    y = xc * channel_view(invstd, xc)  # x̂_i = (x_i − μ_B) / sqrt(σ²_B + ε)
    if weight is not None:
        y = y * channel_view(weight.to(xc.dtype), xc)  # γ x̂_i
    if bias is not None:
        y = y + channel_view(bias.to(xc.dtype), xc)  # + β
    return y


def forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Algorithm 1 on a training mini-batch. Returns (y, μ_B, σ²_B biased)."""
    mean, var, xc = _stats_and_centered(x.to(acc_dtype(x.dtype)))
    return _scale_shift(xc, var, weight, bias, eps).to(x.dtype), mean, var


def backward(
    dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Section 3's chain rule, term by term. Returns (dL/dx, dL/dγ, dL/dβ).

    dL/dγ and dL/dβ are returned even without affine parameters (callers drop them), in γ's
    dtype when γ is given (as the op's fake implementation declares), else the accumulation dtype.
    """
    acc = acc_dtype(x.dtype)
    dims = reduce_dims(x)
    m = values_per_channel(x)
    xa, dya = x.to(acc), dy.to(acc)
    mean, var = mean.to(acc), var.to(acc)
    xc, _ = centered(xa, mean)  # x_i − μ_B (re-centred: the saved μ_B may be rounded)
    invstd = torch.rsqrt(var + eps)  # 1/sqrt(σ²_B + ε)
    gamma = weight.to(acc) if weight is not None else torch.ones_like(mean)

    dx_hat = dya * channel_view(gamma, x)  # dL/dx̂_i = dL/dy_i · γ
    # dL/dσ²_B = Σ_i dL/dx̂_i · (x_i − μ_B) · (−1/2)(σ²_B + ε)^(−3/2)
    dvar = (dx_hat * xc).sum(dims) * (-0.5) * invstd.pow(3)
    # dL/dμ_B = Σ_i dL/dx̂_i · (−1/sqrt(σ²_B + ε)) + dL/dσ²_B · Σ_i −2(x_i − μ_B) / m
    dmean = -dx_hat.sum(dims) * invstd + dvar * (-2.0 * xc.sum(dims) / m)
    # dL/dx_i = dL/dx̂_i / sqrt(σ²_B + ε) + dL/dσ²_B · 2(x_i − μ_B)/m + dL/dμ_B / m
    dx = (
        dx_hat * channel_view(invstd, x)
        + channel_view(dvar, x) * 2.0 * xc / m
        + channel_view(dmean, x) / m
    )
    x_hat = xc * channel_view(invstd, x)
    dgamma = (dya * x_hat).sum(dims)  # dL/dγ = Σ_i dL/dy_i · x̂_i
    dbeta = dya.sum(dims)  # dL/dβ = Σ_i dL/dy_i
    if weight is not None:
        dgamma, dbeta = dgamma.to(weight.dtype), dbeta.to(weight.dtype)
    return dx.to(x.dtype), dgamma, dbeta


def eval_forward(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Inference (Algorithm 2, step 11): y = γ/sqrt(Var+ε)·x + (β − γE/sqrt(Var+ε)), a fixed map."""
    return normalize(x, running_mean, running_var, weight, bias, eps)
