"""Virtual workers on a simulated clock around the coordinator's own ``Job``.

Only time is simulated. Units come from ``Job.next_unit`` (the real ``ShardQueue``,
``Deadlines`` and signed leases), results are real ``models.local.run_local`` deltas
encoded with the unit's codec and packed with ``pack_result``, and go through
``Job.submit`` (the same checks, SQLite log and strategy as over HTTP); lost units come
back through ``Job.expire_leases``. The job's clock is the simulator's: a unit's duration
is its samples divided by the worker's simulated speed, plus network delays.

One event queue, ordered by (simulated time, insertion number); every random draw comes
from a generator seeded by (scenario seed, worker lineage), so one seed gives one result,
and every strategy in a scenario meets the same workers (speeds, lifetimes, arrivals).

Lying workers (``[liars]``): a liar computes each unit honestly and sends what its ``Liar``
(``coordinator/sim/faults.py``, the same code as the tests' attack workers) makes of it; which
workers lie is drawn from the seed, apart from the workers' own generators, so a clean run and
a run with liars meet the same fleet. A run reports the liars' folded units, when each was
quarantined (in its own results sent, and simulated seconds), and what replication cost.
"""
from __future__ import annotations

import asyncio
import dataclasses
import heapq
import math
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from contract.codecs import decode_delta
from contract.shards import decode_shard
from contract.units import MAX_HELD, UnitRequest, WorkUnit, pack_result
from contract.versions import reconstruct_checked
from coordinator import trust as T
from coordinator.config import CoordinatorConfig
from coordinator.factory import MIN_SPLIT_BATCH
from coordinator.job import Job, Rejection
from coordinator.sim.faults import Collusion, Fault, Liar, a_little_z, flip_labels
from coordinator.sim.scenario import Scenario, StrategySpec
from models import registry
from models.data import Cifar10
from worker_py.runner import MODEL_VERSIONS_KEPT
from worker_py.unit import failed_result, prefetch_due, run_unit

RETRY_S = 5.0                      # "nothing to do now": ask again after this (the coordinator's Retry-After)
HAND_BACK = "returned: worker leaving"   # error text of a unit a leaving worker hands back


