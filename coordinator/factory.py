"""The unit factory: what to hand out next, to whom, for how long, at which learning rate.

It owns the shard queue, the lease deadlines, the sample budget, the learning-rate schedule
(driven by the samples committed so far), unit ids and seeds, and the signed lease; it turns
a worker's request into a ``WorkUnit`` and records it in the store. It knows nothing of
results or aggregation: the job tells it the current version and what is committed.

A *replica* (``replicate``) is the same unit again for another worker, for a replicated
check (``coordinator.trust``): same base version, shards, hyperparameters and seed, with its
own id, lease and deadline. Its shards are covered by the result it checks, so they never go
back in line when a replica expires or fails (the job asks for another replica instead).

**Units sized to the tab that asks** (``unit_seconds``). A browser tab trains at the one batch
size its step graph was exported for, far slower than a Python worker (tens of samples/s on
WebAssembly), so a tab's unit is a number of steps at that batch chosen from the tab's own
measured speed (seconds per sample from issue to result, ``observe``) to take about
``unit_seconds``, at most 4x its previous unit (``--local-steps``, when set, fixes every unit's
steps, tabs' too, and turns this off). A tab
whose speed is not known yet (its first unit) gets one step, on a *slice* of a shard (its first
``batch`` images as a shard blob of their own, cut once per shard and kept) and the model
version as fp16 (the CTD1 codec every worker decodes; the delta is taken against what the tab
decoded), so that a first visit downloads little and sees its first unit accepted within
seconds. The slices rotate over the shards and are extra samples: they never enter or leave the
shard queue. The samples a unit claims are still ``local_steps * batch_size``: what was trained.
Python workers' units are unchanged (``shards_per_unit`` shards, one pass or ``local_steps``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from collections import OrderedDict
from dataclasses import dataclass

from contract.codecs import CODEC_IDS, decode_delta, encode_delta, get_codec
from contract.errors import ContractError
from contract.shards import decode_shard, encode_shard
from contract.units import WorkUnit
from contract.versions import make_version_delta, version_blob
from coordinator import leases
from coordinator.config import CoordinatorConfig
from coordinator.scheduler import Deadlines, ShardQueue
from coordinator.store import Store
from models.recipe import Recipe
from models.train import lr_at

FIRST_STEPS = 1          # the first unit of a tab whose speed is not known yet
GROWTH = 4               # a tab's unit is at most this many times its previous one (in steps)
MAX_UNIT_SHARDS = 16     # a tab's unit covers at most this many shards' worth of samples
SPEED_ALPHA = 0.5        # weight of the newest unit in a tab's speed estimate
MIN_SPLIT_BATCH = 32     # ``unit_batch_workers`` divides a unit's batch down to this at most
IN_FLIGHT_UNITS = 3      # a worker counts as in flight for this many of its unit durations after it asked
IN_FLIGHT_MIN_S = 30.0   # ... and for at least this long (its first units, a fast worker)
FIRST_SAVE_S = 1.0       # the list of fp16 copies is saved at most this often (``UnitFactory._save_first``)
HALF_KEPT = 4            # fp16 copies of the newest versions kept after their units are back (warm workers hold them)
DERIVED_KEPT = 32        # reconstructions (fp32 blobs) and their version deltas kept once no unit that names them is out
VERSIONS_SEEN = 64       # version blobs remembered (blob -> step), to recognise what a worker says it holds
HYPER_KEYS = ("momentum", "nesterov", "weight_decay", "label_smoothing", "loss", "focal_gamma", "crop_pad", "flip",
              "crop_reflect")
WHEN_SET = ("crop_reflect",)   # keys a unit carries only when true (units without them read as before)


class Entropy:
    """Unpredictable bytes (``os.urandom``, as ``secrets``), drawn ``chunk`` bytes at a time: ``secrets`` makes a
    system call per unit id and seed, and each gives the GIL away on the event loop (under load, with a thread
    decoding or folding, 190-330 us each to get it back, against 0.3 us for a slice of a buffer)."""

    def __init__(self, chunk: int = 4096):
        self.chunk, self._buf, self._at = chunk, b"", 0

    def take(self, n: int) -> bytes:
        if self._at + n > len(self._buf):
            self._buf, self._at = os.urandom(max(self.chunk, n)), 0
        self._at += n
        return self._buf[self._at - n:self._at]

    def unit_id(self) -> str:
        return self.take(8).hex()   # (secrets.token_hex(8))

    def seed(self) -> int:
        return int.from_bytes(self.take(4), "big") & 0x7FFFFFFF   # uniform in [0, 2**31)


def unit_batch_scale(config: CoordinatorConfig) -> float:
    """The fraction of the recipe's batch a dense model's unit trains at: ``--unit-batch-scale``, else the
    model's own (``ModelSpec.unit_batch_scale``: an eighth, airbench a quarter)."""
    if config.unit_batch_scale is not None:
        return config.unit_batch_scale
    from models import registry

    return registry.get(config.model).unit_batch_scale


