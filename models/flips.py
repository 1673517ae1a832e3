"""Alternating flips for work units: each image's own fair coin, from its pixels (numpy only).

airbench's alternating flips (one process: ``models.train.alternate_flips``, a coin drawn per image
once per run) mirror an image in every other epoch. A work unit cannot hold a per-run table of
50,000 coins, and its images come by shard or by slice, so a unit's coin is a hash of the image
itself: whichever worker trains it, in whichever unit, the same image gets the same coin. A unit
with ``hyper.flip_parity`` (0 or 1, the epoch's parity) mirrors image i when ``coin_i xor parity``;
worker_web/draw.js ``imageCoin`` computes the same coins (tests/golden/browser_draw.json).
"""
from __future__ import annotations

import numpy as np

_M32 = 0xFFFFFFFF
IMAGE_BYTES = 3 * 32 * 32
# byte k of an image (C, H, W order) counts (k + 1) x 2654435761 mod 2^32 times in its hash
_WEIGHTS = (np.arange(1, IMAGE_BYTES + 1, dtype=np.uint64) * 2654435761) & _M32
# the same weights as their high and low 16 bits, for an exact float64 product (sums < 2^36 < 2^53)
_HALVES = np.stack([_WEIGHTS >> 16, _WEIGHTS & 0xFFFF], axis=1).astype(np.float64)


def _mix32(h: np.ndarray) -> np.ndarray:
    """Wellons' lowbias32 integer mixer, on uint64 arrays holding 32-bit values."""
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _M32
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & _M32
    return h ^ (h >> 16)


def image_coins(x_u8: np.ndarray) -> np.ndarray:
    """Each image's coin (bool per image of uint8 ``x_u8`` [N, 3, 32, 32]): the top bit of
    lowbias32(sum over bytes k of byte_k x weight_k mod 2^32)."""
    flat = np.asarray(x_u8)
    if flat.dtype != np.uint8 or flat.size != len(flat) * IMAGE_BYTES:
        raise ValueError(f"image coins: expected uint8 images of {IMAGE_BYTES} bytes, got {flat.dtype} "
                         f"{tuple(flat.shape)}")
    hi, lo = (flat.reshape(len(flat), IMAGE_BYTES).astype(np.float64) @ _HALVES).astype(np.uint64).T
    return (_mix32(((hi << 16) + lo) & _M32) >> 31).astype(bool)


def mirrors(x_u8: np.ndarray, parity: int) -> np.ndarray:
    """Which images a unit with ``hyper.flip_parity`` = ``parity`` mirrors: coin xor parity."""
    return image_coins(x_u8) ^ bool(parity)
