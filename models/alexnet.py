"""AlexNet (Krizhevsky et al., NeurIPS 2012) for 32x32 inputs, and its "physics" variant.

The shape of AlexNet, scaled for CIFAR-10 on a 2-core CPU: five convs (5x5, 5x5, 3x3, 3x3,
3x3; stride 1), a 2x2 max-pool after conv 1, 2 and 5 (32 -> 16 -> 8 -> 4), then three linear
layers with dropout 0.5 before the first two. The channel widths keep AlexNet's ratios
96:256:384:384:256 and the hidden linear width its 4096, all times ``width`` (default 3/8:
36-96-144-144-96 channels, 1536 hidden; a CIFAR-10 epoch took 60-75 s on 2 cores on 2026-11-22 and
210-230 s on 2026-12-03's slower machine, about 85 GFLOP per step of 256). Local
response normalisation is left out (later work found it does not help). No BatchNorm: after a
``PhysicsLayer`` it would subtract the per-channel forces again, so they would never learn.

``physics_alexnet`` follows the "Physics-Driven AlexNet" paper: the same net with every
conv replaced by ``models.layers.PhysicsLayer``. Both come from one class; only the conv
factory differs.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from models.layers import Normalize, PhysicsLayer, conv2d

ALEXNET_CONVS = (96, 256, 384, 384, 256)
ALEXNET_HIDDEN = 4096

ConvFactory = Callable[[int, int, int, int], nn.Module]  # (in_ch, out_ch, kernel_size, padding)


class AlexNet(nn.Sequential):
    def __init__(self, num_classes: int = 10, width: float = 0.375, conv: ConvFactory = conv2d,
                 dropout: float = 0.5) -> None:
        c1, c2, c3, c4, c5 = (max(1, round(c * width)) for c in ALEXNET_CONVS)
        hidden = max(1, round(ALEXNET_HIDDEN * width))
        super().__init__(
            Normalize(),
            conv(3, c1, 5, 2), nn.ReLU(), nn.MaxPool2d(2),
            conv(c1, c2, 5, 2), nn.ReLU(), nn.MaxPool2d(2),
            conv(c2, c3, 3, 1), nn.ReLU(),
            conv(c3, c4, 3, 1), nn.ReLU(),
            conv(c4, c5, 3, 1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Dropout(dropout), nn.Linear(c5 * 4 * 4, hidden), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )
        _init(self)


def _init(model: nn.Module) -> None:
    """He-normal convs with zero biases, default linears, zero logits layer.

    Without BatchNorm, PyTorch's default init left this net at chance on CIFAR-10 (the signal
    fades through five convs); He-sized linears made the first steps overshoot.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)


def alexnet(num_classes: int = 10, width: float = 0.375) -> AlexNet:
    return AlexNet(num_classes, width)


def physics_alexnet(num_classes: int = 10, width: float = 0.375) -> AlexNet:
    return AlexNet(num_classes, width, conv=PhysicsLayer)
