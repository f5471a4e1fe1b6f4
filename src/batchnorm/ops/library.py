"""torch.library custom ops for batch normalization's training path.

``batchnorm::bn_forward`` computes Algorithm 1 and returns (y, μ_B, σ²_B); its backward is
``batchnorm::bn_backward``, the chain rule of Section 3. Both have fake (meta) implementations,
so ``torch.compile`` and ``torch.export`` trace through them without graph breaks.

Which code computes them is chosen per call by :func:`kernel_for`: on CPU the C++ kernels
(``ops/native.py``) when they build, else the numba kernels (``ops/cpu.py``), for the tensors they
support; PyTorch's native CUDA primitives (``ops/cuda.py``) on CUDA; the reference equations
(``ops/reference.py``) everywhere else. :func:`set_backend` (or ``$BATCHNORM_BACKEND``) picks
``"auto"`` (that order), ``"numba"`` (skip the C++ kernels) or ``"reference"``.

Eager training calls on plain CPU tensors skip all of this: :func:`train_eager` hands the whole
step (statistics, normalization, running-statistics update, autograd node) to one C++ call.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch
from torch import Tensor

from . import native, reference

_BACKENDS = ("auto", "numba", "reference")
_backend = os.environ.get("BATCHNORM_BACKEND", "auto")

# What the fused op keeps for backward: x, or y when it can be inverted (see bn_act below).
SAVE_INPUT, SAVE_OUTPUT = 1, 2  # == cpu.SAVED_X_ACT / cpu.SAVED_Y
SAVE_AUTO = 0  # train_eager only: the C++ op keeps y when γ can be inverted, else x


def set_backend(name: str) -> str:
    """Select ``"auto"`` (C++, else numba kernels where they apply), ``"numba"`` or ``"reference"``;
    returns the old one."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    old, _backend = _backend, name
    return old


def get_backend() -> str:
    """The backend selected by :func:`set_backend` or ``$BATCHNORM_BACKEND``."""
    return _backend


_cpu_kernels: ModuleType | None | bool = False  # False: not looked up yet; None: numba missing


def cpu_kernels() -> ModuleType | None:
    """``ops.cpu`` (imported once, on first use), or None when numba is not installed."""
    global _cpu_kernels
    if _cpu_kernels is False:
        try:
            from . import cpu
        except ImportError:  # numba missing: the reference path still works
            cpu = None
        _cpu_kernels = cpu
    return _cpu_kernels


def native_kernels() -> ModuleType | None:
    """``ops.native`` once its C++ extension is built (on first use), or None where it cannot be."""
    return native if native.load() is not None else None


def _compiled(k: ModuleType) -> bool:
    """Whether kernel_for chose compiled CPU kernels (C++ or numba: they have the fused entries)."""
    return k is _cpu_kernels or k is native


def kernel_for(x: Tensor) -> ModuleType:
    """The module whose ``forward``/``backward`` compute this call: C++, numba or reference."""
    if _backend != "reference":
        dev = x.device.type
        if dev == "cpu":
            nat = native_kernels() if _backend == "auto" else None
            if nat is not None and nat.supports(x):
                return nat
            cpu = cpu_kernels()
            if cpu is not None and cpu.supports(x):
                return cpu
        elif dev == "cuda":
            from . import cuda  # PyTorch's native CUDA primitives (verified in tests/test_cuda.py)

            if cuda.supports(x):
                return cuda
    return reference


def _stat_dtype(x: Tensor) -> torch.dtype:
    return reference.acc_dtype(x.dtype)


