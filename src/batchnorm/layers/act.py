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
- ``relu6``, ``silu`` (``swish``), ``hardswish``, ``hardsigmoid``, ``gelu``, ``gelu_tanh``,
  ``elu`` (with ``alpha``), ``mish``, ``sigmoid``, ``tanh``: the INPUT x, like ReLU; backward
  recomputes z and act'(z) with torch's own formulas and branch points.

Outside the fast path (tracing, scripting, transforms, other devices: ``ops/op.py``) the layer
runs torch's kernel followed by the activation, exactly ``torch.nn.BatchNorm2d`` + ``nn.ReLU``.
Parameters, buffers and ``state_dict`` are those of ``torch.nn.BatchNorm1d/2d`` (the layers are
subclasses of them), so weights trained with separate BN and activation layers load with
``strict=True``.
"""

from __future__ import annotations

from typing import Any

import torch
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
        *,
        alpha: float = 1.0,
    ) -> None:
        activation = {"swish": "silu"}.get(activation, activation)
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
        if activation == "elu" and not (isinstance(alpha, (int, float)) and alpha > 0):
            raise ValueError(f"alpha must be a number > 0 for elu, got {alpha!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.alpha = float(alpha)

    def extra_repr(self) -> str:
        extra = {
            "leaky_relu": f", negative_slope={self.negative_slope}",
            "elu": f", alpha={self.alpha}",
        }.get(self.activation, "")
        return f"{super().extra_repr()}, activation={self.activation!r}{extra}"

    def _act(self) -> tuple[int, float]:
        """(C++ code, its parameter: leaky ReLU's slope or ELU's alpha)."""
        return op.ACTIVATIONS[self.activation], (
            self.alpha if self.activation == "elu" else self.negative_slope
        )

    def _activate(self, y: Tensor) -> Tensor:
        """torch's own activation modules' functions (scriptable): the torch path's numbers."""
        a = self.activation
        if a == "relu":
            return F.relu(y)
        if a == "leaky_relu":
            return F.leaky_relu(y, self.negative_slope)
        if a == "relu6":
            return F.relu6(y)
        if a == "silu":
            return F.silu(y)
        if a == "hardswish":
            return F.hardswish(y)
        if a == "hardsigmoid":
            return F.hardsigmoid(y)
        if a == "gelu":
            return F.gelu(y)
        if a == "gelu_tanh":
            return F.gelu(y, approximate="tanh")
        if a == "elu":
            return F.elu(y, self.alpha)
        if a == "mish":
            return F.mish(y)
        if a == "sigmoid":
            return torch.sigmoid(y)
        if a == "tanh":
            return torch.tanh(y)
        return y


class BatchNormAct1d(_BatchNormAct, nn.BatchNorm1d):
    """Fused BN + activation over (N, C) or (N, C, L); ``state_dict`` of ``torch.nn.BatchNorm1d``."""

    _dims = (2, 3)


class BatchNormAct2d(_BatchNormAct, nn.BatchNorm2d):
    """Fused BN + activation over (N, C, H, W); ``state_dict`` of ``torch.nn.BatchNorm2d``."""

    _dims = (4,)
