"""Internal covariate shift as Santurkar, Tsipras, Ilyas & Madry (2018) define and measure it.

For layer i with weights W_i, at parameters W^t and one mini-batch (x, y):

    G_i  = ∇_{W_i} L(W_1^t, ..., W_{i-1}^t,     W_i^t, ..., W_k^t; x, y)
    G'_i = ∇_{W_i} L(W_1^{t+1}, ..., W_{i-1}^{t+1}, W_i^t, ..., W_k^t; x, y)

where W^{t+1} is the optimizer's step on the gradient of the same batch, applied to the layers
*before* i only. ICS_i = ||G_i − G'_i||₂ (and the cosine between them): how much the problem layer
i has to solve moves when the layers feeding it are updated. Santurkar et al. found it is not
reduced by BN (their Section 2.2, Figure 3).

"Before" is the order in which modules run in the forward pass (found with hooks), not the order
they are registered. Everything happens on a deep copy of the model and of the optimizer: the
caller's weights, buffers, optimizer state and RNG are untouched.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["internal_covariate_shift", "forward_order", "default_ics_layers"]

LossFn = Callable[[Any, Any], Tensor]
_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def default_ics_layers(model: nn.Module) -> list[str]:
    """Names of the Linear/Conv layers with a trainable weight (Santurkar et al.'s "layers")."""
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, _WEIGHTED) and m.weight is not None and m.weight.requires_grad
    ]


def forward_order(model: nn.Module, inputs: Any) -> list[str]:
    """Names of the modules that own parameters, in the order a forward pass first calls them."""
    order: list[str] = []
    handles = []

    def hook_for(name: str):
        def hook(module: nn.Module, args: Any) -> None:
            if name not in order:
                order.append(name)

        return hook

    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            handles.append(module.register_forward_pre_hook(hook_for(name)))
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for h in handles:
            h.remove()
    return order


def _clone_optimizer(
    opt: torch.optim.Optimizer, src: nn.Module, dst: nn.Module
) -> torch.optim.Optimizer:
    """The same optimizer (class, groups, hyper-parameters, state) over ``dst``'s parameters."""
    names = {id(p): n for n, p in src.named_parameters()}
    dst_params = dict(dst.named_parameters())
    groups = []
    for g in opt.param_groups:
        missing = [p for p in g["params"] if id(p) not in names]
        if missing:
            raise ValueError(
                f"the optimizer holds {len(missing)} parameter(s) that are not in the model; "
                f"pass the optimizer built over this model's parameters"
            )
        groups.append(
            {
                **{k: v for k, v in g.items() if k != "params"},
                "params": [dst_params[names[id(p)]] for p in g["params"]],
            }
        )
    clone = type(opt)(groups, **opt.defaults)
    clone.load_state_dict(copy.deepcopy(opt.state_dict()))
    return clone


def _split(batch: Any) -> tuple[Any, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"batch must be an (inputs, targets) pair, got {type(batch).__name__}")
    return batch[0], batch[1]


def internal_covariate_shift(
    model: nn.Module,
    batch: tuple[Any, Any],
    optimizer: torch.optim.Optimizer | float,
    *,
    loss_fn: LossFn = F.cross_entropy,
    layers: Sequence[str] | None = None,
) -> dict[str, Any]:
    """ICS per layer on one batch: ℓ2 distance and cosine between G_i and G'_i (see module doc).

    ``optimizer`` is the optimizer that trains ``model`` (cloned with its state) or a float, the
    learning rate of plain SGD. ``layers`` are module names with a ``weight`` (default: every
    Linear/Conv layer). The model is used in its current mode (training mode: BN uses batch
    statistics, as in a training step). Returns ``{"layers", "l2", "cosine", "relative",
    "grad_norm"}`` with one entry per layer, ``relative = l2 / ||G_i||``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs, targets = _split(batch)
    if isinstance(optimizer, (int, float)) and not isinstance(optimizer, bool):
        if optimizer < 0:
            raise ValueError(f"learning rate must be >= 0, got {optimizer}")
        lr = float(optimizer)

        def make_opt(m: nn.Module) -> torch.optim.Optimizer:
            return torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=lr)
    elif isinstance(optimizer, torch.optim.Optimizer):

        def make_opt(m: nn.Module) -> torch.optim.Optimizer:
            return _clone_optimizer(optimizer, model, m)
    else:
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer or a learning rate (float), "
            f"got {type(optimizer).__name__}"
        )

    names = list(layers) if layers is not None else default_ics_layers(model)
    modules = dict(model.named_modules())
    bad = [
        n
        for n in names
        if n not in modules or not isinstance(getattr(modules[n], "weight", None), Tensor)
    ]
    if bad:
        raise ValueError(
            f"layers {bad} are not modules with a weight; try {default_ics_layers(model)}"
        )
    if not names:
        raise ValueError(
            "the model has no Linear/Conv layer with a trainable weight; pass layers=[...]"
        )
    frozen = [n for n in names if not modules[n].weight.requires_grad]
    if frozen:
        raise ValueError(
            f"layers {frozen} have weight.requires_grad=False: their gradient is undefined"
        )

    rng = torch.get_rng_state()
    with torch.random.fork_rng(devices=[]):  # dropout etc. sees the same noise in every pass
        torch.set_rng_state(rng)
        order = forward_order(copy.deepcopy(model), inputs)
        out: dict[str, list] = {k: [] for k in ("layers", "l2", "cosine", "relative", "grad_norm")}
        for name in names:
            earlier = order[: order.index(name)] if name in order else []
            g0, g1 = _gradient_before_after(
                model, make_opt, inputs, targets, loss_fn, name, earlier, rng
            )
            diff = (g1 - g0).norm().item()
            norm = g0.norm().item()
            cos = F.cosine_similarity(g0.reshape(1, -1), g1.reshape(1, -1), eps=1e-30).item()
            cos = min(1.0, max(-1.0, cos))  # rounding can give 1 + 1e-16
            out["layers"].append(name)
            out["l2"].append(diff)
            out["cosine"].append(cos)
            out["relative"].append(diff / norm if norm > 0 else 0.0)
            out["grad_norm"].append(norm)
    return out


def _gradient_before_after(
    model: nn.Module,
    make_opt: Callable[[nn.Module], torch.optim.Optimizer],
    inputs: Any,
    targets: Any,
    loss_fn: LossFn,
    name: str,
    earlier: list[str],
    rng: Tensor,
) -> tuple[Tensor, Tensor]:
    work = copy.deepcopy(model)
    opt = make_opt(work)
    mods = dict(work.named_modules())
    weight = mods[name].weight
    earlier_params = {id(p) for n in earlier for p in mods[n].parameters(recurse=False)}
    own = {id(p) for p in mods[name].parameters(recurse=False)}
    earlier_params -= own

    buffers = {n: b.clone() for n, b in work.named_buffers()}
    torch.set_rng_state(rng)
    opt.zero_grad(set_to_none=True)
    loss_fn(work(inputs), targets).backward()
    g0 = weight.grad.detach().clone().double()
    for p in work.parameters():  # step only the layers before `name`
        if id(p) not in earlier_params:
            p.grad = None
    opt.step()
    with torch.no_grad():  # the second pass sees the same running stats as the first
        for n, b in work.named_buffers():
            b.copy_(buffers[n])
    torch.set_rng_state(rng)
    opt.zero_grad(set_to_none=True)
    (g1,) = torch.autograd.grad(loss_fn(work(inputs), targets), [weight])
    return g0, g1.detach().double()
