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

Which BN takes a layer's output alone is read from the model's ``torch.fx`` graph (BN layers kept
as leaves): a BN whose only input is a Conv/Linear's output, where that output goes nowhere else
and each module is called once, folds into it, in ``nn.Sequential``s and custom ``forward``s
(residual blocks, shortcuts) alike. A model fx cannot trace (data-dependent control flow) falls
back to adjacent children of an ``nn.Sequential``. Every other BN becomes ChannelAffine, which
gives the same output at a little more cost. Only submodules are replaced: the copy keeps the
model's classes and ``forward``. A Linear before a BN is folded for (N, C) activations, where
the Linear's outputs are the BN's channels. BN layers without running statistics
(``track_running_stats=False`` normalize with batch statistics even in eval) are left as they
are.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeGuard, cast

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _NormBase

from ..ops import reference
from .graph import trace

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class ChannelAffine(nn.Module):
    """y = scale·x + shift per channel (axis 1): an eval-mode BN layer after folding."""

    scale: Tensor  # buffers, registered in __init__
    shift: Tensor

    def __init__(self, scale: Tensor, shift: Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, x: Tensor) -> Tensor:
        y = x * reference.channel_view(self.scale, x) + reference.channel_view(self.shift, x)
        return y.to(x.dtype)  # bfloat16 activations stay bfloat16, as through the BN layer

    def extra_repr(self) -> str:
        return f"{self.scale.shape[0]}"


def _known_types() -> tuple[type[nn.Module], ...]:
    """BN layers whose eval forward is exactly act(s·x + t), act from :func:`_activation_of`."""
    from .. import layers as L

    return (
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.SyncBatchNorm,
        L.BatchNorm1d,
        L.BatchNorm2d,
        L.BatchNorm3d,
        L.BatchNormAct1d,
        L.BatchNormAct2d,
        L.GhostBatchNorm1d,
        L.GhostBatchNorm2d,
        L.BatchRenorm1d,
        L.BatchRenorm2d,
        L.SyncBatchNorm,
        L.FrozenBatchNorm1d,
        L.FrozenBatchNorm2d,
        L.FrozenBatchNorm3d,
    )


def _is_bn_like(mod: nn.Module) -> bool:
    from torch.nn.modules.batchnorm import _NormBase

    return isinstance(mod, _NormBase)


def _is_bn(mod: nn.Module) -> TypeGuard[_NormBase]:
    """A layer this tool folds: a known type, with running statistics (materialized)."""
    rm = getattr(mod, "running_mean", None)
    return (
        type(mod) in _known_types()
        and isinstance(rm, Tensor)
        and not isinstance(rm, nn.parameter.UninitializedBuffer)
    )


def _running_stats(bn: _NormBase) -> tuple[Tensor, Tensor]:
    """(running mean, running var) of a layer :func:`_is_bn` accepted (it has them)."""
    assert bn.running_mean is not None and bn.running_var is not None
    return bn.running_mean, bn.running_var


def _affine_of(bn: _NormBase) -> tuple[Tensor, Tensor]:
    """(s, t) of the eval-mode map y = s·x + t, in float64."""
    running_mean, running_var = _running_stats(bn)
    var = running_var.detach().to(torch.float64)
    mean = running_mean.detach().to(torch.float64)
    s = torch.rsqrt(var + bn.eps)
    weight = cast("Tensor | None", bn.weight)  # torch's _NormBase leaves weight, bias undeclared
    bias = cast("Tensor | None", bn.bias)
    if weight is not None:
        s = s * weight.detach().to(torch.float64)  # s = γ/sqrt(Var + ε)
    t = -mean * s
    if bias is not None:
        t = t + bias.detach().to(torch.float64)  # t = β − s·E[x]
    return s, t


def _activation_of(bn: Any) -> nn.Module | None:  # duck-typed: BatchNormAct's attributes
    """The activation a fused BN + activation layer applies after BN, as a module (or None)."""
    act = getattr(bn, "activation", None)  # only BatchNormAct1d/2d among the known types
    if act is None or act == "identity":
        return None
    modules: dict[str, Callable[[], nn.Module]] = {
        "relu": nn.ReLU,
        "leaky_relu": lambda: nn.LeakyReLU(bn.negative_slope),
        "relu6": nn.ReLU6,
        "silu": nn.SiLU,
        "hardswish": nn.Hardswish,
        "hardsigmoid": nn.Hardsigmoid,
        "gelu": nn.GELU,
        "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
        "elu": lambda: nn.ELU(bn.alpha),
        "mish": nn.Mish,
        "sigmoid": nn.Sigmoid,
        "tanh": nn.Tanh,
    }
    return modules[act]()  # a new name in op.ACTIVATIONS without an entry here: KeyError


