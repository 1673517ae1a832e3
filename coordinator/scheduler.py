"""Which data a unit trains on, and how long its lease lasts.

Deadlines and sampling belong here, not to the strategies. ``ShardQueue`` walks the shards
in a fresh seeded permutation each epoch and puts the shards of expired or handed-back
units first in line; ``Deadlines`` sets each lease from what that worker and the fleet have
shown (seconds per sample), so a slow volunteer is not cut off and a vanished one is noticed.
"""
from __future__ import annotations

import random
import statistics
from collections import deque


class ShardQueue:
    def __init__(self, shard_ids: list[str], per_unit: int, seed: int, epoch: int = 0, position: int = 0):
        if not shard_ids:
            raise ValueError("shard queue: expected at least one shard")
        self.shard_ids, self.per_unit, self.seed = list(shard_ids), max(1, min(per_unit, len(shard_ids))), seed
        self.epoch, self.position = epoch, position
        self.retry: deque[str] = deque()
        self._order = self._permutation(epoch)

    def _permutation(self, epoch: int) -> list[str]:
        order = list(self.shard_ids)
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def requeue(self, shard_ids: list[str]) -> None:
        """Shards of a unit that will not come back: handed out again before new ones."""
        for s in shard_ids:
            if s not in self.retry:
                self.retry.append(s)

    def take(self, busy: set[str]) -> list[str]:
        """The next ``per_unit`` shards, skipping ones leased right now when others are free."""
        picked: list[str] = []
        while self.retry and len(picked) < self.per_unit:
            picked.append(self.retry.popleft())
        scanned = 0
        while len(picked) < self.per_unit and scanned < 2 * len(self.shard_ids):
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            shard = self._order[self.position]
            self.position += 1
            scanned += 1
            if shard not in picked and (shard not in busy or scanned > len(self.shard_ids)):
                picked.append(shard)
        return picked

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "retry": list(self.retry)}


class Deadlines:
    """Lease length = clamp(factor * expected seconds + slack), expected from the worker's own
    recent seconds per sample. A worker's first unit (cold caches: it downloads the model and
    shards) gets ``first_s``, or more when the fleet's median says the unit takes longer."""

    def __init__(self, min_s: float = 20.0, max_s: float = 1800.0, factor: float = 3.0, first_s: float = 120.0,
                 slack_s: float = 10.0, alpha: float = 0.3):
        if not 0 < min_s <= max_s:
            raise ValueError(f"deadlines: expected 0 < min_s <= max_s, got {min_s}, {max_s}")
        self.min_s, self.max_s, self.factor, self.first_s, self.slack_s, self.alpha = (
            min_s, max_s, factor, first_s, slack_s, alpha)
        self.per_sample: dict[str, float] = {}
        self._fleet: float | None = None   # the median of ``per_sample``, as of ``_fleet_stale`` observations ago
        self._fleet_stale = 0

    def observe(self, worker_id: str, seconds: float, samples: int) -> None:
        """Record a finished unit's wall time (issue to result) for ``samples`` samples."""
        if samples <= 0 or seconds <= 0:
            return
        rate = seconds / samples
        old = self.per_sample.get(worker_id)
        self.per_sample[worker_id] = rate if old is None else (1 - self.alpha) * old + self.alpha * rate
        self._fleet_stale += 1

    def fleet_rate(self) -> float:
        """The fleet's median seconds per sample (0 before any observation), sorted again once the
        observations since the last sort reach a twentieth of the workers (a lease for every worker without a
        record of its own asks: with a thousand workers, a sort per unit request)."""
        if not self.per_sample:
            return 0.0
        if self._fleet is None or self._fleet_stale * 20 >= len(self.per_sample):
            self._fleet, self._fleet_stale = statistics.median(self.per_sample.values()), 0
        return self._fleet

    def lease_seconds(self, worker_id: str, samples: int) -> float:
        rate = self.per_sample.get(worker_id)
        if rate is not None:
            seconds = self.factor * rate * samples + self.slack_s
        else:
            seconds = max(self.first_s, 2 * self.factor * self.fleet_rate() * samples + self.slack_s)
        return min(max(seconds, self.min_s), self.max_s)
