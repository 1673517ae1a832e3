"""Durable state of a job: SQLite in WAL mode plus blob files (content-addressed but for results' deltas).

Layers (after hivemind): store -> scheduler -> aggregation -> HTTP. The store knows nothing
of models or strategies: it keeps rows and bytes.

Invariants that make ``kill -9`` safe:
- A blob file is written to a temporary name, fsynced and renamed; its name is its sha256 (a
  result's delta: a random id of the same form, ``put_result_blob``), so a half-written or
  orphaned blob is either invisible or harmless.
- An accepted result is one row in the append-only ``results`` table, written (with its delta
  blob already on disk, or, below ``SMALL_RESULT_MAX`` bytes, appended to the delta log with its
  place in ``result_deltas`` in the same commit) before the worker is answered; the fdatasync that
  makes the commit durable syncs the log's segments first. ``unit_id`` is unique, so a replayed
  submission is recognised and never applied twice.
- A new model version, the results it folds in (``applied_step``), the results the strategy
  dropped at that aggregation (``dropped``, with the reason) and the strategy's state are
  committed in one transaction: after a crash either all of it happened or none did, and
  results neither applied nor dropped are replayed into the strategy's buffer on start.
- Each result's fate is written as the aggregator states it (applied to version N, or
  dropped with a reason), never inferred from counters.
- Model versions are not all written: every fold commits its ``versions`` row (``blob`` is
  ``''`` until written), and each result offered to the strategy records the version it was
  offered at and its place in the offer order (``offered_step``, ``offer_rank``). The model
  and the strategy's state are written durably on a policy (``meta.persisted_step``); a unit's
  base is written when the unit is cut. On start, the folds after the persisted version are
  replayed from the log, offer by offer, to the same model.
- A unit's insert and a hand-back's move are not waited for (``Store.write_behind``, the HTTP service's): they
  run on a writer thread, in order, and before any other statement. A kill -9 may lose those of the last
  moments, as a power loss may lose any commit not yet synced: a unit issued then is unknown after the restart
  (its result is refused as ``unknown_unit``, its shards are issued again), a unit handed back is out until its
  lease expires. An accepted result's commit comes after every statement put off before it.
- A replicated check (``coordinator.trust``) is explicit too: ``results.check_state`` is
  ``held`` (an update waiting for its replica: neither folded nor offered to the strategy,
  so not replayed into it on start), ``replica`` (a replica's result waiting for the
  verdict), then ``valid`` or ``invalid``; ``units.replica_of`` names the unit a replica
  recomputes. A verdict (the fates, the check states and the workers' trust records) is
  one transaction.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import mmap
import os
import secrets
import sqlite3
import threading
from collections import Counter, deque
from collections.abc import Callable
import time
from dataclasses import dataclass
from pathlib import Path

from contract.units import blob_id as content_id, is_blob_id
from coordinator.threads import as_helper

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    step INTEGER PRIMARY KEY, blob TEXT NOT NULL, samples INTEGER NOT NULL,
    updates INTEGER NOT NULL, created REAL NOT NULL, pruned INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS units (
    unit_id TEXT PRIMARY KEY, worker_id TEXT NOT NULL, shard_ids TEXT NOT NULL, base_step INTEGER NOT NULL,
    lr REAL NOT NULL, seed INTEGER NOT NULL, issued REAL NOT NULL, deadline REAL NOT NULL,
    samples INTEGER NOT NULL, status TEXT NOT NULL, finished REAL, wire TEXT, twin TEXT, replica_of TEXT);
CREATE INDEX IF NOT EXISTS units_status ON units (status, deadline);
CREATE TABLE IF NOT EXISTS results (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, unit_id TEXT NOT NULL UNIQUE, worker_id TEXT NOT NULL,
    base_step INTEGER NOT NULL, staleness INTEGER NOT NULL, num_samples INTEGER NOT NULL,
    loss_before REAL, loss_after REAL, compute_seconds REAL, delta_blob TEXT NOT NULL,
    accepted REAL NOT NULL, applied_step INTEGER, dropped TEXT, check_state TEXT);
CREATE INDEX IF NOT EXISTS results_blob ON results (delta_blob);
CREATE TABLE IF NOT EXISTS trust (worker_id TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS evals (
    step INTEGER NOT NULL, samples INTEGER NOT NULL, seconds REAL NOT NULL,
    test_acc REAL NOT NULL, test_loss REAL, at REAL NOT NULL);  -- test_loss NULL: not finite (diverged)
CREATE TABLE IF NOT EXISTS rejections (reason TEXT PRIMARY KEY, count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS result_deltas (
    blob TEXT PRIMARY KEY, segment INTEGER NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS result_deltas_segment ON result_deltas (segment);
"""


# The shard queue's state (meta "queue") rides on the statement that issues a unit or ends one (``queue``): one
# statement where there were two, each a wait for the GIL on the event loop under load. The row keeps no copy.
QUEUE_TRIGGERS = """
CREATE TRIGGER IF NOT EXISTS units_queue_on_insert AFTER INSERT ON units WHEN NEW.queue IS NOT NULL BEGIN
    INSERT OR REPLACE INTO meta (key, value) VALUES ('queue', NEW.queue);
    UPDATE units SET queue = NULL WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER IF NOT EXISTS units_queue_on_update AFTER UPDATE OF queue ON units WHEN NEW.queue IS NOT NULL BEGIN
    INSERT OR REPLACE INTO meta (key, value) VALUES ('queue', NEW.queue);
    UPDATE units SET queue = NULL WHERE rowid = NEW.rowid;
END;
"""

log = logging.getLogger("crowdtrain.coordinator")

