"""fold_batchnorm: the folded copy equals the eval-mode model; conv/linear, ±bias, grouped conv."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from batchnorm import BatchNorm1d, BatchNorm2d, BatchNormAct1d, BatchNormAct2d, fold_batchnorm
from batchnorm.layers.base import BatchNormBase
from batchnorm.tools.fold import ChannelAffine


def _randomize_bn(model, gen):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (BatchNormBase, nn.modules.batchnorm._BatchNorm)):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen, dtype=torch.float64))
                m.running_var.copy_(torch.rand(n, generator=gen, dtype=torch.float64) * 2 + 0.1)
                if m.weight is not None:
                    m.weight.copy_(torch.randn(n, generator=gen, dtype=torch.float64))
                    m.bias.copy_(torch.randn(n, generator=gen, dtype=torch.float64))
    return model


def _check(model, x):
    folded = fold_batchnorm(model)
    assert model.training  # the original is untouched
    bn_left = [
        m
        for m in folded.modules()
        if isinstance(m, (BatchNormBase, nn.modules.batchnorm._BatchNorm))
    ]
    assert not bn_left
    torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-10, atol=1e-10)
    return folded


@settings(max_examples=10, deadline=None)
@given(
    dim=st.sampled_from([1, 2, 3]),
    groups=st.sampled_from([1, 2]),
    bias=st.booleans(),
    ours=st.booleans(),
    affine=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_conv_bn_fold_equals_eval_model(dim, groups, bias, ours, affine, seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    conv = [nn.Conv1d, nn.Conv2d, nn.Conv3d][dim - 1]
    bn = (
        [BatchNorm1d, BatchNorm2d, nn.BatchNorm3d]
        if ours
        else [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d]
    )[dim - 1]
    model = nn.Sequential(
        conv(4, 6, 3, groups=groups, bias=bias, padding=1),
        bn(6, affine=affine),
        nn.ReLU(),
        conv(6, 4, 1, groups=2, bias=not bias),
        bn(4),
        bn(4),  # BN after BN: the second is an affine
    ).double()
    _randomize_bn(model, gen)
    x = torch.randn((3, 4) + (5,) * dim, dtype=torch.float64, generator=gen)
    folded = _check(model.train(), x)
    assert isinstance(folded[1], nn.Identity) and isinstance(folded[5], ChannelAffine)
    assert folded[0].bias is not None


@pytest.mark.parametrize("bias", [True, False])
def test_linear_bn_fold_and_nested_modules(bias):
    gen = torch.Generator().manual_seed(3)

    class Block(nn.Module):  # BN wired in forward(): found in the fx graph, folded into fc
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(5, 5), nn.BatchNorm1d(5)

        def forward(self, x):
            return torch.tanh(self.bn(self.fc(x)))

    model = nn.Sequential(
        nn.Linear(7, 5, bias=bias),
        BatchNorm1d(5),
        nn.Sigmoid(),
        Block(),
        nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3)),
    ).double()
    _randomize_bn(model, gen)
    folded = _check(model, torch.randn(4, 7, dtype=torch.float64, generator=gen))
    assert isinstance(folded[3].bn, nn.Identity) and isinstance(folded[4][1], nn.Identity)
    assert type(folded[3]) is Block  # the model's own classes and forward are kept


class _Basic(nn.Module):
    """A ResNet basic block: BN inside forward, a shared ReLU, a conv+BN shortcut."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.down(x))


def test_fold_residual_blocks_completely():
    gen = torch.Generator().manual_seed(7)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        _Basic(4, 8, 2),
        _Basic(8, 8, 1),
    ).double()
    _randomize_bn(model, gen)
    folded = _check(model, torch.randn(2, 3, 10, 10, dtype=torch.float64, generator=gen))
    assert not any(isinstance(m, ChannelAffine) for m in folded.modules())  # all 7 in a conv


def test_fold_leaves_a_conv_whose_output_is_also_used_elsewhere():
    class Tap(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # folding the BN into conv would change the second use

    gen = torch.Generator().manual_seed(8)
    model = Tap().double()
    _randomize_bn(model, gen)
    folded = _check(model, torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=gen))
    assert isinstance(folded.bn, ChannelAffine) and type(folded.conv) is nn.Conv2d


def test_fold_falls_back_to_sequential_adjacency_when_the_model_does_not_trace():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: fx cannot trace it
                x = -x
            return self.bn(self.conv(self.body(x)))

    gen = torch.Generator().manual_seed(9)
    model = Branchy().double()
    _randomize_bn(model, gen)
    folded = _check(model, torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=gen))
    assert isinstance(folded.body[1], nn.Identity) and isinstance(folded.bn, ChannelAffine)


def test_channel_affine_keeps_bfloat16():
    layer = nn.BatchNorm2d(3).eval()
    x = torch.randn(2, 3, 4, 4).bfloat16()
    assert fold_batchnorm(nn.Sequential(nn.ReLU(), layer))(x).dtype == torch.bfloat16


def test_fold_float32_within_tolerance_and_bn_without_running_stats_left_alone():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 1),
        nn.BatchNorm2d(8, track_running_stats=False),
    )
    _randomize_bn(nn.Sequential(model[1]), torch.Generator().manual_seed(0))
    folded = fold_batchnorm(model)
    assert isinstance(folded[3], nn.BatchNorm2d)
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "identity"])
def test_fold_keeps_activation_of_fused_bn_act_layers(activation):
    gen = torch.Generator().manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        BatchNormAct2d(4, activation=activation, negative_slope=0.2),
        nn.Conv2d(4, 4, 3),
        nn.Identity(),
        BatchNormAct2d(4, activation=activation),
        nn.Flatten(),
        nn.Linear(64, 5),
        BatchNormAct1d(5, activation=activation),
    )
    model = model.double()
    _randomize_bn(model, gen)
    folded = _check(model, torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=gen))
    kept = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "identity": nn.Identity}[activation]
    assert isinstance(folded[1], kept) and isinstance(folded[7], kept)
    assert isinstance(folded[4], ChannelAffine if activation == "identity" else nn.Sequential)


@pytest.mark.parametrize("base", [nn.BatchNorm2d, BatchNorm2d])
def test_fold_leaves_a_subclass_it_does_not_know_and_says_so(base):
    """timm's BatchNormAct2d (a torch.nn.BatchNorm2d subclass) applies its activation inside
    forward; folding only its BN part gave outputs off by 77 where they were ~0.005. Unknown
    subclasses are left whole, with a warning naming them."""

    class BNAct(base):  # a timm-style fused layer: BN, then self.act, inside forward
        def __init__(self, c):
            super().__init__(c)
            self.act = nn.Tanh()

        def forward(self, x):
            return self.act(super().forward(x))

    gen = torch.Generator().manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BNAct(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    model = model.double()
    _randomize_bn(model, gen)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=gen)
    with pytest.warns(UserWarning, match=r"left 1 BN layer.*1 \(BNAct\)"):
        folded = fold_batchnorm(model)
    torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-10, atol=1e-10)
    assert type(folded[1]) is BNAct and type(folded[0]) is nn.Conv2d
    assert isinstance(folded[3], nn.Identity)  # the known BN after it is still folded


def test_fold_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        fold_batchnorm(lambda x: x)
