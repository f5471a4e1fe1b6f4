"""convert_model: torch.nn.BatchNorm* ⇄ ours, sharing parameters and buffers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm


def small_convnet():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4, momentum=None)),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 8),
        nn.BatchNorm1d(8, affine=False),
        nn.Linear(8, 2),
    )


def kinds(model):
    return [
        type(m)
        for m in model.modules()
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, batchnorm.BatchNormBase))
    ]


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


def test_single_layer_and_bias_false_and_untracked(torch_bn_bias):
    layers = [nn.BatchNorm3d(2, track_running_stats=False)]
    layers += [nn.BatchNorm1d(3, bias=False)] if torch_bn_bias else []
    for layer in layers:
        ours = batchnorm.convert_model(layer)
        assert isinstance(ours, batchnorm.BatchNormBase) and ours is not layer
        assert (ours.bias is None) == (layer.bias is None)
        if torch_bn_bias:  # older torch does not show bias= in the repr
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


# ------------------------------------------------------------------ fuse_bn_act
def act_net():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Sequential(
            nn.Conv2d(4, 4, 3, bias=False),
            batchnorm.BatchNorm2d(4, momentum=None),
            nn.LeakyReLU(0.2),
        ),
        nn.Conv2d(4, 4, 1),
        nn.BatchNorm2d(4),
        nn.Softplus(),  # not fusable: stays as it is
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 8, bias=False),
        nn.BatchNorm1d(8, affine=False),
        nn.LeakyReLU(0.0),
        nn.Linear(8, 6),
        nn.BatchNorm1d(6),
        nn.LeakyReLU(-0.5),  # not invertible
    )


def test_fuse_bn_act_fuses_sequential_pairs_with_the_same_values_and_state_keys():
    torch.manual_seed(0)
    ref = act_net()
    model = act_net()
    model.load_state_dict(ref.state_dict())
    keys = list(model.state_dict())
    params_before = dict(model.named_parameters())
    assert batchnorm.fuse_bn_act(model) is model
    fused = [
        (type(m), m.activation, m.negative_slope)
        for m in model.modules()
        if isinstance(m, (batchnorm.BatchNormAct1d, batchnorm.BatchNormAct2d))
    ]
    assert fused == [
        (batchnorm.BatchNormAct2d, "relu", 0.01),
        (batchnorm.BatchNormAct2d, "leaky_relu", 0.2),
        (batchnorm.BatchNormAct1d, "relu", 0.01),
    ]
    assert isinstance(model[2], nn.Identity) and isinstance(model[3][2], nn.Identity)
    assert type(model[5]) is nn.BatchNorm2d and type(model[12]) is nn.BatchNorm1d  # left alone
    assert model[3][1].momentum is None and model[9].affine is False
    assert list(model.state_dict()) == keys  # checkpoints load both ways
    assert dict(model.named_parameters()) == params_before  # the very same tensors
    x = torch.randn(6, 3, 6, 6, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    for _ in range(2):  # training: outputs, input gradients and running statistics agree
        out, want = model(x), ref(x2)
        torch.testing.assert_close(out, want)
        out.square().sum().backward()
        want.square().sum().backward()
        torch.testing.assert_close(x.grad, x2.grad)
    for (n, a), (_, b) in zip(model.named_buffers(), ref.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=n)
    for (n, a), (_, b) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        # float32 sums over 216-value channels in another order: ~1e-6 relative, as measured
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-4, msg=n)
    model.eval()
    ref.eval()
    torch.testing.assert_close(model(x), ref(x))
    ref.load_state_dict(model.state_dict(), strict=True)


def test_fuse_bn_act_leaves_custom_forward_modules_alone():
    class Skip(nn.Module):  # the BN output also feeds the sum: fusing would change the values
        def __init__(self):
            super().__init__()
            self.bn, self.act = nn.BatchNorm2d(3), nn.ReLU()

        def forward(self, x):
            y = self.bn(x)
            return self.act(y) + y

    model = Skip()
    batchnorm.fuse_bn_act(model)
    assert type(model.bn) is nn.BatchNorm2d and type(model.act) is nn.ReLU


def test_fuse_bn_act_keeps_pairs_with_hooks_and_sequentials_with_their_own_forward():
    class Doubling(nn.Sequential):  # its forward is not a plain chain
        def forward(self, x):
            y = self[0](x)
            return self[1](y) + y

    class Block(nn.Sequential):  # a subclass with Sequential's forward is fused
        pass

    hooked = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())
    hooked[1].register_forward_hook(lambda m, a, out: out)
    model = nn.Sequential(
        Doubling(nn.BatchNorm2d(3), nn.ReLU()), hooked, Block(nn.BatchNorm2d(3), nn.ReLU())
    )
    batchnorm.fuse_bn_act(model)
    assert type(model[0][0]) is nn.BatchNorm2d and type(model[1][0]) is nn.BatchNorm2d
    assert type(model[2][0]) is batchnorm.BatchNormAct2d and type(model[2][1]) is nn.Identity


# ------------------------------------------------------------------ timm's BatchNormAct2d
class TimmStyleBatchNormAct2d(nn.BatchNorm2d):
    """The structure of timm.layers.norm_act.BatchNormAct2d (timm is not a test dependency):
    torch's BN forward, then ``self.drop``, then ``self.act``."""

    def __init__(self, c, act=None, drop=None):
        super().__init__(c)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


