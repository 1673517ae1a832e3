"""The intake: checks a submitted result at the boundary and turns it into an accepted update.

Every check a result must pass before anything reaches the strategy, in one place and in
this order: the body parses (``contract.units.unpack_result``); it names a unit this
coordinator issued; it answers that unit (``contract.units.check_result``: same id and
lease, trained from the unit's base, no more samples than the unit holds) under the worker
the lease was signed for; it is not a duplicate; the lease has not ended; the delta decodes
against the model's spec; its norm and staleness are within the configured policy. A
refusal is a ``Rejection`` (code, HTTP status, field, message, and what becomes of the unit);
a worker's report that the unit failed is a ``Failure``; a result for a unit whose second
copy already delivered is ``Superseded``; a result that passes is ``Accepted``.
Nothing here writes to the store.
"""
from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from contract.codecs import decode_delta_norm
from contract.errors import ContractError
from contract.units import UnitResult, WorkUnit, check_result, staleness, unpack_result
from coordinator import leases
from coordinator.config import CoordinatorConfig
from coordinator.store import Store
from models.state_names import is_running_stat


class Rejection(Exception):
    """A refused request: an error code and HTTP status from docs/protocol.md, and the field.
    ``give_up``: the unit's new status when the refusal also ends the unit (its shards go back)."""

    def __init__(self, code: str, status: int, message: str, field: str = "", give_up: str | None = None):
        super().__init__(message)
        self.code, self.status, self.message, self.field, self.give_up = code, status, message, field, give_up

    def body(self) -> dict:
        return {"error": {"code": self.code, "field": self.field, "message": self.message}}


def contract_rejection(e: ContractError) -> Rejection:
    code = e.code if e.code in ("invalid", "unsupported_protocol") else "invalid"
    return Rejection(code, 400, e.message, e.field)


@dataclass(frozen=True)
class Failure:
    """The worker reports that it could not compute the unit (or hands it back)."""

    unit: dict
    result: UnitResult

    @property
    def status(self) -> str:
        return "returned" if self.result.error.startswith("returned") else "failed"


@dataclass(frozen=True)
class Superseded:
    """A result for a unit whose second copy delivered first: answered politely, dropped."""

    unit: dict
    result: UnitResult


@dataclass(frozen=True)
class Accepted:
    """A result that passed every check: the unit's row, the result, its decoded delta."""

    unit: dict
    result: UnitResult
    delta: dict[str, np.ndarray]
    staleness: int
    late: bool
    norm: float | None = None    # the delta's global L2 norm (summed in the decode's pass)


ISSUED_KEPT = 4096   # units this process issued, kept parsed until their result (or evicted oldest first)
STALE_WINDOW = 256   # the last results' staleness, whose median sets the cap of ``--stale-median``
STALE_WARM = 32      # ... once this many have arrived (before: ``--max-staleness`` alone)


