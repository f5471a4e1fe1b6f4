"""Smoothness of the loss along the gradient (Santurkar et al. 2018, Section 3.1, Figure 4).

At parameters x with gradient g = ∇L(x) on one batch, step along −g with several sizes η:

    loss variation          L(x − ηg) for each η, summarized as max − min (with L(x))
    gradient predictiveness ||∇L(x − ηg) − ∇L(x)||₂ for each η
    effective β-smoothness  max_η ||∇L(x − ηg) − ∇L(x)||₂ / ||ηg||₂

A smooth landscape (small variation, small β) lets a step of size η be trusted: the gradient at
the end of the step still points where the gradient at its start said. Santurkar et al. found
both much smaller with BN.

All evaluations go through ``torch.func.functional_call`` with copied parameters and buffers:
the model's weights, running statistics and the global RNG are never touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["gradient_landscape"]

LossFn = Callable[[Any, Any], Tensor]


def gradient_landscape(
    model: nn.Module,
    batch: tuple[Any, Any],
    step_sizes: Sequence[float] = (0.05, 0.1, 0.2, 0.4),
    *,
    loss_fn: LossFn = F.cross_entropy,
) -> dict[str, Any]:
    """Loss and gradient along −∇L on ``batch`` for each step size η (see module doc).

    Uses the trainable parameters (``requires_grad``) and the model's current mode. Returns
    ``{"step_sizes", "loss", "grad_norm", "losses", "loss_range", "grad_change",
    "beta", "effective_beta"}`` (lists are per step size).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"batch must be an (inputs, targets) pair, got {type(batch).__name__}")
    etas = [float(e) for e in step_sizes]
    if not etas or any(not (e > 0 and math.isfinite(e)) for e in etas):
        raise ValueError(f"step_sizes must be positive finite numbers, got {list(step_sizes)!r}")
    inputs, targets = batch
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the model has no trainable parameters (all requires_grad=False)")
    fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b for n, b in model.named_buffers()}
    rng = torch.get_rng_state()

    def loss_and_grad(point: dict[str, Tensor]) -> tuple[float, dict[str, Tensor]]:
        leaves = {n: t.clone().requires_grad_(True) for n, t in point.items()}
        state = {**leaves, **fixed, **{n: b.clone() for n, b in buffers.items()}}
        torch.set_rng_state(rng)  # same dropout mask at every point
        loss = loss_fn(functional_call(model, state, (inputs,)), targets)
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        return loss.item(), {
            n: (g if g is not None else torch.zeros_like(leaves[n])).detach()
            for n, g in zip(leaves, grads, strict=True)
        }

    with torch.random.fork_rng(devices=[]):
        loss0, g0 = loss_and_grad(params)
        gnorm = _norm(g0)
        losses, changes, betas = [], [], []
        for eta in etas:
            point = {n: p - eta * g0[n] for n, p in params.items()}
            loss, g = loss_and_grad(point)
            change = _norm({n: g[n] - g0[n] for n in g})
            losses.append(loss)
            changes.append(change)
            betas.append(change / (eta * gnorm) if gnorm > 0 else 0.0)
    return {
        "step_sizes": etas,
        "loss": loss0,
        "grad_norm": gnorm,
        "losses": losses,
        "loss_range": max([loss0, *losses]) - min([loss0, *losses]),
        "grad_change": changes,
        "beta": betas,
        "effective_beta": max(betas),
    }


def _norm(tensors: dict[str, Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))
