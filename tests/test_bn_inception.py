"""BN-Inception of the paper's appendix (Figure 5): table widths, grids, parameter count, switches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from batchnorm import BatchNorm1d, BatchNorm2d, BatchNormBase
from batchnorm.research.experiments.bn_inception import (
    DEPTH_CONSISTENT_PROJ,
    PAPER_PARAMETERS,
    TABLE,
    BNInception,
    bn_inception,
    count_parameters,
)

# Figure 5's printed output depths, and each module's output grid at 224×224 (the table prints
# the input grid, 28 and 14, for the stride-2 modules 3c and 4e).
PRINTED = {
    "3a": (256, 28),
    "3b": (320, 28),
    "3c": (576, 14),
    "4a": (576, 14),
    "4b": (576, 14),
    "4c": (576, 14),
    "4d": (576, 14),
    "4e": (1024, 7),
    "5a": (1024, 7),
    "5b": (1024, 7),
}

# count_parameters(bn_inception()) at width 1, 1000 classes. The paper says 13.6·10^6
# (Section 4.2: "The network contains 13.6·10^6 parameters"); the table's layers give 17.7% less
# and no reading of the table closes the gap (see the module docstring), so the check against
# the paper is a stated 20% band, and the exact count is pinned.
MEASURED_PARAMETERS = 11_188_288
PAPER_TOLERANCE = 0.20


@pytest.fixture(autouse=True)
def _one_thread_native_conv():
    """One thread and ATen's own conv kernels for these tiny nets: oneDNN builds a primitive per
    new conv shape (~70 convs, several ms each), and on a busy 2-core box every 2-thread parallel
    region waits for a scheduler tick (measured: 0.9 s against 0.01 s per width-0.25 forward)."""
    threads, mkldnn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.mkldnn.enabled = mkldnn


def _leaves(model: nn.Module) -> list[nn.Module]:
    """Leaf modules in registration order (= execution order within each Sequential)."""
    return [m for m in model.modules() if not list(m.children())]


def _small(num_classes: int = 10, **kw) -> BNInception:
    return bn_inception(num_classes, width=0.25, **kw)


def test_table_as_printed_is_inconsistent_exactly_at_4c_4d_4e():
    """The printed columns sum to the printed depths everywhere but 4c, 4d (608) and 4e (1056)."""
    c, sums = 192, {}
    for spec in TABLE:
        c = spec.c1 + spec.c3 + spec.cd + (spec.proj or c)
        sums[spec.name] = c
    off = {n: s for n, s in sums.items() if s != PRINTED[n][0]}
    assert off == {"4c": 608, "4d": 608, "4e": 1056}
    assert set(DEPTH_CONSISTENT_PROJ) == {"4c", "4d"}
    assert all((spec.depth, spec.grid) == PRINTED[spec.name] for spec in TABLE)


def test_width1_224_module_channels_grids_and_output():
    model = bn_inception().eval()
    seen: dict[str, tuple[int, ...]] = {}
    for name, mod in model.inception_modules().items():
        mod.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.shape[1:]))
    stem_out: list[tuple[int, ...]] = []
    model.stem.conv1.register_forward_hook(lambda m, i, o: stem_out.append(o.shape[1:]))
    model.stem.pool1.register_forward_hook(lambda m, i, o: stem_out.append(o.shape[1:]))
    model.stem.register_forward_hook(lambda m, i, o: stem_out.append(o.shape[1:]))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000)
    assert stem_out == [(64, 112, 112), (64, 56, 56), (192, 28, 28)]
    for name, (depth, grid) in PRINTED.items():
        assert seen[name] == (depth, grid, grid), name
        assert model.inception_modules()[name].out_channels == depth
    assert model.head.fc.in_features == model.num_features == 1024


def test_columns_as_printed_gives_608_608_1056():
    model = bn_inception(columns_as_printed=True)
    got = {n: m.out_channels for n, m in model.inception_modules().items()}
    want = {n: d for n, (d, _) in PRINTED.items()} | {"4c": 608, "4d": 608, "4e": 1056}
    assert got == want
    assert model.num_features == 1024  # 5a's widths give 1024 from either input


def test_module_widths_are_the_tables():
    model = bn_inception()
    for spec in TABLE:
        mod = model.inception_modules()[spec.name]
        convs = [m for m in mod.modules() if isinstance(m, nn.Conv2d)]
        widths = [m.out_channels for m in convs]
        proj = DEPTH_CONSISTENT_PROJ.get(spec.name, spec.proj)
        want = [spec.c1] if spec.c1 else []
        want += [spec.r3, spec.c3, spec.rd, spec.cd, spec.cd] + ([proj] if proj else [])
        assert widths == want, spec.name
        assert [m.kernel_size[0] for m in convs[-len(want) :]] == (
            ([1] if spec.c1 else []) + [1, 3, 1, 3, 3] + ([1] if proj else [])
        )
        # the 3×3 branch's conv, then the double branch's two; stride-2 modules stride the last ones
        assert [m.stride[0] for m in convs if m.kernel_size[0] == 3] == [
            spec.stride,
            1,
            spec.stride,
        ]
        pools = [m for m in mod.modules() if isinstance(m, nn.AvgPool2d | nn.MaxPool2d)]
        assert len(pools) == 1 and isinstance(
            pools[0], nn.AvgPool2d if spec.pool == "avg" else nn.MaxPool2d
        )
        assert pools[0].stride in (spec.stride, (spec.stride, spec.stride))


@pytest.mark.parametrize("size", [64, 32, 33, 17])
@pytest.mark.parametrize("num_classes", [1, 10, 1000])
def test_output_shape_small_inputs(size, num_classes):
    model = _small(num_classes).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, num_classes)


def test_output_shape_224_small_width_several_classes():
    for k in (2, 100):
        with torch.no_grad():
            assert _small(k).eval()(torch.randn(1, 3, 224, 224)).shape == (1, k)


def test_parameter_count_vs_paper():
    n = count_parameters(bn_inception())
    print(
        f"\nBN-Inception parameters (width 1, 1000 classes): {n:,}; paper: {PAPER_PARAMETERS:,.0f}"
        f" (ratio {n / PAPER_PARAMETERS:.4f})"
    )
    assert PAPER_PARAMETERS == 13.6e6
    assert n == MEASURED_PARAMETERS
    assert abs(n / PAPER_PARAMETERS - 1) < PAPER_TOLERANCE
    # the table's other readings do not reach the paper's figure either
    assert count_parameters(bn_inception(columns_as_printed=True)) == 11_278_528
    dense = count_parameters(bn_inception(separable_stem=False))
    assert dense - n == 3 * 64 * 49 - (3 * 8 * 49 + 24 * 64)  # 6,696
    assert count_parameters(bn_inception(bn=False)) == 11_178_336


def test_separable_stem():
    conv1 = [m for m in bn_inception(bn=False).stem.conv1 if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.groups) for c in conv1] == [
        (3, 24, (7, 7), (2, 2), 3),
        (24, 64, (1, 1), (1, 1), 1),
    ]
    assert conv1[0].bias is None and conv1[1].bias is not None
    dense = [m for m in bn_inception(separable_stem=False).stem.conv1 if isinstance(m, nn.Conv2d)]
    assert len(dense) == 1 and dense[0].kernel_size == (7, 7) and dense[0].out_channels == 64


@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_bn_before_every_nonlinearity_and_no_conv_bias(activation):
    model = _small(activation=activation)
    leaves = _leaves(model)
    act_type = nn.ReLU if activation == "relu" else nn.Sigmoid
    acts = [i for i, m in enumerate(leaves) if isinstance(m, nn.ReLU | nn.Sigmoid)]
    assert acts and all(isinstance(leaves[i], act_type) for i in acts)
    for i in acts:
        assert type(leaves[i - 1]) is BatchNorm2d, f"{leaves[i]} not preceded by BN"
    convs = [i for i, m in enumerate(leaves) if isinstance(m, nn.Conv2d)]
    assert len(convs) == len(acts) + 1  # + the stem's depthwise conv
    for i in convs:
        conv = leaves[i]
        assert conv.bias is None
        if conv.groups > 1:  # depthwise → pointwise, no nonlinearity between
            assert isinstance(leaves[i + 1], nn.Conv2d) and leaves[i + 1].kernel_size == (1, 1)
        else:
            assert type(leaves[i + 1]) is BatchNorm2d
            assert leaves[i + 1].num_features == conv.out_channels


@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_no_bn_variant_has_biases_and_no_bn(activation):
    model = _small(bn=False, activation=activation)
    assert not any(
        isinstance(m, BatchNormBase | nn.modules.batchnorm._BatchNorm) for m in model.modules()
    )
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is not None for c in convs if c.groups == 1)
    leaves = _leaves(model)
    for i, m in enumerate(leaves):
        if isinstance(m, nn.ReLU | nn.Sigmoid):
            assert isinstance(leaves[i - 1], nn.Conv2d)


def test_sigmoid_variant_has_no_relu():
    model = _small(activation="sigmoid")
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    n_sig = sum(isinstance(m, nn.Sigmoid) for m in model.modules())
    n_relu = sum(isinstance(m, nn.ReLU) for m in _small().modules())
    assert n_sig == n_relu == sum(isinstance(m, BatchNorm2d) for m in model.modules())


def test_lrn_switch():
    assert not any(isinstance(m, nn.LocalResponseNorm) for m in _small().modules())
    stem = _small(lrn=True).stem
    assert list(stem._modules) == [
        "conv1",
        "pool1",
        "lrn1",
        "conv2_reduce",
        "conv2",
        "lrn2",
        "pool2",
    ]
    lrns = [m for m in _small(lrn=True).modules() if isinstance(m, nn.LocalResponseNorm)]
    assert len(lrns) == 2 and all(
        (m.size, m.alpha, m.beta, m.k) == (5, 1e-4, 0.75, 1.0) for m in lrns
    )


def test_dropout_switch():
    assert not any(isinstance(m, nn.Dropout) for m in _small().modules())
    model = _small(dropout=0.4)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 1 and drops[0].p == 0.4
    assert list(model.head._modules)[-2:] == ["dropout", "fc"]
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))
        model.head.dropout.train()
        assert not torch.equal(model(x), model(x))


def test_final_bn_switch():
    assert not any(isinstance(m, BatchNorm1d) for m in _small().modules())
    model = _small(final_bn=True, dropout=0.1)
    assert list(model.head._modules) == ["pool", "flatten", "bn", "dropout", "fc"]
    assert type(model.head.bn) is BatchNorm1d
    assert model.head.bn.num_features == model.num_features == model.head.fc.in_features == 256
    assert bn_inception(final_bn=True).head.bn.num_features == 1024
    model.head.dropout.p = 0.0
    feats = model.head.flatten(model.head.pool(model.blocks(model.stem(torch.randn(8, 3, 32, 32)))))
    z = model.head.bn(feats)  # training mode: per-activation batch statistics
    torch.testing.assert_close(z.mean(0), torch.zeros(256), atol=1e-5, rtol=0)


@pytest.mark.parametrize("bn", [True, False])
def test_training_step_small(bn):
    model = _small(bn=bn, dropout=0.1, final_bn=bn).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    before = [p.detach().clone() for p in model.parameters()]
    loss = nn.functional.cross_entropy(model(x), y)
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_conv_init_scale_doubles_conv_weights():
    torch.manual_seed(3)
    a = _small()
    torch.manual_seed(3)
    b = _small(conv_init_scale=2.0)
    convs_a = [m for m in a.modules() if isinstance(m, nn.Conv2d)]
    convs_b = [m for m in b.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs_a) == len(convs_b) > 0
    for ca, cb in zip(convs_a, convs_b, strict=True):
        torch.testing.assert_close(cb.weight, 2.0 * ca.weight)
        ratio = cb.weight.std() / ca.weight.std()
        assert abs(ratio.item() - 2.0) < 1e-5
    torch.testing.assert_close(a.head.fc.weight, b.head.fc.weight)  # only the convs


def test_width_rounds_and_keeps_at_least_one_channel():
    model = _small()
    assert model.inception_modules()["3a"].out_channels == 16 + 16 + 24 + 8
    tiny = bn_inception(5, width=0.001).eval()
    assert all(m.out_channels >= 1 for m in tiny.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        assert tiny(torch.randn(2, 3, 32, 32)).shape == (2, 5)


@pytest.mark.parametrize(
    "kw",
    [
        {"num_classes": 0},
        {"activation": "tanh"},
        {"dropout": 1.0},
        {"dropout": -0.1},
        {"width": 0.0},
        {"conv_init_scale": 0.0},
    ],
)
def test_bad_arguments(kw):
    with pytest.raises(ValueError):
        bn_inception(**kw)
