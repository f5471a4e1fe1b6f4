"""Swap ``torch.nn.BatchNorm*`` layers for ours in a whole model, and back.

The converted layer *shares* the original's parameters and buffers (same tensor objects), so
an optimizer built before the conversion keeps working and no values change.
"""

from __future__ import annotations

from torch import nn

from ..layers import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase
from ..layers.base import replace_modules, share_state

_TO_OURS: dict[type[nn.Module], type[BatchNormBase]] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}
_TO_TORCH: dict[type[nn.Module], type[nn.Module]] = {v: k for k, v in _TO_OURS.items()}


def _copy_layer(old: nn.Module, new_cls: type[nn.Module]) -> nn.Module:
    """A ``new_cls`` layer holding ``old``'s very parameters, buffers and mode."""
    new = new_cls(
        old.num_features, eps=old.eps, momentum=old.momentum, affine=old.affine,
        track_running_stats=old.track_running_stats, device="meta",
    )
    return share_state(old, new)


def _convert(module: nn.Module, table: dict[type[nn.Module], type[nn.Module]]) -> nn.Module:
    return replace_modules(
        module, lambda m: _copy_layer(m, table[type(m)]) if type(m) in table else None
    )


def convert_model(module: nn.Module, to: str = "batchnorm") -> nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` with ours (``to="batchnorm"``) or ours with
    torch's (``to="torch"``), in place, returning the model (a new object if ``module`` itself was
    a BN layer). Subclasses of either are left alone: they may add behaviour we cannot copy.
    """
    if to == "batchnorm":
        return _convert(module, _TO_OURS)
    if to == "torch":
        return _convert(module, _TO_TORCH)
    raise ValueError(f"to must be 'batchnorm' or 'torch', got {to!r}")
