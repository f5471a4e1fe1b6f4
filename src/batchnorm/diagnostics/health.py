"""Per-layer health of the BN layers of a trained model: a small table.

For every BN layer (this library's ``BatchNormBase`` or ``torch.nn.BatchNorm1d/2d/3d``):

- drift between the statistics of a given batch and the running estimates used at inference
  (Algorithm 2): ``mean_shift`` = |μ_B − μ_run| / sqrt(σ²_run + ε) per channel (in running
  standard deviations), ``var_ratio`` = σ²_B / σ²_run per channel; large values mean the eval-mode
  network sees differently scaled inputs than the one that was trained (Wu & Johnson 2021);
- channels whose running variance is below ``var_threshold`` (dead or constant inputs:
  normalization divides by ~sqrt(ε) and amplifies noise);
- γ collapse: channels with |γ| < ``gamma_threshold`` (the layer switched the channel off).

The batch goes through the model in eval mode by default (the inputs inference sees); with
``train_mode=True`` in training mode (the inputs training sees), after which every BN buffer and
the module modes are restored.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..layers import BatchNormBase

__all__ = ["bn_health", "bn_layers", "health_table"]

_BN = (BatchNormBase, _BatchNorm)


def bn_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """Every BN layer of ``model`` (ours and torch.nn's), by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _BN)}


def _channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (axis 1) mean and biased variance in float64, over N and spatial axes."""
    x = x.detach().double()
    dims = [0, *range(2, x.dim())]
    return x.mean(dim=dims), x.var(dim=dims, correction=0)


def bn_health(
    model: nn.Module,
    inputs: Tensor | None = None,
    *,
    train_mode: bool = False,
    var_threshold: float = 1e-4,
    gamma_threshold: float = 1e-2,
) -> list[dict[str, Any]]:
    """One row (a dict) per BN layer; batch-drift columns are ``None`` when no ``inputs`` given."""
    layers = bn_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layers (ours or torch.nn's)")
    seen: dict[str, Tensor] = {}
    if inputs is not None:
        seen = _capture_inputs(model, layers, inputs, train_mode)
    rows = []
    for name, bn in layers.items():
        rm, rv = bn.running_mean, bn.running_var
        row: dict[str, Any] = {
            "layer": name,
            "type": type(bn).__name__,
            "channels": bn.num_features,
            "batches_tracked": (
                int(bn.num_batches_tracked) if bn.num_batches_tracked is not None else None
            ),
            "low_var_channels": int((rv < var_threshold).sum()) if rv is not None else None,
            "min_running_var": float(rv.min()) if rv is not None else None,
            "gamma_collapsed": None,
            "gamma_abs_mean": None,
            "gamma_abs_min": None,
            "mean_shift_mean": None,
            "mean_shift_max": None,
            "var_ratio_min": None,
            "var_ratio_max": None,
            "log_var_ratio_mean": None,
        }
        weight = cast("Tensor | None", bn.weight)  # torch's _NormBase leaves weight undeclared
        if weight is not None:
            g = weight.detach().abs().double()
            row.update(
                gamma_collapsed=int((g < gamma_threshold).sum()),
                gamma_abs_mean=float(g.mean()),
                gamma_abs_min=float(g.min()),
            )
        if name in seen and rm is not None and rv is not None:
            mean, var = _channel_stats(seen[name])
            rm64, rv64 = rm.detach().double(), rv.detach().double()
            shift = (mean - rm64).abs() / (rv64 + bn.eps).sqrt()
            ratio = (var + bn.eps) / (rv64 + bn.eps)
            row.update(
                mean_shift_mean=float(shift.mean()),
                mean_shift_max=float(shift.max()),
                var_ratio_min=float(ratio.min()),
                var_ratio_max=float(ratio.max()),
                log_var_ratio_mean=float(ratio.log().abs().mean()),
            )
        rows.append(row)
    return rows


def _capture_inputs(
    model: nn.Module, layers: dict[str, _BatchNorm], inputs: Tensor, train_mode: bool
) -> dict[str, Tensor]:
    seen: dict[str, Tensor] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: Any) -> None:
            seen.setdefault(name, args[0].detach())

        return hook

    modes = {m: m.training for m in model.modules()}
    saved = {
        n: [
            b.clone() if b is not None else None
            for b in (m.running_mean, m.running_var, m.num_batches_tracked)
        ]
        for n, m in layers.items()
    }
    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in layers.items()]
    try:
        model.train(train_mode)
        with torch.no_grad():
            model(inputs)
    finally:
        for h in handles:
            h.remove()
        for module, mode in modes.items():
            module.training = mode
        with torch.no_grad():
            for n, m in layers.items():
                for buf, old in zip(
                    (m.running_mean, m.running_var, m.num_batches_tracked), saved[n], strict=True
                ):
                    if buf is not None and old is not None:
                        buf.copy_(old)
    return seen


def health_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width text table of :func:`bn_health` rows."""
    cols = [
        ("layer", "layer"),
        ("channels", "C"),
        ("mean_shift_mean", "shift(mean)"),
        ("mean_shift_max", "shift(max)"),
        ("var_ratio_min", "var ratio min"),
        ("var_ratio_max", "var ratio max"),
        ("low_var_channels", "low-var ch"),
        ("gamma_collapsed", "|γ|≈0 ch"),
        ("gamma_abs_mean", "mean |γ|"),
    ]

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.3g}"
        return str(v)

    table = [[h for _, h in cols]] + [[fmt(r[k]) for k, _ in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
