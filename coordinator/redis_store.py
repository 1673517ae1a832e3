"""The job's state in Redis instead of SQLite: ``RedisStore`` keeps the same contract as ``Store``.

Several coordinator processes serve one job (``coordinator.cluster``); the one that holds the
leader lock (``coordinator.leader``) runs the ``Job`` on a ``RedisStore`` and is the only writer.
Blobs stay content-addressed files in a blob directory every process reads (``--blob-dir``;
a shared filesystem across hosts).

Layout (every key under ``ct:<job>:``; each row's columns are hash fields, each value JSON, so a
float such as a lease deadline comes back bit for bit):

    meta               hash  key -> value (as Store.get_meta / set_meta)
    v, vz, vkept       versions: hash step -> [blob, samples, updates, created, pruned]; all steps;
                       the written, unpruned ones (zsets scored by step)
    u:<id>             a unit's row; u:all (list, issue order), u:leased (zset by issued),
                       u:deadline (zset by deadline, leased only), u:expired (zset by base step),
                       u:count (by status), u:tail (zset by issued: the leased units not copied
                       yet and not replicas, the job tail's candidates; ``tail_candidate``),
                       replicas:<id> (the replicas issued for a unit), u:given (units another process
                       moved as handed back or failed, for the leader to put their shards back in line),
                       u:given:wake (a token each, to wake the leader's wait)
    r:<seq>            a result's row; r:seq (counter), r:unit (unit id -> seq: a unit is accepted
                       once), r:all (list, acceptance order), r:open (neither folded nor dropped),
                       r:open:gen (counts the appends: the leader's cache of the open rows)
                       off:<step> (zset seq -> offer rank: the log a replay folds again), r:rank
    tot, dropc, stale  counters (accepted, samples, applied, dropped; drops by reason; staleness)
    cr:units, cr:samples, cr:last   credit per worker (folded, never dropped)
    trust, evals, rej  trust records, evaluations, rejections by reason
    secret             the job's lease-signing key (hex), the same for every process

Writes are fenced: a transaction's commands are applied by one Lua script that first checks
that the leader lock still holds this process's token (``Fenced`` otherwise), so a leader that
lost its lock (paused past its lease, partitioned) can never write after another took over; the
script is atomic, so a transaction is all or nothing, as SQLite's is. ``fence=None`` (tests, the
export command) writes with MULTI/EXEC and no check.

Durability is Redis's (``appendonly yes``; ``appendfsync always`` makes every answered write
survive a power loss, ``everysec`` loses at most a second of them). A coordinator's ``kill -9``
loses no accepted result: what it wrote is in Redis; what it had not written was never answered,
except what its HTTP service puts off (``RedisStore.write_behind``): the units issued in its last
moments (their results refused, their shards issued again) and the hand-backs then (the unit out
until its lease expires).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import threading
import time
from collections import Counter, deque
from pathlib import Path

import redis

from coordinator.store import LeasedIndex, Store, Version, Writer

FENCED_EXEC = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED this process no longer holds the leader lock')
end
local cmds = cjson.decode(ARGV[2])
local i = 1
while i <= #cmds do
  local c = cmds[i]
  if c[1] == 'CAS' then   -- {'CAS', key, field, expected, n}: skip the next n commands unless the field holds expected
    if redis.call('HGET', c[2], c[3]) ~= c[4] then i = i + tonumber(c[5]) end
  else
    redis.call(unpack(c))
  end
  i = i + 1
end
return #cmds
"""

# Append one accepted result and end its unit, in one atomic step. ARGV: prefix, unit id, the row's
# fields (JSON list), samples, staleness, finished (JSON), the lock key and token ('': no fence), '1' when
# the unit must still be out (a process that does not lead: else -2, the leader decides), '1' to tell the
# leader (r:remote). -1: the unit already has a result.
APPEND_RESULT = """
local p, unit_id = ARGV[1], ARGV[2]
if ARGV[8] ~= '' and redis.call('GET', ARGV[7]) ~= ARGV[8] then
  return redis.error_reply('FENCED this process no longer holds the leader lock')
end
if redis.call('HEXISTS', p .. 'r:unit', unit_id) == 1 then return -1 end
local ukey = p .. 'u:' .. unit_id
local st = redis.call('HGET', ukey, 'status')
if ARGV[9] == '1' and st ~= '"leased"' and st ~= '"expired"' then return -2 end
local seq = redis.call('INCR', p .. 'r:seq')
local fields = cjson.decode(ARGV[3])
redis.call('HSET', p .. 'r:unit', unit_id, seq)
redis.call('HSET', p .. 'r:' .. seq, 'seq', seq, unpack(fields))
redis.call('RPUSH', p .. 'r:all', seq)
redis.call('SADD', p .. 'r:open', seq)
redis.call('INCR', p .. 'r:open:gen')
redis.call('HINCRBY', p .. 'tot', 'accepted', 1)
redis.call('HINCRBY', p .. 'tot', 'samples', ARGV[4])
redis.call('HINCRBY', p .. 'stale', ARGV[5], 1)
if st then
  redis.call('HSET', ukey, 'status', '"done"', 'finished', ARGV[6])
  redis.call('HINCRBY', p .. 'u:count', string.sub(st, 2, -2), -1)
  redis.call('HINCRBY', p .. 'u:count', 'done', 1)
  redis.call('ZREM', p .. 'u:leased', unit_id)
  redis.call('ZREM', p .. 'u:deadline', unit_id)
  redis.call('ZREM', p .. 'u:expired', unit_id)
  redis.call('ZREM', p .. 'u:tail', unit_id)
end
if ARGV[10] == '1' then redis.call('RPUSH', p .. 'r:remote', seq) end
return seq
"""

# A unit handed back (or reported failed) to a process that does not lead: moved, if it is still out and has no
# result, as the leader's give_up moves it, and listed for the leader (u:given), which puts its shards back in line.
# ARGV: prefix, unit id, the new status, finished (JSON). 1: moved; 0: not (the leader decides).
GIVE_BACK = """
local p, unit_id, status = ARGV[1], ARGV[2], ARGV[3]
local ukey = p .. 'u:' .. unit_id
if redis.call('HGET', ukey, 'status') ~= '"leased"' or redis.call('HEXISTS', p .. 'r:unit', unit_id) == 1 then
  return 0
end
redis.call('HSET', ukey, 'status', cjson.encode(status), 'finished', ARGV[4])
redis.call('HINCRBY', p .. 'u:count', 'leased', -1)
redis.call('HINCRBY', p .. 'u:count', status, 1)
redis.call('ZREM', p .. 'u:leased', unit_id)
redis.call('ZREM', p .. 'u:deadline', unit_id)
redis.call('ZREM', p .. 'u:tail', unit_id)
redis.call('RPUSH', p .. 'u:given', unit_id)
redis.call('RPUSH', p .. 'u:given:wake', 1)
return 1
"""

