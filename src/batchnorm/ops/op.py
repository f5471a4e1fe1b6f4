"""The one batch-norm op: this package's C++ kernels where they provably compute what PyTorch's
kernel computes, PyTorch's own kernel everywhere else.

The data flow of every call (layer, fused layer, variant or ``functional.batch_norm``)::

    layer (state, input checks) ─► fast_batch_norm() ─► torch.ops.batchnorm.batch_norm (C++)
                                         │ None: the fast path does not apply
                                         └─────────► torch_batch_norm() ─► F.batch_norm

:func:`fast_path_applies` is the whole contract of the fast path. The C++ op runs only for

- plain CPU tensors (no subclass: fake, functional, distributed or fx-proxy tensors go to
  torch), of dtype float32, float64 or bfloat16, rank 2–5, contiguous or channels_last, non-empty,
  with γ, β and the running statistics on the CPU in the input's dtype (float32 for bfloat16);
- outside every transform that needs PyTorch's own op to see the call: ``torch.jit`` tracing or
  scripting, ``torch.fx`` tracing (its proxies are not tensors), ``torch.compile``/``export``,
  ``torch.func`` transforms (vmap, grad, jacrev, ...), and forward-mode AD;
- in inference, only when no gradient is needed (the inference kernel has no backward);
- with ``momentum`` in [0, 1] or None (torch takes any factor; the op reads < 0 as None).

Its backward is exact to any order: first-order gradients come from the kernels, and when the
backward's own graph is recorded (``create_graph=True``) the C++ node computes them with
differentiable ATen ops instead (``csrc/bn_cpu.cpp``: ``differentiable_backward``).

Everything else runs :func:`torch_batch_norm`, which is ``torch.nn.BatchNorm*``'s own forward:
the same ``F.batch_norm`` call with the same running-average factor. ``set_backend("torch")`` (or
``$BATCHNORM_BACKEND=torch``) sends every call there.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native

BACKENDS = ("auto", "torch")
# The C++ ACT_* codes. ReLU, leaky ReLU and identity are piecewise linear (backward from a mask, or
# from the inverted output); the others keep x and recompute act'(z) in backward.
ACTIVATIONS = {
    "identity": 0,
    "relu": 1,
    "leaky_relu": 2,
    "relu6": 3,
    "silu": 4,
    "hardswish": 5,
    "hardsigmoid": 6,
    "gelu": 7,
    "gelu_tanh": 8,
    "elu": 9,
    "mish": 10,
    "sigmoid": 11,
    "tanh": 12,
}
SAVE_AUTO, SAVE_INPUT = 0, 1  # backward keeps y when it can be inverted (else x); always x


def _env_backend() -> str:
    name = os.environ.get("BATCHNORM_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(
            f"BATCHNORM_BACKEND must be one of {BACKENDS} (auto: the C++ kernels where they "
            f"apply; torch: always PyTorch's kernel), got {os.environ['BATCHNORM_BACKEND']!r}"
        )
    return name


_backend = _env_backend()


def set_backend(name: str) -> str:
    """Select ``"auto"`` (the C++ kernels where they apply, torch's elsewhere) or ``"torch"``
    (PyTorch's kernel for every call); returns the previous one."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    old, _backend = _backend, name
    return old


def get_backend() -> str:
    """The backend selected by :func:`set_backend` or ``$BATCHNORM_BACKEND``."""
    return _backend


_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_PLAIN = (Tensor, torch.nn.Parameter)
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


_is_tracing = torch._C._is_tracing  # torch.jit.is_tracing() without its Python wrapper
_functorch_active = torch._C._are_functorch_transforms_active
_forward_ad = torch.autograd.forward_ad


def _transform_active() -> bool:
    """Whether a tracer or transform that must see PyTorch's own op is running."""
    return (
        torch.compiler.is_compiling()  # first: dynamo folds it, and cannot trace the C calls
        or _is_tracing()
        or _functorch_active()
        or _forward_ad._current_level >= 0  # inside forward_ad.dual_level()
    )


def fast_path_applies(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
) -> bool:
    """Whether the C++ op computes this call exactly as PyTorch's kernel would (module
    docstring). Loads (on the first call, builds) the C++ extension only for CPU input.
    Written out flat: a (60, 100) batch pays for every µs of it."""
    if _backend != "auto" or type(x) is not Tensor or not x.is_cpu:
        return False
    dt = x.dtype
    if dt not in _DTYPES or not 2 <= x.dim() <= 5 or x.numel() == 0:
        return False
    if not x.is_contiguous():
        fmt = _CHANNELS_LAST.get(x.dim())
        if fmt is None or not x.is_contiguous(memory_format=fmt):
            return False
    pdt = torch.float32 if dt is torch.bfloat16 else dt
    for t in (weight, bias, running_mean, running_var):
        if t is not None and (
            type(t) not in _PLAIN or not t.is_cpu or (t.dtype is not dt and t.dtype is not pdt)
        ):
            return False
    if _transform_active():
        return False
    return bool(native._ext or native.load())  # loaded, else load (once) or unavailable


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def fast_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None = None,
    act: int = 0,
    slope: float = 0.0,
    save: int = SAVE_INPUT,
) -> Tensor | None:
    """act(BN(x)) from the C++ op, or None when :func:`fast_path_applies` says no (the caller then
    runs :func:`torch_batch_norm`). Inputs must already be checked. In training, the running
    statistics and ``num_batches_tracked`` are updated as ``torch.nn.BatchNorm*`` updates them."""
    if not fast_path_applies(x, weight, bias, running_mean, running_var):
        return None
    if not training and _needs_grad(x, weight, bias):
        return None
    if momentum is not None and not 0.0 <= momentum <= 1.0:  # torch's kernel takes any factor
        return None
    m = -1.0 if momentum is None else float(momentum)  # < 0: the cumulative average, 1/t
    return native._ext.batch_norm(
        x,
        weight,
        bias,
        running_mean,
        running_var,
        num_batches_tracked,
        training,
        m,
        float(eps),
        act,
        float(slope),
        save,
    )[0]


def torch_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None,
) -> Tensor:
    """``torch.nn.BatchNorm*``'s forward with PyTorch's kernel: ``F.batch_norm`` with the factor
    ``momentum``, or 1/t for the t-th batch when ``momentum`` is None; the counter moves only
    after the kernel succeeded. Scriptable (the layers' TorchScript path)."""
    factor = 0.0
    if momentum is not None:
        factor = momentum
    if training and running_mean is not None and num_batches_tracked is not None:
        if momentum is None:
            factor = 1.0 / (float(num_batches_tracked) + 1.0)
    y = F.batch_norm(input, running_mean, running_var, weight, bias, training, factor, eps)
    if training and running_mean is not None and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return y


def batch_norm_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Training BN without running statistics: (y, μ_B, σ²_B biased), for the variants that need
    the batch statistics (ghost, renorm). The C++ op where it applies (statistics in float64),
    else ``torch.native_batch_norm`` (σ²_B from its 1/sqrt(σ²_B + ε)); statistics in float64."""
    if fast_path_applies(x, weight, bias, None, None):
        return native.op(
            x, weight, bias, None, None, None, True, 0.0, float(eps), 0, 0.0, SAVE_INPUT
        )
    y, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
    return y, mean.double(), invstd.double().pow(-2) - eps
