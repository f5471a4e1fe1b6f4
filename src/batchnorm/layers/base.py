"""One base class for every BN layer: parameters, buffers, checks, state_dict versioning.

Attributes, buffers and ``state_dict`` keys match ``torch.nn.BatchNorm*`` exactly (``weight``,
``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``), so checkpoints move both
ways with ``strict=True``. Subclasses only say which input ranks they accept and, for variants,
how a training batch is normalized.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .. import functional as BF
from ..ops import library

_MISSING = object()


def _read(module: nn.Module, table: dict[str, Any], name: str) -> Any:
    """``getattr(module, name)`` for a registered parameter or buffer, read from its table.

    ``module.weight`` goes through ``nn.Module.__getattr__``: about 0.6 µs a name here, a third
    of a small layer's Python time when five are read per call. A name missing from the table
    (a parametrization's property, FSDP's plain-tensor views) is read the normal way.
    """
    v = table.get(name, _MISSING)
    return getattr(module, name) if v is _MISSING else v


def share_state(old: nn.Module, new: nn.Module) -> nn.Module:
    """Give ``new`` the very parameters, buffers and mode of ``old`` (same tensor objects), so a
    layer swap changes no value and an optimizer built before it keeps working. Returns ``new``."""
    for name in ("weight", "bias"):
        setattr(new, name, getattr(old, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new._buffers[name] = old._buffers.get(name)
    new.train(old.training)
    return new


def replace_modules(module: nn.Module, swap: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """Walk ``module`` top-down; where ``swap(m)`` returns a module, put it in m's place (and do
    not descend into it). In place; returns the model (a new object if the root was swapped)."""
    new = swap(module)
    if new is not None:
        return new
    for name, child in module.named_children():
        new_child = replace_modules(child, swap)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


class BatchNormBase(nn.Module):
    """Shared state of a batch-normalization layer over ``num_features`` channels (axis 1)."""

    _version = 2  # same as torch.nn's _NormBase: v2 added num_batches_tracked
    _dims: tuple[int, ...] = (2, 3, 4, 5)  # accepted input ranks; subclasses narrow this

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
            raise ValueError(
                f"num_features must be a positive int (the channel count), got {num_features!r}"
            )
        BF.check_hyperparameters(eps, momentum)
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))  # γ
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))  # β
            else:  # torch.nn's keyword-only bias=False: a scale without a shift
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, device=device),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    # ------------------------------------------------------------------ state
    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, counter 0."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """γ = 1, β = 0 (the identity transform on normalized input), and fresh statistics."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # Checkpoints from before num_batches_tracked existed (version < 2) keep the current
        # counter (zero for a fresh layer), as torch.nn does.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            nbt = self.num_batches_tracked
            usable = nbt is not None and nbt.device != torch.device("meta")
            state_dict[key] = nbt if usable else torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # ------------------------------------------------------------------ forward
    def check_input(self, x: Tensor) -> None:
        """Type, rank, channel count and (in training) at least two values per channel."""
        if self._valid_fast(x):
            return
        BF.check_hyperparameters(self.eps, self.momentum)
        BF.check_input(
            x, self.num_features, self._dims, training=self._uses_batch_stats(),
            layer=type(self).__name__,
        )

    def _valid_fast(self, x: Tensor) -> bool:
        """The common valid call, recognised without building any message (a few µs a call on
        small batches); anything else goes through the full checks, which say what is wrong."""
        eps, mom = self.eps, self.momentum
        return (
            type(x) is Tensor and type(eps) is float and 0.0 < eps < math.inf
            and (mom is None or (type(mom) is float and 0.0 <= mom <= 1.0))
            and x.dim() in self._dims and x.shape[1] == self.num_features and x.is_floating_point()
            and (x.numel() >= 2 * self.num_features or not self._uses_batch_stats())
        )

    def _uses_batch_stats(self) -> bool:
        """Mode comes from self.training alone; without running stats, only batch stats exist."""
        return self.training or _read(self, self._buffers, "running_mean") is None

    def _params(self) -> tuple[Tensor | None, Tensor | None]:
        """(γ, β), None where absent."""
        p = self._parameters
        return _read(self, p, "weight"), _read(self, p, "bias")

    def _running_buffers(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Buffers this call reads or updates: running stats in eval, or in training if tracked."""
        if not self.training or self.track_running_stats:
            b = self._buffers
            nbt = _read(self, b, "num_batches_tracked") if self.training else None
            return _read(self, b, "running_mean"), _read(self, b, "running_var"), nbt
        return None, None, None

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        rm, rv, nbt = self._running_buffers()
        w, b = self._params()
        batch = self._uses_batch_stats()
        if batch:  # one C++ call on CPU when it applies (ops/library.py)
            y = library.train_eager(x, w, b, rm, rv, nbt, self.momentum, self.eps)
            if y is not None:
                return y
        return BF.batch_norm(x, rm, rv, w, b, batch, self.momentum, self.eps, num_batches_tracked=nbt)
