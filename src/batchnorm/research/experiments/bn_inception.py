"""BN-Inception: the Inception variant of Ioffe & Szegedy (2015), as the paper's appendix gives it.

Source: arXiv 1502.03167, Appendix "Variant of the Inception Model Used", Figure 5 ("Inception
architecture"), and Section 4.2 for the text around it. Section 4.2 states the size:

    "The network contains 13.6·10^6 parameters, and, other than the top softmax layer, has no
    fully-connected layers."  (Section 4.2, first paragraph)

The table (224×224 input; r = 1×1 reduce width, "double" = two stacked 3×3 convs that replace
GoogLeNet's 5×5; all "same"-padded; ``|`` separates the branches that are concatenated)::

    layer          stride  out (paper)     1×1 | 1×1 r→3×3 | 1×1 r→3×3→3×3 | pool → proj
    conv*  7×7      2      112×112×64      (separable: depthwise 7×7, multiplier 8, then 1×1→64)
    max pool 3×3    2       56×56×64
    conv 1×1, 3×3   1       56×56×192      1×1→64 then 3×3→192 (one table row)
    max pool 3×3    2       28×28×192
    inception 3a    1       28×28×256       64 |  64→64  |  64→96→96   | avg → 32
    inception 3b    1       28×28×320       64 |  64→96  |  64→96→96   | avg → 64
    inception 3c    2       28×28×576 †      – | 128→160 |  64→96→96   | max, pass-through
    inception 4a    1       14×14×576      224 |  64→96  |  96→128→128 | avg → 128
    inception 4b    1       14×14×576      192 |  96→128 |  96→128→128 | avg → 128
    inception 4c    1       14×14×576      160 | 128→160 | 128→160→160 | avg → 128 ‡
    inception 4d    1       14×14×576       96 | 128→192 | 160→192→192 | avg → 128 ‡
    inception 4e    2       14×14×1024 †     – | 128→192 | 192→256→256 | max, pass-through
    inception 5a    1        7×7×1024      352 | 192→320 | 160→224→224 | avg → 128
    inception 5b    1        7×7×1024      352 | 192→320 | 192→224→224 | max → 128
    avg pool 7×7    1        1×1×1024
    linear → softmax         1000          (the only fully-connected layer)

† The stride-2 modules' "output size" entries give their *input* grid (28, 14); their output is
  14×14 and 7×7, as the next rows' sizes show. This file builds 14×14 and 7×7.

‡ The table disagrees with itself here: its columns sum to 160+160+160+128 = 608 for 4c and
  96+192+192+128 = 608 for 4d, and then 4e = 192+256+608 = 1056, while its depth column says 576,
  576 and 1024 (and 5a's widths fit a 1024-channel input either way). Google's own re-implementation
  of this paper (TF-slim ``nets/inception_v2.py``, "Inception v2 ... as described in
  arxiv.org/abs/1502.03167") has pool projections of 96 in 4c and 4d, so every printed depth holds
  (576, 576, 1024). That reading is the default here; ``columns_as_printed=True`` builds the
  printed 128s instead (608, 608, 1056), which is what the Caffe ports (TSN's BNInception and
  Cadene's ``bninception``) do.

What the paper specifies and what this file does:

- BN (``bn=True``) goes after every convolution, before its nonlinearity, "in a convolutional
  way" (Section 3.2 and 4.2); the convolution then has no bias (β subsumes it). ``bn=False`` is
  the plain "Inception" baseline: biased convolutions, no BN.
- ``activation``: ReLU (the paper's nets) or sigmoid (BN-x5-Sigmoid) for every nonlinearity.
- "Our model employed separable convolution with depth multiplier 8 on the first convolutional
  layer" (Appendix): a depthwise 7×7/2 conv giving 3·8 = 24 maps, then a 1×1 conv to 64, with
  BN and the nonlinearity after the 1×1 only (``separable_stem=True``, the default;
  ``separable_stem=False`` builds a dense 7×7 conv, as GoogLeNet and the Caffe ports have).
- The 28×28 inception modules are three (3a, 3b, 3c); 3c and 4e reduce the grid with stride-2
  convs/pooling inside the module, "before the filter concatenation"; there are no pooling layers
  between modules.
- Global average pooling, dropout and one linear layer (softmax in the loss).

Choices the paper leaves open, and why:

- Initialization: not given. Convs get He-normal N(0, 2/fan_in) for ReLU nets and Glorot-normal
  for sigmoid nets (as ``models.InceptionNet``), except the stem's depthwise conv, which feeds a
  linear 1×1 conv and gets N(0, 1/fan_in) (sigmoid nets: Glorot); conv biases 0; the classifier
  keeps PyTorch's default; BN starts at γ = 1, β = 0. ``conv_init_scale`` multiplies every conv
  weight after that ("increased initial weights in the convolutional layers", Section 4.2.3).
- LRN (``lrn=True``): the paper only says Inception has LRN and BN-x5 removes it (Section 4.2.1).
  It goes where GoogLeNet has it: after the first max pool, and after the 3×3 conv's
  nonlinearity before the second max pool; size 5, α = 1e-4, β = 0.75, k = 1 (GoogLeNet's Caffe
  values; PyTorch divides α by the size, as Caffe does).
- Pooling arithmetic: every stride-2 max pool is 3×3 with padding 1, floor mode. At 224 it gives
  the table's 56, 28, 14, 7; at any input size it gives the same grid as the stride-2 3×3
  convs (padding 1) it is concatenated with. ``ceil_mode=True`` without padding (the Caffe ports)
  also gives 14 and 7 at 224 but a grid one smaller than the conv branch on odd sizes
  (7 → 3 against 4), which breaks the concatenation for small inputs.
- In-module average pools are 3×3, stride 1, padding 1, not counting the padding (TensorFlow's
  "SAME" average); the 5b max pool is 3×3, stride 1, padding 1.
- The final "avg pool 7×7/1" is an adaptive average over the whole map: identical at 224
  (7×7 map), and it works for smaller inputs (64×64 gives 2×2, 32×32 gives 1×1 maps).
- Dropout (``dropout``; Inception 0.4, BN-x5/x30 0, ensemble members 0.05 or 0.1) goes on the
  pooled features, before the linear layer (GoogLeNet's place for it); no module when 0.
- ``final_bn``: the ensemble's "non-convolutional, per-activation Batch Normalization with last
  hidden layers" read as a BatchNorm1d on the pooled 1024 features, before dropout and the
  classifier. (The phrase could also mean per-position BN inside 5b; this file does not build
  that.)
- No auxiliary classifiers: the table has none, and Section 4.2 says there are no
  fully-connected layers other than the top softmax.
- ``width`` multiplies every channel count, rounded (half to even) and at least 1; the depthwise
  multiplier 8 stays fixed. At 1.0 every count is the table's (4c/4d's projections as in ‡).

Parameter count (1000 classes, width 1; ``count_parameters``, pinned in
``tests/test_bn_inception.py``): 11,188,288 with the defaults (10,143,384 in convs, 19,904 BN
γ/β, 1,025,000 in the classifier), i.e. 17.7% under the paper's 13.6·10^6. No reading of the
table closes the gap: ``columns_as_printed=True`` gives 11,278,528, a dense first layer adds
6,696 (the separable one saves that much, it cannot explain millions), ``bn=False`` gives
11,178,336. GoogLeNet-style auxiliary classifiers (which Section 4.2 rules out: no fully-connected
layers but the top one) would add 3,197,160 each: 14.4·10^6 with one, 17.6·10^6 with two. The
paper does not say what its 13.6·10^6 counts; Google's TF-slim ``inception_v2``, built from this
paper, has the same layers as this file, so about the same count (it differs in details
such as 1001 classes and BN without γ).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...layers import BatchNorm1d, BatchNorm2d

PAPER_PARAMETERS = 13.6e6
"""Section 4.2: "The network contains 13.6·10^6 parameters" (arXiv 1502.03167)."""

ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}


@dataclass(frozen=True)
class ModuleSpec:
    """One inception row of Figure 5; ``proj == 0`` means pass-through (stride-2 modules)."""

    name: str
    c1: int  # #1×1 (0: no 1×1 branch)
    r3: int  # #3×3 reduce
    c3: int  # #3×3
    rd: int  # double #3×3 reduce
    cd: int  # double #3×3 (both convs)
    pool: str  # "avg" or "max"
    proj: int  # Pool+proj width; 0: pass-through
    stride: int
    depth: int  # the table's printed output depth
    grid: int  # this module's output grid at 224×224 (the table's, corrected for 3c and 4e)


TABLE: tuple[ModuleSpec, ...] = (
    ModuleSpec("3a", 64, 64, 64, 64, 96, "avg", 32, 1, 256, 28),
    ModuleSpec("3b", 64, 64, 96, 64, 96, "avg", 64, 1, 320, 28),
    ModuleSpec("3c", 0, 128, 160, 64, 96, "max", 0, 2, 576, 14),
    ModuleSpec("4a", 224, 64, 96, 96, 128, "avg", 128, 1, 576, 14),
    ModuleSpec("4b", 192, 96, 128, 96, 128, "avg", 128, 1, 576, 14),
    ModuleSpec("4c", 160, 128, 160, 128, 160, "avg", 128, 1, 576, 14),
    ModuleSpec("4d", 96, 128, 192, 160, 192, "avg", 128, 1, 576, 14),
    ModuleSpec("4e", 0, 128, 192, 192, 256, "max", 0, 2, 1024, 7),
    ModuleSpec("5a", 352, 192, 320, 160, 224, "avg", 128, 1, 1024, 7),
    ModuleSpec("5b", 352, 192, 320, 192, 224, "max", 128, 1, 1024, 7),
)
"""Figure 5's inception rows as printed (``proj`` of 4c and 4d: the printed 128)."""

