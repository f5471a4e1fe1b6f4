"""Port of PyTorch's OpInfo checks for ``nn.functional.batch_norm`` (CPU).

Source (pytorch/pytorch, torch/testing/_internal/common_methods_invocations.py):
``sample_inputs_batch_norm`` and ``OpInfo('nn.functional.batch_norm', ...)``: dtypes
float64/float32/float16/bfloat16, ``supports_out=False``, ``supports_forward_ad=True``,
``supports_fwgrad_bwgrad=True``; so ``check_batched_grad``, ``check_batched_gradgrad`` and
``check_batched_forward_grad`` default to True. Its skips only touch TestNNCOpInfo (NNC) and a
TestCompositeCompliance tolerance, neither ported here; the ``without_cudnn`` variant is CUDA-only.
The OpInfo has no ``ref``; ``test_reference`` compares with float64 math written here instead.

The checks are those of test_ops.py's TestGradients (``test_fn_grad``, ``test_fn_gradgrad``,
``test_forward_mode_AD``, ``test_fn_fwgrad_bwgrad``, float64, ``fast_mode=True`` as upstream's
gradcheck wrapper sets it), with the batched (vmap) variants in their own test so a failure there
is told apart, and TestCommon.test_noncontiguous_samples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.testing import make_tensor

S = 5  # common_methods_invocations' S

# (input shape, kwargs), in sample_inputs_batch_norm's order
_CASES: list[tuple[tuple[int, ...], dict[str, Any]]] = [
    ((S, S, S), {"training": True, "momentum": 0.5, "eps": 0.6}),
    ((3, 2, 4), {"training": False, "momentum": -1.2}),
    ((3, 1), {"training": True, "momentum": 0.0}),
    ((0,), {"training": True}),
    ((0,), {"training": False}),
    ((3, 2, 3, 4), {"training": True, "momentum": -1.0, "eps": 0.5}),
    ((3, 2, 3, 4), {"training": False, "momentum": -1.0, "eps": 0.5}),
    ((2, 1), {}),
]
_IDS = [
    "5x5x5-train-m0.5-eps0.6",
    "3x2x4-eval-m-1.2",
    "3x1-train-m0",
    "0-train",
    "0-eval",
    "3x2x3x4-train-m-1-eps0.5",
    "3x2x3x4-eval-m-1-eps0.5",
    "2x1-default",
    "2x1-train-wb",
    "2x1-eval-wb",
    "2x1-eval-wb-again",
    "1x2x3-train-no-stats",
]


@dataclass
class _Sample:
    """One SampleInput of ``sample_inputs_batch_norm``: input, args (running_mean, running_var,
    weight, bias) and kwargs."""

    input: Tensor
    running_mean: Tensor | None
    running_var: Tensor | None
    weight: Tensor | None
    bias: Tensor | None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def tensors(self) -> list[Tensor | None]:
        return [self.input, self.running_mean, self.running_var, self.weight, self.bias]


def _samples(dtype: torch.dtype = torch.float64, requires_grad: bool = True) -> list[_Sample]:
    """The samples of ``sample_inputs_batch_norm`` (same shapes, kwargs, value ranges, and the
    same sharing of running stats among the last case and the three weight/bias samples)."""
    make = partial(make_tensor, device="cpu", dtype=dtype, requires_grad=requires_grad)
    make_no_grad = partial(make_tensor, device="cpu", dtype=dtype, requires_grad=False)
    out: list[_Sample] = []
    shape: tuple[int, ...] = ()
    channels = 0
    running_mean = running_var = torch.empty(0)
    for shape, kwargs in _CASES:
        channels = shape[1] if len(shape) > 1 else 0
        weight = make(channels) if channels > 0 else None
        bias = make(channels) if channels > 0 else None
        running_mean = make_no_grad(channels, low=0)
        running_var = make_no_grad(channels, low=0)
        out.append(_Sample(make(shape), running_mean, running_var, weight, bias, dict(kwargs)))
    for training in (True, False, False):
        out.append(
            _Sample(
                make(shape),
                running_mean,
                running_var,
                make(channels),
                make(channels),
                {"training": training},
            )
        )
    out.append(_Sample(make((1, 2, 3)), None, None, None, None, {"training": True}))
    assert len(out) == len(_IDS)
    return out


def _sample(i: int, dtype: torch.dtype = torch.float64, requires_grad: bool = True) -> _Sample:
    return _samples(dtype, requires_grad)[i]


def _gradcheck_fn(
    impl: SimpleNamespace, s: _Sample
) -> tuple[Callable[..., Tensor], tuple[Tensor, ...]]:
    """As TestGradients._check_helper: a function of just the tensors that require grad (input,
    weight, bias), which puts them back among the sample's other arguments."""
    slots = s.tensors()
    diff_idx = [i for i, t in enumerate(slots) if isinstance(t, Tensor) and t.requires_grad]

    def fn(*diff: Tensor) -> Tensor:
        args = list(slots)
        for i, t in zip(diff_idx, diff, strict=True):
            args[i] = t
        return impl.batch_norm(*args, **s.kwargs)

    return fn, tuple(slots[i] for i in diff_idx)  # type: ignore[misc]


