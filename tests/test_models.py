"""Models of the convolutional experiments: shapes, BN placement, no bias before BN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from batchnorm import BatchNorm1d, BatchNorm2d, BatchNormBase
from batchnorm.research.experiments.models import DeepMLP, InceptionNet, LeNet, count_bn_layers


def _bn_follows_and_no_bias(model: nn.Module) -> int:
    """Every conv/linear directly followed by a BN layer has no bias; returns how many there are."""
    mods = [m for m in model.modules() if not isinstance(m, nn.Sequential | nn.ModuleList)]
    pairs = 0
    for a, b in zip(mods, mods[1:], strict=False):
        if isinstance(a, nn.Conv2d | nn.Linear) and isinstance(b, BatchNormBase):
            assert a.bias is None, f"{a} feeds BN but has a bias"
            assert b.num_features == (
                a.out_channels if isinstance(a, nn.Conv2d) else a.out_features
            )
            pairs += 1
    return pairs


def _bn_before_nonlinearity(model: nn.Module) -> None:
    mods = [m for m in model.modules() if not isinstance(m, nn.Sequential | nn.ModuleList)]
    for a, b in zip(mods, mods[1:], strict=False):
        if isinstance(a, BatchNormBase):
            assert isinstance(b, nn.ReLU | nn.Sigmoid), (
                f"BN followed by {b}, expected the nonlinearity"
            )


def test_lenet_shapes_and_layer_sizes():
    x = torch.rand(5, 1, 28, 28)
    for bn in (False, True):
        m = LeNet(bn=bn)
        assert m(x).shape == (5, 10)
        assert m.features(x).shape == (5, 16, 5, 5)


def test_lenet_bn_has_four_bn_layers_before_relu_and_no_bias_before_them():
    m = LeNet(bn=True)
    assert count_bn_layers(m) == 4
    assert [type(b) for b in m.modules() if isinstance(b, BatchNormBase)] == [BatchNorm2d] * 2 + [
        BatchNorm1d
    ] * 2
    assert _bn_follows_and_no_bias(m) == 4
    _bn_before_nonlinearity(m)
    plain = LeNet(bn=False)
    assert count_bn_layers(plain) == 0
    assert all(c.bias is not None for c in plain.modules() if isinstance(c, nn.Conv2d | nn.Linear))
    # BN drops exactly the biases of the 4 layers it follows, and adds γ, β per channel
    n_plain = sum(p.numel() for p in plain.parameters())
    n_bn = sum(p.numel() for p in m.parameters())
    assert n_bn - n_plain == -(6 + 16 + 120 + 84) + 2 * (6 + 16 + 120 + 84)


@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_inception_net_shapes_and_bn_after_every_conv(activation):
    x = torch.rand(3, 1, 28, 28)
    m = InceptionNet(bn=True, activation=activation, width=2)
    assert m(x).shape == (3, 10)
    n_conv = sum(isinstance(c, nn.Conv2d) for c in m.modules())
    assert count_bn_layers(m) == n_conv == _bn_follows_and_no_bias(m)
    _bn_before_nonlinearity(m)
    plain = InceptionNet(bn=False, activation=activation, lrn=True, dropout=0.4, width=2)
    assert plain(x).shape == (3, 10) and count_bn_layers(plain) == 0
    assert any(isinstance(c, nn.LocalResponseNorm) for c in plain.modules())
    assert any(isinstance(c, nn.Dropout) and c.p == 0.4 for c in plain.modules())
    acts = {type(c) for c in plain.modules() if isinstance(c, nn.ReLU | nn.Sigmoid)}
    assert acts == {nn.ReLU if activation == "relu" else nn.Sigmoid}


def test_inception_block_concatenates_its_four_branches():
    m = InceptionNet(width=1)
    block = m.blocks[0]
    y = block(torch.rand(2, block.b1[0].in_channels, 14, 14))
    assert y.shape == (2, block.out_channels, 14, 14)
    assert block.out_channels == sum(
        b[-1][0].out_channels if isinstance(b[-1], nn.Sequential) else b[0].out_channels
        for b in (block.b1, block.b3, block.bd, block.bp)
    )


def test_deep_mlp_depth_bn_dropout_and_init_scale():
    m = DeepMLP(depth=10, width=32, bn=True, dropout=0.1)
    assert m(torch.rand(4, 1, 28, 28)).shape == (4, 10)
    assert len(m.hidden_linears()) == 10 and count_bn_layers(m) == 10
    assert _bn_follows_and_no_bias(m) == 10
    torch.manual_seed(0)
    a = DeepMLP(depth=3, width=400, activation="relu", init_scale=1.0)
    torch.manual_seed(0)
    b = DeepMLP(depth=3, width=400, activation="relu", init_scale=10.0)
    wa, wb = a.hidden_linears()[1].weight, b.hidden_linears()[1].weight
    torch.testing.assert_close(wb, 10 * wa)
    # He init: std sqrt(2 / fan_in) for ReLU; LeCun (gain 1) for sigmoid
    assert abs(wa.std().item() - (2 / 400) ** 0.5) < 0.05 * (2 / 400) ** 0.5
    s = DeepMLP(depth=3, width=400, activation="sigmoid").hidden_linears()[1].weight
    assert abs(s.std().item() - (1 / 400) ** 0.5) < 0.05 * (1 / 400) ** 0.5


def test_bn_models_train_a_step_and_match_torch_nn_batchnorm():
    """The package's layers inside LeNet give the same logits and grads as torch.nn's."""
    from batchnorm import convert_model

    torch.manual_seed(0)
    m = LeNet(bn=True).double()
    x = torch.rand(8, 1, 28, 28, dtype=torch.float64)
    ref = convert_model(LeNet(bn=True).double(), to="torch")
    ref.load_state_dict(m.state_dict())
    y, yr = m(x), ref(x)
    torch.testing.assert_close(y, yr)
    y.square().sum().backward()
    yr.square().sum().backward()
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


@pytest.mark.parametrize(
    "bad",
    [
        lambda: LeNet(dropout=1.0),
        lambda: InceptionNet(activation="tanh"),
        lambda: InceptionNet(width=0),
        lambda: DeepMLP(depth=0),
        lambda: DeepMLP(init_scale=0.0),
    ],
)
def test_bad_arguments_raise_value_error(bad):
    with pytest.raises(ValueError):
        bad()
