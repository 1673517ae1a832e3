"""Batch-level augmentation with plain torch tensor ops (no torchvision).

Shared by the single-process trainer, the Python worker and the simulator, so a work unit
with a given seed sees the same crops and flips wherever it runs. The random draws come from
a CPU generator whatever device the images are on (a GPU included), so a seed gives the same
crops and flips on every device.
"""
from __future__ import annotations

import torch


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator, reflect: bool = False) -> torch.Tensor:
    """Pad ``x`` [N, C, H, W] by ``pad`` pixels (zeros, or with ``reflect`` the edges mirrored) and cut one
    random HxW window per image."""
    if pad == 0:
        return x
    n, c, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect" if reflect else "constant")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(n, c, h, w + 2 * pad)
    xp = xp.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(n, c, h, w)
    return xp.gather(3, cols)


def mirror(x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """``x`` [N, C, H, W] with the images ``which`` (bool [N]) mirrored left-right."""
    return torch.where(which.to(x.device)[:, None, None, None], x.flip(3), x)


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    return mirror(x, torch.rand(x.shape[0], generator=gen) < 0.5)


def augment(x_u8: torch.Tensor, pad: int, flip: bool, gen: torch.Generator, reflect: bool = False) -> torch.Tensor:
    """uint8 images [N, 3, 32, 32] -> augmented float32 in 0..255 (models normalise inside)."""
    x = random_crop(x_u8, pad, gen, reflect)
    if flip:
        x = random_flip(x, gen)
    return x.float()
