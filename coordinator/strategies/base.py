"""The strategy interface: ``Update``, ``StrategyState``, ``Strategy`` and ``BufferedStrategy``.

A strategy sees updates one at a time as they arrive, and is asked for a new model when it
says one is due (or when the scheduler's deadline fires; deadlines and sampling belong to
the scheduler, not to strategies). Every update's fate is stated by the strategy itself,
never inferred from counters (after BOINC's explicit result outcomes)::

    admission = strategy.offer(update, version)   # version: the coordinator's current version
    ledger.drop(admission.dropped)                 # this update if refused, or buffered ones it evicted
    if admission.due:
        folded = strategy.fold(model, version)     # model at ``version``
        ledger.apply(folded.folded); ledger.drop(folded.dropped)
        if folded.folded:                          # nothing folded -> keep the version
            store(folded.model, version + 1)

``add(update, version) -> bool`` (is an aggregation due) and ``aggregate(model, version) ->
(model, metrics)`` are the same two steps for a caller that needs no ledger (tests, tools).
An ``Update`` carries an opaque ``key`` (the coordinator's result sequence number) by which
the outcomes name it.

Staleness is ``version - update.base_version``, measured when the update is added (as in
FedBuff); the version is passed to ``add`` explicitly so an ``Update`` stays a plain record
of what the worker sent. Nothing here mutates an update or a model passed in.

State (``state_dict`` / ``load_state_dict``): a ``StrategyState`` holds JSON-able ``meta``
(``json.dumps`` works on it) and ``arrays`` (``dict[str, np.ndarray]``). A store can keep
``meta`` in a TEXT column and the arrays with ``np.savez``, or use ``to_bytes()`` /
``from_bytes()`` for one blob (an ``.npz`` without pickle). Array names are
``"<part>/<tensor>"``, e.g. ``"buffer.0/conv1.scores"`` or ``"momentum/fc.weight"``.
A store that replays its unapplied results on start saves ``state_dict(include_buffer=False)``
and re-``add``s them at the same version: the same buffer, staleness included.
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from .tensors import Model, NonFinite, check_delta, copy_model, global_norm, sq_norm, subtract


@dataclass(frozen=True)
class Update:
    """What a worker submitted: ``delta`` = (model after local training) - (base model)."""

    delta: Model
    base_version: int
    num_samples: int
    worker_id: str = ""
    loss: float | None = None
    key: int | str | None = None   # the caller's id for this update (the ledger's result seq)
    norm: float | None = field(default=None, compare=False)   # its global L2 norm, when a wrapper measured it

    def __post_init__(self) -> None:
        if isinstance(self.base_version, bool) or not isinstance(self.base_version, int) or self.base_version < 0:
            raise ValueError(f"base_version: expected an integer >= 0, got {self.base_version!r}")
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"num_samples: expected an integer >= 1, got {self.num_samples!r}")
        if not isinstance(self.delta, dict):
            raise ValueError(f"delta: expected a dict of arrays, got {type(self.delta).__name__}")


@dataclass(frozen=True)
class Pending:
    """A buffered update and its staleness when it arrived."""

    update: Update
    staleness: int
    sq: float | None = None   # the delta's squared global norm, once known (one pass computes it)


@dataclass(frozen=True)
class Drop:
    """An update the strategy will never fold, and why: ``reason`` is a short code for counting
    (``stale``, ``off_round``, ``base_unknown``, ``incompatible``), ``detail`` a sentence."""

    update: Update
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class Admission:
    """What ``offer`` did: whether the update was buffered, whether an aggregation is due, and
    every update dropped by this call (the offered one if refused, buffered ones it evicted)."""

    admitted: bool
    due: bool
    dropped: tuple[Drop, ...] = ()


@dataclass(frozen=True)
class Folded:
    """What ``fold`` did: the new model, its metrics, and the fate of every update it took out of
    the buffer: ``folded`` went into ``model``, ``dropped`` did not (with the reason)."""

    model: dict
    metrics: dict
    folded: tuple[Update, ...] = ()
    dropped: tuple[Drop, ...] = ()


@dataclass
class StrategyState:
    """Explicit strategy state: JSON-able ``meta`` plus named numpy ``arrays``."""

    meta: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """One ``.npz`` blob: the JSON header as uint8, then arrays ``a0, a1, ...`` (no pickle)."""
        names = sorted(self.arrays)
        header = json.dumps({"meta": self.meta, "arrays": names}).encode()
        buf = io.BytesIO()
        arrays = {f"a{i}": np.asarray(self.arrays[n]) for i, n in enumerate(names)}
        np.savez(buf, header=np.frombuffer(header, dtype=np.uint8), **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes) -> StrategyState:
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            header = json.loads(npz["header"].tobytes().decode())
            arrays = {n: npz[f"a{i}"] for i, n in enumerate(header["arrays"])}
        return cls(header["meta"], arrays)


def split_arrays(arrays: dict[str, np.ndarray], part: str) -> Model:
    """The tensors stored under ``"<part>/..."``, with the prefix removed."""
    prefix = part + "/"
    return {k[len(prefix):]: np.array(v, copy=True) for k, v in arrays.items() if k.startswith(prefix)}


def join_arrays(part: str, tensors: Model) -> dict[str, np.ndarray]:
    return {f"{part}/{k}": np.array(v, copy=True) for k, v in tensors.items()}


# --- constructor checks: each names the parameter --------------------------------------

def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    return value


def positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return float(value)


def in_range(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    """A number in [low, high] (or (low, high] with ``low_open``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name}: expected a number in {bracket}{low}, {high}], got {value!r}")
    return float(value)


def choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")
    return value


# --- the interface ----------------------------------------------------------------------

class Strategy(ABC):
    """What the aggregation loop sees. ``name`` is the registry key."""

    name: ClassVar[str]

    @abstractmethod
    def offer(self, update: Update, version: int) -> Admission:
        """Buffer ``update`` or drop it; says so, and whether an aggregation is due."""

    @abstractmethod
    def fold(self, model: Model, version: int) -> Folded:
        """Fold what is buffered into a new model; says which updates went in and which were dropped."""

    def add(self, update: Update, version: int) -> bool:
        """``offer`` for a caller without a ledger: True when an aggregation is due."""
        return self.offer(update, version).due

    def aggregate(self, model: Model, version: int) -> tuple[Model, dict[str, Any]]:
        """``fold`` for a caller without a ledger: the new model and its metrics."""
        folded = self.fold(model, version)
        return folded.model, folded.metrics

    @abstractmethod
    def withdraw(self, worker_id: str) -> list[Update]:
        """Take every buffered update of ``worker_id`` out, unfolded, and return them (the worker lost a
        replicated check: what it sent that still waits is withdrawn, not folded)."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-able summary for the dashboard: name, params, buffer, counters."""

    @abstractmethod
    def state_dict(self, include_buffer: bool = True) -> StrategyState:
        """Everything needed to resume: counters, server-side state and (by default) the buffer.

        ``include_buffer=False`` leaves the buffered updates out, for a store that keeps
        unapplied results itself and replays them through ``add`` on start (saving both
        would fold those updates twice).
        """

    @abstractmethod
    def load_state_dict(self, state: StrategyState) -> None:
        """Restore what ``state_dict`` returned (for a strategy of the same name)."""

    def params(self) -> dict[str, Any]:
        """Constructor keyword arguments, resolved; ``make_strategy(name, **params())`` rebuilds."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p not in ("self", "inner")]
        return {p: getattr(self, p) for p in names}

    def _check_name(self, state: StrategyState) -> None:
        if state.meta.get("name") != self.name:
            raise ValueError(f"state is for strategy {state.meta.get('name')!r}, not {self.name!r}")


class BufferedStrategy(Strategy):
    """A buffer of ``Pending`` updates, the common checks and metrics; subclasses do the maths.

    A subclass sets ``buffer_size`` (aggregation is due once that many are buffered) and
    implements ``_fold``; it may override ``_admit`` (drop on arrival, with a reason),
    ``_evict`` (drop buffered updates when a new one arrives), ``_reject`` (drop at
    aggregation time) and ``_extra_state`` / ``_load_extra`` (server-side state).
    ``aggregate`` folds whatever is buffered, even fewer than ``buffer_size`` (a deadline).
    """

    buffer_size: int = 1
    fused = False   # ``_fold`` checks finiteness in its own pass (raises ``NonFinite``): ``_reject`` need not scan

    def __init__(self) -> None:
        self._pending: list[Pending] = []
        self.dropped = 0  # updates refused by ``add`` or discarded from the buffer, in total

    # --- hooks ---
    def _admit(self, update: Update, version: int) -> Drop | None:
        """None to buffer ``update``, or the ``Drop`` saying why not."""
        return None

    def _evict(self, version: int) -> list[Drop]:
        """Buffered updates to discard before a new one is offered at ``version`` (removed here)."""
        return []

    def _reject(self, pending: Pending, model: Model, version: int) -> Drop | None:
        """At aggregation time: None to fold ``pending``, or the ``Drop`` saying why not."""
        sq = pending.sq
        finite = None if sq is None else math.isfinite(sq)
        problem = check_delta(pending.update.delta, model, finite=True if (sq is None and self.fused) else finite)
        return None if problem is None else Drop(pending.update, "incompatible", problem)

    @abstractmethod
    def _fold(self, model: Model, pending: list[Pending], version: int) -> tuple[Model, dict[str, Any]]:
        """The new model from a non-empty list of checked updates, plus strategy metrics."""

    def _extra_state(self) -> StrategyState:
        return StrategyState({})

    def _load_extra(self, state: StrategyState) -> None:
        pass

    # --- interface ---
    def offer(self, update: Update, version: int) -> Admission:
        staleness = version - update.base_version
        if staleness < 0:
            raise ValueError(f"update base_version {update.base_version} is ahead of the current version {version}")
        dropped = self._evict(version)
        refused = self._admit(update, version)
        if refused is not None:
            dropped.append(refused)
        else:
            sq = update.norm * update.norm if update.norm is not None else None
            self._pending.append(Pending(update, staleness, sq))
        self.dropped += len(dropped)
        return Admission(refused is None, len(self._pending) >= self.buffer_size, tuple(dropped))

    def fold(self, model: Model, version: int) -> Folded:
        pending, self._pending = self._pending, []
        good, drops = [], []
        for p in pending:
            drop = self._reject(p, model, version)
            if drop is None:
                good.append(p)
            else:
                drops.append(drop)
        while True:
            try:
                with np.errstate(over="ignore"):   # an overflow is found and handled below, not warned about
                    new, extra = self._fold(model, good, version) if good else (copy_model(model), {})
                break
            except NonFinite as e:   # found in the fold's own pass: drop those, fold the others
                bad = set(e.indices)
                drops += [Drop(p.update, "incompatible", check_delta(p.update.delta, model, finite=False)
                               or "non-finite values") for i, p in enumerate(good) if i in bad]
                good = [p for i, p in enumerate(good) if i not in bad]
        step_sq, delta_sq = extra.pop("_step_sq", None), extra.pop("_delta_sq", None)
        if good and step_sq is not None and not math.isfinite(step_sq):   # finite deltas whose sum overflowed
            drops += [Drop(p.update, "incompatible", "the fold overflowed float32 (a non-finite model)") for p in good]
            good, new, step_sq, delta_sq, extra = [], copy_model(model), None, None, {}
        if delta_sq is not None:
            good = [p if p.sq is not None else dataclasses.replace(p, sq=sq) for p, sq in zip(good, delta_sq)]
        metrics = {**summarize(good, model, new, step_sq), "rejected": len(drops), **extra}
        if drops:
            metrics["reject_reason"] = drops[0].detail or drops[0].reason
        return Folded(new, metrics, tuple(p.update for p in good), tuple(drops))

    def withdraw(self, worker_id: str) -> list[Update]:
        out = [p.update for p in self._pending if p.update.worker_id == worker_id]
        if out:
            self._pending = [p for p in self._pending if p.update.worker_id != worker_id]
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "params": self.params(),
            "buffered": len(self._pending),
            "buffer_size": self.buffer_size,
            "due": len(self._pending) >= self.buffer_size,
            "buffered_samples": sum(p.update.num_samples for p in self._pending),
            "buffered_staleness_max": max((p.staleness for p in self._pending), default=0),
            "dropped": self.dropped,
        }

    def state_dict(self, include_buffer: bool = True) -> StrategyState:
        buffer, arrays = [], {}
        for i, p in enumerate(self._pending if include_buffer else []):
            u = p.update
            buffer.append({"base_version": u.base_version, "num_samples": u.num_samples,
                           "worker_id": u.worker_id, "loss": u.loss, "staleness": p.staleness})
            arrays.update(join_arrays(f"buffer.{i}", u.delta))
        extra = self._extra_state()
        meta = {"name": self.name, "params": self.params(), "dropped": self.dropped,
                "buffer": buffer, "extra": extra.meta}
        return StrategyState(meta, {**arrays, **extra.arrays})

    def load_state_dict(self, state: StrategyState) -> None:
        self._check_name(state)
        pending = []
        for i, row in enumerate(state.meta["buffer"]):
            update = Update(split_arrays(state.arrays, f"buffer.{i}"), row["base_version"],
                            row["num_samples"], row["worker_id"], row["loss"])
            pending.append(Pending(update, row["staleness"]))
        self._pending = pending
        self.dropped = int(state.meta["dropped"])
        other = {k: v for k, v in state.arrays.items() if not k.startswith("buffer.")}
        self._load_extra(StrategyState(state.meta.get("extra", {}), other))


def summarize(pending: list[Pending], model: Model, new: Model, step_sq: float | None = None) -> dict[str, Any]:
    """Metrics every aggregation reports (JSON-able): counts, staleness, samples, norms. Norms already
    measured (``Pending.sq``, ``step_sq`` from the fold's own pass) are not measured again."""
    staleness = [p.staleness for p in pending]
    losses = [p.update.loss for p in pending if p.update.loss is not None]
    return {
        "updates": len(pending),
        "samples": sum(p.update.num_samples for p in pending),
        "workers": len({p.update.worker_id for p in pending}),
        "staleness_mean": float(np.mean(staleness)) if staleness else 0.0,
        "staleness_max": max(staleness, default=0),
        "update_norm_mean": float(np.mean([math.sqrt(p.sq) if p.sq is not None else global_norm(p.update.delta)
                                           for p in pending])) if pending else 0.0,
        "step_norm": math.sqrt(step_sq) if step_sq is not None else global_norm(subtract(new, model)),
        "loss_mean": float(np.mean(losses)) if losses else None,
    }
