"""Several coordinator processes for one job, its state in Redis: ``crowdtrain coordinator --redis URL``.

Every process serves the job's whole protocol on its own port (workers and tabs notice nothing):

- **One leader** at a time (``coordinator.leader.LeaderLock``, a lease in Redis) runs the ``Job``
  on a ``RedisStore`` (``coordinator.redis_store``): it cuts units, checks and logs results,
  folds them, evaluates. Its HTTP service (``coordinator.app``, unchanged) listens on a loopback
  port of its own (``--advertise-host``), announced in Redis.
- **Every process**, the leader's included, answers on its public port: blob downloads that are
  not a browser's gzip request straight from the shared blob directory (``--blob-dir``); a result
  or a hand-back, checked and logged there in a helper thread (``LocalIntake``: the leader's own
  intake checks on the rows in Redis, the delta's blob written, the row appended atomically while
  its unit is out), and the leader folds it (``Node.ingest``; the answer waits until the leader
  holds it, ``Node.until_ingested``); everything else (unit requests, what ``LocalIntake`` leaves
  to the leader, the dashboard) forwarded to the leader's service, the body read
  first, with the client's address appended to ``X-Forwarded-For`` (rate limits and the replica
  address check still see the real client); the leader's own public port hands those to the job's
  application in the same process (``in_process``). While no leader answers (a takeover), a forwarded
  request gets ``503`` with ``Retry-After``: the Python worker and the tab retry 5xx answers.
- **Takeover**: the leader renews its lease every ``ttl / 6``; once it stops (``kill -9``),
  another process takes the lock within ``--leader-ttl`` seconds, opens the job from Redis
  exactly as a restart does from SQLite (the folds after the persisted version replayed from
  the result log, results neither folded nor dropped offered again), and announces itself.
  Every write of a leader is fenced by its lock token (``RedisStore``), so a leader that lost
  its lock writes nothing more, and it exits (status 75) at once; a supervisor restarts it as a
  process that waits for the lock again.

The ledger's guarantees are SQLite's: a unit's result is logged once (``r:unit``, checked in the
same atomic script that appends it, whoever appends it), each result's fate is written by the
leader with the fold that decides it, in one atomic script, and the leader's own moves of a unit
are skipped when the unit changed since it read it (another process logged its result).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import secrets
import sys
import time
import urllib.parse
from pathlib import Path

log = logging.getLogger("crowdtrain.coordinator")

POLL_S = 0.5                 # how often a process that does not lead tries the lock
ADDRESS_CACHE_S = 1.0        # how long a process trusts the leader address it read
RETRY_AFTER_S = 1            # a request that found no leader: retry this soon
INGEST_WAIT_S = 2.0          # a result taken here is answered once the leader holds it, or after this long
INGEST_POLL_S = 0.01         # how often a waiting process looks whether the leader took its results
LOST_EXIT = 75               # exit status of a leader that lost its lock (EX_TEMPFAIL: restart me)
HOP_HEADERS = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
               "transfer-encoding", "upgrade", "host", "content-length"}


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several processes (Redis)")
    g.add_argument("--redis", metavar="URL", type=_redis_url,
                   help="keep the job's state in Redis (redis://HOST:PORT/DB) instead of STATE/state.db; any "
                        "number of processes started so serve the job, one aggregates (default: none: SQLite)")
    g.add_argument("--blob-dir", type=Path, metavar="DIR",
                   help="with --redis: the blob directory every process of the job shares (model versions, shards, "
                        "results' deltas; a shared filesystem across hosts) (default: STATE/blobs)")
    g.add_argument("--leader-ttl", type=_ttl, default=5.0, metavar="S",
                   help="with --redis: seconds a silent leader keeps the lock; another process takes over "
                        "after that (default: 5)")
    g.add_argument("--advertise-host", default="127.0.0.1", metavar="HOST",
                   help="with --redis: the address the leader's own service listens on, which the other "
                        "processes forward to (default: 127.0.0.1: every process on this host)")


def _redis_url(text: str) -> str:
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("redis", "rediss", "unix") or not (parts.netloc or parts.path):
        raise argparse.ArgumentTypeError(f"expected redis://HOST:PORT/DB, got {text!r}")
    return text


def _ttl(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 1.0 <= value <= 300.0:
        raise argparse.ArgumentTypeError(f"expected seconds in [1, 300], got {text!r}")
    return value


class Unreachable(RuntimeError):
    """Redis does not answer (yet): worth starting again later, unlike a wrong option."""


def check_cluster(args: argparse.Namespace, config) -> None:
    """What can be checked before slow work: the options fit (``ValueError``), Redis answers
    (``Unreachable``)."""
    import redis

    if config.admin_token_file:
        raise ValueError("argument --admin-token-file: several jobs in one deployment need the embedded SQLite "
                         "store (one process, no --redis); with --redis a deployment runs one job")
    try:
        client = redis.Redis.from_url(args.redis, socket_timeout=5)
    except ValueError as e:
        raise ValueError(f"argument --redis: {e}") from None
    try:
        client.ping()
    except redis.RedisError as e:
        raise Unreachable(f"argument --redis: cannot reach {args.redis} ({e})") from None


def blob_dir(args: argparse.Namespace, config) -> Path:
    return Path(args.blob_dir) if args.blob_dir else config.state / "blobs"


# ---------------------------------------------------------------------------- the leader's job
def cluster_job(config, url: str, blobs: Path, lock, **job_args):
    """A ``Job`` whose store is Redis (fenced by ``lock``) with its blobs under ``blobs``; ``job_args``: the
    ``Job``'s own (a clock)."""
    from coordinator.job import Job
    from coordinator.redis_store import RedisStore

    class ClusterJob(Job):
        def open_store(self):
            store = RedisStore(url, self.config.job, blobs, root=self.config.state, clock=self.clock, fence=lock)
            return store, store.secret()

        def take_remote(self, row: dict, delta: dict, unit: dict | None = None) -> None:
            """A result another process checked and logged (``LocalIntake``): what ``Job._log`` does after
            its own intake, the row aside: the worker's record and speed, a tail copy superseded, then the
            inbox (or dropped, ``quarantined``, if the worker was quarantined since). ``unit``: its unit's
            row, when the caller read it."""
            from coordinator.job import Inbound

            now, worker = self.clock(), row["worker_id"]
            unit = self.store.unit(row["unit_id"]) if unit is None else unit
            self.store.taken(row)
            self._seen(worker, None, now)
            self._credit(worker, row["num_samples"], row["compute_seconds"] or 0.0, now,
                         max(0.0, row["accepted"] - (unit["issued"] if unit else row["accepted"])))
            with self.store.transaction():
                self.trust.result(worker, False, row["num_samples"])
            quarantined = self.trust.quarantined(worker)   # since the other process looked
            if unit is not None and unit.get("twin") and not quarantined:   # a tail copy issued meanwhile
                self.store.supersede(unit["twin"])
            if quarantined:
                self.store.mark_dropped([(row["seq"], "quarantined")])
                self._delete_blobs([row["delta_blob"]])
                if unit is not None and not self.store.twin_alive(unit):
                    self.factory.requeue(unit["shard_ids"])
            else:
                self.inbox.append(Inbound(row["seq"], delta, row["base_step"], row["num_samples"], worker,
                                          row["loss_after"], row["delta_blob"]))
            self.work.set()

    return ClusterJob(config, **job_args)


