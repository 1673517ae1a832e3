"""Data shard blobs: a slice of the training split as a worker downloads it.

Layout (little-endian), chosen so a browser can view it without copying:

    offset 0   4 bytes   magic "CTS1"
    offset 4   uint32    n, the number of images
    offset 8   uint32    height, offset 12 uint32 width (32, 32 for CIFAR-10)
    offset 16  n*3*h*w   uint8 pixels, NCHW (RGB planes), row-major
    then       n         uint8 labels (0..9)

The total length is exactly 16 + n*(3*h*w + 1). Imports only the standard library and numpy.
"""
from __future__ import annotations

import struct

import numpy as np

from contract.errors import ContractError

MAGIC = b"CTS1"
MAX_IMAGES = 1 << 20
NUM_CLASSES = 10
_HEAD = struct.Struct("<4sIII")


def encode_shard(x: np.ndarray, y: np.ndarray) -> bytes:
    """uint8 images [n, 3, h, w] and labels [n] -> shard bytes."""
    x, y = np.ascontiguousarray(x, dtype=np.uint8), np.ascontiguousarray(y, dtype=np.uint8)
    if x.ndim != 4 or x.shape[1] != 3 or len(y) != len(x):
        raise ValueError(f"shard: expected images [n, 3, h, w] and n labels, got {x.shape} and {y.shape}")
    return _HEAD.pack(MAGIC, len(x), x.shape[2], x.shape[3]) + x.tobytes() + y.tobytes()


def decode_shard(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Shard bytes -> (uint8 images [n, 3, h, w], int64 labels [n]); ContractError on malformed input."""
    if len(data) < _HEAD.size:
        raise ContractError("shard", f"at least {_HEAD.size} bytes", f"{len(data)} bytes")
    magic, n, h, w = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise ContractError("shard.magic", "CTS1", magic)
    if not (1 <= n <= MAX_IMAGES and 1 <= h <= 1024 and 1 <= w <= 1024):
        raise ContractError("shard.shape", f"1..{MAX_IMAGES} images of at most 1024x1024", (n, h, w))
    size = _HEAD.size + n * (3 * h * w + 1)
    if len(data) != size:
        raise ContractError("shard", f"exactly {size} bytes for {n} images of {h}x{w}", f"{len(data)} bytes")
    pixels = np.frombuffer(data, np.uint8, n * 3 * h * w, _HEAD.size).reshape(n, 3, h, w)
    labels = np.frombuffer(data, np.uint8, n, _HEAD.size + n * 3 * h * w)
    if labels.max(initial=0) >= NUM_CLASSES:
        raise ContractError("shard.labels", f"labels in 0..{NUM_CLASSES - 1}", int(labels.max()))
    return pixels, labels.astype(np.int64)
