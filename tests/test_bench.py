"""benchmarks/run.py still runs and measures what its table claims (no timing is asserted)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import batchnorm as B

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_run", RUN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lenet_bn_nets_drop_the_bias_before_bn_and_the_plain_net_keeps_it(bench):
    for bn in ("none", "torch", "ours", "ours fused"):
        layers = [m for m in bench.LeNet(bn).modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        *hidden, last = layers
        assert all((m.bias is None) == (bn != "none") for m in hidden), bn
        assert last.bias is not None  # the classifier has no BN after it
    fused = [
        type(m)
        for m in bench.LeNet("ours fused").modules()
        if isinstance(m, (B.BatchNormAct1d, B.BatchNormAct2d))
    ]
    assert fused == [B.BatchNormAct2d, B.BatchNormAct2d, B.BatchNormAct1d, B.BatchNormAct1d]


def test_saved_bytes_counts_what_autograd_keeps(bench):
    x = torch.randn(8, 4, 5, 5)
    tbn, _, oact = bench.make_layers(4, 4)
    relu = nn.ReLU()
    assert bench.saved_bytes(lambda t: relu(tbn(t)), x) == pytest.approx(2.0, abs=0.05)
    assert bench.saved_bytes(oact, x) == pytest.approx(1.0, abs=0.05)
    assert bench.saved_bytes(lambda t: t * 2, x) == 0.0  # a multiply by a constant keeps nothing


def test_quick_run_prints_every_table_row(bench, capsys):
    bench.main(["--quick", "--no-warm", "--shapes", "3", "--repeats", "1"])
    out = capsys.readouterr().out
    for case in ("fwd", "fwd+bwd", "fwd+bwd, no cache", "bn+relu fwd+bwd"):
        assert f"| (60, 100) | {case} |" in out
    for variant in ("none", "torch", "ours", "ours fused"):
        assert f"\n| {variant} | " in out
    assert "default allocator" in out and "eight-pass bound" not in out  # --no-warm: no child
    for net in ("resnet18", "mobilenet_v3_small"):
        assert f"\n| {net} | " in out


def test_benchmark_nets_are_torchvisions_architectures():
    """Parameter and BN counts of torchvision's resnet18 and mobilenet_v3_small (published:
    11,689,512 and 2,542,856 parameters); outputs of the right shape; our tools convert them."""
    spec = importlib.util.spec_from_file_location("bench_nets", RUN.with_name("nets.py"))
    nets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nets)
    # every BN → activation pair: ResNet's 8 block pairs share one ReLU module (fused in the fx
    # graph) besides the stem; MobileNet's 11 projection BNs have no activation after them
    for name, params, bns, fusable in (
        ("resnet18", 11_689_512, 20, 9),
        ("mobilenet_v3_small", 2_542_856, 34, 23),
    ):
        model = nets.NETS[name]()
        assert sum(p.numel() for p in model.parameters()) == params
        assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == bns
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1000)
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0  # so that train-mode outputs can be compared
        ref = copy.deepcopy(model)
        fused = B.fuse_bn_act(B.convert_model(model))
        assert sum(isinstance(m, B.BatchNormAct2d) for m in fused.modules()) == fusable
        x = torch.randn(4, 3, 64, 64)
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-4)  # training mode
        fused.eval(), ref.eval()
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-4)
        folded = B.fold_batchnorm(ref)
        assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in folded.modules())
        assert not any(isinstance(m, B.tools.ChannelAffine) for m in folded.modules())
        torch.testing.assert_close(folded(x), ref(x), rtol=1e-4, atol=1e-4)


def test_bn_op_time_counts_torch_and_our_bn_ops_and_nothing_else(bench):
    """The op-time column counts torch.nn's BN ops, our op and its backward node, and the
    activations a fused layer takes in; a net with none of them counts nothing."""
    x = torch.randn(4, 3, 8, 8)
    conv = nn.Conv2d(3, 4, 3, bias=False)

    def count(*layers):
        model = nn.Sequential(copy.deepcopy(conv), *layers)

        def step():
            model(x).sum().backward()

        return bench.bn_op_ms(step, 2)

    assert count(nn.Flatten()) == 0.0
    assert count(nn.BatchNorm2d(4)) > 0.0  # BN alone: only the BN events can count it
    assert count(B.BatchNorm2d(4)) > 0.0  # our op, no activation
    assert count(nn.ReLU()) > 0.0
    assert count(nn.Hardswish()) > 0.0