_GC: dict[str, Any] = {"fast_mode": True, "check_grad_dtypes": True}

samples = pytest.mark.parametrize("i", range(len(_IDS)), ids=_IDS)


@samples
def test_fn_grad(impl: SimpleNamespace, i: int) -> None:
    """Port of TestGradients.test_fn_grad (float64): gradcheck w.r.t. input, weight and bias,
    with undefined-grad checking; batched grads are checked in test_batched_grads."""
    fn, inputs = _gradcheck_fn(impl, _sample(i))
    assert torch.autograd.gradcheck(
        fn, inputs, check_batched_grad=False, check_undefined_grad=True, **_GC
    )


@samples
def test_fn_gradgrad(impl: SimpleNamespace, i: int) -> None:
    """Port of TestGradients.test_fn_gradgrad (float64): gradgradcheck with contiguous and
    non-contiguous grad outputs; batched gradgrad is checked in test_batched_grads."""
    fn, inputs = _gradcheck_fn(impl, _sample(i))
    for non_contig in (False, True):
        assert torch.autograd.gradgradcheck(
            fn, inputs, gen_non_contig_grad_outputs=non_contig, check_batched_grad=False, **_GC
        )


@samples
def test_forward_mode_AD(impl: SimpleNamespace, i: int) -> None:  # noqa: N802 (upstream's name)
    """Port of TestGradients.test_forward_mode_AD (float64; OpInfo supports_forward_ad=True):
    gradcheck of the forward-mode (JVP) derivatives; batched JVPs in test_batched_grads."""
    fn, inputs = _gradcheck_fn(impl, _sample(i))
    assert torch.autograd.gradcheck(
        fn,
        inputs,
        check_forward_ad=True,
        check_backward_ad=False,
        check_batched_grad=False,
        check_batched_forward_grad=False,
        check_undefined_grad=True,
        **_GC,
    )


@samples
def test_fn_fwgrad_bwgrad(impl: SimpleNamespace, i: int) -> None:
    """Port of TestGradients.test_fn_fwgrad_bwgrad (float64; OpInfo supports_fwgrad_bwgrad=True):
    forward-over-reverse gradgradcheck, contiguous and non-contiguous grad outputs."""
    fn, inputs = _gradcheck_fn(impl, _sample(i))
    for non_contig in (False, True):
        assert torch.autograd.gradgradcheck(
            fn,
            inputs,
            gen_non_contig_grad_outputs=non_contig,
            check_fwd_over_rev=True,
            check_rev_over_rev=False,
            check_batched_grad=False,
            check_undefined_grad=False,
            **_GC,
        )


@pytest.mark.parametrize("kind", ["grad", "gradgrad", "forward"])
@samples
def test_batched_grads(impl: SimpleNamespace, i: int, kind: str) -> None:
    """The batched (vmap) parts of TestGradients.test_fn_grad (check_batched_grad),
    test_fn_gradgrad (check_batched_gradgrad) and test_forward_mode_AD
    (check_batched_forward_grad), all True for this OpInfo."""
    fn, inputs = _gradcheck_fn(impl, _sample(i))
    if kind == "grad":
        assert torch.autograd.gradcheck(fn, inputs, check_batched_grad=True, **_GC)
    elif kind == "gradgrad":
        for non_contig in (False, True):
            assert torch.autograd.gradgradcheck(
                fn, inputs, gen_non_contig_grad_outputs=non_contig, check_batched_grad=True, **_GC
            )
    else:
        assert torch.autograd.gradcheck(
            fn,
            inputs,
            check_forward_ad=True,
            check_backward_ad=False,
            check_batched_grad=False,
            check_batched_forward_grad=True,
            **_GC,
        )


