"""One training job: the model, its versions, the units handed out and the results folded in.

Layers: ``Store`` (rows and bytes) -> ``ShardQueue``/``Deadlines`` (what to hand out, for
how long) -> ``Job`` (this module: validation at the boundary and the aggregation step) ->
HTTP (``coordinator.app``). The same ``Job`` runs under the simulator with a fake clock.

Everything that touches SQLite runs on the caller's thread (the event loop); only numpy
and torch work (aggregation, encoding, evaluation) goes to worker threads.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import secrets
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from contract.codecs import CODEC_IDS, decode_delta, delta_norm, encode_delta, get_codec
from contract.errors import ContractError
from contract.shards import encode_shard
from contract.units import UnitRequest, WorkUnit, unpack_result
from coordinator import leases
from coordinator.config import DEFAULT_STRATEGY, DEFAULT_STRATEGY_PARAMS, CoordinatorConfig
from coordinator.scheduler import Deadlines, ShardQueue
from coordinator.store import Store, Version
from coordinator.strategies import StrategyState, Update, make_strategy
from models import registry
from models.data import Cifar10, load_cifar10
from models.local import (delta_spec, is_running_stat, load_arrays, rebase_running_stats, recalibrate_bn,
                          sanitize_state, state_arrays)
from models.recipe import Recipe
from models.train import evaluate, lr_at

log = logging.getLogger("crowdtrain.coordinator")

FP32 = get_codec("fp32")
HYPER_KEYS = ("momentum", "nesterov", "weight_decay", "label_smoothing", "loss", "focal_gamma", "crop_pad", "flip")
ONLINE_S = 60.0      # a worker seen within this many seconds counts as online
RATE_WINDOW_S = 60.0  # samples/s and units/s are measured over this window
CALIBRATION_IMAGES = 1024  # training images that re-estimate batch-norm statistics before each evaluation


class Rejection(Exception):
    """A refused request: an error code and HTTP status from docs/protocol.md, and the field."""

    def __init__(self, code: str, status: int, message: str, field: str = ""):
        super().__init__(message)
        self.code, self.status, self.message, self.field = code, status, message, field

    def body(self) -> dict:
        return {"error": {"code": self.code, "field": self.field, "message": self.message}}


def _contract_rejection(e: ContractError) -> Rejection:
    code = e.code if e.code in ("invalid", "unsupported_protocol") else "invalid"
    return Rejection(code, 400, e.message, e.field)


@dataclass
class WorkerStats:
    backend: str
    units: int = 0
    samples: int = 0
    compute_seconds: float = 0.0
    last_seen: float = 0.0


class Job:
    def __init__(self, config: CoordinatorConfig, clock=time.time, rng: random.Random | None = None):
        """``clock`` (unix seconds) and ``rng`` (unit ids and seeds; default ``secrets``) are
        injected by the simulator for a simulated, reproducible run."""
        self.config, self.clock, self.rng = config, clock, rng
        spec = registry.get(config.model)
        self.kind = spec.kind
        overrides = {k: v for k, v in (("batch_size", config.batch_size), ("lr", config.lr)) if v is not None}
        self.recipe: Recipe = dataclasses.replace(spec.recipe, **overrides)
        self.epochs = config.epochs if config.epochs is not None else float(self.recipe.epochs)
        self.strategy_name = config.strategy or DEFAULT_STRATEGY[self.kind]
        params = config.strategy_params if config.strategy else {
            **DEFAULT_STRATEGY_PARAMS.get(self.strategy_name, {}), **config.strategy_params}
        self.strategy = make_strategy(self.strategy_name, **params)
        torch.manual_seed(config.seed)
        self.model = registry.build(config.model).to(memory_format=torch.channels_last)  # evaluation; delta spec
        self.spec = delta_spec(self.model)
        self.max_body = 4 * sum(math.prod(s) for s, _ in self.spec.values()) + config.body_slack_bytes
        self.lock = asyncio.Lock()
        self.store: Store | None = None
        self.workers: dict[str, WorkerStats] = {}
        self.accepted_log: deque[tuple[float, int]] = deque()
        self.agg_times: list[float] = []
        self._states: dict[int, dict] = {}   # decoded recent versions, for rebasing statistics
        self.finished = False

    # ------------------------------------------------------------------ start-up (blocking)
    def open(self, data: Cifar10 | None = None) -> None:
        """Load data, cut shards, restore or create the model and the strategy; replay the log."""
        cfg = self.config
        data = data or load_cifar10(cfg.data, download=cfg.download, progress=False)
        if cfg.limit_train:
            data = dataclasses.replace(data, train_x=data.train_x[:cfg.limit_train],
                                       train_y=data.train_y[:cfg.limit_train])
        self.test_x, self.test_y = torch.from_numpy(data.test_x), torch.from_numpy(data.test_y)
        self.calib_x = torch.from_numpy(np.ascontiguousarray(data.train_x[:CALIBRATION_IMAGES]))
        if cfg.eval_images:
            self.test_x, self.test_y = self.test_x[:cfg.eval_images], self.test_y[:cfg.eval_images]
        cfg.state.mkdir(parents=True, exist_ok=True)
        self.store = store = Store(cfg.state, clock=self.clock)
        self.key = leases.load_or_create_secret(cfg.state / "lease.key")
        self._check_same_job(data)
        self._cut_shards(data)
        self.budget = int(self.epochs * len(data.train_y))
        latest = store.latest_version()
        if latest is None:
            latest = self._create_version0()
        self.step, self.samples = latest.step, latest.samples
        self.state = decode_delta(store.get_blob(latest.blob))
        saved = store.get_meta("strategy_state")
        if saved:
            self.strategy.load_state_dict(StrategyState.from_bytes(store.get_blob(saved["blob"])))
        q = store.get_meta("queue", {"epoch": 0, "position": 0, "retry": []})
        self.queue = ShardQueue(self.shard_ids, cfg.shards_per_unit, cfg.seed, q["epoch"], q["position"])
        self.queue.requeue(q["retry"])
        self.deadlines = Deadlines(cfg.lease_min_s, cfg.lease_max_s, cfg.lease_factor, cfg.lease_first_s)
        self.started = store.get_meta("started") or self.clock()
        store.set_meta("started", self.started)
        for row in store.pending_results():          # accepted but not yet folded in: replay
            self._offer(row["seq"], decode_delta(store.get_blob(row["delta_blob"])), row["base_step"],
                        row["num_samples"], row["worker_id"], row["loss_after"])
        self.finished = bool(store.get_meta("finished", False))

    def _check_same_job(self, data: Cifar10) -> None:
        identity = {"job": self.config.job, "model": self.config.model, "data_digest": data.digest,
                    "train_size": len(data.train_y), "strategy": self.strategy_name}
        saved = self.store.get_meta("identity")
        if saved is None:
            self.store.set_meta("identity", identity)
        elif saved != identity:
            diff = ", ".join(f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in identity.items() if saved.get(k) != v)
            raise ValueError(f"state directory {self.config.state} holds another job ({diff}); "
                             "use a new --state directory or the same options")

    def _cut_shards(self, data: Cifar10) -> None:
        saved = self.store.get_meta("shards")
        if saved is None:
            size = self.config.shard_size
            saved = []
            for i in range(0, len(data.train_y), size):
                blob = encode_shard(data.train_x[i:i + size], data.train_y[i:i + size])
                saved.append([self.store.put_blob(blob), len(data.train_y[i:i + size])])
            self.store.set_meta("shards", saved)
        self.shard_ids = [s for s, _ in saved]
        self.shard_sizes = {s: n for s, n in saved}

    def _create_version0(self) -> Version:
        blob = self.store.put_blob(encode_delta(FP32, state_arrays(self.model)))
        version = Version(0, blob, 0, 0, self.clock())
        self.store.commit_version(version, [], None)
        return version

    # ------------------------------------------------------------------ units
    def next_unit(self, request: UnitRequest) -> WorkUnit | None:
        """A fresh unit for this worker, or None when there is nothing to do right now."""
        now = self.clock()
        self._seen(request.worker_id, request.backend, now)
        if self.finished or (request.models and self.config.model not in request.models):
            return None
        codec = self._codec_for(request.codecs)
        if codec is None:
            return None
        committed = self.samples + self.store.pending_samples() + self.store.leased_samples()
        if committed >= self.budget:
            return None
        shards = self.queue.take(set(self.store.leased_shards()))
        n = sum(self.shard_sizes[s] for s in shards)
        batch = min(self.recipe.batch_size, n)
        steps = self.config.local_steps or max(1, math.ceil(n / batch))
        lr = lr_at(committed / self.budget, self.recipe)
        if lr <= 0:
            lr = self.recipe.lr * 1e-3  # the schedule's first instant; a unit needs lr > 0
        if self.rng is None:
            unit_id, seed = secrets.token_hex(8), secrets.randbelow(2**31)
        else:
            unit_id, seed = f"{self.rng.getrandbits(64):016x}", self.rng.randrange(2**31)
        deadline = round(now + self.deadlines.lease_seconds(request.worker_id, steps * batch), 3)
        lease = leases.sign(self.key, self.config.job, unit_id, request.worker_id, self.step, deadline)
        version = self.store.version(self.step)
        self.store.insert_unit(unit_id, request.worker_id, shards, self.step, lr, seed, deadline, steps * batch, now)
        self.store.set_meta("queue", self.queue.state())
        hyper = {"lr": lr, **{k: getattr(self.recipe, k) for k in HYPER_KEYS}}
        return WorkUnit(job=self.config.job, unit_id=unit_id, model=self.config.model, model_version=version.blob,
                        base_step=self.step, shard_ids=shards, local_steps=steps, batch_size=batch, hyper=hyper,
                        seed=seed, codec=codec, lease=lease, deadline=deadline)

    def _codec_for(self, offered: tuple[str, ...]) -> str | None:
        wanted = self.config.codec
        if wanted.split(":")[0] in offered:
            return wanted
        return next((c for c in CODEC_IDS if c in offered), None)

    def expire_leases(self) -> int:
        """Leases past their deadline: their shards go to the front of the queue."""
        expired = self.store.expire_leases(self.clock())
        for row in expired:
            self.queue.requeue(row["shard_ids"])
        if expired:
            self.store.set_meta("queue", self.queue.state())
        return len(expired)

    # ------------------------------------------------------------------ results
    async def submit(self, unit_id: str, body: bytes) -> dict:
        """Check a result at the boundary, log it durably, and fold it into the model."""
        try:
            return await self._submit(unit_id, body)
        except Rejection as r:
            self.store.count_rejection(r.code)
            raise

    async def _submit(self, unit_id: str, body: bytes) -> dict:
        now = self.clock()
        try:
            result = unpack_result(body)
        except ContractError as e:
            raise _contract_rejection(e) from e
        if result.unit_id != unit_id:
            raise Rejection("invalid", 400, f"result.unit_id: expected {unit_id!r} (the URL's), got "
                            f"{result.unit_id!r}", "result.unit_id")
        unit = self.store.unit(unit_id)
        if unit is None:
            raise Rejection("unknown_unit", 404, f"no unit {unit_id!r} was issued by this coordinator", "result.unit_id")
        if result.worker_id != unit["worker_id"] or not leases.verify(
                self.key, result.lease, self.config.job, unit_id, unit["worker_id"], unit["base_step"], unit["deadline"]):
            raise Rejection("lease_invalid", 403, "result.lease: expected the lease issued for this unit to this "
                            "worker", "result.lease")
        self._seen(result.worker_id, None, now)
        if self.store.result_for_unit(unit_id) is not None or unit["status"] == "done":
            raise Rejection("duplicate", 409, f"a result for unit {unit_id!r} was already accepted", "result.unit_id")
        if result.error is not None:
            return self._unit_failed(unit, result.error)
        late = unit["status"] != "leased" or now > unit["deadline"]
        if unit["status"] in ("failed", "returned", "stale") or (late and self.config.late_results == "drop"):
            self._give_up(unit, "expired")
            raise Rejection("lease_expired", 410, f"unit {unit_id!r}: the lease ended before the result arrived",
                            "result.lease")
        version = self.store.version(unit["base_step"])
        if version is None or result.base_version != version.blob:
            raise Rejection("invalid", 400, "result.base_version: expected the unit's model_version", "result.base_version")
        if not 1 <= result.num_samples <= unit["samples"]:
            raise Rejection("invalid", 400, f"result.num_samples: expected 1..{unit['samples']}, got "
                            f"{result.num_samples}", "result.num_samples")
        try:
            delta = await asyncio.to_thread(decode_delta, result.delta, self.spec)
        except ContractError as e:
            raise _contract_rejection(e) from e
        norm = delta_norm(delta)
        if norm > self.config.max_delta_norm:
            raise Rejection("norm_bound", 422, f"delta: expected a global L2 norm <= {self.config.max_delta_norm:g}, "
                            f"got {norm:.4g}", "delta")
        async with self.lock:
            staleness = self.step - unit["base_step"]
            cap = self.config.max_staleness
            if cap is not None and staleness > cap:
                self._give_up(unit, "stale")
                raise Rejection("too_stale", 409, f"staleness: expected <= {cap}, got {staleness}", "result.base_version")
            if staleness and any(is_running_stat(n) for n in delta) and self.store.blob_path(version.blob) is None:
                self._give_up(unit, "stale")
                raise Rejection("too_stale", 409, f"staleness: base version {unit['base_step']} is no longer kept",
                                "result.base_version")
            delta_blob = await asyncio.to_thread(self.store.put_blob, result.delta)
            seq = self.store.add_result(unit_id, result.worker_id, unit["base_step"], staleness, result.num_samples,
                                        result.loss_before, result.loss_after, result.compute_seconds, delta_blob)
            if seq is None:
                raise Rejection("duplicate", 409, f"a result for unit {unit_id!r} was already accepted", "result.unit_id")
            self._credit(result.worker_id, result.num_samples, result.compute_seconds, now, now - unit["issued"])
            due = self._offer(seq, delta, unit["base_step"], result.num_samples, result.worker_id, result.loss_after)
            if due:
                await self._aggregate()
            if self.samples + self.store.pending_samples() >= self.budget:
                await self._finish()
        return {"accepted": True, "staleness": staleness, "model_version": self.step, "late": late}

    def _state_at(self, step: int) -> dict:
        if step == self.step:
            return self.state
        if step not in self._states:
            if len(self._states) >= 4:
                self._states.pop(min(self._states))
            self._states[step] = decode_delta(self.store.get_blob(self.store.version(step).blob))
        return self._states[step]

    def _offer(self, seq: int, delta, base_step: int, samples: int, worker_id: str, loss) -> bool:
        """Give an accepted result to the strategy; a result it drops is marked so in the log."""
        if base_step != self.step and any(is_running_stat(n) for n in delta):
            delta = rebase_running_stats(delta, self._state_at(base_step), self.state)
        dropped = self.strategy.describe().get("dropped", 0)
        due = self.strategy.add(Update(delta, base_step, samples, worker_id, loss), self.step)
        if self.strategy.describe().get("dropped", 0) > dropped:
            self.store.mark_dropped(seq, "strategy")
        return due

    def _unit_failed(self, unit: dict, error: str) -> dict:
        status = "returned" if error.startswith("returned") else "failed"
        if status == "failed":   # the operator sees why workers fail (a bad blob, a browser's backend, ...)
            log.warning("unit %s failed on worker %s: %s", unit["unit_id"], unit["worker_id"], error[:500])
        self._give_up(unit, status)
        return {"accepted": False, "status": status}

    def _give_up(self, unit: dict, status: str) -> None:
        """The unit will not be used: its shards go back in line (once)."""
        if unit["status"] == "leased":
            self.queue.requeue(unit["shard_ids"])
            self.store.set_meta("queue", self.queue.state())
        self.store.set_unit_status(unit["unit_id"], status, only_if=None)

    # ------------------------------------------------------------------ aggregation
    async def _aggregate(self) -> None:
        pending = self.store.pending_results()
        if not pending:
            return
        t0 = time.perf_counter()
        new_state, metrics = await asyncio.to_thread(self.strategy.aggregate, self.state, self.step)
        new_state = sanitize_state(new_state)
        blob = await asyncio.to_thread(lambda: self.store.put_blob(encode_delta(FP32, new_state)))
        strategy_blob = self.store.put_blob(self.strategy.state_dict(include_buffer=False).to_bytes())
        samples = self.samples + sum(r["num_samples"] for r in pending)
        version = Version(self.step + 1, blob, samples, len(pending), self.clock())
        old_strategy = self.store.get_meta("strategy_state")
        self.store.commit_version(version, [r["seq"] for r in pending], {"blob": strategy_blob})
        self.state, self.step, self.samples = new_state, version.step, samples
        self.agg_times.append(time.perf_counter() - t0)
        self.last_metrics = metrics
        for r in pending:
            self.store.delete_blob(r["delta_blob"])
        if old_strategy and old_strategy["blob"] != strategy_blob:
            self.store.delete_blob(old_strategy["blob"])
        self._prune_versions()

    def _prune_versions(self) -> None:
        """Drop old model blobs, keeping the newest and every base a leased unit may come back with."""
        cap = self.config.max_staleness
        keep = self.store.needed_base_steps(self.step - cap if cap is not None else 0)
        keep.update(range(max(0, self.step - self.config.keep_versions + 1), self.step + 1))
        for step, blob in self.store.prunable_versions(self.step - self.config.keep_versions):
            if step not in keep:
                self.store.delete_blob(blob)
                self.store.mark_version_pruned(step)

    async def _finish(self) -> None:
        """Budget reached: fold what is buffered, mark the job finished."""
        await self._aggregate()
        self.finished = True
        self.store.set_meta("finished", True)

    async def flush(self) -> None:
        """Fold whatever is buffered now (e.g. on shutdown of a synchronous round)."""
        async with self.lock:
            await self._aggregate()

    # ------------------------------------------------------------------ evaluation
    def evaluate_current(self) -> dict:
        """Test loss and accuracy of the current version (blocking; run it in a thread).

        Batch-norm statistics are re-estimated on ``CALIBRATION_IMAGES`` training images for
        the evaluated weights (``recalibrate_bn``): aggregated statistics do not match
        aggregated weights. The served model keeps its aggregated statistics.
        """
        step, samples, state = self.step, self.samples, self.state
        load_arrays(self.model, state)
        recalibrate_bn(self.model, self.calib_x)
        loss, acc = evaluate(self.model, self.test_x, self.test_y)
        return {"version": step, "samples": samples, "seconds": self.clock() - self.started,
                "test_acc": acc, "test_loss": loss if math.isfinite(loss) else None}

    def record_eval(self, row: dict) -> None:
        self.store.add_eval(row["version"], row["samples"], row["seconds"], row["test_acc"], row["test_loss"])

    # ------------------------------------------------------------------ visibility
    def _seen(self, worker_id: str, backend: str | None, now: float) -> None:
        stats = self.workers.get(worker_id)
        if stats is None:
            stats = self.workers[worker_id] = WorkerStats(backend or "unknown")
        elif backend:
            stats.backend = backend
        stats.last_seen = now

    def _credit(self, worker_id: str, samples: int, compute_s: float, now: float, wall_s: float) -> None:
        stats = self.workers[worker_id]
        stats.units, stats.samples, stats.compute_seconds = (stats.units + 1, stats.samples + samples,
                                                             stats.compute_seconds + compute_s)
        self.deadlines.observe(worker_id, wall_s, samples)
        self.accepted_log.append((now, samples))

    def status(self) -> dict:
        now = self.clock()
        while self.accepted_log and self.accepted_log[0][0] < now - RATE_WINDOW_S:
            self.accepted_log.popleft()
        window = min(RATE_WINDOW_S, max(now - self.started, 1e-9))
        counts = self.store.unit_counts()
        totals = self.store.result_totals()
        online = {w: s for w, s in self.workers.items() if now - s.last_seen <= ONLINE_S}
        agg = self.agg_times
        return {
            "job": self.config.job, "model": self.config.model,
            "strategy": self.strategy.describe(),
            "model_version": self.step, "model_blob": self.store.version(self.step).blob,
            "samples": self.samples, "budget_samples": self.budget, "finished": self.finished,
            "units_issued": sum(counts.values()), "units_accepted": totals["accepted"],
            "units_failed": counts.get("failed", 0) + counts.get("returned", 0),
            "units_expired": counts.get("expired", 0), "units_leased": counts.get("leased", 0),
            "units_rejected": self.store.rejections(),
            "workers_online": len(online),
            "workers": [{"worker_id": w, "backend": s.backend, "units": s.units,
                         "samples_per_second": s.samples / s.compute_seconds if s.compute_seconds else 0.0,
                         "last_seen_s": round(now - s.last_seen, 1)} for w, s in online.items()],
            "samples_per_second": sum(n for _, n in self.accepted_log) / window,
            "units_per_second": len(self.accepted_log) / window,
            "uptime_s": now - self.started,
            "staleness_histogram": {str(k): v for k, v in sorted(self.store.staleness_counts().items())},
            "aggregation_seconds": {"count": len(agg), "mean": sum(agg) / len(agg) if agg else 0.0,
                                    "max": max(agg, default=0.0)},
            "accuracy_history": self.store.evals(),
        }

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
