"""Models of the convolutional experiments, each with and without Batch Normalization.

BN goes on Wx, before the nonlinearity, and the conv/linear bias is dropped where BN follows
(β subsumes it; paper Section 3.2). Layers are ``batchnorm.BatchNorm1d/2d``, this package's
drop-ins for ``torch.nn``.

- ``LeNet``: the seed-003 LeNet-BN study (conv 6 → conv 16 → FC 120 → FC 84 → FC 10) for 28×28.
- ``InceptionNet``: a small Inception-style net (1×1, 3×3, double-3×3 and pool branches) for the
  Section 4.2 ablation, with BN / ReLU-or-sigmoid / LRN / dropout switches.
- ``DeepMLP``: a deep plain fully-connected net for the claims (learning rate, init, depth).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ...layers import BatchNorm1d, BatchNorm2d, BatchNormBase

ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


def _check_prob(name: str, p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p!r}")


def conv_unit(c_in: int, c_out: int, k: int, bn: bool, activation: str = "relu") -> nn.Sequential:
    """conv k×k ('same' padding) → [BN] → nonlinearity; no conv bias when BN follows."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=not bn)]
    if bn:
        layers.append(BatchNorm2d(c_out))
    layers.append(_activation(activation))
    return nn.Sequential(*layers)


def fc_unit(f_in: int, f_out: int, bn: bool, activation: str = "relu") -> nn.Sequential:
    """linear → [BN] → nonlinearity; no linear bias when BN follows."""
    layers: list[nn.Module] = [nn.Linear(f_in, f_out, bias=not bn)]
    if bn:
        layers.append(BatchNorm1d(f_out))
    layers.append(_activation(activation))
    return nn.Sequential(*layers)


class LeNet(nn.Module):
    """LeNet for (N, 1, 28, 28): conv 3×3→6, pool, conv 3×3→16, pool, FC 120, FC 84, FC 10.

    ``bn`` adds BN after both convs and both hidden FC layers (before ReLU); ``dropout`` is applied
    after each hidden FC block. Returns logits (N, 10).
    """

    def __init__(self, bn: bool = False, dropout: float = 0.0, num_classes: int = 10) -> None:
        super().__init__()
        _check_prob("dropout", dropout)
        self.bn = bn
        conv = [nn.Conv2d(1, 6, 3, bias=not bn)]  # (N, 6, 26, 26)
        conv += [BatchNorm2d(6)] if bn else []
        conv += [nn.ReLU(), nn.MaxPool2d(2)]  # (N, 6, 13, 13)
        conv += [nn.Conv2d(6, 16, 3, bias=not bn)]  # (N, 16, 11, 11)
        conv += [BatchNorm2d(16)] if bn else []
        conv += [nn.ReLU(), nn.MaxPool2d(2)]  # (N, 16, 5, 5)
        self.features = nn.Sequential(*conv)
        self.classifier = nn.Sequential(
            nn.Flatten(),  # (N, 400)
            fc_unit(16 * 5 * 5, 120, bn),
            nn.Dropout(dropout),
            fc_unit(120, 84, bn),
            nn.Dropout(dropout),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class InceptionBlock(nn.Module):
    """Four branches concatenated on channels: 1×1 | 1×1→3×3 | 1×1→3×3→3×3 | avgpool 3×3→1×1.

    The double-3×3 branch replaces GoogLeNet's 5×5, as in the BN paper's Inception variant.
    """

    def __init__(
        self,
        c_in: int,
        c1: int,
        r3: int,
        c3: int,
        rd: int,
        cd: int,
        cp: int,
        bn: bool,
        activation: str,
    ) -> None:
        super().__init__()
        self.b1 = conv_unit(c_in, c1, 1, bn, activation)
        self.b3 = nn.Sequential(
            conv_unit(c_in, r3, 1, bn, activation), conv_unit(r3, c3, 3, bn, activation)
        )
        self.bd = nn.Sequential(
            conv_unit(c_in, rd, 1, bn, activation),
            conv_unit(rd, cd, 3, bn, activation),
            conv_unit(cd, cd, 3, bn, activation),
        )
        self.bp = nn.Sequential(
            nn.AvgPool2d(3, stride=1, padding=1), conv_unit(c_in, cp, 1, bn, activation)
        )
        self.out_channels = c1 + c3 + cd + cp

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.bd(x), self.bp(x)], dim=1)


