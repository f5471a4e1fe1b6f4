"""Freeze BN layers for fine-tuning, and thaw them again.

:func:`freeze_batchnorm` swaps every ``BatchNorm1d/2d/3d`` (ours or ``torch.nn``'s, exact types)
for the matching ``FrozenBatchNorm*d``; :func:`unfreeze_batchnorm` swaps frozen layers back to
our ``BatchNorm*d``. Both work in place, share parameters and buffers with the layer they
replace (an optimizer built earlier keeps working), keep each layer's mode, and return the model
(a new object when ``model`` itself is a BN layer). Variants (renorm, ghost, sync, fused
BN + activation) are left alone: freezing would drop what makes them different.
"""

from __future__ import annotations

from typing import cast

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from ..layers.base import BatchNormBase, replace_modules, share_state
from ..layers.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from ..layers.frozen import (
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    _FrozenBatchNormBase,
)

_TO_BN: dict[type[nn.Module], type[BatchNormBase]] = {
    FrozenBatchNorm1d: BatchNorm1d,
    FrozenBatchNorm2d: BatchNorm2d,
    FrozenBatchNorm3d: BatchNorm3d,
}
_TO_FROZEN: dict[type[nn.Module], type[_FrozenBatchNormBase]] = {
    bn: cast(type[_FrozenBatchNormBase], frozen) for frozen, bn in _TO_BN.items()
}
_TO_FROZEN.update(
    {
        nn.BatchNorm1d: FrozenBatchNorm1d,
        nn.BatchNorm2d: FrozenBatchNorm2d,
        nn.BatchNorm3d: FrozenBatchNorm3d,
    }
)


def freeze_batchnorm(
    model: nn.Module,
    *,
    use_batch_stats: bool = False,
    update_stats: bool = False,
    train_affine: bool = False,
) -> nn.Module:
    """Replace BN layers by frozen ones with the given switches (defaults: fully frozen).

    Layers without running statistics (``track_running_stats=False``) cannot be frozen to fixed
    statistics and raise a ValueError before anything is changed.
    """
    for name, mod in model.named_modules():
        if type(mod) in _TO_FROZEN and mod.running_mean is None:
            raise ValueError(
                f"freeze_batchnorm: layer {name or type(mod).__name__!r} has no running statistics "
                f"(track_running_stats=False), so there is nothing to freeze it to; recreate it "
                f"with track_running_stats=True and call recompute_population_stats first"
            )

    def swap(mod: nn.Module) -> nn.Module | None:
        cls = _TO_FROZEN.get(type(mod))
        if cls is None:
            return None
        bn = cast(_NormBase, mod)  # a key of _TO_FROZEN: a BN layer
        new = cls(
            bn.num_features,
            eps=bn.eps,
            momentum=bn.momentum,
            affine=bn.affine,
            use_batch_stats=use_batch_stats,
            update_stats=update_stats,
            device="meta",
        )
        share_state(mod, new)
        new.set_train_affine(train_affine)
        return new

    return replace_modules(model, swap)


def unfreeze_batchnorm(model: nn.Module) -> nn.Module:
    """Replace frozen layers by ordinary BN layers (batch statistics in training, EMA updates,
    γ and β trainable again)."""

    def swap(mod: nn.Module) -> nn.Module | None:
        cls = _TO_BN.get(type(mod))
        if cls is None:
            return None
        bn = cast(_NormBase, mod)  # a key of _TO_BN: a frozen BN layer
        new = cls(
            bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine, device="meta"
        )
        share_state(mod, new)
        if new.affine:
            new.weight.requires_grad_(True)
            new.bias.requires_grad_(True)
        return new

    return replace_modules(model, swap)