TAIL_PAGE = 16   # rows tail_candidate reads at a time
LATER_BATCH = 2000   # commands put off that one script writes at most
PRESENT_TRUST_S = 1.0   # the leader's store takes a blob it saw on disk as there this long (_Seen)
VIEW_TRUST_S = 1.0   # the leader's service asks Redis for the open results this often, at most (pending_samples)

UNIT_FIELDS = ("unit_id", "worker_id", "shard_ids", "base_step", "lr", "seed", "issued", "deadline", "samples",
               "status", "finished", "wire", "twin", "replica_of")
RESULT_FIELDS = ("seq", "unit_id", "worker_id", "base_step", "staleness", "num_samples", "loss_before", "loss_after",
                 "compute_seconds", "delta_blob", "accepted", "applied_step", "dropped", "check_state",
                 "offered_step", "offer_rank")


def _in_tail(unit: dict) -> bool:
    """Whether a unit's row belongs in ``u:tail``: leased, not copied yet, not a replica."""
    return unit["status"] == "leased" and not unit["twin"] and not unit["replica_of"]


class Fenced(RuntimeError):
    """A write refused: this process no longer holds the leader lock (another process leads)."""


def prefix(job: str) -> str:
    return f"ct:{job}:"


log = logging.getLogger("crowdtrain.coordinator")


class _Client(redis.Redis):
    """The store's client: every command, and every pipeline as it is made, first has what the store put off
    written (``before``: ``RedisStore._run_later``), whichever thread asks."""
    before = None

    def execute_command(self, *args, **options):
        if self.before is not None:
            self.before()
        return super().execute_command(*args, **options)

    def pipeline(self, transaction=True, shard_hint=None):
        if self.before is not None:
            self.before()
        return super().pipeline(transaction, shard_hint)


class _Seen:
    """Blobs seen on disk within ``ttl`` seconds: a fenced store's ``Store._present`` (``blob_path`` asked the disk
    for every unit request's base, its fp16 copy and its version delta, a system call each on the leader's event
    loop). Only the leader deletes blobs (a result's delta, a version, a derived copy), and it forgets each as it
    goes (``Store._forget``); the time limit bounds what a deposed leader may still delete unseen (it stops at its
    next fenced write)."""

    LIMIT = 4096   # blobs kept at most (the expired ones go first)

    def __init__(self, ttl: float):
        self.ttl, self.at = ttl, {}

    def __contains__(self, blob_id: str) -> bool:
        t = self.at.get(blob_id)
        return t is not None and time.monotonic() - t < self.ttl

    def add(self, blob_id: str) -> None:
        now = time.monotonic()
        if len(self.at) >= self.LIMIT:
            self.at = {b: t for b, t in list(self.at.items()) if now - t < self.ttl}   # (a copy: other threads add)
        self.at[blob_id] = now

    def discard(self, blob_id: str) -> None:
        self.at.pop(blob_id, None)


@dataclasses.dataclass(frozen=True)
class _OpenView:
    """What ``RedisStore._open_view`` read: ``r:open:gen`` when it did, the open rows (oldest first; not to be
    changed), their samples (a replica's count for nothing) and their delta blobs."""
    gen: str | None
    rows: tuple[dict, ...]
    samples: int
    blobs: frozenset[str]