def _fold_into(layer: nn.Module, bn: _NormBase) -> nn.Module:
    """A copy of Conv/Linear ``layer`` whose output equals bn(layer(x)) in eval mode."""
    s, t = _affine_of(bn)
    w = cast(Tensor, layer.weight).detach()  # a Conv/Linear: weight and (maybe None) bias
    bias = cast("Tensor | None", layer.bias)
    b = bias.detach().to(torch.float64) if bias is not None else torch.zeros_like(s)
    new = copy.deepcopy(layer)
    shape = (-1,) + (1,) * (w.dim() - 1)
    new.weight = nn.Parameter((w.to(torch.float64) * s.reshape(shape)).to(w.dtype))  # W' = s·W
    new.bias = nn.Parameter((s * b + t).to(w.dtype))  # b' = s·b + t = s·(b − E[x]) + β
    return new


def _replacement(bn: _NormBase) -> nn.Module:
    s, t = _affine_of(bn)
    dtype = _running_stats(bn)[0].dtype
    affine = ChannelAffine(s.to(dtype), t.to(dtype))
    act = _activation_of(bn)
    return affine if act is None else nn.Sequential(affine, act)


def _can_fold(prev: nn.Module | None, bn: nn.Module) -> bool:
    if not isinstance(prev, _FOLDABLE):
        return False
    out = prev.out_features if isinstance(prev, nn.Linear) else prev.out_channels
    return out == bn.num_features


def _graph_pairs(model: nn.Module) -> list[tuple[str, str]] | None:
    """(layer, bn) qualified names where the BN's only input is the Conv/Linear's output and that
    output goes nowhere else, each module called once: found in the model's fx graph, so residual
    blocks and other custom ``forward``s count. None when the model does not trace."""
    graph = trace(model)
    if graph is None:
        return None
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs: list[tuple[str, str]] = []
    for n in graph.nodes:
        if n.op != "call_module" or len(n.args) != 1 or n.kwargs:
            continue
        prev = n.args[0]
        if not (isinstance(prev, fx.Node) and prev.op == "call_module" and len(prev.users) == 1):
            continue
        if calls[n.target] != 1 or calls[prev.target] != 1:
            continue  # a module called twice: folding it would change its other call too
        # call_module targets are the modules' qualified names (str)
        bn, layer = model.get_submodule(str(n.target)), model.get_submodule(str(prev.target))
        if _is_bn(bn) and _can_fold(layer, bn):
            pairs.append((str(prev.target), str(n.target)))
    return pairs


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(layer, bn) names of adjacent children of an ``nn.Sequential``: there the order of the
    children is the data flow (the fallback for models fx cannot trace)."""
    pairs = []
    for prefix, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for a, b in zip(names, names[1:], strict=False):
            if _is_bn(seq._modules[b]) and _can_fold(seq._modules[a], seq._modules[b]):
                pairs.append((f"{prefix}.{a}" if prefix else a, f"{prefix}.{b}" if prefix else b))
    return pairs


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every BN folded into the Conv/Linear whose output it
    alone takes (found in the model's ``torch.fx`` graph, so residual blocks fold too; in
    ``nn.Sequential`` adjacency when the model does not trace) or turned into a per-channel
    affine; ``model`` is not changed. The copy keeps the model's class and ``forward``: only
    submodules are replaced. BN subclasses of unknown behaviour are left as they are, with a
    warning naming them.

    The copy's outputs equal ``model.eval()``'s within float rounding (the fold is computed in
    float64 and stored in each layer's dtype).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_batchnorm expects an nn.Module, got {type(model).__name__}")
    folded = copy.deepcopy(model).eval()
    if _is_bn(folded):
        return _replacement(folded).eval()
    left = [
        f"{name or '<model>'} ({type(m).__name__})"
        for name, m in folded.named_modules()
        if _is_bn_like(m) and type(m) not in _known_types()
    ]
    pairs = _graph_pairs(folded)
    if pairs is None:
        pairs = _sequential_pairs(folded)
    for layer_name, bn_name in pairs:
        bn = cast(_NormBase, folded.get_submodule(bn_name))  # a pair's BN passed _is_bn
        folded.set_submodule(layer_name, _fold_into(folded.get_submodule(layer_name), bn))
        act = _activation_of(bn)
        folded.set_submodule(bn_name, act if act is not None else nn.Identity())
    for name, m in list(folded.named_modules()):
        if name and _is_bn(m):  # a BN no layer takes in: y = s·x + t on its own
            folded.set_submodule(name, _replacement(m))
    if left:
        warnings.warn(
            f"fold_batchnorm left {len(left)} BN layer(s) as they were, because their forward is "
            f"not one this tool knows exactly: {', '.join(left)}. Their outputs are unchanged; "
            f"to fold them, convert them to torch.nn or batchnorm BN layers first.",
            UserWarning,
            stacklevel=2,
        )
    return folded.eval()
