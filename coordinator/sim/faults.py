"""Lying workers' faults: the one definition shared by the simulator and the tests' attack workers.

A lying worker computes its unit honestly (the worker's own ``worker_py.unit.run_unit``) and
then changes what it sends; a ``Liar`` holds the memory some faults need (``REPLAY``'s first
result, ``A_LITTLE``'s accomplices). How the honest result is computed is the caller's:
``tests/helpers/fault_worker.py`` fetches blobs and calls ``run_unit``; the simulator
(``coordinator/sim/engine.py``, a scenario's ``[liars]``) uses its cached shards and model.
The faults that make a malformed body (``NAN`` ... ``GARBAGE``) are the tests' alone
(``tests.helpers.fault_worker.body``); the well-formed lies (``LIES``) are here.

    liar = Liar("w3", Fault.SIGN_FLIP)
    result = liar.result(unit, honest)     # honest(unit, flip_labels: bool) -> UnitResult
"""
from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

from contract.codecs import decode_delta, encode_delta, get_codec
from contract.units import UnitResult, WorkUnit
from coordinator.trust import Tolerance


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
    LABEL_FLIP = "label_flip"      # honest training on labels (y + 1) mod 10 (the honest computation's data)
    REPLAY = "replay"              # the delta of this worker's first unit, sent again (a ``Liar`` remembers it)
    A_LITTLE = "a_little"          # colluding: mean - z std of honest deltas ("a little is enough", a ``Liar``)
    BAND = "band"                  # the honest delta turned by an angle into the check's inconclusive band


# The well-formed lies: accepted at the boundary, for the defences behind it to catch.
LIES = (Fault.SIGN_FLIP, Fault.SCALE, Fault.NOISE, Fault.FREE_RIDE, Fault.LABEL_FLIP, Fault.REPLAY, Fault.A_LITTLE,
        Fault.BAND)
LIE_FACTOR = 10.0   # SIGN_FLIP, SCALE and NOISE: ten times the honest scale
# BAND: the cosine of its lie with the honest delta, the middle of the dense check's inconclusive band (between
# refuted and agreeing: coordinator.trust.Tolerance), its norm the honest one's: a liar that knows the tolerance
BAND_COSINE = (Tolerance().refute_cosine + Tolerance().min_cosine) / 2
NUM_CLASSES = 10


def flip_labels(y: np.ndarray) -> np.ndarray:
    """Every label moved to the next class: ``(y + 1) mod 10`` (same dtype)."""
    return ((y.astype(np.int64) + 1) % NUM_CLASSES).astype(y.dtype)


def lie(delta: dict[str, np.ndarray], fault: Fault, seed: int = 0) -> dict[str, np.ndarray]:
    """The delta a ``SIGN_FLIP``, ``SCALE``, ``NOISE``, ``FREE_RIDE`` or ``BAND`` worker sends instead of ``delta``
    (float32; ``seed`` draws the noise)."""
    if fault is Fault.BAND:
        return turned(delta, BAND_COSINE, seed)
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


def turned(delta: dict[str, np.ndarray], cosine: float, seed: int = 0) -> dict[str, np.ndarray]:
    """Each tensor of ``delta`` turned by the angle whose cosine is ``cosine``, towards a random direction
    orthogonal to it (``seed``), its norm kept: every tensor, and so every sum of them (the weights', the
    running statistics'), has that cosine with the honest one and the same norm. A tensor that cannot turn (zero,
    or of one element) is sent as it is. (float32)"""
    rng, sine = np.random.default_rng(seed), math.sqrt(max(0.0, 1.0 - cosine * cosine))
    out = {}
    for name, value in delta.items():
        d = np.asarray(value, np.float64)
        noise = rng.standard_normal(d.shape)
        dd = float(np.sum(d * d))
        if dd > 0.0:
            noise -= float(np.sum(noise * d)) / dd * d
        nn = float(np.sqrt(np.sum(noise * noise)))
        if dd == 0.0 or nn <= 1e-12 * math.sqrt(dd):
            out[name] = d.astype(np.float32)
        else:
            out[name] = (cosine * d + sine * math.sqrt(dd) / nn * noise).astype(np.float32)
    return out


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


Honest = Callable[[WorkUnit, bool], UnitResult]   # (unit, flip labels) -> the honest result of that unit


@dataclass
class Liar:
    """A worker id and its fault, with the memory faults need: ``REPLAY`` keeps its first result,
    ``A_LITTLE`` shares with its ``Collusion`` (one of its own when none is given)."""

    worker_id: str
    fault: Fault = Fault.NONE
    collusion: Collusion | None = None
    first: UnitResult | None = None       # REPLAY: the one unit it computed
    honest_first: int = 0                 # results computed honestly before it lies (a turncoat earns trust first)
    sent: int = 0                         # results made so far

    def result(self, unit: WorkUnit, honest: Honest) -> UnitResult:
        """The result this worker sends for ``unit`` (its delta encoded fp32 when it changes it);
        ``honest(unit, flip)`` computes a unit honestly, on labels shifted by one class when ``flip``."""
        self.sent += 1
        if self.sent <= self.honest_first:
            return honest(unit, False)
        if self.fault is Fault.REPLAY and self.first is not None:   # no training: the old delta again
            claim = unit.local_steps * unit.batch_size
            return dataclasses.replace(self.first, unit_id=unit.unit_id, lease=unit.lease,
                                       base_version=unit.model_version, num_samples=claim)
        computed = honest(unit, self.fault is Fault.LABEL_FLIP)
        if self.fault in (Fault.NONE, Fault.LABEL_FLIP):
            return computed
        if self.fault is Fault.REPLAY:
            self.first = computed
            return computed
        delta = decode_delta(computed.delta)
        if self.fault is Fault.A_LITTLE:
            pool = self.collusion or Collusion(z=a_little_z(3, 1))
            self.collusion = pool
            pool.honest.append(delta)
            if len(pool.honest) < 2:   # alone so far: a second honest run (another seed) shows the spread
                other = honest(dataclasses.replace(unit, seed=(unit.seed + 1) % 2**31), False)
                pool.honest.append(decode_delta(other.delta))
            lied = a_little(pool.honest[-pool.window:], pool.z)
        elif self.fault in (Fault.SIGN_FLIP, Fault.SCALE, Fault.NOISE, Fault.FREE_RIDE, Fault.BAND):
            lied = lie(delta, self.fault, unit.seed)
        else:
            raise ValueError(f"{self.fault}: not a well-formed lie (tests.helpers.fault_worker.body makes those)")
        return dataclasses.replace(computed, delta=encode_delta(get_codec("fp32"), lied))
