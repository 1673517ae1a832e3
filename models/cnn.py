"""The baseline CNN of the "Physics-Driven AlexNet" comparison (it reports 70.0% on CIFAR-10).

The paper does not spell its CNN out; we use the classic small CIFAR-10 CNN of the Keras
example ``cifar10_cnn.py``: conv32-conv32-pool-dropout-conv64-conv64-pool-dropout-fc512-
dropout-fc10, all 3x3 convs with ReLU. One change: every conv pads by 1 (Keras leaves the
second conv of each pair unpadded), so both pools see even sizes (32 -> 16 -> 8).
"""
from __future__ import annotations

from torch import nn

from models.layers import Normalize


def _conv_relu(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.ReLU()]


class SimpleCNN(nn.Sequential):
    def __init__(self, num_classes: int = 10, dropout: tuple[float, float] = (0.25, 0.5)) -> None:
        super().__init__(
            Normalize(),
            *_conv_relu(3, 32), *_conv_relu(32, 32), nn.MaxPool2d(2), nn.Dropout(dropout[0]),
            *_conv_relu(32, 64), *_conv_relu(64, 64), nn.MaxPool2d(2), nn.Dropout(dropout[0]),
            nn.Flatten(), nn.Linear(64 * 8 * 8, 512), nn.ReLU(), nn.Dropout(dropout[1]),
            nn.Linear(512, num_classes),
        )
