"""A test worker driven by a ``Fault``: computes a unit honestly, then breaks the result on purpose.

Faults come from here, never from copies of production code: the honest path is the
worker's own ``worker_py.unit.run_unit``, and the faults are hooks on its result (``body``).
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Callable

import numpy as np

from contract.codecs import decode_delta, encode_delta, get_codec
from contract.shards import decode_shard
from contract.units import UnitResult, WorkUnit, pack_result
from worker_py.unit import run_unit


class Fault(enum.Enum):
    NONE = "none"
    NAN = "nan"                    # a NaN in the delta
    WRONG_SHAPE = "wrong_shape"    # one tensor with a different shape
    HUGE_NORM = "huge_norm"        # a finite delta far above any sane norm
    FORGED_LEASE = "forged_lease"  # a lease the coordinator never signed
    OTHER_WORKER = "other_worker"  # a valid lease, submitted under another worker id
    WRONG_BASE = "wrong_base"      # claims another base version
    TRUNCATED = "truncated"        # the body cut short
    GARBAGE = "garbage"            # not a result body at all


def compute(unit: WorkUnit, fetch: Callable[[str], bytes], worker_id: str) -> UnitResult:
    """The honest result of ``unit``; ``fetch(blob_id)`` returns a blob's bytes."""
    base = decode_delta(fetch(unit.model_version))
    xs, ys = zip(*(decode_shard(fetch(s)) for s in unit.shard_ids))
    return run_unit(unit, base, np.concatenate(xs), np.concatenate(ys), worker_id)


def body(result: UnitResult, fault: Fault = Fault.NONE) -> bytes:
    """The wire body of ``result``, broken as ``fault`` says."""
    if fault in (Fault.NONE, Fault.TRUNCATED, Fault.GARBAGE):
        raw = pack_result(result)
        return {Fault.NONE: raw, Fault.TRUNCATED: raw[:len(raw) // 2], Fault.GARBAGE: b"not a result"}[fault]
    delta = decode_delta(result.delta)
    name = next(iter(delta))
    changes: dict = {}
    if fault is Fault.NAN:
        delta[name].flat[0] = np.nan
        changes["delta"] = _raw_fp32(delta)
    elif fault is Fault.WRONG_SHAPE:
        delta[name] = np.zeros(delta[name].size + 1, np.float32)
        changes["delta"] = encode_delta(get_codec("fp32"), delta)
    elif fault is Fault.HUGE_NORM:
        delta[name] = np.full_like(delta[name], 1e6)
        changes["delta"] = encode_delta(get_codec("fp32"), delta)
    elif fault is Fault.FORGED_LEASE:
        changes["lease"] = result.lease[:-8] + "deadbeef"
    elif fault is Fault.OTHER_WORKER:
        changes["worker_id"] = "someone-else"
    elif fault is Fault.WRONG_BASE:
        changes["base_version"] = "0" * 64
    return pack_result(dataclasses.replace(result, **changes))


def _raw_fp32(delta: dict[str, np.ndarray]) -> bytes:
    """An fp32 container holding non-finite values (the encoder refuses them, so patch the bytes)."""
    clean = {k: np.nan_to_num(v, nan=12345.0) for k, v in delta.items()}
    raw = bytearray(encode_delta(get_codec("fp32"), clean))
    marker = np.float32(12345.0).tobytes()
    pos = bytes(raw).find(marker)
    raw[pos:pos + 4] = np.float32(np.nan).tobytes()
    return bytes(raw)