# ---------------------------------------------------------------- forward (Algorithm 1)
@torch.library.custom_op("batchnorm::bn_forward", mutates_args=())
def bn_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BN: returns y (x's dtype and memory format), μ_B and biased σ²_B (float32/64)."""
    return kernel_for(x).forward(x, weight, bias, eps)


@bn_forward.register_fake
def _(x, weight, bias, eps):
    c = x.shape[1]
    stat = x.new_empty((c,), dtype=_stat_dtype(x))
    return torch.empty_like(x), stat, stat.clone()


# ---------------------------------------------------------------- backward (Section 3)
@torch.library.custom_op("batchnorm::bn_backward", mutates_args=())
def bn_backward(
    dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dL/dx, dL/dγ, dL/dβ) from the saved input and batch statistics."""
    return kernel_for(x).backward(dy, x, mean, var, weight, eps)


@bn_backward.register_fake
def _(dy, x, mean, var, weight, eps):
    c = x.shape[1]
    pdtype = weight.dtype if weight is not None else _stat_dtype(x)
    return torch.empty_like(x), x.new_empty((c,), dtype=pdtype), x.new_empty((c,), dtype=pdtype)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, eps = inputs
    _, mean, var = output
    ctx.save_for_backward(x, weight, mean, var)  # x, γ, μ_B, σ²_B: all backward needs
    ctx.eps = eps
    ctx.has_bias = bias is not None


def _grads(ctx, dy: Tensor, backward_fn) -> tuple[Tensor | None, ...]:
    """Section 3's gradients for the inputs that need them, from (x, γ, μ_B, σ²_B) saved in ctx."""
    x, weight, mean, var = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if not (need_x or need_w or need_b):
        return None, None, None, None
    dx, dgamma, dbeta = backward_fn(dy.contiguous(memory_format=_fmt(x)), x, mean, var, weight, ctx.eps)
    dw = reference.as_dtype(dgamma, weight.dtype) if (weight is not None and need_w) else None
    db = reference.as_dtype(dbeta, weight.dtype) if (need_b and weight is not None) else dbeta if need_b else None
    return (dx if need_x else None), dw, db, None


def _backward(ctx, dy, _dmean, _dvar):
    return _grads(ctx, dy, bn_backward)


class _EagerBatchNorm(torch.autograd.Function):
    """Eager fast path: the same kernels and backward as ``bn_forward`` without the custom-op
    dispatch, which costs more than the kernels themselves on small tensors (a (60, 100) batch:
    ~0.09 ms of kernel under ~0.4 ms of dispatch). Tracing (torch.compile, export) uses the op."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        k = kernel_for(x)
        if _compiled(k):  # statistics stay float64 here: no conversion calls
            y, mean, var = k.forward_act(x, weight, bias, eps, k.ACT_NONE, 0.0)
        else:
            y, mean, var = k.forward(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        return _grads(ctx, dy, lambda *a: kernel_for(a[1]).backward(*a))


_PLAIN = (Tensor, torch.nn.Parameter)


def train_eager(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
    running_var: Tensor | None, num_batches_tracked: Tensor | None, momentum: float | None,
    eps: float, act: int = 0, slope: float = 0.0, save: int = SAVE_INPUT,
) -> Tensor | None:
    """The whole training step in one C++ call (``native.train``): y, with the running statistics
    and ``num_batches_tracked`` updated as :func:`functional.batch_norm` does. None when that path
    does not apply (another backend, tracing, tensor subclasses, other devices or layouts, or no
    C++ kernels): the caller then takes the general path. Inputs must already be checked.
    ``save``: SAVE_INPUT keeps x for backward, SAVE_OUTPUT keeps y, SAVE_AUTO keeps y when γ and
    the activation allow it."""
    if _backend != "auto" or torch.compiler.is_compiling():
        return None
    ext = native.load()  # cached after the first call
    if ext is None or not _plain(x, weight, bias):
        return None
    factor = -1.0 if momentum is None else float(momentum)  # < 0: cumulative, 1/t
    return ext.train(x, weight, bias, running_mean, running_var, num_batches_tracked, float(eps),
                     factor, act, float(slope), save)


def batch_norm_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BN, (y, μ_B, σ²_B): the custom op under tracing or for tensor subclasses
    (fake, functional, distributed tensors), the eager fast path for plain tensors."""
    if _use_op(x, weight, bias):
        return bn_forward(x, weight, bias, eps)
    return _EagerBatchNorm.apply(x, weight, bias, eps)


def _use_op(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """The custom op (not the eager fast path) while tracing or for tensor subclasses."""
    return torch.compiler.is_compiling() or not _plain(x, weight, bias)


def _plain(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """x, γ and β are plain tensors or parameters (no subclass such as a fake or DTensor); written
    out, not as a generator, because small batches pay for every µs of this per call."""
    return (
        type(x) in _PLAIN
        and (weight is None or type(weight) in _PLAIN)
        and (bias is None or type(bias) in _PLAIN)
    )


def _fmt(x: Tensor) -> torch.memory_format:
    """The memory format x is laid out in (kernels expect dy in the same one)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


bn_forward.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- eval forward (Algorithm 2)
def eval_forward(
    x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None,
    bias: Tensor | None, eps: float, act: int = 0, slope: float = 0.0,
) -> Tensor:
    """Inference y = act(γ/sqrt(Var+ε)·(x − E) + β) (``act``: a value of ACTIVATIONS, 0 = none):
    one compiled pass on CPU when nothing needs a gradient (and not while ``torch.compile``
    traces); the differentiable reference, then the activation, otherwise."""
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, running_mean, running_var, weight, bias)
    )
    if not needs_grad and not torch.compiler.is_compiling():
        k = kernel_for(x)
        if _compiled(k):
            return k.eval_forward(x, running_mean, running_var, weight, bias, eps, act, slope)
    y = reference.eval_forward(x, running_mean, running_var, weight, bias, eps)
    return _act_torch(y, act, slope)


# ---------------------------------------------------------------- fused BN + activation
# act(γ x̂ + β) in one op whose backward keeps ONE activation-sized tensor: the output y when the
# activation and the affine map can be inverted (leaky ReLU / identity, |γ| not tiny: in-place
# activated BN, Rota Bulò et al. 2018), else the input x (ReLU: y = 0 hides x̂, which dL/dx needs).
ACTIVATIONS = {"identity": 0, "relu": 1, "leaky_relu": 2}  # == cpu.ACT_NONE / ACT_RELU / ACT_LEAKY


def _act_torch(z: Tensor, act: int, slope: float) -> Tensor:
    if act == 1:
        return torch.relu(z)
    if act == 2:
        return torch.nn.functional.leaky_relu(z, slope)
    return z


def _act_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, act: int, slope: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(act(BN(x)), μ_B, σ²_B biased); the statistics in float64 so backward recomputes z exactly."""
    k = kernel_for(x)
    if _compiled(k):
        return k.forward_act(x, weight, bias, eps, act, slope)
    y, mean, var = k.forward(x, weight, bias, eps)
    return _act_torch(y, act, slope), mean.double(), var.double()


def _act_backward_reference(dy, saved, mean, var, weight, bias, eps, mode, slope):
    if mode == SAVE_INPUT:  # z recomputed from x; dz = act'(z)·dy; then the plain BN backward
        z = reference.normalize(saved, mean, var, weight, bias, eps)
        dz = torch.where(z > 0, dy, dy * slope)
        return reference.backward(dz, saved, mean, var, weight, eps)
    acc = reference.acc_dtype(saved.dtype)
    y, g = saved.to(acc), dy.to(acc)
    neg = y < 0
    z = torch.where(neg, y / slope, y)  # z = act⁻¹(y)
    dz = torch.where(neg, g * slope, g)
    gamma = weight.to(acc) if weight is not None else torch.ones_like(mean, dtype=acc)
    beta = bias.to(acc) if bias is not None else torch.zeros_like(mean, dtype=acc)
    cv = lambda v: reference.channel_view(v.to(acc), y)  # noqa: E731
    x_hat = (z - cv(beta)) / cv(gamma)  # x̂ = (z − β)/γ
    dims, m = reference.reduce_dims(y), reference.values_per_channel(y)
    dbeta, dgamma = dz.sum(dims), (dz * x_hat).sum(dims)
    scale = gamma * torch.rsqrt(var.to(acc) + eps)
    dx = cv(scale) * (dz - cv(dbeta) / m - x_hat * cv(dgamma) / m)  # Section 3, collapsed
    if weight is not None:
        dgamma, dbeta = dgamma.to(weight.dtype), dbeta.to(weight.dtype)
    return dx.to(saved.dtype), dgamma, dbeta


@torch.library.custom_op("batchnorm::bn_act_backward", mutates_args=())
def bn_act_backward(
    dy: Tensor, saved: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
    bias: Tensor | None, eps: float, mode: int, slope: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dL/dx, dL/dγ, dL/dβ) from the saved x (mode SAVE_INPUT) or the saved y (SAVE_OUTPUT)."""
    return _act_backward_kernel(dy, saved, mean, var, weight, bias, eps, mode, slope)


def _act_backward_kernel(dy, saved, mean, var, weight, bias, eps, mode, slope):
    """bn_act_backward's computation: the compiled kernels where they apply, else the reference."""
    k = kernel_for(saved)
    if _compiled(k):
        return k.backward_act(dy, saved, mean, var, weight, bias, eps, mode, slope)
    return _act_backward_reference(dy, saved, mean, var, weight, bias, eps, mode, slope)


@bn_act_backward.register_fake
def _(dy, saved, mean, var, weight, bias, eps, mode, slope):
    c = saved.shape[1]
    pdtype = weight.dtype if weight is not None else _stat_dtype(saved)
    return torch.empty_like(saved), saved.new_empty((c,), dtype=pdtype), saved.new_empty((c,), dtype=pdtype)


@torch.library.custom_op("batchnorm::bn_act", mutates_args=())
def bn_act(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, act: int, slope: float,
    save: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Differentiable fused BN + activation; ``save`` picks what backward keeps (SAVE_INPUT/OUTPUT)."""
    return _act_forward(x, weight, bias, eps, act, slope)


@bn_act.register_fake
def _(x, weight, bias, eps, act, slope, save):
    stat = x.new_empty((x.shape[1],), dtype=torch.float64)
    return torch.empty_like(x), stat, stat.clone()


def _act_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, eps, act, slope, save = inputs
    y, mean, var = output
    # ONE activation-sized tensor: y (invertible activation) or x (ReLU / tiny γ), plus (C,) vectors.
    ctx.save_for_backward(y if save == SAVE_OUTPUT else x, weight, bias, mean, var)
    ctx.eps, ctx.slope, ctx.save = eps, (0.0 if act == 1 else slope if act == 2 else 1.0), save


def _act_grads(ctx, dy: Tensor, backward_fn) -> tuple[Tensor | None, ...]:
    """The fused op's gradients for the inputs that need them, from what _act_setup_context saved."""
    saved, weight, bias, mean, var = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if not (need_x or need_w or need_b):
        return None, None, None, None, None, None, None
    dx, dgamma, dbeta = backward_fn(
        dy.contiguous(memory_format=_fmt(saved)), saved, mean, var, weight, bias, ctx.eps,
        ctx.save, ctx.slope,
    )
    dw = dgamma if (weight is not None and need_w) else None
    db = reference.as_dtype(dbeta, bias.dtype) if (bias is not None and need_b) else None
    return (dx if need_x else None), dw, db, None, None, None, None


def _act_backward(ctx, dy, _dmean, _dvar):
    return _act_grads(ctx, dy, bn_act_backward)


bn_act.register_autograd(_act_backward, setup_context=_act_setup_context)


class _EagerBatchNormAct(torch.autograd.Function):
    """Eager fast path of ``bn_act`` (as ``_EagerBatchNorm`` is of ``bn_forward``): the same
    forward, saved tensors and backward, without the custom-op dispatch."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, act, slope, save):
        y, mean, var = _act_forward(x, weight, bias, eps, act, slope)
        _act_setup_context(ctx, (x, weight, bias, eps, act, slope, save), (y, mean, var))
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        return _act_grads(ctx, dy, _act_backward_kernel)


def bn_act_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, act: int, slope: float,
    save: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused BN + activation, (y, μ_B, σ²_B): the custom op ``bn_act`` under tracing or for tensor
    subclasses, the eager fast path for plain tensors (see :func:`batch_norm_train`)."""
    if _use_op(x, weight, bias):
        return bn_act(x, weight, bias, eps, act, slope, save)
    return _EagerBatchNormAct.apply(x, weight, bias, eps, act, slope, save)
