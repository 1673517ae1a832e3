"""Version deltas: a model version sent as the difference from one the worker already holds.

A worker names the model versions it holds in ``UnitRequest.held`` (their blob ids: the blobs
it downloaded or reconstructed). The coordinator may then cut the unit from a *reconstruction*
``R = held + dequantised(Q(version - held))``, computed in float32 exactly as the worker will,
and send ``WorkUnit.base_delta = {"from": <held blob id>, "blob": <version delta blob id>}``;
``model_version`` is then the blob id of ``R`` as an fp32 ``CTD1`` container, which the worker
checks after reconstructing (``reconstruct``). The delta the worker returns is relative to
``R``. docs/protocol.md ("Version deltas") is the spec.

A version delta blob is a zlib stream (RFC 1950; a browser's ``DecompressionStream("deflate")``)
of a ``CTD1`` container with the held version's tensors (any codec; the coordinator writes
``int8``). Standard library and numpy only.
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Mapping

import numpy as np

from contract.codecs import CODECS, DTYPE, MAGIC, MAX_HEADER_BYTES, Arrays, decode_delta, encode_delta, padding, spec_of
from contract.errors import ContractError, Said
from contract.units import MAX_HELD, blob_id  # noqa: F401  (MAX_HELD: the request's bound)

STEPS_PER_RMS = 2.0     # the coordinator's quantiser: a tensor's step is its difference's RMS / this
ZLIB_LEVEL = 3          # 3% larger than level 6 at a fifth of the time (coordinator CPU per unit)
FP32 = CODECS["fp32"]


def version_blob(state: Arrays) -> bytes:
    """A model version as it is served and hashed: the fp32 ``CTD1`` container of its tensors."""
    return encode_delta(FP32, state)


def max_inflated(held: Arrays) -> int:
    """The most bytes a version delta against ``held`` may inflate to: an fp32 container of it."""
    return 8 + MAX_HEADER_BYTES + 4 + sum(4 * int(np.size(v)) + 4 for v in held.values())


def inflate(data: bytes, limit: int) -> bytes:
    """The zlib stream ``data`` inflated, refusing more than ``limit`` bytes (a zip bomb) and
    anything that is not one whole zlib stream."""
    try:
        z = zlib.decompressobj()
        out = z.decompress(bytes(data), limit + 1)
        complete = z.eof and not z.unused_data
    except zlib.error as e:
        raise ContractError("version_delta", "a zlib stream", Said(str(e)[:60])) from None
    if len(out) > limit:
        raise ContractError("version_delta", f"at most {limit} bytes inflated", Said("more"))
    if not complete:
        raise ContractError("version_delta", "one complete zlib stream", Said("truncated or trailing bytes"))
    return out


def quantise(diff: np.ndarray, steps_per_rms: float = STEPS_PER_RMS) -> np.ndarray:
    """The int8 container payload values for one tensor's difference: a float32 step of
    max(RMS / steps_per_rms, max|d| / 127) (so nothing is clipped), q = round_half_even(d / step)."""
    flat = np.ascontiguousarray(diff, np.float32).reshape(-1)
    if flat.size == 0:
        return np.float32(0), np.zeros(0, np.int8)
    peak = np.float32(np.abs(flat).max())
    rms = np.float32(math.sqrt(float(np.dot(flat.astype(np.float64), flat.astype(np.float64))) / flat.size))
    scale = np.float32(max(rms / np.float32(steps_per_rms), peak / np.float32(127)))
    if not scale > 0:
        return np.float32(0), np.zeros(flat.size, np.int8)
    q = np.clip(np.rint(flat / scale), -127, 127).astype(np.int8)
    return scale, q


def _int8_container(tensors: dict[str, tuple[tuple[int, ...], np.float32, np.ndarray]]) -> bytes:
    """A ``CTD1`` int8 container with the given (shape, scale, q) per tensor (encode_delta picks
    its own scale; the int8 decoder takes any finite scale >= 0)."""
    entries = [{"name": n, "shape": [int(d) for d in shape], "dtype": DTYPE} for n, (shape, _, _) in tensors.items()]
    head = json.dumps({"codec": "int8", "tensors": entries}, separators=(",", ":")).encode("utf-8")
    parts = [struct.pack("<4sI", MAGIC, len(head)), head, bytes(padding(8 + len(head)))]
    for _, scale, q in tensors.values():
        payload = np.array([scale], "<f4").tobytes() + q.tobytes()
        parts += [payload, bytes(padding(len(payload)))]
    return b"".join(parts)


def make_version_delta(held: Arrays, target: Arrays, steps_per_rms: float = STEPS_PER_RMS,
                       level: int = ZLIB_LEVEL) -> tuple[bytes, dict[str, np.ndarray]]:
    """(version delta blob, reconstruction) taking ``held`` towards ``target`` (same tensors):
    what the coordinator sends, and exactly what ``reconstruct`` will give the worker (the int8
    decoder's ``float32(q) * scale``, added to ``held`` in float32)."""
    if set(held) != set(target):
        raise ContractError("version_delta", "the held version's tensors", Said("other tensors"))
    tensors, recon = {}, {}
    for name, value in target.items():
        t = np.asarray(value, np.float32)
        h = np.asarray(held[name], np.float32)
        if h.shape != t.shape:
            raise ContractError(f"version_delta.tensors[{name}].shape", str(list(h.shape)), list(t.shape))
        scale, q = quantise(t - h, steps_per_rms)
        tensors[name] = (t.shape, scale, q)
        recon[name] = np.add(h, (q.astype(np.float32) * np.float32(scale)).reshape(t.shape), dtype=np.float32)
    return zlib.compress(_int8_container(tensors), level), recon


def reconstruct(held: Arrays, blob: bytes) -> dict[str, np.ndarray]:
    """``held`` plus the version delta ``blob``, added in float32, in the delta's tensor order.
    Raises ``ContractError`` for a malformed blob or one whose tensors are not ``held``'s."""
    if not isinstance(held, Mapping) or not held:
        raise ContractError("version_delta.from", "a held model version", Said("none"))
    delta = decode_delta(inflate(blob, max_inflated(held)), spec_of(held))
    with np.errstate(over="ignore", invalid="ignore"):
        out = {name: np.add(np.asarray(held[name], np.float32), d, dtype=np.float32) for name, d in delta.items()}
    for name, value in out.items():
        if not np.isfinite(value).all():
            raise ContractError(f"version_delta.tensors[{name}]", "finite sums", Said("an overflow"))
    return out


def reconstruct_checked(held: Arrays, blob: bytes, want: str) -> dict[str, np.ndarray]:
    """``reconstruct``, then the check: the fp32 container of the result must hash to ``want``
    (the unit's ``model_version``); ``ContractError("unit.model_version")`` otherwise."""
    state = reconstruct(held, blob)
    got = blob_id(version_blob(state))
    if got != want:
        raise ContractError("unit.model_version", f"the reconstruction's hash {want[:12]}...",
                            Said(f"{got[:12]}... (the held version is not the one named, or the delta is corrupt)"))
    return state
