"""Swap ``torch.nn.BatchNorm*`` layers for ours in a whole model, and back; fuse BN + activation.

The converted layer *shares* the original's parameters and buffers (same tensor objects), so
an optimizer built before the conversion keeps working and no values change.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.lazy import LazyModuleMixin

from ..layers import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormBase,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
)
from ..layers.base import replace_modules, share_state
from .graph import trace

_TO_OURS: dict[type[nn.Module], type[BatchNormBase]] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
    nn.LazyBatchNorm1d: LazyBatchNorm1d,  # still lazy: shares the uninitialised tensors
    nn.LazyBatchNorm2d: LazyBatchNorm2d,
    nn.LazyBatchNorm3d: LazyBatchNorm3d,
}
_TO_TORCH: dict[type[nn.Module], type[nn.Module]] = {v: k for k, v in _TO_OURS.items()}


def _copy_layer(old: nn.Module, new_cls: type[nn.Module], **extra: Any) -> nn.Module:
    """A ``new_cls`` layer holding ``old``'s very parameters, buffers and mode (``extra``: the
    arguments ``new_cls`` has beyond torch's BN arguments)."""
    args = dict(
        eps=old.eps,
        momentum=old.momentum,
        affine=old.affine,
        track_running_stats=old.track_running_stats,
        **extra,
    )
    new: nn.Module
    if issubclass(new_cls, LazyModuleMixin):  # no num_features yet: the first call sets it
        new = new_cls(**args)
    else:
        new = new_cls(old.num_features, device="meta", **args)
    return share_state(old, new)


def _timm_bn_act(m: nn.Module) -> nn.Module | None:
    """timm's ``BatchNormAct2d`` as our ``BatchNormAct2d``, or None if ``m`` is not one we can
    copy exactly. Its forward is torch's BN, then ``self.drop``, then ``self.act``; we take it when
    ``drop`` is ``nn.Identity`` and ``act`` is ``nn.Identity`` or an activation module we fuse
    (``fuse_bn_act``'s list), with no hooks anywhere. Its state_dict keys are BN's, so ours loads
    the same checkpoints."""
    cls = type(m)
    if cls.__name__ != "BatchNormAct2d" or not cls.__module__.startswith("timm."):
        return None
    drop, act = getattr(m, "drop", None), getattr(m, "act", None)
    if type(drop) is not nn.Identity or not isinstance(act, nn.Module):
        return None
    spec = ("identity", {}) if type(act) is nn.Identity else _activation_of(act)
    if (
        spec is None
        or any(_has_hooks(x) for x in (m, drop, act))
        or list(m._modules) != ["drop", "act"]
    ):
        return None
    return _copy_layer(m, BatchNormAct2d, activation=spec[0], **spec[1])


