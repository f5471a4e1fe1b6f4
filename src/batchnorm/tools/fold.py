"""Fold inference-mode BN into the layer before it (the paper, Algorithm 2: at inference BN is
the fixed linear map y = s·x + t with s = γ/sqrt(Var[x] + ε), t = β − s·E[x]).

After a Conv or Linear with weight W and bias b (per output channel c):

    W'[c] = s[c] · W[c],    b'[c] = s[c] · (b[c] − E[x][c]) + β[c]

which holds for grouped convolutions and any padding mode too (output channels are axis 0 of W).
Every other BN becomes a :class:`ChannelAffine` (y = s·x + t on axis 1). A fused BN + activation
layer (``BatchNormAct1d/2d``) folds its BN part the same way and keeps the activation as a module
after it.

Only layers whose eval-mode forward is known exactly are folded: ``torch.nn``'s BatchNorm1d/2d/3d
and SyncBatchNorm, and this package's BN, fused, ghost, renorm, sync and frozen layers (exact
types). Any other subclass (timm's ``BatchNormAct2d`` applies an activation and maybe dropout
inside its forward; a user's subclass may do anything) is left exactly as it was, and a
``UserWarning`` names each one: a tool must not fold half of a layer it does not understand.

"Directly follows" means: adjacent children of an ``nn.Sequential`` (a Conv/Linear child at index
i, the BN at i + 1). Layers wired together in a custom ``forward`` are not traced; their BN
layers become ChannelAffine, which gives the same output at a little more cost. A Linear before
a BN is folded for (N, C) activations, where the Linear's outputs are the BN's channels. BN layers
without running statistics (``track_running_stats=False`` normalize with batch statistics even
in eval) are left as they are.
"""

from __future__ import annotations

import copy
import warnings

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


def _known_types() -> tuple[type[nn.Module], ...]:
    """BN layers whose eval forward is exactly act(s·x + t), act from :func:`_activation_of`."""
    from .. import layers as L

    return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, L.BatchNorm1d,
            L.BatchNorm2d, L.BatchNorm3d, L.BatchNormAct1d, L.BatchNormAct2d, L.GhostBatchNorm1d,
            L.GhostBatchNorm2d, L.BatchRenorm1d, L.BatchRenorm2d, L.SyncBatchNorm,
            L.FrozenBatchNorm1d, L.FrozenBatchNorm2d, L.FrozenBatchNorm3d)


def _is_bn_like(mod: nn.Module) -> bool:
    from torch.nn.modules.batchnorm import _NormBase

    return isinstance(mod, _NormBase)


def _is_bn(mod: nn.Module) -> bool:
    """A layer this tool folds: a known type, with running statistics (materialized)."""
    rm = getattr(mod, "running_mean", None)
    return type(mod) in _known_types() and isinstance(rm, Tensor) \
        and not isinstance(rm, nn.parameter.UninitializedBuffer)


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
    act = getattr(bn, "activation", None)  # only BatchNormAct1d/2d among the known types
    if act is None or act == "identity":
        return None
    modules = {
        "relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(bn.negative_slope),
        "relu6": nn.ReLU6, "silu": nn.SiLU, "hardswish": nn.Hardswish,
        "hardsigmoid": nn.Hardsigmoid, "gelu": nn.GELU,
        "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "elu": lambda: nn.ELU(bn.alpha),
        "mish": nn.Mish, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
    }
    return modules[act]()  # a new name in op.ACTIVATIONS without an entry here: KeyError


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


def _fold(module: nn.Module, prefix: str, left: list[str]) -> None:
    names = list(module._modules)
    for i, name in enumerate(names):
        child = module._modules[name]
        if child is None:
            continue
        if not _is_bn(child):
            if _is_bn_like(child) and type(child) not in _known_types():
                left.append(f"{prefix}{name} ({type(child).__name__})")
                continue  # not understood: left as it is, not descended into
            _fold(child, f"{prefix}{name}.", left)
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
    BN subclasses of unknown behaviour are left as they are, with a warning naming them.

    The copy's outputs equal ``model.eval()``'s within float rounding (the fold is computed in
    float64 and stored in each layer's dtype).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_batchnorm expects an nn.Module, got {type(model).__name__}")
    folded = copy.deepcopy(model).eval()
    if _is_bn(folded):
        return _replacement(folded).eval()
    left: list[str] = []
    if _is_bn_like(folded) and type(folded) not in _known_types():
        left.append(type(folded).__name__)
    else:
        _fold(folded, "", left)
    if left:
        warnings.warn(
            f"fold_batchnorm left {len(left)} BN layer(s) as they were, because their forward is "
            f"not one this tool knows exactly: {', '.join(left)}. Their outputs are unchanged; "
            f"to fold them, convert them to torch.nn or batchnorm BN layers first.",
            UserWarning, stacklevel=2,
        )
    return folded.eval()
