"""Edge-popup supermasks (Ramanujan et al., CVPR 2020, "What's hidden in a randomly weighted
neural network?"), set up as in the thesis on distributed edge-popup that this project follows.

Weights are random and fixed (signed Kaiming constant: sign(u) * sqrt(2 / (k * fan_in)), the
paper's "scaled" variant, so the kept half of a layer preserves the activation variance).
Each weight has a score (Kaiming-uniform init, as in the authors' code); the forward pass keeps
the top-k fraction of a layer's weights by |score| and the backward pass sends the gradient of
the masked weight straight through to the scores. Only scores train: no biases, BatchNorm
without affine parameters. The last layer keeps every weight (k = 1); its scores still get
gradients, but they cannot change its mask.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import Normalize

KEEP = 0.5  # fraction of each hidden layer's weights kept by the mask


def kept(numel: int, k: float) -> int:
    """How many weights a layer keeps: all but floor((1 - k) * numel), as the authors' GetSubnet."""
    return numel - int((1 - k) * numel)


def top_k_mask(magnitude: torch.Tensor, k: float) -> torch.Tensor:
    """1.0 where a value is among the ``kept(numel, k)`` largest of the layer (ties kept), else 0.0."""
    if k >= 1:
        return torch.ones_like(magnitude)
    flat = magnitude.flatten()
    threshold = torch.topk(flat, kept(flat.numel(), k), sorted=False).values.min()  # unsorted: 4x faster
    return (magnitude >= threshold).to(magnitude.dtype)


class _Supermask:
    """Mixin for a layer with a fixed ``weight`` and a trained ``scores`` of the same shape."""

    def init_supermask(self, k: float) -> None:
        self.k = k
        self.weight.requires_grad_(False)
        fan_in = self.weight[0].numel()
        with torch.no_grad():
            self.weight.copy_(self.weight.sign() * math.sqrt(2.0 / (k * fan_in)))
        self.scores = nn.Parameter(torch.empty_like(self.weight))
        nn.init.kaiming_uniform_(self.scores, a=math.sqrt(5))

    def masked_weight(self) -> torch.Tensor:
        # Straight-through through the ranking of |score| (the gradient of |s|, as the authors'
        # GetSubnet on scores.abs()); "+ s - s.detach()" would push negative scores the wrong way.
        a = self.scores.abs()
        return self.weight * (top_k_mask(a.detach(), self.k) + a - a.detach())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}"


class SupermaskLinear(_Supermask, nn.Linear):
    def __init__(self, in_features: int, out_features: int, k: float = KEEP) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.init_supermask(k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight())


class SupermaskConv(_Supermask, nn.Conv2d):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, k: float = KEEP) -> None:
        super().__init__(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False)
        self.init_supermask(k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), None)


class SupermaskFC(nn.Sequential):
    """3072-200-200-200-200-10 with ReLUs: five masked linear layers."""

    def __init__(self, num_classes: int = 10, width: int = 200, depth: int = 5, k: float = KEEP) -> None:
        sizes = [3 * 32 * 32] + [width] * (depth - 1)
        hidden = [m for a, b in zip(sizes, sizes[1:]) for m in (SupermaskLinear(a, b, k), nn.ReLU())]
        super().__init__(Normalize(), nn.Flatten(), *hidden, SupermaskLinear(sizes[-1], num_classes, k=1.0))


def _conv_bn_relu(in_ch: int, out_ch: int, k: float) -> nn.Sequential:
    return nn.Sequential(SupermaskConv(in_ch, out_ch, 3, k), nn.BatchNorm2d(out_ch, affine=False), nn.ReLU())


class Residual(nn.Module):
    """x + two masked conv-bn-relu layers of x (same width)."""

    def __init__(self, ch: int, k: float) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn_relu(ch, ch, k), _conv_bn_relu(ch, ch, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SupermaskConvNet(nn.Sequential):
    """conv -> pool -> residual block, per stage (32 -> 16 -> 8 -> 4), then two masked linears."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (32, 64, 128), hidden: int = 256,
                 k: float = KEEP) -> None:
        stages, prev = [], 3
        for w in widths:
            stages += [_conv_bn_relu(prev, w, k), nn.MaxPool2d(2), Residual(w, k)]
            prev = w
        side = 32 >> len(widths)
        super().__init__(
            Normalize(), *stages, nn.Flatten(),
            SupermaskLinear(prev * side * side, hidden, k), nn.ReLU(),
            SupermaskLinear(hidden, num_classes, k=1.0),
        )