TimmStyleBatchNormAct2d.__module__ = "timm.layers.norm_act"
TimmStyleBatchNormAct2d.__name__ = TimmStyleBatchNormAct2d.__qualname__ = "BatchNormAct2d"


@pytest.mark.parametrize(
    "act",
    [nn.ReLU(inplace=True), nn.SiLU(), nn.Hardswish(), nn.GELU(approximate="tanh"), nn.Identity()],
)
def test_convert_model_takes_timms_bn_act_exactly(act):
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), TimmStyleBatchNormAct2d(4, act))
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), TimmStyleBatchNormAct2d(4, act))
    with torch.no_grad():
        ref[1].weight.uniform_(0.5, 1.5), ref[1].bias.uniform_(-1, 1)
    model.load_state_dict(ref.state_dict())
    keys, weight = list(model.state_dict()), model[1].weight
    batchnorm.convert_model(model)
    assert type(model[1]) is batchnorm.BatchNormAct2d and model[1].weight is weight
    assert list(model.state_dict()) == keys
    x = torch.randn(6, 3, 6, 6)
    for training in (True, False):
        model.train(training), ref.train(training)
        torch.testing.assert_close(model(x), ref(x))
    ref.load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize(
    "layer",
    [TimmStyleBatchNormAct2d(4, nn.Softplus()), TimmStyleBatchNormAct2d(4, drop=nn.Dropout(0.1))],
    ids=["unknown_act", "dropout"],
)
def test_convert_model_leaves_a_timm_bn_act_it_cannot_copy(layer):
    model = nn.Sequential(layer)
    batchnorm.convert_model(model)
    assert model[0] is layer


