"""One training job: the layers that hand out units, check results, fold them in and evaluate.

Layers (after hivemind and BOINC's daemons), each with one job and usable on its own::

    Store       rows and bytes (SQLite + content-addressed blobs)      coordinator.store
    UnitFactory queue, deadlines, budget, lr schedule, seeds, lease    coordinator.factory
    Intake      boundary checks -> an accepted update                  coordinator.intake
    Aggregator  the strategy and the model; each update's fate         coordinator.aggregator
    Evaluator   test accuracy of a version                             coordinator.evaluator
    JobStatus   what the dashboard and /metrics show                   coordinator.status

``Job`` wires them to one job and keeps the ledger: a submission is checked, logged durably
and answered (``submit``); folding happens later, in ``settle`` (the HTTP service runs it in
one background task; the simulator calls it after each submission), which writes to the
store exactly the fate the aggregator states for each update. The same ``Job`` runs under
the simulator with a fake clock.

Replicated checks (``--replication adaptive``, ``coordinator.trust``): a result the trust
policy picks is logged and answered like any other but *held* (not offered to the
aggregator) until a replica of its unit, computed by another worker of the same backend (or
one that computes as it does: a Python worker computes a tab's unit as the tab), comes back
(a unit whose result will surely be held, its worker not trusted yet, is replicated as soon as
another worker asks, while it is still out: both copies come back about together);
``settle`` compares the two, and on a disagreement, or when no replica came within
``replica_wait_s`` (at once when no worker could take one), recomputes the unit itself
(``worker_py.unit.run_unit``; a tab's as the tab computes it, ``models.browser_unit``; in a
thread). One agreeing copy goes on to the aggregator; the other is dropped (``replica``), a
loser's copy and its other held results are dropped (``distrusted``), and a quarantined
worker's results are dropped on arrival (``quarantined``).

Everything that touches SQLite runs on the event loop's thread; numpy and torch work
(decoding, aggregation, encoding, evaluation) goes to worker threads.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import random
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from contract.codecs import decode_delta, encode_delta, get_codec
from contract.shards import decode_shard, encode_shard
from contract.units import UnitRequest, WorkUnit
from coordinator import leases, strategy_docs
from coordinator import trust as T
from coordinator.aggregator import Aggregation, Aggregator, Prepared
from coordinator.config import DEFAULT_STRATEGY, DEFAULT_STRATEGY_PARAMS, CoordinatorConfig
from coordinator.evaluator import Evaluator
from coordinator.factory import HYPER_KEYS, Base, UnitFactory, unit_batch_scale
from coordinator.intake import Accepted, Failure, Intake, Rejection, Superseded
from coordinator.status import JobStatus, TrustRow, WorkerRow
from coordinator.steps import step_cache_dir
from coordinator.store import SMALL_RESULT_MAX, Store, Version
from coordinator.strategies import Freeze, Lookahead, NormClip, StalenessCap, Strategy, StrategyState, make_strategy
from models import registry
from models.data import Cifar10, load_cifar10
from models.local import delta_spec, state_arrays
from models.state_names import is_running_stat
from models.onnx_step import step_graph
from models.recipe import Recipe
from worker_py.unit import run_unit

__all__ = ["Job", "Rejection", "build_strategy"]

log = logging.getLogger("crowdtrain.coordinator")

FP32 = get_codec("fp32")
ONLINE_S = 60.0      # a worker seen within this many seconds counts as online
RATE_WINDOW_S = 60.0  # samples/s and units/s: over this window, per worker and in total (their sum)
STATES_KEPT = 4      # decoded older versions kept for rebasing running statistics
STATS_KEPT = 512     # versions folded here whose running statistics alone are kept for that (``_state_at``)
PUBLISH_LAG_MAX = 4  # a unit is cut from the last version written only while it is at most this many folds behind
PUBLISH_LAG_SHARE = 16  # ... and at most max_staleness / this (a unit must not start near the staleness cap)
OWN_RESULT_CROWD = 64  # with this many units out, a unit request no longer waits for its worker's own last result
PAIRS_AT_ONCE = 1    # version deltas made at once; a request that finds them busy gets the whole version as fp16
TRUST_ROWS = 100     # workers shown with their trust (the quarantined and the most recent)


class Runtime(NamedTuple):
    """What a worker's units train on, as its last unit request said (UnitRequest), for the operator's eyes."""

    runtime: str | None = None
    webgpu_check: str | None = None
    note: str | None = None


@dataclass
class WorkerStats:
    backend: str
    computes: tuple[str, ...] = ()   # other backends whose units it computes as they do (its last request's)
    runtime: Runtime = Runtime()
    units: int = 0
    samples: int = 0
    compute_seconds: float = 0.0
    last_seen: float = 0.0


@dataclass
class AggTimes:
    """Count, sum and maximum of the aggregations' seconds (a list of every one grew without bound)."""

    count: int = 0
    total: float = 0.0
    max: float = 0.0

    def append(self, seconds: float) -> None:
        self.count, self.total, self.max = self.count + 1, self.total + seconds, max(self.max, seconds)


@dataclass(frozen=True)
class Inbound:
    """An accepted, logged update waiting for the aggregator."""

    seq: int
    delta: dict
    base_step: int
    samples: int
    worker_id: str
    loss: float | None
    blob: str


def unit_recipe(recipe: Recipe, config: CoordinatorConfig, kind: str) -> Recipe:
    """The recipe units train with: the model's, with the config's batch size and peak lr; without an
    explicit batch size, a dense model's batch is ``unit_batch_scale`` of the recipe's, at the same lr
    (``unit_lr="linear"``: the lr scaled alike, the linear scaling rule; ``--lr`` is then the lr at the
    recipe's batch size)."""
    batch = config.batch_size or recipe.batch_size
    lr = config.lr or recipe.lr
    scale = unit_batch_scale(config)
    if config.batch_size is None and kind == "dense" and scale != 1:
        batch = max(1, round(recipe.batch_size * scale))
        if config.unit_lr == "linear":
            lr *= batch / recipe.batch_size
    return dataclasses.replace(recipe, batch_size=batch, lr=lr)


def build_strategy(config: CoordinatorConfig, kind: str) -> tuple[str, Strategy]:
    """The job's strategy: the named one (or the default for the model kind) with its parameters,
    inside the config's robust wrapper (``robust``), wrapped as the config's policies say
    (``on_large_norm="clip"``, ``on_stale="drop"``)."""
    name = config.strategy or DEFAULT_STRATEGY[kind]
    params = config.strategy_params if config.strategy else {
        **DEFAULT_STRATEGY_PARAMS.get(name, {}), **config.strategy_params}
    strategy = make_strategy(name, **params, robust=config.robust)
    if config.on_large_norm == "clip":
        strategy = NormClip(strategy, config.max_delta_norm)
    if config.on_stale == "drop" and config.max_staleness is not None:
        strategy = StalenessCap(strategy, config.max_staleness)
    return name, strategy


