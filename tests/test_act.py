"""BatchNormAct1d/2d: fused BN + activation vs torch.nn.BatchNorm* followed by the activation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm as B
from batchnorm.ops import native, op

ACTS = {
    "relu": lambda s: nn.ReLU(),
    "leaky_relu": lambda s: nn.LeakyReLU(s),
    "identity": lambda s: nn.Identity(),
}


def _pair(act, c, rank, dtype, slope=0.1, seed=0):
    ours = (B.BatchNormAct2d if rank == 4 else B.BatchNormAct1d)(
        c, act, negative_slope=slope, dtype=dtype
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
        ours.weight[0] = -ours.weight[0]  # a negative γ: the inversion keeps its sign
        ours.bias.copy_(torch.randn(c, generator=g))
    ref = (nn.BatchNorm2d if rank == 4 else nn.BatchNorm1d)(c, dtype=dtype)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, nn.Sequential(ref, ACTS[act](slope))


def _run(module, x, g):
    x = x.detach().requires_grad_()
    y = module(x)
    y.backward(g)
    return y.detach(), x.grad


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=str)
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize(
    "shape,cl",
    [
        ((4, 5, 7, 3), False),
        ((4, 5, 7, 3), True),
        ((2, 6, 1, 9), True),
        ((9, 5), False),
        ((2, 5, 11), False),
        ((8, 3, 40, 40), True),
    ],
)
def test_matches_torch_bn_then_activation(shape, cl, act, dtype, tol):
    ours, ref = _pair(act, shape[1], len(shape), dtype)
    x = torch.randn(shape, dtype=dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(x)
    for _ in range(2):  # two steps: the running statistics follow the same EMA
        y, dx = _run(ours, x, g)
        yr, dxr = _run(ref, x, g)
    assert y.stride() == x.stride()
    torch.testing.assert_close(y, yr, atol=tol, rtol=tol)
    torch.testing.assert_close(dx, dxr, atol=tol, rtol=tol)
    torch.testing.assert_close(ours.weight.grad, ref[0].weight.grad, atol=tol * 10, rtol=tol)
    torch.testing.assert_close(ours.bias.grad, ref[0].bias.grad, atol=tol * 10, rtol=tol)
    for k, v in ref[0].state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, atol=tol, rtol=tol)
    ours.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=tol, rtol=tol)


def test_relu_gradient_is_nonzero_where_output_is_zero():
    # Why ReLU keeps x, not y: x_i with y_i = 0 still moves μ_B and σ²_B, so dL/dx_i ≠ 0 there.
    ours, ref = _pair("relu", 3, 4, torch.float64)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    g = torch.randn_like(x)
    y, dx = _run(ours, x, g)
    _, dxr = _run(ref, x, g)
    dead = y == 0
    assert dead.any() and (dx[dead].abs() > 1e-6).all()
    torch.testing.assert_close(dx, dxr)


def _saved_numels(module, x):
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: sizes.append(t.numel()) or t, lambda t: t
    ):
        module(x.detach().requires_grad_())
    return sizes


@pytest.mark.parametrize("act", list(ACTS))
def test_saves_one_activation_sized_tensor(act):
    ours, ref = _pair(act, 4, 4, torch.float32)
    x = torch.randn(4, 4, 6, 6)
    big = [n for n in _saved_numels(ours, x) if n == x.numel()]
    assert len(big) == 1
    assert sum(n for n in _saved_numels(ours, x) if n != x.numel()) <= 5 * 4  # γ, β, μ, σ², ...
    if act == "relu":  # torch keeps BN's input and ReLU's output
        assert len([n for n in _saved_numels(ref, x) if n == x.numel()]) == 2


def test_leaky_saves_output_and_small_gamma_falls_back_to_input_exactly():
    ours, ref = _pair("leaky_relu", 3, 4, torch.float64, slope=0.2)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = ours(x)
    assert any(t is y or (t.shape == y.shape and torch.equal(t, y)) for t in saved)
    with torch.no_grad():  # zero-initialised γ (e.g. last BN of a residual block): not invertible
        ours.weight[1] = 0.0
        ref[0].weight[1] = 0.0
    g = torch.randn_like(x)
    _, dx = _run(ours, x, g)
    _, dxr = _run(ref, x, g)
    torch.testing.assert_close(dx, dxr)
    torch.testing.assert_close(ours.weight.grad, ref[0].weight.grad)
    assert ours.weight.grad[1].abs() > 1e-3  # γ = 0 still receives Σ dz·x̂, so it can grow


@pytest.mark.parametrize(
    "act,save",
    [
        (0, op.SAVE_AUTO),
        (1, op.SAVE_INPUT),
        (2, op.SAVE_AUTO),
        (2, op.SAVE_INPUT),
        (0, op.SAVE_INPUT),
    ],
)
def test_op_gradcheck_and_gradgradcheck_float64(act, save):
    """The registered op, first and second order, for every activation and saved tensor (x or y)."""
    assert native.load() is not None
    x = torch.randn(3, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return native.op(x, w, b, None, None, None, True, 0.1, 1e-5, act, 0.3, save)[0]

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_bfloat16_close_to_float32():
    ours, _ = _pair("leaky_relu", 4, 4, torch.float32)
    ours16, _ = _pair("leaky_relu", 4, 4, torch.bfloat16)
    x = torch.randn(8, 4, 6, 6)
    g = torch.randn_like(x)
    y, dx = _run(ours, x, g)
    y16, dx16 = _run(ours16, x.bfloat16(), g.bfloat16())
    assert y16.dtype == dx16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(dx16.float(), dx, atol=1e-1, rtol=5e-2)


def test_state_dict_matches_torch_and_loads_both_ways():
    ours = B.BatchNormAct2d(5, "leaky_relu")
    ref = nn.BatchNorm2d(5)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(ref.state_dict(), strict=True)


def test_eval_changes_no_state():
    ours, _ = _pair("relu", 3, 4, torch.float32)
    ours.eval()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    ours(torch.randn(2, 3, 4, 4))
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k])


def test_invalid_arguments_raise_value_error():
    with pytest.raises(ValueError, match="activation must be one of"):
        B.BatchNormAct2d(3, "softplus")  # not among the fused activations
    with pytest.raises(ValueError, match="negative_slope must be > 0"):
        B.BatchNormAct2d(3, "leaky_relu", negative_slope=0.0)
    with pytest.raises(ValueError, match="expected 3 channels"):
        B.BatchNormAct2d(3)(torch.randn(2, 4, 5, 5))


def test_torch_compile_smoke():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(2, 4, 3), B.BatchNormAct2d(4, "leaky_relu"), nn.Flatten())
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 2, 6, 6)
    y = compiled(x)
    y.square().sum().backward()
    gc = model[0].weight.grad.clone()
    model.zero_grad()
    model[1].running_mean.zero_()
    model[1].running_var.fill_(1)
    ye = model(x)
    ye.square().sum().backward()
    torch.testing.assert_close(y, ye, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gc, model[0].weight.grad, atol=1e-4, rtol=1e-4)
