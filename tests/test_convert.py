"""convert_model: torch.nn.BatchNorm* ⇄ ours, sharing parameters and buffers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm


def small_convnet():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4, momentum=None)),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.BatchNorm1d(8, affine=False), nn.Linear(8, 2),
    )


def kinds(model):
    return [type(m) for m in model.modules()
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, batchnorm.BatchNormBase))]


def test_converts_nested_layers_and_gives_the_same_outputs():
    ref = small_convnet()
    model = small_convnet()
    model.load_state_dict(ref.state_dict())
    params_before = {n: p for n, p in model.named_parameters()}
    buffers_before = {n: b for n, b in model.named_buffers()}
    out = batchnorm.convert_model(model)
    assert out is model
    assert kinds(model) == [batchnorm.BatchNorm2d, batchnorm.BatchNorm2d, batchnorm.BatchNorm1d]
    # the very same tensors, so an optimizer built before still points at them
    assert {n: p for n, p in model.named_parameters()} == params_before
    assert all(b is buffers_before[n] for n, b in model.named_buffers())
    assert model[3][1].momentum is None and model[6].affine is False
    x = torch.randn(5, 3, 6, 6)
    for _ in range(2):  # training steps: outputs and running statistics agree
        torch.testing.assert_close(model(x), ref(x))
    for (n, a), (_, b) in zip(model.named_buffers(), ref.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=n)
    model.eval()
    ref.eval()
    torch.testing.assert_close(model(x), ref(x))


def test_round_trip_back_to_torch():
    model = small_convnet()
    x = torch.randn(4, 3, 6, 6)
    want = model.eval()(x)
    batchnorm.convert_model(model)
    back = batchnorm.convert_model(model, to="torch")
    assert kinds(back) == [nn.BatchNorm2d, nn.BatchNorm2d, nn.BatchNorm1d]
    assert not back.training
    torch.testing.assert_close(back(x), want)


def test_optimizer_built_before_conversion_still_trains():
    torch.manual_seed(1)
    model = small_convnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batchnorm.convert_model(model)
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 2, (8,))
    w_before = model[1].weight.detach().clone()
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert not torch.equal(model[1].weight, w_before)
    assert losses[-1] < losses[0]


def test_single_layer_and_bias_false_and_untracked():
    for layer in (nn.BatchNorm1d(3, bias=False), nn.BatchNorm3d(2, track_running_stats=False)):
        ours = batchnorm.convert_model(layer)
        assert isinstance(ours, batchnorm.BatchNormBase) and ours is not layer
        assert ours.extra_repr() == layer.extra_repr()
        assert list(ours.state_dict()) == list(layer.state_dict())


def test_subclasses_are_left_alone():
    class MyBN(nn.BatchNorm2d):
        pass

    model = nn.Sequential(MyBN(3))
    assert type(batchnorm.convert_model(model)[0]) is MyBN


@pytest.mark.parametrize("bad", ["Torch", "ours", None])
def test_bad_target_raises(bad):
    with pytest.raises(ValueError, match="to must be 'batchnorm' or 'torch'"):
        batchnorm.convert_model(nn.Sequential(nn.BatchNorm1d(2)), to=bad)
