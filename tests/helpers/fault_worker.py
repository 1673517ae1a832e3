"""A test worker driven by a ``Fault``: computes a unit honestly, then breaks the result on purpose.

Faults come from here, never from copies of production code: the honest path is the
worker's own ``worker_py.unit.run_unit``, and the faults are hooks on its input (the labels
given to ``run_unit``: ``compute``) or on its result (``body``). Two kinds:

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
import enum
import zlib
from dataclasses import dataclass, field
from statistics import NormalDist
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
    # well-formed lies (Byzantine workers), accepted at the boundary
    SIGN_FLIP = "sign_flip"        # the honest delta x -10
    SCALE = "scale"                # the honest delta x 10
    NOISE = "noise"                # Gaussian noise in place of the delta, 10x its per-element RMS
    FREE_RIDE = "free_ride"        # a zero delta, claiming every sample the unit holds
    LABEL_FLIP = "label_flip"      # honest training on labels (y + 1) mod 10 (``compute``'s data hook)
    REPLAY = "replay"              # the delta of this worker's first unit, sent again (``FaultWorker``)
    A_LITTLE = "a_little"          # colluding: mean - z std of honest deltas ("a little is enough", FaultWorker)


LIE_FACTOR = 10.0   # SIGN_FLIP, SCALE and NOISE: ten times the honest scale
NUM_CLASSES = 10


def compute(unit: WorkUnit, fetch: Callable[[str], bytes], worker_id: str, fault: Fault = Fault.NONE) -> UnitResult:
    """The honest result of ``unit``; ``fetch(blob_id)`` returns a blob's bytes. ``Fault.LABEL_FLIP``
    trains on labels shifted by one class (the data given to ``run_unit``); other faults act in ``body``."""
    base = decode_delta(fetch(unit.model_version))
    xs, ys = zip(*(decode_shard(fetch(s)) for s in unit.shard_ids))
    y = np.concatenate(ys)
    if fault is Fault.LABEL_FLIP:
        y = flip_labels(y)
    return run_unit(unit, base, np.concatenate(xs), y, worker_id)


def flip_labels(y: np.ndarray) -> np.ndarray:
    """Every label moved to the next class: ``(y + 1) mod 10`` (same dtype)."""
    return ((y.astype(np.int64) + 1) % NUM_CLASSES).astype(y.dtype)


def lie(delta: dict[str, np.ndarray], fault: Fault, seed: int = 0) -> dict[str, np.ndarray]:
    """The delta a ``SIGN_FLIP``, ``SCALE``, ``NOISE`` or ``FREE_RIDE`` worker sends instead of ``delta``
    (float32; ``seed`` draws the noise)."""
    if fault is Fault.SIGN_FLIP:
        return {k: (-LIE_FACTOR * v).astype(np.float32) for k, v in delta.items()}
    if fault is Fault.SCALE:
        return {k: (LIE_FACTOR * v).astype(np.float32) for k, v in delta.items()}
    if fault is Fault.FREE_RIDE:
        return {k: np.zeros_like(v, np.float32) for k, v in delta.items()}
    if fault is Fault.NOISE:
        rng = np.random.default_rng(seed)
        size = sum(v.size for v in delta.values())
        rms = np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in delta.values()) / max(size, 1))
        return {k: (LIE_FACTOR * rms * rng.standard_normal(v.shape)).astype(np.float32) for k, v in delta.items()}
    raise ValueError(f"{fault}: not a change of one delta")


def a_little_z(n: int, m: int) -> float:
    """How many standard deviations a colluder may shift and still look honest, for ``m`` colluders
    among ``n`` workers: Baruch, Baruch, Goldberg, "A Little Is Enough: Circumventing Defenses For
    Distributed Learning", NeurIPS 2019 (s = floor(n/2 + 1) - m; z = Phi^-1((n - s) / n))."""
    s = n // 2 + 1 - m
    return NormalDist().inv_cdf((n - s) / n)


def a_little(deltas: list[dict[str, np.ndarray]], z: float) -> dict[str, np.ndarray]:
    """Per coordinate, ``mean - z x std`` of ``deltas`` (two or more honest deltas): a small shift
    inside the honest spread, the same for every colluder."""
    if len(deltas) < 2:
        raise ValueError("a_little needs two or more honest deltas to estimate their spread")
    out = {}
    for k in deltas[0]:
        stack = np.stack([np.asarray(d[k], np.float64) for d in deltas])
        out[k] = (stack.mean(axis=0) - z * stack.std(axis=0, ddof=1)).astype(np.float32)
    return out


@dataclass
class Collusion:
    """Colluding ``A_LITTLE`` workers share the honest deltas they computed; each sends ``a_little``
    of the newest ``window`` of them."""

    z: float
    window: int = 8
    honest: list[dict[str, np.ndarray]] = field(default_factory=list)


@dataclass
class FaultWorker:
    """A worker with memory for faults that need it: ``REPLAY`` keeps its first delta, ``A_LITTLE``
    shares with its ``Collusion``. Any other fault is ``compute`` + ``body``'s change of the delta."""

    worker_id: str
    fault: Fault = Fault.NONE
    collusion: Collusion | None = None
    first: UnitResult | None = None       # REPLAY: the one unit it computed

    def result(self, unit: WorkUnit, fetch: Callable[[str], bytes]) -> UnitResult:
        """The result this worker sends for ``unit`` (its delta encoded fp32 when it lies)."""
        if self.fault is Fault.REPLAY and self.first is not None:   # no training: the old delta again
            claim = unit.local_steps * unit.batch_size
            return dataclasses.replace(self.first, unit_id=unit.unit_id, lease=unit.lease,
                                       base_version=unit.model_version, num_samples=claim)
        honest = compute(unit, fetch, self.worker_id, self.fault)
        if self.fault in (Fault.NONE, Fault.LABEL_FLIP):
            return honest
        if self.fault is Fault.REPLAY:
            self.first = honest
            return honest
        delta = decode_delta(honest.delta)
        if self.fault is Fault.A_LITTLE:
            pool = self.collusion or Collusion(z=a_little_z(3, 1))
            self.collusion = pool
            pool.honest.append(delta)
            if len(pool.honest) < 2:   # alone so far: a second honest run (another seed) shows the spread
                other = compute(dataclasses.replace(unit, seed=(unit.seed + 1) % 2**31), fetch, self.worker_id)
                pool.honest.append(decode_delta(other.delta))
            lied = a_little(pool.honest[-pool.window:], pool.z)
        else:
            lied = lie(delta, self.fault, unit.seed)
        return dataclasses.replace(honest, delta=encode_delta(get_codec("fp32"), lied))


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
    else:   # SIGN_FLIP, SCALE, NOISE, FREE_RIDE: an accepted lie
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
