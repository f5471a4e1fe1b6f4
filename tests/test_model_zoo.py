"""The whole-model tools on the real torchvision and timm models (issue 16): ``convert_model``,
``fuse_bn_act`` and ``fold_batchnorm`` take every BN → activation and conv → BN pair of
torchvision's resnet18 and mobilenet_v3_small and timm's resnet18, mobilenetv3_small_100 and
efficientnet_b0, with outputs equal to the untouched model in train mode (running statistics
too) and eval mode.

Each model is built from its library (random initialisation, no weights), so each test skips
where that library is not importable: in the project's environment and CI, which install
neither. The same structures are built without them in test_convert.py and test_fold.py.
"""

from __future__ import annotations

import copy
import importlib
import warnings
from collections import Counter

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

import batchnorm
from batchnorm.tools import ChannelAffine


def _import_or_skip(name: str):
    """The module, or a skip naming why not. Any exception, not only ImportError: a torchvision
    wheel built for another torch raises RuntimeError while registering its C++ ops."""
    try:
        return importlib.import_module(name)
    except Exception as e:  # any failure to import: reported as the skip reason
        pytest.skip(f"{name} is not importable here: {type(e).__name__}: {e}")


def _torchvision(arch: str) -> nn.Module:
    return getattr(_import_or_skip("torchvision.models"), arch)()


def _timm(arch: str) -> nn.Module:
    return _import_or_skip("timm").create_model(arch, pretrained=False)


# (library, architecture): (BN layers, BN → activation pairs by activation). The pairs, counted
# from each architecture's definition:
# - ResNet-18: the stem's bn1 → ReLU and each of the 8 BasicBlocks' bn1 → ReLU (timm's through
#   ``drop_block``, an nn.Identity); bn2 goes into the residual sum, not into the ReLU. 20 BN: 1
#   stem + 8 × 2 + 3 downsample shortcuts.
# - MobileNetV3-Small: the stem and the last conv → BN → Hardswish; the three ReLU blocks have
#   1 + 2 + 2 BN → ReLU, the eight Hardswish blocks 2 BN → Hardswish each; each of the 11 blocks'
#   projection BN has no activation.
# - EfficientNet-B0: the stem, the head and 1 + 15 × 2 BN → SiLU inside the 16 blocks; each
#   block's projection BN has no activation.
CASES = {
    "torchvision.resnet18": (lambda: _torchvision("resnet18"), 20, {"relu": 9}),
    "torchvision.mobilenet_v3_small": (
        lambda: _torchvision("mobilenet_v3_small"),
        34,
        {"hardswish": 18, "relu": 5},
    ),
    "timm.resnet18": (lambda: _timm("resnet18"), 20, {"relu": 9}),
    "timm.mobilenetv3_small_100": (
        lambda: _timm("mobilenetv3_small_100"),
        34,
        {"hardswish": 18, "relu": 5},
    ),
    "timm.efficientnet_b0": (lambda: _timm("efficientnet_b0"), 49, {"silu": 33}),
}
TOL = dict(rtol=1e-5, atol=1e-5)


def _randomize_bn(model: nn.Module) -> None:
    """BN parameters and running statistics away from their initial 1/0, so that folding and the
    eval-mode map are not nearly the identity."""
    with torch.no_grad():
        for m in model.modules():
            if _is_bn(m):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, _NormBase)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("name", list(CASES))
def test_tools_take_every_pair_of_the_real_model(name):
    build, n_bn, want_acts = CASES[name]
    ref = build()
    _randomize_bn(ref)
    assert sum(_is_bn(m) for m in ref.modules()) == n_bn
    model = copy.deepcopy(ref)

    # convert_model: every BN layer (torch's, and timm's BatchNormAct2d) becomes ours.
    model = batchnorm.convert_model(model)
    bns = [m for m in model.modules() if _is_bn(m)]
    assert len(bns) == n_bn and all(isinstance(m, batchnorm.BatchNormBase) for m in bns)

    # fuse_bn_act: every BN → activation pair becomes one BatchNormAct2d with that activation.
    fused = batchnorm.fuse_bn_act(model)
    acts = Counter(getattr(m, "activation", "identity") for m in fused.modules() if _is_bn(m))
    assert {a: n for a, n in acts.items() if a != "identity"} == want_acts, acts
    n_fused = sum(want_acts.values())
    assert list(fused.state_dict()) == list(ref.state_dict())

    # Train mode: outputs, input gradients and running statistics equal the untouched model's
    # (the same seed for each: torchvision's MobileNetV3 classifier has dropout).
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    fused.train(), ref.train()
    torch.manual_seed(1)
    out = fused(x)
    torch.manual_seed(1)
    want = ref(x2)
    torch.testing.assert_close(out, want, **TOL)
    out.square().sum().backward(), want.square().sum().backward()
    # Float32 rounding through 20-50 layers of batch-statistics backward reaches ~5e-5 of the
    # largest input gradient, in torch's own layers against float64 as much as here (in float64
    # the fused model's gradients equal the untouched model's to ~1e-13).
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=1e-4 * x2.grad.abs().max().item())
    got_sd, want_sd = fused.state_dict(), ref.state_dict()
    for k in want_sd:
        torch.testing.assert_close(got_sd[k], want_sd[k], **TOL, msg=k)
    d_train = _max_diff(out, want)

    # Eval mode: the fused model, and fold_batchnorm of it, equal the untouched model's output.
    fused.eval(), ref.eval()
    with torch.no_grad():
        want = ref(x2)
        out = fused(x)
        torch.testing.assert_close(out, want, **TOL)
        d_eval = _max_diff(out, want)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no layer left unfolded with a warning
            folded = batchnorm.fold_batchnorm(fused)
        # Every BN folded into the conv before it: no BN and no stand-alone per-channel affine
        # left, and one more conv with a bias per BN (all of these convs have bias=False).
        assert not any(isinstance(m, (_NormBase, ChannelAffine)) for m in folded.modules())
        gained_bias = sum(
            isinstance(m, nn.Conv2d) and m.bias is not None for m in folded.modules()
        ) - sum(isinstance(m, nn.Conv2d) and m.bias is not None for m in fused.modules())
        assert gained_bias == n_bn
        out = folded(x)
        torch.testing.assert_close(out, want, **TOL)
        d_fold = _max_diff(out, want)
        if all(type(m) is nn.BatchNorm2d for m in ref.modules() if _is_bn(m)):
            # torch's own BN layers fold as they are, without convert_model first.
            folded = batchnorm.fold_batchnorm(ref)
            assert not any(isinstance(m, (_NormBase, ChannelAffine)) for m in folded.modules())
            torch.testing.assert_close(folded(x), want, **TOL)
    print(
        f"\n{name}: {n_bn} BN, {n_fused} fused {dict(want_acts)}, {gained_bias} folded; "
        f"max |diff| train {d_train:.2e}, eval {d_eval:.2e}, folded {d_fold:.2e}"
    )
