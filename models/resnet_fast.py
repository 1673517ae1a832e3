"""The project's default: a small fast-training ResNet in the style of the DAWNBench ResNet-9
(Page, "How to train your ResNet", 2018), hlb-CIFAR10 and airbench (Jordan, 2024).

conv-bn-act stem, then per stage conv -> pool -> bn -> act -> conv -> bn -> act with a
residual add around the second conv, a global max-pool and a linear layer whose logits are
scaled down (by 1/8, Page's trick that lets the high learning rate work). GELU as in
airbench. Widths (24, 48, 96, 192) instead of Page's (64, 128, 256, 512), for a 2-core CPU
(~60 s per CIFAR-10 epoch with channels_last); airbench's whitening stem and 2x2 convs are
left out (they do not keep even sizes for the 2x2 pools).
"""
from __future__ import annotations

import torch
from torch import nn

from models.layers import Normalize


def _conv(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)


class Block(nn.Module):
    """conv -> pool -> bn -> act, then x + (conv -> bn -> act)(x); halves the spatial size."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.down = nn.Sequential(_conv(in_ch, out_ch), nn.MaxPool2d(2), nn.BatchNorm2d(out_ch), nn.GELU())
        self.body = nn.Sequential(_conv(out_ch, out_ch), nn.BatchNorm2d(out_ch), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        return x + self.body(x)


class ResNetFast(nn.Module):
    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (24, 48, 96, 192),
                 logit_scale: float = 0.125) -> None:
        super().__init__()
        stem, *stages = widths
        self.stem = nn.Sequential(Normalize(), _conv(3, stem), nn.BatchNorm2d(stem), nn.GELU())
        self.blocks = nn.Sequential(*(Block(a, b) for a, b in zip(widths, stages)))
        self.head = nn.Linear(widths[-1], num_classes, bias=False)
        self.logit_scale = logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(x.amax(dim=(2, 3))) * self.logit_scale