class LocalIntake:
    """How a process (the leader's too, on its public port) takes a result itself: the leader's intake checks (the same
    ``Intake``, on the rows in Redis), the delta's blob written, the row appended in one atomic step
    while the unit is out (``RedisStore.append_result``); the leader folds it (``Node.ingest``). A hand-back
    or a failure report of a unit still out (not a tail copy, nor a replica) is moved here too
    (``RedisStore.give_back``); the leader puts its shards back in line.
    A refusal that ends a unit still out (too stale) is answered here, the unit moved the same way.
    Everything else goes to the leader: any other refusal (the leader refuses it again and counts it), a tail
    unit's copy, a quarantined worker, a unit that ended meanwhile, and, while
    replicated checks are on (``--replication``, the default), every result but those of the operator's own
    workers (``--trusted-tokens``, never checked): the leader decides, from the worker's trust record,
    whether the result is held for a replica, and it issues and judges the replicas."""

    def __init__(self, node: "Node"):
        from coordinator.intake import Intake
        from coordinator.limits import gate_tokens, trusted_tokens
        from coordinator.redis_store import RedisStore

        cfg = node.config
        self.store = RedisStore(node.url, cfg.job, node.blobs, root=cfg.state)
        self.intake = Intake(cfg, self.store, self.store.secret(), node.spec, time.time)
        self.trusted = trusted_tokens(cfg)   # the operator's own workers: never checked, so taken here with checks on
        self.tokens = gate_tokens(cfg, self.trusted)
        self.taken = self.passed = self.given = self.refused = 0
        self.checks = cfg.replication != "off"

    def leader_decides(self, authorization: str | None) -> bool:
        """Whether the leader decides every result sent with this ``Authorization`` (a token the gate does not
        know, or a stranger's while checks are on): ``take`` passes them all on, reading each body for nothing
        but whether it is a hand-back."""
        return self._gated(authorization) or self._checked(authorization)

    def _gated(self, authorization: str | None) -> bool:
        """A token the gate (``--worker-tokens``) does not know: the leader decides everything it sends."""
        from coordinator.limits import carries

        return bool(self.tokens) and not carries(authorization, self.tokens)

    def _checked(self, authorization: str | None) -> bool:
        """A stranger's while checks are on: the leader decides whether its results are held for a check."""
        from coordinator.limits import carries

        return self.checks and not carries(authorization, self.trusted)

    def take(self, unit_id: str, body: bytes, authorization: str | None) -> tuple[dict, int, int | None] | None:
        """(answer, HTTP status, the result's seq) when this process logged the result (or it is a duplicate:
        no seq); None when the leader must decide. Blocking: run it in a thread."""
        from contract.errors import ContractError
        from contract.units import unpack_result
        from coordinator.intake import Failure, Rejection

        if self._gated(authorization):
            return None
        if self._checked(authorization):
            try:   # a result the leader decides whether to hold for a check (a hand-back is taken here all the same)
                if unpack_result(body).error is None:
                    return None
            except ContractError:
                return None
        unit = None
        try:
            parsed = self.intake.parse(unit_id, body)
            if isinstance(parsed, Failure):
                return self._give_back(parsed)
            if not isinstance(parsed, tuple):
                return None
            unit, result = parsed
            if unit.get("twin") or unit.get("replica_of"):
                return None
            record = self.store.trust_record(result.worker_id)
            if record and record.get("quarantined"):
                return None
            latest = self.store.latest_version()
            step = latest.step if latest else 0
            accepted = self.intake.accept(unit, result, step)
        except Rejection as r:
            return self._refuse(unit, r)
        blob = self.store.put_result_blob(result.delta)
        seq = self.store.append_result(unit_id, result.worker_id, unit["base_step"], accepted.staleness,
                                       result.num_samples, result.loss_before, result.loss_after,
                                       result.compute_seconds, blob)
        if seq == -1:
            return {"error": {"code": "duplicate", "field": "result.unit_id",
                              "message": f"a result for unit {unit_id!r} was already accepted"}}, 409, None
        if seq < 0:
            return None
        self.taken += 1
        return {"accepted": True, "staleness": accepted.staleness, "model_version": step,
                "late": accepted.late}, 200, seq

    def _refuse(self, unit: dict | None, rejection) -> tuple[dict, int, None] | None:
        """A refusal that ends a unit still out (``Rejection.give_up``: too stale, say, about half the results
        at the staleness cap under load) of a result checked here: the unit moved as the leader's ``give_up``
        would move it (``RedisStore.give_back``, its shards put back in line by the leader), the refusal counted,
        and answered here as the leader would answer it. None (the leader decides): any other refusal, or a unit
        that changed meanwhile."""
        if unit is None or rejection.give_up is None or not self._move(unit, rejection.give_up):
            return None
        self.store.count_rejection(rejection.code)
        self.refused += 1
        return rejection.body(), rejection.status, None

    def _move(self, unit: dict, status: str) -> bool:
        """Move ``unit`` (as read) to ``status`` as the leader's ``give_up`` would, if it is out and neither a tail copy
        nor a replica (those are the leader's) and still out without a result in Redis (``RedisStore.give_back``)."""
        return (unit["status"] == "leased" and not unit.get("twin") and not unit.get("replica_of")
                and self.store.give_back(unit["unit_id"], status))

    def _give_back(self, failure) -> tuple[dict, int, None] | None:
        """A hand-back or a failure report of a unit still out (not a tail copy, nor a replica): moved here as the
        leader's ``give_up`` moves it, its shards put back in line by the leader (``Node.ingest``); the answer is
        the leader's. None: the leader decides."""
        unit, status = failure.unit, failure.status
        if not self._move(unit, status):
            return None
        if status == "failed":   # (as the leader logs it: the operator sees why workers fail)
            log.warning("unit %s failed on worker %s: %s", unit["unit_id"], unit["worker_id"],
                        failure.result.error[:500])
        self.given += 1
        return {"accepted": False, "status": status}, 200, None


