"""Batch Renormalization (Ioffe 2017, arXiv 1702.03275): BN that stays correct at small batches.

In training, each activation is normalized with the batch statistics and then corrected towards
the running (population) statistics μ, σ:

    x̂ = (x − μ_B)/σ_B,   y = γ·(x̂·r + d) + β
    r = clip(σ_B/σ, 1/r_max, r_max),   d = clip((μ_B − μ)/σ, −d_max, d_max)

with σ_B = sqrt(σ²_B + ε) and σ = sqrt(running_var + ε). r and d are *constants* in backward
(paper, Algorithm 1: "stop_gradient"); the gradient flows through μ_B and σ_B as in BN. With
r_max = 1 and d_max = 0 this is exactly BN. The paper starts there and relaxes the clipping
(its schedule: (1, 0) for 5k steps, then to r_max = 3 over 40k and d_max = 5 over 25k steps);
here ``warmup_steps`` at (1, 0), then a linear ramp over ``relax_steps`` to (r_max, d_max),
counted by ``num_batches_tracked``. Inference is the ordinary eval-mode BN.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import functional as BF
from ..ops import op, reference
from .base import BatchNormBase


class _BatchRenormBase(BatchNormBase):
    """Batch Renormalization; ``r_max``, ``d_max`` are the final clipping limits."""

    # __init__ requires track_running_stats=True, so these buffers are never None here
    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 0,
        relax_steps: int = 0,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        if not track_running_stats:
            raise ValueError(
                "Batch Renormalization corrects batch statistics towards the running ones, so it "
                "needs track_running_stats=True; use BatchNorm for track_running_stats=False"
            )
        if not (isinstance(r_max, (int, float)) and r_max >= 1.0):
            raise ValueError(f"r_max must be a number >= 1 (1 turns r off), got {r_max!r}")
        if not (isinstance(d_max, (int, float)) and d_max >= 0.0):
            raise ValueError(f"d_max must be a number >= 0 (0 turns d off), got {d_max!r}")
        for name, v in (("warmup_steps", warmup_steps), ("relax_steps", relax_steps)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be a non-negative int (training steps), got {v!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.warmup_steps = warmup_steps
        self.relax_steps = relax_steps

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, "
            f"warmup_steps={self.warmup_steps}, relax_steps={self.relax_steps}"
        )

    def clip_limits(self, step: int | None = None) -> tuple[float, float]:
        """(r_max, d_max) in force at ``step`` (default: the current ``num_batches_tracked``)."""
        if step is None:
            step = int(self.num_batches_tracked.item())
        if step < self.warmup_steps:
            return 1.0, 0.0
        if self.relax_steps == 0:
            return self.r_max, self.d_max
        t = min(1.0, (step - self.warmup_steps) / self.relax_steps)  # linear relaxation in [0, 1]
        return 1.0 + t * (self.r_max - 1.0), t * self.d_max

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)  # the ordinary eval-mode BN
        self.check_input(x)
        r_max, d_max = self.clip_limits()
        # x̂ with batch statistics; gradients flow through μ_B and σ_B (the op's backward).
        x_hat, mean, var = op.batch_norm_train(x, None, None, self.eps)
        with torch.no_grad():  # r and d are constants in backward
            sigma_b = torch.sqrt(var + self.eps)
            sigma = torch.sqrt(self.running_var.to(var.dtype) + self.eps)
            r = (sigma_b / sigma).clamp(1.0 / r_max, r_max)
            d = ((mean - self.running_mean.to(mean.dtype)) / sigma).clamp(-d_max, d_max)
            # Running stats are updated after r, d used the old ones (paper, Algorithm 1).
            factor = BF.ema_factor(self.momentum, self.num_batches_tracked)
            BF.update_running_stats(
                self.running_mean,
                self.running_var,
                mean,
                var,
                reference.values_per_channel(x),
                factor,
            )
        r = r.to(x.dtype)
        d = d.to(x.dtype)
        scale = reference.channel_view(r if self.weight is None else self.weight * r, x)
        shift = reference.channel_view(d if self.weight is None else self.weight * d, x)
        y = x_hat * scale + shift  # γ·(x̂·r + d)
        if self.bias is not None:
            y = y + reference.channel_view(self.bias, x)  # + β
        return y


class BatchRenorm1d(_BatchRenormBase, nn.BatchNorm1d):
    """Batch Renormalization over (N, C) or (N, C, L) input."""

    _dims = (2, 3)


class BatchRenorm2d(_BatchRenormBase, nn.BatchNorm2d):
    """Batch Renormalization over (N, C, H, W) input, per channel."""

    _dims = (4,)
