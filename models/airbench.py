"""The best one-process recipe: a net after airbench94 (Jordan, "94% on CIFAR-10 in 3.29 seconds on a
single GPU", 2024), written here from the paper's description.

A fixed 2x2 *whitening* convolution first (its 24 filters are the 12 eigenvectors of the covariance of
2x2 patches of training images, scaled by 1/sqrt(eigenvalue), and their negatives; set from data by
``init_from_data`` before training, then never trained), GELU, three groups of conv -> max-pool ->
batch norm -> GELU -> conv -> batch norm -> GELU at widths 64, 256, 256, a 3x3 max-pool and a linear
layer whose logits are scaled by 1/9. Convolutions start as identities on their first channels
(Dirac), batch-norm scales are fixed at 1 (only the shifts train, at 64 times the learning rate:
``ShiftNorm``). The recipe (``models.registry``) adds label smoothing, Nesterov SGD at
batch 1,024, lookahead averaging of the weights, flip-and-shift test-time augmentation, and for one
process airbench's finer points: the lr from 0.2x the peak up to it and down to 0.07x, crops padded
by reflection, flips alternating per epoch, the batch-norm shifts and the whitening bias decayed like
the kernels (``decayed_vectors``) and that bias trained for the first 3 epochs only (``start_epoch``).

Left out of airbench94: the fp16 arithmetic; the test-time shifts pad by repeating the edge
(``models.train.tta_views``), not by reflection. Work units carry the reflection (``hyper.crop_reflect``)
and the alternating flips (``hyper.flip_parity``: each image's coin is a hash of its pixels,
``models.flips``, not a draw per run); the coordinator does the lookahead and the bias freeze
(``coordinator.strategies.wrappers``).
"""
from __future__ import annotations

import torch
from torch import nn

from models.layers import Normalize

WHITEN_IMAGES = 5000   # training images whose 2x2 patches set the whitening filters
WHITEN_EPS = 5e-4      # added to the eigenvalues before the square root
SHIFT_GAIN = 8.0       # batch-norm shifts train as at 8 ** 2 = 64 times the lr (``ShiftNorm``)
WHITEN_BIAS_EPOCHS = 3 # the whitening bias trains for this many epochs, then stays as it is


def _conv(in_ch: int, out_ch: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:in_ch])   # the first in_ch filters pass their input through
    return conv


class ShiftNorm(nn.BatchNorm2d):
    """Batch norm with its scale fixed at 1 and its shift stored divided by ``SHIFT_GAIN``: plain SGD on the
    stored value then moves the shift as SGD at ``SHIFT_GAIN`` ** 2 times the learning rate would (the
    gradient and the step are both multiplied by the gain; with momentum alike, and shifts are not decayed):
    airbench's 64x learning rate for the shifts, with no optimizer setting a work unit would have to carry."""

    def __init__(self, ch: int) -> None:
        super().__init__(ch, momentum=0.4, eps=1e-12, affine=False)
        self.shift = nn.Parameter(torch.zeros(ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + SHIFT_GAIN * self.shift.view(1, -1, 1, 1)


class Group(nn.Module):
    """conv -> pool -> bn -> GELU -> conv -> bn -> GELU; halves the spatial size (rounding down)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(_conv(in_ch, out_ch), nn.MaxPool2d(2), ShiftNorm(out_ch), nn.GELU(),
                                    _conv(out_ch, out_ch), ShiftNorm(out_ch), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class AirbenchNet(nn.Module):
    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (64, 256, 256),
                 logit_scale: float = 1 / 9) -> None:
        super().__init__()
        self.normalize = Normalize()
        self.whiten = nn.Conv2d(3, 24, 2, bias=True)   # 32x32 -> 31x31
        self.whiten.weight.requires_grad_(False)
        with torch.no_grad():
            self.whiten.bias.zero_()
        chans = (24, *widths)
        self.groups = nn.Sequential(*(Group(a, b) for a, b in zip(chans, chans[1:])))   # 31 -> 15 -> 7 -> 3
        self.head = nn.Linear(widths[-1], num_classes, bias=False)
        self.logit_scale = logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(nn.functional.gelu(self.whiten(self.normalize(x))))
        return self.head(x.amax(dim=(2, 3))) * self.logit_scale

    @property
    def decayed_vectors(self) -> list[str]:
        """1-D parameters weight decay applies to (``models.train.make_optimizer``): airbench decays the
        batch-norm shifts and the whitening bias as it does the kernels. A stored shift is the shift over
        ``SHIFT_GAIN``, so decaying it by a fraction decays the shift by the same fraction."""
        return ["whiten.bias"] + [n for n, _ in self.named_parameters() if n.endswith(".shift")]

    # tensors trained for their first epochs only: one process stops training them (``start_epoch``), the
    # coordinator keeps them as they are once that many epochs of samples are folded (``strategies.Freeze``)
    train_epochs = {"whiten.bias": WHITEN_BIAS_EPOCHS}

    def start_epoch(self, epoch: int) -> None:
        """Called by the one-process trainer before epoch ``epoch`` (1-based): the whitening bias trains for
        the first ``WHITEN_BIAS_EPOCHS`` epochs only (``train_epochs``)."""
        for name, epochs in self.train_epochs.items():
            self.get_parameter(name).requires_grad_(epoch <= epochs)

    @torch.no_grad()
    def init_from_data(self, x_u8: torch.Tensor) -> None:
        """Set the whitening filters from the 2x2 patches of (the first ``WHITEN_IMAGES`` of) ``x_u8``
        [N, 3, 32, 32] uint8: deterministic given the images."""
        x = self.normalize(x_u8[:WHITEN_IMAGES].float())
        patches = x.unfold(2, 2, 1).unfold(3, 2, 1)                    # N, 3, 31, 31, 2, 2
        flat = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
        cov = flat.T @ flat / len(flat)
        values, vectors = torch.linalg.eigh(cov)                     # ascending
        filters = (vectors.T / torch.sqrt(values.clamp(min=0) + WHITEN_EPS)[:, None]).flip(0)
        filters = filters.reshape(12, 3, 2, 2).float()
        self.whiten.weight.copy_(torch.cat([filters, -filters]))