class Node:
    """One process of the job: its public service, the election, and (while it leads) the job."""

    def __init__(self, args: argparse.Namespace, config):
        from coordinator.leader import LeaderLock
        from coordinator.redis_store import prefix

        self.args, self.config = args, config
        self.url, self.blobs = args.redis, blob_dir(args, config)
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.lock = LeaderLock(self.url, prefix(config.job) + "leader", args.leader_ttl)
        self.addr_key = prefix(config.job) + "leader:addr"
        self.name = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.leader_url: str | None = None      # the leader's service (cached ADDRESS_CACHE_S)
        self._read_at = -1e9
        self.job = None
        self.runner = None
        self.data = None
        self.session = None
        self.max_body, self.spec = result_cap(config)
        self.local: LocalIntake | None = None   # results taken here while another process leads
        self.ingesting: asyncio.Task | None = None
        self.ingested_key = prefix(config.job) + "r:ingested"
        self._waiters: list[tuple[int, asyncio.Future]] = []   # results taken here the leader has not yet
        self._watching: asyncio.Task | None = None

    # ------------------------------------------------------------------ election
    async def elect(self) -> None:
        """Try the lock every ``POLL_S`` until this process leads, then open the job and serve it."""
        import redis

        from coordinator import observe
        from models.data import load_cifar10

        cfg = self.config
        self.data = await asyncio.to_thread(load_cifar10, cfg.data, download=cfg.download, progress=False)
        self.local = await asyncio.to_thread(LocalIntake, self)
        # start-up's objects (torch, the data's) out of the cycle collector's passes, as a leader's job does
        # once it is ready: each full collection walked them all, 60-100 ms of the event loop (bench/load.py)
        await observe.freeze_when(lambda: True)
        while True:
            try:
                if await asyncio.to_thread(self.lock.try_acquire):
                    break
            except redis.RedisError as e:
                log.warning("leader election: %s", e)
            await asyncio.sleep(POLL_S)
        self.lock.keep(self._lost)
        began = time.monotonic()
        log.info("process %s leads job %r; opening it from Redis", self.name, cfg.job)
        await self._lead()
        log.info("process %s serves job %r as leader at %s (version %d, took over in %.1f s)", self.name, cfg.job,
                 self.leader_url, self.job.step, time.monotonic() - began)

    def _lost(self) -> None:
        """The lock is another's: stop at once (every write would be refused anyway)."""
        log.error("process %s lost the leader lock; exiting (status %d) so that it starts again as a follower",
                  self.name, LOST_EXIT)
        logging.shutdown()
        os._exit(LOST_EXIT)

    async def _lead(self) -> None:
        from aiohttp import web

        from coordinator.app import SERVER_ARGS, create_app

        job = cluster_job(self.config, self.url, self.blobs, self.lock)
        await asyncio.to_thread(job.open, self.data)
        self.job = job
        # the leader's own service logs no access lines: the public app of this process logs each request once
        own = dataclasses.replace(self.config, access_log="off")
        self.runner = web.AppRunner(create_app(own, job, warm=True, several=False), handle_signals=False, access_log=None,
                                    **SERVER_ARGS)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.args.advertise_host, 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        host = self.args.advertise_host
        self.leader_url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        self._read_at = time.monotonic() + 1e9   # this process knows its own address
        self.ingesting = asyncio.create_task(self.ingest(job))
        self.ingesting.add_done_callback(_fatal_if_failed)
        job.store.announce(self.addr_key, self.leader_url)

    async def ingest(self, job) -> None:
        """Results the other processes logged, into the job's inbox once each. Those the job already holds
        (``open`` loaded every open result) or that are decided are skipped; one taken from the list and
        lost with this process is still open in Redis, so the next leader's ``open`` loads it. And the units
        they were handed back: their shards back in line (``UnitFactory.put_back``), taken off their list in the
        same script."""
        import redis

        store = job.store
        held = {u.seq for u in job.inbox} | set(job._undecided) | set(job._blobs)
        requeued: set[str] = set()   # units given back whose shards are in line here, perhaps still listed
        while True:
            # the results, their rows and their deltas in one hop to a thread, every unit in one round trip: on
            # a busy event loop each hop and each round trip waits its turn, and the other processes answer
            # these results only once the leader holds them (until_ingested)
            try:
                seqs, rows, deltas, given = await asyncio.to_thread(self._take, store, held)
            except Exception:   # Redis in trouble: the lock's renewal decides whether this process still leads
                log.exception("taking the other processes' results failed; trying again")
                await asyncio.sleep(1.0)
                continue
            requeued.intersection_update(given)   # (one no longer listed was taken off)
            fresh = [u for u in given if u not in requeued]
            if fresh:
                try:
                    units = store.units(fresh, kept=True)
                except redis.RedisError:   # still listed: the next turn puts them back
                    log.exception("reading the units other processes were handed back failed")
                else:
                    # the shard queue's state and the list, in one script put off (written with the next ones)
                    with store.transaction(later=True):
                        job.factory.put_back(units)
                        store.put_back(fresh)
                    requeued.update(fresh)
            if not seqs:
                continue
            try:
                units = {u["unit_id"]: u for u in store.units([r["unit_id"] for r in rows], kept=True)} if rows else {}
                # the workers' trust records and the mark, in one script put off to the store's writer thread (a
                # round trip on the event loop was 3.5% of it); a crash may lose them, as any put-off write: the
                # results stay open and the next leader offers them again, the other processes' answers wait
                # their INGEST_WAIT_S
                with store.transaction(later=True):
                    for row in rows:
                        if row["seq"] in deltas:
                            held.add(row["seq"])
                            job.take_remote(row, deltas[row["seq"]], units.get(row["unit_id"]))
                    store.announce(self.ingested_key, max(seqs))   # their processes answer
            except redis.RedisError:   # (in the inbox all the same: the results' answers wait at most INGEST_WAIT_S)
                log.exception("writing the trust records of results taken, and marking them taken, failed")

    @staticmethod
    def _take(store, held: set[int]) -> tuple[list[int], list[dict], dict[int, dict], list[str]]:
        """(In a thread.) The seqs the other processes logged since the last call (waiting up to a second for
        one, or for a unit given back), the rows among them not held by the job nor decided, each one's delta,
        decoded (by seq): a row whose delta cannot be read is left out, and stays open: the next leader's open()
        offers it again; and the units the other processes were handed back (``RedisStore.given_back``)."""
        from contract.codecs import decode_delta

        seqs = store.take_remote(1.0)
        rows = [r for r in (store.result_rows(seqs) if seqs else []) if r["seq"] not in held
                and r["applied_step"] is None and r["dropped"] is None]
        out = {}
        for row in rows:
            try:
                out[row["seq"]] = decode_delta(store.get_blob(row["delta_blob"]))
            except Exception:
                log.exception("result %d (unit %s): its delta could not be read; left for a restart", row["seq"],
                              row["unit_id"])
        return seqs, rows, out, store.given_back()

    async def until_ingested(self, seq: int) -> bool:
        """Wait (at most ``INGEST_WAIT_S``) until the leader holds result ``seq``: the worker's next unit,
        cut by the leader, then starts from a model with it folded in, as with one process (app.fresh_base).
        True when it does."""
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((seq, future))
        if self._watching is None or self._watching.done():
            self._watching = asyncio.create_task(self._watch())
        try:
            return await asyncio.wait_for(asyncio.shield(future), INGEST_WAIT_S)
        except asyncio.TimeoutError:
            return False
        finally:
            self._waiters = [(s, f) for s, f in self._waiters if f is not future]

    async def _watch(self) -> None:
        """One look at what the leader took every ``INGEST_POLL_S`` while results wait for it."""
        while self._waiters:
            try:
                raw = await asyncio.to_thread(self.lock.r.get, self.ingested_key)
            except Exception:   # Redis in trouble: the waits end by their timeout
                raw = None
            done = int(raw) if raw is not None else -1
            for seq, future in self._waiters:
                if seq <= done and not future.done():
                    future.set_result(True)
            await asyncio.sleep(INGEST_POLL_S)

    async def stop(self) -> None:
        if self.ingesting is not None:
            self.ingesting.cancel()
            await asyncio.gather(self.ingesting, return_exceptions=True)
        if self.runner is not None:
            await self.runner.cleanup()   # the job persists its model (fenced: the lock is still held)
        await asyncio.to_thread(self.lock.release)
        if self.session is not None:
            await self.session.close()

    # ------------------------------------------------------------------ forwarding
    def served(self):
        """The job's aiohttp application while this process leads and serves it, else None."""
        return self.runner.app if self.runner is not None and self.lock.held else None

    async def leader(self, fresh: bool = False) -> str | None:
        if fresh or time.monotonic() - self._read_at > ADDRESS_CACHE_S:
            try:
                self.leader_url = await asyncio.to_thread(self.lock.r.get, self.addr_key)
                self._read_at = time.monotonic()
            except Exception as e:   # Redis unreachable: the request is answered 503
                log.warning("reading the leader's address: %s", e)
                return None
        return self.leader_url