DEPTH_CONSISTENT_PROJ = {"4c": 96, "4d": 96}
"""Pool projections that make 4c, 4d and 4e's printed depths hold (TF-slim's inception_v2)."""

STEM_DEPTHWISE_MULTIPLIER = 8


def _act(name: str) -> nn.Module:
    return ACTIVATIONS[name]()


def _lrn() -> nn.LocalResponseNorm:
    """GoogLeNet's LRN: 5 channels, α = 1e-4 (divided by 5 inside, as in Caffe), β = 0.75, k = 1."""
    return nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)


def conv_bn_act(
    c_in: int, c_out: int, k: int, *, stride: int = 1, bn: bool, activation: str
) -> nn.Sequential:
    """conv k×k (padding k//2) → [BN] → nonlinearity; the conv has a bias only without BN."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=not bn)
    ]
    if bn:
        layers.append(BatchNorm2d(c_out))
    layers.append(_act(activation))
    return nn.Sequential(*layers)


class InceptionModule(nn.Module):
    """Branches 1×1 | 1×1→3×3 | 1×1→3×3→3×3 | pool[→1×1], concatenated on channels.

    With ``stride == 2`` the last conv of the 3×3 and double-3×3 branches has stride 2, the pool
    branch is a 3×3/2 max pool passed through unprojected, and there is no 1×1 branch.
    """

    def __init__(
        self,
        c_in: int,
        spec: ModuleSpec,
        proj: int,
        w: Callable[[int], int],
        *,
        bn: bool,
        activation: str,
    ) -> None:
        super().__init__()
        s = spec.stride
        if s not in (1, 2) or (s == 2) != (proj == 0) or (s == 2 and spec.c1):
            raise ValueError(f"inconsistent inception spec {spec}")

        def unit(a: int, b: int, k: int, stride: int = 1) -> nn.Sequential:
            return conv_bn_act(a, b, k, stride=stride, bn=bn, activation=activation)

        self.branch_1x1 = unit(c_in, w(spec.c1), 1) if spec.c1 else None
        self.branch_3x3 = nn.Sequential(
            unit(c_in, w(spec.r3), 1), unit(w(spec.r3), w(spec.c3), 3, s)
        )
        self.branch_double = nn.Sequential(
            unit(c_in, w(spec.rd), 1),
            unit(w(spec.rd), w(spec.cd), 3),
            unit(w(spec.cd), w(spec.cd), 3, s),
        )
        if spec.pool == "avg":
            pool: nn.Module = nn.AvgPool2d(3, stride=s, padding=1, count_include_pad=False)
        elif spec.pool == "max":
            pool = nn.MaxPool2d(3, stride=s, padding=1)
        else:
            raise ValueError(f"pool must be 'avg' or 'max', got {spec.pool!r}")
        self.branch_pool = nn.Sequential(pool, unit(c_in, w(proj), 1)) if proj else pool
        c_pool = w(proj) if proj else c_in
        self.out_channels = (w(spec.c1) if spec.c1 else 0) + w(spec.c3) + w(spec.cd) + c_pool
        self.stride = s

    def forward(self, x: Tensor) -> Tensor:
        outs = [self.branch_3x3(x), self.branch_double(x), self.branch_pool(x)]
        if self.branch_1x1 is not None:
            outs.insert(0, self.branch_1x1(x))
        return torch.cat(outs, dim=1)


class BNInception(nn.Module):
    """BN-Inception of arXiv 1502.03167's appendix (see the module docstring); ``stem`` →
    ``blocks`` (named ``inception_3a`` … ``inception_5b``) → ``head``. Input (N, 3, H, W),
    output logits (N, num_classes).

    The paper's nets: Inception = ``bn=False, lrn=True, dropout=0.4``; BN-Baseline =
    ``bn=True, lrn=True, dropout=0.4``; BN-x5 / BN-x30 = ``bn=True`` (no LRN, no dropout);
    BN-x5-Sigmoid adds ``activation="sigmoid"``; ensemble members add some of
    ``conv_init_scale > 1``, ``dropout`` 0.05 or 0.1 and ``final_bn=True``.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        *,
        bn: bool = True,
        activation: str = "relu",
        lrn: bool = False,
        dropout: float = 0.0,
        width: float = 1.0,
        final_bn: bool = False,
        conv_init_scale: float = 1.0,
        separable_stem: bool = True,
        columns_as_printed: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width!r}")
        if not conv_init_scale > 0:
            raise ValueError(f"conv_init_scale must be > 0, got {conv_init_scale!r}")

        def w(c: int) -> int:
            return max(1, round(c * width))

        def unit(a: int, b: int, k: int) -> nn.Sequential:
            return conv_bn_act(a, b, k, bn=bn, activation=activation)

        stem: OrderedDict[str, nn.Module] = OrderedDict()
        if separable_stem:  # depthwise 7×7/2 (×8) → pointwise 1×1 → [BN] → act
            mid = 3 * STEM_DEPTHWISE_MULTIPLIER
            conv1: list[nn.Module] = [
                nn.Conv2d(3, mid, 7, stride=2, padding=3, groups=3, bias=False),
                nn.Conv2d(mid, w(64), 1, bias=not bn),
            ]
        else:
            conv1 = [nn.Conv2d(3, w(64), 7, stride=2, padding=3, bias=not bn)]
        conv1 += [BatchNorm2d(w(64))] if bn else []
        stem["conv1"] = nn.Sequential(*conv1, _act(activation))  # 112×112
        stem["pool1"] = nn.MaxPool2d(3, stride=2, padding=1)  # 56×56
        if lrn:
            stem["lrn1"] = _lrn()
        stem["conv2_reduce"] = unit(w(64), w(64), 1)
        stem["conv2"] = unit(w(64), w(192), 3)
        if lrn:
            stem["lrn2"] = _lrn()
        stem["pool2"] = nn.MaxPool2d(3, stride=2, padding=1)  # 28×28
        self.stem = nn.Sequential(stem)

        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        c = w(192)
        for spec in TABLE:
            proj = (
                spec.proj if columns_as_printed else DEPTH_CONSISTENT_PROJ.get(spec.name, spec.proj)
            )
            block = InceptionModule(c, spec, proj, w, bn=bn, activation=activation)
            blocks[f"inception_{spec.name}"] = block
            c = block.out_channels
        self.blocks = nn.Sequential(blocks)
        self.num_features = c

        head: OrderedDict[str, nn.Module] = OrderedDict()
        head["pool"] = nn.AdaptiveAvgPool2d(1)
        head["flatten"] = nn.Flatten()
        if final_bn:
            head["bn"] = BatchNorm1d(c)
        if dropout > 0:
            head["dropout"] = nn.Dropout(dropout)
        head["fc"] = nn.Linear(c, num_classes)
        self.head = nn.Sequential(head)

        self._init_convs(activation, conv_init_scale)

    def _init_convs(self, activation: str, scale: float) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if activation == "sigmoid":
                    nn.init.xavier_normal_(m.weight)
                elif m.groups > 1:  # the stem's depthwise conv: a linear layer
                    nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
                else:
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if scale != 1.0:
                    with torch.no_grad():
                        m.weight.mul_(scale)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def inception_modules(self) -> OrderedDict[str, InceptionModule]:
        """``{"3a": module, ..., "5b": module}``."""
        return OrderedDict(
            (n.removeprefix("inception_"), m)
            for n, m in self.blocks.named_children()
            if isinstance(m, InceptionModule)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


bn_inception = BNInception  # the builder the experiments call; one signature, the class's


def count_parameters(model: nn.Module) -> int:
    """Number of scalars in ``model.parameters()`` (weights, biases, BN's γ and β; not the
    running statistics, which are buffers)."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "BNInception",
    "DEPTH_CONSISTENT_PROJ",
    "InceptionModule",
    "ModuleSpec",
    "PAPER_PARAMETERS",
    "TABLE",
    "bn_inception",
    "count_parameters",
]