class Intake:
    def __init__(self, config: CoordinatorConfig, store: Store, key: bytes, spec: dict, clock):
        self.config, self.store, self.key, self.spec, self.clock = config, store, key, spec, clock
        self._issued: OrderedDict[str, WorkUnit] = OrderedDict()
        self._arrived: deque[int] = deque(maxlen=STALE_WINDOW)   # staleness of the last results (not replicas)
        self._arrived_lock = threading.Lock()   # ``accept`` runs in threads

    def arrived(self, stale: int) -> None:
        """A result (not a replica) arrived this stale: it counts in ``stale_cap``'s median."""
        with self._arrived_lock:
            self._arrived.append(stale)

    def stale_cap(self) -> int | None:
        """The staleness a result may have: ``max_staleness``, and with ``stale_median`` at most that factor
        times the median staleness of the last ``STALE_WINDOW`` results to arrive (refused ones included:
        it is the fleet's spread, not what got through), never below ``stale_floor``. In memory and per process
        (several processes on Redis: each its own window of the results it takes); a restart starts again from
        ``max_staleness`` alone for ``STALE_WARM`` results."""
        cfg = self.config
        if cfg.stale_median is None:
            return cfg.max_staleness
        with self._arrived_lock:
            arrived = sorted(self._arrived)
        if len(arrived) < STALE_WARM:
            return cfg.max_staleness
        median = arrived[len(arrived) // 2]
        cap = max(cfg.stale_floor, math.ceil(cfg.stale_median * median))
        return cap if cfg.max_staleness is None else min(cap, cfg.max_staleness)

    def issued(self, unit: WorkUnit) -> None:
        """A unit this process just issued: its result is checked against it as it is, instead of against
        its row's JSON parsed again (the same text: ``WorkUnit.wire``)."""
        self._issued[unit.unit_id] = unit
        if len(self._issued) > ISSUED_KEPT:
            self._issued.popitem(last=False)

    def _as_sent(self, unit_id: str, wire: str) -> WorkUnit:
        unit = self._issued.pop(unit_id, None)
        return unit if unit is not None and unit.wire == wire else WorkUnit.from_json(json.loads(wire))

    def parse(self, unit_id: str, body: bytes) -> tuple[dict, UnitResult] | Failure | Superseded:
        """The cheap checks (no delta decoding): the unit, the lease, duplicates, a failure report."""
        try:
            result = unpack_result(body)
        except ContractError as e:
            raise contract_rejection(e) from e
        if result.unit_id != unit_id:
            raise Rejection("invalid", 400, f"result.unit_id: expected {unit_id!r} (the URL's), got "
                            f"{result.unit_id!r}", "result.unit_id")
        # (a failure report or a hand-back logs no result: the unit may be answered from memory, RedisStore)
        unit, has_result = self.store.unit_and_result(unit_id, exact=result.error is None)
        if unit is None:
            raise Rejection("unknown_unit", 404, f"no unit {unit_id!r} was issued by this coordinator",
                            "result.unit_id")
        if result.worker_id != unit["worker_id"] or not leases.verify(
                self.key, result.lease, self.config.job, unit_id, unit["worker_id"], unit["base_step"],
                unit["deadline"]):
            raise Rejection("lease_invalid", 403, "result.lease: expected the lease issued for this unit to this "
                            "worker", "result.lease")
        # before the unit as sent is read: a decided result's unit no longer keeps it in Redis (RedisStore._decide)
        if unit["status"] == "done" or has_result:
            raise Rejection("duplicate", 409, f"a result for unit {unit_id!r} was already accepted",
                            "result.unit_id")
        if unit["wire"] is None:
            raise Rejection("lease_expired", 410, f"unit {unit_id!r} was issued by an earlier coordinator version; "
                            "take a new unit", "result.lease")
        try:
            check_result(self._as_sent(unit_id, unit["wire"]), result)
        except ContractError as e:
            raise contract_rejection(e) from e
        if unit["status"] == "superseded":
            return Superseded(unit, result)
        if result.error is not None:
            return Failure(unit, result)
        return unit, result

    def accept(self, unit: dict, result: UnitResult, current_step: int) -> Accepted:
        """The remaining checks, given the unit's row: lease time, samples, staleness, the delta, its norm.
        Decoding runs here: call it in a thread for large models."""
        now = self.clock()
        late = unit["status"] != "leased" or now > unit["deadline"]
        if unit["status"] in ("failed", "returned", "stale") or (late and self.config.late_results == "drop"):
            raise Rejection("lease_expired", 410, f"unit {unit['unit_id']!r}: the lease ended before the result "
                            "arrived", "result.lease", give_up="expired")
        if result.num_samples < 1:
            raise Rejection("invalid", 400, f"result.num_samples: expected 1..{unit['samples']}, got "
                            f"{result.num_samples}", "result.num_samples")
        cfg = self.config
        stale = staleness(unit["base_step"], current_step)
        replica = bool(unit.get("replica_of"))   # a check of a held result: its own staleness does not matter
        if not replica:
            cap = self.stale_cap()   # (of the results before this one)
            self.arrived(stale)
            if cap is not None and stale > cap and cfg.on_stale == "refuse":
                # before the delta is decoded: at the cap, under load, about half the results end here
                raise Rejection("too_stale", 409, f"staleness: expected <= {cap}, got {stale}",
                                "result.base_version", give_up="stale")
        try:   # fp32: views of the body (nothing writes to a delta); the norm summed in the decode's pass
            delta, norm = decode_delta_norm(result.delta, self.spec, copy=False)
        except ContractError as e:
            raise contract_rejection(e) from e
        if norm > cfg.max_delta_norm and cfg.on_large_norm == "refuse":
            raise Rejection("norm_bound", 422, f"delta: expected a global L2 norm <= {cfg.max_delta_norm:g}, "
                            f"got {norm:.4g}", "delta")
        if stale and any(is_running_stat(n) for n in delta) and not self._kept(unit["base_step"]):
            raise Rejection("too_stale", 409, f"staleness: base version {unit['base_step']} is no longer kept",
                            "result.base_version", give_up="stale")
        return Accepted(unit, result, delta, stale, late, norm)

    def _kept(self, step: int) -> bool:
        """Running statistics in a stale delta are rebased on its base version: is it still on disk?"""
        version = self.store.version(step)
        return version is not None and self.store.blob_path(version.blob) is not None