def _noncontiguous_like(t: Tensor | None) -> Tensor | None:
    """torch.testing._internal.common_utils.noncontiguous_like: same values, every stride
    doubled, NaN in the skipped slots (so reading them shows)."""
    if t is None:
        return None
    result = t.new_empty(t.shape + (2,))
    result[..., 0] = float("nan")
    result[..., 1] = t.detach()
    result = result[..., 1]
    result.requires_grad_(t.requires_grad)
    return result


@samples
def test_noncontiguous_samples(impl: SimpleNamespace, i: int) -> None:
    """Port of TestCommon.test_noncontiguous_samples (float32): the non-contiguous copy of each
    sample gives the same output, the same grads (for a non-contiguous grad output too) and the
    same running-stat updates."""
    s = _sample(i, torch.float32)
    nc = _Sample(*[_noncontiguous_like(t) for t in s.tensors()], kwargs=s.kwargs)  # type: ignore
    if s.input.numel() > 1:
        assert not nc.input.is_contiguous()
    expected = impl.batch_norm(*s.tensors(), **s.kwargs)
    actual = impl.batch_norm(*nc.tensors(), **nc.kwargs)
    torch.testing.assert_close(actual, expected)
    for a, e in ((nc.running_mean, s.running_mean), (nc.running_var, s.running_var)):
        if e is not None:
            torch.testing.assert_close(a, e)

    diff = [t for t in s.tensors() if t is not None and t.requires_grad]
    nc_diff = [t for t in nc.tensors() if t is not None and t.requires_grad]
    grad_out = torch.randn_like(expected)
    grads = torch.autograd.grad(expected, diff, grad_out, allow_unused=True)
    nc_grad_out = _noncontiguous_like(grad_out)
    nc_grads = torch.autograd.grad(actual, nc_diff, nc_grad_out, allow_unused=True)
    for g, ng in zip(grads, nc_grads, strict=True):
        torch.testing.assert_close(ng, g)


def _reference(s: _Sample) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """float64 F.batch_norm: output, and the running mean/var after the call (momentum default
    0.1; training, or no running stats, uses the batch's biased variance and updates the running
    variance with the unbiased one)."""
    x = s.input.detach().double()
    training = s.kwargs.get("training", False)
    momentum = s.kwargs.get("momentum", 0.1)
    eps = s.kwargs.get("eps", 1e-5)
    rm = None if s.running_mean is None else s.running_mean.detach().double()
    rv = None if s.running_var is None else s.running_var.detach().double()
    if x.numel() == 0:
        return x.clone(), rm, rv
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    if training or rm is None or rv is None:
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
        if training and rm is not None and rv is not None:
            n = x.numel() // x.shape[1]
            rm = (1 - momentum) * rm + momentum * mean
            rv = (1 - momentum) * rv + momentum * var * n / (n - 1)
    else:
        mean, var = rm, rv
    y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    if s.weight is not None:
        y = y * s.weight.detach().double().view(shape)
    if s.bias is not None:
        y = y + s.bias.detach().double().view(shape)
    return y, rm, rv


def _assert_close_scaled(actual: Tensor, expected: Tensor, tol: float) -> None:
    """``max|actual - expected| <= tol * max(1, max|expected|)``."""
    assert actual.shape == expected.shape
    if expected.numel() == 0:
        return
    a = actual.detach().double()
    assert torch.isfinite(a).all()
    scale = max(1.0, expected.abs().max().item())
    err = (a - expected).abs().max().item()
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol * scale:.3g}"


_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", list(_TOL), ids=lambda d: str(d)[6:])
@samples
def test_reference(impl: SimpleNamespace, i: int, dtype: torch.dtype) -> None:
    """OpInfo dtypes (float64/32/16, bfloat16) on CPU, as TestCommon.test_dtypes runs them, with
    values checked against float64 math (the OpInfo has no ``ref``): output of the input's dtype,
    and running stats updated in training only (EMA with the unbiased variance)."""
    s = _sample(i, dtype, requires_grad=False)
    expected, exp_mean, exp_var = _reference(s)
    out = impl.batch_norm(*s.tensors(), **s.kwargs)
    assert out.dtype == dtype
    _assert_close_scaled(out, expected, _TOL[dtype])
    if exp_mean is not None and exp_var is not None:
        assert s.running_mean is not None and s.running_var is not None
        _assert_close_scaled(s.running_mean, exp_mean, _TOL[dtype])
        _assert_close_scaled(s.running_var, exp_var, _TOL[dtype])