DIRECT_MIN = 1 << 20      # a blob of at least this many bytes is written with O_DIRECT (write_direct)
SMALL_RESULT_MAX = 4 << 20   # a result's delta below this many bytes goes to the delta log (put_small_result)
VERSIONS_CACHED = 4096      # versions rows kept in memory (``Store.version``), forgotten all at once beyond
SEGMENT_BYTES = 64 << 20     # a delta log segment takes appends until it holds this many bytes
DIRECT_PIECE = 8 << 20    # ... through a page-aligned buffer of this size, one per writing thread
DIRECT_ALIGN = 4096       # file offsets and lengths of the direct writes: a multiple of any logical block
_direct = {"on": hasattr(os, "O_DIRECT")}   # off for good once a filesystem refuses it (tmpfs: EINVAL)
_pieces = threading.local()


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``os.pwrite`` may write less than asked)."""
    written = 0
    while written < len(data):
        written += os.pwrite(fd, data[written:], offset + written)


def write_direct(path: Path, data: bytes | memoryview) -> bool:
    """Write ``data`` to a new file at ``path`` bypassing the page cache: its whole 4 KiB blocks with
    O_DIRECT from a reused page-aligned buffer (one copy), the tail through the page cache, then fsync
    (the blocks on the device and the file's size and extents in the journal, as for a buffered write).
    A buffered write of fresh page-cache pages cost 30-55 ms of system CPU per 20 MB on the benchmark's VM
    against 4-5 ms for this (docs/results.md, 2026-12-04 b); a result's delta is read again only to be
    replayed or checked, a model version once from the device and then from the page cache. False, with
    nothing written, when the filesystem refuses O_DIRECT (then every later call says False at once)."""
    if not _direct["on"]:
        return False
    view = memoryview(data).cast("B")
    n = len(view)
    whole = n - n % DIRECT_ALIGN
    buf = getattr(_pieces, "buf", None)
    if buf is None or len(buf) != DIRECT_PIECE:
        buf = _pieces.buf = mmap.mmap(-1, DIRECT_PIECE)   # page-aligned, kept for the thread's next blob
    piece = memoryview(buf)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        _direct["on"] = False
        log.info("the blob folder refuses O_DIRECT (%s): large blobs go through the page cache", e)
        return False
    try:
        done = 0
        while done < whole:
            m = min(DIRECT_PIECE, whole - done)
            piece[:m] = view[done:done + m]
            pwrite_all(fd, piece[:m], done)
            done += m
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        pwrite_all(fd, view[whole:], whole)
        os.fsync(fd)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        _direct["on"] = False
        log.info("the blob folder refuses O_DIRECT writes (%s): large blobs go through the page cache", e)
        return False
    os.close(fd)
    return True


CHECKPOINT_BYTES = 1 << 20   # WAL size above which ``Store.checkpoint`` copies it back


class Writer:
    """A thread of its own that runs ``drain`` (what a store put off: ``Store.write_behind``,
    ``RedisStore.write_behind``) each time it is woken, until ``stop``. An error of ``errors`` is logged and
    the thread goes on (the next statement of the service meets it too); one of ``quiet`` in a line."""

    def __init__(self, name: str, drain: Callable[[], None], errors: tuple[type[BaseException], ...],
                 quiet: tuple[type[BaseException], ...] = ()):
        self._drain, self._errors, self._quiet = drain, errors, quiet
        self._woken = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._woken.set()

    def stop(self) -> None:
        """Runs ``drain`` a last time and ends the thread."""
        self._stopped = True
        self._woken.set()
        self._thread.join()

    def _loop(self) -> None:
        as_helper()   # it wakes for every statement put off: it must not push the event loop off its core
        while True:
            self._woken.wait()
            self._woken.clear()
            try:
                self._drain()
            except self._quiet as e:
                log.warning("%s: what was put off was not written: %s", self._thread.name, e)
            except self._errors:
                log.exception("%s: writing what was put off failed", self._thread.name)
            if self._stopped:
                return


class _Connection(sqlite3.Connection):
    """The store's connection. Statements put off with ``later`` (nobody waits for their answer: a unit's
    insert, a hand-back's move) run, in order, before any other statement of any thread, or meanwhile on
    the store's writer thread (``Store.write_behind``): the event loop then gives no statement of its own
    to SQLite for a unit request or a hand-back (each a hand-off of the GIL, and SQLite's work, on the loop).
    A COMMIT or ROLLBACK (``_Transaction``) does not take them into the transaction it ends."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.later: deque[tuple[str, tuple]] = deque()
        self.later_lock = threading.Lock()   # held while put-off statements run: the others wait for them

    def execute(self, sql, parameters=()):
        if self.later or self.later_lock.locked():
            self.drain()
        return super().execute(sql, parameters)

    def executemany(self, sql, seq_of_parameters):
        if self.later or self.later_lock.locked():
            self.drain()
        return super().executemany(sql, seq_of_parameters)

    def executescript(self, sql_script):
        if self.later or self.later_lock.locked():
            self.drain()
        return super().executescript(sql_script)

    def drain(self) -> None:
        """Run the put-off statements now (each its own commit, or part of the transaction open)."""
        with self.later_lock:
            while self.later:
                super().execute(*self.later.popleft())


@dataclass(frozen=True)
class Version:
    step: int
    blob: str
    samples: int
    updates: int
    created: float


class LeasedIndex:
    """Units out on a lease, kept in memory (asked on every unit request), for a store that says how to
    read them (``_leased_rows``): unit id -> (shards, samples counted: 0 for a replica), the shards'
    counts and the samples' sum. ``self._leased = None`` makes the next read load them again.
    And, where ``_out`` is a dict, the rows of the units this process leased, as inserted (``_keep_row``),
    for as long as they are out and the index was not read again (``_kept_row``): a submission reads its
    unit without asking the store."""

    def _init_leased(self, keep_rows: bool) -> None:
        self._leased: dict[str, tuple[list[str], int]] | None = None
        self._busy: Counter[str] = Counter()
        self._leased_samples = 0
        self._out: dict[str, dict] | None = {} if keep_rows else None

    def _keep_row(self, row: dict) -> None:
        """A unit just leased, as inserted (its second copy's row names it back: ``twin``)."""
        if self._out is not None and self._leased is not None:
            self._out[row["unit_id"]] = row
            if row["twin"] in self._out:
                self._out[row["twin"]]["twin"] = row["unit_id"]

    def _kept_row(self, unit_id: str) -> dict | None:
        """A copy of the row kept for ``unit_id`` while it is out, else None."""
        out = self._out.get(unit_id) if self._out is not None else None
        if out is None or self._leased is None or unit_id not in self._leased:
            return None
        return {**out, "shard_ids": list(out["shard_ids"])}

    def _leased_rows(self):
        """(unit id, shards, samples counted) of every unit out on a lease."""
        raise NotImplementedError

    def leased_shards(self) -> list[str]:
        """The shards of the units out on a lease, each once."""
        self._leased_map()
        return list(self._busy)

    def _leased_map(self) -> dict[str, tuple[list[str], int]]:
        if self._leased is None:
            if self._out:   # (rows kept before may be out of date: read again, they are not kept)
                self._out.clear()
            self._leased, self._busy, self._leased_samples = {}, Counter(), 0
            for unit_id, shards, samples in self._leased_rows():
                self._add_leased(unit_id, shards, samples)
        return self._leased

    def _add_leased(self, unit_id: str, shards: list[str], samples: int) -> None:
        self._leased[unit_id] = (shards, samples)
        self._busy.update(shards)
        self._leased_samples += samples

    def _unleased(self, unit_id: str) -> None:
        if self._out is not None:
            self._out.pop(unit_id, None)
        entry = self._leased.pop(unit_id, None) if self._leased is not None else None
        if entry is not None:
            shards, samples = entry
            self._busy.subtract(shards)
            for s in set(shards):
                if self._busy[s] <= 0:
                    del self._busy[s]
            self._leased_samples -= samples

    def leased_samples(self) -> int:
        """Samples out on leases (a replica's are its original's, already counted)."""
        self._leased_map()
        return self._leased_samples

    def leased_count(self) -> int:
        """Units out on a lease (replicas included)."""
        return len(self._leased_map())


class Store(LeasedIndex):
    """One job's SQLite database (``state.db``) and blob folder (``blobs/``) under ``root``."""

    def __init__(self, root: str | os.PathLike, clock=time.time):
        self.root, self.clock = Path(root), clock  # clock: unix seconds (the simulator's is simulated)
        self.blob_dir = self.root / "blobs"
        # blobs known to be on disk (this process alone writes and deletes them: no stat per ``blob_path``),
        # and versions rows read or written, by step (a unit request asked for both several times)
        self._present: set[str] | None = set()
        self._versions: dict[int, Version] = {}
        self._pending: int | None = None   # ``pending_samples`` (asked by every unit request), None: read it again
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.root / "state.db", isolation_level=None, check_same_thread=False,
                                  factory=_Connection)
        self._writer: Writer | None = None   # write_behind's
        self.db.execute("PRAGMA journal_mode=WAL")
        # Commits write the WAL without an fsync; ``sync`` (one fdatasync of the WAL for every commit
        # made so far, shared by all who wait) makes them durable before an answer leaves, and
        # ``sync_now`` before a blob is deleted. A kill -9 loses nothing either way (the page cache
        # survives the process); a power loss rolls back at most commits nobody was answered on.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(units)")}
        for column in ("wire", "twin", "replica_of", "queue"):   # a state directory from before units kept these
            if column not in columns:
                self.db.execute(f"ALTER TABLE units ADD COLUMN {column} TEXT")
        self.db.executescript(QUEUE_TRIGGERS)
        if "check_state" not in {row[1] for row in self.db.execute("PRAGMA table_info(results)")}:
            self.db.execute("ALTER TABLE results ADD COLUMN check_state TEXT")
        self.db.execute("CREATE INDEX IF NOT EXISTS units_replica_of ON units (replica_of)")
        self.db.execute("CREATE INDEX IF NOT EXISTS results_check ON results (check_state)")
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(results)")}
        for column in ("offered_step", "offer_rank"):   # a state directory from before versions were written lazily
            if column not in columns:
                self.db.execute(f"ALTER TABLE results ADD COLUMN {column} INTEGER")
        # results neither folded nor dropped: a handful among all of them (settle and next_unit ask every time)
        self.db.execute("CREATE INDEX IF NOT EXISTS results_open ON results (seq) "
                        "WHERE applied_step IS NULL AND dropped IS NULL")
        self.db.execute("CREATE INDEX IF NOT EXISTS results_offered ON results (offered_step, offer_rank)")
        # the job tail's candidates (tail_candidate, asked by every unit request once the budget is committed)
        self.db.execute("CREATE INDEX IF NOT EXISTS units_tail ON units (issued) "
                        "WHERE status = 'leased' AND twin IS NULL AND replica_of IS NULL")
        self._wal_fd: int | None = None
        self._reader: sqlite3.Connection | None = None   # _small_result's
        self._reader_lock = threading.Lock()
        self.delta_dir = self.root / "deltas"    # the delta log: segments <n>.log, appended on the event loop
        self.delta_dir.mkdir(exist_ok=True)
        self._segment: tuple[int, int] | None = None   # the segment appended to: (number, fd), and its end
        self._segment_end = 0
        self._unsynced: dict[int, None] = {}  # fds of the segments appended to since the last fdatasync, in order
        self._retired: list[int] = []         # fds of earlier segments, closed once synced
        self._emptied: set[int] = set()       # segments to delete if no row names them (_drop_segment_if_unnamed)
        self._segment_lock = threading.Lock()   # the segment appended to, and the fds to sync
        self._sync_lock = threading.Lock()      # one _sync_segments at a time
        self._sweep_segments()
        self._closed = False
        self._init_leased(keep_rows=True)
        self._durable = -1               # total_changes covered by the last fdatasync of the WAL
        self._flight: asyncio.Future | None = None
        self.syncs = 0                   # fdatasyncs of the WAL (one per group of commits)
        self.sync_now()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._writer.stop()
        self.db.drain()
        self.sync_now()
        self._sync_segments()
        if self._segment is not None:
            os.close(self._segment[1])
            self._segment = None
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
        self.db.close()
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None

    # ------------------------------------------------------------------ statements put off (write-behind)
    def write_behind(self) -> None:
        """From now on a unit's insert and a hand-back's move are put off (``_Connection.later``) and run on a
        writer thread of their own (the HTTP service's stores; elsewhere they run at once). A kill -9 may
        lose the last few of them: a unit issued then is unknown after the restart (its result is refused,
        its shards, still queued in the table, are issued again) and a unit handed back is out until its
        lease expires. No accepted result is touched: its commit runs every statement put off before it."""
        if self._writer is None and not self._closed:
            self._writer = Writer("store-writer", self.db.drain, (sqlite3.Error,))

    def _execute(self, sql: str, args: tuple, later: bool) -> None:
        """Run ``sql`` now, or put it off (``_later``) when ``later`` says nobody waits for it and it can be."""
        if not (later and self._later(sql, args)):
            self.db.execute(sql, args)

    def _later(self, sql: str, args: tuple) -> bool:
        """Put ``sql`` off when a writer thread runs them and no transaction is open (one of another thread
        included: the statement joins it, as it would at once); False: not put off, run it."""
        if self._writer is None or self.db.in_transaction:
            return False
        self.db.later.append((sql, args))
        self._writer.wake()
        return True

    def checkpoint(self) -> bool:
        """Copy the WAL back into the database once it holds more than ``CHECKPOINT_BYTES`` (blocking:
        run it in a thread; its own connection, so the event loop's commits go on meanwhile and
        SQLite's own checkpoint, at 4 MiB, with its fsyncs on the committing thread, rarely comes)."""
        try:
            if os.path.getsize(self.root / "state.db-wal") < CHECKPOINT_BYTES:
                return False
        except FileNotFoundError:
            return False
        side = sqlite3.connect(self.root / "state.db", isolation_level=None)
        try:
            side.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            side.close()
        return True

    # ------------------------------------------------------------------ durability (group commit)
    def _fdatasync_wal(self) -> None:
        """fdatasync the delta log's segments appended to, then the WAL file (blocking): every commit written
        to it so far is durable, with the small deltas its rows place in the log (written before them)."""
        self._sync_segments()
        if self._wal_fd is None:
            try:
                self._wal_fd = os.open(self.root / "state.db-wal", os.O_RDONLY)
            except FileNotFoundError:   # no write since the WAL was last checkpointed away
                return
        os.fdatasync(self._wal_fd)
        self.syncs += 1

    @property
    def dirty(self) -> bool:
        """Commits made since the last fdatasync of the WAL."""
        return self.db.total_changes != self._durable

    def sync_now(self) -> None:
        """Make every commit so far durable, blocking (before deleting a blob a rolled-back commit
        would still need; on shutdown)."""
        if self.dirty or self._unsynced:
            covered = self.db.total_changes
            self._fdatasync_wal()
            self._durable = max(self._durable, covered)

    async def sync(self) -> None:
        """Wait until every commit made so far is durable. Callers that arrive while an fdatasync runs
        wait for the next one, which then covers all of their commits at once (group commit); the
        event loop is never blocked on the disk."""
        target = self.db.total_changes
        while self._durable < target:
            if self._flight is None:
                self._flight = asyncio.ensure_future(self._flush())
            await asyncio.shield(self._flight)

    async def _flush(self) -> None:
        try:
            covered = self.db.total_changes
            await asyncio.to_thread(self._fdatasync_wal)
            self._durable = max(self._durable, covered)
        finally:
            self._flight = None

    # ------------------------------------------------------------------ blobs
    def put_blob(self, data: bytes) -> str:
        """Write ``data`` under its sha256 (atomic, durable); returns the id. For what a worker downloads
        and checks against its id: model versions, version deltas, data shards, step graphs. From
        ``DIRECT_MIN`` bytes with O_DIRECT, as a result's delta: a model version is written on the way to
        answering the worker whose result it holds, and through the page cache its write took 7x as long
        (resnet_fast's 2.6 MB: 27 against 3.7 ms, docs/results.md); a first download then reads it from
        the device (in a thread, about 4 ms), later ones from the page cache."""
        blob_id = content_id(data)
        if self.blob_path(blob_id) is None:
            self._write_blob(blob_id, data)
        return blob_id

    def put_result_blob(self, data: bytes | memoryview) -> str:
        """Write a result's delta under a fresh random id of the same form (64 hex digits; atomic,
        durable); returns the id. Nothing downloads a result's delta or looks it up by its content, and
        hashing it cost more than any other step of taking a large result (14 ms for a 10M-parameter
        fp16 delta, docs/results.md). Its own id also means that no other row (another result with the
        same bytes, or a model version whose bytes a worker sent back as its delta) shares its file, so
        deleting it once its result is decided deletes nothing else."""
        blob_id = secrets.token_hex(32)
        self._write_blob(blob_id, data)
        return blob_id

    def _write_blob(self, blob_id: str, data: bytes | memoryview) -> None:
        """``data`` as file ``blob_id``, atomic and durable: from ``DIRECT_MIN`` bytes with O_DIRECT."""
        path = self.blob_dir / blob_id
        # a name of its own per writer: two threads may store the same bytes at once
        tmp = path.with_name(f".{blob_id}.{os.getpid()}.{threading.get_ident()}.tmp")
        if len(data) >= DIRECT_MIN and write_direct(tmp, data):   # durable (fsynced) under its temporary name
            os.replace(tmp, path)
        else:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        if self._present is not None:
            self._present.add(blob_id)

    # ------------------------------------------------------------------ the delta log (small results' deltas)
    # A small result's delta (below SMALL_RESULT_MAX bytes: an fp16 delta of up to about 2M parameters, resnet_fast's
    # among them, and top-k deltas) is appended to a segment file of the delta log on the event loop, and its
    # place is a row of ``result_deltas`` in its result's commit; the group fdatasync that makes the commit
    # durable syncs the segment first. No file to create, fsync, rename and later unlink per result (those
    # cost more than the rest of taking such a result: docs/results.md, "Coordinator capacity"). A segment
    # goes once no row places a delta in it and another one is appended to.
    keeps_small_results = True   # RedisStore: False (its results' deltas are files in the shared blob folder)

    def put_small_result(self, data: bytes | memoryview) -> str:
        """Append a result's delta of fewer than ``SMALL_RESULT_MAX`` bytes to the delta log under a fresh random
        id of the blob-id form (as ``put_result_blob``'s); returns the id. Call it on the event loop, in the
        transaction that adds its result's row (a rolled-back one leaves unnamed bytes in the log, harmless)."""
        last = None
        with self._segment_lock:
            if self._segment is None or self._segment_end >= SEGMENT_BYTES:
                last = self._next_segment()
            number, fd = self._segment
            offset, view = self._segment_end, memoryview(data).cast("B")
            pwrite_all(fd, view, offset)
            self._segment_end += len(view)
            self._unsynced[fd] = None
        blob_id = secrets.token_hex(32)
        self.db.execute("INSERT INTO result_deltas (blob, segment, offset, length) VALUES (?, ?, ?, ?)",
                        (blob_id, number, offset, len(view)))
        if last is not None:
            self.unlink_blobs(self._drop_segment_if_unnamed(last))
        return blob_id

    def _next_segment(self) -> int | None:
        """Start a new segment (under ``_segment_lock``); returns the last one's number (its file is closed
        once synced), or None."""
        numbers = [int(p.stem) for p in self.delta_dir.glob("*.log") if p.stem.isdigit()]
        number = max(numbers + [self._segment[0] if self._segment else 0]) + 1
        fd = os.open(self.delta_dir / f"{number}.log", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        last = None
        if self._segment is not None:
            last, last_fd = self._segment
            self._retired.append(last_fd)
        self._segment, self._segment_end = (number, fd), 0
        return last

    def _drop_segment_if_unnamed(self, number: int) -> list[Path]:
        """The segments no longer appended to that no row places a delta in any more, to delete once the commits
        that made their deltas unnecessary are durable (``unlink_blobs``, in a thread where it can: an fdatasync
        and the unlink of a file of up to ``SEGMENT_BYTES`` held the event loop in a persist). In a transaction
        the check waits for the next deletion outside one (``sync_now`` there would count the open
        transaction's changes as durable); a segment still left goes on the next open."""
        self._emptied.add(number)
        if self.db.in_transaction:
            return []
        current = self._segment[0] if self._segment is not None else None
        gone = []
        for n in sorted(self._emptied - {current}):
            self._emptied.discard(n)
            if self.db.execute("SELECT 1 FROM result_deltas WHERE segment = ? LIMIT 1", (n,)).fetchone() is None:
                gone.append(self.delta_dir / f"{n}.log")
        return gone

    def _sync_segments(self) -> None:
        """fdatasync the segments appended to since the last call, and close the retired ones (any thread;
        one call at a time, so no file is closed under another call's fdatasync)."""
        with self._sync_lock:
            with self._segment_lock:
                fds, retired = self._unsynced, self._retired
                self._unsynced, self._retired = {}, []
            for fd in fds:
                os.fdatasync(fd)
            for fd in retired:
                os.close(fd)

    def _sweep_segments(self) -> None:
        """On open: delete the segments no row places a delta in (their results decided, or a commit that
        never came)."""
        named = {n for (n,) in self.db.execute("SELECT DISTINCT segment FROM result_deltas")}
        for path in self.delta_dir.glob("*.log"):
            if not path.stem.isdigit() or int(path.stem) not in named:
                path.unlink(missing_ok=True)

    def _small_result(self, blob_id: str) -> bytes | None:
        """A delta ``put_small_result`` appended, or None. Its place is read through a connection of its own
        (threads decode deltas): a committed row, which every delta whose id a caller holds is."""
        with self._reader_lock:
            if self._reader is None:
                self._reader = sqlite3.connect(self.root / "state.db", isolation_level=None, check_same_thread=False)
            row = self._reader.execute("SELECT segment, offset, length FROM result_deltas WHERE blob = ?",
                                       (blob_id,)).fetchone()
        if row is None:
            return None
        number, offset, length = row
        fd = os.open(self.delta_dir / f"{number}.log", os.O_RDONLY)
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        if len(data) != length:
            raise OSError(f"delta log segment {number}: {len(data)} of {length} bytes at {offset}")
        return data

    def blob_path(self, blob_id: str) -> Path | None:
        if not is_blob_id(blob_id):
            return None
        path = self.blob_dir / blob_id
        if self._present is not None and blob_id in self._present:
            return path
        if not path.is_file():
            return None
        if self._present is not None:
            self._present.add(blob_id)
        return path

    def get_blob(self, blob_id: str) -> bytes:
        path = self.blob_path(blob_id)
        if path is None:
            data = self._small_result(blob_id) if self.keeps_small_results and is_blob_id(blob_id) else None
            if data is None:
                raise KeyError(blob_id)
            return data
        try:
            return path.read_bytes()
        except FileNotFoundError:   # deleted meanwhile
            self._forget(blob_id)
            raise KeyError(blob_id) from None

    def _forget(self, blob_id: str) -> None:
        if self._present is not None:
            self._present.discard(blob_id)

    def delete_blobs(self, blob_ids) -> list[Path]:
        """``delete_blob`` for many at once, in a fixed number of statements: small results' deltas leave the
        delta log in one commit (deleting a few hundred one by one, each statement a wait for the GIL when
        threads are busy, held the event loop 150-340 ms at each persist under load: docs/results.md). The
        files (blobs, and the delta log's segments no row names any more) are returned, to ``unlink_blobs`` (in a
        thread where it can), which makes every commit so far durable before they go."""
        ids = [b for b in dict.fromkeys(blob_ids) if is_blob_id(b)]
        small, segments = set(), set()
        if self.keeps_small_results and ids:
            with self.transaction():
                for i in range(0, len(ids), 500):   # SQLite's bound on a statement's parameters
                    chunk, marks = ids[i:i + 500], ",".join("?" * len(ids[i:i + 500]))
                    for blob, segment in self.db.execute(
                            f"SELECT blob, segment FROM result_deltas WHERE blob IN ({marks})", chunk):
                        small.add(blob)
                        segments.add(segment)
                    self.db.execute(f"DELETE FROM result_deltas WHERE blob IN ({marks})", chunk)
        files = [path for path in (self.blob_path(b) for b in ids if b not in small) if path is not None]
        for path in files:
            self._forget(path.name)
        for segment in segments:
            files += self._drop_segment_if_unnamed(segment)
        return files

    def unlink_blobs(self, paths: list[Path]) -> None:
        """The files ``delete_blobs`` returned (any thread), every commit so far durable first (the
        commits that made them unnecessary: an fdatasync, 1-100 ms here, so off the event loop where it can)."""
        if paths:
            self.sync_now()
        for path in paths:
            path.unlink(missing_ok=True)
            self._forget(path.name)

    def delete_blob(self, blob_id: str, durable_first: bool = True) -> None:
        """Delete one blob. ``durable_first``: every commit so far is made durable before a file goes (the
        commit that made it unnecessary); False for a copy derived from a kept blob (a version's fp16 copy, a
        version delta), which nothing durable needs and whose absence its users check (``blob_path``)."""
        path = self.blob_path(blob_id)
        if path is not None:
            if durable_first:
                self.sync_now()
            self._forget(blob_id)
            path.unlink(missing_ok=True)
        elif self.keeps_small_results and is_blob_id(blob_id):
            row = self.db.execute("SELECT segment FROM result_deltas WHERE blob = ?", (blob_id,)).fetchone()
            if row is None:
                return
            self.db.execute("DELETE FROM result_deltas WHERE blob = ?", (blob_id,))
            self.unlink_blobs(self._drop_segment_if_unnamed(row[0]))

    # ------------------------------------------------------------------ meta
    def get_meta(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_meta(self, key: str, value, later: bool = False) -> None:
        """``later``: put off with ``write_behind`` (what a kill -9 may lose anyway; nobody waits for it)."""
        self._execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)), later)

    # ------------------------------------------------------------------ versions
    def latest_version(self) -> Version | None:
        row = self.db.execute("SELECT step, blob, samples, updates, created FROM versions "
                              "ORDER BY step DESC LIMIT 1").fetchone()
        return Version(*row) if row else None

    def latest_written_version(self) -> Version | None:
        """The newest version whose model is written (versions are persisted on a policy, not each one)."""
        row = self.db.execute("SELECT step, blob, samples, updates, created FROM versions WHERE blob != '' "
                              "AND pruned = 0 ORDER BY step DESC LIMIT 1").fetchone()
        return Version(*row) if row else None

    def version(self, step: int) -> Version | None:
        version = self._versions.get(step)
        if version is None:
            row = self.db.execute("SELECT step, blob, samples, updates, created FROM versions WHERE step = ?",
                                  (step,)).fetchone()
            if row is None:
                return None
            version = Version(*row)
            if version.blob:   # written: the row no longer changes (one not yet written is cached by its commit
                self._cache_version(version)   # alone, on the event loop, not by a thread that reads it meanwhile)
        return version

    def _cache_version(self, version: Version) -> None:
        if len(self._versions) >= VERSIONS_CACHED:
            self._versions.clear()
        self._versions[version.step] = version

    def commit_version(self, version: Version | None, applied_seqs: list[int], strategy_state: dict | None,
                       dropped: list[tuple[int, str]] = (), offered: list[tuple[int, int, int]] = ()) -> None:
        """Record at once a new model version (None: no new version; ``blob`` ``''``: not written yet),
        the results folded into it, the results dropped (``(seq, reason)``), where each was offered
        (``(seq, step, rank)``) and the strategy's state."""
        with self.transaction():
            if version is not None:
                self.db.execute("INSERT INTO versions (step, blob, samples, updates, created) VALUES (?, ?, ?, ?, ?)",
                                (version.step, version.blob, version.samples, version.updates, version.created))
                self._cache_version(version)   # forgotten if the commit rolls back (``_rolled_back``)
                self.db.executemany("UPDATE results SET applied_step = ? WHERE seq = ?",
                                    [(version.step, s) for s in applied_seqs])
                if applied_seqs:
                    self._pending = None
            if dropped:
                self._pending = None
            self.db.executemany("UPDATE results SET dropped = ? WHERE seq = ?", [(why, s) for s, why in dropped])
            self.set_offered(offered)
            if strategy_state is not None:
                self.set_meta("strategy_state", strategy_state)

    def set_offered(self, offered: list[tuple[int, int, int]]) -> None:
        """``(seq, step, rank)``: the version each result was offered to the strategy at, and the order."""
        self.db.executemany("UPDATE results SET offered_step = ?, offer_rank = ? WHERE seq = ?",
                            [(step, rank, seq) for seq, step, rank in offered])

    def set_version_blob(self, step: int, blob: str) -> None:
        """The model of version ``step`` is now written under ``blob``."""
        self.db.execute("UPDATE versions SET blob = ?, pruned = 0 WHERE step = ?", (blob, step))
        self._versions.pop(step, None)

    def offered_at(self, step: int) -> list[dict]:
        """Results offered to the strategy at version ``step``, in offer order (a fold's replay)."""
        return self._rows("SELECT * FROM results WHERE offered_step = ? ORDER BY offer_rank", (step,))

    def clear_offered(self, step: int) -> list[str]:
        """Forget where the decided results offered at ``step`` were offered; returns their delta blobs."""
        with self.transaction():
            blobs = [b for (b,) in self.db.execute("SELECT delta_blob FROM results WHERE offered_step = ?", (step,))]
            self.db.execute("UPDATE results SET offered_step = NULL, offer_rank = NULL WHERE offered_step = ?", (step,))
        return blobs

    def last_offer_rank(self) -> int:
        return self.db.execute("SELECT COALESCE(MAX(offer_rank), -1) FROM results").fetchone()[0]

    def decided_blobs_since(self, step: int) -> list[tuple[int, str]]:
        """(offered_step, delta blob) of results offered at ``step`` or later and decided (kept for a replay)."""
        return self.db.execute("SELECT offered_step, delta_blob FROM results WHERE offered_step >= ? AND "
                               "(applied_step IS NOT NULL OR dropped IS NOT NULL)", (step,)).fetchall()

    def prunable_versions(self, below_step: int) -> list[tuple[int, str]]:
        """(step, blob) of versions older than ``below_step`` whose blob is still on disk."""
        return self.db.execute("SELECT step, blob FROM versions WHERE step < ? AND pruned = 0 AND step > 0 "
                               "AND blob != ''", (below_step,)).fetchall()

    def mark_version_pruned(self, step: int) -> None:
        self.db.execute("UPDATE versions SET pruned = 1 WHERE step = ?", (step,))

    # ------------------------------------------------------------------ units and leases
    def insert_unit(self, unit_id: str, worker_id: str, shard_ids: list[str], base_step: int, lr: float,
                    seed: int, deadline: float, samples: int, issued: float | None = None,
                    wire: str | None = None, twin: str | None = None, replica_of: str | None = None,
                    queue: dict | None = None) -> None:
        """A leased unit; ``wire`` is its JSON as sent, so a result can be checked against it;
        ``twin``: the leased unit this one is a second copy of (both rows name each other);
        ``replica_of``: the unit whose held result this one recomputes (a replicated check);
        ``queue``: the shard queue's state after the unit's shards were taken (meta ``queue``, written with it).
        One statement (its own commit, put off with ``write_behind``) unless ``twin``: every unit request runs it.
        """
        issued = self.clock() if issued is None else issued
        with self.transaction() if twin is not None else contextlib.nullcontext():
            sql = ("INSERT INTO units (unit_id, worker_id, shard_ids, base_step, lr, seed, issued, deadline, "
                   "samples, status, wire, twin, replica_of, queue) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'leased', ?, ?, ?, ?)")
            args = (unit_id, worker_id, json.dumps(shard_ids), base_step, lr, seed, issued, deadline, samples,
                    wire, twin, replica_of, None if queue is None else json.dumps(queue))
            self._execute(sql, args, later=True)
            if self._leased is not None:
                self._add_leased(unit_id, list(shard_ids), 0 if replica_of else samples)
                self._keep_row({"unit_id": unit_id, "worker_id": worker_id, "shard_ids": list(shard_ids),
                                "base_step": base_step, "lr": float(lr), "seed": seed, "issued": float(issued),
                                "deadline": float(deadline), "samples": samples, "status": "leased",
                                "finished": None, "wire": wire, "twin": twin, "replica_of": replica_of})
            if twin is not None:
                self.db.execute("UPDATE units SET twin = ? WHERE unit_id = ?", (unit_id, twin))

    def tail_candidate(self, worker_id: str) -> dict | None:
        """The oldest unit leased to another worker and not copied yet (the job's tail)."""
        row = self.db.execute("SELECT unit_id FROM units INDEXED BY units_tail "
                              "WHERE status = 'leased' AND twin IS NULL AND replica_of IS NULL "
                              "AND worker_id != ? ORDER BY issued LIMIT 1", (worker_id,)).fetchone()
        return self.unit(row[0]) if row else None

    def supersede(self, unit_id: str) -> None:
        """The unit's other copy delivered: a result for this one will be dropped."""
        self.db.execute("UPDATE units SET status = 'superseded', finished = ? WHERE unit_id = ? "
                        "AND status IN ('leased', 'expired')", (self.clock(), unit_id))
        self._unleased(unit_id)

    def twin_alive(self, unit: dict) -> bool:
        """Whether the unit's second copy is still out or already delivered (its shards are covered)."""
        if not unit.get("twin"):
            return False
        twin = self.unit(unit["twin"])
        return twin is not None and twin["status"] in ("leased", "done")

    def unit(self, unit_id: str) -> dict | None:
        """The unit's row (``shard_ids`` as a list, ``wire`` as sent or None)."""
        return self.unit_and_result(unit_id)[0]

    def unit_and_result(self, unit_id: str, exact: bool = True) -> tuple[dict | None, bool]:
        """The unit's row (``unit``) and whether a result for it was accepted (``has_result``): for a unit this
        process leased and that is still out, as inserted (no result then: a result ends the lease); else in
        one statement. Every submission asks on the event loop, where each statement gives the GIL away.
        (``exact``: RedisStore's; this process alone writes here, so the answer is exact either way.)"""
        out = self._kept_row(unit_id)
        if out is not None:
            return out, False
        cur = self.db.execute("SELECT *, EXISTS (SELECT 1 FROM results r WHERE r.unit_id = u.unit_id) "
                              "FROM units u WHERE u.unit_id = ?", (unit_id,))
        row = cur.fetchone()
        if row is None:
            return None, False   # (a result is accepted only for a unit issued here)
        unit = dict(zip([c[0] for c in cur.description[:-1]], row[:-1]))
        unit["shard_ids"] = json.loads(unit["shard_ids"])
        unit.pop("queue", None)   # (QUEUE_TRIGGERS: always NULL in the table)
        return unit, bool(row[-1])

    def set_unit_status(self, unit_id: str, status: str, only_if: str | None = "leased",
                        queue: dict | None = None, read: dict | None = None) -> bool:
        """Move a unit to ``status`` (from ``only_if`` when given); True when a row changed. ``queue``: the shard
        queue's state (meta ``queue``), written with the move (or alone when no row changed). ``read``: the
        unit's row as the caller read it, which moves it whatever its status (``only_if`` None): the statement
        may be put off (``write_behind``), and True says so (RedisStore: the row is not read again)."""
        sql = "UPDATE units SET status = ?, finished = ?, queue = ? WHERE unit_id = ?"
        args = [status, self.clock(), None if queue is None else json.dumps(queue), unit_id]
        if only_if is not None:
            sql, args = sql + " AND status = ?", args + [only_if]
        changed = (read is not None and only_if is None and self._later(sql, tuple(args))) or \
            self.db.execute(sql, args).rowcount == 1
        if queue is not None and not changed:
            self.set_meta("queue", queue)
        if changed and status == "leased":
            self._leased = None
        elif changed:
            self._unleased(unit_id)
        return changed

    def expire_leases(self, now: float) -> list[dict]:
        """Mark leases past their deadline expired; returns them (their shards go back in the queue)."""
        cur = self.db.execute("SELECT unit_id, shard_ids, twin, replica_of FROM units WHERE status = 'leased' "
                              "AND deadline < ?", (now,))
        rows = [{"unit_id": u, "shard_ids": json.loads(s), "twin": t, "replica_of": r} for u, s, t, r in cur.fetchall()]
        with self.transaction():
            self.db.executemany("UPDATE units SET status = 'expired', finished = ? WHERE unit_id = ? "
                                "AND status = 'leased'", [(now, r["unit_id"]) for r in rows])
        for r in rows:
            self._unleased(r["unit_id"])
        return rows

    def _leased_rows(self):
        for u, s, n, r in self.db.execute("SELECT unit_id, shard_ids, samples, replica_of FROM units "
                                          "WHERE status = 'leased'"):
            yield u, json.loads(s), 0 if r else n

    def needed_base_steps(self, since: int) -> set[int]:
        """Base versions (>= ``since``) that a unit may still come back with, or a buffered result needs."""
        rows = self.db.execute(
            "SELECT base_step FROM units WHERE status IN ('leased', 'expired') AND base_step >= ? UNION "
            "SELECT base_step FROM results WHERE applied_step IS NULL AND dropped IS NULL", (since,))
        return {s for (s,) in rows}

    def unit_counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT status, COUNT(*) FROM units GROUP BY status").fetchall())

    # ------------------------------------------------------------------ results
    def add_result(self, unit_id: str, worker_id: str, base_step: int, staleness: int, num_samples: int,
                   loss_before: float, loss_after: float, compute_seconds: float, delta_blob: str,
                   check_state: str | None = None) -> int | None:
        """Append an accepted result and close its unit; None when ``unit_id`` was already accepted.
        ``check_state``: ``held`` or ``replica`` for a result of a replicated check."""
        with self.transaction():
            try:
                cur = self.db.execute(
                    "INSERT INTO results (unit_id, worker_id, base_step, staleness, num_samples, loss_before, "
                    "loss_after, compute_seconds, delta_blob, accepted, check_state) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (unit_id, worker_id, base_step, staleness, num_samples, loss_before, loss_after,
                     compute_seconds, delta_blob, self.clock(), check_state))
            except sqlite3.IntegrityError:
                return None
            if self._pending is not None and check_state != "replica":   # forgotten if the commit rolls back
                self._pending += num_samples
            self.db.execute("UPDATE units SET status = 'done', finished = ? WHERE unit_id = ?", (self.clock(), unit_id))
            self._unleased(unit_id)
            return int(cur.lastrowid)

    def mark_dropped(self, dropped: list[tuple[int, str]], offered: list[tuple[int, int, int]] = ()) -> None:
        """Results dropped (by the strategy on arrival, or a check): ``(seq, reason)``; ``offered``:
        where those the strategy saw were offered (``(seq, step, rank)``)."""
        with self.transaction():
            self.db.executemany("UPDATE results SET dropped = ? WHERE seq = ?", [(why, s) for s, why in dropped])
            self.set_offered(offered)
            self._pending = None

    def blob_pending(self, blob_id: str) -> bool:
        """Whether a result neither applied nor dropped still needs this delta blob (replay)."""
        return blob_id in self.pending_blobs([blob_id])

    def pending_blobs(self, blob_ids) -> set[str]:
        """Those of ``blob_ids`` that a result neither applied nor dropped still needs (``blob_pending``)."""
        ids, out = list(dict.fromkeys(blob_ids)), set()
        for i in range(0, len(ids), 500):   # SQLite's bound on a statement's parameters
            chunk = ids[i:i + 500]
            out.update(b for (b,) in self.db.execute(
                f"SELECT DISTINCT delta_blob FROM results WHERE delta_blob IN ({','.join('?' * len(chunk))}) "
                "AND applied_step IS NULL AND dropped IS NULL", chunk))
        return out

    def dropped_counts(self) -> dict[str, int]:
        """Dropped results by reason."""
        return dict(self.db.execute("SELECT dropped, COUNT(*) FROM results WHERE dropped IS NOT NULL "
                                    "GROUP BY dropped").fetchall())

    def results(self) -> list[dict]:
        """Every accepted result's record and fate, in acceptance order (reports, the simulator)."""
        cur = self.db.execute("SELECT seq, unit_id, worker_id, base_step, staleness, num_samples, accepted, "
                              "applied_step, dropped, check_state FROM results ORDER BY seq")
        names = [c[0] for c in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    def unit_statuses(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT unit_id, status FROM units").fetchall())

    def has_result(self, unit_id: str) -> bool:
        """Whether a result for ``unit_id`` was accepted."""
        return self.db.execute("SELECT 1 FROM results WHERE unit_id = ? LIMIT 1", (unit_id,)).fetchone() is not None

    def result_for_unit(self, unit_id: str) -> dict | None:
        cur = self.db.execute("SELECT * FROM results WHERE unit_id = ?", (unit_id,))
        row = cur.fetchone()
        return dict(zip([c[0] for c in cur.description], row)) if row else None

    def pending_results(self) -> list[dict]:
        """Accepted results not yet folded into a version nor dropped, in acceptance order: what the
        strategy holds or will be offered (not those held for a check, nor replicas' results)."""
        return self._rows("SELECT * FROM results WHERE applied_step IS NULL AND dropped IS NULL "
                          "AND (check_state IS NULL OR check_state NOT IN ('held', 'replica')) ORDER BY seq")

    def pending_samples(self) -> int:
        """Samples of the accepted results not yet folded in nor dropped (a replica's result counts
        for nothing: its samples are those of the held result it checks). Kept in memory between the
        writes that change it (every unit request asks)."""
        if self._pending is None:
            self._pending = self.db.execute(
                "SELECT COALESCE(SUM(num_samples), 0) FROM results WHERE applied_step IS NULL AND dropped IS NULL "
                "AND (check_state IS NULL OR check_state != 'replica')").fetchone()[0]
        return self._pending

    # ------------------------------------------------------------------ replicated checks
    def result(self, seq: int) -> dict | None:
        rows = self._rows("SELECT * FROM results WHERE seq = ?", (seq,))
        return rows[0] if rows else None

    def held_results(self) -> list[dict]:
        """Results held for a check (not folded, not dropped), oldest first."""
        return self._rows("SELECT * FROM results WHERE check_state = 'held' AND applied_step IS NULL "
                          "AND dropped IS NULL ORDER BY seq")

    def waiting_replica_results(self) -> list[dict]:
        """Replicas' results accepted and not judged yet (e.g. when the coordinator stopped), oldest first."""
        return self._rows("SELECT * FROM results WHERE check_state = 'replica' AND dropped IS NULL ORDER BY seq")

    def wanted_replicas(self) -> list[dict]:
        """Units whose held result waits for a replica that is not out: none was issued yet, or the
        last one expired, failed or was handed back. Oldest first; ``holder``: the original's worker."""
        return self._rows(
            "SELECT u.*, r.worker_id AS holder FROM results r JOIN units u ON u.unit_id = r.unit_id "
            "WHERE r.check_state = 'held' AND r.applied_step IS NULL AND r.dropped IS NULL AND NOT EXISTS "
            "(SELECT 1 FROM units x WHERE x.replica_of = r.unit_id AND x.status IN ('leased', 'done')) ORDER BY r.seq")

    def replicas_of(self, unit_id: str) -> list[dict]:
        """The replica units issued for ``unit_id`` (any status)."""
        return self._rows("SELECT unit_id, worker_id, status FROM units WHERE replica_of = ?", (unit_id,))

    def set_check(self, states: list[tuple[int, str]]) -> None:
        """``(seq, check_state)`` for results whose check was decided."""
        self.db.executemany("UPDATE results SET check_state = ? WHERE seq = ?", [(c, s) for s, c in states])
        self._pending = None

    def held_by(self, worker_id: str) -> int:
        """How many of ``worker_id``'s results are held for a check (not folded, not dropped)."""
        return self.db.execute("SELECT COUNT(*) FROM results WHERE check_state = 'held' AND worker_id = ? "
                               "AND applied_step IS NULL AND dropped IS NULL", (worker_id,)).fetchone()[0]

    def held_counts(self) -> dict[str, int]:
        """Results waiting on a check: ``held`` (originals) and ``replica`` (replicas' results not judged)."""
        return dict(self.db.execute("SELECT check_state, COUNT(*) FROM results WHERE check_state IN ('held', 'replica') "
                                    "AND applied_step IS NULL AND dropped IS NULL GROUP BY check_state").fetchall())

    # ------------------------------------------------------------------ trust records (coordinator.trust)
    def trust_record(self, worker_id: str) -> dict | None:
        row = self.db.execute("SELECT record FROM trust WHERE worker_id = ?", (worker_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def put_trust(self, worker_id: str, record: dict, later: bool = False) -> None:
        """``later``: put off with ``write_behind`` (a unit request's record of what the worker runs: nobody waits
        for it, and a kill -9 may lose it)."""
        self._execute("INSERT OR REPLACE INTO trust (worker_id, record) VALUES (?, ?)",
                      (worker_id, json.dumps(record)), later)

    def trust_records(self) -> list[dict]:
        return [json.loads(r) for (r,) in self.db.execute("SELECT record FROM trust ORDER BY worker_id")]

    def result_totals(self) -> dict:
        row = self.db.execute("SELECT COUNT(*), COALESCE(SUM(num_samples), 0), COALESCE(SUM(applied_step IS NOT NULL),"
                              " 0), COALESCE(SUM(dropped IS NOT NULL), 0) FROM results").fetchone()
        return {"accepted": row[0], "samples": row[1], "applied": row[2], "dropped": row[3]}

    def credit_totals(self) -> list[dict]:
        """Per worker id, what counts as credit: results folded into a version and never dropped
        (a held result counts once its check passed and it is folded), with their samples and the
        time of the latest; highest samples first."""
        return self._rows("SELECT worker_id, COUNT(*) AS units, SUM(num_samples) AS samples, MAX(accepted) AS last "
                          "FROM results WHERE applied_step IS NOT NULL AND dropped IS NULL "
                          "GROUP BY worker_id ORDER BY samples DESC, worker_id")

    def staleness_counts(self) -> dict[int, int]:
        return dict(self.db.execute("SELECT staleness, COUNT(*) FROM results GROUP BY staleness").fetchall())

    # ------------------------------------------------------------------ evaluations and rejections
    def add_eval(self, step: int, samples: int, seconds: float, test_acc: float, test_loss: float) -> None:
        self.db.execute("INSERT INTO evals (step, samples, seconds, test_acc, test_loss, at) VALUES (?, ?, ?, ?, ?, ?)",
                        (step, samples, seconds, test_acc, test_loss, self.clock()))

    def best_eval_step(self) -> int | None:
        """The evaluated version with the highest test accuracy (the latest of ties)."""
        row = self.db.execute("SELECT step FROM evals ORDER BY test_acc DESC, step DESC LIMIT 1").fetchone()
        return row[0] if row else None

    def evals(self) -> list[dict]:
        cur = self.db.execute("SELECT step, samples, seconds, test_acc, test_loss FROM evals ORDER BY at, rowid")
        return [{"version": s, "samples": n, "seconds": sec, "test_acc": a, "test_loss": l}
                for s, n, sec, a, l in cur.fetchall()]

    def count_rejection(self, reason: str) -> None:
        """One more refusal for ``reason``: put off with ``write_behind`` (nobody waits for it; a refused result
        ran SQLite on the event loop, and first every unit insert still put off: 21% of the loop's callbacks
        over 5 ms under load, docs/results.md). A kill -9 may lose the last few counts."""
        self._execute("INSERT INTO rejections (reason, count) VALUES (?, 1) "
                      "ON CONFLICT(reason) DO UPDATE SET count = count + 1", (reason,), later=True)

    def rejections(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT reason, count FROM rejections").fetchall())

    # ------------------------------------------------------------------ helpers
    def transaction(self):
        return _Transaction(self.db, self._rolled_back)

    def _rolled_back(self) -> None:
        self._leased = None   # what is leased is read again from the table (the rows kept with it)
        self._versions.clear()
        self._pending = None

    def _rows(self, sql: str, args: tuple = ()) -> list[dict]:
        cur = self.db.execute(sql, args)
        names = [c[0] for c in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error); nests by joining the outer one."""

    def __init__(self, db: sqlite3.Connection, on_rollback=None):
        self.db, self.outer, self.on_rollback = db, False, on_rollback

    def __enter__(self):
        self.outer = not self.db.in_transaction
        if self.outer:
            self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb):
        if self.outer:   # (not through _Connection.execute: what another thread put off meanwhile stays out)
            sqlite3.Connection.execute(self.db, "ROLLBACK" if exc_type else "COMMIT")
            if exc_type and self.on_rollback is not None:
                self.on_rollback()
        return False
