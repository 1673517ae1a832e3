"""The strategy interface: ``Update``, ``StrategyState``, ``Strategy`` and ``BufferedStrategy``.

A strategy sees updates one at a time as they arrive, and is asked for a new model when it
says one is due (or when the scheduler's deadline fires; deadlines and sampling belong to
the scheduler, not to strategies)::

    due = strategy.add(update, version)        # version: the coordinator's current version
    if due:
        new_model, metrics = strategy.aggregate(model, version)   # model at ``version``
        if metrics["updates"]:                  # nothing folded -> keep the version
            store(new_model, version + 1)

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

import inspect
import io
import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from .tensors import Model, check_delta, copy_model, global_norm, subtract


@dataclass(frozen=True)
class Update:
    """What a worker submitted: ``delta`` = (model after local training) - (base model)."""

    delta: Model
    base_version: int
    num_samples: int
    worker_id: str = ""
    loss: float | None = None

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
    def add(self, update: Update, version: int) -> bool:
        """Buffer ``update`` (or drop it); True when an aggregation is due."""

    @abstractmethod
    def aggregate(self, model: Model, version: int) -> tuple[Model, dict[str, Any]]:
        """Fold what is buffered into a new model; ``metrics["updates"]`` says how many."""

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
    implements ``_fold``; it may override ``_admit`` (drop on arrival), ``_reject`` (drop at
    aggregation time) and ``_extra_state`` / ``_load_extra`` (server-side state).
    ``aggregate`` folds whatever is buffered, even fewer than ``buffer_size`` (a deadline).
    """

    buffer_size: int = 1

    def __init__(self) -> None:
        self._pending: list[Pending] = []
        self.dropped = 0  # updates refused by ``add`` or discarded from the buffer, in total

    # --- hooks ---
    def _admit(self, update: Update, version: int) -> bool:
        return True

    def _reject(self, pending: Pending, model: Model, version: int) -> str | None:
        return check_delta(pending.update.delta, model)

    @abstractmethod
    def _fold(self, model: Model, pending: list[Pending], version: int) -> tuple[Model, dict[str, Any]]:
        """The new model from a non-empty list of checked updates, plus strategy metrics."""

    def _extra_state(self) -> StrategyState:
        return StrategyState({})

    def _load_extra(self, state: StrategyState) -> None:
        pass

    # --- interface ---
    def add(self, update: Update, version: int) -> bool:
        staleness = version - update.base_version
        if staleness < 0:
            raise ValueError(f"update base_version {update.base_version} is ahead of the current version {version}")
        if not self._admit(update, version):
            self.dropped += 1
            return False
        self._pending.append(Pending(update, staleness))
        return len(self._pending) >= self.buffer_size

    def aggregate(self, model: Model, version: int) -> tuple[Model, dict[str, Any]]:
        pending, self._pending = self._pending, []
        good, reasons = [], []
        for p in pending:
            reason = self._reject(p, model, version)
            (reasons if reason else good).append(reason or p)
        new, extra = self._fold(model, good, version) if good else (copy_model(model), {})
        metrics = {**summarize(good, model, new), "rejected": len(reasons), **extra}
        if reasons:
            metrics["reject_reason"] = reasons[0]
        return new, metrics

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


def summarize(pending: list[Pending], model: Model, new: Model) -> dict[str, Any]:
    """Metrics every aggregation reports (JSON-able): counts, staleness, samples, norms."""
    staleness = [p.staleness for p in pending]
    losses = [p.update.loss for p in pending if p.update.loss is not None]
    return {
        "updates": len(pending),
        "samples": sum(p.update.num_samples for p in pending),
        "workers": len({p.update.worker_id for p in pending}),
        "staleness_mean": float(np.mean(staleness)) if staleness else 0.0,
        "staleness_max": max(staleness, default=0),
        "update_norm_mean": float(np.mean([global_norm(p.update.delta) for p in pending])) if pending else 0.0,
        "step_norm": global_norm(subtract(new, model)),
        "loss_mean": float(np.mean(losses)) if losses else None,
    }
