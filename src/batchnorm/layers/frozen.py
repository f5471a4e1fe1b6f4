"""Frozen batch normalization for fine-tuning: statistics and affine held fixed, gradient still
flows to the input.

Three independent switches (all off by default, i.e. fully frozen):

- ``use_batch_stats``: in training mode normalize with the batch statistics (else the running ones);
- ``update_stats``: in training mode update the running statistics (EMA of ``functional``) —
  also when they are not used to normalize;
- ``train_affine``: γ and β have ``requires_grad=True``.

Eval mode always uses the running statistics. Buffers, parameters and ``state_dict`` keys are
those of ``torch.nn.BatchNorm*`` (the layers derive from torch's ``_NormBase``), so weights
trained with BN load unchanged. They are deliberately not ``_BatchNorm`` subclasses, as
torchvision's and timm's frozen BN are not: tools that re-estimate or retrain BN layers found by
class (``swa_utils.update_bn``, fvcore's precise BN) must leave frozen statistics alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase

from .. import functional as BF
from ..ops import op, reference
from .base import check_arguments


class _FrozenBatchNormBase(_NormBase):
    """BN with fixed statistics and affine; see the module docstring for the switches."""

    _dims: tuple[int, ...]  # accepted input ranks: set by each subclass
    running_mean: Tensor  # always tracked (track_running_stats=True), so never None here
    running_var: Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        use_batch_stats: bool = False,
        update_stats: bool = False,
        train_affine: bool = False,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        check_arguments(num_features, momentum)
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)
        self.use_batch_stats = bool(use_batch_stats)
        self.update_stats = bool(update_stats)
        self.set_train_affine(train_affine)

    def set_train_affine(self, flag: bool) -> None:
        """Switch ``requires_grad`` of γ and β."""
        self.train_affine = bool(flag)
        if self.affine:
            self.weight.requires_grad_(self.train_affine)
            self.bias.requires_grad_(self.train_affine)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, use_batch_stats={self.use_batch_stats}, "
            f"update_stats={self.update_stats}, train_affine={self.train_affine}"
        )

    def _uses_batch_stats(self) -> bool:
        return self.training and self.use_batch_stats

    def _eval(self, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        """x normalized with fixed statistics (the C++ kernel when it applies, else torch's)."""
        y = op.fast_batch_norm(x, mean, var, self.weight, self.bias, False, None, self.eps)
        if y is not None:
            return y
        return op.torch_batch_norm(
            x, mean, var, self.weight, self.bias, False, None, self.eps, None
        )

    def _check_input_dim(self, x: Tensor) -> None:
        BF.check_input(x, dims=self._dims, layer=type(self).__name__)

    def check_input(self, x: Tensor) -> None:
        BF.check_hyperparameters(self.eps, self.momentum)
        BF.check_input(
            x,
            self.num_features,
            self._dims,
            training=self.training and (self.use_batch_stats or self.update_stats),
            layer=type(self).__name__,
        )

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        update = self.training and self.update_stats
        if self._uses_batch_stats():
            rm, rv, nbt = (
                (self.running_mean, self.running_var, self.num_batches_tracked)
                if update
                else (None, None, None)
            )
            return BF.batch_norm(
                x,
                rm,
                rv,
                self.weight,
                self.bias,
                True,
                self.momentum,
                self.eps,
                num_batches_tracked=nbt,
            )
        if update:  # update the running statistics, but normalize with those from before this batch
            old_mean, old_var = self.running_mean.clone(), self.running_var.clone()
            with torch.no_grad():
                mean, var = reference.batch_stats(x)
                factor = BF.ema_factor(self.momentum, self.num_batches_tracked)
                BF.update_running_stats(
                    self.running_mean,
                    self.running_var,
                    mean,
                    var,
                    reference.values_per_channel(x),
                    factor,
                )
            return self._eval(x, old_mean, old_var)
        return self._eval(x, self.running_mean, self.running_var)


class FrozenBatchNorm1d(_FrozenBatchNormBase):
    """Frozen BN over (N, C) or (N, C, L) input."""

    _dims = (2, 3)


class FrozenBatchNorm2d(_FrozenBatchNormBase):
    """Frozen BN over (N, C, H, W) input."""

    _dims = (4,)


class FrozenBatchNorm3d(_FrozenBatchNormBase):
    """Frozen BN over (N, C, D, H, W) input."""

    _dims = (5,)
