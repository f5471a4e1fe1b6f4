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

Under ``torch.compile`` the leaky/identity layers save x (the γ check would be a graph break).
Parameters, buffers and ``state_dict`` are those of ``torch.nn.BatchNorm1d/2d``, so weights trained
with separate BN and activation layers load with ``strict=True``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import functional as BF
from ..ops import library
from ..ops.reference import values_per_channel
from .base import BatchNormBase


class _BatchNormAct(BatchNormBase):
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
        if activation not in library.ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(library.ACTIVATIONS)}, got {activation!r}"
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
        return library.ACTIVATIONS[self.activation], self.negative_slope

    def _save_mode(self, x: Tensor) -> int:
        """SAVE_OUTPUT when y can be inverted accurately, else SAVE_INPUT (see module docstring)."""
        if self.activation == "relu" or torch.compiler.is_compiling():
            return library.SAVE_INPUT
        if self.weight is None:
            return library.SAVE_OUTPUT
        with torch.no_grad():
            tol = torch.finfo(x.dtype).eps ** 0.5
            ok = bool((self.weight.abs() >= tol * self.bias.abs().clamp_min(1.0)).all())
        return library.SAVE_OUTPUT if ok else library.SAVE_INPUT

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        act, slope = self._act()
        rm, rv, nbt = self._running_buffers()
        w, b = self._params()
        if not self._uses_batch_stats():  # inference: one fused scale-shift-activation pass
            return library.eval_forward(x, rm, rv, w, b, self.eps, act, slope)

        save = library.SAVE_INPUT if act == 1 else library.SAVE_AUTO  # C++ checks γ
        y = library.train_eager(x, w, b, rm, rv, nbt, self.momentum, self.eps, act, slope, save)
        if y is not None:
            return y
        y, mean, var = library.bn_act_train(x, w, b, float(self.eps), act, slope, self._save_mode(x))
        if rm is not None:  # the same EMA as functional.batch_norm (unbiased σ²_B)
            factor = BF.ema_factor(self.momentum, nbt)
            BF.update_running_stats(
                rm, rv, mean.detach(), var.detach(), values_per_channel(x), factor
            )
        return y


class BatchNormAct1d(_BatchNormAct):
    """Fused BN + activation over (N, C) or (N, C, L); ``state_dict`` of ``torch.nn.BatchNorm1d``."""

    _dims = (2, 3)


class BatchNormAct2d(_BatchNormAct):
    """Fused BN + activation over (N, C, H, W); ``state_dict`` of ``torch.nn.BatchNorm2d``."""

    _dims = (4,)