def result_cap(config) -> tuple[int, dict]:
    """The largest body the job takes (``Job.max_body``: 4 bytes a float of the delta + the slack), and the
    delta's spec (names, shapes, dtypes) a result is checked against."""
    import math

    import torch

    from models import registry
    from models.local import delta_spec

    with torch.random.fork_rng():
        spec = delta_spec(registry.build(config.model))
    return 4 * sum(math.prod(s) for s, _ in spec.values()) + config.body_slack_bytes, spec


def no_leader(why: str):
    from aiohttp import web

    return web.json_response({"error": {"code": "no_leader", "field": "",
                                        "message": f"no coordinator process leads this job right now ({why}); "
                                                   f"retry in {RETRY_AFTER_S} s"}},
                             status=503, headers={"Retry-After": str(RETRY_AFTER_S)})


def public_app(node: Node):
    """The process's public service: local blobs, the cluster's state, ``/metrics`` (this process's
    requests and memory, the job's state as the leader's ``/api/status`` says), everything else
    forwarded, under the leader's route templates (``coordinator.app.ROUTES``: the histogram's and the
    access log's ``route``)."""
    import aiohttp
    from aiohttp import web

    from contract.units import is_blob_id
    from coordinator import observe
    from coordinator.app import (DASHBOARD_FILES, IMMUTABLE, ROUTES, body_seconds, encoded, gzip_for_browser,
                                 quiet_unparsed_requests, slow_sender)
    from coordinator.limits import client_address, is_loopback
    from coordinator.threads import helper_threads

    quiet_unparsed_requests()
    job_status: list[dict | None] = [None]   # the leader's /api/status, read for the scrape being answered
    observer = observe.Observer(lambda: job_status[0], node.config.access_log)

    async def read_all(request: web.Request) -> bytes | web.Response:
        """The whole body, at most the job's cap (read before forwarding: a request is answered only
        once its body is in, which a proxy in front needs, and it can be sent again)."""
        if (refused := encoded(request)) is not None:
            return web.json_response(refused.body(), status=refused.status)
        cap, size = node.max_body, request.content_length
        if size is not None and size > cap:
            return web.json_response({"error": {"code": "too_large", "field": "body", "message":
                                      f"body: expected a Content-Length of at most {cap} bytes, got {size} bytes"}},
                                     status=413)
        chunks, got = [], 0
        seconds = body_seconds(size or cap)
        try:
            async with asyncio.timeout(seconds):
                async for chunk in request.content.iter_any():
                    got += len(chunk)
                    if got > cap:
                        return web.json_response({"error": {"code": "too_large", "field": "body", "message":
                                                  f"body: expected at most {cap} bytes, got more"}}, status=413)
                    chunks.append(chunk)
        except TimeoutError:
            return web.json_response(slow_sender(seconds, got).body(), status=408)
        return b"".join(chunks)

    async def forward(request: web.Request, body: bytes | None = None) -> web.StreamResponse:
        own_job = node.served()
        if own_job is not None and body is None:
            return await in_process(request, own_job)
        if body is None and request.body_exists:
            body = await read_all(request)
            if isinstance(body, web.Response):
                return body
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        headers["Host"] = request.host
        forwarded = request.headers.get("X-Forwarded-For")
        client = client_address(request.remote, forwarded)
        headers["X-Forwarded-For"] = f"{forwarded}, {client}" if forwarded else client
        for attempt in (0, 1):
            target = await node.leader(fresh=attempt > 0)
            if target is None:
                return no_leader("none announced yet")
            answer = None
            try:
                async with node.session.request(request.method, target + request.rel_url.raw_path_qs,
                                                headers=headers, data=body, allow_redirects=False) as r:
                    answer = web.StreamResponse(status=r.status, reason=r.reason)
                    for k, v in r.headers.items():
                        if k.lower() not in HOP_HEADERS:
                            answer.headers.add(k, v)
                    if r.content_length is not None:
                        answer.content_length = r.content_length
                    await answer.prepare(request)
                    async for chunk in r.content.iter_any():
                        await answer.write(chunk)
                    await answer.write_eof()
                    return answer
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as e:
                if answer is not None and answer.prepared:
                    raise   # the leader went away mid-answer: the client sees a cut connection, and retries
                why = f"the leader at {target} did not answer: {type(e).__name__}"
            # once more (a kept-alive connection the leader had closed, or a new leader announced meanwhile)
        return no_leader(why)

    async def in_process(request: web.Request, job_app: web.Application) -> web.StreamResponse:
        """A request to the leader's own public port, answered by the job's application in this process (its
        routes, middlewares and body cap), not sent to it over loopback: the round trip was two more HTTP
        hops on the busiest event loop of the cluster. ``Expect`` was answered already, by this app. (aiohttp's
        ``Application._handle``, private: the test of equal answers on both ports guards it.) A body this app
        has read already (a result ``LocalIntake`` refused to take) still goes over loopback."""
        headers = request.headers.copy()
        headers.popall("Expect", None)
        return await job_app._handle(request.clone(headers=headers, client_max_size=job_app._client_max_size))

    async def result(request: web.Request) -> web.StreamResponse:
        """A result or a hand-back: taken here (``LocalIntake``, in a helper thread) where it can be, by the leader's
        process too (then only the leader's ingest touches it on the event loop), else the leader's job decides."""
        if node.local is None or (node.served() is not None
                                  and node.local.leader_decides(request.headers.get("Authorization"))):
            return await forward(request)   # (the leader's job in-process: its hand-backs are cheap there)
        body = await read_all(request)
        if isinstance(body, web.Response):
            return body
        try:
            answer = await asyncio.to_thread(node.local.take, request.match_info["unit_id"], body,
                                             request.headers.get("Authorization"))
        except Exception:   # Redis or the blob folder in trouble: the leader may still take it
            log.exception("taking a result here failed; passing it to the leader")
            answer = None
        if answer is None:
            node.local.passed += 1
            return await forward(request, body)
        body_out, status, seq = answer
        if seq is not None:
            await node.until_ingested(seq)
        return web.json_response(body_out, status=status)

    async def blob(request: web.Request) -> web.StreamResponse:
        blob_id = request.match_info["blob_id"]
        path = node.blobs / blob_id if is_blob_id(blob_id) else None
        if path is None or gzip_for_browser(request) or not path.is_file():
            return await forward(request)   # a browser may get a gzipped graph; an unknown id: the leader says
        headers = {"ETag": f'"{blob_id}"', "Cache-Control": IMMUTABLE}
        if request.headers.get("If-None-Match") in (f'"{blob_id}"', blob_id):
            return web.Response(status=304, headers=headers)
        try:
            body = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return await forward(request)
        return web.Response(body=body, headers=headers, content_type="application/octet-stream")

    async def cluster(request: web.Request) -> web.Response:
        """This process's part in the cluster. Whether it leads, to anyone (a health check through a proxy asks it);
        the rest (its pid, the leader's internal address, its counters) only to a client on this machine."""
        if not is_loopback(client_address(request.remote, request.headers.get("X-Forwarded-For"))):
            return web.json_response({"leader": node.lock.held, "job": node.config.job},
                                     headers={"Cache-Control": "no-cache"})
        leader = await node.leader()
        local = node.local
        return web.json_response({"process": node.name, "pid": os.getpid(), "leader": node.lock.held,
                                  "leader_url": leader, "job": node.config.job,
                                  "results_taken": local.taken if local else 0,
                                  "results_passed_to_leader": local.passed if local else 0,
                                  "units_given_back": local.given if local else 0,
                                  "results_refused": local.refused if local else 0},
                                 headers={"Cache-Control": "no-cache"})

    async def leader_status(client: str) -> dict | None:
        """The leader's /api/status as ``client`` would see it (its worker ids only to a client on the leader's
        machine: the leader reads the address this process forwards)."""
        target = await node.leader()
        if target is None or node.session is None:
            return None
        try:
            async with node.session.get(target + "/api/status", headers={"X-Forwarded-For": client or "0.0.0.0"},
                                        timeout=aiohttp.ClientTimeout(total=5)) as r:
                return await r.json() if r.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError, ValueError):
            return None

    async def metrics(request: web.Request) -> web.Response:
        """This process's request histogram and memory; the job's families while a leader answers."""
        job_status[0] = await leader_status(client_address(request.remote, request.headers.get("X-Forwarded-For")))
        return observer.exposition(request.headers.get("Accept"), request.headers.get("Accept-Encoding"))

    async def lifecycle(app: web.Application):
        node.session = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=5), connector=aiohttp.TCPConnector(limit=0))
        election = asyncio.create_task(node.elect())
        election.add_done_callback(_fatal_if_failed)
        yield
        election.cancel()
        await asyncio.gather(election, return_exceptions=True)
        await node.stop()

    app = web.Application(client_max_size=1 << 40,   # bodies are streamed to the leader, which caps them
                          middlewares=[observe.middleware])
    app[observe.OBSERVER] = observer
    app.cleanup_ctx.append(helper_threads)
    app.cleanup_ctx.append(lifecycle)
    app.cleanup_ctx.append(observe.watching_loop)
    own = {"/api/v1/blobs/{blob_id}": blob, "/api/v1/units/{unit_id}/result": result, "/metrics": metrics}
    app.router.add_get("/api/v1/cluster", cluster)
    for method, path, _ in ROUTES:
        handler = own.get(path, forward)
        if method == "GET":
            app.router.add_get(path, handler)
        else:
            app.router.add_route(method, path, handler)
    app.router.add_get(DASHBOARD_FILES + "{filename:.+}", forward)
    app.router.add_route("*", "/{tail:.*}", forward)   # anything else: the leader answers (a 404, a 405)
    return app


