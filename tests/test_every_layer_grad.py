"""Every layer — plain, lazy, fused, renorm, ghost, frozen, sync — passes gradcheck and
gradgradcheck in float64, in training and in eval, with respect to its input and parameters."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import batchnorm as B

F64 = torch.float64


def _randomize(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        if getattr(layer, "weight", None) is not None:
            layer.weight.uniform_(0.5, 1.5)
        if getattr(layer, "bias", None) is not None:
            layer.bias.uniform_(-0.5, 0.5)
        if getattr(layer, "running_mean", None) is not None:
            layer.running_mean.normal_()
            layer.running_var.uniform_(0.5, 2.0)
    return layer


LAYERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "BatchNorm1d": (lambda: B.BatchNorm1d(3), (5, 3)),
    "BatchNorm1d-3d": (lambda: B.BatchNorm1d(3, affine=False), (3, 3, 2)),
    "BatchNorm2d": (lambda: B.BatchNorm2d(3), (3, 3, 2, 2)),
    "BatchNorm3d": (lambda: B.BatchNorm3d(2, momentum=None), (2, 2, 2, 1, 2)),
    "BatchNormAct2d-relu": (lambda: B.BatchNormAct2d(3, "relu"), (3, 3, 2, 2)),
    "BatchNormAct2d-leaky": (lambda: B.BatchNormAct2d(3, "leaky_relu", 0.2), (3, 3, 2, 2)),
    "BatchNormAct1d-identity": (lambda: B.BatchNormAct1d(3, "identity"), (5, 3)),
    "BatchRenorm2d": (lambda: B.BatchRenorm2d(3, r_max=1.5, d_max=0.5), (3, 3, 2, 2)),
    "GhostBatchNorm1d": (lambda: B.GhostBatchNorm1d(3, virtual_batch_size=3), (6, 3)),
    "FrozenBatchNorm2d": (lambda: B.FrozenBatchNorm2d(3, train_affine=True), (3, 3, 2, 2)),
    "FrozenBatchNorm2d-batch": (
        lambda: B.FrozenBatchNorm2d(3, use_batch_stats=True, train_affine=True),
        (3, 3, 2, 2),
    ),
    "SyncBatchNorm": (lambda: B.SyncBatchNorm(3), (4, 3, 2)),  # no process group: local
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_gradcheck_and_gradgradcheck(name: str, training: bool) -> None:
    make, shape = LAYERS[name]
    layer = _randomize(make().to(F64)).train(training)
    if name == "BatchRenorm2d":
        # r and d are constants in backward (the paper's stop_gradient), so finite differences
        # agree only where they are clipped: running statistics far from the batch's.
        with torch.no_grad():
            layer.running_mean.fill_(50.0)
            layer.running_var.fill_(100.0)
    buffers = {k: v.clone() for k, v in layer.named_buffers()}
    names = [
        n
        for n in ("weight", "bias")
        if getattr(layer, n) is not None and getattr(layer, n).requires_grad
    ]
    params = [getattr(layer, n).detach().clone().requires_grad_() for n in names]
    x = (torch.randn(shape, dtype=F64) * 2 + 0.5).requires_grad_()

    def f(x: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        # every evaluation from the same running statistics, on buffers of its own
        state = {k: v.clone() for k, v in buffers.items()} | dict(zip(names, ps, strict=True))
        return torch.func.functional_call(layer, state, (x,))

    assert torch.autograd.gradcheck(f, (x, *params))
    assert torch.autograd.gradgradcheck(f, (x, *params))


def test_gradgradcheck_would_catch_a_dropped_second_order_term() -> None:
    """The check above is not vacuous: a backward that is right to first order but not itself
    differentiable (what BN's backward was before the op's create_graph path) fails it."""

    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * 2 * x.detach()  # second-order term dropped

    x = torch.randn(5, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(Square.apply, (x,))
    assert not torch.autograd.gradgradcheck(Square.apply, (x,), raise_exception=False)
