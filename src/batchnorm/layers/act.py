"""``BatchNormAct1d/2d``: BN followed by an activation in one op that saves one tensor for backward.

``torch.nn.BatchNorm2d`` + ``torch.nn.ReLU`` keep two activation-sized tensors for backward (BN's
input and ReLU's output). The fused op keeps one:

- ``leaky_relu`` / ``identity``: the OUTPUT y only (in-place activated BN, Rota Bulò et al. 2018).
  Backward inverts the activation (z = y, or y/slope where y < 0) and the affine map
  (x̂ = (z − β)/γ), then applies Section 3's equations. The inversion divides by γ, so it is used
  only while every |γ_c| ≥ √ε_dtype · max(1, |β_c|) (ε_dtype: the dtype's machine epsilon, so x̂
  keeps about half the dtype's digits even in the worst case); a call with a smaller |γ_c| — e.g.
  a zero-initialised γ — saves the input x instead, which is exact and no larger.
- ``relu``: the INPUT x. ReLU is not invertible: where y = 0, x̂ is lost, yet dL/dx_i there is
  −γ/σ·(mean(dz) + x̂_i·mean(dz·x̂)) ≠ 0 (x_i still moves μ_B and σ²_B). Backward recomputes
  z = γ x̂ + β from x for the mask, so memory is still one tensor (PyTorch keeps two).

Outside the fast path (tracing, scripting, transforms, other devices: ``ops/op.py``) the layer
runs torch's kernel followed by the activation, exactly ``torch.nn.BatchNorm2d`` + ``nn.ReLU``.
Parameters, buffers and ``state_dict`` are those of ``torch.nn.BatchNorm1d/2d`` (the layers are
subclasses of them), so weights trained with separate BN and activation layers load with
``strict=True``.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import op
from .base import BatchNormBase


class _BatchNormAct(BatchNormBase):
    _save = op.SAVE_AUTO  # the C++ op keeps y when γ allows it (never for ReLU), else x

    def __init__(
        self,
        num_features: int,
        activation: str = "relu",
        negative_slope: float = 0.01,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        if activation not in op.ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(op.ACTIVATIONS)}, got {activation!r}"
            )
        if activation == "leaky_relu" and not (
            isinstance(negative_slope, (int, float)) and negative_slope > 0
        ):
            raise ValueError(
                f"negative_slope must be > 0 for leaky_relu (the output is inverted in backward), "
                f"got {negative_slope!r}; use activation='relu' for a slope of 0"
            )
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.activation = activation
        self.negative_slope = float(negative_slope)

    def extra_repr(self) -> str:
        slope = f", negative_slope={self.negative_slope}" if self.activation == "leaky_relu" else ""
        return f"{super().extra_repr()}, activation={self.activation!r}{slope}"

    def _act(self) -> tuple[int, float]:
        return op.ACTIVATIONS[self.activation], self.negative_slope

    def _activate(self, y: Tensor) -> Tensor:
        if self.activation == "relu":
            return F.relu(y)
        if self.activation == "leaky_relu":
            return F.leaky_relu(y, self.negative_slope)
        return y


class BatchNormAct1d(_BatchNormAct, nn.BatchNorm1d):
    """Fused BN + activation over (N, C) or (N, C, L); ``state_dict`` of ``torch.nn.BatchNorm1d``."""

    _dims = (2, 3)


class BatchNormAct2d(_BatchNormAct, nn.BatchNorm2d):
    """Fused BN + activation over (N, C, H, W); ``state_dict`` of ``torch.nn.BatchNorm2d``."""

    _dims = (4,)
