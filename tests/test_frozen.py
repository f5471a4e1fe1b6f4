"""Frozen BN: nothing changes in train mode, gradient reaches the input, switches are independent."""

import pytest
import torch
from torch import nn

from batchnorm import (
    BatchNorm2d,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    freeze_batchnorm,
    unfreeze_batchnorm,
)


def _trained_net():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 1),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(4 * 36, 5),
        nn.BatchNorm1d(5),
    )
    for _ in range(3):
        net(torch.randn(8, 3, 8, 8) * 2 + 1)
    return net


def test_frozen_layers_change_nothing_in_train_mode_and_pass_gradient_to_input():
    net = _trained_net()
    x = torch.randn(6, 3, 8, 8)
    expect = net.eval()(x)
    net.train()
    frozen = freeze_batchnorm(net)
    assert sum(isinstance(m, (FrozenBatchNorm1d, FrozenBatchNorm2d)) for m in frozen.modules()) == 3
    state = {k: v.clone() for k, v in frozen.state_dict().items()}
    xg = x.clone().requires_grad_()
    y = frozen(xg)  # train mode
    torch.testing.assert_close(y, expect)
    y.square().sum().backward()
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, state[k]), k
    for m in frozen.modules():
        if isinstance(m, (FrozenBatchNorm1d, FrozenBatchNorm2d)):
            assert m.weight.grad is None and not m.weight.requires_grad
    # gradient to the input equals that of the eval-mode network
    xe = x.clone().requires_grad_()
    net2 = unfreeze_batchnorm(frozen).eval()
    net2(xe).square().sum().backward()
    torch.testing.assert_close(xg.grad, xe.grad)
    assert xg.grad.abs().sum() > 0


def test_freeze_shares_tensors_and_unfreeze_restores_training_behaviour():
    net = _trained_net()
    bn = net[1]
    frozen = freeze_batchnorm(net)
    assert frozen[1].weight is bn.weight and frozen[1].running_mean is bn.running_mean
    thawed = unfreeze_batchnorm(frozen)
    assert type(thawed[1]) is BatchNorm2d and thawed[1].weight.requires_grad
    before = thawed[1].running_mean.clone()
    thawed.train()(torch.randn(4, 3, 8, 8))
    assert not torch.equal(thawed[1].running_mean, before)


@pytest.mark.parametrize("use_batch_stats", [False, True])
@pytest.mark.parametrize("update_stats", [False, True])
def test_switches_are_independent(use_batch_stats, update_stats):
    torch.manual_seed(1)
    ref = nn.BatchNorm1d(3, momentum=0.2)
    ref.running_mean.uniform_(-1, 1)
    ref.running_var.uniform_(0.5, 2)
    layer = freeze_batchnorm(
        nn.Sequential(ref),
        use_batch_stats=use_batch_stats,
        update_stats=update_stats,
        train_affine=True,
    )[0]
    rm0, rv0 = layer.running_mean.clone(), layer.running_var.clone()
    x = torch.randn(10, 3) * 3
    y = layer(x)
    batch = nn.functional.batch_norm(x, None, None, layer.weight, layer.bias, True)
    fixed = nn.functional.batch_norm(x, rm0, rv0, layer.weight, layer.bias, False)
    torch.testing.assert_close(y, batch if use_batch_stats else fixed)
    if update_stats:
        torch.testing.assert_close(layer.running_mean, 0.8 * rm0 + 0.2 * x.mean(0))
        torch.testing.assert_close(layer.running_var, 0.8 * rv0 + 0.2 * x.var(0))
        assert layer.num_batches_tracked.item() == 1
    else:
        assert torch.equal(layer.running_mean, rm0) and torch.equal(layer.running_var, rv0)
    y.sum().backward()
    assert layer.weight.grad is not None and layer.bias.grad is not None


def test_freeze_rejects_layers_without_running_stats_and_changes_nothing():
    net = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats"):
        freeze_batchnorm(net)
    assert type(net[0]) is nn.BatchNorm1d


def test_frozen_state_dict_loads_from_torch_batchnorm():
    ref = nn.BatchNorm2d(4)
    ref.running_mean.fill_(0.5)
    layer = FrozenBatchNorm2d(4)
    layer.load_state_dict(ref.state_dict(), strict=True)
    assert torch.equal(layer.running_mean, ref.running_mean)
