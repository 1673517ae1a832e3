"""The unit factory: what to hand out next, to whom, for how long, at which learning rate.

It owns the shard queue, the lease deadlines, the sample budget, the learning-rate schedule
(driven by the samples committed so far), unit ids and seeds, and the signed lease; it turns
a worker's request into a ``WorkUnit`` and records it in the store. It knows nothing of
results or aggregation: the job tells it the current version and what is committed.

A *replica* (``replicate``) is the same unit again for another worker, for a replicated
check (``coordinator.trust``): same base version, shards, hyperparameters and seed, with its
own id, lease and deadline. Its shards are covered by the result it checks, so they never go
back in line when a replica expires or fails (the job asks for another replica instead).
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import secrets
from dataclasses import dataclass

from contract.codecs import CODEC_IDS
from contract.units import WorkUnit
from coordinator import leases
from coordinator.config import CoordinatorConfig
from coordinator.scheduler import Deadlines, ShardQueue
from coordinator.store import Store
from models.recipe import Recipe
from models.train import lr_at

HYPER_KEYS = ("momentum", "nesterov", "weight_decay", "label_smoothing", "loss", "focal_gamma", "crop_pad", "flip")


@dataclass(frozen=True)
class Base:
    """The model version units are cut from now: its step and blob id."""

    step: int
    blob: str


class UnitFactory:
    def __init__(self, config: CoordinatorConfig, recipe: Recipe, store: Store, key: bytes,
                 shard_sizes: dict[str, int], budget: int, clock, rng: random.Random | None = None,
                 hyper_overrides: dict | None = None):
        """``rng`` (unit ids and seeds; default ``secrets``) is injected by the simulator.
        ``hyper_overrides`` replace recipe values in every unit (e.g. local momentum 0 when the
        strategy supplies momentum on the server)."""
        self.config, self.recipe, self.store, self.key = config, recipe, store, key
        self.shard_sizes, self.budget, self.clock, self.rng = shard_sizes, budget, clock, rng
        self.hyper = {**{k: getattr(recipe, k) for k in HYPER_KEYS}, **(hyper_overrides or {})}
        q = store.get_meta("queue", {"epoch": 0, "position": 0, "retry": []})
        self.queue = ShardQueue(list(shard_sizes), config.shards_per_unit, config.seed, q["epoch"], q["position"])
        self.queue.requeue(q["retry"])
        self.deadlines = Deadlines(config.lease_min_s, config.lease_max_s, config.lease_factor, config.lease_first_s)

    # ------------------------------------------------------------------ handing out
    def codec_for(self, offered: tuple[str, ...]) -> str | None:
        wanted = self.config.codec
        if wanted.split(":")[0] in offered:
            return wanted
        return next((c for c in CODEC_IDS if c in offered), None)

    def committed(self, applied: int) -> int:
        """Samples applied, accepted and waiting to be folded, or out on a lease."""
        return applied + self.store.pending_samples() + self.store.leased_samples()

    def make(self, worker_id: str, codec: str, base: Base, applied: int) -> WorkUnit | None:
        """A fresh unit for ``worker_id`` cut from ``base``. Once the budget is committed: a second
        copy of the oldest unit another worker still holds (the job's tail: the first result wins,
        so one slow or vanished worker does not hold the end of the job), or None."""
        committed = self.committed(applied)
        if committed < self.budget:
            shards = self.queue.take(set(self.store.leased_shards()))
            return self._issue(worker_id, codec, base, shards, lr_at(committed / self.budget, self.recipe))
        original = self.store.tail_candidate(worker_id)
        if original is None:
            return None
        return self._issue(worker_id, codec, base, original["shard_ids"], original["lr"], twin=original["unit_id"])

    def _issue(self, worker_id: str, codec: str, base: Base, shards: list[str], lr: float,
               twin: str | None = None) -> WorkUnit:
        now = self.clock()
        n = sum(self.shard_sizes[s] for s in shards)
        batch = min(self.recipe.batch_size, n)
        steps = self.config.local_steps or max(1, math.ceil(n / batch))
        if lr <= 0:
            lr = self.recipe.lr * 1e-3  # the schedule's first instant; a unit needs lr > 0
        if self.rng is None:
            unit_id, seed = self._unit_id(), secrets.randbelow(2**31)
        else:
            unit_id, seed = f"{self.rng.getrandbits(64):016x}", self.rng.randrange(2**31)
        deadline = round(now + self.deadlines.lease_seconds(worker_id, steps * batch), 3)
        lease = leases.sign(self.key, self.config.job, unit_id, worker_id, base.step, deadline)
        unit = WorkUnit(job=self.config.job, unit_id=unit_id, model=self.config.model, model_version=base.blob,
                        base_step=base.step, shard_ids=shards, local_steps=steps, batch_size=batch,
                        hyper={"lr": lr, **self.hyper}, seed=seed, codec=codec, lease=lease, deadline=deadline)
        self.store.insert_unit(unit_id, worker_id, shards, base.step, lr, seed, deadline, steps * batch, now,
                               wire=json.dumps(unit.to_json()), twin=twin)
        self.store.set_meta("queue", self.queue.state())
        return unit

    def replicate(self, worker_id: str, original: dict) -> WorkUnit:
        """The unit of store row ``original`` again, for ``worker_id``: the same base, shards,
        hyperparameters and seed (so an honest worker computes the same delta), its own id and lease."""
        issued = WorkUnit.from_json(json.loads(original["wire"]))
        now = self.clock()
        unit_id = self._unit_id()
        claim = issued.local_steps * issued.batch_size
        deadline = round(now + self.deadlines.lease_seconds(worker_id, claim), 3)
        lease = leases.sign(self.key, self.config.job, unit_id, worker_id, issued.base_step, deadline)
        unit = dataclasses.replace(issued, unit_id=unit_id, lease=lease, deadline=deadline)
        self.store.insert_unit(unit_id, worker_id, list(issued.shard_ids), issued.base_step, original["lr"],
                               issued.seed, deadline, claim, now, wire=json.dumps(unit.to_json()),
                               replica_of=original["unit_id"])
        return unit

    def _unit_id(self) -> str:
        return secrets.token_hex(8) if self.rng is None else f"{self.rng.getrandbits(64):016x}"

    def requeue(self, shards: list[str]) -> None:
        """Shards whose result was not used (a quarantined or distrusted worker's): trained again first."""
        self.queue.requeue(shards)
        self.store.set_meta("queue", self.queue.state())

    # ------------------------------------------------------------------ units that will not come back
    def give_up(self, unit: dict, status: str) -> None:
        """``unit`` (a store row) will not be used: its shards go back in line (once), unless its
        second copy covers them or it is a replica."""
        if unit["status"] == "leased" and not unit.get("replica_of") and not self.store.twin_alive(unit):
            self.queue.requeue(unit["shard_ids"])
            self.store.set_meta("queue", self.queue.state())
        self.store.set_unit_status(unit["unit_id"], status, only_if=None)

    def expire(self) -> int:
        """Leases past their deadline: their shards go to the front of the queue."""
        expired = self.store.expire_leases(self.clock())
        for row in expired:
            if not row["replica_of"] and not self.store.twin_alive(row):
                self.queue.requeue(row["shard_ids"])
        if expired:
            self.store.set_meta("queue", self.queue.state())
        return len(expired)

    def retrying(self) -> set[str]:
        """Shards of units that will not come back, waiting to be handed out again first."""
        return set(self.queue.retry)

    def observe(self, worker_id: str, wall_s: float, samples: int) -> None:
        """A finished unit's wall time (issue to result) tunes that worker's next leases."""
        self.deadlines.observe(worker_id, wall_s, samples)