def convert_model(module: nn.Module, to: str = "batchnorm") -> nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` and ``LazyBatchNorm1d/2d/3d`` with ours
    (``to="batchnorm"``) or ours with torch's (``to="torch"``), in place, returning the model (a
    new object if ``module`` itself was a BN layer). Exact types only: other subclasses may add
    behaviour we cannot copy, and are left alone. One exception is understood exactly: timm's
    ``BatchNormAct2d`` (BN, dropout, activation) becomes our fused ``BatchNormAct2d`` when its
    dropout is off and its activation is one we fuse (see :func:`_timm_bn_act`).
    """
    if to == "batchnorm":
        return replace_modules(
            module,
            lambda m: _copy_layer(m, _TO_OURS[type(m)]) if type(m) in _TO_OURS else _timm_bn_act(m),
        )
    if to == "torch":
        return replace_modules(
            module, lambda m: _copy_layer(m, _TO_TORCH[type(m)]) if type(m) in _TO_TORCH else None
        )
    raise ValueError(f"to must be 'batchnorm' or 'torch', got {to!r}")


_TO_FUSED: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: BatchNormAct1d,
    BatchNorm1d: BatchNormAct1d,
    nn.BatchNorm2d: BatchNormAct2d,
    BatchNorm2d: BatchNormAct2d,
}


def _activation_of(m: nn.Module) -> tuple[str, dict[str, float]] | None:
    """(activation, its keyword arguments) of a ``BatchNormAct`` equal to module ``m``, or None if
    there is none (a LeakyReLU with a negative slope is not invertible, so it stays separate)."""
    simple = {
        nn.ReLU: "relu",
        nn.ReLU6: "relu6",
        nn.SiLU: "silu",
        nn.Hardswish: "hardswish",
        nn.Hardsigmoid: "hardsigmoid",
        nn.Mish: "mish",
        nn.Sigmoid: "sigmoid",
        nn.Tanh: "tanh",
    }
    if type(m) in simple:
        return simple[type(m)], {}
    if type(m) is nn.GELU:
        return ("gelu_tanh" if m.approximate == "tanh" else "gelu"), {}
    if type(m) is nn.ELU:
        return "elu", {"alpha": float(m.alpha)}
    if type(m) is nn.LeakyReLU:
        if m.negative_slope == 0:
            return "relu", {}
        if m.negative_slope > 0:
            return "leaky_relu", {"negative_slope": float(m.negative_slope)}
    return None


def _has_hooks(m: nn.Module) -> bool:
    return bool(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
    )


_FUNCTIONAL_RELU = (F.relu, torch.relu, torch.relu_)


def _graph_activation(node: fx.Node, bn_node: fx.Node, root: nn.Module):
    """(activation, kwargs) when ``node`` applies an activation we fuse to ``bn_node``'s output
    alone: an activation module (shared or not, without hooks), or ``F.relu``/``torch.relu``/
    ``.relu()``; else None."""
    if node.args[:1] != (bn_node,) or len(node.args) != 1:
        return None
    if node.op == "call_module":
        act = root.get_submodule(str(node.target))  # call_module: a qualified name
        return None if _has_hooks(act) else _activation_of(act)
    if (
        node.op == "call_function"
        and node.target in _FUNCTIONAL_RELU
        and set(node.kwargs) <= {"inplace"}
    ):
        return "relu", {}
    if node.op == "call_method" and node.target in ("relu", "relu_") and not node.kwargs:
        return "relu", {}
    return None


def _past_identities(node: fx.Node, root: nn.Module) -> fx.Node:
    """``node``, or the last of a chain of ``nn.Identity`` calls (exact type, no hooks) that
    starts at ``node``'s only user and takes only its predecessor's output, each link the only
    user of the one before: the node whose output is ``node``'s very tensor. timm's ResNet blocks
    call ``drop_block``, an ``nn.Identity`` unless DropBlock is on, between ``bn1`` and ``act1``."""
    while len(node.users) == 1:
        (user,) = node.users
        if user.op != "call_module" or user.args != (node,) or user.kwargs:
            break
        mod = root.get_submodule(str(user.target))
        if type(mod) is not nn.Identity or _has_hooks(mod):
            break
        node = user
    return node


def _fuse_in_graph(module: nn.Module) -> nn.Module:
    """The model's fx graph with each remaining BN → activation pair fused (the activation's
    call removed, the BN swapped for a fused layer): a ``GraphModule`` sharing the model's
    modules and state_dict keys, or ``module`` itself when there is nothing to fuse there."""
    graph = trace(module)
    if graph is None:
        return module
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or calls[node.target] != 1 or len(node.users) != 1:
            continue
        bn = gm.get_submodule(node.target)
        fused_cls = _TO_FUSED.get(type(bn))
        last = _past_identities(node, gm)  # BN → Identity → activation fuses too
        if len(last.users) != 1:
            continue
        (user,) = last.users
        spec = _graph_activation(user, last, gm) if fused_cls is not None else None
        if spec is None or fused_cls is None or _has_hooks(bn):
            continue
        gm.set_submodule(node.target, _copy_layer(bn, fused_cls, activation=spec[0], **spec[1]))
        user.replace_all_uses_with(last)  # the Identity calls stay: they pass it on unchanged
        gm.graph.erase_node(user)
        changed = True
    if not changed:
        return module
    gm.graph.lint()
    gm.recompile()
    return gm


def fuse_bn_act(module: nn.Module) -> nn.Module:
    """Fuse each BN layer followed by an activation that ``BatchNormAct`` takes (ReLU, LeakyReLU
    with a slope ≥ 0, ReLU6, SiLU, Hardswish, Hardsigmoid, GELU, ELU, Mish, Sigmoid, Tanh) into
    one ``BatchNormAct1d/2d``; returns the model. Use the returned object.

    The fused layer computes the same values, saves one activation-sized tensor for backward
    instead of two, and skips the activation's own passes (a read and a write forward, two reads
    and a write backward; see ``layers/act.py``). It shares the BN layer's parameters and buffers
    (an optimizer built before keeps working).

    1. In place, inside every ``nn.Sequential`` (or a subclass that keeps its ``forward``, such
       as torchvision's ``Conv2dNormActivation``): the fused layer takes the BN's place and an
       ``nn.Identity`` the activation's, so every ``state_dict`` key stays the same.
    2. Then, in the model's ``torch.fx`` graph, each BN whose output goes only into an activation
       (a module, even one shared with other calls as ResNet's ``relu``, or ``F.relu``), directly
       or through ``nn.Identity`` calls (timm's ``drop_block`` when off; they stay): the
       activation's call is removed from the graph and the BN swapped. When this finds anything,
       the result is an ``fx.GraphModule`` named like the model, with the same submodules and
       state_dict keys (its ``forward`` is the edited graph); the original object keeps computing
       the same values (with only step 1 applied).

    Left alone: BN layers of other types (``BatchNorm3d``, subclasses, the variants), a BN module
    called twice, a BN output used by anything besides its activation, pairs where either
    module has hooks, and models fx cannot trace (step 1 only).
    """
    seqs = [
        m
        for m in module.modules()
        if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward
    ]
    for seq in seqs:
        names = list(seq._modules)
        for name, nxt in zip(names, names[1:], strict=False):
            bn, act = seq._modules[name], seq._modules[nxt]
            fused_cls = _TO_FUSED.get(type(bn))
            spec = _activation_of(act) if act is not None else None
            if fused_cls is None or spec is None or _has_hooks(bn) or _has_hooks(act):
                continue
            seq._modules[name] = _copy_layer(bn, fused_cls, activation=spec[0], **spec[1])
            seq._modules[nxt] = nn.Identity()
    return _fuse_in_graph(module)
