"""Layers shared by the models: input normalisation and the physics layer.

Every model takes float32 [N, 3, 32, 32] with raw pixel values 0..255 and starts with
``Normalize``, so the trainer, the Python worker and the browser all feed the same tensor.
All models keep to the ops that the whole-step ONNX export handles (make_fx with the
decompositions of the onnx-train-step prototype): stride-1 convolutions, 2x2 max-pooling on
even sizes, BatchNorm, ReLU/GELU, Linear, residual adds, dropout, ``torch.roll``, top-k.
"""
from __future__ import annotations

import torch
from torch import nn

# CIFAR-10 training-split per-channel statistics, in 0..255 pixel units (the usual
# 0..1 values 0.4914, 0.4822, 0.4465 / 0.2470, 0.2435, 0.2616 times 255).
CIFAR10_MEAN = (125.307, 122.961, 113.866)
CIFAR10_STD = (62.993, 62.089, 66.705)


class Normalize(nn.Module):
    """(x - mean) / std per channel; constants, kept out of the state dict (not persistent)."""

    def __init__(self, mean: tuple[float, ...] = CIFAR10_MEAN, std: tuple[float, ...] = CIFAR10_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_std


class PhysicsLayer(nn.Module):
    """A conv plus a learned "force" per output channel coupled to its two channel neighbours.

    Our reading of the Physics-Driven AlexNet layer: output = conv(x) + strength * F, with
    F = f + roll(f, +1) + roll(f, -1) along channels (circular), f a zero-initialised
    [1, C_out, 1, 1] parameter broadcast over batch and space, strength a learnable scalar.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, padding: int = 0, strength: float = 0.1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=padding)
        self.forces = nn.Parameter(torch.zeros(1, out_ch, 1, 1))
        # Non-zero on purpose: d(out)/d(forces) is proportional to strength and d(out)/d(strength)
        # to the forces, so with both at zero neither would ever move.
        self.strength = nn.Parameter(torch.tensor(float(strength)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.forces
        return self.conv(x) + self.strength * (f + f.roll(1, dims=1) + f.roll(-1, dims=1))


def conv2d(in_ch: int, out_ch: int, kernel_size: int, padding: int = 0) -> nn.Module:
    """The plain conv factory (stride 1, with bias); ``PhysicsLayer`` has the same signature."""
    return nn.Conv2d(in_ch, out_ch, kernel_size, padding=padding)

