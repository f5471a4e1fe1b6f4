"""The fused BN + activation for every activation it takes: equal to torch.nn's BN followed by
torch's activation module (values, input and parameter gradients, running statistics) on the
C++ path and on torch's, gradcheck and gradgradcheck in float64, one activation-sized tensor
kept for backward, TorchScript."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm as B

MODULES = {
    "relu": lambda: nn.ReLU(),
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "relu6": nn.ReLU6,
    "silu": nn.SiLU,
    "hardswish": nn.Hardswish,
    "hardsigmoid": nn.Hardsigmoid,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "elu": lambda: nn.ELU(0.7),
    "mish": nn.Mish,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def _fused(act: str, c: int, dtype=torch.float64) -> B.BatchNormAct2d:
    return B.BatchNormAct2d(c, act, negative_slope=0.2, alpha=0.7, dtype=dtype)


def _randomize(m: nn.Module) -> None:
    with torch.no_grad():
        m.weight.uniform_(0.5, 2.0)
        m.bias.uniform_(-1.0, 1.0)  # z spans every branch of the activations (±3, 0, 6)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("act", list(MODULES))
def test_equals_bn_then_torch_activation(act, backend):
    old = B.set_backend(backend)
    try:
        ours = _fused(act, 4)
        _randomize(ours)
        bn = nn.BatchNorm2d(4, dtype=torch.float64)
        bn.load_state_dict(ours.state_dict())
        ref = nn.Sequential(bn, MODULES[act]())
        for training in (True, False):
            ours.train(training), ref.train(training)
            x = (torch.randn(6, 4, 5, 5, dtype=torch.float64) * 3).requires_grad_()
            xr = x.detach().clone().requires_grad_()
            y, yr = ours(x), ref(xr)
            torch.testing.assert_close(y, yr)
            g = torch.randn_like(y)
            y.backward(g), yr.backward(g)
            torch.testing.assert_close(x.grad, xr.grad)
            torch.testing.assert_close(ours.weight.grad, bn.weight.grad)
            torch.testing.assert_close(ours.bias.grad, bn.bias.grad)
            ours.zero_grad(), bn.zero_grad()
        torch.testing.assert_close(ours.running_var, bn.running_var)
    finally:
        B.set_backend(old)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", list(MODULES))
def test_gradcheck_and_gradgradcheck(act, training):
    m = _fused(act, 3)
    _randomize(m)
    m.train(training)
    if not training:
        with torch.no_grad():
            m.running_mean.normal_(), m.running_var.uniform_(0.5, 2.0)
    buffers = {k: v.clone() for k, v in m.named_buffers()}
    x = (torch.randn(4, 3, 2, 2, dtype=torch.float64) * 2).requires_grad_()
    w, b = (m.weight.detach().clone().requires_grad_(), m.bias.detach().clone().requires_grad_())

    def f(x, w, b):
        state = {k: v.clone() for k, v in buffers.items()} | {"weight": w, "bias": b}
        return torch.func.functional_call(m, state, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b))
    if act == "hardsigmoid" and not training:  # torch's kernel, and torch has no hardsigmoid''
        with pytest.raises(RuntimeError, match="hardsigmoid_backward is not implemented"):
            torch.autograd.gradgradcheck(f, (x, w, b))
        return
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("act", [a for a in MODULES if a not in ("leaky_relu", "identity")])
def test_one_activation_sized_tensor_is_kept(act):
    """The input x, whatever the activation (leaky/identity may keep y: tests/test_act.py)."""
    m = _fused(act, 8, torch.float32)
    x = torch.randn(16, 8, 12, 12, requires_grad=True)
    big = []

    def pack(t):
        if t.numel() == x.numel():
            big.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x)
    assert len(big) == 1 and big[0] is x


@pytest.mark.parametrize("act", ["gelu_tanh", "elu", "hardswish"])
def test_scripted_fused_layer_equals_eager(act):
    m = _fused(act, 3).eval()
    _randomize(m)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(torch.jit.script(m)(x), m(x))


def test_unknown_activation_and_bad_alpha_are_refused():
    with pytest.raises(ValueError, match="activation must be one of"):
        B.BatchNormAct2d(3, "softsign")
    with pytest.raises(ValueError, match="alpha must be"):
        B.BatchNormAct2d(3, "elu", alpha=0.0)
    assert B.BatchNormAct2d(3, "swish").activation == "silu"


@pytest.mark.parametrize("act", list(MODULES))
def test_fuse_then_fold_keep_each_activation(act):
    """fuse_bn_act turns BN → activation module into the fused layer, and fold_batchnorm turns it
    back into conv + that activation: the same outputs throughout."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), MODULES[act]()).double()
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), MODULES[act]())
    model = model.double()
    _randomize(ref[1])
    model.load_state_dict(ref.state_dict())
    B.fuse_bn_act(model)
    fusable = act != "identity"  # nn.Identity is not an activation to fuse
    assert isinstance(model[1], B.BatchNormAct2d) == fusable
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(model(x), ref(x))  # training step, running stats move alike
    model.eval(), ref.eval()
    torch.testing.assert_close(model(x), ref(x))
    folded = B.fold_batchnorm(model)
    torch.testing.assert_close(folded(x), ref(x))
