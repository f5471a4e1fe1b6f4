"""Ports of ecosystem tests that find batch-norm layers by class: fvcore, timm, PyTorch fusion, SWA.

fvcore and timm are not dependencies: the small class-based logic their tests exercise is
re-implemented below, as those libraries do it (``isinstance`` against ``torch.nn`` classes), so
the tests show whether such a tool finds and treats this package's layers exactly as torch.nn's.
The PyTorch tools (``torch.nn.utils.fusion``, ``torch.ao.quantization.fuse_modules``,
``torch.fx.experimental.optimization.fuse``, ``torch.optim.swa_utils.update_bn``) are used as
shipped. Every test runs for ``impl.name == "torch"`` (control) and ``"batchnorm"``.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.ao.quantization import fuse_modules
from torch.fx.experimental import optimization
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval
from torch.optim.swa_utils import update_bn

import batchnorm


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(42)


# ---------------------------------------------------------------------------------- helpers
def _bn_modules(model: nn.Module) -> list[nn.Module]:
    """Every BN layer of either family (torch.nn's or this package's), in module order."""
    return [m for m in model.modules() if isinstance(m, (_BatchNorm, batchnorm.BatchNormBase))]


@torch.no_grad()
def _give_stats(model: nn.Module, shape: tuple[int, ...], steps: int = 3) -> nn.Module:
    """A few training batches (shifted, scaled) so running stats are far from 0/1, a random
    affine transform, then eval mode: BN is then far from the identity."""
    model.train()
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        model(torch.randn(shape, dtype=dtype) * 2.0 + 0.7)
    for bn in _bn_modules(model):
        if bn.weight is not None:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    return model.eval()


def _ref_batch_stats(batches: Iterable[Tensor], dims: list[int]) -> tuple[Tensor, Tensor]:
    """float64 reference: mean of the batch means and mean of the unbiased batch variances."""
    xs = [x.to(torch.float64) for x in batches]
    mean = torch.stack([x.mean(dim=dims) for x in xs]).mean(dim=0)
    var = torch.stack([x.var(dim=dims) for x in xs]).mean(dim=0)
    return mean, var


def _twin(
    make: Callable[[type], nn.Module], ours: type, theirs: type
) -> tuple[nn.Module, nn.Module]:
    """The same network built with torch.nn's BN class and with ``ours``, identical state."""
    ref = make(theirs)
    model = make(ours)
    model.load_state_dict(ref.state_dict())
    return ref, model


_STATS_DIMS = {1: [0, 2], 2: [0, 2, 3], 3: [0, 2, 3, 4]}
_INPUT_DIMS = {1: (16, 8, 24), 2: (16, 8, 24, 8), 3: (16, 8, 4, 12, 6)}