class SimClock:
    """The job's clock: simulated seconds since the start (the coordinator reads unix seconds)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Worker:
    wid: str
    key: tuple[int, ...]          # seeds its generator: (kind, index) or a restart of one
    order: int                    # creation order: a scheduled "leave" takes the oldest first
    speed: float                  # samples per simulated second
    rng: np.random.Generator
    alive: bool = True
    token: int = 0                # bumped when the worker goes: its queued events no longer count
    restarts: int = 0
    shards: set[str] = field(default_factory=set)
    unit: WorkUnit | None = None  # the unit being computed (or about to be)
    base: dict | None = None      # the decoded base model of ``unit``
    versions: dict = field(default_factory=dict)   # model versions it holds decoded (blob id -> arrays), oldest first
    next: tuple | None = None     # a prefetched unit: (unit, base, blobs in at, issued at, speed jitter)
    asking: bool = False          # a request for a unit is on its way
    fetch_s: float = 0.0          # how long the last unit request and its downloads took
    liar: Liar | None = None      # a lying worker: what it sends for each unit it computed honestly
    sent: int = 0                 # results it sent (its units, replicas included)


@dataclass
class Eval:
    sim_time_s: float
    samples_applied: int
    samples_computed: int
    version: int
    test_acc: float
    test_loss: float | None


@dataclass
class RunResult:
    label: str                     # strategy label, plus the sweep point
    strategy_label: str
    strategy: str
    params: dict
    point: dict
    summary: dict
    evals: list[Eval]
    updates: list[dict]            # every accepted result: staleness, applied version or why dropped
    units: list[dict]              # every issued unit and its fate
    wall_s: float


class Simulation:
    """One strategy at one sweep point: a fresh job in ``workdir``, run to its budget."""

    def __init__(self, scenario: Scenario, strategy: StrategySpec, data: Cifar10, workdir: Path,
                 label: str, progress: bool = False):
        self.sc, self.strategy, self.data, self.label, self.progress = scenario, strategy, data, label, progress
        v = scenario.values
        self.model_cfg, self.budget_cfg, self.workers_cfg = v["model"], v["budget"], v["workers"]
        self.churn, self.net = v["churn"], v["network"]
        self.clock = SimClock()
        budget = self.budget_cfg
        self.config = CoordinatorConfig(
            state=workdir / "state", model=self.model_cfg["name"], strategy=strategy.name,
            strategy_params=dict(strategy.params), job="sim", seed=scenario.seed,
            shard_size=self.model_cfg["shard_size"], shards_per_unit=self.model_cfg["shards_per_unit"],
            local_steps=self.model_cfg["local_steps"], batch_size=self.model_cfg["batch_size"],
            lr=self.model_cfg["lr"], epochs=budget["epochs"], codec=self.model_cfg["codec"],
            eval_images=budget["eval_images"] or None, limit_train=budget["train_images"] or None,
            **{**v["coordinator"], **strategy.coordinator})
        self.liars_cfg = v["liars"]
        self.job = Job(self.config, clock=self.clock, rng=random.Random(scenario.seed))
        self.events: list[tuple] = []
        self.seq = 0
        self.workers: dict[str, Worker] = {}
        self.units: dict[str, dict] = {}
        self.evals: list[Eval] = []
        self.samples_computed = 0
        self.shard_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.model: torch.nn.Module | None = None
        self.stalled = ""
        self.units_computed = 0          # by workers (replicas included)
        self.refused_in_a_row = 0
        self.replicas_computed = 0
        self.quarantined: dict[str, dict] = {}   # liar id -> {units, sim_time_s, folded before}
        self._init_liars()

    # ------------------------------------------------------------------ events
    def push(self, t: float, kind: str, worker: Worker | None = None, payload: Any = None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, worker, worker.token if worker else 0, payload))

    def latency(self, w: Worker) -> float:
        return self.net["latency_s"].sample(w.rng)

    def transfer(self, w: Worker, nbytes: int) -> float:
        return self.latency(w) + nbytes * 8 / (self.net["bandwidth_mbps"] * 1e6)

    # ------------------------------------------------------------------ liars
    def _init_liars(self) -> None:
        """Which of the workers at time 0 lie, and with which fault: round(fraction x count) of them, drawn
        from their own generator (the fleet's draws do not change), faults given in turn."""
        cfg, count = self.liars_cfg, self.workers_cfg["count"]
        n = math.floor(cfg["fraction"] * count + 0.5)
        chosen = sorted(np.random.default_rng([self.sc.seed, 0x11A5]).choice(count, size=n, replace=False).tolist())
        self.faults = [Fault(f) for f in cfg["fault"]]
        self.initial_liars = {i: self.faults[j % len(self.faults)] for j, i in enumerate(chosen)}
        z = a_little_z(count, max(1, n)) if cfg["z"] == "auto" else cfg["z"]
        self.collusion = Collusion(z=z, window=cfg["window"])

    def _fault_for(self, key: tuple[int, ...], inherited: Fault | None) -> Fault | None:
        if inherited is not None or key[0] == 3:            # a restart keeps its lineage's fault (or honesty)
            return inherited
        if key[0] == 0:
            return self.initial_liars.get(key[1])
        rng = np.random.default_rng([self.sc.seed, 0x11A5, *key])   # an arrival: lies with the fraction's chance
        if rng.random() < self.liars_cfg["fraction"]:
            return self.faults[int(rng.integers(len(self.faults)))]
        return None

    def _liar(self, wid: str, fault: Fault | None) -> Liar | None:
        if fault is None:
            return None
        collusion = self.collusion if self.liars_cfg["collude"] else Collusion(z=self.collusion.z,
                                                                               window=self.collusion.window)
        return Liar(wid, fault, collusion, honest_first=self.liars_cfg["honest_first"])

    def spawn(self, wid: str, key: tuple[int, ...], t: float, restarts: int = 0, fault: Fault | None = None) -> Worker:
        rng = np.random.default_rng([self.sc.seed, *key])
        speed = self.workers_cfg["speed"].sample(rng)
        if rng.random() < self.workers_cfg["stragglers"]:
            speed /= self.workers_cfg["straggler_slowdown"]
        w = Worker(wid, key, len(self.workers), speed, rng, restarts=restarts)
        w.liar = self._liar(wid, self._fault_for(key, fault))
        self.workers[wid] = w
        rate = self.churn["leave_per_hour"] / 3600.0
        if rate > 0:
            self.push(t + rng.exponential(1.0 / rate), "leave", w)
        self.ask(w, t)
        return w

    def gone(self, w: Worker, fate: str | None) -> None:
        """The worker stops; its units, if any, are lost (``fate``) unless handed back by the caller."""
        for unit in self.held(w):
            if fate is not None:
                self.units[unit.unit_id]["fate"] = fate
        w.alive, w.token, w.unit, w.base, w.next = False, w.token + 1, None, None, None
        w.versions.clear()

    @staticmethod
    def held(w: Worker) -> list[WorkUnit]:
        return [u for u in (w.unit, w.next[0] if w.next else None) if u is not None]

    def ask(self, w: Worker, at: float) -> None:
        """The worker sends a unit request at ``at``; it reaches the coordinator one latency later."""
        w.asking = True
        self.push(at + self.latency(w), "ask", w)

    # ------------------------------------------------------------------ handlers
    async def on_ask(self, t: float, w: Worker) -> None:
        job = self.job
        w.asking = False
        job.expire_leases()
        retry = job.factory.retrying()
        held = tuple(reversed(w.versions))[:MAX_HELD]
        unit = job.next_unit(UnitRequest(worker_id=w.wid, backend="python", held=held), key=f"{w.wid}-key")
        if unit is None:
            if w.unit is not None:
                return                          # a prefetch came back empty: ask again after submitting
            if job.finished:
                self.gone(w, None)
            else:
                self.ask(w, t + self.latency(w) + RETRY_S)
            return
        jitter = math.exp(self.workers_cfg["jitter"] * w.rng.standard_normal())   # this unit's speed noise
        new_shards = [s for s in unit.shard_ids if s not in w.shards]
        base, model_bytes = self._base(w, unit)
        nbytes = model_bytes + sum(job.store.blob_path(s).stat().st_size for s in new_shards)
        w.shards.update(new_shards)
        ready = t + self.latency(w) + self.transfer(w, nbytes)
        w.fetch_s = ready - t
        self.units[unit.unit_id] = {
            "unit_id": unit.unit_id, "worker_id": w.wid, "issued_s": t, "base_version": unit.base_step,
            "samples": unit.local_steps * unit.batch_size, "deadline_s": unit.deadline,
            "reissue": bool(retry & set(unit.shard_ids)), "fate": "in flight", "model_bytes": model_bytes}
        if w.unit is None:
            self.start(w, unit, base, ready, t, jitter)
        else:
            w.next = (unit, base, ready, t, jitter)

    def _base(self, w: Worker, unit: WorkUnit) -> tuple[dict, int]:
        """The unit's base model as the Python worker gets it (``worker_py.runner``): a version it holds,
        rebuilt from one it holds and the unit's version delta (hash-checked), or downloaded whole;
        and the bytes downloaded for it."""
        store, bd, nbytes = self.job.store, unit.base_delta, 0
        if unit.model_version in w.versions:
            state = w.versions.pop(unit.model_version)
            if self.job.config.version_download == "fp32":   # charged anyway, as before version deltas existed
                nbytes = len(store.get_blob(unit.model_version))
        elif bd is not None and bd["from"] in w.versions:
            data = store.get_blob(bd["blob"])
            state, nbytes = reconstruct_checked(w.versions[bd["from"]], data, unit.model_version), len(data)
        else:
            data = store.get_blob(unit.model_version)
            state, nbytes = decode_delta(data), len(data)
        w.versions[unit.model_version] = state
        while len(w.versions) > MODEL_VERSIONS_KEPT:
            w.versions.pop(next(iter(w.versions)))
        return state, nbytes

    def start(self, w: Worker, unit: WorkUnit, base: dict, at: float, issued: float, jitter: float) -> None:
        """The worker starts computing ``unit`` (issued at ``issued``) at ``at``; a crash falls anywhere
        between issue and the end. With prefetch it asks for the next unit when ``worker_py``'s own
        rule (``prefetch_due``) says so, from the duration of its last fetch."""
        w.unit, w.base = unit, base
        steps = unit.local_steps
        compute = steps * unit.batch_size / (w.speed * jitter)
        if w.rng.random() < self.churn["die_in_unit"]:
            self.push(issued + w.rng.random() * (at + compute - issued), "crash", w)
        else:
            self.push(at + compute, "computed", w)
        if self.workers_cfg["prefetch"]:
            step_s = compute / steps
            first = next(s for s in range(1, steps + 1) if prefetch_due(s, steps, (s - 1) * step_s, w.fetch_s))
            self.ask(w, at + (first - 1) * step_s)

    def on_computed(self, t: float, w: Worker) -> None:
        unit = w.unit
        xs, ys = zip(*(self._shard(s) for s in unit.shard_ids))
        if self.model is None:
            self.model = registry.build(unit.model)
        x, y, base = np.concatenate(xs), np.concatenate(ys), w.base
        seconds = t - self.units[unit.unit_id]["issued_s"]

        def honest(u: WorkUnit, flip: bool = False):
            return run_unit(u, base, x, flip_labels(y) if flip else y, w.wid, model=self.model,
                            compute_seconds=seconds)
        result = honest(unit) if w.liar is None else w.liar.result(unit, honest)
        self.samples_computed += result.num_samples
        self.units_computed += 1
        if (self.job.store.unit(unit.unit_id) or {}).get("replica_of"):
            self.replicas_computed += 1
            self.units[unit.unit_id]["replica"] = True
        body = pack_result(result)
        self.push(t + self.transfer(w, len(body)), "submit", w, body)

    def _shard(self, blob: str) -> tuple[np.ndarray, np.ndarray]:
        if blob not in self.shard_cache:
            self.shard_cache[blob] = decode_shard(self.job.store.get_blob(blob))
        return self.shard_cache[blob]

    async def on_submit(self, t: float, w: Worker, body: bytes) -> None:
        unit_id = w.unit.unit_id
        record = self.units[unit_id]
        trust = self.job.trust.get(w.wid)      # trusted when it sends: its results are checked only now and then
        record["trusted"] = T.vouches(trust, self.job.policy)
        try:
            answer = await self.job.submit(unit_id, body)
            record["fate"] = "accepted (late)" if answer.get("late") else "accepted"
            self.refused_in_a_row = 0
        except Rejection as r:
            record["fate"] = f"rejected: {r.code}"
            self.refused_in_a_row += 1
        w.sent += 1
        await self.job.settle()   # the coordinator's aggregation task, run at once on the simulated clock
        self._watch_trust(t)
        w.unit, w.base = None, None
        answered = t + self.latency(w)
        if w.next is not None:
            unit, base, ready, issued, jitter = w.next
            w.next = None
            self.start(w, unit, base, max(answered, ready), issued, jitter)
        elif not w.asking:
            self.ask(w, answered)

    async def on_hand_back(self, t: float, w: Worker, unit: WorkUnit) -> None:
        body = pack_result(failed_result(unit, w.wid, HAND_BACK))
        try:
            await self.job.submit(unit.unit_id, body)
            self.units[unit.unit_id]["fate"] = "handed back"
        except Rejection as r:
            self.units[unit.unit_id]["fate"] = f"hand-back rejected: {r.code}"

    def on_leave(self, t: float, w: Worker) -> None:
        if not w.alive:
            return
        units = self.held(w)
        if units and w.rng.random() < self.churn["hand_back"]:
            self.gone(w, "handing back")
            for unit in units:                    # the prefetched one too, as worker_py does on SIGTERM
                self.push(t + self.latency(w), "hand_back", w, unit)
        else:
            self.gone(w, "lost: left")

    def on_crash(self, t: float, w: Worker) -> None:
        self.gone(w, "lost: crashed")
        root, restarts = w.wid.split(".")[0], w.restarts + 1
        key = w.key[:2] + (3, restarts)
        back = self.churn["restart_s"].sample(w.rng)
        self.push(t + back, "restart", None, (f"{root}.{restarts}", key, restarts, w.liar and w.liar.fault))

    def _watch_trust(self, t: float) -> None:
        """After each settle: a liar newly quarantined (when, after how many of its results, and what of it
        was folded by then)."""
        trust = self.job.trust
        for w in self.workers.values():
            if w.liar is not None and w.wid not in self.quarantined and trust.quarantined(w.wid):
                self.quarantined[w.wid] = {"units": w.sent, "sim_time_s": round(t, 6),
                                           "folded_before": self._folded(w.wid)}

    def _folded(self, wid: str) -> int:
        return sum(1 for r in self.job.store.results() if r["worker_id"] == wid and r["applied_step"] is not None)

    def on_schedule(self, t: float, leave: int, join: int) -> None:
        alive = sorted((w for w in self.workers.values() if w.alive), key=lambda w: w.order)
        for w in alive[:leave]:
            self.gone(w, "lost: left")
        for _ in range(join):
            self.joined += 1
            self.spawn(f"s{self.joined}", (2, self.joined), t)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> None:
        row = self.job.evaluate_current()
        self.job.record_eval(row)
        self.evals.append(Eval(round(self.clock.now, 6), int(self.job.samples), int(self.samples_computed),
                               int(self.job.step), float(row["test_acc"]),
                               None if row["test_loss"] is None else float(row["test_loss"])))

    def maybe_evaluate(self) -> None:
        crossed = False
        while self.next_eval < len(self.thresholds) and self.job.samples >= self.thresholds[self.next_eval]:
            self.next_eval += 1
            crossed = True
        if crossed and (not self.evals or self.evals[-1].version != self.job.step):
            self.evaluate()

    # ------------------------------------------------------------------ the run
    async def _loop(self) -> None:
        job, sc = self.job, self.sc
        job.open(self.data)
        n_eval = self.budget_cfg["evals"]
        self.thresholds = [job.budget * i / n_eval for i in range(1, n_eval + 1)]
        self.next_eval = 0
        self.evaluate()                                   # the initial model, at time 0
        for i in range(self.workers_cfg["count"]):
            self.spawn(f"w{i}", (0, i), 0.0)
        join_rate = self.churn["join_per_hour"] * self.workers_cfg["count"] / 3600.0
        arrivals = np.random.default_rng([sc.seed, 1, 0xA])
        self.arrived = self.joined = 0
        if join_rate > 0:
            self.push(arrivals.exponential(1.0 / join_rate), "arrive")
        for at, leave, join in self.churn["schedule"]:
            self.push(at, "schedule", None, (leave, join))
        limit = sc.max_hours * 3600.0
        bar = tqdm(total=job.budget, desc=self.label, unit="sample", disable=not self.progress, leave=True,
                   dynamic_ncols=True)
        shown = 0
        batch = self.model_cfg["batch_size"] or job.recipe.batch_size   # "none": the coordinator's units
        unit_samples = batch * (self.model_cfg["local_steps"] or max(1, math.ceil(
            self.model_cfg["shard_size"] * self.model_cfg["shards_per_unit"] / batch)))
        if job.config.flight_samples:   # units shrink with the workers in flight (churn: up to about twice the count)
            smallest = job.config.flight_samples // (2 * self.workers_cfg["count"])
            unit_samples = min(unit_samples, max(MIN_SPLIT_BATCH, smallest))
        max_units = 4 * math.ceil(job.budget / unit_samples) + 50   # replicas and dropped lies fit well within
        refusals = max(20, 3 * self.workers_cfg["count"])          # results refused in a row: nothing will pass
        while not job.finished:
            if not self.events:
                self.stalled = "no worker left and none arriving"
                break
            if self.units_computed > max_units or self.refused_in_a_row >= refusals:   # e.g. a model diverged by
                refused = ", ".join(f"{k} {v}" for k, v in sorted(job.store.rejections().items())) or "none"  # lies
                self.stalled = (f"{self.units_computed} units computed, {self.refused_in_a_row} refused in a row "
                                f"(refused: {refused})")
                break
            t, _, kind, w, token, payload = heapq.heappop(self.events)
            if t > limit:
                self.stalled = f"not finished after max_hours = {sc.max_hours:g} simulated hours"
                break
            self.clock.now = t
            if w is not None and (token != w.token or not w.alive) and kind != "hand_back":
                continue
            if kind == "ask":
                await self.on_ask(t, w)
            elif kind == "computed":
                self.on_computed(t, w)
            elif kind == "submit":
                await self.on_submit(t, w, payload)
                self.maybe_evaluate()
                bar.update(job.samples - shown)
                shown = job.samples
                bar.set_postfix_str(f"{t / 3600:.2f} sim h, acc {100 * self.evals[-1].test_acc:.1f}%")
            elif kind == "hand_back":
                await self.on_hand_back(t, w, payload)
            elif kind == "leave":
                self.on_leave(t, w)
            elif kind == "crash":
                self.on_crash(t, w)
            elif kind == "restart":
                wid, key, restarts, fault = payload
                self.spawn(wid, key, t, restarts, fault)
            elif kind == "arrive":
                self.arrived += 1
                self.spawn(f"a{self.arrived}", (1, self.arrived), t)
                self.push(t + arrivals.exponential(1.0 / join_rate), "arrive")
            elif kind == "schedule":
                self.on_schedule(t, *payload)
        bar.close()
        job.expire_leases()
        if self.evals[-1].version != job.step:
            self.evaluate()

    def run(self) -> RunResult:
        t0 = time.perf_counter()
        try:
            asyncio.run(self._loop())
            return self._result(time.perf_counter() - t0)
        finally:
            self.job.close()

    # ------------------------------------------------------------------ what it produced
    def _result(self, wall_s: float) -> RunResult:
        updates = self.job.store.results()
        status = self.job.store.unit_statuses()
        dropped = {u["unit_id"]: u["dropped"] for u in updates if u["dropped"]}
        units = []
        for u in self.units.values():
            fate = u["fate"] + (f", dropped by {dropped[u['unit_id']]}" if u["unit_id"] in dropped else "")
            units.append({**u, "fate": fate, "store_status": status.get(u["unit_id"], "")})
        applied = [u["staleness"] for u in updates if u["applied_step"] is not None]
        hist: dict[int, int] = {}
        for s in applied:
            hist[s] = hist.get(s, 0) + 1
        fates: dict[str, int] = {}
        for u in units:
            fates[u["fate"]] = fates.get(u["fate"], 0) + 1
        lost = [u for u in units if u["fate"].startswith("lost")]
        handed_back = [u for u in units if u["fate"] == "handed back"]
        final = self.evals[-1]
        summary = {
            "final_test_acc": final.test_acc, "final_test_loss": final.test_loss, "versions": int(self.job.step),
            "sim_time_s": round(self.clock.now, 6), "finished": bool(self.job.finished), "stalled": self.stalled,
            "budget_samples": int(self.job.budget), "samples_applied": int(self.job.samples),
            "samples_computed": int(self.samples_computed),
            "samples_lost": sum(u["samples"] for u in lost + handed_back),
            "units_issued": len(units), "units_applied": len(applied),
            "units_dropped_by_strategy": sum(1 for u in updates if u["dropped"]),
            "units_lost": len(lost), "units_handed_back": len(handed_back),
            "units_expired": sum(1 for s in status.values() if s == "expired"),
            "units_reissued": sum(1 for u in units if u["reissue"]), "unit_fates": dict(sorted(fates.items())),
            "rejections": dict(sorted(self.job.store.rejections().items())),
            "staleness_mean": float(np.mean(applied)) if applied else 0.0,
            "staleness_max": max(applied, default=0),
            "staleness_histogram": {str(k): hist[k] for k in sorted(hist)},
            "workers_seen": len(self.workers),
            **self._trust_summary(updates),
        }
        return RunResult(self.label, self.strategy.label, self.strategy.name, dict(self.strategy.params), {}, summary,
                         self.evals, updates, units, wall_s)


    def _trust_summary(self, updates: list[dict]) -> dict:
        """Liars and replication: what the liars got folded, when each was quarantined, what checks cost."""
        liars = {w.wid: w.liar.fault.value for w in self.workers.values() if w.liar is not None}
        folded = {wid: sum(1 for u in updates if u["worker_id"] == wid and u["applied_step"] is not None)
                  for wid in liars}
        recomputed = int(self.job.check_counts["recomputed"])
        work = self.units_computed + recomputed
        out = {
            "liars": liars,
            "liar_units_sent": {wid: self.workers[wid].sent for wid in liars},
            "liar_units_folded": sum(folded.values()),
            "liar_units_folded_after_quarantine": sum(folded[wid] - q["folded_before"]
                                                      for wid, q in self.quarantined.items()),
            "quarantined_after_units": {wid: self.quarantined[wid]["units"] if wid in self.quarantined else None
                                        for wid in liars},
            "quarantined_at_s": {wid: self.quarantined[wid]["sim_time_s"] if wid in self.quarantined else None
                                 for wid in liars},
            "units_computed": self.units_computed, "units_replica": self.replicas_computed,
            "coordinator_recomputed": recomputed,
            "replication_overhead": round((self.replicas_computed + recomputed) / work, 6) if work else 0.0,
            "checks": {k: int(v) for k, v in self.job.check_counts.items()},
        }
        # Once trusted: of the honest workers' own results sent while trusted (10 agreeing checks in a row),
        # the share held for a check; each costs one more computation (a replica, or the coordinator's).
        liar_ids = set(liars)
        sent = {u["unit_id"]: u for u in self.units.values()}
        trusted = [u for u in updates if u["worker_id"] not in liar_ids and sent.get(u["unit_id"], {}).get("trusted")
                   and not sent[u["unit_id"]].get("replica")]
        out["trusted_results"] = len(trusted)
        out["replication_overhead_trusted"] = (round(sum(u["check_state"] is not None for u in trusted) / len(trusted), 6)
                                               if trusted else None)
        return out


def run_label(strategy: StrategySpec, point: dict) -> str:
    """``fedbuff`` or, at a sweep point, ``fedbuff workers.count=4 model.local_steps=2``."""
    return " ".join([strategy.label, *(f"{k}={v}" for k, v in point.items())])


def run_scenario(scenario: Scenario, data: Cifar10, progress: bool = False, workdir: Path | None = None,
                 only: list[str] | None = None) -> list[RunResult]:
    """Every strategy at every sweep point, one after another, each with a fresh job."""
    results = []
    for point in scenario.points():
        at = scenario.at(point)
        for strategy in scenario.strategies:
            if only and strategy.label not in only:
                continue
            label = run_label(strategy, point)
            with tempfile.TemporaryDirectory(prefix="crowdtrain-sim-", dir=workdir) as tmp:
                result = Simulation(at, strategy, data, Path(tmp), label, progress).run()
            result = dataclasses.replace(result, point=dict(point))
            results.append(result)
            if progress:
                s = result.summary
                print(f"{label}: test acc {100 * s['final_test_acc']:.2f}% at {s['samples_applied']:,} samples, "
                      f"{s['sim_time_s'] / 3600:.2f} sim h, mean staleness {s['staleness_mean']:.2f}, "
                      f"units lost {s['units_lost']}, reissued {s['units_reissued']}"
                      + (f"; STALLED: {s['stalled']}" if s["stalled"] else ""), flush=True)
    return results