# ------------------------------------------------------------------ fuse_bn_act in the fx graph
class _ResBlock(nn.Module):
    """torchvision's BasicBlock wiring: BN inside forward, one ReLU module shared by two calls."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class _Functional(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)
        self.tap = nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.nn.functional.relu(self.bn(self.conv(x)))
        z = self.tap(y)
        return z.relu() + z  # tap's output also goes elsewhere: not fused


def test_fuse_bn_act_in_the_graph_of_residual_and_functional_blocks():
    torch.manual_seed(0)
    ref = nn.Sequential(_ResBlock(4), _ResBlock(4), _Functional(4))
    model = nn.Sequential(_ResBlock(4), _ResBlock(4), _Functional(4))
    model.load_state_dict(ref.state_dict())
    keys, weight = list(model.state_dict()), model[0].bn1.weight
    fused = batchnorm.fuse_bn_act(model)
    kinds = {n: type(m) for n, m in fused.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert kinds == {
        "0.bn1": batchnorm.BatchNormAct2d,
        "0.bn2": nn.BatchNorm2d,
        "1.bn1": batchnorm.BatchNormAct2d,
        "1.bn2": nn.BatchNorm2d,
        "2.bn": batchnorm.BatchNormAct2d,
        "2.tap": nn.BatchNorm2d,
    }
    assert list(fused.state_dict()) == keys and fused.get_submodule("0.bn1").weight is weight
    assert isinstance(fused, torch.fx.GraphModule) and type(model[0].bn1) is nn.BatchNorm2d
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    for training in (True, False):
        fused.train(training), ref.train(training)
        out, want = fused(x), ref(x2)
        torch.testing.assert_close(out, want)
        out.square().sum().backward(), want.square().sum().backward()
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    for (n, a), (_, b) in zip(fused.named_buffers(), ref.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=n)
    model.eval()  # the original object (its modules shared): the same values still
    torch.testing.assert_close(model(x), ref(x2))


class _TimmMBConv(nn.Module):
    """An EfficientNet-B0 inverted residual as timm builds it: BatchNormAct2d (SiLU) after the
    expansion and the depthwise conv, squeeze-excitation with SiLU and a sigmoid gate, and a
    BatchNormAct2d without activation after the projection, with a residual."""

    def __init__(self, c, exp):
        super().__init__()
        self.conv_pw = nn.Conv2d(c, exp, 1, bias=False)
        self.bn1 = TimmStyleBatchNormAct2d(exp, nn.SiLU(inplace=True))
        self.conv_dw = nn.Conv2d(exp, exp, 3, padding=1, groups=exp, bias=False)
        self.bn2 = TimmStyleBatchNormAct2d(exp, nn.SiLU(inplace=True))
        self.se_reduce, self.se_act = nn.Conv2d(exp, c // 2, 1), nn.SiLU(inplace=True)
        self.se_expand, self.gate = nn.Conv2d(c // 2, exp, 1), nn.Sigmoid()
        self.conv_pwl = nn.Conv2d(exp, c, 1, bias=False)
        self.bn3 = TimmStyleBatchNormAct2d(c, nn.Identity())

    def forward(self, x):
        y = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))
        s = self.gate(self.se_expand(self.se_act(self.se_reduce(y.mean((2, 3), keepdim=True)))))
        return self.bn3(self.conv_pwl(y * s)) + x


def test_timm_style_efficientnet_blocks_convert_fuse_and_fold():
    torch.manual_seed(0)
    ref = nn.Sequential(_TimmMBConv(8, 24), _TimmMBConv(8, 32))
    model = nn.Sequential(_TimmMBConv(8, 24), _TimmMBConv(8, 32))
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    model.load_state_dict(ref.state_dict())
    model = batchnorm.fuse_bn_act(batchnorm.convert_model(model))
    acts = sorted(m.activation for m in model.modules() if isinstance(m, batchnorm.BatchNormAct2d))
    assert acts == ["identity"] * 2 + ["silu"] * 4  # every timm layer taken, activation kept
    x = torch.randn(4, 8, 6, 6)
    for training in (True, False):
        model.train(training), ref.train(training)
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    folded = batchnorm.fold_batchnorm(model)
    assert not any(
        isinstance(m, (nn.BatchNorm2d, batchnorm.tools.ChannelAffine)) for m in folded.modules()
    )
    torch.testing.assert_close(folded(x), ref(x), rtol=1e-5, atol=1e-5)


class _TimmBasicBlock(nn.Module):
    """timm's ResNet BasicBlock wiring: ``drop_block`` (an ``nn.Identity`` when DropBlock is off)
    between ``bn1`` and ``act1``, ``aa`` (an ``nn.Identity``) after ``act1``, then ``act2`` after
    the residual sum. ``between`` replaces ``drop_block`` for the cases that must stay apart."""

    def __init__(self, c, between=None, tap=False):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.drop_block = nn.Identity() if between is None else between
        self.act1, self.aa = nn.ReLU(inplace=True), nn.Identity()
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.act2, self.tap = nn.ReLU(inplace=True), tap

    def forward(self, x):
        y = self.drop_block(self.bn1(self.conv1(x)))
        z = self.bn2(self.conv2(self.aa(self.act1(y)))) + x
        if self.tap:  # the Identity's output also goes elsewhere: bn1 must stay unfused
            z = z + y.mean()
        return self.act2(z)


def test_fuse_bn_act_passes_through_identity_calls_between_bn_and_activation():
    torch.manual_seed(0)

    def blocks():
        hooked = nn.Identity()
        hooked.register_forward_hook(lambda m, i, o: o * 2)  # hooks: not understood, left alone
        return nn.Sequential(
            _TimmBasicBlock(4),  # bn1 → Identity → ReLU: fused
            _TimmBasicBlock(4, between=nn.Sequential(nn.Identity(), nn.Identity())),  # a chain
            _TimmBasicBlock(4, tap=True),
            _TimmBasicBlock(4, between=hooked),
            _TimmBasicBlock(4, between=nn.Dropout(0.0)),  # not an Identity: not looked through
        )

    ref, model = blocks(), blocks()
    model.load_state_dict(ref.state_dict())
    fused = batchnorm.fuse_bn_act(model)
    kinds = {n: type(m) for n, m in fused.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert kinds == {f"{i}.bn2": nn.BatchNorm2d for i in range(5)} | {
        "0.bn1": batchnorm.BatchNormAct2d,
        "1.bn1": batchnorm.BatchNormAct2d,
        "2.bn1": nn.BatchNorm2d,
        "3.bn1": nn.BatchNorm2d,
        "4.bn1": nn.BatchNorm2d,
    }
    assert fused.get_submodule("0.bn1").activation == "relu"
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    for training in (True, False):
        fused.train(training), ref.train(training)
        out, want = fused(x), ref(x2)
        torch.testing.assert_close(out, want)
        out.square().sum().backward(), want.square().sum().backward()
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    for (n, a), (_, b) in zip(fused.named_buffers(), ref.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=n)
    folded = batchnorm.fold_batchnorm(fused)  # the fused layers fold into conv1 as before
    assert not any(
        isinstance(m, (nn.BatchNorm2d, batchnorm.tools.ChannelAffine)) for m in folded.modules()
    )
    torch.testing.assert_close(folded(x), ref(x2), rtol=1e-5, atol=1e-5)