# ------------------------------------------------------ (a) fvcore precise BN, re-implemented
_FVCORE_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@torch.no_grad()
def _fvcore_update_bn_stats(model: nn.Module, data_loader: Iterable[Any], num_iters: int) -> None:
    """fvcore.nn.update_bn_stats as fvcore does it: the BN layers in training mode, found by
    ``isinstance`` against fvcore's ``BN_MODULE_TYPES`` (torch.nn.BatchNorm1d/2d/3d and
    SyncBatchNorm; every subclass of them is a ``_BatchNorm`` too), momentum 1.0 so each forward
    leaves the batch's own statistics in the buffers, and the cumulative average of those buffers
    over ``num_iters`` batches. A loader that runs out early is an AssertionError."""
    bns = [m for m in model.modules() if m.training and isinstance(m, _FVCORE_BN_TYPES)]
    if not bns:
        return
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 1.0
    means = [torch.zeros_like(bn.running_mean) for bn in bns]
    variances = [torch.zeros_like(bn.running_var) for bn in bns]
    seen = 0
    for inputs in itertools.islice(data_loader, num_iters):
        model(inputs)
        seen += 1
        for i, bn in enumerate(bns):
            means[i] += (bn.running_mean - means[i]) / seen
            variances[i] += (bn.running_var - variances[i]) / seen
    assert seen == num_iters, f"update_bn_stats wanted {num_iters} iterations, got {seen}"
    for i, bn in enumerate(bns):
        bn.running_mean = means[i]
        bn.running_var = variances[i]
        bn.momentum = momenta[i]


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_precise_bn(impl: SimpleNamespace, dim: int) -> None:
    """fvcore tests/test_precise_bn.py::test_precise_bn, run through this package's
    ``recompute_population_stats``: running stats become the exact batch-statistics average."""
    nb = 8
    model = getattr(impl, f"BatchNorm{dim}d")(_INPUT_DIMS[dim][1]).train()
    tensors = [torch.randn(_INPUT_DIMS[dim]) * 1.5 + 0.5 for _ in range(nb)]
    mean, var = _ref_batch_stats(tensors, _STATS_DIMS[dim])
    old_weight = model.weight.detach().clone()
    momentum = model.momentum

    report = batchnorm.recompute_population_stats(model, itertools.cycle(tensors), nb * 2)

    assert set(report) == {""} and report[""].batches == nb * 2
    torch.testing.assert_close(model.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert torch.equal(model.weight.detach(), old_weight)
    assert model.training and model.momentum == momentum


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_precise_bn_fvcore_algorithm(impl: SimpleNamespace, dim: int) -> None:
    """fvcore tests/test_precise_bn.py::test_precise_bn with fvcore's own update_bn_stats
    (re-implemented above): a tool that finds BN by class must find and update this layer."""
    nb = 8
    model = getattr(impl, f"BatchNorm{dim}d")(_INPUT_DIMS[dim][1]).train()
    tensors = [torch.randn(_INPUT_DIMS[dim]) * 1.5 + 0.5 for _ in range(nb)]
    mean, var = _ref_batch_stats(tensors, _STATS_DIMS[dim])
    old_weight = model.weight.detach().clone()

    _fvcore_update_bn_stats(model, itertools.cycle(tensors), nb * 4)

    torch.testing.assert_close(model.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert torch.equal(model.weight.detach(), old_weight)
    assert model.momentum == 0.1


def _conv_net(bn_cls: type) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), bn_cls(6), nn.ReLU(), nn.Conv2d(6, 4, 3), bn_cls(4)
    )


