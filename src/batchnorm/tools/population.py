"""Exact population statistics after training: the paper's Algorithm 2 ("PreciseBN").

The moving averages kept during training lag behind the weights (Wu & Johnson 2021). Algorithm 2
instead runs the trained network, weights untouched, over training mini-batches in train mode
and sets, for every BN layer,

    E[x]   = E_B[μ_B]                      (average of the batch means)
    Var[x] = m/(m−1) · E_B[σ²_B]           (average of the biased batch variances, unbiased)

Batches of unequal size: batch k with m_k values per channel (examples × spatial positions) is
weighted by m_k for the mean and pooled for the variance,

    E[x] = Σ m_k μ_k / Σ m_k,     Var[x] = Σ m_k σ²_k / Σ (m_k − 1),

which is exactly Algorithm 2 when every m_k = m, and otherwise the mean of all values seen and
the unbiased pooled *within-batch* variance (the variance the layer normalized with in training;
the spread of the batch means between batches is, as in the paper, not part of it).
Accumulation is in float64 with per-batch two-pass sums (no E[x²] − E[x]² cancellation).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..ops import reference

_TORCH_BN = nn.modules.batchnorm._BatchNorm


@dataclass
class LayerPopulationReport:
    """How far the old (EMA) running statistics of one layer were from the exact ones."""

    batches: int  # mini-batches this layer saw
    values_per_channel: int  # Σ m_k
    max_abs_mean_diff: float  # max over channels of |old mean − exact mean|
    max_mean_shift_std: float  # the same in units of the exact standard deviation sqrt(Var + ε)
    max_rel_var_diff: float  # max over channels of |old var − exact var| / exact var


class _Accumulator:
    """Per-layer float64 sums over batches: Σ m_k μ_k, Σ m_k σ²_k, Σ m_k, Σ (m_k − 1)."""

    def __init__(self) -> None:
        self.sum: Tensor | None = None
        self.m2: Tensor | None = None
        self.count = self.dof = self.batches = 0

    def add(self, x: Tensor) -> None:
        mean, var = reference.batch_stats(x.detach().to(torch.float64))  # μ_k, biased σ²_k
        self.add_stats(mean, var, reference.values_per_channel(x))

    def add_stats(self, mean: Tensor, var: Tensor, m: int) -> None:
        s, m2 = mean * m, var * m
        self.sum = s if self.sum is None else self.sum + s
        self.m2 = m2 if self.m2 is None else self.m2 + m2
        self.count += m
        self.dof += m - 1
        self.batches += 1

    def result(self) -> tuple[Tensor, Tensor]:
        assert self.sum is not None and self.m2 is not None, "no batch was added"
        return self.sum / self.count, self.m2 / self.dof


def _bn_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    from ..layers.base import BatchNormBase

    out: list[tuple[str, nn.modules.batchnorm._BatchNorm]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (BatchNormBase, _TORCH_BN)):
            continue
        if getattr(mod, "running_mean", None) is None:  # no running statistics to set
            continue
        if getattr(mod, "use_batch_stats", True) is False:  # frozen: never uses batch statistics
            continue
        out.append((name, mod))
    return out


def _running(mod: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """The running mean and variance of a layer from :func:`_bn_layers` (which has them)."""
    assert mod.running_mean is not None and mod.running_var is not None
    return mod.running_mean, mod.running_var


def _input_of(batch) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]  # (inputs, targets, ...)
    raise TypeError(
        "each batch must be a Tensor or an (inputs, targets, ...) tuple/list, "
        f"got {type(batch).__name__}"
    )


def _chunks(mod: Any, x: Tensor) -> list[Tensor]:  # duck-typed: ghost BN has chunks()
    """The groups one training forward normalizes separately (virtual batches for ghost BN)."""
    return mod.chunks(x) if hasattr(mod, "chunks") and hasattr(mod, "virtual_batch_size") else [x]


def _hook(acc: _Accumulator):
    def pre_hook(mod: Any, args: tuple) -> None:  # duck-typed: SyncBatchNorm has global_stats()
        if hasattr(mod, "global_stats") and mod._world_size() > 1:  # SyncBatchNorm: global batch
            acc.add_stats(*mod.global_stats(args[0]))
            return
        for chunk in _chunks(mod, args[0]):
            acc.add(chunk)

    return pre_hook


def recompute_population_stats(
    model: nn.Module, batches: Iterable, num_batches: int | None = None
) -> dict[str, LayerPopulationReport]:
    """Set every BN layer's running mean/var to the Algorithm 2 estimate over ``batches``.

    ``batches`` yields input tensors or (inputs, targets, ...) tuples, on the model's device; at
    most ``num_batches`` are used. The whole model runs in train mode under ``torch.no_grad()``;
    weights, momentum, modes, ``num_batches_tracked`` and hooks are as before afterwards (also
    when a batch raises — then no statistics change). Layers that saw no batch keep their values.
    Covers ``batchnorm`` layers (ghost BN per virtual batch) and ``torch.nn.BatchNorm*``; frozen
    layers are skipped. A SyncBatchNorm in a process group of several ranks takes each batch's
    statistics over all ranks (every rank must call this with the same number of batches); other
    layers use the local batches. Returns a report per layer name.
    """
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    layers = _bn_layers(model)
    if not layers:
        return {}
    accs = {name: _Accumulator() for name, _ in layers}
    modes = {mod: mod.training for mod in model.modules()}
    saved = {
        name: (
            mod.momentum,
            _running(mod)[0].clone(),
            _running(mod)[1].clone(),
            None if mod.num_batches_tracked is None else mod.num_batches_tracked.clone(),
        )
        for name, mod in layers
    }
    hooks = []
    try:
        for name, mod in layers:
            mod.momentum = 0.0  # the layers' own EMA changes nothing while we run
            hooks.append(mod.register_forward_pre_hook(_hook(accs[name])))
        model.train()
        seen = 0
        with torch.no_grad():
            for batch in itertools.islice(batches, num_batches):
                model(_input_of(batch))
                seen += 1
        if seen == 0:
            raise ValueError(
                "recompute_population_stats: `batches` yielded no batch; pass training batches"
            )
    finally:
        for h in hooks:
            h.remove()
        for name, mod in layers:
            momentum, rm, rv, nbt = saved[name]
            mod.momentum = momentum
            running_mean, running_var = _running(mod)
            with torch.no_grad():
                running_mean.copy_(rm)
                running_var.copy_(rv)
                if nbt is not None and mod.num_batches_tracked is not None:
                    mod.num_batches_tracked.copy_(nbt)
        for module, mode in modes.items():
            module.training = mode

    reports = {}
    with torch.no_grad():
        for name, mod in layers:
            acc = accs[name]
            if acc.batches == 0:
                continue
            mean, var = acc.result()
            running_mean, running_var = _running(mod)
            old_mean = running_mean.to(torch.float64)
            old_var = running_var.to(torch.float64)
            reports[name] = LayerPopulationReport(
                batches=acc.batches,
                values_per_channel=acc.count,
                max_abs_mean_diff=float((old_mean - mean).abs().max()),
                max_mean_shift_std=float(((old_mean - mean).abs() / (var + mod.eps).sqrt()).max()),
                max_rel_var_diff=float(((old_var - var).abs() / var.clamp_min(1e-30)).max()),
            )
            running_mean.copy_(mean.to(running_mean.dtype))
            running_var.copy_(var.to(running_var.dtype))
    return reports