class RedisStore(LeasedIndex):
    """One job's rows in Redis (``url``: ``redis://HOST:PORT/DB``) and its blobs under ``blob_dir``.
    ``root``: where process-local files live (names.db). ``fence``: the leader lock whose token every
    write checks (``coordinator.leader.LeaderLock``), or None."""

    def __init__(self, url: str, job: str, blob_dir: str | Path, root: str | Path | None = None, clock=time.time,
                 fence=None):
        self.url, self.job, self.clock, self.fence = url, job, clock, fence
        self.blob_dir = Path(blob_dir)
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.root = Path(root) if root is not None else self.blob_dir.parent
        self.p = prefix(job)
        self.r = _Client.from_url(url, decode_responses=True)
        if fence is not None:
            self._present = _Seen(PRESENT_TRUST_S)
        self._exec = self.r.register_script(FENCED_EXEC)
        self._append = self.r.register_script(APPEND_RESULT)
        self._give_back = self.r.register_script(GIVE_BACK)
        # write-behind (``write_behind``): transactions put off (``_later``), written by a thread of their own
        # through a client that runs nothing first (``_plain``), or by the first other command (``_run_later``)
        self._plain = redis.Redis(connection_pool=self.r.connection_pool)
        self._exec_plain = self._plain.register_script(FENCED_EXEC)
        self._later: deque[list[list[str]]] = deque()
        self._later_lock = threading.Lock()   # held while put-off commands are written: the others wait for them
        self._writer: Writer | None = None
        self._buffer: list[list[str]] | None = None   # commands of the open transaction
        self._depth = 0
        self._rows_r: dict[int, dict] = {}   # changes of the open transaction, read back by later reads in it
        # open results' rows (``_open_view``): a row is read once, then again only after this process changed it
        # (``_set_result``); other processes only append rows. Every unit request asks for the pending samples,
        # and reading every open row each time made the leader's event loop the bottleneck under load.
        self._open_cache: dict[int, dict] = {}
        # and what is read from them, kept while no result was appended (``r:open:gen``, which every append
        # increments) and this process changed none (``_open_view``): a unit request then costs one GET
        self._view: _OpenView | None = None
        self._view_checked = 0.0   # (time.monotonic) when r:open:gen last said the view holds
        self._view_stale = False   # this process changed or added a kept row since the view was made (_kept_view)
        self._rank: int | None = None   # r:rank, kept by a fenced store (last_offer_rank)
        self._view_trust_s = 0.0   # pending_samples trusts a view checked this recently (write_behind)
        self._rows_u: dict[str, dict] = {}
        # version rows (``_versions``), kept by a fenced store: the leader is the only process that writes them,
        # and every unit request reads its base's (a round trip on the event loop each time); a row written in
        # a transaction is kept once it committed (``_versions_written``)
        self._version_rows: dict[int, list] | None = {} if fence is not None else None
        self._versions_written: dict[int, list] = {}
        self._tail_indexed = False   # u:tail checked (``_index_tail``)
        # the rows of the units this process leased are kept (``_keep_row``) once ``write_behind`` says so (the
        # leader's service), for ``unit_and_result(exact=False)``: a hand-back's unit without a round trip
        self._init_leased(keep_rows=False)
        self._closed = False
        self.syncs = 0
        self.r.ping()

    # ------------------------------------------------------------------ lifecycle and durability
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._writer is not None:
                self._writer.stop()
            try:
                self._run_later()
            except (redis.RedisError, Fenced):
                log.exception("writing what was put off failed as the store closed")
            self.r.close()

    def checkpoint(self) -> bool:
        return False

    @property
    def dirty(self) -> bool:
        return False

    def sync_now(self) -> None:
        """Writes are in Redis once their command returned (durable as its appendfsync says)."""

    async def sync(self) -> None:
        return None

    def secret(self) -> bytes:
        """The job's lease-signing key, created once for every process of the job."""
        key = self.p + "secret"
        self.r.set(key, secrets.token_hex(32), nx=True)
        return bytes.fromhex(self.r.get(key))

    # ------------------------------------------------------------------ blobs (files, as Store's)
    put_blob = Store.put_blob
    put_result_blob = Store.put_result_blob
    _write_blob = Store._write_blob
    blob_path = Store.blob_path
    get_blob = Store.get_blob
    delete_blob = Store.delete_blob
    delete_blobs = Store.delete_blobs
    unlink_blobs = Store.unlink_blobs
    _forget = Store._forget
    _present = None   # a store that does not lead: no blob is known to be on disk (__init__: the leader's)
    keeps_small_results = False   # every result's delta is a file (put_result_blob), which the other processes read

    # ------------------------------------------------------------------ writes (fenced, transactional)
    def transaction(self, later: bool = False):
        """``later``: put the transaction off (``write_behind``), unless it joins an outer one or no writer runs."""
        return _Transaction(self, later)

    def _w(self, *cmd) -> None:
        command = [str(c) for c in cmd]
        if self._buffer is not None:
            self._buffer.append(command)
            return
        try:
            self._flush([command])
        except BaseException:   # (whether it ran is unknown: what is kept of the rows is read again, as after a
            self._forget_rows()  # failed transaction, ``_end``)
            raise

    def _flush(self, commands: list[list[str]], script=None) -> None:
        if not commands:
            return
        token = self.fence.token if self.fence is not None else ""
        if self.fence is not None and not token:
            self._leased = None
            raise Fenced("this process no longer holds the leader lock")
        lock = self.fence.key if self.fence is not None else self.p + "leader"
        try:
            (script or self._exec)(keys=[lock], args=[token, json.dumps(commands)])
        except redis.ResponseError as e:
            if "FENCED" in str(e):
                self._leased = None
                raise Fenced(str(e)) from None
            raise

    def _forget_rows(self) -> None:
        """The open results' rows, their view and the last offer's rank kept are read again when next asked."""
        self._open_cache.clear()
        self._view = None
        self._rank = None

    def _begin(self) -> None:
        if self._depth == 0:
            self._buffer, self._rows_r, self._rows_u = [], {}, {}
            self._versions_written = {}
        self._depth += 1

    def _end(self, ok: bool, later: bool = False) -> None:
        self._depth -= 1
        if self._depth:
            return
        commands, self._buffer, self._rows_r, self._rows_u = self._buffer, None, {}, {}
        written, self._versions_written = self._versions_written, {}
        if ok and later and not written and commands:
            self._later.append(commands)
            self._writer.wake()
            return
        if not ok:
            self._leased = None   # what is leased is read again (the rows kept with it)
            self._forget_rows()   # they may hold the transaction's changes
            return
        try:
            self._flush(commands)
        except BaseException:
            self._leased = None
            self._forget_rows()
            if self._version_rows is not None:   # whether the script ran is unknown: read them again
                self._version_rows.clear()
            raise
        if self._version_rows is not None:
            self._version_rows.update(written)

    # ------------------------------------------------------------------ rows
    @staticmethod
    def _decode(raw: dict) -> dict:
        return {k: json.loads(v) for k, v in raw.items()}

    def _hset(self, key: str, values: dict) -> None:
        args = []
        for k, v in values.items():
            args += [k, json.dumps(v)]
        self._w("HSET", key, *args)

    @classmethod
    def _row(cls, raw: dict, fields: tuple[str, ...], changes: dict | None) -> dict | None:
        """A row from its hash as read (``raw``; every field of ``fields``, None where absent) and the open
        transaction's ``changes`` to it; None when neither has anything."""
        if not raw and changes is None:
            return None
        row = {f: None for f in fields}
        row.update(cls._decode(raw))
        row.update(changes or {})
        return row

    def _result_row(self, seq: int) -> dict | None:
        return self._row(self.r.hgetall(f"{self.p}r:{seq}"), RESULT_FIELDS, self._rows_r.get(seq))

    def result_rows(self, seqs) -> list[dict]:
        """The rows of results ``seqs`` (those that exist), in that order."""
        return self._result_rows(seqs)

    def _result_rows(self, seqs) -> list[dict]:
        """The rows of results ``seqs`` that exist, in that order. A fenced store (the leader's) takes an open row it
        keeps (``_open_cache``) as kept: only it changes a row (``_set_result``), the others only append."""
        seqs = [int(s) for s in seqs]
        kept = self._open_cache if self.fence is not None else {}
        rows = {s: kept.get(s) for s in seqs}   # (each looked up once: another thread may clear them)
        missing = [s for s, row in rows.items() if row is None]
        if missing:
            pipe = self.r.pipeline(transaction=False)
            for s in missing:
                pipe.hgetall(f"{self.p}r:{s}")
            for s, raw in zip(missing, pipe.execute()):
                rows[s] = self._row(raw, RESULT_FIELDS, self._rows_r.get(s))
        return [dict(rows[s]) for s in seqs if rows[s] is not None]

    def _set_result(self, seq: int, values: dict) -> None:
        row = self._open_cache.get(seq)
        if row is not None and self._view is not None:   # the view is made again from the rows kept (``_kept_view``)
            self._open_cache[seq] = {**row, **values}
            self._view_stale = True
        else:
            self._open_cache.pop(seq, None)
            self._view = None
        self._hset(f"{self.p}r:{seq}", values)
        if self._buffer is not None:
            self._rows_r.setdefault(seq, {}).update(values)

    def _unit_rows(self, ids) -> list[dict]:
        ids = list(ids)
        if not ids:   # (no pipeline: making one writes what was put off first)
            return []
        pipe = self.r.pipeline(transaction=False)
        for u in ids:
            pipe.hgetall(f"{self.p}u:{u}")
        rows = (self._unit_row(u, raw) for u, raw in zip(ids, pipe.execute()))
        return [row for row in rows if row is not None]

    def _unit_row(self, unit_id: str, raw: dict) -> dict | None:
        return self._row(raw, UNIT_FIELDS, self._rows_u.get(unit_id))

    def _set_unit(self, unit_id: str, values: dict) -> None:
        self._hset(f"{self.p}u:{unit_id}", values)
        if self._buffer is not None:
            self._rows_u.setdefault(unit_id, {}).update(values)

    # ------------------------------------------------------------------ meta
    def get_meta(self, key: str, default=None):
        raw = self.r.hget(self.p + "meta", key)
        return json.loads(raw) if raw is not None else default

    def set_meta(self, key: str, value, later: bool = False) -> None:
        with self.transaction(later=later):
            self._w("HSET", self.p + "meta", key, json.dumps(value))

    # ------------------------------------------------------------------ versions
    def _versions(self, steps) -> list[Version]:
        steps = [int(s) for s in steps]
        out = []
        for s, raw in zip(steps, self._version_raws(steps)):
            if raw is not None:
                blob, samples, updates, created, _ = raw
                out.append(Version(s, blob, samples, updates, created))
        return out

    def _version_raws(self, steps: list[int]) -> list[list | None]:
        """The rows of versions ``steps`` as written (None where there is none), from ``_version_rows`` where
        kept there (as committed: a transaction's own writes are not read back, as Redis would not)."""
        kept = self._version_rows
        missing = steps if kept is None else [s for s in steps if s not in kept]
        read = {}
        if missing:
            for s, raw in zip(missing, self.r.hmget(self.p + "v", missing)):
                read[s] = json.loads(raw) if raw is not None else None
                if kept is not None and raw is not None:
                    kept[s] = read[s]
        return [list(kept[s]) if kept is not None and s in kept else read[s] for s in steps]

    def _version_raw(self, step: int) -> list | None:
        return self._version_raws([step])[0]

    def _put_version(self, step: int, raw: list) -> None:
        """Write version ``step``'s row (kept in ``_version_rows`` once written)."""
        kept = self._version_rows
        if kept is not None and self._buffer is not None:
            self._versions_written[step] = list(raw)
        kept = kept if kept is not None and self._buffer is None else None
        if kept is not None:
            kept.pop(step, None)   # (if the write fails, whether it ran is unknown: read it again)
        self._w("HSET", self.p + "v", step, json.dumps(raw))
        if kept is not None:
            kept[step] = list(raw)

    def latest_version(self) -> Version | None:
        top = self.r.zrevrange(self.p + "vz", 0, 0)
        return (self._versions(top) or [None])[0]

    def latest_written_version(self) -> Version | None:
        top = self.r.zrevrange(self.p + "vkept", 0, 0)
        return (self._versions(top) or [None])[0]

    def version(self, step: int) -> Version | None:
        return (self._versions([step]) or [None])[0]

    def commit_version(self, version: Version | None, applied_seqs: list[int], strategy_state: dict | None,
                       dropped: list[tuple[int, str]] = (), offered: list[tuple[int, int, int]] = ()) -> None:
        with self.transaction():
            if version is not None:
                self._put_version(version.step, [version.blob, version.samples, version.updates, version.created, 0])
                self._w("ZADD", self.p + "vz", version.step, version.step)
                if version.blob:
                    self._w("ZADD", self.p + "vkept", version.step, version.step)
                for row in self._result_rows(applied_seqs):
                    self._decide(row, applied_step=version.step)
            self._drop(dropped)
            self.set_offered(offered)
            if strategy_state is not None:
                self.set_meta("strategy_state", strategy_state)

    def _decide(self, row: dict, applied_step: int | None = None, dropped: str | None = None) -> None:
        """One result folded into ``applied_step`` or dropped (``dropped``): its row and every counter. Its
        unit's JSON as sent (``wire``, most of a unit's row) goes: a result is checked against it, a replica and
        the coordinator's recomputation are cut from it, all before the result is decided, and Redis keeps
        every row in memory (docs/results.md "Load"). SQLite keeps it (on disk; the benches read it after a
        run)."""
        seq, w = row["seq"], row["worker_id"]
        self._set_unit(row["unit_id"], {"wire": None})
        if applied_step is not None:
            self._set_result(seq, {"applied_step": applied_step})
            self._w("HINCRBY", self.p + "tot", "applied", 1)
            if row["dropped"] is None:
                self._w("HINCRBY", self.p + "cr:units", w, 1)
                self._w("HINCRBY", self.p + "cr:samples", w, row["num_samples"])
                self._w("HSET", self.p + "cr:last", w, json.dumps(row["accepted"]))   # acceptance order: the latest
        if dropped is not None:
            if row["dropped"] is not None:
                self._w("HINCRBY", self.p + "dropc", row["dropped"], -1)
                self._w("HINCRBY", self.p + "tot", "dropped", -1)
            elif row["applied_step"] is not None:   # folded, then dropped after all: no credit
                self._w("HINCRBY", self.p + "cr:units", w, -1)
                self._w("HINCRBY", self.p + "cr:samples", w, -row["num_samples"])
            self._set_result(seq, {"dropped": dropped})
            self._w("HINCRBY", self.p + "dropc", dropped, 1)
            self._w("HINCRBY", self.p + "tot", "dropped", 1)
        self._w("SREM", self.p + "r:open", seq)

    def _drop(self, dropped) -> None:
        dropped = list(dropped)
        rows = {r["seq"]: r for r in self._result_rows([s for s, _ in dropped])}
        for seq, why in dropped:
            if seq in rows:
                self._decide(rows[seq], dropped=why)
                rows[seq] = {**rows[seq], "dropped": why}

    def set_offered(self, offered: list[tuple[int, int, int]]) -> None:
        offered = list(offered)
        if not offered:
            return
        rows = {r["seq"]: r for r in self._result_rows([s for s, _, _ in offered])}
        top = -1
        for seq, step, rank in offered:
            old = rows.get(seq, {}).get("offered_step")
            if old is not None and old != step:
                self._w("ZREM", f"{self.p}off:{old}", seq)
            self._set_result(seq, {"offered_step": step, "offer_rank": rank})
            self._w("ZADD", f"{self.p}off:{step}", rank, seq)
            top = max(top, rank)
        if top > self.last_offer_rank():
            self._w("SET", self.p + "r:rank", top)
            if self.fence is not None:   # (only the leader writes it)
                self._rank = top

    def set_version_blob(self, step: int, blob: str) -> None:
        raw = self._version_raw(step)
        if raw is None:
            return
        raw[0], raw[4] = blob, 0
        with self.transaction():   # one round trip, not two (the leader's event loop makes it for each version)
            self._put_version(step, raw)
            self._w("ZADD", self.p + "vkept", step, step)

    def offered_at(self, step: int) -> list[dict]:
        return self._result_rows(self.r.zrange(f"{self.p}off:{step}", 0, -1))

    def clear_offered(self, step: int) -> list[str]:
        rows = self.offered_at(step)
        with self.transaction():
            for row in rows:
                self._set_result(row["seq"], {"offered_step": None, "offer_rank": None})
            self._w("DEL", f"{self.p}off:{step}")
        return [row["delta_blob"] for row in rows]

    def last_offer_rank(self) -> int:
        if self._rank is not None:
            return self._rank
        raw = self.r.get(self.p + "r:rank")
        rank = int(raw) if raw is not None else -1
        if self.fence is not None:   # kept by the leader's store, which alone writes it (``set_offered``)
            self._rank = rank
        return rank

    def decided_blobs_since(self, step: int) -> list[tuple[int, str]]:
        latest = self.latest_version()
        out = []
        for s in range(step, (latest.step if latest else step) + 1):
            for row in self.offered_at(s):
                if row["applied_step"] is not None or row["dropped"] is not None:
                    out.append((s, row["delta_blob"]))
        return out

    def prunable_versions(self, below_step: int) -> list[tuple[int, str]]:
        if below_step <= 1:
            return []
        steps = self.r.zrangebyscore(self.p + "vkept", 1, f"({below_step}")
        return [(v.step, v.blob) for v in self._versions(steps) if v.blob]

    def mark_version_pruned(self, step: int) -> None:
        raw = self._version_raw(step)
        if raw is None:
            return
        raw[4] = 1
        self._put_version(step, raw)
        self._w("ZREM", self.p + "vkept", step)

    # ------------------------------------------------------------------ units and leases
    def insert_unit(self, unit_id: str, worker_id: str, shard_ids: list[str], base_step: int, lr: float,
                    seed: int, deadline: float, samples: int, issued: float | None = None,
                    wire: str | None = None, twin: str | None = None, replica_of: str | None = None,
                    queue: dict | None = None) -> None:
        issued = self.clock() if issued is None else issued
        row = {"unit_id": unit_id, "worker_id": worker_id, "shard_ids": list(shard_ids), "base_step": base_step,
               "lr": lr, "seed": seed, "issued": issued, "deadline": deadline, "samples": samples, "status": "leased",
               "finished": None, "wire": wire, "twin": twin, "replica_of": replica_of}
        with self.transaction(later=True):
            if queue is not None:
                self.set_meta("queue", queue)
            self._set_unit(unit_id, row)
            self._w("RPUSH", self.p + "u:all", unit_id)
            self._w("ZADD", self.p + "u:leased", repr(issued), unit_id)
            self._w("ZADD", self.p + "u:deadline", repr(deadline), unit_id)
            self._w("HINCRBY", self.p + "u:count", "leased", 1)
            if replica_of is not None:
                self._w("SADD", f"{self.p}replicas:{replica_of}", unit_id)
            if twin is not None:
                self._set_unit(twin, {"twin": unit_id})
                self._w("ZREM", self.p + "u:tail", twin)
            elif replica_of is None:
                self._w("ZADD", self.p + "u:tail", repr(issued), unit_id)
        if self._leased is not None:
            self._add_leased(unit_id, list(shard_ids), 0 if replica_of else samples)
            self._keep_row({**row, "lr": float(lr), "issued": float(issued), "deadline": float(deadline)})

    def _move(self, unit: dict, status: str, finished: float) -> None:
        """A unit's status changes (its indexes and counts with it), only if it still has the status read
        (``CAS``: a process that does not lead may have logged its result meanwhile)."""
        old, uid = unit["status"], unit["unit_id"]
        guard = ["CAS", f"{self.p}u:{uid}", "status", json.dumps(old), 0]
        if self._buffer is not None:
            self._buffer.append(guard)
            start = len(self._buffer)
            self._move_commands(unit, status, finished)
            guard[4] = str(len(self._buffer) - start)
        else:
            with self.transaction():
                self._buffer.append(guard)
                self._move_commands(unit, status, finished)
                guard[4] = str(len(self._buffer) - 1)

    def _move_commands(self, unit: dict, status: str, finished: float) -> None:
        old, uid = unit["status"], unit["unit_id"]
        self._set_unit(uid, {"status": status, "finished": finished})
        self._w("HINCRBY", self.p + "u:count", old, -1)
        self._w("HINCRBY", self.p + "u:count", status, 1)
        if old == "leased":
            self._w("ZREM", self.p + "u:leased", uid)
            self._w("ZREM", self.p + "u:deadline", uid)
            self._w("ZREM", self.p + "u:tail", uid)
        if old == "expired":
            self._w("ZREM", self.p + "u:expired", uid)
        if status == "leased":
            self._w("ZADD", self.p + "u:leased", repr(unit["issued"]), uid)
            self._w("ZADD", self.p + "u:deadline", repr(unit["deadline"]), uid)
            if not unit.get("twin") and not unit.get("replica_of"):
                self._w("ZADD", self.p + "u:tail", repr(unit["issued"]), uid)
        if status == "expired":
            self._w("ZADD", self.p + "u:expired", unit["base_step"], uid)
        if status == "leased":
            self._leased = None
        else:
            self._unleased(uid)

    def tail_candidate(self, worker_id: str) -> dict | None:
        """Read from ``u:tail`` a few rows at a time (the oldest are the asker's own only when it holds
        several): every unit request of a job's tail asks, so this must not read every leased row (1,000
        leased units made each request read and decode 1,000 rows: bench/load.py collapsed)."""
        if not self._tail_indexed:
            self._index_tail()
        start = 0
        while True:
            ids = self.r.zrange(self.p + "u:tail", start, start + TAIL_PAGE - 1)
            stale, found = [], None
            for row in self._unit_rows(ids):
                if not _in_tail(row):
                    stale.append(row["unit_id"])   # (a result logged while _index_tail read the rows)
                elif row["worker_id"] != worker_id:
                    found = row
                    break
            if stale:   # removed at once, or at the end of the transaction this runs in
                self._w("ZREM", self.p + "u:tail", *stale)
            if found is not None or len(ids) < TAIL_PAGE:
                return found
            start += TAIL_PAGE - (len(stale) if self._buffer is None else 0)

    def _index_tail(self) -> None:
        """``u:tail`` for a job's state from before it was kept: built once from the leased units."""
        if self.r.get(self.p + "u:tail:kept") is None:
            rows = [u for u in self._unit_rows(self.r.zrange(self.p + "u:leased", 0, -1)) if _in_tail(u)]
            with self.transaction():
                for u in rows:
                    self._w("ZADD", self.p + "u:tail", repr(u["issued"]), u["unit_id"])
                self._w("SET", self.p + "u:tail:kept", "1")
        self._tail_indexed = True

    def supersede(self, unit_id: str) -> None:
        unit = self.unit(unit_id)
        if unit is not None and unit["status"] in ("leased", "expired"):
            with self.transaction():
                self._move(unit, "superseded", self.clock())

    def twin_alive(self, unit: dict) -> bool:
        if not unit.get("twin"):
            return False
        twin = self.unit(unit["twin"])
        return twin is not None and twin["status"] in ("leased", "done")

    def unit(self, unit_id: str) -> dict | None:
        return (self._unit_rows([unit_id]) or [None])[0]

    def units(self, unit_ids, kept: bool = False) -> list[dict]:
        """The rows of units ``unit_ids`` (those that exist), in one round trip. ``kept``: a unit this process
        issued and holds out is answered from the row it keeps (as issued, its tail copy named: another process
        may have logged its result since, so its status may be out of date), the others read."""
        unit_ids = list(unit_ids)
        rows = {u: self._kept_row(u) for u in unit_ids} if kept else {}
        read = {r["unit_id"]: r for r in self._unit_rows([u for u in unit_ids if rows.get(u) is None])}
        return [r for r in (rows.get(u) or read.get(u) for u in unit_ids) if r is not None]

    def write_behind(self) -> None:
        """(``Store.write_behind``, the HTTP service's store.) From now on a unit's insert and a hand-back's move
        are put off (``_later``) and written by a thread of their own, several in one round trip; every other
        command of this store, of any thread, first has them written (``_Client.before``), so this process reads
        what it wrote. Another process may not see a unit for the moment it takes: a result it is sent for
        that unit then comes to the leader (``LocalIntake``: an unknown unit is the leader's to decide), whose
        read of it writes it first. A kill -9 may lose the last few: as ``Store.write_behind`` says. The pending
        samples each unit request asks for are taken from the view of the open results checked within
        ``VIEW_TRUST_S`` (``pending_samples``)."""
        self._view_trust_s = VIEW_TRUST_S
        self._out = {} if self._out is None else self._out
        if self._writer is None and not self._closed:
            self.r.before = self._run_later
            # (a Fenced refusal: this process no longer leads, and the lock's keeper ends it)
            self._writer = Writer("redis-writer", self._run_later, (redis.RedisError,), quiet=(Fenced,))

    def _run_later(self) -> None:
        """Write what was put off, in order, in one fenced script per batch (any thread; the others wait)."""
        if self._later or self._later_lock.locked():
            with self._later_lock:
                while self._later:
                    commands = []
                    while self._later and len(commands) < LATER_BATCH:
                        commands += self._later.popleft()
                    self._flush(commands, self._exec_plain)

    def set_unit_status(self, unit_id: str, status: str, only_if: str | None = "leased",
                        queue: dict | None = None, read: dict | None = None) -> bool:
        """(``Store.set_unit_status``.) ``read``: the row the caller read, not read again: the queue and the
        move in one round trip (put off: ``write_behind``), the move skipped if the unit changed since (another
        process logged its result), and True without looking."""
        unit = read if read is not None and only_if is None else self.unit(unit_id)
        if unit is None or (only_if is not None and unit["status"] != only_if):
            if queue is not None:
                self.set_meta("queue", queue)
            return False
        with self.transaction(later=unit is read):
            if queue is not None:
                self.set_meta("queue", queue)
            self._move(unit, status, self.clock())
        if self._depth == 0 and unit is not read:   # the move is guarded: another process may have logged first
            return (self.unit(unit_id) or {}).get("status") == status
        return True

    def expire_leases(self, now: float) -> list[dict]:
        ids = self.r.zrangebyscore(self.p + "u:deadline", "-inf", f"({now!r}")
        rows = [u for u in self._unit_rows(ids) if u["status"] == "leased" and u["deadline"] < now]
        with self.transaction():
            for u in rows:
                self._move(u, "expired", now)
        if rows and self._depth == 0:   # a result another process logged meanwhile wins: not expired
            now_in = {u["unit_id"]: u["status"] for u in self._unit_rows([u["unit_id"] for u in rows])}
            rows = [u for u in rows if now_in.get(u["unit_id"]) == "expired"]
        return [{"unit_id": u["unit_id"], "shard_ids": u["shard_ids"], "twin": u["twin"],
                 "replica_of": u["replica_of"]} for u in rows]

    def _leased_rows(self):
        for u in self._unit_rows(self.r.zrange(self.p + "u:leased", 0, -1)):
            if u["status"] == "leased":
                yield u["unit_id"], u["shard_ids"], 0 if u["replica_of"] else u["samples"]

    def needed_base_steps(self, since: int) -> set[int]:
        """(Each persist asks.) A unit out whose row this process keeps (``_out``: it issued it) is not read again:
        its base does not change, and ``u:leased`` says it is still out (with 1,000 units out, reading every row
        held the leader's event loop at each persist)."""
        leased, unread, steps = self.r.zrange(self.p + "u:leased", 0, -1), [], set()
        for unit_id in leased:
            kept = self._out.get(unit_id) if self._out is not None else None
            if kept is None:
                unread.append(unit_id)
            elif kept["base_step"] >= since:
                steps.add(kept["base_step"])
        unread += self.r.zrangebyscore(self.p + "u:expired", since, "+inf")
        steps |= {u["base_step"] for u in self._unit_rows(unread) if u["status"] in ("leased", "expired")
                  and u["base_step"] >= since}
        return steps | {r["base_step"] for r in self._open_view().rows}

    def unit_counts(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.r.hgetall(self.p + "u:count").items() if int(v)}

    # ------------------------------------------------------------------ results
    def add_result(self, unit_id: str, worker_id: str, base_step: int, staleness: int, num_samples: int,
                   loss_before: float, loss_after: float, compute_seconds: float, delta_blob: str,
                   check_state: str | None = None) -> int | None:
        """Append an accepted result and close its unit; None when ``unit_id`` was already accepted (here
        or by another process: the look and the write are one script). Applied at once, also inside a
        transaction (the writes buffered before it go first)."""
        row = self._new_row(unit_id, worker_id, base_step, staleness, num_samples, loss_before, loss_after,
                            compute_seconds, delta_blob, check_state)
        seq = self._append_script(row, leader=True)
        if seq < 0:
            return None
        self.taken({**row, "seq": seq})   # out of the units out: into the pending samples at once
        return seq

    def _new_row(self, unit_id, worker_id, base_step, staleness, num_samples, loss_before, loss_after,
                 compute_seconds, delta_blob, check_state) -> dict:
        """A result's row as ``_append_script`` writes it (its seq aside)."""
        return {"unit_id": unit_id, "worker_id": worker_id, "base_step": base_step, "staleness": staleness,
                "num_samples": num_samples, "loss_before": loss_before, "loss_after": loss_after,
                "compute_seconds": compute_seconds, "delta_blob": delta_blob, "accepted": self.clock(),
                "applied_step": None, "dropped": None, "check_state": check_state, "offered_step": None,
                "offer_rank": None}

    def _append_script(self, row: dict, leader: bool) -> int:
        unit_id, num_samples, staleness = row["unit_id"], row["num_samples"], row["staleness"]
        fields = []
        for k, v in row.items():
            fields += [k, json.dumps(v)]
        token, lock = "", self.p + "leader"
        if leader and self.fence is not None:
            token, lock = self.fence.token, self.fence.key
            if not token:
                raise Fenced("this process no longer holds the leader lock")
        if leader and self._buffer:   # what the transaction wrote so far goes first
            pending, self._buffer[:] = list(self._buffer), []
            self._flush(pending)
        try:
            return int(self._append(args=[self.p, unit_id, json.dumps(fields), int(num_samples), int(staleness),
                                          json.dumps(self.clock()), lock, token, "" if leader else "1",
                                          "" if leader else "1"]))
        except redis.ResponseError as e:
            if "FENCED" in str(e):
                raise Fenced(str(e)) from None
            raise

    def append_result(self, unit_id: str, worker_id: str, base_step: int, staleness: int, num_samples: int,
                      loss_before: float, loss_after: float, compute_seconds: float, delta_blob: str) -> int:
        """A result checked by a process that does not lead, logged in one atomic step while its unit is
        still out; the leader takes it from ``r:remote`` (``take_remote``). Returns its seq, -1 when the unit
        already has a result, -2 when the unit is no longer out (the leader decides then)."""
        return self._append_script(self._new_row(unit_id, worker_id, base_step, staleness, num_samples, loss_before,
                                                 loss_after, compute_seconds, delta_blob, None), leader=False)

    def take_remote(self, block_s: float = 0.0) -> list[int]:
        """Seqs of results other processes logged since the last call (waiting up to ``block_s`` for one, or for a
        unit another process gave back: ``given_back``)."""
        key, wake = self.p + "r:remote", self.p + "u:given:wake"
        out = []
        if block_s > 0:
            first = self.r.blpop([key, wake], timeout=block_s)
            if first is None:
                return []
            if first[0] == key:
                out.append(int(first[1]))
        more = self.r.lpop(key, 1000)
        out += [int(x) for x in more or []]
        return out   # (their units leave the units out when the job takes them: ``taken`` counts them then)

    def give_back(self, unit_id: str, status: str) -> bool:
        """(A process that does not lead.) A unit handed back or reported failed: moved to ``status`` if it is
        still out and has no result, and listed for the leader (``given_back``); False: the leader decides."""
        return bool(self._give_back(args=[self.p, unit_id, status, json.dumps(self.clock())]))

    def given_back(self) -> list[str]:
        """The units other processes gave back (``give_back``) and the leader has not yet put back in line; they
        stay listed until ``put_back`` (in the transaction that writes the shard queue)."""
        self.r.lpop(self.p + "u:given:wake", 1000)
        return self.r.lrange(self.p + "u:given", 0, 999)

    def put_back(self, unit_ids) -> None:
        """(In the transaction that writes the shard queue.) Units of ``given_back`` whose shards are back in line:
        no longer listed, no longer out."""
        for unit_id in unit_ids:
            self._w("LREM", self.p + "u:given", 1, unit_id)
            self._unleased(unit_id)

    def mark_dropped(self, dropped: list[tuple[int, str]], offered: list[tuple[int, int, int]] = ()) -> None:
        with self.transaction():
            self._drop(dropped)
            self.set_offered(offered)

    def _open_view(self) -> _OpenView:
        """The open results (``r:open``'s members, each row read from Redis once: ``_open_cache``) and what is
        read from them, built again only when a result was appended since (``r:open:gen``; the counter is read
        before the members, so an append between the two only makes the next call build it again). A row this
        process changes or appends is changed in the cache, not read again (``_kept_view``)."""
        gen_key = self.p + "r:open:gen"
        view = self._kept_view()
        if view is not None and self.r.get(gen_key) == view.gen:
            self._view_checked = time.monotonic()
            return view
        checked = time.monotonic()
        pipe = self.r.pipeline(transaction=False)
        pipe.get(gen_key)
        pipe.smembers(self.p + "r:open")
        gen, raw = pipe.execute()
        members = sorted(int(s) for s in raw)
        missing = [s for s in members if s not in self._open_cache]
        for row in self._result_rows(missing):
            self._open_cache[row["seq"]] = row
        keep = set(members)
        for seq in [s for s in self._open_cache if s not in keep]:
            del self._open_cache[seq]
        view = self._view_of(gen)
        if self._buffer is None:   # rows read inside a transaction carry its changes, which may yet fail
            self._view, self._view_checked, self._view_stale = view, checked, False
        return view

    def _view_of(self, gen: str | None) -> _OpenView:
        """The view of the rows kept (``_open_cache``) that are still open."""
        rows = tuple(r for r in (self._open_cache.get(s) for s in sorted(self._open_cache))
                     if r is not None and r["applied_step"] is None and r["dropped"] is None)
        return _OpenView(gen, rows, sum(r["num_samples"] for r in rows if r["check_state"] != "replica"),
                         frozenset(r["delta_blob"] for r in rows))

    def _kept_view(self) -> _OpenView | None:
        """The view last built, made again from the rows kept if this process changed or added one since: each
        change is made to the kept row as it is written (``_set_result``, ``taken``), so a fold or an offer
        does not have every open row read again. Its ``gen`` stays the one read, so ``_open_view`` still builds
        it again after any append (another process's, or its own)."""
        if self._view is not None and self._view_stale:
            self._view_stale = False   # (first: a change made meanwhile marks it again)
            self._view = self._view_of(self._view.gen)
        return self._view

    def taken(self, row: dict) -> None:
        """Result ``row``, which this process appended (``add_result``) or the job took from another process
        (``take_remote``): its unit is no longer out; its row is kept, and the view counts its samples at once."""
        self._unleased(row["unit_id"])
        if self._view is not None:
            self._open_cache[row["seq"]] = dict(row)
            self._view_stale = True

    def blob_pending(self, blob_id: str) -> bool:
        return blob_id in self._open_view().blobs

    def pending_blobs(self, blob_ids) -> set[str]:
        return set(blob_ids) & self._open_view().blobs

    def dropped_counts(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.r.hgetall(self.p + "dropc").items() if int(v)}

    def results(self) -> list[dict]:
        keys = ("seq", "unit_id", "worker_id", "base_step", "staleness", "num_samples", "accepted", "applied_step",
                "dropped", "check_state")
        return [{k: r[k] for k in keys} for r in self._result_rows(self.r.lrange(self.p + "r:all", 0, -1))]

    def ledger(self) -> list[dict]:
        """Every result's whole row, offers included, in acceptance order (tests, reports)."""
        return self._result_rows(self.r.lrange(self.p + "r:all", 0, -1))

    def unit_statuses(self) -> dict[str, str]:
        return {u["unit_id"]: u["status"] for u in self._unit_rows(self.r.lrange(self.p + "u:all", 0, -1))}

    def has_result(self, unit_id: str) -> bool:
        return bool(self.r.hexists(self.p + "r:unit", unit_id))

    def unit_and_result(self, unit_id: str, exact: bool = True) -> tuple[dict | None, bool]:
        """``Store.unit_and_result``: the unit's row and whether a result for it was accepted (one round trip).
        ``exact=False`` (a hand-back or a failure report, which logs no result): a unit this process issued and
        holds out is answered from memory (``_out``), although another process may have logged its result
        meanwhile (until the leader takes it, ``take_remote``); the move is then skipped (``_move``'s guard) but
        the unit's shards were put back in line: trained twice, the cost of a worker that hands back a unit
        after sending its result elsewhere."""
        out = None if exact else self._kept_row(unit_id)
        if out is not None:
            return out, False
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(f"{self.p}u:{unit_id}")
        pipe.hexists(self.p + "r:unit", unit_id)
        raw, has = pipe.execute()
        return self._unit_row(unit_id, raw), bool(has)

    def result_for_unit(self, unit_id: str) -> dict | None:
        seq = self.r.hget(self.p + "r:unit", unit_id)
        return self._result_row(int(seq)) if seq is not None else None

    def pending_results(self) -> list[dict]:
        return [dict(r) for r in self._open_view().rows if r["check_state"] not in ("held", "replica")]

    def pending_samples(self) -> int:
        """(``Store.pending_samples``.) Every unit request asks; once ``write_behind`` was called (the leader's
        service), the view checked less than ``VIEW_TRUST_S`` ago is taken without asking Redis whether another
        process appended a result since: the view holds this process's own changes and appends (``_kept_view``)
        and the results the job took from the others (``taken``); one another process logged counts as its unit's,
        out on its lease in this process's index of the units out, until the job takes it."""
        view = self._kept_view()
        if view is not None and self._view_trust_s and time.monotonic() - self._view_checked < self._view_trust_s:
            return view.samples
        return self._open_view().samples

    # ------------------------------------------------------------------ replicated checks
    def result(self, seq: int) -> dict | None:
        return self._result_row(int(seq))

    def _checks_view(self) -> _OpenView:
        """The view for the results held for a check and the replicas' results: another process appends none
        (``append_result``), and the leader changes each as it writes it, so its store takes them from the view
        it keeps (every settle asks) without asking Redis whether a result was appended since."""
        view = self._kept_view() if self.fence is not None else None
        return view if view is not None else self._open_view()

    def held_results(self) -> list[dict]:
        return [dict(r) for r in self._checks_view().rows if r["check_state"] == "held"]

    def waiting_replica_results(self) -> list[dict]:
        return [dict(r) for r in self._checks_view().rows if r["check_state"] == "replica"]

    def wanted_replicas(self) -> list[dict]:
        out = []
        for r in self.held_results():
            replicas = self._unit_rows(self.r.smembers(f"{self.p}replicas:{r['unit_id']}"))
            if any(x["status"] in ("leased", "done") for x in replicas):
                continue
            unit = self.unit(r["unit_id"])
            if unit is not None:
                out.append({**unit, "holder": r["worker_id"]})
        return out

    def replicas_of(self, unit_id: str) -> list[dict]:
        return [{"unit_id": u["unit_id"], "worker_id": u["worker_id"], "status": u["status"]}
                for u in self._unit_rows(self.r.smembers(f"{self.p}replicas:{unit_id}"))]

    def set_check(self, states: list[tuple[int, str]]) -> None:
        with self.transaction():
            for seq, state in states:
                self._set_result(seq, {"check_state": state})

    def held_by(self, worker_id: str) -> int:
        return sum(1 for r in self._checks_view().rows if r["check_state"] == "held" and r["worker_id"] == worker_id)

    def held_counts(self) -> dict[str, int]:
        return dict(Counter(r["check_state"] for r in self._checks_view().rows if r["check_state"] in ("held", "replica")))

    # ------------------------------------------------------------------ trust records
    def trust_record(self, worker_id: str) -> dict | None:
        raw = self.r.hget(self.p + "trust", worker_id)
        return json.loads(raw) if raw is not None else None

    def put_trust(self, worker_id: str, record: dict, later: bool = False) -> None:
        with self.transaction(later=later):
            self._w("HSET", self.p + "trust", worker_id, json.dumps(record))

    def trust_records(self) -> list[dict]:
        raw = self.r.hgetall(self.p + "trust")
        return [json.loads(raw[w]) for w in sorted(raw)]

    def result_totals(self) -> dict:
        t = {k: int(v) for k, v in self.r.hgetall(self.p + "tot").items()}
        return {k: t.get(k, 0) for k in ("accepted", "samples", "applied", "dropped")}

    def credit_totals(self) -> list[dict]:
        pipe = self.r.pipeline(transaction=False)
        for name in ("cr:units", "cr:samples", "cr:last"):
            pipe.hgetall(self.p + name)
        units, samples, last = pipe.execute()
        rows = [{"worker_id": w, "units": int(n), "samples": int(samples.get(w, 0)),
                 "last": json.loads(last[w]) if w in last else None} for w, n in units.items() if int(n) > 0]
        return sorted(rows, key=lambda r: (-r["samples"], r["worker_id"]))

    def staleness_counts(self) -> dict[int, int]:
        return {int(k): int(v) for k, v in self.r.hgetall(self.p + "stale").items()}

    # ------------------------------------------------------------------ evaluations and rejections
    def add_eval(self, step: int, samples: int, seconds: float, test_acc: float, test_loss: float) -> None:
        self._w("RPUSH", self.p + "evals", json.dumps({"version": step, "samples": samples, "seconds": seconds,
                                                        "test_acc": test_acc, "test_loss": test_loss,
                                                        "at": self.clock()}))

    def evals(self) -> list[dict]:
        rows = [json.loads(x) for x in self.r.lrange(self.p + "evals", 0, -1)]
        return [{k: r[k] for k in ("version", "samples", "seconds", "test_acc", "test_loss")} for r in rows]

    def best_eval_step(self) -> int | None:
        rows = self.evals()
        if not rows:
            return None
        return max(rows, key=lambda r: (r["test_acc"], r["version"]))["version"]

    def count_rejection(self, reason: str) -> None:
        with self.transaction(later=True):   # (put off: ``Store.count_rejection``)
            self._w("HINCRBY", self.p + "rej", reason, 1)

    def rejections(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.r.hgetall(self.p + "rej").items()}

    def announce(self, key: str, value: str) -> None:
        """Set ``key`` (fenced: only while this process leads), e.g. the leader's address."""
        self._w("SET", key, value)

    # ------------------------------------------------------------------ the whole job
    def wipe(self) -> int:
        """Delete every key of this job (an operator starting over; tests). Returns how many."""
        keys = list(self.r.scan_iter(match=self.p + "*", count=1000))
        if keys:
            self.r.delete(*keys)
        if self._version_rows is not None:
            self._version_rows.clear()
        return len(keys)


class _Transaction:
    """Buffers the writes of ``with store.transaction():`` and applies them at the outermost exit in
    one fenced script (nothing on error); nests by joining the outer one."""

    def __init__(self, store: RedisStore, later: bool = False):
        self.store, self.later = store, later

    def __enter__(self):
        self.later = self.later and self.store._writer is not None and self.store._depth == 0
        self.store._begin()
        return self.store

    def __exit__(self, exc_type, exc, tb):
        self.store._end(exc_type is None, self.later)
        return False
