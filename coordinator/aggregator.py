"""The aggregator: owns the strategy and the current model, and states each update's fate.

``add`` gives an accepted update to the strategy and returns which updates it dropped (the
offered one, or buffered ones it evicted), each with its reason; ``aggregate`` folds what is
buffered and returns exactly which updates went into the new model and which were dropped.
Nothing here touches the store or the network: the job writes these outcomes to the ledger
(after BOINC's assimilator, which alone decides what enters the science database).

``aggregate`` is pure computation on arrays (run it in a thread); it does not change the
aggregator's model until ``advance`` is called with its result, after the store committed it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from coordinator.strategies import Strategy, Update
from coordinator.strategies.tensors import global_norm
from models.local import rebase_running_stats, sanitize_state
from models.state_names import is_running_stat

Model = dict[str, np.ndarray]


@dataclass(frozen=True)
class Aggregation:
    """One aggregation's outcome. ``state``/``step``/``samples`` describe the new version;
    when nothing was folded, ``state`` is None and the version stays."""

    state: Model | None
    step: int
    samples: int
    folded: tuple[int, ...]                 # result seqs folded into ``step``
    dropped: tuple[tuple[int, str], ...]    # (seq, reason) dropped at this aggregation
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True)
class Prepared:
    """``Aggregator.prepare``'s: the update as offered at model ``step`` and its global L2 norm."""

    step: int
    delta: Model
    norm: float


class Aggregator:
    def __init__(self, strategy: Strategy, state: Model, step: int, samples: int,
                 state_at: Callable[[int], Model]):
        """``state_at(step)`` returns an older version's arrays (to rebase running statistics)."""
        self.strategy, self.state, self.step, self.samples = strategy, state, step, samples
        self.state_at = state_at
        self._samples: dict[int, int] = {}   # seq -> samples, for every update the strategy holds
        self.due = False

    @property
    def buffered(self) -> int:
        return len(self._samples)

    def prepare(self, delta: Model, base_step: int) -> Prepared:
        """What ``add`` makes of an update before the strategy sees it (its running statistics rebased on the
        current model) and its global norm (every clipping wrapper's first question, else the fold's): reads
        the model only, so a thread may run it while the model stays (``Job.settle``: the event loop does
        not spend a pass over every update's arrays)."""
        rebased = self._rebased(delta, base_step)
        return Prepared(self.step, rebased, global_norm(rebased))

    def _rebased(self, delta: Model, base_step: int) -> Model:
        if base_step != self.step and any(is_running_stat(n) for n in delta):
            return rebase_running_stats(delta, self.state_at(base_step), self.state)
        return delta

    def add(self, seq: int, delta: Model, base_step: int, samples: int, worker_id: str = "",
            loss: float | None = None, prepared: Prepared | None = None) -> list[tuple[int, str]]:
        """Offer an accepted update; returns the ``(seq, reason)`` of every update dropped now. ``prepared``:
        ``prepare``'s of this delta, used if the model has not moved since (the same arrays and norm ``add``
        would make)."""
        norm = None
        if prepared is not None and prepared.step == self.step:
            delta, norm = prepared.delta, prepared.norm
        else:
            delta = self._rebased(delta, base_step)
        admission = self.strategy.offer(Update(delta, base_step, samples, worker_id, loss, key=seq, norm=norm),
                                        self.step)
        if admission.admitted:
            self._samples[seq] = samples
        dropped = [(d.update.key, d.reason) for d in admission.dropped]
        for key, _ in dropped:
            self._samples.pop(key, None)
        self.due = self.due or admission.due
        return dropped

    def withdraw(self, worker_id: str) -> list[int]:
        """The seqs of ``worker_id``'s buffered updates, taken out of the strategy unfolded (``Strategy.withdraw``)."""
        seqs = [u.key for u in self.strategy.withdraw(worker_id)]
        for seq in seqs:
            self._samples.pop(seq, None)
        return seqs

    def aggregate(self) -> Aggregation:
        """Fold what is buffered (blocking). The model is unchanged until ``advance``."""
        t0 = time.perf_counter()
        out = self.strategy.fold(self.state, self.step)
        self.due = False
        folded = tuple(u.key for u in out.folded)
        dropped = tuple((d.update.key, d.reason) for d in out.dropped)
        samples = self.samples + sum(self._samples[k] for k in folded)
        for key in folded + tuple(k for k, _ in dropped):
            self._samples.pop(key, None)
        if not folded:
            return Aggregation(None, self.step, self.samples, (), dropped, out.metrics, time.perf_counter() - t0)
        return Aggregation(sanitize_state(out.model), self.step + 1, samples, folded, dropped, out.metrics,
                           time.perf_counter() - t0)

    def advance(self, agg: Aggregation) -> None:
        """The store has committed ``agg``: it becomes the current model."""
        if agg.state is not None:
            self.state, self.step, self.samples = agg.state, agg.step, agg.samples