def test_precise_bn_fvcore_twin_models(impl: SimpleNamespace) -> None:
    """fvcore test_precise_bn on a two-BN network: fvcore's algorithm gives this package's
    BatchNorm2d the same statistics as torch.nn.BatchNorm2d, and both agree with
    ``recompute_population_stats`` (an independent float64 computation)."""
    ref, model = _twin(_conv_net, impl.BatchNorm2d, nn.BatchNorm2d)
    exact = copy.deepcopy(model)
    batches = [torch.randn(8, 3, 10, 10) * 1.5 + 0.3 for _ in range(6)]

    _fvcore_update_bn_stats(ref.train(), iter(batches), len(batches))
    _fvcore_update_bn_stats(model.train(), iter(batches), len(batches))
    batchnorm.recompute_population_stats(exact, batches)

    for r, m, e in zip(_bn_modules(ref), _bn_modules(model), _bn_modules(exact), strict=True):
        assert r.running_mean.abs().max() > 1e-3  # really updated, not left at 0
        for name in ("running_mean", "running_var"):
            torch.testing.assert_close(getattr(m, name), getattr(r, name), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(getattr(e, name), getattr(r, name), rtol=1e-5, atol=1e-6)


def test_precise_bn_insufficient_data_fvcore(impl: SimpleNamespace) -> None:
    """fvcore tests/test_precise_bn.py::test_precise_bn_insufficient_data: asking for 20
    iterations from a 10-batch loader is an AssertionError (the layer must be found to get
    there: fvcore returns silently when a model has no BN layer)."""
    model = impl.BatchNorm2d(32).train()
    tensor = torch.randn(16, 32, 24, 24)
    with pytest.raises(AssertionError):
        _fvcore_update_bn_stats(model, itertools.repeat(tensor, 10), 20)


def test_precise_bn_insufficient_data(impl: SimpleNamespace) -> None:
    """fvcore test_precise_bn_insufficient_data against ``recompute_population_stats``, whose
    contract differs: ``num_batches`` is an upper bound (10 of 20 are used), and a loader that
    yields nothing is a ValueError that leaves the statistics as they were."""
    model = impl.BatchNorm2d(32).train()
    tensor = torch.randn(16, 32, 24, 24) * 2 + 1
    with pytest.raises(ValueError):
        batchnorm.recompute_population_stats(model, iter([]))
    assert torch.equal(model.running_mean, torch.zeros(32))

    report = batchnorm.recompute_population_stats(model, itertools.repeat(tensor, 10), 20)

    assert report[""].batches == 10
    mean, var = _ref_batch_stats([tensor], _STATS_DIMS[2])
    torch.testing.assert_close(model.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.running_var.double(), var, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------ (b) timm freeze / norm_act, re-implemented
class _FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d (timm's frozen layer) with timm's optional
    activation (FrozenBatchNormAct2d): fixed buffers, y = act(x·scale + shift)."""

    def __init__(self, num_features: int, eps: float = 1e-5, act: nn.Module | None = None):
        super().__init__()
        self.num_features, self.eps, self.affine = num_features, eps, True
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return self.act(x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1))


class _TimmBatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.BatchNormAct2d: a torch.nn.BatchNorm2d subclass (so checkpoints of a separate
    BN + activation load into it) whose forward is F.batch_norm followed by the activation."""

    def __init__(self, num_features: int, **kwargs: Any) -> None:
        super().__init__(num_features, **kwargs)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or self.running_mean is None
        track = not self.training or self.track_running_stats
        x = F.batch_norm(
            x,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            use_batch,
            factor,
            self.eps,
        )
        return self.act(x)


_TIMM_BN2D = (nn.modules.batchnorm.BatchNorm2d, nn.modules.batchnorm.SyncBatchNorm)


def _timm_freeze_batch_norm_2d(module: nn.Module) -> nn.Module:
    """timm.layers.freeze_batch_norm_2d: BatchNorm2d / SyncBatchNorm (and BatchNormAct2d) become
    frozen layers with copies of γ, β and the running buffers; other modules are walked."""
    if isinstance(module, _TIMM_BN2D):
        act = module.act if isinstance(module, _TimmBatchNormAct2d) else None
        res = _FrozenBatchNorm2d(module.num_features, act=act)
        res.affine = module.affine
        if module.affine:
            res.weight.data = module.weight.data.clone().detach()
            res.bias.data = module.bias.data.clone().detach()
        res.running_mean.data = module.running_mean.data
        res.running_var.data = module.running_var.data
        res.eps = module.eps
        return res
    for name, child in module.named_children():
        new_child = _timm_freeze_batch_norm_2d(child)
        if new_child is not child:
            module.add_module(name, new_child)
    return module


def _timm_unfreeze_batch_norm_2d(module: nn.Module) -> nn.Module:
    """timm.layers.unfreeze_batch_norm_2d: frozen layers become torch.nn.BatchNorm2d (always
    torch's class, whatever class was frozen) with the frozen values."""
    if isinstance(module, _FrozenBatchNorm2d):
        res = nn.BatchNorm2d(module.num_features)
        if module.affine:
            res.weight.data = module.weight.data.clone().detach()
            res.bias.data = module.bias.data.clone().detach()
        res.running_mean.data = module.running_mean.data
        res.running_var.data = module.running_var.data
        res.eps = module.eps
        return res
    for name, child in module.named_children():
        new_child = _timm_unfreeze_batch_norm_2d(child)
        if new_child is not child:
            module.add_module(name, new_child)
    return module


def _timm_freeze_unfreeze(
    root: nn.Module, submodules: Iterable[str] | str = (), mode: str = "freeze"
) -> None:
    """timm.utils.model._freeze_unfreeze: (un)set requires_grad of the named submodules (all
    children when none is named) and swap their BN layers, in place; a BN root is refused."""
    if isinstance(root, _TIMM_BN2D):
        raise AssertionError("a BN layer cannot be the root module; use freeze_batch_norm_2d")
    names = [submodules] if isinstance(submodules, str) else list(submodules)
    mods = [root.get_submodule(n) for n in names]
    if not mods:
        names, mods = (list(t) for t in zip(*root.named_children(), strict=True))
    for name, mod in zip(names, mods, strict=True):
        for p in mod.parameters():
            p.requires_grad = mode == "unfreeze"
        if mode == "freeze":
            res, swapped = _timm_freeze_batch_norm_2d(mod), isinstance(mod, _TIMM_BN2D)
        else:
            res, swapped = _timm_unfreeze_batch_norm_2d(mod), isinstance(mod, _FrozenBatchNorm2d)
        if swapped:
            parent, _, leaf = name.rpartition(".")
            (root.get_submodule(parent) if parent else root).add_module(leaf, res)


class _Block(nn.Module):
    def __init__(self, bn_cls: type, ch: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(ch, ch, 3, padding=1), bn_cls(ch)
        self.conv2, self.bn2 = nn.Conv2d(ch, ch, 3, padding=1), bn_cls(ch)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class _TinyResNet(nn.Module):
    """The layout timm's test_freeze_unfreeze relies on (resnet18: conv1, bn1, layer1..., fc)."""

    def __init__(self, bn_cls: type, ch: int = 4) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, ch, 3, padding=1), bn_cls(ch)
        self.layer1 = nn.Sequential(_Block(bn_cls, ch), _Block(bn_cls, ch))
        self.layer2 = nn.Sequential(_Block(bn_cls, ch), _Block(bn_cls, ch))
        self.layer3 = nn.Sequential(_Block(bn_cls, ch))
        self.fc = nn.Linear(ch, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


_RESNET_INPUT = (4, 3, 8, 8)


@pytest.mark.parametrize("root", [False, True], ids=["nested", "root"])
def test_freeze_batch_norm_2d(impl: SimpleNamespace, root: bool) -> None:
    """timm freeze_batch_norm_2d (exercised by tests/test_utils.py::test_freeze_unfreeze):
    every BatchNorm2d becomes a frozen layer holding its values, and eval output is unchanged."""
    torch.manual_seed(0)
    model = _give_stats(_TinyResNet(impl.BatchNorm2d).double(), _RESNET_INPUT)
    if root:
        model = model.layer1[0].bn1
    x = torch.randn(_RESNET_INPUT[0], 4 if root else 3, 8, 8, dtype=torch.float64)
    before = model(x)
    originals = [copy.deepcopy(bn) for bn in _bn_modules(model)]
    assert originals

    frozen = _timm_freeze_batch_norm_2d(model)

    assert not _bn_modules(frozen)
    layers = [m for m in frozen.modules() if isinstance(m, _FrozenBatchNorm2d)]
    assert len(layers) == len(originals)
    for f, bn in zip(layers, originals, strict=True):
        for name in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(getattr(f, name), getattr(bn, name).detach())
        assert f.eps == bn.eps
    torch.testing.assert_close(frozen(x), before)


def test_freeze_unfreeze(impl: SimpleNamespace) -> None:
    """timm tests/test_utils.py::test_freeze_unfreeze on a small resnet-shaped model: freeze /
    unfreeze all, some ('layer1', 'layer2.0'), and one BN by path, from the root and its parent."""
    torch.manual_seed(0)
    model = _give_stats(_TinyResNet(impl.BatchNorm2d).double(), _RESNET_INPUT)
    x = torch.randn(_RESNET_INPUT, dtype=torch.float64)
    before = model(x)

    _timm_freeze_unfreeze(model)
    assert not model.fc.weight.requires_grad and not model.layer1[0].conv1.weight.requires_grad
    assert isinstance(model.layer1[0].bn1, _FrozenBatchNorm2d)
    assert isinstance(model.bn1, _FrozenBatchNorm2d) and not _bn_modules(model)
    torch.testing.assert_close(model(x), before)

    _timm_freeze_unfreeze(model, mode="unfreeze")
    assert model.fc.weight.requires_grad and model.layer1[0].conv1.weight.requires_grad
    assert type(model.layer1[0].bn1) is nn.BatchNorm2d  # timm always unfreezes to torch's class
    torch.testing.assert_close(model.eval()(x), before)

    model = _give_stats(_TinyResNet(impl.BatchNorm2d).double(), _RESNET_INPUT)
    _timm_freeze_unfreeze(model, ["layer1", "layer2.0"])
    assert not model.layer1[0].conv1.weight.requires_grad
    assert isinstance(model.layer1[0].bn1, _FrozenBatchNorm2d)
    assert not model.layer2[0].conv1.weight.requires_grad
    assert isinstance(model.layer2[0].bn2, _FrozenBatchNorm2d)
    assert model.layer3[0].conv1.weight.requires_grad and model.layer2[1].conv1.weight.requires_grad
    assert isinstance(model.layer3[0].bn1, impl.BatchNorm2d)  # not frozen: untouched
    assert isinstance(model.layer2[1].bn1, impl.BatchNorm2d)

    _timm_freeze_unfreeze(model, ["layer1", "layer2.0"], mode="unfreeze")
    assert model.layer1[0].conv1.weight.requires_grad and model.layer2[0].conv1.weight.requires_grad
    assert type(model.layer1[0].bn1) is nn.BatchNorm2d

    model = _TinyResNet(impl.BatchNorm2d)
    _timm_freeze_unfreeze(model, ["layer1.0.bn1"])
    assert isinstance(model.layer1[0].bn1, _FrozenBatchNorm2d)
    assert isinstance(model.layer1[0].bn2, impl.BatchNorm2d)
    _timm_freeze_unfreeze(model, ["layer1.0.bn1"], mode="unfreeze")
    assert type(model.layer1[0].bn1) is nn.BatchNorm2d
    _timm_freeze_unfreeze(model.layer1[1], ["bn1"])
    assert isinstance(model.layer1[1].bn1, _FrozenBatchNorm2d)
    _timm_freeze_unfreeze(model.layer1[1], ["bn1"], mode="unfreeze")
    assert type(model.layer1[1].bn1) is nn.BatchNorm2d


def test_freeze_unfreeze_bn_root(impl: SimpleNamespace) -> None:
    """timm tests/test_utils.py::test_freeze_unfreeze_bn_root: a BatchNorm2d given as the root
    of freeze() is refused with AssertionError (it cannot be swapped in place)."""
    with pytest.raises(AssertionError):
        _timm_freeze_unfreeze(impl.BatchNorm2d(10), mode="freeze")


def _timm_convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """timm.layers.norm_act.convert_sync_batchnorm (plain-BN branch): every ``_BatchNorm``
    becomes torch.nn.SyncBatchNorm sharing its parameters and buffers; children are walked."""
    out = module
    if isinstance(module, _BatchNorm):
        out = nn.SyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
    for name, child in module.named_children():
        out.add_module(name, _timm_convert_sync_batchnorm(child))
    return out


def test_convert_sync_batchnorm(impl: SimpleNamespace) -> None:
    """timm.layers.norm_act.convert_sync_batchnorm (class-based, no dedicated upstream test):
    every BN layer becomes a SyncBatchNorm with the very same tensors; eval output unchanged."""
    model = _give_stats(_TinyResNet(impl.BatchNorm2d).double(), _RESNET_INPUT)
    x = torch.randn(_RESNET_INPUT, dtype=torch.float64)
    before = model(x)
    params = [(bn.weight, bn.running_mean) for bn in _bn_modules(model)]

    out = _timm_convert_sync_batchnorm(model).eval()

    syncs = [m for m in out.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(syncs) == len(params) == len(_bn_modules(out))
    for s, (w, rm) in zip(syncs, params, strict=True):
        assert s.weight is w and s.running_mean is rm
    torch.testing.assert_close(out(x), before)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batchnorm_act2d_loads_separate_bn_act(impl: SimpleNamespace, mode: str) -> None:
    """timm BatchNormAct2d's promise ("backwards compatible with weights trained with separate
    bn, act"): a BN + ReLU state_dict loads strictly into it and both compute the same, in
    train mode (same output and buffer update) and eval; and back again."""
    bn = _give_stats(impl.BatchNorm2d(6).double(), (8, 6, 5, 5))
    bn_act = _TimmBatchNormAct2d(6).double()
    bn_act.load_state_dict(bn.state_dict(), strict=True)
    bn.train(mode == "train")
    bn_act.train(mode == "train")
    x = torch.randn(8, 6, 5, 5, dtype=torch.float64) * 3 - 1

    torch.testing.assert_close(bn_act(x), F.relu(bn(x)))
    for name, value in bn_act.state_dict().items():
        torch.testing.assert_close(bn.state_dict()[name], value)

    back = impl.BatchNorm2d(6).double().train(mode == "train")
    back.load_state_dict(bn_act.state_dict(), strict=True)
    torch.testing.assert_close(F.relu(back(x)), bn_act(x))


def _timm_probe_feature_size(backbone: nn.Module, img_size: int, in_chans: int) -> tuple:
    """timm HybridEmbed._init_backbone: one probe forward in eval mode, no grad, on a single
    zero image, every module's mode restored afterwards."""
    modes = {m: m.training for m in backbone.modules()}
    try:
        backbone.eval()
        with torch.no_grad():
            out = backbone(torch.zeros(1, in_chans, img_size, img_size))
    finally:
        for m, training in modes.items():
            m.training = training
    return tuple(out.shape[-2:]), out.shape[1]


def test_hybrid_embed_probe_preserves_backbone_modes(impl: SimpleNamespace) -> None:
    """timm tests/test_layers.py::test_hybrid_embed_resize_preserves_backbone_modes: a probe
    forward through a backbone with BN leaves modes and running statistics untouched."""
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), impl.BatchNorm2d(8))
    backbone.train()
    backbone[1].eval()
    state = copy.deepcopy(backbone[1].state_dict())
    calls: list[int] = []
    handle = backbone.register_forward_hook(lambda *_: calls.append(1))
    try:
        size, dim = _timm_probe_feature_size(backbone, 64, 3)
    finally:
        handle.remove()
    assert len(calls) == 1 and size == (32, 32) and dim == 8
    assert backbone.training and backbone[0].training and not backbone[1].training
    assert backbone[1].num_batches_tracked.item() == 0
    for name, value in backbone[1].state_dict().items():
        assert torch.equal(value, state[name])


# ------------------------------------------------------------------- (c) PyTorch conv-BN fusion
_CONV_CASES: dict[str, tuple[type, int, tuple[int, ...], bool]] = {
    # conv class, BN dimensionality, input shape, transpose
    "conv1d": (nn.Conv1d, 1, (4, 3, 12), False),
    "conv2d": (nn.Conv2d, 2, (4, 3, 8, 8), False),
    "conv3d": (nn.Conv3d, 3, (2, 3, 5, 6, 6), False),
    "convtranspose2d": (nn.ConvTranspose2d, 2, (4, 3, 6, 6), True),
}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", list(_CONV_CASES))
def test_fuse_conv_bn_eval(impl: SimpleNamespace, case: str, bias: bool) -> None:
    """torch.nn.utils.fusion.fuse_conv_bn_eval (the folding behind test_fuse_eager.py
    test_fuse_module_eval / test_fusion_conv_with_bias and test_fx_experimental
    test_conv_bn_fusion): the fused conv computes conv→BN in eval; training mode is refused."""
    conv_cls, dim, shape, transpose = _CONV_CASES[case]
    conv = conv_cls(3, 5, 3, bias=bias).double()
    bn = getattr(impl, f"BatchNorm{dim}d")(5).double()
    _give_stats(nn.Sequential(conv, bn), shape)
    x = torch.randn(shape, dtype=torch.float64)
    expected = bn(conv(x))
    assert not torch.allclose(expected, conv(x), atol=1e-2)  # BN is far from the identity
    conv_weight = conv.weight.detach().clone()

    fused = fuse_conv_bn_eval(conv, bn, transpose=transpose)

    assert type(fused) is conv_cls and fused is not conv and fused.bias is not None
    torch.testing.assert_close(fused(x), expected)
    assert torch.equal(conv.weight, conv_weight)
    bn.train()
    with pytest.raises(AssertionError):
        fuse_conv_bn_eval(conv, bn, transpose=transpose)


def test_fuse_linear_bn_eval(impl: SimpleNamespace) -> None:
    """torch.nn.utils.fusion.fuse_linear_bn_eval (behind test_fuse_eager.py
    test_fusion_linear_bn_eval): the fused Linear computes Linear→BatchNorm1d in eval."""
    model = _give_stats(nn.Sequential(nn.Linear(20, 5), impl.BatchNorm1d(5)).double(), (8, 20))
    x = torch.randn(8, 20, dtype=torch.float64)
    fused = fuse_linear_bn_eval(model[0], model[1])
    assert type(fused) is nn.Linear
    torch.testing.assert_close(fused(x), model(x))


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_fuse_bn_requires_grad(impl: SimpleNamespace, kind: str) -> None:
    """PyTorch test_nn.py TestFusionUtils::test_fuse_conv_bn_requires_grad /
    test_fuse_linear_bn_requires_grad: the fused weight and bias keep the layer's requires_grad."""
    if kind == "conv":
        layer, bn, fuse = nn.Conv2d(3, 3, 3), impl.BatchNorm2d(3), fuse_conv_bn_eval
    else:
        layer, bn, fuse = nn.Linear(3, 3), impl.BatchNorm1d(3), fuse_linear_bn_eval
    layer.eval()
    bn.eval()
    for w_rg, b_rg in itertools.product([True, False], repeat=2):
        layer.weight.requires_grad_(w_rg)
        layer.bias.requires_grad_(b_rg)
        fused = fuse(layer, bn)
        assert fused.weight.requires_grad == w_rg and fused.bias.requires_grad == b_rg


def _fusion_outcome(tool: Callable[[nn.Module], nn.Module], model: nn.Module, x: Tensor) -> str:
    """Run a fusion tool that matches modules by exact type on ``model`` (eval). Returns "fused"
    (BN folded away), "unfused" (BN layers kept), "inlined" (an fx graph that traced through the
    layer and calls batch_norm itself) or "raised <Error>"; whenever the tool returns, the result
    must compute what the model computed, and the model itself must be unchanged."""
    expected = model(x)
    try:
        out = tool(model)
    except Exception as exc:  # an error is an acceptable answer; a wrong number is not
        return f"raised {type(exc).__name__}"
    torch.testing.assert_close(out(x), expected)
    torch.testing.assert_close(model(x), expected)
    if len(_bn_modules(out)) == len(_bn_modules(model)):
        return "unfused"
    graph = getattr(out, "graph", None)
    calls = [] if graph is None else [n for n in graph.nodes if n.op == "call_function"]
    if any("batch_norm" in getattr(n.target, "__name__", str(n.target)) for n in calls):
        return "inlined"
    return "fused"


_ACCEPTABLE = ("fused", "unfused", "inlined")


_FUSE_MODULES_CASES: dict[str, tuple[Callable[[SimpleNamespace], nn.Module], tuple[int, ...]]] = {
    "conv2d-bn": (lambda i: nn.Sequential(nn.Conv2d(3, 5, 3), i.BatchNorm2d(5)), (4, 3, 8, 8)),
    "conv1d-bn-relu": (
        lambda i: nn.Sequential(nn.Conv1d(3, 5, 3), i.BatchNorm1d(5), nn.ReLU()),
        (4, 3, 12),
    ),
    "conv2d-bn-relu": (
        lambda i: nn.Sequential(nn.Conv2d(3, 5, 3), i.BatchNorm2d(5), nn.ReLU()),
        (4, 3, 8, 8),
    ),
    "conv3d-bn-relu": (
        lambda i: nn.Sequential(nn.Conv3d(3, 5, 3), i.BatchNorm3d(5), nn.ReLU()),
        (2, 3, 5, 6, 6),
    ),
    "linear-bn": (lambda i: nn.Sequential(nn.Linear(20, 5), i.BatchNorm1d(5)), (8, 20)),
}


@pytest.mark.parametrize("case", list(_FUSE_MODULES_CASES))
def test_fuse_modules_eval(
    impl: SimpleNamespace, case: str, request: pytest.FixtureRequest
) -> None:
    """PyTorch test/quantization/eager/test_fuse_eager.py::test_fuse_module_eval and
    ::test_fusion_linear_bn_eval: torch.ao.quantization.fuse_modules in eval folds BN into the
    conv/linear (BN → Identity) with the same output. It picks a fuser by exact type, so for
    this package's layers it may refuse; it must never return a wrong model."""
    make, shape = _FUSE_MODULES_CASES[case]
    model = _give_stats(make(impl).double(), shape)
    names = [str(i) for i in range(len(model))]
    x = torch.randn(shape, dtype=torch.float64)

    outcome = _fusion_outcome(lambda m: fuse_modules(m, names), model, x)

    request.node.user_properties.append(("outcome", outcome))  # what the tool did, for reports
    if impl.name == "torch":
        assert outcome == "fused"
    else:
        assert outcome in _ACCEPTABLE or outcome.startswith("raised ")


class _ConvBN(nn.Module):
    def __init__(self, bn_cls: type, track_running_stats: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, stride=2)
        self.bn = bn_cls(16, track_running_stats=track_running_stats)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


@pytest.mark.parametrize("track", [True, False], ids=["running_stats", "no_running_stats"])
def test_fx_conv_bn_fusion(
    impl: SimpleNamespace, track: bool, request: pytest.FixtureRequest
) -> None:
    """PyTorch test/test_fx_experimental.py::test_conv_bn_fusion and
    ::test_conv_bn_fusion_not_running_state: torch.fx.experimental.optimization.fuse folds a
    Conv2d→BatchNorm2d pair (not one without running stats) and keeps the output. It matches
    by exact type and traces through non-torch.nn modules, so for this package's layers it may
    leave BN in place, inline it as a batch_norm call, or raise; never return a wrong model."""
    model = _give_stats(_ConvBN(impl.BatchNorm2d, track).double(), (4, 8, 12, 12))
    x = torch.randn(4, 8, 12, 12, dtype=torch.float64)

    outcome = _fusion_outcome(optimization.fuse, model, x)

    request.node.user_properties.append(("outcome", outcome))  # what the tool did, for reports
    if impl.name == "torch":
        assert outcome == ("fused" if track else "unfused")
    else:
        assert outcome in _ACCEPTABLE or outcome.startswith("raised ")


# --------------------------------------------------------------- (d) torch.optim.swa_utils
class _SWATestDNN(nn.Module):
    def __init__(self, bn_cls: type, input_features: int = 5, n_features: int = 20) -> None:
        super().__init__()
        self.n_features = n_features
        self.fc1 = nn.Linear(input_features, n_features)
        self.bn = bn_cls(n_features, momentum=0.3)

    def compute_preactivation(self, x: Tensor) -> Tensor:
        return self.fc1(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.fc1(x))


class _SWATestCNN(nn.Module):
    def __init__(self, bn_cls: type, input_channels: int = 3, n_features: int = 10) -> None:
        super().__init__()
        self.n_features = n_features
        self.conv1 = nn.Conv2d(input_channels, n_features, kernel_size=3, padding=1)
        self.bn = bn_cls(n_features, momentum=0.3)

    def compute_preactivation(self, x: Tensor) -> Tensor:
        return self.conv1(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv1(x))


_SWA_CASES: dict[str, tuple[type, str, tuple[int, ...]]] = {
    "dnn": (_SWATestDNN, "BatchNorm1d", (100, 5)),
    "cnn": (_SWATestCNN, "BatchNorm2d", (100, 3, 5, 5)),
}


@pytest.mark.parametrize("case", list(_SWA_CASES))
@pytest.mark.parametrize("with_targets", [False, True], ids=["x", "xy"])
def test_update_bn(impl: SimpleNamespace, case: str, with_targets: bool) -> None:
    """PyTorch test/optim/test_swa_utils.py::test_update_bn_dnn / ::test_update_bn_cnn:
    update_bn resets the BN buffers and recomputes them over the loader (cumulative average of
    the batch statistics), exactly as for the torch.nn twin; momentum and mode are restored."""
    net_cls, bn_name, shape = _SWA_CASES[case]
    ref, model = _twin(lambda c: net_cls(c), getattr(impl, bn_name), getattr(nn, bn_name))
    x = torch.rand(shape)
    dataset = (
        torch.utils.data.TensorDataset(x, torch.rand(shape[0]))
        if with_targets
        else torch.utils.data.TensorDataset(x)
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, shuffle=False)
    with torch.no_grad():  # stale, far-off buffers: update_bn must reset them first
        for net in (ref, model):
            net.bn.running_mean.fill_(5.0)
            net.bn.running_var.fill_(7.0)
            net.bn.num_batches_tracked.fill_(9)
    with torch.no_grad():
        pre = [model.compute_preactivation(b[0]) for b in loader]
    dims = [0] if pre[0].dim() == 2 else [0, 2, 3]
    mean, var = _ref_batch_stats(pre, dims)

    ref.train()
    model.train()
    update_bn(loader, ref)
    update_bn(loader, model)

    assert model.training and model.bn.momentum == 0.3
    torch.testing.assert_close(model.bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn.running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert model.bn.num_batches_tracked.item() == len(loader)
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-6, atol=1e-7)


def test_update_bn_eval_momentum(impl: SimpleNamespace) -> None:
    """PyTorch test/optim/test_swa_utils.py::test_bn_update_eval_momentum: update_bn on a model
    in eval mode updates the statistics, leaves the model in eval mode and keeps momentum 0.3."""
    x = torch.rand(100, 3, 5, 5)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=5)
    cnn = _SWATestCNN(impl.BatchNorm2d).eval()

    update_bn(loader, cnn)

    assert not cnn.training and not cnn.bn.training
    assert cnn.bn.momentum == 0.3
    with torch.no_grad():
        mean, _ = _ref_batch_stats([cnn.compute_preactivation(b[0]) for b in loader], [0, 2, 3])
    torch.testing.assert_close(cnn.bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
