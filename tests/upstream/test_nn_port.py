"""Ports of PyTorch's batch-norm tests from ``test/test_nn.py`` and ``test/nn/``.

Sources (pytorch/pytorch, main): ``TestNN.test_batchnorm_*`` (CPU ones), the batch-norm tests of
``TestNNDeviceType`` that run on CPU, ``test/nn/test_load_state_dict.py`` (the BatchNorm parts),
``test/nn/test_lazy_modules.py`` (``test_lazy_batchnorm*``) and the ``BatchNorm1d/2d/3d`` module
cases that ``test_nn.py``'s ``test_BatchNorm*`` module tests became (``common_modules``'
``module_inputs_torch_nn_BatchNorm*``). CUDA/cuDNN-only tests are left out; where an upstream
test is CUDA-only but its subject runs on CPU too (large batch), the docstring says so.

Every test runs for ``impl.name == "torch"`` (control) and ``"batchnorm"``. Expected values are
computed here in float64, or are what upstream compares against (the same layer on a contiguous
input, a second pass, an affine layer with unit weight and zero bias, ...).
"""

from __future__ import annotations

import copy
import pickle
from collections import OrderedDict
from functools import partial
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _bn_ref(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    mean: Tensor | None = None,
    var: Tensor | None = None,
) -> Tensor:
    """Batch norm in float64: batch statistics (biased variance) unless ``mean``/``var`` given.

    Differentiable in every tensor argument (callers pass float64 leaves to get reference grads).
    """
    x = x.double()
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    if x.numel() == 0:
        return x.clone()
    if mean is None or var is None:
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
    y = (x - mean.double().view(shape)) / torch.sqrt(var.double().view(shape) + eps)
    if weight is not None:
        y = y * weight.double().view(shape)
    if bias is not None:
        y = y + bias.double().view(shape)
    return y


