"""Fold inference-mode BN into the layer before it (the paper, Algorithm 2: at inference BN is
the fixed linear map y = s·x + t with s = γ/sqrt(Var[x] + ε), t = β − s·E[x]).

After a Conv or Linear with weight W and bias b (per output channel c):

    W'[c] = s[c] · W[c],    b'[c] = s[c] · (b[c] − E[x][c]) + β[c]

which holds for grouped convolutions and any padding mode too (output channels are axis 0 of W).
Every other BN becomes a :class:`ChannelAffine` (y = s·x + t on axis 1). A fused BN + activation
layer (``BatchNormAct1d/2d``, or any BN layer with an ``activation`` module attribute) folds
its BN part the same way and keeps the activation as a module after it.

"Directly follows" means: adjacent children of an ``nn.Sequential`` (a Conv/Linear child at index
i, the BN at i + 1). Layers wired together in a custom ``forward`` are not traced; their BN
layers become ChannelAffine, which gives the same output at a little more cost. A Linear before
a BN is folded for (N, C) activations, where the Linear's outputs are the BN's channels. BN layers
without running statistics (``track_running_stats=False`` normalize with batch statistics even
in eval) are left as they are.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..ops import reference

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class ChannelAffine(nn.Module):
    """y = scale·x + shift per channel (axis 1): an eval-mode BN layer after folding."""

    def __init__(self, scale: Tensor, shift: Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, x: Tensor) -> Tensor:
        return x * reference.channel_view(self.scale, x) + reference.channel_view(self.shift, x)

    def extra_repr(self) -> str:
        return f"{self.scale.shape[0]}"


def _is_bn(mod: nn.Module) -> bool:
    from ..layers.base import BatchNormBase

    return isinstance(mod, (BatchNormBase, nn.modules.batchnorm._BatchNorm)) \
        and getattr(mod, "running_mean", None) is not None


def _affine_of(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """(s, t) of the eval-mode map y = s·x + t, in float64."""
    var = bn.running_var.detach().to(torch.float64)
    mean = bn.running_mean.detach().to(torch.float64)
    s = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight.detach().to(torch.float64)  # s = γ/sqrt(Var + ε)
    t = -mean * s
    if bn.bias is not None:
        t = t + bn.bias.detach().to(torch.float64)  # t = β − s·E[x]
    return s, t


def _activation_of(bn: nn.Module) -> nn.Module | None:
    """The activation a fused BN + activation layer applies after BN, as a module (or None)."""
    act = getattr(bn, "activation", None)
    if act is None or act == "identity" or isinstance(act, nn.Identity):
        return None
    if isinstance(act, nn.Module):
        return act
    if act == "relu":  # BatchNormAct1d/2d name their activation
        return nn.ReLU()
    if act == "leaky_relu":
        return nn.LeakyReLU(bn.negative_slope)
    raise TypeError(
        f"fold_batchnorm: cannot keep activation {act!r} of {type(bn).__name__}; expected an "
        f"nn.Module or one of 'identity', 'relu', 'leaky_relu'"
    )


def _fold_into(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of Conv/Linear ``layer`` whose output equals bn(layer(x)) in eval mode."""
    s, t = _affine_of(bn)
    w = layer.weight.detach()
    b = layer.bias.detach().to(torch.float64) if layer.bias is not None else torch.zeros_like(s)
    new = copy.deepcopy(layer)
    shape = (-1,) + (1,) * (w.dim() - 1)
    new.weight = nn.Parameter((w.to(torch.float64) * s.reshape(shape)).to(w.dtype))  # W' = s·W
    new.bias = nn.Parameter((s * b + t).to(w.dtype))  # b' = s·b + t = s·(b − E[x]) + β
    return new


def _replacement(bn: nn.Module) -> nn.Module:
    s, t = _affine_of(bn)
    dtype = bn.running_mean.dtype
    affine = ChannelAffine(s.to(dtype), t.to(dtype))
    act = _activation_of(bn)
    return affine if act is None else nn.Sequential(affine, act)


def _can_fold(prev: nn.Module | None, bn: nn.Module) -> bool:
    if not isinstance(prev, _FOLDABLE):
        return False
    out = prev.out_features if isinstance(prev, nn.Linear) else prev.out_channels
    return out == bn.num_features


def _fold(module: nn.Module) -> None:
    names = list(module._modules)
    for i, name in enumerate(names):
        child = module._modules[name]
        if child is None:
            continue
        if not _is_bn(child):
            _fold(child)
            continue
        prev_name = names[i - 1] if i > 0 else None
        prev = module._modules[prev_name] if prev_name is not None else None
        if isinstance(module, nn.Sequential) and _can_fold(prev, child):
            module._modules[prev_name] = _fold_into(prev, child)
            act = _activation_of(child)
            module._modules[name] = act if act is not None else nn.Identity()
        else:
            module._modules[name] = _replacement(child)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every BN folded into the Conv/Linear it directly follows
    (in an ``nn.Sequential``) or turned into a per-channel affine; ``model`` is not changed.

    The copy's outputs equal ``model.eval()``'s within float rounding (the fold is computed in
    float64 and stored in each layer's dtype).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_batchnorm expects an nn.Module, got {type(model).__name__}")
    folded = copy.deepcopy(model).eval()
    if _is_bn(folded):
        return _replacement(folded).eval()
    _fold(folded)
    return folded.eval()
