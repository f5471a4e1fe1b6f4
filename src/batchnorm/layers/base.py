"""The base of every BN layer here: a subclass of ``torch.nn.modules.batchnorm._BatchNorm``.

Parameters, buffers, ``state_dict`` keys, ``reset_*``, ``_load_from_state_dict`` and ``repr`` are
torch.nn's own (inherited), so checkpoints move both ways with ``strict=True`` and every tool that
looks for BN with ``isinstance`` (fvcore, timm, ``swa_utils.update_bn``, quantization fusion)
finds these layers. What a layer adds is the forward:

- eager calls check the input with clear errors (raised before any buffer changes), then take
  the C++ op where it provably computes torch's numbers (``ops/op.py``), else torch's kernel;
- ``torch.jit.script`` compiles :meth:`BatchNormBase._torch_forward`, torch.nn's forward;
- ``torch.fx`` proxies and every transform (tracing, ``torch.func``, forward AD, compile) get
  torch's kernel through the same :meth:`BatchNormBase._torch_forward`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import functional as BF
from ..ops import op

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


def check_arguments(num_features: int, momentum: float | None) -> None:
    """Constructor arguments, with errors that say what to pass (``num_features=0`` is what
    torch's lazy layers start from). ``eps`` is checked at each call, as torch does: it may be 0
    in inference."""
    if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 0:
        raise ValueError(
            f"num_features must be a positive int (the channel count), got {num_features!r}"
        )
    BF.check_momentum(momentum)


class BatchNormBase(_BatchNorm):
    """Shared forward of this package's BN layers over ``num_features`` channels (axis 1).

    Subclasses pair it with torch's ``BatchNorm1d/2d/3d`` (whose ``_check_input_dim`` they keep)
    and set ``_dims``, the input ranks they accept; variants override :meth:`forward`.
    """

    _dims: tuple[int, ...] = (2, 3, 4, 5)  # accepted input ranks; subclasses narrow this
    _save = op.SAVE_INPUT  # what the C++ backward keeps: x (fused layers: x or y)

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
        check_arguments(num_features, momentum)
        extra = {} if bias else {"bias": False}  # the keyword exists from torch 2.5 on
        super().__init__(
            num_features,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
            device=device,
            dtype=dtype,
            **extra,
        )

    # ------------------------------------------------------------------ checks
    def check_input(self, x: Tensor) -> None:
        """Type, rank, channel count and (in training) more than one value per channel."""
        if self._valid_fast(x):
            return
        BF.check_hyperparameters(self.eps, self.momentum, self._uses_batch_stats())
        BF.check_input(
            x,
            self.num_features,
            self._dims,
            training=self._uses_batch_stats(),
            layer=type(self).__name__,
        )
        if self.training and self.track_running_stats and self.momentum is None:
            BF.check_counter(cast(Tensor, self.num_batches_tracked))  # tracked: a tensor

    def _valid_fast(self, x: Tensor) -> bool:
        """The common valid call, recognised without building any message (a few µs a call on
        small batches); anything else goes through the full checks, which say what is wrong."""
        eps, mom = self.eps, self.momentum
        return (
            type(x) is Tensor
            and type(eps) is float
            and 0.0 < eps < math.inf
            and type(mom) is float
            and 0.0 <= mom <= 1.0
            and x.dim() in self._dims
            and x.shape[1] == self.num_features
            and x.is_floating_point()
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

    # ------------------------------------------------------------------ forward
    def _act(self) -> tuple[int, float]:
        """(C++ activation code, slope) applied after BN; none here (fused layers override)."""
        return 0, 0.0

    def _activate(self, y: Tensor) -> Tensor:
        """The activation after BN on torch's path (scriptable); none here."""
        return y

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            self._check_input_dim(input)
            return self._torch_forward(input)
        return self._eager_forward(input)

    @torch.jit.unused
    def _eager_forward(self, input: Tensor) -> Tensor:
        if isinstance(input, torch.fx.Proxy):  # fx tracing: record torch's op on the buffers
            return self._fx_forward(input)
        if torch.jit.is_tracing():  # torch.nn's forward, checks included, is what gets traced
            self._check_input_dim(input)
            return self._torch_forward(input)
        self.check_input(input)
        rm, rv, nbt = self._running_buffers()
        w, b = self._params()
        act, slope = self._act()
        y = op.fast_batch_norm(
            input,
            rm,
            rv,
            w,
            b,
            self._uses_batch_stats(),
            self.momentum,
            self.eps,
            nbt,
            act,
            slope,
            self._save,
        )
        if y is not None:
            return y
        return self._torch_forward(input)

    @torch.jit.unused
    def _fx_forward(self, input: Any) -> Any:
        """:meth:`_torch_forward` with the buffers as ``get_attr`` nodes, so the graph itself
        updates them on every run (fx would otherwise bake the tensors in and bump the counter
        once, while tracing)."""
        tracer = input.tracer
        path = tracer.path_of_module(self)

        def node(name: str) -> Any:
            if self._buffers.get(name) is None:
                return None
            return tracer.create_proxy("get_attr", f"{path}.{name}" if path else name, (), {})

        return self._torch_forward(
            input, node("running_mean"), node("running_var"), node("num_batches_tracked")
        )

    def _torch_forward(
        self,
        input: Tensor,
        rm: Tensor | None = None,
        rv: Tensor | None = None,
        nbt: Tensor | None = None,
    ) -> Tensor:
        """torch.nn's forward on PyTorch's kernel (+ the activation of fused layers); the
        buffers are the module's unless given (fx proxies)."""
        if rm is None:
            rm, rv, nbt = self.running_mean, self.running_var, self.num_batches_tracked
        use_running = not self.training or self.track_running_stats
        batch = self.training or (rm is None and rv is None)
        y = op.torch_batch_norm(
            input,
            rm if use_running else None,
            rv if use_running else None,
            self.weight,
            self.bias,
            batch,
            self.momentum,
            self.eps,
            nbt if self.training else None,
        )
        return self._activate(y)
