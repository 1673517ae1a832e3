"""A test worker driven by a ``Fault``: computes a unit honestly, then breaks the result on purpose.

Faults come from here, never from copies of production code: the honest path is the
worker's own ``worker_py.unit.run_unit``, and the faults are hooks on its input (the labels
given to ``run_unit``: ``compute``) or on its result (``body``). The ``Fault`` enum and the
well-formed lies are defined once in ``coordinator/sim/faults.py`` (the simulator's ``[liars]``
use the same code) and re-exported here. Two kinds:

- a malformed or forged result the coordinator must refuse (``NAN`` ... ``GARBAGE``);
- a well-formed lie it accepts, for robust aggregation (issue 11): ``SIGN_FLIP``, ``SCALE``,
  ``NOISE``, ``FREE_RIDE``, ``LABEL_FLIP``, and, with memory or accomplices (``FaultWorker``),
  ``REPLAY`` and ``A_LITTLE``.

    result = compute(unit, fetch, "w1", Fault.LABEL_FLIP)    # honest training on shifted labels
    data = body(compute(unit, fetch, "w1"), Fault.SIGN_FLIP)  # the honest delta x -10
    worker = FaultWorker("w2", Fault.REPLAY); data = pack_result(worker.result(unit, fetch))
"""
from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from contract.codecs import decode_delta, encode_delta, get_codec
from contract.shards import decode_shard
from contract.units import UnitResult, WorkUnit, pack_result
from coordinator.sim.faults import (  # noqa: F401  (the one definition of the faults, re-exported)
    LIE_FACTOR,
    LIES,
    NUM_CLASSES,
    Collusion,
    Fault,
    Liar,
    a_little,
    a_little_z,
    flip_labels,
    lie,
)
from worker_py.unit import run_unit


def compute(unit: WorkUnit, fetch: Callable[[str], bytes], worker_id: str, fault: Fault = Fault.NONE) -> UnitResult:
    """The honest result of ``unit``; ``fetch(blob_id)`` returns a blob's bytes. ``Fault.LABEL_FLIP``
    trains on labels shifted by one class (the data given to ``run_unit``); other faults act in ``body``."""
    base = decode_delta(fetch(unit.model_version))
    xs, ys = zip(*(decode_shard(fetch(s)) for s in unit.shard_ids))
    y = np.concatenate(ys)
    if fault is Fault.LABEL_FLIP:
        y = flip_labels(y)
    return run_unit(unit, base, np.concatenate(xs), y, worker_id)


@dataclass
class FaultWorker(Liar):
    """A ``Liar`` (coordinator/sim/faults.py) that computes its units from the coordinator's blobs:
    ``result(unit, fetch)``, ``fetch(blob_id)`` returning a blob's bytes."""

    def result(self, unit: WorkUnit, fetch: Callable[[str], bytes]) -> UnitResult:  # type: ignore[override]
        """The result this worker sends for ``unit`` (its delta encoded fp32 when it lies)."""
        return super().result(unit, lambda u, flip: compute(u, fetch, self.worker_id,
                                                             Fault.LABEL_FLIP if flip else Fault.NONE))


def body(result: UnitResult, fault: Fault = Fault.NONE) -> bytes:
    """The wire body of ``result``, broken as ``fault`` says (``LABEL_FLIP`` is made in ``compute``;
    ``REPLAY`` and ``A_LITTLE`` need a ``FaultWorker``)."""
    if fault in (Fault.NONE, Fault.TRUNCATED, Fault.GARBAGE, Fault.LABEL_FLIP):
        raw = pack_result(result)
        return {Fault.TRUNCATED: raw[:len(raw) // 2], Fault.GARBAGE: b"not a result"}.get(fault, raw)
    if fault in (Fault.REPLAY, Fault.A_LITTLE):
        raise ValueError(f"{fault}: needs a FaultWorker (it remembers or colludes)")
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
    else:   # SIGN_FLIP, SCALE, NOISE, FREE_RIDE, BAND: an accepted lie
        changes["delta"] = encode_delta(get_codec("fp32"), lie(delta, fault, seed=zlib.crc32(result.unit_id.encode())))
    return pack_result(dataclasses.replace(result, **changes))


def _raw_fp32(delta: dict[str, np.ndarray]) -> bytes:
    """An fp32 container holding non-finite values (the encoder refuses them, so patch the bytes)."""
    clean = {k: np.nan_to_num(v, nan=12345.0) for k, v in delta.items()}
    raw = bytearray(encode_delta(get_codec("fp32"), clean))
    marker = np.float32(12345.0).tobytes()
    pos = bytes(raw).find(marker)
    raw[pos:pos + 4] = np.float32(np.nan).tobytes()
    return bytes(raw)