class InceptionNet(nn.Module):
    """A small Inception-style net for (N, 1, 28, 28) → logits (N, 10).

    stem conv 3×3 → [LRN] → maxpool (14×14) → 2 inception blocks → maxpool (7×7) → 2 blocks →
    global average pool → [dropout] → FC. ``width`` scales every channel count.
    """

    def __init__(
        self,
        bn: bool = False,
        activation: str = "relu",
        lrn: bool = False,
        dropout: float = 0.0,
        width: int = 8,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        _check_prob("dropout", dropout)
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        w = width
        stem: list[nn.Module] = [conv_unit(1, 4 * w, 3, bn, activation)]  # (N, 4w, 28, 28)
        stem += [nn.LocalResponseNorm(5)] if lrn else []
        stem += [nn.MaxPool2d(2)]  # (N, 4w, 14, 14)
        self.stem = nn.Sequential(*stem)
        blocks: list[nn.Module] = []
        c = 4 * w
        for i, spec in enumerate(
            [(2, 2, 2, 1, 2, 2), (2, 3, 4, 2, 3, 3), (3, 3, 4, 2, 3, 2), (4, 4, 4, 2, 3, 3)]
        ):
            block = InceptionBlock(c, *(s * w for s in spec), bn=bn, activation=activation)
            blocks.append(block)
            c = block.out_channels
            if i == 1:
                blocks.append(nn.MaxPool2d(2))  # (N, c, 7, 7)
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c, num_classes)
        )

        for (
            m
        ) in self.modules():  # He init for ReLU, Glorot for sigmoid (torch's default is smaller)
            if isinstance(m, nn.Conv2d):
                if activation == "relu":
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                else:
                    nn.init.xavier_normal_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


class DeepMLP(nn.Module):
    """``depth`` hidden layers of ``width`` units (linear → [BN] → act → [dropout]) and a linear output.

    ``init_scale`` multiplies a standard init of the weights: N(0, gain²/fan_in), gain √2 for ReLU
    (He) and 1 for sigmoid (LeCun); biases start at 0.
    """

    def __init__(
        self,
        in_features: int = 784,
        width: int = 100,
        depth: int = 10,
        activation: str = "relu",
        bn: bool = False,
        dropout: float = 0.0,
        init_scale: float = 1.0,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        _check_prob("dropout", dropout)
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        if not (isinstance(init_scale, int | float) and init_scale > 0):
            raise ValueError(f"init_scale must be > 0, got {init_scale!r}")
        layers: list[nn.Module] = [nn.Flatten()]
        f = in_features
        for _ in range(depth):
            layers.append(fc_unit(f, width, bn, activation))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            f = width
        layers.append(nn.Linear(f, num_classes))
        self.net = nn.Sequential(*layers)
        gain = math.sqrt(2.0) if activation == "relu" else 1.0
        for m in self.net.modules():
            if isinstance(m, nn.Linear):
                g = 1.0 if m.out_features == num_classes and m is layers[-1] else gain
                nn.init.normal_(m.weight, 0.0, init_scale * g / math.sqrt(m.in_features))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def hidden_linears(self) -> list[nn.Linear]:
        """The hidden layers' linear maps, input side first (for per-layer gradient norms)."""
        return [m for m in self.net.modules() if isinstance(m, nn.Linear)][:-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def count_bn_layers(model: nn.Module) -> int:
    """Number of BN layers (this package's or torch's) in ``model``."""
    return sum(
        isinstance(m, nn.modules.batchnorm._BatchNorm | BatchNormBase) for m in model.modules()
    )


BN_IMPLS = ("batchnorm", "torch")


def with_bn_impl(build: Callable[[], nn.Module], name: str) -> Callable[[], nn.Module]:
    """``build``, whose model uses ``torch.nn.BatchNorm*`` instead when ``name == "torch"``
    (the experiments' control: the same net on PyTorch's own layers)."""
    if name not in BN_IMPLS:
        raise ValueError(f"bn_impl must be one of {BN_IMPLS}, got {name!r}")
    if name != "torch":
        return build

    def converted() -> nn.Module:
        from ...tools import convert_model

        return convert_model(build(), to="torch")

    return converted