def _batch_stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean, biased variance and unbiased variance of ``x`` in float64."""
    x = x.detach().double()
    dims = [d for d in range(x.dim()) if d != 1]
    return x.mean(dims), x.var(dims, unbiased=False), x.var(dims, unbiased=True)


def _assert_close_scaled(actual: Tensor, expected: Tensor, tol: float) -> None:
    """``max|actual - expected| <= tol * max(1, max|expected|)`` (for low-precision dtypes)."""
    a = actual.detach().double()
    e = expected.detach().double()
    assert a.shape == e.shape, (a.shape, e.shape)
    assert torch.isfinite(a).all(), "non-finite values"
    if e.numel() == 0:
        return
    scale = max(1.0, e.abs().max().item())
    err = (a - e).abs().max().item()
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol * scale:.3g}"


def _need(impl: SimpleNamespace, name: str) -> Any:
    """``impl.<name>``, or a test failure saying the implementation does not provide it."""
    obj = getattr(impl, name, None)
    if obj is None:
        pytest.fail(f"{impl.name} provides no {name}")
    return obj


def _bn_cls(impl: SimpleNamespace, ndim: int) -> type[nn.Module]:
    """BatchNorm1d/2d/3d of ``impl`` for an input of ``ndim`` dimensions."""
    classes = {2: impl.BatchNorm1d, 3: impl.BatchNorm1d, 4: impl.BatchNorm2d, 5: impl.BatchNorm3d}
    return classes[ndim]


_LOW_TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 3e-2, torch.float16: 5e-3}


# --------------------------------------------------------------------------------------------
# TestNN (CPU)
# --------------------------------------------------------------------------------------------

_NHWC_SHAPES = [
    (4, 8, 10, 10),
    (4, 1, 9, 9),
    (4, 9, 1, 1),
    (4, 8, 2, 10, 10),
    (4, 1, 2, 9, 9),
    (4, 9, 1, 1, 1),
]
_NHWC_DTYPES = [
    (torch.float, False),
    (torch.bfloat16, False),
    (torch.bfloat16, True),
    (torch.float16, False),
    (torch.float16, True),
]


@pytest.mark.parametrize("dtype,mixed", _NHWC_DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("shape", _NHWC_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_batchnorm_nhwc_cpu(
    impl: SimpleNamespace, shape: tuple[int, ...], dtype: torch.dtype, mixed: bool
) -> None:
    """Port of TestNN.test_batchnorm_nhwc_cpu: a channels-last input (NC11, N1HW, mixed
    dtype) gives the layer's contiguous-input output and grads, in channels-last layout; both
    are also checked against float64 math."""
    cls = impl.BatchNorm2d if len(shape) == 4 else impl.BatchNorm3d
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    c = shape[1]
    x = torch.randn(shape).to(dtype).contiguous(memory_format=fmt).requires_grad_(True)
    grad = torch.randn(shape).to(dtype).contiguous(memory_format=fmt)
    bn = cls(c).to(dtype)
    with torch.no_grad():
        bn.weight.uniform_()
        bn.bias.uniform_()
    ref_x = x.detach().clone().contiguous().requires_grad_(True)
    ref_grad = grad.detach().clone().contiguous()
    ref_bn = cls(c).to(dtype)
    ref_bn.load_state_dict(bn.state_dict())
    if mixed:
        bn.float()
        ref_bn.float()

    out = bn(x)
    out.backward(grad)
    ref_out = ref_bn(ref_x)
    ref_out.backward(ref_grad)

    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=fmt)
    assert ref_out.is_contiguous()
    torch.testing.assert_close(out, ref_out)
    # upstream: weight-grad precision 1e-4 for 3-D float/bfloat16, dtype default otherwise
    prec = 1e-4 if len(shape) == 5 and dtype != torch.float16 else None
    torch.testing.assert_close(bn.weight.grad, ref_bn.weight.grad, atol=prec, rtol=prec)
    torch.testing.assert_close(bn.bias.grad, ref_bn.bias.grad)
    torch.testing.assert_close(x.grad, ref_x.grad)

    # float64 reference (not in upstream): the values themselves are right
    x64 = x.detach().double().requires_grad_(True)
    w64 = bn.weight.detach().double().requires_grad_(True)
    b64 = bn.bias.detach().double().requires_grad_(True)
    y64 = _bn_ref(x64, w64, b64, bn.eps)
    y64.backward(grad.double())
    tol = _LOW_TOL[dtype]
    _assert_close_scaled(out, y64, tol)
    _assert_close_scaled(x.grad, x64.grad, 4 * tol)
    _assert_close_scaled(bn.weight.grad, w64.grad, 4 * tol)
    _assert_close_scaled(bn.bias.grad, b64.grad, 4 * tol)


# Upstream uses (4, 80, 500, 500) and (16, 3, 224, 224); these keep more than 65504 values per
# channel (so a float16 sum of x, x**2 or of the grads overflows) at a fraction of the size.
_OVERFLOW_CASES = (
    [
        (2, (4, 2, 200, 200), torch.half, torch.contiguous_format, torch.contiguous_format),
        (2, (4, 2, 200, 200), torch.half, torch.channels_last, torch.channels_last),
        (3, (4, 2, 20, 45, 45), torch.half, torch.contiguous_format, torch.contiguous_format),
        (3, (4, 2, 20, 45, 45), torch.half, torch.channels_last_3d, torch.channels_last_3d),
    ]
    + [
        (2, (4, 2, 200, 200), torch.float, f, b)
        for f in (torch.contiguous_format, torch.channels_last)
        for b in (torch.contiguous_format, torch.channels_last)
    ]
    + [
        (3, (4, 2, 20, 45, 45), torch.float, f, b)
        for f in (torch.contiguous_format, torch.channels_last_3d)
        for b in (torch.contiguous_format, torch.channels_last_3d)
    ]
)


@pytest.mark.parametrize(
    "nd,size,param_dtype,fwd_format,bwd_format",
    _OVERFLOW_CASES,
    ids=[f"{c[0]}d-{str(c[2])[6:]}-{str(c[3])[6:]}-{str(c[4])[6:]}" for c in _OVERFLOW_CASES],
)
def test_batchnorm_half_overflow(
    impl: SimpleNamespace,
    nd: int,
    size: tuple[int, ...],
    param_dtype: torch.dtype,
    fwd_format: torch.memory_format,
    bwd_format: torch.memory_format,
) -> None:
    """Port of TestNN.test_batchnorm_half_overflow: float16 input with > 65504 values per
    channel gives finite output and grads equal to a float-parameter layer's (and to float64
    math); smaller sizes than upstream, same overflow condition."""
    cls = impl.BatchNorm2d if nd == 2 else impl.BatchNorm3d
    channels = size[1]
    x = torch.randn(size, dtype=torch.half).contiguous(memory_format=fwd_format)
    x.requires_grad_(True)
    bn = cls(channels).to(param_dtype)
    out = bn(x)

    ref_x = x.detach().clone().requires_grad_(True)
    ref_bn = cls(channels).to(torch.float)
    ref_bn.load_state_dict(bn.to(torch.float).state_dict())
    ref_out = ref_bn(ref_x)

    assert not out.isinf().any()
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref_out)
    _assert_close_scaled(out, _bn_ref(x.detach(), None, None, bn.eps), 5e-3)

    if param_dtype != torch.half:
        grad = torch.empty(size).uniform_(0, 1).to(torch.half)
        grad = grad.contiguous(memory_format=bwd_format)
        out.backward(grad)
        ref_out.backward(grad.clone())
        assert not x.grad.isinf().any()
        assert not x.grad.isnan().any()
        torch.testing.assert_close(x.grad, ref_x.grad)
        x64 = x.detach().double().requires_grad_(True)
        _bn_ref(x64, None, None, bn.eps).backward(grad.double())
        _assert_close_scaled(x.grad, x64.grad, 5e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("module", ["BatchNorm2d", "SyncBatchNorm"])
def test_batchnorm_non_contig_cpu(impl: SimpleNamespace, module: str, dtype: torch.dtype) -> None:
    """Port of TestNN.test_batchnorm_non_contig_cpu (BatchNorm2d and SyncBatchNorm): an eval
    layer on a permuted (channels-last-strided) input returns channels-last output equal to the
    contiguous result; a low-precision permuted input with float parameters is close to float."""
    bn_module = getattr(impl, module)
    x = torch.arange(6, dtype=torch.float).reshape(1, 3, 2, 1).permute(0, 2, 1, 3)
    bn = bn_module(2).float().eval()
    with torch.no_grad():
        bn.weight.uniform_()
        bn.bias.uniform_()
    out = bn(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    expected = _bn_ref(x.contiguous(), bn.weight, bn.bias, bn.eps, bn.running_mean, bn.running_var)
    torch.testing.assert_close(out, expected.float())

    x_low = torch.arange(24, dtype=dtype).reshape(1, 3, 2, 4).permute(0, 2, 1, 3)
    x_f = x_low.float()
    bn_mix = bn_module(2).float().eval()
    ref_bn_f = copy.deepcopy(bn_mix)
    out_low = bn_mix(x_low)
    ref_out = ref_bn_f(x_f)
    assert out_low.dtype == dtype
    torch.testing.assert_close(ref_out, out_low.float(), atol=0.05, rtol=0.05)


def test_batchnorm_raises_error_if_less_than_one_value_per_channel(impl: SimpleNamespace) -> None:
    """Port of TestNN.test_batchnorm_raises_error_if_less_than_one_value_per_channel."""
    x = torch.rand(10)[None, :, None]
    with pytest.raises(ValueError) as info:
        impl.BatchNorm1d(10)(x)
    if impl.name == "torch":
        assert "Expected more than 1 value per channel when training" in str(info.value)


@pytest.mark.parametrize("size", [9, 11])
@pytest.mark.parametrize("which", ["running_mean", "running_var", "weight", "bias"])
def test_batchnorm_raises_error_if_arg_is_not_same_size_as_input(
    impl: SimpleNamespace, which: str, size: int
) -> None:
    """Port of TestNN.test_batchnorm_raises_error_if_{running_mean,running_var,weight,bias}_is_not
    _same_size_as_input: a per-channel tensor of the wrong length raises RuntimeError."""
    x = torch.rand(2, 10)
    args: dict[str, Tensor] = {"running_mean": torch.rand(10), "running_var": torch.rand(10)}
    wrong = torch.rand(size)
    args[which] = nn.Parameter(wrong) if which in ("weight", "bias") else wrong
    with pytest.raises(RuntimeError):
        impl.batch_norm(x, **args)


@pytest.mark.parametrize("dual_indices", [(0,), (1,), (1, 2), (0, 1), (0, 1, 2)], ids=str)
def test_batchnorm_raises_error_if_running_var_or_running_mean_have_forward_grad(
    impl: SimpleNamespace, dual_indices: tuple[int, ...]
) -> None:
    """Port of TestNN.test_batchnorm_raises_error_if_running_var_or_running_mean_have_forward_grad:
    forward-AD tangents on running stats (with a dual input) raise RuntimeError; otherwise the
    call works (and, with only the input dual, the eval output's tangent is t / sqrt(var + eps))."""
    args = (torch.randn(3, 2, 5), torch.randn(2), torch.randn(2))
    fn = partial(impl.batch_norm, training=False, momentum=-1.2)
    tangents = tuple(torch.rand_like(a) for a in args)
    with fwAD.dual_level():
        duals = [
            fwAD.make_dual(p, t) if i in dual_indices else p
            for i, (p, t) in enumerate(zip(args, tangents, strict=True))
        ]
        if (1 in dual_indices or 2 in dual_indices) and 0 in dual_indices:
            with pytest.raises(RuntimeError) as info:
                fn(*duals)
            if impl.name == "torch":
                assert "batch_norm is not differentiable wrt running_mean and running_var" in str(
                    info.value
                )
        else:
            out = fn(*duals)
            if dual_indices == (0,):
                tangent = fwAD.unpack_dual(out).tangent
                expected = tangents[0] / torch.sqrt(args[2] + 1e-5).view(1, -1, 1)
                torch.testing.assert_close(tangent, expected, equal_nan=True)


def test_batchnorm_buffer_update_when_stats_are_not_tracked(impl: SimpleNamespace) -> None:
    """Port of TestNN.test_batchnorm_buffer_update_when_stats_are_not_tracked: with
    track_running_stats switched off after construction, a training forward leaves every buffer
    as it was (and normalizes with the batch statistics)."""
    input_size = (32, 4)
    bn = impl.BatchNorm1d(input_size[1], track_running_stats=True)
    bn.track_running_stats = False
    num_batches = bn.num_batches_tracked.clone()
    running_mean = bn.running_mean.clone()
    running_var = bn.running_var.clone()
    x = torch.rand(input_size)
    out = bn(x)
    assert torch.equal(num_batches, bn.num_batches_tracked)
    assert torch.equal(running_mean, bn.running_mean)
    assert torch.equal(running_var, bn.running_var)
    torch.testing.assert_close(out, _bn_ref(x, bn.weight, bn.bias, bn.eps).float())


def test_batchnorm_load_state_dict(impl: SimpleNamespace) -> None:
    """Port of TestNN.test_batchnorm_load_state_dict: num_batches_tracked is saved, survives a
    non-strict load of an empty dict, and a meta-device layer loaded with assign=True gets a
    real 0 counter."""
    bn = impl.BatchNorm2d(3)
    assert torch.equal(bn.state_dict()["num_batches_tracked"], torch.tensor(0))
    bn.num_batches_tracked = torch.tensor(10)
    assert torch.equal(bn.state_dict()["num_batches_tracked"], torch.tensor(10))
    empty_dict: OrderedDict[str, Tensor] = OrderedDict()
    bn.load_state_dict(empty_dict, strict=False)
    assert torch.equal(bn.state_dict()["num_batches_tracked"], torch.tensor(10))

    with torch.device("meta"):
        meta_bn = impl.BatchNorm2d(3)
    assert meta_bn.num_batches_tracked.device == torch.device("meta")
    meta_bn.load_state_dict(empty_dict, assign=True, strict=False)
    nbt = meta_bn.state_dict()["num_batches_tracked"]
    assert nbt.device == torch.device("cpu")
    assert torch.equal(nbt, torch.tensor(0))


# --------------------------------------------------------------------------------------------
# TestNNDeviceType (CPU)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batched", [False, True], ids=["plain", "batched_grad"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_batchnorm_grad(impl: SimpleNamespace, training: bool, batched: bool) -> None:
    """Port of TestNNDeviceType.test_batchnorm_grad: gradcheck and gradgradcheck of
    batch_norm (float64, arange data, momentum 0.1, eps 1e-4) in eval and training; upstream
    runs them with check_batched_grad=True, here also once without (``plain``)."""
    bs, n_feat, size_feat = 4, 5, 6
    dt = torch.double
    x = torch.arange(bs * n_feat * size_feat, dtype=dt).view(bs, n_feat, size_feat)
    x.requires_grad_(True)
    weight = torch.arange(1, n_feat + 1, dtype=dt, requires_grad=True)
    bias = torch.arange(n_feat, dtype=dt, requires_grad=True)
    running_mean = 1 - torch.arange(n_feat, dtype=dt)
    running_var = 2 * torch.arange(n_feat, dtype=dt)

    def fn(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return impl.batch_norm(x, running_mean, running_var, w, b, training, 0.1, 0.0001)

    kw: dict[str, Any] = {"check_batched_grad": batched, "fast_mode": True}
    assert torch.autograd.gradcheck(fn, (x, weight, bias), **kw)
    assert torch.autograd.gradgradcheck(fn, (x, weight, bias), **kw)


def _check_eval_twice(module: nn.Module, data: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """Two identical forward/backward passes; returns (output, input grad) after asserting the
    second pass repeats the first."""
    res1 = module(data)
    res1.backward(grad)
    grad1 = data.grad.clone()
    data.grad = None
    res2 = module(data)
    res2.backward(grad)
    torch.testing.assert_close(res1, res2)
    torch.testing.assert_close(grad1, data.grad)
    return res1, grad1


@pytest.mark.parametrize("ndim", [2, 3])
def test_batchnorm_eval(impl: SimpleNamespace, ndim: int) -> None:
    """Port of TestNNDeviceType.test_batchnorm_eval (float32): an eval layer gives the same
    output and grad twice (equal to x normalized by the running stats), and a layer without
    running stats gives in eval what it gave in training (batch statistics)."""
    module = impl.BatchNorm1d(3).eval()
    data = torch.rand([3] * ndim, requires_grad=True)
    grad = torch.rand([3] * ndim)
    res, _ = _check_eval_twice(module, data, grad)
    expected = _bn_ref(data, None, None, module.eps, module.running_mean, module.running_var)
    torch.testing.assert_close(res, expected.float())

    module = impl.BatchNorm1d(3, track_running_stats=False)
    data = torch.rand(4, 3, requires_grad=True)
    grad = torch.rand(4, 3)
    res1 = module(data)
    res1.backward(grad)
    grad1 = data.grad.clone()
    module.eval()
    data.grad = None
    res2 = module(data)
    res2.backward(grad)
    torch.testing.assert_close(res1, res2)
    torch.testing.assert_close(grad1, data.grad)
    torch.testing.assert_close(res1, _bn_ref(data, None, None, module.eps).float())


@pytest.mark.parametrize("ndim", [2, 3])
def test_batchnorm_affine(impl: SimpleNamespace, ndim: int) -> None:
    """Port of TestNNDeviceType.test_batchnorm_affine (float32): affine with weight 1 and bias 0
    gives the output and input grad of affine=False (and of float64 batch-stat math)."""
    module = impl.BatchNorm1d(3, affine=False)
    module_affine = impl.BatchNorm1d(3, affine=True)
    with torch.no_grad():
        module_affine.weight.fill_(1.0)
        module_affine.bias.zero_()
    data = torch.rand([3] * ndim, requires_grad=True)
    grad = torch.ones_like(data)
    res1 = module_affine(data)
    res1.backward(grad)
    grad1 = data.grad.clone()
    data.grad = None
    res2 = module(data)
    res2.backward(grad)
    torch.testing.assert_close(res1, res2)
    torch.testing.assert_close(grad1, data.grad)
    torch.testing.assert_close(res2, _bn_ref(data, None, None, module.eps).float())


def test_batchnorm_simple_average(impl: SimpleNamespace) -> None:
    """Port of TestNNDeviceType.test_batchnorm_simple_average (momentum=None): stats reset to
    0/1; one batch after a reset stores that batch's mean and unbiased variance; two batches
    store the average of the two single-batch estimates; outputs do not depend on the stats."""
    module = impl.BatchNorm1d(3, momentum=None)
    zeros, ones = torch.zeros(3), torch.ones(3)
    torch.testing.assert_close(module.running_mean, zeros)
    torch.testing.assert_close(module.running_var, ones)
    data1 = torch.rand(4, 3)
    data2 = torch.rand(4, 3)

    res1 = module(data1)
    running_mean1 = module.running_mean.clone()
    running_var1 = module.running_var.clone()
    assert not torch.allclose(running_mean1, zeros)
    assert not torch.allclose(running_var1, ones)
    mean1, _, uvar1 = _batch_stats(data1)
    torch.testing.assert_close(running_mean1, mean1.float())
    torch.testing.assert_close(running_var1, uvar1.float())

    module.reset_running_stats()
    torch.testing.assert_close(module.running_mean, zeros)
    torch.testing.assert_close(module.running_var, ones)

    res2 = module(data2)
    running_mean2 = module.running_mean.clone()
    running_var2 = module.running_var.clone()
    assert not torch.allclose(running_mean2, zeros)
    assert not torch.allclose(running_var2, ones)

    module.reset_running_stats()
    torch.testing.assert_close(module.running_mean, zeros)
    torch.testing.assert_close(module.running_var, ones)

    res3 = module(data1)
    res4 = module(data2)
    torch.testing.assert_close(res3, res1)
    torch.testing.assert_close(res4, res2)
    torch.testing.assert_close(module.running_mean, (running_mean1 + running_mean2) / 2)
    torch.testing.assert_close(module.running_var, (running_var1 + running_var2) / 2)


def test_batchnorm_update_stats(impl: SimpleNamespace) -> None:
    """Port of TestNNDeviceType.test_batchnorm_update_stats (in earlier upstream revisions): a
    training pass moves running_mean/var (by momentum 0.1 toward the batch statistics) and adds 1
    to num_batches_tracked; an eval pass changes none of them."""
    module = impl.BatchNorm1d(3)
    data = torch.rand(4, 3)

    old_mean = module.running_mean.clone()
    old_var = module.running_var.clone()
    old_nbt = module.num_batches_tracked.clone()
    module(data)
    assert not torch.allclose(old_mean, module.running_mean)
    assert not torch.allclose(old_var, module.running_var)
    assert torch.equal(old_nbt + 1, module.num_batches_tracked)
    mean, _, uvar = _batch_stats(data)
    torch.testing.assert_close(module.running_mean, (0.9 * old_mean + 0.1 * mean).float())
    torch.testing.assert_close(module.running_var, (0.9 * old_var + 0.1 * uvar).float())

    module.eval()
    old_mean = module.running_mean.clone()
    old_var = module.running_var.clone()
    old_nbt = module.num_batches_tracked.clone()
    module(data)
    assert torch.equal(old_mean, module.running_mean)
    assert torch.equal(old_var, module.running_var)
    assert torch.equal(old_nbt, module.num_batches_tracked)


def test_BatchNorm_empty(impl: SimpleNamespace) -> None:  # noqa: N802 (upstream's name)
    """Port of TestNNDeviceType.test_BatchNorm_empty: a zero-size batch (float64 input) gives an
    empty output of the input's size, zero grads for input, weight and bias, and leaves the
    running statistics at 0 and 1."""
    mod = impl.BatchNorm2d(3)
    inp = torch.randn(0, 3, 2, 2, dtype=torch.double, requires_grad=True)
    out = mod(inp)
    out.backward(torch.rand_like(out))
    assert out.size() == inp.size()
    for p in mod.parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, torch.zeros_like(p.grad))
    torch.testing.assert_close(inp.grad, torch.zeros_like(inp))
    torch.testing.assert_close(mod.running_mean, torch.tensor([0.0, 0, 0]))
    torch.testing.assert_close(mod.running_var, torch.tensor([1.0, 1, 1]))
    torch.testing.assert_close(mod.weight.grad, torch.tensor([0.0, 0, 0]))
    torch.testing.assert_close(mod.bias.grad, torch.tensor([0.0, 0, 0]))


@pytest.mark.parametrize("dtype", [torch.float, torch.half], ids=["float32", "float16"])
def test_batchnorm_large_batch(impl: SimpleNamespace, dtype: torch.dtype) -> None:
    """Port of TestNNDeviceType.test_batchnorm_large_batch (upstream: onlyCUDA; run here on
    CPU, same 880801 x 1 x 1 x 1 input): forward and backward work and are finite; the output
    matches float64 math and d(sum out)/dx, which is mathematically 0, is ~0."""
    bn = impl.BatchNorm2d(1).to(dtype)
    data = torch.rand(880801, 1, 1, 1, dtype=dtype, requires_grad=True)
    out = bn(data)
    out.sum().backward()
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert torch.isfinite(data.grad).all()
    _assert_close_scaled(out, _bn_ref(data.detach(), None, None, bn.eps), _LOW_TOL[dtype])
    assert data.grad.abs().max().item() < (1e-3 if dtype == torch.float else 5e-2)


# --------------------------------------------------------------------------------------------
# test/nn/test_load_state_dict.py (BatchNorm parts)
# --------------------------------------------------------------------------------------------


def test_load_state_dict_BC(impl: SimpleNamespace) -> None:  # noqa: N802 (upstream's name)
    """Port of TestLoadStateDict.test_load_state_dict_BC: a version-1 (or unversioned) state dict
    without num_batches_tracked loads and gives a long 0 counter."""
    bn = impl.BatchNorm2d(3)
    state_dict = bn.state_dict()
    del state_dict["num_batches_tracked"]
    state_dict._metadata[""]["version"] = 1
    bn.load_state_dict(state_dict)
    assert bn.num_batches_tracked.dtype == torch.long
    assert bn.num_batches_tracked.item() == 0
    del state_dict._metadata[""]["version"]
    bn.load_state_dict(state_dict)
    assert bn.num_batches_tracked.dtype == torch.long
    assert bn.num_batches_tracked.item() == 0


def test_load_state_dict_batchnorm_entries(impl: SimpleNamespace) -> None:
    """Port of the BatchNorm2d parts of TestLoadStateDict.test_load_state_dict: a loaded
    running_mean is used; a wrong-size running_mean raises RuntimeError, strict or not."""
    net = nn.Module()
    net.linear = nn.Linear(5, 5)
    net.bn = impl.BatchNorm2d(2)
    state_dict = net.state_dict()
    state_dict["bn.running_mean"] = torch.randn(2)
    incompatible = net.load_state_dict(state_dict)
    assert len(incompatible.missing_keys) == 0
    assert len(incompatible.unexpected_keys) == 0
    torch.testing.assert_close(net.bn.running_mean, state_dict["bn.running_mean"])

    state_dict = net.state_dict()
    state_dict["bn.running_mean"] = torch.rand(14, 4)
    with pytest.raises(RuntimeError):
        net.load_state_dict(state_dict)
    with pytest.raises(RuntimeError):
        net.load_state_dict(state_dict, strict=False)

    state_dict = net.state_dict()
    old = copy.deepcopy(state_dict)
    partial_sd = {"bn.running_mean": torch.randn(2), "nonexistent_key": torch.rand(3)}
    net.load_state_dict(partial_sd, strict=False)
    torch.testing.assert_close(net.bn.running_mean, partial_sd["bn.running_mean"])
    new = net.state_dict()
    for k, v in old.items():
        if k != "bn.running_mean":
            assert v.equal(new[k]), k


# --------------------------------------------------------------------------------------------
# test/nn/test_lazy_modules.py (LazyBatchNorm*)
# --------------------------------------------------------------------------------------------

_LAZY_CASES = [(1, (16, 3, 6)), (1, (16, 6)), (2, (16, 3, 6, 7)), (3, (16, 3, 6, 7, 8))]


def _lazy_pair(impl: SimpleNamespace, d: int) -> tuple[type[nn.Module], type[nn.Module]]:
    return getattr(impl, f"BatchNorm{d}d"), _need(impl, f"LazyBatchNorm{d}d")


@pytest.mark.parametrize("d,shape", _LAZY_CASES, ids=lambda v: str(v))
def test_lazy_batchnorm(impl: SimpleNamespace, d: int, shape: tuple[int, ...]) -> None:
    """Port of TestLazyModules.test_lazy_batchnorm{1,2,3}d: parameters/buffers start
    uninitialized, the first forward turns the lazy layer into BatchNorm{d}d with the shapes and
    values (and output) of a layer built with num_features."""
    cls, lazy_cls = _lazy_pair(impl, d)
    for affine in (False, True):
        for track in (False, True):
            lazy = lazy_cls(affine=affine, track_running_stats=track)
            if affine:
                assert isinstance(lazy.weight, UninitializedParameter)
                assert isinstance(lazy.bias, UninitializedParameter)
            if track:
                assert isinstance(lazy.running_mean, UninitializedBuffer)
                assert isinstance(lazy.running_var, UninitializedBuffer)
            x = torch.ones(*shape)
            lazy_out = lazy(x)
            assert isinstance(lazy, cls)
            assert not isinstance(lazy, lazy_cls)
            module = cls(shape[1], affine=affine, track_running_stats=track)
            torch.testing.assert_close(lazy_out, module(x))
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                ref = getattr(module, name)
                if ref is not None:
                    got = getattr(lazy, name)
                    assert got.shape == ref.shape, name
                    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("d,shape", _LAZY_CASES, ids=lambda v: str(v))
def test_lazy_batchnorm_pickle(impl: SimpleNamespace, d: int, shape: tuple[int, ...]) -> None:
    """Port of TestLazyModules.test_lazy_batchnorm{1,2,3}d_pickle: a lazy layer pickles as lazy
    (uninitialized), and after its first forward pickles as a materialized BatchNorm{d}d."""
    cls, lazy_cls = _lazy_pair(impl, d)
    for affine in (False, True):
        for track in (False, True):
            module = pickle.loads(pickle.dumps(lazy_cls(affine=affine, track_running_stats=track)))
            assert isinstance(module, lazy_cls)
            if affine:
                assert isinstance(module.weight, UninitializedParameter)
                assert isinstance(module.bias, UninitializedParameter)
            if track:
                assert isinstance(module.running_mean, UninitializedBuffer)
                assert isinstance(module.running_var, UninitializedBuffer)
            module(torch.ones(*shape))
            module = pickle.loads(pickle.dumps(module))
            assert not isinstance(module, lazy_cls)
            assert isinstance(module, cls)
            if affine:
                assert not isinstance(module.weight, UninitializedParameter)
                assert not isinstance(module.bias, UninitializedParameter)
            if track:
                assert not isinstance(module.running_mean, UninitializedBuffer)
                assert not isinstance(module.running_var, UninitializedBuffer)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_lazy_batchnorm_state(impl: SimpleNamespace, d: int) -> None:
    """Port of TestLazyModules.test_lazy_batchnorm{1,2,3}d_state: loading a 10-feature state
    dict materializes the lazy layer; loading a lazy layer's state into a built one raises.
    (Upstream main also checks the class and ``num_features == 10`` right after the load; torch
    2.13 switches the class at the first forward and leaves num_features at 0, so the class is
    checked after a forward and num_features not at all.)"""
    cls, lazy_cls = _lazy_pair(impl, d)
    module = cls(10)
    lazy = lazy_cls(affine=True, track_running_stats=True)
    lazy.load_state_dict(module.state_dict())
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert getattr(lazy, name).shape == (10,), name
    lazy(torch.randn(4, 10, *([3] * d if d > 1 else [])))
    assert isinstance(lazy, cls)
    with pytest.raises(RuntimeError, match="shape of an uninitialized"):
        cls(10).load_state_dict(lazy_cls().state_dict())


def test_lazy_batchnorm2d_state_and_forward(impl: SimpleNamespace) -> None:
    """Port of TestLazyModules.test_lazy_batchnorm2d_state_and_forward: a lazy layer loaded from
    an eval BatchNorm2d(16) computes what that layer computes and is then a BatchNorm2d (torch
    2.13 switches the class at the first forward, upstream main at the load; upstream main's
    ``num_features == 16`` check does not hold in torch 2.13 and is left out)."""
    module = impl.BatchNorm2d(16).eval()
    with torch.no_grad():
        module.running_mean.uniform_(-1, 1)
        module.weight.uniform_()
    lazy = _need(impl, "LazyBatchNorm2d")()
    lazy.load_state_dict(module.state_dict())
    lazy.eval()
    x = torch.randn(2, 16, 4, 4)
    torch.testing.assert_close(lazy(x), module(x))
    assert isinstance(lazy, impl.BatchNorm2d)
    assert not isinstance(lazy, impl.LazyBatchNorm2d)


@pytest.mark.parametrize("d,shape", [(1, (16, 3, 6)), (2, (16, 3, 6, 7)), (3, (16, 3, 6, 7, 8))])
def test_lazy_batchnorm_with_dict_input(
    impl: SimpleNamespace, d: int, shape: tuple[int, ...]
) -> None:
    """Port of TestLazyModules.test_lazy_batchnorm_with_dict_input: ``lazy(input=x)`` works."""
    cls, lazy_cls = _lazy_pair(impl, d)
    x = torch.ones(*shape)
    torch.testing.assert_close(lazy_cls()(input=x), cls(shape[1])(input=x))


# --------------------------------------------------------------------------------------------
# test_BatchNorm*-style module cases (test_nn.py module tests -> common_modules ModuleInfo)
# --------------------------------------------------------------------------------------------

# (ndim of input, constructor args, constructor kwargs, input shape, desc)
_MODULE_CASES: list[tuple[tuple[Any, ...], dict[str, Any], tuple[int, ...], str]] = [
    ((10,), {}, (4, 10), "1d_affine"),
    ((5,), {}, (4, 5, 3), "1d_3d_input"),
    ((10, 1e-3, None), {}, (4, 10), "1d_affine_simple_average"),
    ((10, 1e-3, 0.3, False), {}, (4, 10), "1d_not_affine"),
    ((10, 1e-3, 0.3, True, False), {}, (4, 10), "1d_not_tracking_stats"),
    ((5, 1e-3, 0.3, False), {}, (4, 5, 3), "1d_3d_input_not_affine"),
    ((5, 1e-3, 0.3, False), {}, (0, 5, 9), "1d_zero_batch"),
    ((10,), {"bias": False}, (4, 10), "1d_affine_not_bias"),
    ((3,), {}, (2, 3, 6, 6), "2d"),
    ((3, 1e-3, None), {}, (2, 3, 6, 6), "2d_simple_average"),
    ((3, 1e-3, 0.8), {}, (2, 3, 6, 6), "2d_momentum"),
    ((3, 1e-3, 0.8, False), {}, (2, 3, 6, 6), "2d_not_affine"),
    ((3, 1e-3, 0.8, True, False), {}, (2, 3, 6, 6), "2d_not_tracking_stats"),
    ((5, 1e-3, 0.3, False), {}, (0, 5, 2, 2), "2d_zero_batch"),
    ((3,), {"bias": False}, (2, 3, 6, 6), "2d_affine_not_bias"),
    ((3,), {}, (2, 3, 4, 4, 4), "3d"),
    ((3, 1e-3, None), {}, (2, 3, 4, 4, 4), "3d_simple_average"),
    ((3, 1e-3, 0.7), {}, (2, 3, 4, 4, 4), "3d_momentum"),
    ((3, 1e-3, 0.7, False), {}, (2, 3, 4, 4, 4), "3d_not_affine"),
    ((3, 1e-3, 0.7, True, False), {}, (2, 3, 4, 4, 4), "3d_not_tracking_stats"),
    ((5, 1e-3, 0.3, False), {}, (0, 5, 2, 2, 2), "3d_zero_batch"),
    ((3,), {"bias": False}, (2, 3, 4, 4, 4), "3d_affine_not_bias"),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "args,kwargs,shape", [c[:3] for c in _MODULE_CASES], ids=[c[3] for c in _MODULE_CASES]
)
def test_BatchNorm_module_case(  # noqa: N802 (upstream's test_BatchNorm* names)
    impl: SimpleNamespace,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    shape: tuple[int, ...],
    training: bool,
) -> None:
    """Port of test_nn.py's BatchNorm1d/2d/3d module tests (now common_modules'
    module_inputs_torch_nn_BatchNorm*): in float64, the forward equals float64 math, running
    stats and num_batches_tracked update as PyTorch defines (EMA with unbiased variance, or the
    cumulative average for momentum=None), and gradcheck holds for input and parameters."""
    cls = _bn_cls(impl, len(shape))
    m = cls(*args, **kwargs).to(torch.float64).train(training)
    if m.weight is not None:
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
    if m.bias is not None:
        with torch.no_grad():
            m.bias.uniform_(-0.5, 0.5)
    if m.running_mean is not None:  # non-trivial stats, so eval mode shows whether they are used
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 1.5)
        m.num_batches_tracked.fill_(3)
    old_mean = None if m.running_mean is None else m.running_mean.clone()
    old_var = None if m.running_var is None else m.running_var.clone()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)

    out = m(x)
    use_batch = training or old_mean is None
    expected = _bn_ref(x, m.weight, m.bias, m.eps, None if use_batch else old_mean, old_var)
    torch.testing.assert_close(out, expected)
    if old_mean is not None:
        if training and x.numel() > 0:
            assert m.num_batches_tracked.item() == 4
            f = 1 / 4 if m.momentum is None else m.momentum
            mean, _, uvar = _batch_stats(x)
            torch.testing.assert_close(m.running_mean, (1 - f) * old_mean + f * mean)
            torch.testing.assert_close(m.running_var, (1 - f) * old_var + f * uvar)
        else:
            assert m.num_batches_tracked.item() == (4 if training else 3)
            torch.testing.assert_close(m.running_mean, old_mean)
            torch.testing.assert_close(m.running_var, old_var)

    params = {n: p for n, p in m.named_parameters()}

    def fn(x: Tensor, *ps: Tensor) -> Tensor:
        return torch.func.functional_call(m, dict(zip(params, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params.values()), fast_mode=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(2, 10), (2, 10, 5, 5), (2, 10, 4, 4, 4)], ids=str)
def test_BatchNorm_error_negative_eps(  # noqa: N802 (upstream's names)
    impl: SimpleNamespace, shape: tuple[int, ...], training: bool
) -> None:
    """Port of common_modules' module_error_inputs_torch_nn_BatchNorm1d_2d_3d: eps=-1 raises
    ValueError (upstream: at forward, "eps must be positive"/"non-negative")."""
    cls = _bn_cls(impl, len(shape))
    x = torch.randn(shape)
    with pytest.raises(ValueError) as info:
        m = cls(10, eps=-1.0).train(training)
        m(x)
    if impl.name == "torch":
        assert "eps must be" in str(info.value)