def _fatal_if_failed(task: asyncio.Task) -> None:
    """The election or the job's opening failed: the process cannot serve; exit with the reason."""
    if task.cancelled() or task.exception() is None:
        return
    e = task.exception()
    from coordinator.redis_store import Fenced

    if isinstance(e, Fenced):
        log.error("lost the leader lock while opening the job: %s", e)
        os._exit(LOST_EXIT)
    log.error("the job cannot be served: %s", e, exc_info=e)
    logging.shutdown()
    os._exit(1)


def serve(args: argparse.Namespace, config, sock) -> int:
    """``crowdtrain coordinator --redis URL``: this process's public service on ``sock`` until stopped."""
    from aiohttp import web

    from coordinator.app import SERVER_ARGS
    from coordinator.main import urls

    try:
        check_cluster(args, config)
    except (ValueError, Unreachable) as e:
        sock.close()
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    import torch

    torch.set_num_threads(max(1, args.threads))
    node = Node(args, config)
    url, _ = urls(config.host, sock.getsockname()[1], args.public_url)
    print(f"coordinator process {node.name} for job {config.job!r} ({config.model}) on {url}, state in {args.redis}, "
          f"blobs in {node.blobs}; waiting for the leader lock or forwarding to its holder", flush=True)
    try:
        web.run_app(public_app(node), sock=sock, print=None, handle_signals=True, shutdown_timeout=5,
                    access_log=None, **SERVER_ARGS)   # --access-log: coordinator.observe
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    return 0