class Job:
    def __init__(self, config: CoordinatorConfig, clock=time.time, rng: random.Random | None = None):
        """``clock`` (unix seconds) and ``rng`` (unit ids and seeds; default ``secrets``) are
        injected by the simulator for a simulated, reproducible run. ``open`` loads the data
        and the state; until then the job serves nothing."""
        self.config, self.clock, self.rng = config, clock, rng
        spec = registry.get(config.model)
        self.kind = spec.kind
        self.recipe: Recipe = unit_recipe(spec.recipe, config, spec.kind)
        # the recipe's lookahead is the coordinator's own (``strategies.wrappers.Lookahead``, from ``open``)
        self.lookahead = config.lookahead == "on" or (config.lookahead == "recipe" and self.recipe.lookahead)
        one_process = [f.name for f in dataclasses.fields(Recipe)   # switches on that units do not carry
                       if f.name not in HYPER_KEYS and getattr(self.recipe, f.name) is True
                       and f.name != "alt_flip"                 # units carry it as hyper.flip_parity
                       and not (f.name == "lookahead" and self.lookahead)]
        if one_process:
            log.info("%s's recipe sets %s: one process's only, work units train without", config.model,
                     ", ".join(one_process))
        self.epochs = config.epochs if config.epochs is not None else float(self.recipe.epochs)
        self.strategy_name, self.strategy = build_strategy(config, self.kind)
        with torch.random.fork_rng():   # the initial model from the job's seed, without touching global state
            torch.manual_seed(config.seed)
            self.model = registry.build(config.model).to(memory_format=torch.channels_last)
        self.spec = delta_spec(self.model)
        self.max_body = 4 * sum(math.prod(s) for s, _ in self.spec.values()) + config.body_slack_bytes
        self.lock = asyncio.Lock()           # one settle at a time
        self.work = asyncio.Event()          # set when an update arrives: the aggregation task wakes
        self.inbox: deque[Inbound] = deque()
        self.store: Store | None = None
        self.workers: dict[str, WorkerStats] = {}
        self.accepted_log: deque[tuple[float, int, str, float]] = deque()   # (accepted, samples, worker, issued)
        self.agg_times = AggTimes()
        self._states: dict[int, dict] = {}   # decoded recent versions, for rebasing statistics
        self._stats: OrderedDict[int, dict] = OrderedDict()   # running statistics of the versions folded here
        self._writer: asyncio.Future | None = None   # the write of the newest version's model blob in flight
        self._published: Base | None = None   # the newest version written for units (``publish``)
        self._folded: dict[str, int] = {}     # worker -> the version that folded its latest result
        self._halving: dict[str, asyncio.Future] = {}      # version blob -> the write of its fp16 copy in flight
        self._half_ready: Base | None = None   # the newest version whose fp16 copy was made (``prepare_download``)
        self._pairing = 0                      # version deltas being made (``prepare_download``)
        self._blobs: dict[int, str] = {}     # seq -> delta blob, for updates the aggregator holds
        self._offered: dict[int, tuple[int, int]] = {}   # seq -> (version, rank) it was offered at, until decided
        self._undecided: dict[int, str] = {}  # seq -> worker, for updates offered and not yet folded nor dropped
        self._rank = 0                       # the next offer's place in the offer order (kept across restarts)
        self._replay_blobs: list[tuple[int, str]] = []   # (offered at, delta blob) of decided results a replay needs
        self.persisted_step = 0              # the newest version whose model and strategy state are durable
        self._persisted_at = 0.0             # when (the job's clock)
        self.finished = False
        self.policy = T.TrustPolicy()
        self.checks: deque[int] = deque()    # seqs of replicas' results waiting for a verdict
        # fresh units out whose results will be held for a check (their worker has not earned trust), with no replica
        # issued yet: unit id -> its worker (``_replica_for`` issues one at once, as BOINC sends a workunit's replicas
        # together; this process's memory only: after a restart a replica is issued once the result is in). Only those
        # held whatever the draw: a trusted worker's unit replicated before its result would tell a colluding id that
        # takes the replica which of its units are checked, so it could lie on the others; its draw stays at the result.
        self._unreplicated: OrderedDict[str, str] = OrderedDict()
        self._operators_replicas: set[int] = set()   # replicas' results that carried an operator's token (not kept)
        self._recent_norms: deque[float] = deque(maxlen=50)   # accepted results' norms (trust.suspicious)
        self.check_counts = {"replicas_issued": 0, "agreed": 0, "agreed_unvouched": 0, "disagreed": 0, "recomputed": 0}
        self._draw = (rng or random.SystemRandom()).random   # which results are checked

    # ------------------------------------------------------------------ start-up (blocking)
    def open(self, data: Cifar10 | None = None) -> None:
        """Load data, cut shards, restore or create the model and the strategy; replay the log."""
        cfg = self.config
        data = data or load_cifar10(cfg.data, download=cfg.download, progress=False)
        if cfg.limit_train:
            data = dataclasses.replace(data, train_x=data.train_x[:cfg.limit_train],
                                       train_y=data.train_y[:cfg.limit_train])
        test_x, test_y = data.test_x, data.test_y
        if cfg.eval_images:
            test_x, test_y = test_x[:cfg.eval_images], test_y[:cfg.eval_images]
        self.evaluator = Evaluator(self.model, test_x, test_y, data.train_x, self.recipe.crop_pad, self.recipe.flip,
                                   self.recipe.crop_reflect)
        cfg.state.mkdir(parents=True, exist_ok=True)
        self.store, self.key = self.open_store()
        store = self.store
        self._check_same_job(data)
        shard_sizes = self._cut_shards(data)
        self.budget = int(self.epochs * len(data.train_y))
        train_epochs = getattr(self.model, "train_epochs", {})   # tensors the model trains for its first epochs only
        if train_epochs and not isinstance(self.strategy, (Freeze, Lookahead)):
            after = {name: max(1, int(epochs * len(data.train_y))) for name, epochs in train_epochs.items()}
            self.strategy = Freeze(self.strategy, after)
        if self.lookahead and not isinstance(self.strategy, Lookahead):   # the versions' running average
            batch = registry.get(cfg.model).recipe.batch_size                     # one process's step
            self.strategy = Lookahead(self.strategy, max(self.budget, 1), Lookahead.PER_SYNC * batch)
        latest = store.latest_version()
        if latest is None:   # a new job: a model that sets part of itself from images (airbench's whitening) does
            registry.init_from_data(self.model, torch.from_numpy(data.train_x))
            latest = self._create_version0()
        # the newest durable version (a state directory from before lazy writes: every version is)
        persisted = store.version(store.get_meta("persisted_step", latest.step))
        saved = store.get_meta("strategy_state")
        if saved:
            self.strategy.load_state_dict(StrategyState.from_bytes(store.get_blob(saved["blob"])))
        self.aggregator = Aggregator(self.strategy, decode_delta(store.get_blob(persisted.blob)), persisted.step,
                                     persisted.samples, self._state_at)
        self.persisted_step, self._persisted_at = persisted.step, self.clock()
        self._rank = store.last_offer_rank() + 1
        self.factory = UnitFactory(cfg, self.recipe, store, self.key, shard_sizes, self.budget, self.clock, self.rng)
        self.intake = Intake(cfg, store, self.key, self.spec, self.clock)
        self.trust = T.TrustBook(store, self.policy)
        self.checks.extend(row["seq"] for row in store.waiting_replica_results())   # judged at the next settle
        self.started = store.get_meta("started") or self.clock()
        store.set_meta("started", self.started)
        self.finished = bool(store.get_meta("finished", False))
        self._replay(latest.step)
        for row in store.pending_results():          # accepted but not yet folded in nor dropped: replay
            self.inbox.append(Inbound(row["seq"], decode_delta(store.get_blob(row["delta_blob"])), row["base_step"],
                                      row["num_samples"], row["worker_id"], row["loss_after"], row["delta_blob"]))
        self._offer_inbox()

    def open_store(self) -> tuple[Store, bytes]:
        """The job's store and lease-signing key (``coordinator.cluster`` opens a Redis one instead)."""
        cfg = self.config
        return Store(cfg.state, clock=self.clock), leases.load_or_create_secret(cfg.state / "lease.key")

    def _replay(self, latest: int) -> None:
        """Fold again, from the persisted version, every version committed since: the results offered at
        each version, in their offer order, then the fold. The same offers and folds give the same model
        (the ledger already holds their fates; nothing is written but the model, lazily, as usual)."""
        store = self.store
        for step in range(self.persisted_step, latest):
            folded = set()
            for row in store.offered_at(step):
                delta = decode_delta(store.get_blob(row["delta_blob"]))
                self.aggregator.add(row["seq"], delta, row["base_step"], row["num_samples"], row["worker_id"],
                                    row["loss_after"])
                if row["applied_step"] is not None:
                    folded.add(row["seq"])
            agg = self.aggregator.aggregate()
            version = store.version(step + 1)
            if set(agg.folded) != folded or agg.samples != version.samples:
                raise RuntimeError(f"replay of version {step + 1} folded {sorted(agg.folded)} ({agg.samples} samples) "
                                   f"where the log says {sorted(folded)} ({version.samples} samples)")
            self.aggregator.advance(agg)
            self._states.pop(step + 1, None)
        if latest > self.persisted_step:
            log.info("replayed versions %d..%d from the result log", self.persisted_step + 1, latest)
        # Offers at the latest version that were decided (dropped on arrival) before the stop: the strategy
        # restarts without them (as before), so the log says they were not offered to the one that folds next.
        gone = store.clear_offered(latest)
        self._replay_blobs = list(store.decided_blobs_since(self.persisted_step))
        self._delete_blobs([b for b in gone if b not in {x for _, x in self._replay_blobs}])

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

    def _cut_shards(self, data: Cifar10) -> dict[str, int]:
        saved = self.store.get_meta("shards")
        if saved is None:
            size = self.config.shard_size
            saved = []
            for i in range(0, len(data.train_y), size):
                blob = encode_shard(data.train_x[i:i + size], data.train_y[i:i + size])
                saved.append([self.store.put_blob(blob), len(data.train_y[i:i + size])])
            self.store.set_meta("shards", saved)
        return {s: n for s, n in saved}

    def _create_version0(self) -> Version:
        blob = self.store.put_blob(encode_delta(FP32, state_arrays(self.model)))
        version = Version(0, blob, 0, 0, self.clock())
        with self.store.transaction():
            self.store.commit_version(version, [], None)
            self.store.set_meta("persisted_step", 0)
        return version

    # ------------------------------------------------------------------ the model now
    @property
    def step(self) -> int:
        return self.aggregator.step

    @property
    def samples(self) -> int:
        """Samples of the updates folded into the current version."""
        return self.aggregator.samples

    @property
    def state(self) -> dict:
        return self.aggregator.state

    def _state_at(self, step: int) -> dict:
        """An older version's arrays (a unit's base: written when the unit was cut), for rebasing a stale delta's
        running statistics: those alone for a version folded by this process (``_keep_stats``; decoding a whole
        version on the event loop for each stale result, each from another base under load, held the loop), else
        the whole version, decoded."""
        if step == self.step:
            return self.state
        stats = self._stats.get(step)
        if stats is not None:
            return stats
        if step not in self._states:
            if len(self._states) >= STATES_KEPT:
                self._states.pop(min(self._states))
            self._states[step] = decode_delta(self.store.get_blob(self.store.version(step).blob))
        return self._states[step]

    def _write_current(self) -> tuple[int, str]:
        """Write the current version's model blob if it is not yet (blocking; a unit names its base by
        its hash). Returns (step, blob)."""
        step, state = self.step, self.state
        version = self.store.version(step)
        if version.blob:
            return step, version.blob
        blob = self.store.put_blob(encode_delta(FP32, state))
        return step, blob

    async def _written_current(self) -> tuple[int, str]:
        """``_write_current`` with the encoding, hashing and write in a thread (which never touches SQLite:
        the store may close under a thread at shutdown)."""
        step, state = self.step, self.state
        version = self.store.version(step)
        if version.blob:
            return step, version.blob
        return step, await asyncio.to_thread(lambda: self.store.put_blob(encode_delta(FP32, state)))

    async def publish(self, worker_id: str | None = None) -> Base:
        """The newest version, written, to cut a unit from: the encoding, hashing and write run in a
        thread, one write at a time however many requests wait (``_writing``), so under a stream of folds
        the versions that land during a write are skipped, not written one by one (each costs a model's
        encoding, hash, fsync and fp16 copy: at tens of folds a second those writes were the coordinator's
        queue). A request waits for a write of at least the version that was newest when it asked (at most
        the write in flight and the next one). For a unit request (``worker_id``) whose
        worker has no result in a version newer than the last one written, the newest version's write
        is started and the unit is cut from the last one written at once (unless that one is more than
        ``PUBLISH_LAG_MAX`` folds behind, as after a while without unit requests, or than a sixteenth of
        ``max_staleness``: a worker whose last result was dropped as stale must not get a stale unit
        again): only a worker whose own result is in it waits for it (``app.fresh_base``: a unit whose
        base lacks its worker's own result costs accuracy; not while the job is ``crowded``), and under a
        stream of results (a fold every few tens of milliseconds) every other request would wait for a
        write too."""
        step = self.step
        version = self.store.version(step)
        if version.blob:
            return self._newest_written(Base(step, version.blob))
        flight = self._writing()
        last = self._published
        if worker_id is not None and last is not None and self._may_lag(worker_id, last, step):
            return last
        while True:
            base = await asyncio.shield(flight)
            if base.step >= step:
                return base
            flight = self._writing()   # the write in flight began before this request's version was folded

    def _may_lag(self, worker_id: str, older: Base, step: int) -> bool:
        """May a unit for this worker be cut from ``older`` instead of version ``step`` (``publish``)? Only
        while ``older`` is at most ``PUBLISH_LAG_MAX`` folds behind (and a sixteenth of ``max_staleness``),
        lacks no result of this worker (unless the job is ``crowded``), and its blob is still on disk."""
        cap = self.config.max_staleness
        lag_max = PUBLISH_LAG_MAX if cap is None else min(PUBLISH_LAG_MAX, cap // PUBLISH_LAG_SHARE)
        return ((self._folded.get(worker_id, -1) <= older.step or self.crowded())
                and step - older.step <= lag_max and self.store.blob_path(older.blob) is not None)

    def crowded(self) -> bool:
        """Whether ``OWN_RESULT_CROWD`` units or more are out. Then a unit request does not wait for a version
        with its worker's own last result in it (``app.fresh_base``, ``publish``): with N units out, a unit's
        base already lacks about N other results that will land before it does, so lacking its own adds
        about 1 / N to its staleness; while that wait (a fold, then a version write, under a stream of
        results) is what the slowest tenth of unit requests spend (bench/load.py: 1,000 clients). With
        few workers it is the other way round: 2 workers lose points without it (``app.fresh_base``)."""
        return self.store.leased_count() >= OWN_RESULT_CROWD

    def _writing(self) -> asyncio.Future:
        """The model write in flight, or a new one of the newest version (``_write_version``)."""
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write_version())
        return self._writer

    def _newest_written(self, base: Base) -> Base:
        if self._published is None or base.step > self._published.step:
            self._published = base
        return base

    async def _write_version(self) -> Base:
        """Write the newest version (as it is when this starts) and record its blob. In a ``crowded`` job, start
        its fp16 copy at once, from the arrays in memory: most requests there hold no version it has a delta
        from, and one that comes while the copy is made may wait for it (``_half_base``; the copy was made by
        the first such request, from the version read back)."""
        state = self.state   # what ``_written_current`` writes
        step, blob = await self._written_current()
        if not self.store.version(step).blob:
            self.store.set_version_blob(step, blob)
        base = self._newest_written(Base(step, blob))
        if base.blob not in self._halving and self.crowded() and self.factory.wanted_half(base, ()):
            self._halving[base.blob] = asyncio.ensure_future(self._make_half(base, state))
        return base

    def _base(self) -> Base:
        step, blob = self._write_current()   # normally already written by publish(); else here, blocking
        if not self.store.version(step).blob:
            self.store.set_version_blob(step, blob)
        return Base(step, blob)

    # ------------------------------------------------------------------ units
    def next_unit(self, request: UnitRequest, address: str = "", base: Base | None = None,
                  trusted: bool = False, key: str | None = None) -> WorkUnit | None:
        """A fresh unit for this worker (a replica of a held result first, when one is wanted and this
        worker may check it), or None when there is nothing to do right now. ``address``: where the
        request came from (a replica never goes to the original's remote address); ``base``: the
        version ``publish`` wrote (else the current one, written here if it is not yet, blocking);
        ``trusted``: the request carries a token of the operator's own workers (``--trusted-tokens``); ``key``:
        its worker key, which the caller checked (``TrustBook.key_matches``) and which binds an unbound id."""
        self._seen(request.worker_id, request.backend, self.clock(), request.computes,
                   Runtime(request.runtime, request.webgpu_check, request.runtime_note))
        self.trust.seen(request.worker_id, request.backend, address, operator=trusted, key=key)
        if self.finished or (request.models and self.config.model not in request.models):
            return None
        codec = self.factory.codec_for(request.codecs)
        if codec is None:
            return None
        if self.replicating:
            replica = self._replica_for(request, address)
            if replica is not None:
                self.intake.issued(replica)
                return replica
            if self.awaits_checks(request.worker_id, trusted):
                return None
        if base is None or self.store.blob_path(base.blob) is None:
            base = self._base()
        unit = self.factory.make(request.worker_id, codec, base, self.samples, backend=request.backend,
                                 held=request.held, error_feedback=request.error_feedback, trusted=trusted)
        if unit is not None:
            self.intake.issued(unit)
            if self.replicating and not trusted and self.trust.probability(request.worker_id) >= 1.0:
                self._unreplicated[unit.unit_id] = request.worker_id
        return unit

    async def prepare_download(self, request: UnitRequest, base: Base) -> tuple[Base, UnitRequest]:
        """Make, in a thread, the version delta that a unit cut from ``base`` for this request would carry
        (``UnitFactory.wanted_pair``); ``next_unit`` would otherwise make it on the event loop. A held id
        that is not a model version of this job is left to ``next_unit`` (which then sends the whole base).
        Returns the base and the request to cut the unit for. A version delta is made for one request at a
        time (``PAIRS_AT_ONCE``: each is a decode, an int8 pass and zlib, 50-65 ms of a core for resnet_fast
        and 150-370 ms for cnn, and warm workers name as many held versions as there are workers): a
        request that finds it busy is answered as one that holds nothing (the request without ``held``),
        with the whole version as fp16 (bench/load.py --held)."""
        if self.finished:
            return base, request
        if self.factory.wanted_half(base, request.held):
            return await self._half_base(request, base), request
        held = self.factory.wanted_pair(base, request.held) if request.held else None
        if held is None:
            return base, request
        if self._pairing >= PAIRS_AT_ONCE:
            request = dataclasses.replace(request, held=())
            if self.factory.wanted_half(base, request.held):
                base = await self._half_base(request, base)
            return base, request
        self._pairing += 1
        try:
            entry = await asyncio.to_thread(self.factory.make_pair, held, base)
        except Exception as e:   # ContractError for a blob that is no model version; a deleted blob
            log.debug("version delta from %s not made: %s", held[:12], e)
            return base, request
        finally:
            self._pairing -= 1
        self.factory.add_pair(entry)
        return base, request

    async def _half_base(self, request: UnitRequest, base: Base) -> Base:
        """The base to cut a unit from for a request that gets the whole version as fp16, made once per
        version in a thread: ``base`` once its copy is made or, while it is being made, the newest version
        whose copy is made where this request may take it (``_may_lag``): under a stream of folds every new
        version's first requests would otherwise all wait for its copy (bench/load.py). Only for a request
        whose unit would name ``base``'s copy, not made yet (``UnitFactory.wanted_half``)."""
        flight = self._halving.get(base.blob)
        if flight is None:
            flight = self._halving[base.blob] = asyncio.ensure_future(self._make_half(base))
        ready = self._half_ready
        if (ready is not None and ready.step < base.step and self._may_lag(request.worker_id, ready, self.step)
                and not self.factory.wanted_half(ready, request.held)):
            return ready
        await asyncio.shield(flight)
        return base

    async def _make_half(self, base: Base, state: dict | None = None) -> None:
        """``base``'s fp16 copy, made in a thread (from ``state``, its arrays, when given) and kept
        (``prepare_download``)."""
        try:
            blob = await asyncio.to_thread(self.factory.make_half, base, state)
            self.factory.add_half(base, blob)
            if blob is not None and (self._half_ready is None or base.step > self._half_ready.step):
                self._half_ready = base
        except Exception as e:   # the version blob was pruned meanwhile: next_unit takes the current one
            log.debug("fp16 copy of version %d not made: %s", base.step, e)
        finally:
            self._halving.pop(base.blob, None)

    def _replica_for(self, request: UnitRequest, address: str) -> WorkUnit | None:
        """A unit to check again, for this worker: the oldest held result's unit, else the oldest fresh unit
        out whose result will be held (``_unreplicated``: both copies then come back about together, where a
        replica issued once the result is in holds it back for a whole unit more). The worker must be another
        id, of the same backend (a browser draws its batches with another generator than torch) or one it
        says it computes as that backend does (``UnitRequest.computes``: a Python worker computes a tab's unit
        as the tab, ``WorkUnit.compute_as``), not at the same remote address, take the unit's codec, and not
        have had a replica of it already."""
        if self.trust.quarantined(request.worker_id):
            return None
        for row in self.store.wanted_replicas():
            replica = self._replicate(request, address, row, row["holder"])
            if replica is not None:
                return replica
        now = self.clock()
        for unit_id, holder in list(self._unreplicated.items()):
            row = self.store.unit(unit_id)
            if (row is None or row["status"] != "leased" or row["deadline"] <= now or row.get("twin")
                    or self.trust.probability(holder) < 1.0):
                # back, given up, past its deadline (its worker gone; the blob it names is kept only until then),
                # a tail copy, or its worker's results are not held
                del self._unreplicated[unit_id]
                continue
            replica = self._replicate(request, address, row, holder)
            if replica is not None:
                del self._unreplicated[unit_id]
                return replica
        return None

    def _replicate(self, request: UnitRequest, address: str, row: dict, holder_id: str) -> WorkUnit | None:
        """A replica of the unit of store row ``row`` (issued to ``holder_id``) for this request, if it may take it."""
        worker = request.worker_id
        if holder_id == worker:
            return None
        holder = self.trust.get(holder_id)
        other = holder is not None and holder.backend != request.backend
        if other and holder.backend not in request.computes:
            return None
        if holder is not None and T.same_host(holder.address, address):
            return None
        if json.loads(row["wire"])["codec"].split(":")[0] not in request.codecs:
            return None
        if self._base_gone(row):   # a late result's base, swept after its deadline
            return None
        if any(r["worker_id"] == worker for r in self.store.replicas_of(row["unit_id"])):
            return None
        self.check_counts["replicas_issued"] += 1
        return self.factory.replicate(worker, row, compute_as=holder.backend if other else None)

    def awaits_checks(self, worker_id: str, trusted: bool = False) -> bool:
        """Whether this worker gets no fresh unit until a check of its results is decided: the job is on, it has
        not earned trust and ``TrustPolicy.max_unchecked`` of its results are held for their checks (``trusted``, a
        token of the operator's own workers on its request, lifts it: their results are not held)."""
        cap = self.policy.max_unchecked
        if (trusted or self.finished or not self.replicating or cap is None
                or T.vouches(self.trust.get(worker_id), self.policy)):
            return False
        return self.store.held_by(worker_id) >= cap

    @property
    def replicating(self) -> bool:
        return self.config.replication != "off"

    def expire_leases(self) -> int:
        """Leases past their deadline: their shards go to the front of the queue (a replica's: another
        replica is wanted). Wakes the aggregation task when a held result waited too long for its replica."""
        expired = self.factory.expire()
        if self.replicating and self._overdue_holds():
            self.work.set()
        return expired

    # ------------------------------------------------------------------ results
    async def submit(self, unit_id: str, body: bytes, trusted: bool = False) -> dict:
        """Check a result at the boundary, log it durably and answer; ``settle`` folds it in later.
        An accepted result's answer waits until it is durable (``Store.sync``: one fdatasync of the
        SQLite log for every submission that commits meanwhile). Other answers (a failure report or a
        hand-back, a tail copy superseded) do not: on a power loss the unit is out on its lease again,
        and its shards go back in line when the lease expires; no accepted work is lost. ``trusted``: the
        request carries a token of the operator's own workers (``--trusted-tokens``): never held for a check."""
        answer = await self._submit(unit_id, body, trusted)
        if answer.get("accepted"):
            await self.store.sync()
        return answer

    async def _submit(self, unit_id: str, body: bytes, trusted: bool = False) -> dict:
        unit = None
        try:
            parsed = self.intake.parse(unit_id, body)
            if isinstance(parsed, Failure):
                self._seen(parsed.result.worker_id, None, self.clock())
                return self._unit_failed(parsed)
            if isinstance(parsed, Superseded):
                self._seen(parsed.result.worker_id, None, self.clock())
                return self._superseded(parsed)
            unit, result = parsed
            self._seen(result.worker_id, None, self.clock())
            accepted = await asyncio.to_thread(self.intake.accept, unit, result, self.step)
            return await self._log(accepted, trusted)
        except Rejection as r:
            if r.give_up and unit is not None:
                self.factory.give_up(unit, r.give_up)
            self.store.count_rejection(r.code)
            raise

    async def _log(self, a: Accepted, trusted: bool = False) -> dict:
        r, unit = a.result, a.unit
        small = self.store.keeps_small_results and len(r.delta) < SMALL_RESULT_MAX   # kept in the result's commit
        blob = None if small else await asyncio.to_thread(self.store.put_result_blob, r.delta)
        if unit["twin"] and self.store.unit(unit["unit_id"])["status"] == "superseded":   # lost the race
            self._delete_blobs([blob])
            return self._superseded(Superseded(unit, r))
        # A quarantined worker's result, a held one and a replica's are answered like any other.
        quarantined, replica_of = self.trust.quarantined(r.worker_id), unit.get("replica_of")
        checkable = self.replicating and not quarantined and not replica_of and not trusted
        odd = checkable and a.norm is not None and T.suspicious(a.norm, self._recent_norms, self.policy)
        held = checkable and (self._draw() < self.trust.probability(r.worker_id) or odd)
        if self.replicating and a.norm is not None and not (odd or quarantined or replica_of):
            self._recent_norms.append(a.norm)
        check = "replica" if replica_of else "held" if held else None
        with self.store.transaction():   # the row, a small delta and the worker's record: one commit
            if small:
                blob = self.store.put_small_result(r.delta)
            seq = self.store.add_result(unit["unit_id"], r.worker_id, unit["base_step"], a.staleness, r.num_samples,
                                        r.loss_before, r.loss_after, r.compute_seconds, blob, check_state=check)
            if seq is None and small:   # a duplicate: its delta is not kept either
                self.store.delete_blob(blob)
            if seq is not None and not replica_of:
                self.trust.result(r.worker_id, held, r.num_samples)
        if seq is None:
            raise Rejection("duplicate", 409, f"a result for unit {unit['unit_id']!r} was already accepted",
                            "result.unit_id")
        if unit["twin"] and not quarantined:   # the job's tail: the other copy's result, when it comes, is dropped
            self.store.supersede(unit["twin"])  # (not for a quarantined worker's result: it will not be used)
        now = self.clock()
        self._credit(r.worker_id, r.num_samples, r.compute_seconds, now, now - unit["issued"])
        if quarantined:
            self.store.mark_dropped([(seq, "quarantined")])
            self._delete_blobs([blob])
            if not replica_of and not self.store.twin_alive(unit):   # trained again, unless a copy covers them
                self.factory.requeue(unit["shard_ids"])
        elif replica_of:
            self.checks.append(seq)
            if trusted:   # computed by the operator's own worker (its token, not its claimed id): it vouches
                self._operators_replicas.add(seq)
        elif not held:
            self.inbox.append(Inbound(seq, a.delta, unit["base_step"], r.num_samples, r.worker_id, r.loss_after, blob))
        self.work.set()
        return {"accepted": True, "staleness": a.staleness, "model_version": self.step, "late": a.late}

    def _superseded(self, late: Superseded) -> dict:
        """The other copy of this tail unit delivered first: this result is recorded as dropped."""
        r = late.result
        if r.error is None:
            seq = self.store.add_result(r.unit_id, r.worker_id, late.unit["base_step"], self.step - late.unit["base_step"],
                                        r.num_samples, r.loss_before, r.loss_after, r.compute_seconds, "")
            if seq is not None:
                self.store.mark_dropped([(seq, "superseded")])
        return {"accepted": False, "status": "superseded"}

    def _unit_failed(self, failure: Failure) -> dict:
        unit, status = failure.unit, failure.status
        if status == "failed":   # the operator sees why workers fail (a bad blob, a browser's backend, ...)
            log.warning("unit %s failed on worker %s: %s", unit["unit_id"], unit["worker_id"],
                        failure.result.error[:500])
        self.factory.give_up(unit, status)
        return {"accepted": False, "status": status}

    # ------------------------------------------------------------------ aggregation (off the request path)
    async def settle(self) -> Aggregation | None:
        """Give every logged update to the aggregator, fold when the strategy says so (or when the
        budget is reached), and write each update's fate to the store. Returns the aggregation run,
        if any. Safe to call at any time; the HTTP service calls it from one background task."""
        async with self.lock:
            await self._judge()
            prepared = await self._prepare_inbox()
            # what came in meanwhile waits for the next settle (its preparation, a pass over each of its arrays,
            # would run on the event loop: ``Aggregator.add``), unless the budget may be reached now
            self._offer_inbox(prepared, prepared_only=not self._budget_in_reach())
            if self.inbox:
                self.work.set()
            self.factory.flush()
            if self.finished:
                return None
            agg = None
            if self.aggregator.due or (self.aggregator.buffered and self._budget_in_reach()):
                agg = await asyncio.to_thread(self.aggregator.aggregate)
                await self._commit(agg)
            if self.samples >= self.budget:
                # the final model written durably, then the flag: after the last fold, or after a restart that
                # came between that fold's commit and the flag (the replay holds the model)
                await self.persist()
                self.finished = True
                self.store.set_meta("finished", True)
            return agg

    def _budget_in_reach(self) -> bool:
        """The samples applied and those logged but not yet decided reach the budget (asked again after an
        offer: the updates it drops no longer count)."""
        return self.samples + self.store.pending_samples() >= self.budget

    # ------------------------------------------------------------------ replicated checks (in settle)
    async def _judge(self) -> None:
        """Verdicts: each replica's result against the held result it recomputes; then at most one held
        result whose replica did not come in time, against the coordinator's own computation."""
        early = []
        while self.checks:
            seq = self.checks.popleft()
            replica = self.store.result(seq)
            if replica is None or replica["dropped"] is not None or replica["check_state"] != "replica":
                self._operators_replicas.discard(seq)
                continue
            of = self.store.unit(replica["unit_id"])["replica_of"]
            original = self.store.result_for_unit(of)
            if original is None and (self.store.unit(of) or {}).get("status") == "leased":
                early.append(seq)   # a replica issued with its unit came in first: judged once the original is in
                continue
            operators = seq in self._operators_replicas   # (its result carried an operator's token: it vouches)
            self._operators_replicas.discard(seq)
            if original is None or original["check_state"] != "held" or original["dropped"] is not None:
                # settled without it (the coordinator's own check came first): not a vote
                self.store.mark_dropped([(replica["seq"], "replica")])
                self._delete_blobs([replica["delta_blob"]])
                continue
            await self._check(original, replica, operators)
        self.checks.extend(early)
        overdue = self._overdue_holds()
        if overdue:
            await self._check(overdue[0], None)
            if len(overdue) > 1:
                self.work.set()   # one recomputation per settle: folding is not held up for long

    def _overdue_holds(self) -> list[dict]:
        """Held results that waited ``replica_wait_s`` without a replica's result in, and at once those no
        other worker could replicate: no other worker of the holder's backend asked for work within
        ``replica_wait_s``, nor one that computes as it does (a lone tab's results are checked now, not
        folded two minutes stale)."""
        held = self.store.held_results()
        if not held:   # (every settle asks: no pass over every worker seen for nothing)
            return []
        cutoff = self.clock() - self.config.replica_wait_s
        waiting = {self.store.unit(r["unit_id"])["replica_of"] for r in self.store.waiting_replica_results()}
        active: dict[str, set[str]] = {}   # backend -> workers that may take a replica of its units now
        for worker, stats in self.workers.items():
            if stats.last_seen >= cutoff and not self.trust.quarantined(worker):
                for backend in (stats.backend, *stats.computes):
                    active.setdefault(backend, set()).add(worker)
        due = []
        for r in held:
            if r["unit_id"] in waiting:
                continue
            holder = self.trust.get(r["worker_id"])
            others = active.get(holder.backend if holder is not None else "unknown", set()) - {r["worker_id"]}
            if r["accepted"] <= cutoff or not others or self._base_gone(self.store.unit(r["unit_id"])):
                due.append(r)
        return due

    def _base_gone(self, unit: dict | None) -> bool:
        """Whether the blob the unit of store row ``unit`` was cut from is gone: a late result's (its worker came
        back after the unit's deadline, when the fp16 copy or reconstruction it names may be swept). Nobody can
        recompute it then."""
        return unit is not None and bool(unit.get("wire")) and \
            self.store.blob_path(json.loads(unit["wire"])["model_version"]) is None

    async def _check(self, original: dict, replica: dict | None, operators: bool = False) -> None:
        """Decide the held result ``original``: it and ``replica`` agree (and one of them vouches: ``operators``, the
        replica's result carried an operator's token, or a worker that earned trust), or the coordinator recomputes
        the unit and whoever agrees with that wins (with no replica: the coordinator's check alone)."""
        rows = [original] + ([replica] if replica else [])
        deltas = await asyncio.to_thread(lambda: [decode_delta(self.store.get_blob(r["delta_blob"])) for r in rows])
        holder = self.trust.get(original["worker_id"])
        backend = holder.backend if holder is not None else "unknown"
        tolerance = self.policy.tolerance_for(backend, self.config.model)
        if replica is not None and T.agree(T.compare(deltas[0], deltas[1]), tolerance):
            if operators or any(T.vouches(self.trust.get(r["worker_id"]), self.policy) for r in rows):
                self.check_counts["agreed"] += 1
                self._verdict(rows, deltas, ["valid", "valid"])
                return
            # neither party has earned trust: two fresh ids (one volunteer's, say) would vouch for each other's lie
            self.check_counts["agreed_unvouched"] += 1
        if replica is not None:
            self.check_counts["disagreed"] += 1
        unit = self.store.unit(original["unit_id"])
        if self._base_gone(unit):
            log.warning("unit %s: the base it was computed from is gone (a result after the unit's deadline); its "
                        "result cannot be checked and is dropped", original["unit_id"])
            self._verdict(rows, deltas, ["unchecked"] * len(rows))
            return
        try:
            reference = await asyncio.to_thread(self._recompute, unit["wire"], backend)
        except Exception:
            log.exception("unit %s: the coordinator could not recompute it; its result is dropped",
                          original["unit_id"])
            self._verdict(rows, deltas, ["unchecked"] * len(rows))
            return
        self.check_counts["recomputed"] += 1
        similar = [T.compare(d, reference) for d in deltas]
        log.info("unit %s (%s worker): recomputed here; %s", original["unit_id"], backend,
                 ", ".join(f"{r['worker_id']} cosine {s.cosine:.6f}, norm difference {s.norm_diff:.3g}"
                           for r, s in zip(rows, similar)))
        self._verdict(rows, deltas, [T.judge(s, tolerance) for s in similar], similar)

    def _recompute(self, wire: str, backend: str = "python") -> dict:
        """The unit as issued (its JSON), computed here as an honest worker of ``backend`` would
        (blocking): a browser tab's as the tab draws and steps (``models.browser_unit``: its seeded
        batches, crops and masks, the same step graph on onnxruntime's CPU kernels), any other's as
        the Python worker does (``worker_py.unit.run_unit``). Either goes through the unit's codec."""
        unit = WorkUnit.from_json(json.loads(wire))
        base = decode_delta(self.store.get_blob(unit.model_version))
        xs, ys = zip(*(decode_shard(self.store.get_blob(s)) for s in unit.shard_ids))
        graph = None
        if backend == "browser":   # the step graph of this coordinator's cache, the one it serves the tabs
            unit = dataclasses.replace(unit, compute_as="browser")
            graph = step_graph(unit.model, unit.batch_size, step_cache_dir())
        return decode_delta(run_unit(unit, base, np.concatenate(xs), np.concatenate(ys), "coordinator",
                                     step_graph=graph).delta)

    def _verdict(self, rows: list[dict], deltas: list[dict], outcomes: list[str],
                 similar: list[T.Similarity] | None = None) -> None:
        """Write a check's outcome in one transaction: the first ``valid`` row (the original when it is
        valid) goes on to the aggregator, other valid rows are dropped (``replica``), ``invalid`` ones
        (``distrusted``) lose trust and so do their workers' other held results; ``inconclusive`` and
        ``unchecked`` (the coordinator could not recompute the unit) rows are dropped with that reason, but an
        inconclusive check that is its worker's ``inconclusive_lost``-th in a row counts as ``invalid``."""
        band = [o == "inconclusive" for o in outcomes]
        outcomes = ["invalid" if b and T.inconclusive_loses(self.trust.get(r["worker_id"]), self.policy) else o
                    for r, o, b in zip(rows, outcomes, band)]
        fold = next((i for i, o in enumerate(outcomes) if o == "valid"), None)
        won = [True if o == "valid" else False if o == "invalid" else None for o in outcomes]
        drops, states, shards, blobs = [], [], [], []
        for i, (row, outcome) in enumerate(zip(rows, outcomes)):
            states.append((row["seq"], outcome))
            if i != fold:
                drops.append((row["seq"], {"valid": "replica", "invalid": "distrusted"}.get(outcome, outcome)))
                blobs.append(row["delta_blob"])
        original = rows[0]
        if fold is None:
            shards.append(self.store.unit(original["unit_id"])["shard_ids"])
        with self.store.transaction():
            for row, w, b in zip(rows, won, band):
                if b or w is not None:   # (an inconclusive check is counted: None)
                    self.trust.verdict(row["worker_id"], None if b else w, row["num_samples"] if w else 0)
            for row, w in zip(rows, won):
                if w is False:   # the loser's other results not yet folded are withdrawn: held, or waiting
                    loser = row["worker_id"]
                    held = [o for o in self.store.held_results() if o["worker_id"] == loser and o["seq"] != original["seq"]]
                    # (used unchecked, in the inbox or the strategy's buffer: a trusted worker's that turned)
                    waiting = [u.seq for u in self.inbox if u.worker_id == loser] + self.aggregator.withdraw(loser)
                    if waiting:
                        kept = [u for u in self.inbox if u.worker_id != loser]
                        self.inbox.clear()
                        self.inbox.extend(kept)
                    unused = [self.store.result(seq) for seq in waiting]
                    for other in held + unused:
                        drops.append((other["seq"], "distrusted"))
                        states.append((other["seq"], "withdrawn"))
                        blobs.append(other["delta_blob"])
                        shards.append(self.store.unit(other["unit_id"])["shard_ids"])
                    for other in held:
                        self._supersede_replicas(other["unit_id"])
                    self.trust.withdrawn(loser, sum(o["num_samples"] for o in unused))   # (they were credited)
            self._supersede_replicas(original["unit_id"])
            self.store.set_check(states)
            self.store.mark_dropped(drops)
        for s in shards:
            self.factory.requeue(s)
        self._delete_blobs(blobs)
        if fold is not None:
            row = rows[fold]
            self.inbox.append(Inbound(row["seq"], deltas[fold], row["base_step"], row["num_samples"], row["worker_id"],
                                      row["loss_after"], row["delta_blob"]))
        for i, (row, outcome) in enumerate(zip(rows, outcomes)):
            if outcome not in ("valid", "unchecked"):
                record = self.trust.get(row["worker_id"])
                how = f" (cosine {similar[i].cosine:.4f}, norm difference {similar[i].norm_diff:.3g})" if similar else ""
                lost = "lost" + (f" ({self.policy.inconclusive_lost} inconclusive in a row)" if band[i] else "")
                log.warning("worker %s: check of unit %s %s against the coordinator's computation%s%s",
                            row["worker_id"], original["unit_id"], lost if outcome == "invalid" else outcome, how,
                            "; quarantined" if record and record.quarantined else "")

    def _supersede_replicas(self, unit_id: str) -> None:
        """The check of ``unit_id`` is decided: a replica still out is answered ``superseded`` when it comes."""
        for replica in self.store.replicas_of(unit_id):
            if replica["status"] == "leased":
                self.store.supersede(replica["unit_id"])

    def _delete_blobs(self, blobs) -> None:
        """Delete the delta blobs no result waiting to be folded or dropped needs."""
        self.store.unlink_blobs(self._forget_blobs(blobs))

    def _forget_blobs(self, blobs) -> list[Path]:
        """``_delete_blobs`` but for unlinking the files, which it returns (``Store.delete_blobs``)."""
        blobs = [b for b in blobs if b]
        if not blobs:
            return []
        pending = self.store.pending_blobs(blobs)
        return self.store.delete_blobs([b for b in blobs if b not in pending])

    async def _prepare_inbox(self) -> dict[int, Prepared]:
        """Each waiting update's rebase and norm (``Aggregator.prepare``), by seq, made in a thread for
        ``_offer_inbox`` (under ``lock``: the model does not move meanwhile; an update that comes in meanwhile
        waits for the next settle, or near the budget's end is prepared by ``add`` itself): a pass over each
        update's arrays the event loop does not make."""
        waiting, agg = list(self.inbox), self.aggregator
        if not waiting:
            return {}
        return await asyncio.to_thread(lambda: {u.seq: agg.prepare(u.delta, u.base_step) for u in waiting})

    def _offer_inbox(self, prepared: dict[int, Prepared] | None = None, prepared_only: bool = False) -> None:
        """Offer every waiting update to the aggregator, with its ``_prepare_inbox`` preparation if any;
        ``prepared_only``: only those prepared (the first ones in line), the others stay in line."""
        prepared = prepared or {}
        drops: list[tuple[int, str]] = []
        while self.inbox:
            if prepared_only and self.inbox[0].seq not in prepared:
                break
            u = self.inbox.popleft()
            self._undecided[u.seq] = u.worker_id
            self._blobs[u.seq] = u.blob
            self._offered[u.seq] = (self.step, self._rank)
            self._rank += 1
            drops += self.aggregator.add(u.seq, u.delta, u.base_step, u.samples, u.worker_id, u.loss,
                                         prepared.get(u.seq))
        if drops:   # one commit for all of them, with where each was offered (a replay offers them again)
            offered = self._take_offered([s for s, _ in drops])
            self.store.mark_dropped(drops, offered)
            self._decided(offered)

    def _take_offered(self, seqs: list[int]) -> list[tuple[int, int, int]]:
        for seq in seqs:
            self._undecided.pop(seq, None)
        return [(seq, *self._offered.pop(seq)) for seq in seqs if seq in self._offered]

    def awaits_fold(self, worker_id: str) -> bool:
        """Whether a result of this worker is logged but not yet folded in nor dropped (a unit cut for it
        now would lack it)."""
        return any(u.worker_id == worker_id for u in self.inbox) or worker_id in self._undecided.values()

    async def _commit(self, agg: Aggregation) -> None:
        """The fold's ledger (the version's row, each update's fate and where it was offered) in one
        commit; the model itself is written when the persistence policy says so (or a unit is cut
        from it)."""
        version = None
        if agg.state is not None:
            version = Version(agg.step, "", agg.samples, len(agg.folded), self.clock())
            for seq in agg.folded:   # whose results this version holds (``publish``)
                if seq in self._undecided:
                    self._folded[self._undecided[seq]] = agg.step
        offered = self._take_offered([*agg.folded, *(s for s, _ in agg.dropped)])
        self.store.commit_version(version, list(agg.folded), None, list(agg.dropped), offered)
        self.aggregator.advance(agg)
        if agg.state is not None:
            self._keep_stats(agg.step, agg.state)
        self.agg_times.append(agg.seconds)
        self._decided(offered)
        if version is not None and self._persist_due():
            await self.persist()

    def _keep_stats(self, step: int, state: dict) -> None:
        """Keep a copy of version ``step``'s running statistics (a few kilobytes), for ``_state_at``."""
        self._stats[step] = {n: np.array(v, copy=True) for n, v in state.items() if is_running_stat(n)}
        while len(self._stats) > STATS_KEPT:
            self._stats.popitem(last=False)

    def _persist_due(self) -> bool:
        """The persistence policy (``settle`` writes the final version itself, once the budget is spent)."""
        cfg = self.config
        return (self.step - self.persisted_step >= cfg.persist_every_versions
                or self.clock() - self._persisted_at >= cfg.persist_every_s)

    async def persist(self) -> None:
        """Write the current model and the strategy's state durably (right after a fold: the strategy
        holds no buffer then), mark the version persisted, and let go of what a replay no longer needs."""
        if self.step == self.persisted_step:
            return
        step, blob = await self._written_current()
        state = self.strategy.state_dict(include_buffer=False).to_bytes()
        # the writes, and the unlinking of what no replay needs any more, off the event loop
        files, pruned = self._persist(step, blob, await asyncio.to_thread(self.store.put_blob, state))
        await asyncio.to_thread(self.store.unlink_blobs, files)
        self._mark_pruned(pruned)

    def persist_now(self) -> None:
        """``persist``, blocking (on shutdown)."""
        if self.store is not None and self.step != self.persisted_step:
            step, blob = self._write_current()
            files, pruned = self._persist(step, blob, self.store.put_blob(
                self.strategy.state_dict(include_buffer=False).to_bytes()))
            self.store.unlink_blobs(files)
            self._mark_pruned(pruned)

    def _persist(self, step: int, blob: str, strategy_blob: str) -> tuple[list[Path], list[int]]:
        """Record version ``step`` (written as ``blob``) and the strategy's state (``strategy_blob``) as persisted;
        returns the files no replay needs any more, to unlink, and the versions whose blobs they include,
        to mark pruned once they are (``_prune_versions``)."""
        old_strategy = self.store.get_meta("strategy_state")
        with self.store.transaction():
            self.store.set_version_blob(step, blob)
            self.store.set_meta("strategy_state", {"blob": strategy_blob})
            self.store.set_meta("persisted_step", step)
        self.persisted_step, self._persisted_at = step, self.clock()
        if old_strategy and old_strategy["blob"] != strategy_blob:
            self.store.delete_blob(old_strategy["blob"])
        keep = [(s, b) for s, b in self._replay_blobs if s >= step]
        gone = {b for s, b in self._replay_blobs if s < step} - {b for _, b in keep}
        self._replay_blobs = keep
        files = self._forget_blobs(gone)   # folded into a persisted version: no replay needs them
        pruned, version_files = self._prune_versions()
        return files + version_files, pruned

    def _decided(self, offered: list[tuple[int, int, int]]) -> None:
        """Updates the strategy decided on (``(seq, offered at, rank)``): their delta blobs stay until a
        persisted version covers them (a replay from the last persisted version offers them again)."""
        for seq, step, _ in offered:
            blob = self._blobs.pop(seq, None)
            if blob is not None:
                self._replay_blobs.append((step, blob))

    def _prune_versions(self) -> tuple[list[int], list[Path]]:
        """Old model blobs to drop, keeping the newest, the best evaluated, and every base a leased unit
        may come back with: their steps, and the files to unlink before ``_mark_pruned``."""
        cap = self.config.max_staleness
        keep = self.store.needed_base_steps(self.step - cap if cap is not None else 0)
        keep.update(range(max(0, self.step - self.config.keep_versions + 1), self.step + 1))
        best = self.store.best_eval_step()
        if best is not None:
            keep.add(best)
        gone = [(step, blob) for step, blob in self.store.prunable_versions(self.step - self.config.keep_versions)
                if step not in keep]
        return [step for step, _ in gone], self.store.delete_blobs([blob for _, blob in gone])

    def _mark_pruned(self, steps: list[int]) -> None:
        if steps:
            with self.store.transaction():   # one commit
                for step in steps:
                    self.store.mark_version_pruned(step)

    # ------------------------------------------------------------------ evaluation
    def evaluate_current(self) -> dict:
        """Test loss and accuracy of the current version (blocking; run it in a thread). An evaluated
        version can be the job's best, which ``GET /api/v1/model?version=best`` and ``crowdtrain
        export`` hand out, so its model is written here if the persistence policy has not yet (the
        row's ``blob``; ``record_eval`` records it)."""
        step, samples, state = self.step, self.samples, self.state
        acc, loss = self.evaluator(state)
        version = self.store.version(step)
        blob = version.blob if version is not None and version.blob else self.store.put_blob(encode_delta(FP32, state))
        return {"version": step, "samples": samples, "seconds": self.clock() - self.started,
                "test_acc": acc, "test_loss": loss, "blob": blob}

    def record_eval(self, row: dict) -> None:
        version = self.store.version(row["version"])
        if version is not None and not version.blob and row.get("blob"):
            self.store.set_version_blob(row["version"], row["blob"])
        self.store.add_eval(row["version"], row["samples"], row["seconds"], row["test_acc"], row["test_loss"])

    # ------------------------------------------------------------------ visibility
    def _seen(self, worker_id: str, backend: str | None, now: float, computes: tuple[str, ...] | None = None,
              runtime: Runtime | None = None) -> None:
        """A request of ``worker_id``; a unit request also says its ``backend``, what else it ``computes`` and
        its ``runtime`` (a tab says it once its first unit set it up)."""
        stats = self.workers.get(worker_id)
        if stats is None:
            stats = self.workers[worker_id] = WorkerStats(backend or "unknown")
        elif backend:
            stats.backend = backend
        if computes is not None:
            stats.computes = computes
        if runtime is not None and runtime.runtime is not None:
            stats.runtime = runtime
        stats.last_seen = now

    def _credit(self, worker_id: str, samples: int, compute_s: float, now: float, wall_s: float) -> None:
        stats = self.workers[worker_id]
        stats.units, stats.samples, stats.compute_seconds = (stats.units + 1, stats.samples + samples,
                                                             stats.compute_seconds + compute_s)
        self.factory.observe(worker_id, wall_s, samples)
        issued = now - wall_s
        self.accepted_log.append((now, samples, worker_id, issued))
        while self.accepted_log and self.accepted_log[0][0] < now - RATE_WINDOW_S:   # bounded without a status poll
            self.accepted_log.popleft()

    def _rates(self, now: float) -> tuple[dict[str, float], float]:
        """(samples/s per worker, units/s) over the last ``RATE_WINDOW_S`` seconds. A unit's samples are spread
        over its time from lease to result (one that straddles the window's start counts for its part inside),
        and a worker's rate runs to its last result, or to a unit's mean duration ago once that is later (a
        unit in flight is not counted yet): steady for a steady worker, fading out for one that left."""
        start = now - RATE_WINDOW_S
        while self.accepted_log and self.accepted_log[0][0] < start:
            self.accepted_log.popleft()
        per_worker: dict[str, list[tuple[float, int, float]]] = {}
        for done, n, worker, issued in self.accepted_log:
            per_worker.setdefault(worker, []).append((done, n, issued))
        rates: dict[str, float] = {}
        units = 0.0
        for worker, rows in per_worker.items():
            begin = max(start, min(issued for _, _, issued in rows))
            mean = sum(done - issued for done, _, issued in rows) / len(rows)
            span = max(max(max(done for done, _, _ in rows), now - mean) - begin, 1.0)
            inside = [1.0 if issued >= start or done <= issued else (done - start) / (done - issued)
                      for done, _, issued in rows]
            rate = sum(n * f for (_, n, _), f in zip(rows, inside)) / span
            rates[worker] = float(round(rate) if rate >= 10 else round(rate, 1))   # as shown: the total is their sum
            units += sum(inside) / span
        return rates, units

    def status(self) -> JobStatus:
        now = self.clock()
        rates, units_rate = self._rates(now)
        counts = self.store.unit_counts()
        totals = self.store.result_totals()
        online = {w: s for w, s in self.workers.items() if now - s.last_seen <= ONLINE_S}
        agg = self.agg_times
        history = self.store.evals()
        best = max(history, key=lambda r: (r["test_acc"], r["version"]), default=None)
        rows = [WorkerRow(w, s.backend, s.units, rates.get(w, 0.0), round(now - s.last_seen, 1),
                          runtime=s.runtime.runtime, webgpu_check=s.runtime.webgpu_check, runtime_note=s.runtime.note)
                for w, s in online.items()]
        described = self.strategy.describe()
        return JobStatus(
            job=self.config.job, model=self.config.model, strategy=described,
            strategy_settings=strategy_docs.settings(described),
            model_version=self.step, model_blob=self.store.version(self.step).blob,
            samples=self.samples, budget_samples=self.budget, finished=self.finished,
            units_issued=sum(counts.values()), units_accepted=totals["accepted"],
            units_failed=counts.get("failed", 0) + counts.get("returned", 0),
            units_expired=counts.get("expired", 0), units_leased=counts.get("leased", 0),
            units_rejected=self.store.rejections(),
            updates_applied=totals["applied"], updates_dropped=self.store.dropped_counts(),
            updates_pending=totals["accepted"] - totals["applied"] - totals["dropped"],
            workers_online=len(online),
            workers=rows, samples_per_second=round(float(sum(r.samples_per_second for r in rows)), 1),
            units_per_second=units_rate, rate_window_s=RATE_WINDOW_S,
            uptime_s=now - self.started,
            staleness_histogram={str(k): v for k, v in sorted(self.store.staleness_counts().items())},
            aggregation_seconds={"count": agg.count, "mean": agg.total / agg.count if agg.count else 0.0,
                                 "max": agg.max},
            accuracy_history=history,
            best=None if best is None else {"version": best["version"], "samples": best["samples"],
                                            "test_acc": best["test_acc"]},
            **self._trust_status(),
            staleness_cap=self.intake.stale_cap(),
        )

    def _trust_status(self) -> dict:
        held = self.store.held_counts()
        records = sorted(self.trust.records.values(), key=lambda r: (not r.quarantined, -self.workers.get(
            r.worker_id, WorkerStats("")).last_seen, r.worker_id))[:TRUST_ROWS]
        # an operator's worker (its last request carried a --trusted-tokens token) has its results used unchecked
        rows = [TrustRow(r.worker_id, r.backend, 1.0 if r.operator else round(T.reputation(r, self.policy), 4),
                         0.0 if r.operator else round(T.replication_probability(r, self.policy), 4), r.results,
                         r.replicated, r.valid, r.invalid, r.consecutive_valid, r.quarantined, r.credit, r.operator,
                         r.inconclusive, bool(r.key_digest))
                for r in records]
        replication = {"policy": self.config.replication, "held": held.get("held", 0),
                       "replicas_waiting": held.get("replica", 0),
                       "quarantined": sum(r.quarantined for r in self.trust.records.values()), **self.check_counts}
        return {"updates_held": held.get("held", 0), "replication": replication, "trust": rows}

    def close(self) -> None:
        if self.store is not None:
            try:
                if getattr(self, "factory", None) is not None:   # (not when opening failed before it)
                    self.factory.flush(force=True)
                self.persist_now()
            except Exception:
                log.exception("writing the last version on shutdown failed; the result log replays it")
            self.store.close()
