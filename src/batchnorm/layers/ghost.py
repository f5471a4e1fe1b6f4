"""Ghost Batch Normalization (Hoffer, Hubara & Soudry 2017, "Train longer, generalize better").

In training, a batch of N examples is split along axis 0 into consecutive virtual batches of
``virtual_batch_size`` (``torch.split`` order; the last one may be smaller, and a last chunk
with fewer than 2 values per channel is merged into the one before), and each is normalized
with its own statistics (Algorithm 1 per chunk). Inference uses the running statistics.

Running statistics: one EMA step per forward, with the pooled chunk statistics
(chunk k has m_k values per channel, mean μ_k and biased variance σ²_k):

    μ = Σ m_k μ_k / Σ m_k,   Var = Σ m_k σ²_k / Σ (m_k − 1)

i.e. the average of the chunk means and of the unbiased chunk variances when the chunks are
equal — the Algorithm 2 estimate of what one virtual batch sees, which is what eval should use.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from .. import functional as BF
from ..ops import op, reference
from .base import BatchNormBase


class _GhostBatchNormBase(BatchNormBase):
    """BN with statistics per virtual batch of ``virtual_batch_size`` examples."""

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int = 32,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        if (
            not isinstance(virtual_batch_size, int)
            or isinstance(virtual_batch_size, bool)
            or virtual_batch_size < 1
        ):
            raise ValueError(
                f"virtual_batch_size must be a positive int, got {virtual_batch_size!r}"
            )
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.virtual_batch_size = virtual_batch_size

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def chunks(self, x: Tensor) -> list[Tensor]:
        """x's virtual batches along axis 0 (a last one with < 2 values per channel is merged)."""
        parts = list(torch.split(x, self.virtual_batch_size, dim=0))
        if len(parts) > 1 and reference.values_per_channel(parts[-1]) < 2:
            parts[-2:] = [torch.cat(parts[-2:], dim=0)]
        return parts

    def forward(self, x: Tensor) -> Tensor:
        if not self._uses_batch_stats():
            return super().forward(x)  # inference: the running statistics
        self.check_input(x)
        outs, stats = [], []
        for chunk in self.chunks(x):
            y, mean, var = op.batch_norm_train(chunk, self.weight, self.bias, self.eps)
            outs.append(y)
            stats.append((reference.values_per_channel(chunk), mean.detach(), var.detach()))
        rm, rv, nbt = self._running_buffers()
        if rm is not None and rv is not None:
            with torch.no_grad():
                m_tot = sum(m for m, _, _ in stats)
                # Σ m_k μ_k / Σ m_k and Σ m_k σ²_k / Σ (m_k − 1): sums of tensors (≥ 1 chunk),
                # which sum()'s start of 0 types as `Tensor | int`
                mean = cast(Tensor, sum(m * mu for m, mu, _ in stats)) / m_tot
                dof = sum(m - 1 for m, _, _ in stats)
                unbiased = cast(Tensor, sum(m * v for m, _, v in stats)) / dof
                factor = BF.ema_factor(self.momentum, nbt)
                rm.lerp_(mean.to(rm.dtype), factor)  # the EMA of functional.update_running_stats
                rv.lerp_(unbiased.to(rv.dtype), factor)
        return torch.cat(outs, dim=0)


class GhostBatchNorm1d(_GhostBatchNormBase, nn.BatchNorm1d):
    """Ghost BN over (N, C) or (N, C, L) input."""

    _dims = (2, 3)


class GhostBatchNorm2d(_GhostBatchNormBase, nn.BatchNorm2d):
    """Ghost BN over (N, C, H, W) input, per channel."""

    _dims = (4,)