@dataclass(frozen=True)
class Base:
    """The model version units are cut from now: its step and blob id."""

    step: int
    blob: str


class UnitFactory:
    def __init__(self, config: CoordinatorConfig, recipe: Recipe, store: Store, key: bytes,
                 shard_sizes: dict[str, int], budget: int, clock, rng: random.Random | None = None,
                 hyper_overrides: dict | None = None):
        """``rng`` (unit ids and seeds; default ``Entropy``: ``os.urandom``) is injected by the simulator.
        ``hyper_overrides`` replace recipe values in every unit (e.g. local momentum 0 when the
        strategy supplies momentum on the server)."""
        self.config, self.recipe, self.store, self.key = config, recipe, store, key
        self.shard_sizes, self.budget, self.clock, self.rng = shard_sizes, budget, clock, rng
        self.entropy = Entropy()
        self.hyper = {**{k: getattr(recipe, k) for k in HYPER_KEYS if k not in WHEN_SET or getattr(recipe, k)},
                      **({"momentum": config.unit_momentum} if config.unit_momentum is not None else {}),
                      **(hyper_overrides or {})}
        q = store.get_meta("queue", {"epoch": 0, "position": 0, "retry": []})
        self.queue = ShardQueue(list(shard_sizes), config.shards_per_unit, config.seed, q["epoch"], q["position"])
        self.queue.requeue(q["retry"])
        self.deadlines = Deadlines(config.lease_min_s, config.lease_max_s, config.lease_factor, config.lease_first_s)
        self.speed: dict[str, float] = {}       # seconds per sample of each worker's units, issue to result
        self.asked: dict[str, tuple[float, int]] = {}   # Python worker -> (when it last asked, the samples it got)
        self._pruned = -math.inf
        self.split_batch = config.unit_batch_workers and config.batch_size is None and \
            unit_batch_scale(config) != 1 and self._dense(config.model)
        self.last_steps: dict[str, int] = {}    # steps of each tab's last unit
        first = store.get_meta("first_units", {"next": 0, "slices": {}, "half": {}})
        self._next_slice = first["next"]
        self.slices: dict[str, list] = first["slices"]        # "<shard>:<n>" -> [slice blob, n]
        self.slice_sizes = {b: n for b, n in self.slices.values()}
        self.half: dict[str, dict] = first["half"]            # version blob -> {"blob": fp16 blob, "until": deadline}
        self._half_of = {e["blob"]: v for v, e in self.half.items()}   # fp16 blob -> version blob
        self._first_saved, self._first_dirty = -math.inf, False   # ``_save_first``
        # version deltas (docs/protocol.md): reconstruction blob -> {"blob", "step", "delta", "until"}, oldest first
        saved = store.get_meta("version_deltas", {"derived": []})["derived"]
        self.derived: OrderedDict[str, dict] = OrderedDict((e["blob"], e) for e in saved)
        self.pairs = {(e["from"], e["target"]): e["blob"] for e in saved if "from" in e}
        self.seen: OrderedDict[str, int] = OrderedDict()      # version blob -> step, for units cut from it lately
        self._target: tuple[str, dict] | None = None          # the last decoded version (a version delta's target)
        self._no_half: set[str] = set()                       # versions with a value beyond fp16's range

    # ------------------------------------------------------------------ handing out
    def codec_for(self, offered: tuple[str, ...]) -> str | None:
        wanted = self.config.codec
        if wanted.split(":")[0] in offered:
            return wanted
        return next((c for c in CODEC_IDS if c in offered), None)

    def committed(self, applied: int) -> int:
        """Samples applied, accepted and waiting to be folded, or out on a lease."""
        return applied + self.store.pending_samples() + self.store.leased_samples()

    def make(self, worker_id: str, codec: str, base: Base, applied: int, backend: str | None = None,
             held: tuple[str, ...] = (), error_feedback: bool = False, trusted: bool = False) -> WorkUnit | None:
        """A fresh unit for ``worker_id`` cut from ``base``. Once the budget is committed: a second
        copy of the oldest unit another worker still holds (the job's tail: the first result wins,
        so one slow or vanished worker does not hold the end of the job), or None. ``backend``: the
        request's (a browser's unit is sized to its speed); when not given, the trust record's. ``held``: the
        model versions the worker says it holds (``_download``). ``error_feedback``: the worker keeps an
        error-feedback residual (``feedback_allowed``); ``trusted``: one of the operator's own workers
        (``--trusted-tokens``), whose results are never checked."""
        feedback = self.feedback_allowed(codec, error_feedback, trusted)
        self.seen[base.blob] = base.step
        self.seen.move_to_end(base.blob)
        while len(self.seen) > VERSIONS_SEEN:
            self.seen.popitem(last=False)
        committed = self.committed(applied)
        if committed < self.budget:
            lr = lr_at(committed / self.budget, self.recipe)
            if self.config.unit_seconds is not None and not self.config.local_steps and \
                    self._is_browser(worker_id, backend):
                return self._issue_sized(worker_id, codec, base, lr, held, feedback=feedback, trusted=trusted)
            shards = self.queue.take(set(self.store.leased_shards()))
            images = sum(self.size_of(x) for x in shards)
            batch = self._split_batch(worker_id, images)
            if self.config.unit_lr != "recipe":     # split, linear: scaled with the split of the batch
                lr *= batch / self.recipe.batch_size
            pace = self._pace(worker_id) if self.config.dynamic_steps else 1.0
            return self._issue(worker_id, codec, base, shards, lr, batch=batch, held=held, feedback=feedback,
                               pace=pace * self._flight_share(images), trusted=trusted)
        original = self.store.tail_candidate(worker_id)
        if original is None:
            return None
        issued = json.loads(original["wire"]) if original.get("wire") else {}
        return self._issue(worker_id, codec, base, original["shard_ids"], original["lr"], twin=original["unit_id"],
                           steps=issued.get("local_steps"), batch=issued.get("batch_size"), held=held,
                           feedback=feedback, parity=issued.get("hyper", {}).get("flip_parity"), trusted=trusted)

    def feedback_allowed(self, codec: str, asked: bool, trusted: bool = False) -> bool:
        """Whether a unit may carry the worker's error-feedback residual (``WorkUnit.error_feedback``): the
        worker asked (it keeps one), the codec is lossy (fp32 drops nothing), and its result will not be
        checked: replicated checks are off, or the worker is the operator's own (``trusted``). A replica,
        and the coordinator's own recomputation, must get the same delta as the original from the unit
        alone (coordinator/trust.py), and the result to be checked is drawn only when it comes in, so with
        checks on no other worker's unit carries it."""
        return asked and not self.may_check(trusted) and get_codec(codec).id != "fp32"

    def may_check(self, trusted: bool) -> bool:
        """Whether a result of this worker may be checked: replicated checks are on and it is not one of the
        operator's own (``trusted``, --trusted-tokens)."""
        return self.config.replication != "off" and not trusted

    def _issue(self, worker_id: str, codec: str, base: Base, shards: list[str], lr: float,
               twin: str | None = None, steps: int | None = None, version_blob: str | None = None,
               batch: int | None = None, held: tuple[str, ...] = (), feedback: bool = False,
               pace: float = 1.0, parity: int | None = None, trusted: bool = False) -> WorkUnit:
        """``pace`` (in (0, 1]): the share of one pass over the shards a unit without ``steps`` or
        ``--local-steps`` trains, at least one step (``dynamic_steps``). A recipe whose flips alternate
        (``alt_flip``) sends ``hyper.flip_parity``: ``parity`` (a tail copy's, its original's) or the parity
        of the epoch the shard queue is in (``models.flips``). With checks on, a unit of a worker that may be
        checked (not ``trusted``: the operator's own) has at most ``check_max_steps`` steps."""
        now = self.clock()
        base_delta = None
        if version_blob is None:
            version_blob, base_delta = self._download(base, held)
        n = sum(self.size_of(s) for s in shards)
        batch = min(batch or self.recipe.batch_size, n)
        steps = steps or self.config.local_steps or max(1, round(math.ceil(n / batch) * pace))
        if self.may_check(trusted):   # a check of a longer unit is inconclusive
            steps = min(steps, self.config.check_max_steps)
        if worker_id in self.asked:   # in flight for a few of *this* unit's durations (``in_flight``), not a shard's
            self.asked[worker_id] = (self.asked[worker_id][0], steps * batch)
        if lr <= 0:
            lr = self.recipe.lr * 1e-3  # the schedule's first instant; a unit needs lr > 0
        if self.rng is None:
            unit_id, seed = self._unit_id(), self.entropy.seed()
        else:
            unit_id, seed = f"{self.rng.getrandbits(64):016x}", self.rng.randrange(2**31)
        deadline = round(now + self.deadlines.lease_seconds(worker_id, steps * batch), 3)
        lease = leases.sign(self.key, self.config.job, unit_id, worker_id, base.step, deadline)
        unit = WorkUnit(job=self.config.job, unit_id=unit_id, model=self.config.model,
                        model_version=version_blob,
                        base_step=base.step, shard_ids=shards, local_steps=steps, batch_size=batch,
                        hyper=self._hyper(lr, parity), seed=seed, codec=codec, lease=lease, deadline=deadline,
                        base_delta=base_delta, error_feedback=feedback)
        self.store.insert_unit(unit_id, worker_id, shards, base.step, lr, seed, deadline, steps * batch, now,
                               wire=unit.wire, twin=twin, queue=self.queue.state())
        self._named(unit)
        return unit

    def _hyper(self, lr: float, parity: int | None) -> dict:
        hyper = {"lr": lr, **self.hyper}
        if self.recipe.flip and self.recipe.alt_flip:
            hyper["flip_parity"] = self.queue.epoch % 2 if parity is None else parity
        return hyper

    def replicate(self, worker_id: str, original: dict, compute_as: str | None = None) -> WorkUnit:
        """The unit of store row ``original`` again, for ``worker_id``: the same base, shards,
        hyperparameters and seed (so an honest worker computes the same delta), its own id and lease;
        ``compute_as``: the original's backend, for a worker of another backend that computes as it does."""
        issued = WorkUnit.from_json(json.loads(original["wire"]))
        now = self.clock()
        unit_id = self._unit_id()
        claim = issued.local_steps * issued.batch_size
        deadline = round(now + self.deadlines.lease_seconds(worker_id, claim), 3)
        lease = leases.sign(self.key, self.config.job, unit_id, worker_id, issued.base_step, deadline)
        # the blob the original trained from (an fp16 copy or a reconstruction, kept while the result is held:
        # ``checked_bases``), downloaded whole: the replica's worker may not hold the version a delta starts from
        unit = dataclasses.replace(issued, unit_id=unit_id, lease=lease, deadline=deadline, base_delta=None,
                                   error_feedback=False, compute_as=compute_as)
        self.store.insert_unit(unit_id, worker_id, list(issued.shard_ids), issued.base_step, original["lr"],
                               issued.seed, deadline, claim, now, wire=unit.wire,
                               replica_of=original["unit_id"])
        self._named(unit)
        return unit

    def _unit_id(self) -> str:
        return self.entropy.unit_id() if self.rng is None else f"{self.rng.getrandbits(64):016x}"

    def requeue(self, shards: list[str]) -> None:
        """Shards whose result was not used (a quarantined or distrusted worker's): trained again first."""
        self.queue.requeue(self._queued(shards))
        self.store.set_meta("queue", self.queue.state())

    # ------------------------------------------------------------------ units that will not come back
    def give_up(self, unit: dict, status: str) -> None:
        """``unit`` (a store row) will not be used: its shards go back in line (once), unless its
        second copy covers them or it is a replica."""
        queue = self.queue.state() if unit["status"] == "leased" and self._back_in_line(unit) else None
        self.store.set_unit_status(unit["unit_id"], status, only_if=None, queue=queue, read=unit)   # one statement

    def put_back(self, units: list[dict]) -> None:
        """Units another process of the job moved as handed back or failed (``RedisStore.give_back``), once each:
        their shards go back in line as ``give_up`` puts them (in the caller's transaction)."""
        moved = [unit for unit in units if self._back_in_line(unit)]
        if moved:
            self.store.set_meta("queue", self.queue.state())

    def _back_in_line(self, unit: dict) -> bool:
        """``unit``'s shards go to the front of the queue, unless its second copy covers them or it is a replica."""
        if unit.get("replica_of") or self.store.twin_alive(unit):
            return False
        self.queue.requeue(self._queued(unit["shard_ids"]))
        return True

    def expire(self) -> int:
        """Leases past their deadline: their shards go to the front of the queue."""
        expired = self.store.expire_leases(self.clock())
        for row in expired:
            self._back_in_line(row)
        if expired:
            self.store.set_meta("queue", self.queue.state())
        return len(expired)

    def retrying(self) -> set[str]:
        """Shards of units that will not come back, waiting to be handed out again first."""
        return set(self.queue.retry)

    def observe(self, worker_id: str, wall_s: float, samples: int) -> None:
        """A finished unit's wall time (issue to result) tunes that worker's next leases, and the size
        of a tab's next unit."""
        self.deadlines.observe(worker_id, wall_s, samples)
        if samples > 0 and wall_s > 0:
            old, rate = self.speed.get(worker_id), wall_s / samples
            self.speed[worker_id] = rate if old is None else (1 - SPEED_ALPHA) * old + SPEED_ALPHA * rate

    # ------------------------------------------------------------------ batch split over workers in flight
    @staticmethod
    def _dense(model: str) -> bool:
        from models import registry

        return registry.get(model).kind == "dense"

    def in_flight(self, now: float) -> int:
        """Python workers in flight: those that asked for a unit within ``IN_FLIGHT_UNITS`` of their own
        unit durations (their measured speed; ``IN_FLIGHT_MIN_S`` at least); forgets the others (at most
        once a second: with a thousand workers a pass on every request costs)."""
        if now - self._pruned < 1.0:
            return len(self.asked)
        self._pruned = now
        for worker, (at, samples) in list(self.asked.items()):
            rate = self.speed.get(worker)
            window = max(IN_FLIGHT_MIN_S, IN_FLIGHT_UNITS * rate * samples if rate else self.deadlines.first_s)
            if now - at > window:
                del self.asked[worker]
        return len(self.asked)

    def _pace(self, worker_id: str) -> float:
        """``dynamic_steps``: (the fastest worker in flight's seconds per sample) / (this worker's), the
        share of a whole unit this worker gets; 1 while its speed is unknown."""
        rate = self.speed.get(worker_id)
        if rate is None:
            return 1.0
        return min([self.speed[w] for w in self.asked if w in self.speed] + [rate]) / rate

    def _flight_share(self, images: int) -> float:
        """``flight_samples``: the share of a unit of ``images`` samples to train so that the workers in flight
        hold about ``flight_samples`` samples of units between them (1 when they hold fewer, or it is off).
        Call after ``_split_batch`` (which records the asking worker)."""
        if not self.config.flight_samples or self.config.local_steps:
            return 1.0
        return min(1.0, self.config.flight_samples / (max(1, self.in_flight(self.clock())) * images))

    def _split_batch(self, worker_id: str, images: int) -> int:
        """A Python worker's unit batch: the recipe's (already ``unit_batch_scale`` of the model's), divided
        by (workers in flight) / 2 when more than 2 are, to a power of two of at least ``MIN_SPLIT_BATCH``
        (``unit_batch_workers``; not with an explicit ``--batch-size``). With N workers each unit starts
        from a model that lacks the other N - 1 units in flight, like one SGD step at N x the batch."""
        now, batch = self.clock(), self.recipe.batch_size
        self.asked[worker_id] = (now, images)
        if not self.split_batch:
            return batch
        workers = self.in_flight(now)
        if workers <= 2:
            return batch
        split = max(MIN_SPLIT_BATCH, batch * 2 // workers)
        split = 1 << (split.bit_length() - 1)   # a power of two, at most batch * 2 / workers
        return max(1, min(batch, max(split, MIN_SPLIT_BATCH)))

    # ------------------------------------------------------------------ units sized to the tab
    def size_of(self, shard: str) -> int:
        """Images in a shard blob (one of the job's shards, or a first unit's slice of one)."""
        n = self.shard_sizes.get(shard)
        return self.slice_sizes[shard] if n is None else n

    def _queued(self, shards: list[str]) -> list[str]:
        """The job's own shards among ``shards`` (slices are extra samples: they never go back in line)."""
        return [s for s in shards if s in self.shard_sizes]

    def _is_browser(self, worker_id: str, backend: str | None) -> bool:
        if backend is None:
            record = self.store.trust_record(worker_id)
            backend = record.get("backend") if record else None
        return backend == "browser"

    def sized_steps(self, worker_id: str, trusted: bool = False) -> int:
        """Steps of a tab's next unit at the job's batch: one while its speed is unknown, then
        about ``unit_seconds`` of its measured seconds per sample, at most ``GROWTH`` x its last
        unit and ``MAX_UNIT_SHARDS`` shards' worth of samples (and ``check_max_steps`` with checks on,
        unless ``trusted``: the operator's own)."""
        cfg, batch = self.config, self.recipe.batch_size
        rate = self.speed.get(worker_id)
        if rate is None:
            return FIRST_STEPS
        steps = max(1, round(cfg.unit_seconds / (rate * batch)))
        steps = min(steps, GROWTH * self.last_steps.get(worker_id, FIRST_STEPS))
        if self.may_check(trusted):
            steps = min(steps, cfg.check_max_steps)
        return min(steps, max(1, MAX_UNIT_SHARDS * max(self.shard_sizes.values()) // batch))

    def _issue_sized(self, worker_id: str, codec: str, base: Base, lr: float, held: tuple[str, ...] = (),
                     feedback: bool = False, trusted: bool = False) -> WorkUnit:
        """A tab's unit: ``sized_steps`` steps at the recipe's batch (the step graph's), on shards that
        hold at least its samples; a tab of unknown speed gets a slice of a shard and an fp16 model."""
        batch = self.recipe.batch_size
        steps = self.sized_steps(worker_id, trusted)
        samples = steps * batch
        first = worker_id not in self.speed
        shards = [self._slice(samples)] if first else []
        if not shards or shards[0] is None:
            shards = self._take(max(1, math.ceil(samples / max(self.shard_sizes.values()))), batch)
        version = self._half_version(base) if first and not held else None
        unit = self._issue(worker_id, codec, base, shards, lr, steps=steps, version_blob=version, held=held,
                           feedback=feedback, trusted=trusted)
        self.last_steps[worker_id] = steps
        return unit

    def _take(self, count: int, batch: int) -> list[str]:
        """``count`` shards from the queue (more while they hold fewer than ``batch`` images)."""
        per_unit, busy = self.queue.per_unit, set(self.store.leased_shards())
        try:
            self.queue.per_unit = max(1, min(count, len(self.shard_sizes)))
            shards = self.queue.take(busy)
            self.queue.per_unit = 1
            while sum(self.shard_sizes[s] for s in shards) < batch and len(shards) < len(self.shard_sizes):
                more = [s for s in self.queue.take(busy | set(shards)) if s not in shards]
                if not more:
                    break
                shards += more
        finally:
            self.queue.per_unit = per_unit
        return shards

    def _slice(self, n: int) -> str | None:
        """A shard blob of ``n`` images: the first ``n`` of the next job shard in rotation, cut once and
        kept (at most one per shard and size). None when that shard holds no more than ``n`` images."""
        shards = list(self.shard_sizes)
        parent = shards[self._next_slice % len(shards)]
        if self.shard_sizes[parent] <= n:
            return None
        self._next_slice += 1
        key = f"{parent}:{n}"
        known = self.slices.get(key)
        if known is None or self.store.blob_path(known[0]) is None:
            x, y = decode_shard(self.store.get_blob(parent))
            blob = self.store.put_blob(encode_shard(x[:n], y[:n]))
            self.slices[key] = [blob, n]
            self.slice_sizes[blob] = n
        self._save_first()
        return self.slices[key][0]

    def _half_version(self, base: Base) -> str:
        """``base`` as an fp16 blob (made once per version; dropped once none of its units is out and no
        result cut from it is held for a check), or ``base.blob`` when a value does not fit in fp16."""
        if base.blob in self._no_half:
            return base.blob
        entry = self.half.get(base.blob)
        if entry is None or self.store.blob_path(entry["blob"]) is None:
            entry = self.add_half(base, self.make_half(base))   # blocking: see ``wanted_half``
        return base.blob if entry is None else entry["blob"]

    def wanted_half(self, base: Base, held: tuple[str, ...]) -> bool:
        """Would a unit for this request name ``base``'s fp16 copy, not made yet? (The HTTP service makes
        it in a thread first: ``make_half`` then ``add_half``.)"""
        if self.config.version_download == "fp32" or base.blob in self._no_half:
            return False
        entry = self.half.get(base.blob)
        return (entry is None or self.store.blob_path(entry["blob"]) is None) and self._best_held(base, held) is None

    def make_half(self, base: Base, state: dict | None = None) -> str | None:
        """``base`` as an fp16 container, written as a blob (blocking; touches nothing but blobs); None
        when a value does not fit in fp16. ``state``: its arrays, when the caller holds them (else read back)."""
        try:
            data = encode_delta(get_codec("fp16"), decode_delta(self.store.get_blob(base.blob)) if state is None
                                else state)
        except ContractError:
            return None
        return self.store.put_blob(data)

    def add_half(self, base: Base, blob: str | None) -> dict | None:
        """Keep ``make_half``'s copy of ``base`` (older copies are swept once per new copy)."""
        if blob is None:
            self._no_half.add(base.blob)
            return None
        entry = self.half.get(base.blob)
        if entry is None or self.store.blob_path(entry["blob"]) is None:
            entry = self.half[base.blob] = {"blob": blob, "units": []}
            self._half_of[blob] = base.blob
            self._sweep_half(keep=base.blob)   # once per new copy (each request would cost a pass over the units)
        return entry

    def _sweep_half(self, keep: str) -> None:
        """Delete the fp16 copies of older versions whose units are no longer out, but (unless
        ``version_download`` is fp32) the newest ``HALF_KEPT``: a worker that trained from one may name it
        as held (``_download``); and none that a result held for a check was computed from."""
        kept = HALF_KEPT if self.config.version_download != "fp32" else 0
        older = [v for v in self.half if v != keep]
        now, checked = self.clock(), self.checked_bases()
        for version in older[:max(0, len(older) - kept)]:
            units = [self.store.unit(u) for u in self.half[version]["units"]]   # (a state from before "until")
            if self.half[version]["blob"] in checked:
                continue
            if self.half[version].get("until", 0.0) < now and all(u is None or u["status"] != "leased" for u in units):
                gone = self.half.pop(version)["blob"]
                self._half_of.pop(gone, None)
                self.store.delete_blob(gone, durable_first=False)   # (no fdatasync on the event loop)
        self._save_first()

    def _save_first(self) -> None:
        """Save the first units' slices and the list of fp16 copies (``first_units``), at most every
        ``FIRST_SAVE_S`` (``flush`` saves what is left): the list holds every copy a unit out names, one
        per version, and was saved twice per version. After a ``kill -9`` a restart may miss what its last
        second changed: a copy made then is never swept (a blob left on disk), one first named then may
        be swept while a unit out names it (that unit's worker fetched it as it got the unit, or fails it
        and the unit goes back in line); a slice is cut again."""
        now = self.clock()
        if now - self._first_saved < FIRST_SAVE_S:
            self._first_dirty = True
            return
        self._first_saved, self._first_dirty = now, False
        self.store.set_meta("first_units", {"next": self._next_slice, "slices": self.slices, "half": self.half},
                            later=True)   # (put off with write_behind: a kill -9 may lose it, as said above)

    def flush(self, force: bool = False) -> None:
        """Save what ``_save_first`` has put off, once ``FIRST_SAVE_S`` has passed since the last save (the
        job asks at each settle), or at once with ``force`` (on close)."""
        if self._first_dirty:
            if force:
                self._first_saved = -math.inf
            self._save_first()

    # ------------------------------------------------------------------ what a unit's worker downloads
    def _download(self, base: Base, held: tuple[str, ...]) -> tuple[str, dict | None]:
        """(model_version, base_delta) of a unit cut from ``base`` for a worker that holds ``held``
        (``version_download``, docs/protocol.md "Version deltas"): the version it holds if that is
        ``base`` (or a copy of it), else a version delta from the newest held version this factory
        knows, else ``base`` as fp16. A held id that is no model version of this job, or one already
        deleted, counts as not held. With ``fp32``: ``base`` itself. (With replicated checks too: a
        replica names the same blob, which is kept while the result to check is held: ``checked_bases``.)"""
        mode = self.config.version_download
        if mode == "fp32":
            return base.blob, None
        best = self._best_held(base, held)
        if best is not None and best[1] == base.step:
            return best[0], None
        if best is not None and mode == "delta":
            entry = self._pair(best[0], base)
            if entry is None:
                try:
                    entry = self.add_pair(self.make_pair(best[0], base))   # blocking: see ``wanted_pair``
                except (ContractError, OSError, KeyError):   # not a model blob of this job after all, or deleted
                    entry = None
            if entry is not None:
                return entry["blob"], {"from": best[0], "blob": entry["delta"]}
        return self._half_version(base), None

    def _best_held(self, base: Base, held: tuple[str, ...]) -> tuple[str, int] | None:
        """(blob, step) of the newest version in ``held`` that this factory knows, not newer than ``base``."""
        best = None
        for h in held:
            step = self._known_step(h)
            if step is not None and step <= base.step and (best is None or step > best[1]):
                best = (h, step)
        return best

    def _known_step(self, blob: str) -> int | None:
        """The version step that ``blob`` (a version, its fp16 copy or a reconstruction) stands for, if it
        is still kept; None for anything else."""
        step = self.seen.get(blob)
        if step is None and blob in self.derived:
            step = self.derived[blob]["step"]
        if step is None and blob in self._half_of:
            step = self.seen.get(self._half_of[blob])
        return step if step is not None and self.store.blob_path(blob) is not None else None

    def _pair(self, held: str, base: Base) -> dict | None:
        """The kept reconstruction of ``base`` from ``held`` and its delta, if both blobs are still there."""
        known = self.pairs.get((held, base.blob))
        entry = self.derived.get(known) if known else None
        if entry is None or self.store.blob_path(entry["blob"]) is None or self.store.blob_path(entry["delta"]) is None:
            return None
        return entry

    def wanted_pair(self, base: Base, held: tuple[str, ...]) -> str | None:
        """The held version a unit for this request would need a new version delta from (None: none
        needed, or made already). The HTTP service makes it in a thread first (``make_pair`` then
        ``add_pair``), so that the event loop does not spend a tenth of a second of zlib on it."""
        if self.config.version_download != "delta":
            return None
        best = self._best_held(base, held)
        if best is None or best[1] == base.step or self._pair(best[0], base) is not None:
            return None
        return best[0]

    def make_pair(self, held: str, base: Base) -> dict:
        """The reconstruction of ``base`` from ``held`` and its version delta, written as blobs (blocking;
        touches nothing but blobs, so it may run in a thread). ``ContractError`` when ``held`` is not a
        model version with ``base``'s tensors."""
        target = self._target
        if target is None or target[0] != base.blob:
            target = self._target = (base.blob, decode_delta(self.store.get_blob(base.blob)))
        blob, recon = make_version_delta(decode_delta(self.store.get_blob(held)), target[1])
        return {"blob": self.store.put_blob(version_blob(recon)), "delta": self.store.put_blob(blob),
                "step": base.step, "from": held, "target": base.blob, "until": 0.0}

    def add_pair(self, entry: dict) -> dict:
        """Keep a pair from ``make_pair`` (the oldest beyond the bound are deleted)."""
        self.derived.pop(entry["blob"], None)
        self.derived[entry["blob"]] = entry
        self.pairs[(entry["from"], entry["target"])] = entry["blob"]
        self._sweep_derived(keep=entry["blob"])   # not the pair a unit is about to name (no unit names it yet)
        return entry

    def _named(self, unit: WorkUnit) -> None:
        """A unit names its base blob: keep that blob (an fp16 copy or a reconstruction) while it is out."""
        entry = self.derived.get(unit.model_version)
        if entry is not None:
            first, entry["until"] = not entry["until"], max(entry["until"], unit.deadline)
            if first:   # saved once named (a restart keeps it while the first unit is out), not on every unit
                self._save_derived()
        version = self._half_of.get(unit.model_version)
        half = self.half.get(version) if version is not None else None
        if half is not None:   # kept until the last deadline of the units that name it
            first, half["until"] = not half.get("until"), max(half.get("until", 0.0), unit.deadline)
            if first:
                self._save_first()

    def checked_bases(self) -> set[str]:
        """The blobs (``model_version``) that results held for a replicated check were computed from: a
        replica names the same blob and the coordinator's own recomputation reads it, so they stay."""
        if self.config.replication == "off":
            return set()
        bases = set()
        for row in self.store.held_results():
            unit = self.store.unit(row["unit_id"])
            if unit is not None and unit.get("wire"):
                bases.add(json.loads(unit["wire"])["model_version"])
        return bases

    def _sweep_derived(self, keep: str | None = None) -> None:
        """Delete the oldest reconstructions and their deltas beyond ``DERIVED_KEPT`` whose units are back (or
        past their deadline); beyond 4x that, the oldest whatever (their workers reconstruct from the delta
        they already have, or fail the unit with a clear error)."""
        now, used = self.clock(), set(self.seen) | set(self._half_of)
        spared = self.checked_bases() | {keep}
        while len(self.derived) > DERIVED_KEPT:
            victim = next((b for b, e in self.derived.items() if e["until"] < now and b not in spared), None)
            if victim is None:
                if len(self.derived) <= 4 * DERIVED_KEPT:
                    break
                victim = next((b for b in self.derived if b not in spared), None)
                if victim is None:
                    break
            entry = self.derived.pop(victim)
            self.pairs = {k: v for k, v in self.pairs.items() if v != victim}
            others = {b for e in self.derived.values() for b in (e["blob"], e["delta"])}
            for b in (entry["blob"], entry["delta"]):
                if b not in used and b not in others:
                    self.store.delete_blob(b, durable_first=False)
        self._save_derived()

    def _save_derived(self) -> None:
        self.store.set_meta("version_deltas", {"derived": list(self.derived.values())})
