"""ResNet-18 and MobileNetV3-Small as torchvision builds them (the same layers, widths, strides,
activations and squeeze-excitation), written out here so the benchmark needs no torchvision: the
whole-model table of ``run.py`` measures BN's share of a real training step on them.

Every conv → BN (→ activation) sits in an ``nn.Sequential`` as in torchvision's
``Conv2dNormActivation``, except ResNet's basic block, whose BN layers are wired in ``forward``
with one shared ReLU (as torchvision's ``BasicBlock``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def conv_bn(
    cin: int,
    cout: int,
    k: int,
    stride: int = 1,
    groups: int = 1,
    act: Callable[[], nn.Module] | None = None,
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


# ------------------------------------------------------------------ ResNet-18
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def resnet18(num_classes: int = 1000) -> nn.Module:
    layers: list[nn.Module] = [
        conv_bn(3, 64, 7, 2, act=lambda: nn.ReLU(inplace=True)),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


# ------------------------------------------------------------------ MobileNetV3-Small
def _divisible(v: float, d: int = 8) -> int:
    new = max(d, int(v + d / 2) // d * d)
    return new + d if new < 0.9 * v else new


class SqueezeExcitation(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        squeeze = _divisible(c // 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.relu = nn.Conv2d(c, squeeze, 1), nn.ReLU()
        self.fc2, self.gate = nn.Conv2d(squeeze, c, 1), nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


class InvertedResidual(nn.Module):
    def __init__(
        self, cin: int, k: int, exp: int, cout: int, se: bool, act: str, stride: int
    ) -> None:
        super().__init__()
        a = nn.Hardswish if act == "HS" else nn.ReLU
        layers: list[nn.Module] = []
        if exp != cin:
            layers.append(conv_bn(cin, exp, 1, act=a))
        layers.append(conv_bn(exp, exp, k, stride, groups=exp, act=a))
        if se:
            layers.append(SqueezeExcitation(exp))
        layers.append(conv_bn(exp, cout, 1))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


_SMALL = [  # kernel, expanded, out, SE, activation, stride (torchvision's mobilenet_v3_small)
    (3, 16, 16, True, "RE", 2),
    (3, 72, 24, False, "RE", 2),
    (3, 88, 24, False, "RE", 1),
    (5, 96, 40, True, "HS", 2),
    (5, 240, 40, True, "HS", 1),
    (5, 240, 40, True, "HS", 1),
    (5, 120, 48, True, "HS", 1),
    (5, 144, 48, True, "HS", 1),
    (5, 288, 96, True, "HS", 2),
    (5, 576, 96, True, "HS", 1),
    (5, 576, 96, True, "HS", 1),
]


def mobilenet_v3_small(num_classes: int = 1000) -> nn.Module:
    layers: list[nn.Module] = [conv_bn(3, 16, 3, 2, act=nn.Hardswish)]
    cin = 16
    for k, exp, cout, se, act, stride in _SMALL:
        layers.append(InvertedResidual(cin, k, exp, cout, se, act, stride))
        cin = cout
    layers += [
        conv_bn(cin, 576, 1, act=nn.Hardswish),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(576, 1024),
        nn.Hardswish(),
        nn.Dropout(0.2),
        nn.Linear(1024, num_classes),
    ]
    return nn.Sequential(*layers)


NETS = {"resnet18": resnet18, "mobilenet_v3_small": mobilenet_v3_small}
