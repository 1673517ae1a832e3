"""The job's state in Redis (``coordinator.redis_store``, ``coordinator.leader``, ``coordinator.cluster``).

A real ``redis-server`` (Debian's; ``deploy/setup.sh --test`` installs it) on a free loopback port
in the test's folder; skipped with the reason where it is missing. The store contract runs
against SQLite and Redis alike; the leader's writes are fenced; a job reopened from Redis by
another holder of the lock (in-process, then two real coordinator processes and ``kill -9``)
holds exactly the model the ledger says: version 0 plus each folded delta once.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from contract.codecs import decode_delta, encode_delta, get_codec
from contract.units import UnitRequest, UnitResult, WorkUnit, pack_result
from coordinator.redis_store import RedisStore
from coordinator.store import Store, Version
from tests.helpers.cluster import ROOT, free_port
from tests.helpers.redis_server import MISSING, REDIS

pytestmark = pytest.mark.skipif(REDIS is None, reason=MISSING)


# ---------------------------------------------------------------------------- the store contract, both engines
@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = Store(tmp_path / "state")
    else:
        s = RedisStore(request.getfixturevalue("redis_url"), "job", tmp_path / "blobs", root=tmp_path)
    yield s
    s.close()


def add(store, unit_id, worker="w1", base=0, samples=10, blob="b" * 64, staleness=0):
    return store.add_result(unit_id, worker, base, staleness, samples, 2.3, 2.2, 1.0, blob)


def lease(store, unit_id, shards, worker="w1", base=0, deadline=1e12, samples=10, **kw):
    store.insert_unit(unit_id, worker, shards, base, 0.1, 7, deadline, samples, wire="{}", **kw)


def test_units_and_leases(store):
    lease(store, "u1", ["s1", "s2"], deadline=100.0)
    lease(store, "u2", ["s3"], worker="w2", base=1, deadline=1e12 + 0.125, samples=20)
    assert sorted(store.leased_shards()) == ["s1", "s2", "s3"] and store.leased_samples() == 30
    u2 = store.unit("u2")
    assert (u2["shard_ids"], u2["deadline"], u2["status"], u2["worker_id"]) == (["s3"], 1e12 + 0.125, "leased", "w2")
    assert store.tail_candidate("w2")["unit_id"] == "u1" and store.tail_candidate("w1")["unit_id"] == "u2"
    assert [r["unit_id"] for r in store.expire_leases(200.0)] == ["u1"]
    assert store.expire_leases(200.0) == [] and store.leased_shards() == ["s3"] and store.leased_samples() == 20
    assert store.needed_base_steps(0) == {0, 1} and store.needed_base_steps(1) == {1}
    assert not store.set_unit_status("u1", "failed") and store.set_unit_status("u1", "failed", only_if=None)
    assert store.unit_counts() == {"leased": 1, "failed": 1}
    lease(store, "u3", ["s3"], worker="w3", twin="u2")
    assert store.unit("u2")["twin"] == "u3" and store.twin_alive(store.unit("u2"))
    store.supersede("u3")
    assert store.unit("u3")["status"] == "superseded" and not store.twin_alive(store.unit("u2"))
    assert store.unit("nope") is None and store.unit_statuses() == {"u1": "failed", "u2": "leased", "u3": "superseded"}


def test_the_tail_is_the_oldest_unit_not_yet_copied_found_without_reading_every_leased_unit(store, monkeypatch):
    """Once a job's budget is committed every unit request asks for the tail (``tail_candidate``): with 1,000
    leased units, reading each of them per request made the Redis leader collapse (bench/load.py, 2026-12-05)."""
    for i in range(60):
        lease(store, f"u{i:02d}", [f"s{i}"], worker="w1" if i % 3 else "w2", issued=float(i))
    lease(store, "r0", ["s0"], worker="w4", replica_of="u00", issued=0.5)   # a replica is never copied
    add(store, "u05")                                                          # done
    store.set_unit_status("u07", "failed")                                    # handed back
    read = []
    if hasattr(store, "_unit_rows"):
        rows = store._unit_rows
        monkeypatch.setattr(store, "_unit_rows", lambda ids: read.append(len(list(ids))) or rows(ids))
    copied = []
    for i in range(40):
        read.clear()
        c = store.tail_candidate("w3")
        copied.append(c["unit_id"])
        lease(store, f"c{i:02d}", c["shard_ids"], worker="w3", twin=c["unit_id"], issued=100.0 + i)
        # (the first ask of a process checks that u:tail is kept, and builds it for an older state)
        assert i == 0 or sum(read) <= 16, f"the tail read {sum(read)} unit rows"
    assert copied == [f"u{i:02d}" for i in range(42) if i not in (5, 7)]
    assert store.tail_candidate("w1")["unit_id"] == "u42" and store.tail_candidate("w2")["unit_id"] == "u43"
    if isinstance(store, RedisStore):   # a job's state from before u:tail was kept: built once, then kept
        store.r.delete(store.p + "u:tail", store.p + "u:tail:kept")
        again = RedisStore(store.url, store.job, store.blob_dir, root=store.root)
        assert again.tail_candidate("w1")["unit_id"] == "u42" and again.r.zcard(store.p + "u:tail") == 18
        # an entry left behind (a result logged while the index was built) is skipped and dropped
        store.r.zadd(store.p + "u:tail", {"u05": 0.0, "u07": 0.5})
        assert again.tail_candidate("w1")["unit_id"] == "u42" and again.r.zcard(store.p + "u:tail") == 18
        again.close()


def test_results_each_have_one_fate_and_the_log_replays_in_offer_order(store):
    for u in ("u1", "u2", "u3", "u4"):
        lease(store, u, [u + "s"])
    s1, s2, s3 = add(store, "u1", blob="a" * 64), add(store, "u2", "w2", blob="c" * 64, staleness=1), add(store, "u3")
    assert add(store, "u1") is None, "a unit's result is logged once"
    assert store.unit("u1")["status"] == "done" and store.leased_shards() == ["u4s"]
    assert [r["seq"] for r in store.pending_results()] == [s1, s2, s3] and store.pending_samples() == 30
    assert store.blob_pending("a" * 64) and store.result_for_unit("u2")["worker_id"] == "w2"
    assert store.has_result("u2") and not store.has_result("u4") and not store.has_result("nope")
    assert store.pending_blobs(["a" * 64, "c" * 64, "d" * 64, "a" * 64]) == {"a" * 64, "c" * 64}
    store.commit_version(Version(1, "", 20, 2, 5.0), [s2, s1], None, [(s3, "too_stale")],
                         offered=[(s2, 0, 0), (s1, 0, 1), (s3, 0, 2)])
    # a decided result's unit as sent: kept on SQLite's disk, dropped from Redis's memory
    assert [store.unit(u)["wire"] for u in ("u1", "u3", "u4")] == \
        ([None, None, "{}"] if isinstance(store, RedisStore) else ["{}", "{}", "{}"])
    assert store.pending_results() == [] and store.pending_samples() == 0 and not store.blob_pending("a" * 64)
    assert store.pending_blobs(["a" * 64, "c" * 64]) == set()
    assert [r["seq"] for r in store.offered_at(0)] == [s2, s1, s3] and store.last_offer_rank() == 2
    assert store.result_totals() == {"accepted": 3, "samples": 30, "applied": 2, "dropped": 1}
    assert store.dropped_counts() == {"too_stale": 1} and store.staleness_counts() == {0: 2, 1: 1}
    assert [(r["worker_id"], r["units"], r["samples"]) for r in store.credit_totals()] == [("w1", 1, 10), ("w2", 1, 10)]
    assert sorted(store.decided_blobs_since(0)) == sorted([(0, "a" * 64), (0, "c" * 64), (0, "b" * 64)])
    fates = {r["seq"]: (r["applied_step"], r["dropped"]) for r in store.results()}
    assert fates == {s1: (1, None), s2: (1, None), s3: (None, "too_stale")}
    assert sorted(store.clear_offered(0)) == sorted(["a" * 64, "c" * 64, "b" * 64]) and store.offered_at(0) == []
    s4 = add(store, "u4")
    store.mark_dropped([(s4, "quarantined")], [(s4, 1, 3)])
    assert store.result(s4)["dropped"] == "quarantined" and store.result(s4)["offer_rank"] == 3
    assert store.dropped_counts() == {"too_stale": 1, "quarantined": 1}


def test_samples_waiting_to_be_folded_follow_every_write_to_a_result_and_a_rollback(store):
    """``pending_samples`` is asked by every unit request; SQLite keeps it in memory between writes."""
    for u in ("u1", "u2", "u3", "u4", "u5"):
        lease(store, u, [u + "s"])
    assert store.pending_samples() == 0 and store.unit_and_result("u1") == (store.unit("u1"), False)
    s1 = add(store, "u1", samples=10)
    assert store.pending_samples() == 10 and store.unit_and_result("u1")[1] and store.unit_and_result("u9") == (None, False)
    if not isinstance(store, RedisStore):   # (Redis appends a result at once, also inside a transaction)
        with pytest.raises(RuntimeError):
            with store.transaction():
                add(store, "u2", samples=100)
                assert store.pending_samples() == 110
                raise RuntimeError("in the middle")
        assert store.pending_samples() == 10 and not store.unit_and_result("u2")[1]
    s2, s3 = add(store, "u2", samples=20), store.add_result("u3", "w1", 0, 0, 40, 2.3, 2.2, 1.0, "c" * 64,
                                                           check_state="replica")
    assert store.pending_samples() == 30, "a replica's result counts for nothing"
    store.set_check([(s3, "agreed")])
    assert store.pending_samples() == 70
    store.mark_dropped([(s3, "quarantined")])
    assert store.pending_samples() == 30
    store.commit_version(Version(1, "", 10, 1, 5.0), [s1], None, [(s2, "too_stale")])
    assert store.pending_samples() == 0
    add(store, "u4", samples=5)
    assert store.pending_samples() == 5


def test_a_unit_out_reads_as_its_row_and_a_changed_one_as_changed(store):
    """SQLite answers ``unit_and_result`` for a unit this process leased and that is still out from the row it
    inserted (no statement); what it answers is the table's row, before and after each change."""
    lease(store, "u1", ["a", "b"], deadline=123.5)
    lease(store, "u2", ["c"])
    lease(store, "u3", ["c"], twin="u2")   # the tail's second copy: both rows name each other

    def table(unit_id):   # the row as the table has it
        if isinstance(store, RedisStore):
            return store.unit(unit_id)
        cached, store._out = store._out, {}
        try:
            return store.unit(unit_id)
        finally:
            store._out = cached

    for u in ("u1", "u2", "u3"):
        assert store.unit_and_result(u) == (table(u), False) and table(u)["status"] == "leased"
    assert store.unit("u1")["shard_ids"] == ["a", "b"] and store.unit("u1")["deadline"] == 123.5
    assert store.unit("u2")["twin"] == "u3" and store.unit("u3")["twin"] == "u2"
    store.unit("u1")["shard_ids"].append("x")   # a copy: the caller's changes stay its own
    assert store.unit("u1")["shard_ids"] == ["a", "b"]
    store.set_unit_status("u1", "returned")
    store.supersede("u2")
    add(store, "u3")
    store.expire_leases(1e13)
    for u, status, has in (("u1", "returned", False), ("u2", "superseded", False), ("u3", "done", True)):
        assert store.unit_and_result(u) == (table(u), has) and store.unit(u)["status"] == status


def test_the_shard_queue_is_written_with_the_unit_issued_or_ended(store):
    """``queue``: meta ``queue`` written by the statement that issues a unit or moves it (SQLite: a trigger; the
    row keeps no copy), also when the move changes no row; rolled back with it."""
    lease(store, "u1", ["a"], queue={"epoch": 0, "position": 1, "retry": []})
    assert store.get_meta("queue") == {"epoch": 0, "position": 1, "retry": []} and "queue" not in store.unit("u1")
    lease(store, "u2", ["b"])
    assert store.get_meta("queue")["position"] == 1, "no queue: the meta stays"
    assert store.set_unit_status("u1", "returned", queue={"epoch": 0, "position": 2, "retry": ["a"]})
    assert store.get_meta("queue") == {"epoch": 0, "position": 2, "retry": ["a"]}
    assert not store.set_unit_status("u1", "failed", queue={"epoch": 0, "position": 3, "retry": []})   # not leased
    assert store.get_meta("queue")["position"] == 3 and store.unit("u1")["status"] == "returned"
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.set_unit_status("u2", "returned", queue={"epoch": 1, "position": 0, "retry": ["b"]})
            raise RuntimeError("in the middle")
    assert store.get_meta("queue")["position"] == 3 and store.unit("u2")["status"] == "leased"
    if not isinstance(store, RedisStore):
        assert store.db.execute("SELECT COUNT(*) FROM units WHERE queue IS NOT NULL").fetchone()[0] == 0


def test_versions_meta_trust_evals(store):
    store.commit_version(Version(0, "v0" * 32, 0, 0, 1.0), [], None)
    store.commit_version(Version(1, "", 10, 1, 2.0), [], None)
    store.commit_version(Version(2, "", 20, 1, 3.0), [], None)
    assert store.latest_version().step == 2 and store.latest_written_version().step == 0
    store.set_version_blob(2, "v2" * 32)
    assert store.latest_written_version() == Version(2, "v2" * 32, 20, 1, 3.0)
    store.set_version_blob(1, "v1" * 32)
    assert store.prunable_versions(2) == [(1, "v1" * 32)]
    store.mark_version_pruned(1)
    assert store.prunable_versions(3) == [(2, "v2" * 32)] and store.version(1).blob == "v1" * 32
    with store.transaction():
        store.set_meta("queue", {"epoch": 1, "retry": ["s"]})
        store.put_trust("w1", {"worker_id": "w1", "results": 3})
    assert store.get_meta("queue") == {"epoch": 1, "retry": ["s"]} and store.get_meta("none", 5) == 5
    assert store.trust_record("w1")["results"] == 3 and store.trust_records() == [{"worker_id": "w1", "results": 3}]
    store.add_eval(1, 10, 1.5, 0.25, 2.0)
    store.add_eval(2, 20, 2.5, 0.5, None)
    assert store.best_eval_step() == 2 and store.evals()[1] == {"version": 2, "samples": 20, "seconds": 2.5,
                                                                 "test_acc": 0.5, "test_loss": None}
    store.count_rejection("duplicate")
    store.count_rejection("duplicate")
    assert store.rejections() == {"duplicate": 2}
    blob = store.put_blob(b"bytes")
    assert store.get_blob(blob) == b"bytes" and store.blob_path("x") is None


def test_a_failed_transaction_writes_nothing(store):
    lease(store, "u1", ["s1"])
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.set_meta("k", 1)
            store.set_unit_status("u1", "failed")
            raise RuntimeError("in the middle")
    assert store.get_meta("k") is None and store.unit("u1")["status"] == "leased" and store.leased_shards() == ["s1"]


def test_results_logged_by_a_process_that_does_not_lead(redis_url, tmp_path):
    """``append_result`` (a process that does not lead): once per unit, only while the unit is out, told to
    the leader (``take_remote``); the leader's own moves of a unit it read before are skipped (CAS)."""
    leader = RedisStore(redis_url, "job", tmp_path / "blobs")
    other = RedisStore(redis_url, "job", tmp_path / "blobs")
    lease(leader, "u1", ["s1"], deadline=100.0)
    lease(leader, "u2", ["s2"], deadline=100.0)
    lease(leader, "u3", ["s3"])
    assert leader.leased_samples() == 30
    stale = leader.unit("u1")
    s1 = other.append_result("u1", "w1", 0, 0, 10, 2.3, 2.2, 1.0, "a" * 64)
    assert s1 > 0 and other.append_result("u1", "w1", 0, 0, 10, 2.3, 2.2, 1.0, "a" * 64) == -1
    assert leader.add_result("u1", "w1", 0, 0, 10, 2.3, 2.2, 1.0, "a" * 64) is None, "the leader sees it too"
    with leader.transaction():   # the leader's view of u1 (leased) is stale: its move is skipped
        leader._move(stale, "expired", 150.0)
    assert leader.unit("u1")["status"] == "done"
    assert [r["unit_id"] for r in leader.expire_leases(200.0)] == ["u2"]
    s2 = other.append_result("u2", "w2", 0, 1, 10, 2.3, 2.2, 1.0, "b" * 64)   # late: the intake's policy decided
    assert s2 > 0 and leader.unit("u2")["status"] == "done"
    assert leader.set_unit_status("u3", "failed")
    assert other.append_result("u3", "w3", 0, 0, 10, 2.3, 2.2, 1.0, "c" * 64) == -2, "ended: the leader decides"
    assert leader.unit_counts() == {"done": 2, "failed": 1}
    assert leader.take_remote() == [s1, s2] and leader.take_remote(block_s=0.1) == []
    assert [r["seq"] for r in leader.pending_results()] == [s1, s2] and leader.pending_samples() == 20
    assert leader.result_totals() == {"accepted": 2, "samples": 20, "applied": 0, "dropped": 0}
    assert leader.staleness_counts() == {0: 1, 1: 1} and leader.result(s2)["worker_id"] == "w2"


def test_the_leaders_view_of_the_open_results_follows_appends_and_its_own_changes(redis_url, tmp_path):
    """The leader reads the open results again only when a result was appended (by any process) or it changed
    one itself; else a unit request's pending samples cost one GET. A change inside a transaction shows
    inside it and goes with it when the transaction fails."""
    leader = RedisStore(redis_url, "job", tmp_path / "blobs")
    other = RedisStore(redis_url, "job", tmp_path / "blobs")
    for u in ("u1", "u2", "u3"):
        lease(leader, u, [u + "s"])
    assert leader.pending_samples() == 0
    s1 = other.append_result("u1", "w1", 0, 0, 10, 2.3, 2.2, 1.0, "a" * 64)
    assert leader.pending_samples() == 10 and leader.pending_blobs(["a" * 64, "b" * 64]) == {"a" * 64}
    s2 = leader.add_result("u2", "w2", 0, 0, 20, 2.3, 2.2, 1.0, "b" * 64)
    assert leader.pending_samples() == 30 and leader.blob_pending("b" * 64)

    built = leader.r.pipeline
    leader.r.pipeline = lambda *a, **k: pytest.fail("read the open results again with nothing changed")
    assert leader.pending_samples() == 30 and leader.blob_pending("a" * 64) and len(leader.pending_results()) == 2
    leader.r.pipeline = built

    leader.set_check([(s2, "replica")])   # a replica's samples are those of the result it checks
    assert leader.pending_samples() == 10
    with pytest.raises(RuntimeError):
        with leader.transaction():
            leader.commit_version(Version(1, "", 10, 1, 1.0), [s1], None)
            assert leader.pending_samples() == 0 and not leader.blob_pending("a" * 64)
            raise RuntimeError("in the middle")
    assert leader.pending_samples() == 10 and leader.blob_pending("a" * 64)
    leader.commit_version(Version(1, "", 10, 1, 1.0), [s1], None)
    assert leader.pending_samples() == 0 and leader.pending_blobs(["a" * 64, "b" * 64]) == {"b" * 64}
    s3 = other.append_result("u3", "w3", 0, 0, 5, 2.3, 2.2, 1.0, "c" * 64)
    assert leader.pending_samples() == 5 and [r["seq"] for r in leader.pending_results()] == [s3]


def test_the_leaders_round_trips_a_unit_request_and_a_hand_back_need(redis_url, tmp_path):
    """The leader (a fenced store) keeps the version rows it wrote or read (no other process writes them), moves a
    unit it read without reading it again (skipped if another process logged its result since), and its service
    (``write_behind``) takes the pending samples from a view checked within ``VIEW_TRUST_S`` (the next test: what
    it puts off, so that a unit request and a hand-back make no round trip of their own on the event loop)."""
    from coordinator.leader import LeaderLock

    lock = LeaderLock(redis_url, "ct:job:leader", 60.0)
    assert lock.try_acquire()
    leader = RedisStore(redis_url, "job", tmp_path / "blobs", fence=lock)
    other = RedisStore(redis_url, "job", tmp_path / "blobs")
    leader.commit_version(Version(0, "v0" * 32, 0, 0, 1.0), [], None)
    leader.commit_version(Version(1, "", 10, 1, 2.0), [], None)
    with pytest.raises(RuntimeError):
        with leader.transaction():
            leader.commit_version(Version(2, "", 20, 1, 3.0), [], None)
            raise RuntimeError("in the middle")
    reads = []
    hmget = leader.r.hmget
    leader.r.hmget = lambda *a, **k: reads.append(a) or hmget(*a, **k)
    assert leader.version(0) == Version(0, "v0" * 32, 0, 0, 1.0) and leader.version(1).blob == ""
    assert reads == [], "the rows it wrote are kept"
    assert leader.version(2) is None and len(reads) == 1, "a rolled-back row is not"
    leader.set_version_blob(1, "v1" * 32)
    leader.mark_version_pruned(1)
    assert leader.version(1) == other.version(1) == Version(1, "v1" * 32, 10, 1, 2.0)
    assert leader.prunable_versions(2) == other.prunable_versions(2) == [] and len(reads) == 1
    again = RedisStore(redis_url, "job", tmp_path / "blobs", fence=lock)   # the next leader reads each row once
    again.r.hmget = lambda *a, **k: reads.append(a) or hmget(*a, **k)
    assert again.version(1) == again.version(1) == leader.version(1) and len(reads) == 2
    other.r.hmget = lambda *a, **k: reads.append(a) or hmget(*a, **k)
    assert other.version(1) == other.version(1) and len(reads) == 4, "a store that does not lead keeps none"

    lease(leader, "u1", ["s1"])
    lease(leader, "u2", ["s2"])
    row1, row2 = leader.unit("u1"), leader.unit("u2")
    assert other.append_result("u2", "w1", 0, 0, 10, 2.3, 2.2, 1.0, "a" * 64) > 0
    pipeline = leader.r.pipeline
    leader.r.pipeline = lambda *a, **k: pytest.fail("the row was read again")
    assert leader.set_unit_status("u1", "returned", only_if=None, queue={"epoch": 0, "position": 2}, read=row1)
    assert leader.set_unit_status("u2", "returned", only_if=None, read=row2), "(True: not looked at)"
    leader.r.pipeline = pipeline
    assert leader.unit("u1")["status"] == "returned" and leader.get_meta("queue") == {"epoch": 0, "position": 2}
    assert leader.unit("u2")["status"] == "done", "the other process's result came first: the move is skipped"
    assert leader.unit_counts() == {"returned": 1, "done": 1}

    lease(leader, "u3", ["s3"])
    lease(leader, "u4", ["s4"])
    leader.write_behind()
    leader._view_trust_s = 60.0   # (VIEW_TRUST_S, long enough that this test's pauses cannot matter)
    assert leader.take_remote() == [1] and leader.pending_samples() == 10
    out = leader.leased_samples()   # (u3 and u4, read once: from now on kept in memory)
    assert other.append_result("u3", "w1", 0, 0, 30, 2.3, 2.2, 1.0, "b" * 64) > 0
    gets = []
    get = leader.r.get
    leader.r.get = lambda *a, **k: gets.append(a) or get(*a, **k)
    assert leader.pending_samples() == 10 and gets == [], "not asked again within the trusted time"
    assert leader.take_remote() == [2] and leader.pending_samples() == 10 and leader.leased_samples() == out, \
        "until the job takes it, another process's result counts as its unit's, out"
    leader.taken(leader.result(2))
    assert leader.pending_samples() == 40 and leader.leased_samples() == out - 10, "taken: counted at once"
    assert leader.add_result("u4", "w1", 0, 0, 5, 2.3, 2.2, 1.0, "c" * 64) and leader.pending_samples() == 45
    assert gets == []
    # a fold, a drop and an offer change the rows kept, as written: nothing is read again
    leader.r.pipeline = lambda *a, **k: pytest.fail("the open rows were read again")
    leader.commit_version(Version(2, "", 20, 1, 3.0), [1], None, dropped=[(2, "too_stale")], offered=[(3, 2, 0)])
    leader.r.pipeline = pipeline
    assert leader.pending_samples() == 5 and gets == [("ct:job:r:rank",)], "(the last offer's rank, read once)"
    leader.commit_version(None, [], None, offered=[(3, 2, 1)])
    assert leader.last_offer_rank() == other.last_offer_rank() == 1 and len(gets) == 1
    assert [(r["seq"], r["offered_step"]) for r in leader.pending_results()] == [(3, 2)]
    assert [(r["seq"], r["offered_step"]) for r in other.pending_results()] == [(3, 2)]
    leader._view_trust_s = 0.0   # (the other stores, the tests and the export command: always asked)
    assert leader.pending_samples() == 5 and len(gets) == 3 and gets[-1] == ("ct:job:r:open:gen",)
    lock.release()


def test_the_leaders_store_knows_the_results_held_for_a_check_without_asking(redis_url, tmp_path):
    """Every settle asks for the results held for a check: only the leader appends such a result or changes its
    state (another process appends results that need none), so the leader's store answers from the rows it keeps;
    a store that does not lead asks Redis."""
    from coordinator.leader import LeaderLock

    lock = LeaderLock(redis_url, "ct:job:leader", 60.0)
    assert lock.try_acquire()
    leader = RedisStore(redis_url, "job", tmp_path / "blobs", fence=lock)
    other = RedisStore(redis_url, "job", tmp_path / "blobs")
    for u in ("u1", "u2", "u3", "u4"):
        lease(leader, u, [u])
    assert leader.held_results() == [] and leader.held_counts() == {}   # (the view, read once)
    held = leader.add_result("u1", "w1", 0, 0, 10, 2.3, 2.2, 1.0, "a" * 64, check_state="held")
    replica = leader.add_result("u2", "w2", 0, 0, 10, 2.3, 2.2, 1.0, "b" * 64, check_state="replica")
    assert other.append_result("u3", "w3", 0, 0, 10, 2.3, 2.2, 1.0, "c" * 64) > 0
    get, pipeline = leader.r.get, leader.r.pipeline
    leader.r.get = leader.r.pipeline = lambda *a, **k: pytest.fail("asked Redis")
    assert [r["seq"] for r in leader.held_results()] == [held] and leader.held_counts() == {"held": 1, "replica": 1}
    assert [r["seq"] for r in leader.waiting_replica_results()] == [replica]
    leader.set_check([(held, "withdrawn")])
    leader.mark_dropped([(replica, "replica")])
    assert leader.held_results() == leader.waiting_replica_results() == [] and leader.held_counts() == {}
    leader.r.get, leader.r.pipeline = get, pipeline
    assert other.held_results() == [] and leader.add_result("u4", "w1", 0, 0, 10, 2.3, 2.2, 1.0, "d" * 64,
                                                            check_state="held")
    assert [r["unit_id"] for r in other.held_results()] == [r["unit_id"] for r in leader.held_results()] == ["u4"]
    lock.release()


def test_a_persist_reads_no_row_of_a_unit_the_leader_issued_and_holds_out(redis_url, tmp_path):
    """``needed_base_steps`` (each persist asks, with every unit out): the base of a unit the leader's service
    issued is taken from the row it keeps; a unit issued before (another leader's) is read."""
    from coordinator.leader import LeaderLock

    lock = LeaderLock(redis_url, "ct:job:leader", 60.0)
    assert lock.try_acquire()
    leader = RedisStore(redis_url, "job", tmp_path / "blobs", fence=lock)
    lease(leader, "u0", ["s0"], base=2)   # (before its service started: no row kept)
    leader.write_behind()
    assert leader.leased_count() == 1
    lease(leader, "u1", ["s1"], base=3)
    lease(leader, "u2", ["s2"], base=5)
    read = []
    unit_rows = leader._unit_rows
    leader._unit_rows = lambda ids: read.append(list(ids)) or unit_rows(ids)
    assert leader.needed_base_steps(0) == {2, 3, 5} and read == [["u0"]]
    assert leader.needed_base_steps(4) == {5}
    assert leader.set_unit_status("u2", "returned", only_if=None)
    assert leader.needed_base_steps(0) == {2, 3}
    # the units of results another process logged, as the job takes them (Node.ingest): a kept row as kept
    other = RedisStore(redis_url, "job", tmp_path / "blobs")
    assert other.append_result("u1", "w1", 3, 0, 10, 2.3, 2.2, 1.0, "a" * 64) > 0
    read.clear()
    assert [(u["unit_id"], u["base_step"], u["status"]) for u in leader.units(["u1", "u0", "u9"], kept=True)] == \
        [("u1", 3, "leased"), ("u0", 2, "leased")] and read == [["u0", "u9"]]
    assert [u["status"] for u in leader.units(["u1"])] == ["done"]
    lock.release()


def test_the_leaders_store_takes_a_blob_it_saw_lately_as_there(redis_url, tmp_path, monkeypatch):
    """A unit request asks for its base's blob, its fp16 copy and its version delta: the leader's store (fenced)
    asks the disk once a second at most for a blob it saw there or wrote (``PRESENT_TRUST_S``), forgets one it
    deletes at once, and a store that does not lead always asks (only the leader deletes; the time limit bounds
    what a deposed leader may still delete unseen)."""
    from coordinator.leader import LeaderLock

    lock = LeaderLock(redis_url, "ct:job:leader", 60.0)
    assert lock.try_acquire()
    leader = RedisStore(redis_url, "job", tmp_path / "blobs", fence=lock)
    other = RedisStore(redis_url, "job", tmp_path / "blobs")
    asked = []
    is_file = Path.is_file
    monkeypatch.setattr(Path, "is_file", lambda self: asked.append(self.name) or is_file(self))
    mine, theirs = leader.put_blob(b"mine" * 100), other.put_blob(b"theirs" * 100)
    asked.clear()   # (put_blob's own look)
    assert leader.blob_path(mine) == leader.blob_path(mine) == tmp_path / "blobs" / mine and asked == []
    assert leader.blob_path(theirs) == leader.blob_path(theirs) and asked == [theirs], "asked once"
    assert other.blob_path(mine) == other.blob_path(mine) and asked == [theirs, mine, mine], "always asked"
    leader.delete_blob(theirs, durable_first=False)
    assert leader.blob_path(theirs) is None and other.blob_path(theirs) is None, "forgotten as it goes"
    (tmp_path / "blobs" / mine).unlink()   # another process deleted it (a leader deposed a moment ago)
    assert leader.blob_path(mine) is not None, "(within the time limit: taken as there)"
    leader._present.ttl = 0.01
    time.sleep(0.02)
    assert leader.blob_path(mine) is None and asked[-1] == mine
    lock.release()


def test_the_leaders_service_puts_a_units_insert_and_a_hand_backs_move_off(redis_url, tmp_path):
    """``write_behind``: a unit's insert and a hand-back's move are written by a thread of the store's own, several
    in one round trip; any other command of the store, of any thread, has them written first (a process that does
    not lead may not see a unit yet: its result then goes to the leader, whose read writes it); close writes the
    rest."""
    import threading

    from coordinator.leader import LeaderLock

    lock = LeaderLock(redis_url, "ct:job:leader", 60.0)
    assert lock.try_acquire()
    leader = RedisStore(redis_url, "job", tmp_path / "blobs", fence=lock)
    other = RedisStore(redis_url, "job", tmp_path / "blobs")
    leader.write_behind()
    assert leader.leased_count() == 0   # (the units out, read once: from now on kept in memory)
    with leader._later_lock:   # (the writer cannot write them meanwhile; nor may this thread ask the leader's store)
        lease(leader, "u1", ["s1"], queue={"epoch": 1})
        lease(leader, "u2", ["s2"])
        assert len(leader._later) == 2 and other.unit("u1") is None and other.get_meta("queue") is None
    assert leader.unit("u1")["status"] == "leased" and leader.get_meta("queue") == {"epoch": 1}, "written first"
    assert other.unit("u2")["status"] == "leased" and other.unit_counts() == {"leased": 2}
    row = leader.unit("u2")
    with leader._later_lock:
        assert leader.set_unit_status("u2", "returned", only_if=None, queue={"epoch": 2}, read=row)
        assert len(leader._later) == 1 and other.unit("u2")["status"] == "leased"
    got = []
    reader = threading.Thread(target=lambda: got.append(leader.get_meta("queue")))
    reader.start()
    reader.join(10)
    assert got == [{"epoch": 2}] and other.unit("u2")["status"] == "returned", "another thread's read too"
    assert leader.set_unit_status("u1", "failed"), "(no row given: read, moved and looked at, at once)"
    assert other.unit("u1")["status"] == "failed" and not leader._later
    lease(leader, "u3", ["s3"])   # no other command: the writer thread writes it
    deadline = time.time() + 10
    while other.unit("u3") is None and time.time() < deadline:
        time.sleep(0.01)
    assert other.unit("u3")["status"] == "leased" and not leader._later
    with leader.transaction():   # inside a transaction: joins it, not put off
        lease(leader, "u4", ["s4"])
        assert not leader._later
    assert other.unit("u4")["status"] == "leased"
    # a hand-back's unit (exact=False) is answered from the rows of the units out, without a round trip
    pipeline = leader.r.pipeline
    leader.r.pipeline = lambda *a, **k: pytest.fail("asked Redis")
    assert leader.unit_and_result("u3", exact=False) == (other.unit("u3"), False)
    leader.r.pipeline = pipeline
    assert other.append_result("u3", "w1", 0, 0, 10, 2.3, 2.2, 1.0, "a" * 64) > 0   # logged by another process
    assert leader.unit_and_result("u3", exact=False)[0]["status"] == "leased", "(until the leader takes it)"
    assert leader.unit_and_result("u3") == (other.unit("u3"), True) and other.unit("u3")["status"] == "done"
    assert leader.take_remote() == [1]
    leader._unleased("u3")   # (as the leader's job does with each result it takes: ClusterJob.take_remote)
    assert leader.unit_and_result("u3", exact=False) == (other.unit("u3"), True)
    leader._leased = None   # (read again from Redis, as after a failed transaction: the rows kept are dropped)
    assert leader.leased_count() == 1 and not leader._out
    assert leader.unit_and_result("u4", exact=False) == (other.unit("u4"), False)
    lease(leader, "u5", ["s5"])
    leader.close()
    assert other.unit("u5")["status"] == "leased" and other.unit_counts() == {"leased": 2, "returned": 1, "failed": 1,
                                                                               "done": 1}
    lock.release()


# ---------------------------------------------------------------------------- the leader lock and fencing
def test_a_leader_that_lost_its_lock_writes_nothing(redis_url, tmp_path):
    from coordinator.leader import LeaderLock
    from coordinator.redis_store import Fenced, RedisStore

    a, b = LeaderLock(redis_url, "ct:job:leader", 1.0), LeaderLock(redis_url, "ct:job:leader", 1.0)
    assert a.try_acquire() and not b.try_acquire()
    store = RedisStore(redis_url, "job", tmp_path / "blobs", fence=a)
    store.set_meta("written", 1)
    time.sleep(1.2)   # a paused leader: its lease ran out, another takes the lock
    assert b.try_acquire() and a.token != b.token and not a.renew()
    with pytest.raises(Fenced):
        with store.transaction():
            store.set_meta("written", 2)
            store.set_meta("other", 3)
    assert store.get_meta("written") == 1 and store.get_meta("other") is None
    lost = []
    b.keep(lambda: lost.append(1))
    time.sleep(0.8)
    assert b.renew() and lost == [], "the holder keeps its lock by renewing it"
    b.r.set("ct:job:leader", "someone else")
    deadline = time.time() + 3
    while not lost and time.time() < deadline:
        time.sleep(0.05)
    assert lost == [1] and not b.held
    b.release()


# ---------------------------------------------------------------------------- a job reopened by the next leader
def fp32(arrays: dict) -> bytes:
    return encode_delta(get_codec("fp32"), arrays)


def test_the_next_leader_reopens_the_job_with_every_update_folded_once(redis_url, tmp_path):
    """Leader A folds some results (none persisted but version 0) and stops answering with results
    logged but not folded; B takes the lock and opens the job from Redis: the same versions, the
    unfolded results folded once, and A's writes refused."""
    import asyncio

    from coordinator.cluster import cluster_job
    from coordinator.config import CoordinatorConfig
    from coordinator.leader import LeaderLock
    from coordinator.redis_store import Fenced
    from tests.helpers.tiny_cifar import tiny_cifar10

    data = tiny_cifar10(n_train=256, n_test=64)
    cfg = CoordinatorConfig(state=tmp_path / "state", model="cnn", shard_size=64, epochs=4.0, codec="fp32",
                            local_steps=2, batch_size=32, persist_every_s=1e5, persist_every_versions=1000,
                            strategy="async_sgd", strategy_params={"staleness": "polynomial", "staleness_a": 1.0},
                            replication="off")
    blobs = tmp_path / "blobs"
    # A's lease runs out a second after it goes silent; B's outlasts the test on a busy machine (b.open took
    # longer than a 1 s lease under a parallel test run: its writes were then fenced)
    lock_a, lock_b = LeaderLock(redis_url, "ct:job:leader", 1.0), LeaderLock(redis_url, "ct:job:leader", 60.0)
    assert lock_a.try_acquire()
    lock_a.keep(lambda: None)
    a = cluster_job(cfg, redis_url, blobs, lock_a)
    a.open(data)
    v0 = {k: v.copy() for k, v in a.state.items()}
    rng = np.random.default_rng(0)
    deltas = {}

    async def round_of(job, n: int, fold: bool) -> None:
        units = [job.next_unit(UnitRequest(worker_id=f"w{i}", backend="python")) for i in range(n)]
        for i, u in enumerate(units):
            d = {k: (1e-3 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in v0.items()}
            body = pack_result(UnitResult(unit_id=u.unit_id, lease=u.lease, worker_id=f"w{i}", base_version=u.model_version,
                                          delta=fp32(d), loss_before=2.3, loss_after=2.2, num_samples=u.batch_size,
                                          compute_seconds=1.0))
            assert (await job.submit(u.unit_id, body))["accepted"]
            deltas[u.unit_id] = d
            if fold:
                await job.settle()

    asyncio.run(round_of(a, 3, fold=True))
    asyncio.run(round_of(a, 2, fold=False))   # logged, answered, not folded: then A goes silent
    assert a.step == 3 and a.persisted_step == 0 and len(a.store.pending_results()) == 2
    folded_by_a = a.state
    lock_a._stop.set()   # A goes silent (as after kill -9): its lease runs out
    time.sleep(1.2)
    assert lock_b.try_acquire()
    b = cluster_job(cfg, redis_url, blobs, lock_b)
    b.open(data)
    assert (b.step, b.samples) == (3, a.samples)
    for k, v in folded_by_a.items():   # the folds A never persisted, replayed from the log
        np.testing.assert_allclose(b.state[k], v, rtol=0, atol=1e-6, err_msg=k)
    asyncio.run(b.settle())
    assert b.step == 4 and b.store.pending_results() == [] and b.store.result_totals()["applied"] == 5
    with pytest.raises(Fenced):   # A, still holding its two results, cannot fold them a second time
        asyncio.run(a.settle())
    rows = b.store.ledger()
    assert all((r["applied_step"] is None) != (r["dropped"] is None) for r in rows), "one fate each"
    assert {r["unit_id"] for r in rows if r["applied_step"] is not None} == set(deltas)
    want = {k: v.astype(np.float64) for k, v in v0.items()}
    for r in rows:
        for k, d in deltas[r["unit_id"]].items():
            want[k] += d.astype(np.float64) / (1 + r["offered_step"] - r["base_step"])
    for k, v in want.items():
        np.testing.assert_allclose(b.state[k], v, rtol=0, atol=2e-6, err_msg=k)
    assert b.samples == sum(r["num_samples"] for r in rows)
    b.close()
    lock_b.release()


# ---------------------------------------------------------------------------- two processes, kill -9 the leader
ARGS = ("--replication", "off",   # a test of the checks passes --replication adaptive after these (the last wins)
        "--model", "cnn", "--shard-size", "64", "--batch-size", "32", "--local-steps", "2", "--codec", "fp32",
        "--strategy", "async_sgd", "--param", "staleness=polynomial", "--param", "staleness_a=1.0",
        "--eval-every", "100000", "--epochs", "50", "--persist-every-s", "100000", "--persist-every-versions", "1000",
        "--leader-ttl", "3")


def call(url: str, payload: bytes | None = None, retry_s: float = 0.0, token: str | None = None,
         headers: dict | None = None) -> tuple[int, bytes]:
    """One request (POST when ``payload``; with ``token``, as a bearer token; with more ``headers``); 503s and
    refused connections retried for ``retry_s`` seconds, as a worker does."""
    deadline = time.time() + retry_s
    headers = {"Content-Type": "application/octet-stream", **({"Authorization": f"Bearer {token}"} if token else {}),
               **(headers or {})}
    while True:
        req = urllib.request.Request(url, data=payload, method="POST" if payload is not None else "GET",
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            if e.code != 503 or time.time() > deadline:
                return e.code, e.read()
        except OSError:
            if time.time() > deadline:
                raise
        time.sleep(0.2)


class Processes:
    """Two ``crowdtrain coordinator --redis`` processes sharing one state folder (its blobs)."""

    def __init__(self, tmp: Path, url: str, data: Path):
        self.tmp, self.redis, self.data = tmp, url, data
        self.ports = [free_port(), free_port()]
        self.procs: list[subprocess.Popen | None] = [None, None]

    def start(self, i: int, *extra: str) -> None:
        log = open(self.tmp / f"coordinator{i}.log", "a")
        self.procs[i] = subprocess.Popen(
            [sys.executable, "-m", "crowdtrain", "coordinator", "--state", str(self.tmp / "state"), "--port",
             str(self.ports[i]), "--data", str(self.data), "--redis", self.redis, *ARGS, *extra],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    @classmethod
    def two(cls, tmp: Path, url: str, *extra: str) -> tuple[Processes, int]:
        """Both processes started on tiny data (with ``extra`` options): (them, the index of the one that leads)."""
        from tests.helpers.tiny_cifar import write_official_archive

        ps = cls(tmp, url, write_official_archive(tmp / "data", n_train=256, n_test=50))
        ps.start(0, *extra)
        ps.start(1, *extra)
        try:
            return ps, ps.leader()
        except BaseException:
            ps.stop()
            raise

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    def cluster(self, i: int) -> dict:
        return json.loads(call(self.url(i) + "/api/v1/cluster", retry_s=30)[1])

    def status(self, i: int) -> dict:
        code, raw = call(self.url(i) + "/api/status", retry_s=60)
        assert code == 200, raw
        return json.loads(raw)

    def leader(self) -> int:
        deadline = time.time() + 120
        while time.time() < deadline:
            for i in (0, 1):
                assert self.procs[i] is None or self.procs[i].poll() is None, self.logs()
                if self.procs[i] is not None and self.cluster(i)["leader"]:
                    return i
            time.sleep(0.3)
        raise AssertionError("no leader: " + self.logs())

    def logs(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in sorted(self.tmp.glob("coordinator*.log")))

    def stop(self) -> None:
        for p in self.procs:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)


def take(base: str, worker: str, token: str | None = None) -> WorkUnit:
    code, raw = call(base + "/api/v1/units/next", json.dumps({"protocol": 1, "worker_id": worker,
                                                              "backend": "python"}).encode(), retry_s=30, token=token)
    assert code == 200, raw
    return WorkUnit.from_json(json.loads(raw))


def submit(base: str, unit: WorkUnit, worker: str, seed: int, like: dict, retry_s: float = 0.0) -> dict:
    rng = np.random.default_rng(seed)
    delta = {k: (1e-3 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in like.items()}
    body = pack_result(UnitResult(unit_id=unit.unit_id, lease=unit.lease, worker_id=worker,
                                  base_version=unit.model_version, delta=fp32(delta), loss_before=2.3, loss_after=2.2,
                                  num_samples=unit.batch_size, compute_seconds=1.0))
    code, raw = call(f"{base}/api/v1/units/{unit.unit_id}/result", body, retry_s=retry_s)
    assert code == 200 and json.loads(raw)["accepted"], raw
    return delta


def raw_request(base: str, method: str, path: str, headers: dict, body: bytes = b"",
                again: bool = True) -> tuple[int, bytes]:
    """One request on one connection, headers as given (``Expect``, a ``Content-Length`` the body does not
    have): (status, body). ``again``: then a ``GET /api/status`` on the same connection, which must be
    answered (the connection was left in order; not after a body left unsent, which the server cannot skip)."""
    import http.client

    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest(method, path)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders(body or None)
        r = conn.getresponse()
        first = r.status, r.read()
        if not again:
            return first
        conn.request("GET", "/api/status")
        again = conn.getresponse()
        assert again.status == 200, (again.status, again.read())
        again.read()
        return first
    finally:
        conn.close()


@pytest.mark.timeout(300)
def test_the_leaders_own_port_answers_as_the_other_processes_port_does(redis_url, tmp_path):
    """The other process's public port passes requests to the leader's service over HTTP; the leader's own
    port hands them to the job's application in its process (``in_process``): the same answers on either
    port, for bodies that are JSON, binary, hostile, too large or sent after ``Expect: 100-continue``, for
    unknown routes and files."""
    ps, first = Processes.two(tmp_path, redis_url)
    try:
        bases = {"leader": ps.url(first), "other": ps.url(1 - first)}
        take(bases["other"], "probe")
        answers = {}
        for who, base in bases.items():
            got = answers[who] = {}
            got["non-utf8"] = call(base + "/api/v1/units/next", b"\xff\xfe{")
            got["wrong type"] = call(base + "/api/v1/units/next", json.dumps(
                {"protocol": 1, "worker_id": 5, "backend": "python"}).encode())
            got["unknown route"] = call(base + "/api/v1/nope")
            got["status"] = call(base + "/api/status")[0], b""
            got["dashboard"] = call(base + "/dashboard")[0], b""
            got["unknown file"] = call(base + "/dashboard/nope.js")
            got["too large"] = raw_request(base, "POST", "/api/v1/units/u-none/result",
                                           {"Content-Length": str(1 << 40)}, again=False)
            unit = take(base, f"w-{who}")
            v0 = decode_delta(call(f"{base}/api/v1/blobs/{unit.model_version}")[1])
            got["result"] = 200 if submit(base, unit, f"w-{who}", 1, v0) else 0, b""
            unit = take(base, f"x-{who}")
            body = pack_result(UnitResult(unit_id=unit.unit_id, lease=unit.lease, worker_id=f"x-{who}",
                                          base_version=unit.model_version, delta=fp32(v0), loss_before=2.3,
                                          loss_after=2.2, num_samples=unit.batch_size, compute_seconds=1.0))
            status, raw = raw_request(base, "POST", f"/api/v1/units/{unit.unit_id}/result",
                                      {"Expect": "100-continue", "Content-Length": str(len(body)),
                                       "Content-Type": "application/octet-stream"}, body)
            got["after 100-continue"] = status, json.loads(raw).get("accepted", False)
        for case, (status, raw) in answers["leader"].items():
            other_status, other_raw = answers["other"][case]
            assert status == other_status, (case, raw, other_raw)
            if isinstance(raw, bytes) and raw.startswith(b'{"error"'):
                assert json.loads(raw)["error"] == json.loads(other_raw)["error"], case
        assert answers["leader"]["non-utf8"][0] == 400 and answers["leader"]["wrong type"][0] == 400
        assert answers["leader"]["too large"][0] == 413 and answers["leader"]["unknown route"][0] == 404
        assert answers["leader"]["after 100-continue"] == (200, True)
        assert ps.status(first)["units_accepted"] == 4
        # the leader's port took its results as the other's does (LocalIntake, in a helper thread) or passed them on
        leader = ps.cluster(first)
        assert leader["leader"] and leader["results_taken"] + leader["results_passed_to_leader"] >= 2, leader
    finally:
        ps.stop()


@pytest.mark.timeout(300)
def test_kill_9_of_the_leader_another_process_takes_over_and_folds_each_update_once(redis_url, tmp_path):
    ps, first = Processes.two(tmp_path, redis_url)
    try:
        other = 1 - first
        store = RedisStore(redis_url, "cifar10", tmp_path / "state" / "blobs")   # to read the ledger
        take(ps.url(other), "probe")
        v0 = decode_delta(store.get_blob(store.version(0).blob))
        deltas: dict[str, dict] = {}
        # both processes hand out units and take results; the leader folds each
        for r in range(2):
            units = [(w, take(ps.url(i % 2), w)) for i, w in enumerate(("w1", "w2", "w3"))]
            for i, (w, u) in enumerate(units):
                deltas[u.unit_id] = submit(ps.url((i + 1) % 2), u, w, 10 * r + i, v0)
        # a result the process that does not lead takes is answered once the leader holds it (the worker's
        # next unit starts from a model with it folded in, as with one process)
        u = take(ps.url(first), "wf")
        deltas[u.unit_id] = submit(ps.url(other), u, "wf", 7, v0)
        row, = (w for w in ps.status(first)["workers"] if w["worker_id"] == "wf")
        assert row["units"] == 1, row
        before = ps.status(other)
        assert before["units_accepted"] == 7
        assert ps.cluster(other)["results_taken"] >= 2, "the process that does not lead logged results itself"
        units = [(w, take(ps.url(other), w)) for w in ("w1", "w2", "w3")]   # out on a lease when the leader dies
        # (the leader writes a unit's row on its writer thread moments after answering, RedisStore.write_behind: a
        # kill -9 within those moments loses the unit, whose result the next leader then refuses as unknown_unit,
        # docs/architecture.md; here it dies once they are written, as almost every unit out is when a leader dies)
        written = time.time()
        while any(store.unit(u.unit_id) is None for _, u in units):
            assert time.time() - written < 10, "the leader did not write the units it issued"
            time.sleep(0.01)
        ps.procs[first].send_signal(signal.SIGKILL)
        ps.procs[first].wait(10)
        killed = time.time()
        for i, (w, u) in enumerate(units):   # the workers notice nothing: their results are taken meanwhile
            deltas[u.unit_id] = submit(ps.url(other), u, w, 100 + i, v0, retry_s=60)
        while not ps.cluster(other)["leader"]:
            assert time.time() - killed < 30, ps.logs()
            time.sleep(0.1)
        took_over = time.time() - killed
        deadline = time.time() + 60
        while True:
            after = ps.status(other)
            if after["updates_applied"] + sum(after["updates_dropped"].values()) == 10 or time.time() > deadline:
                break
            time.sleep(0.3)
        assert after["units_accepted"] == 10 and after["updates_applied"] == 10 and after["updates_dropped"] == {}, after
        ps.start(first)   # the killed process comes back as a follower and forwards to the new leader
        assert not ps.cluster(first)["leader"] and ps.status(first)["model_version"] == after["model_version"]

        rows = store.ledger()
        assert len(rows) == 10 and {r["unit_id"] for r in rows} == set(deltas), "every accepted result logged once"
        assert all(r["applied_step"] is not None and r["dropped"] is None for r in rows), "one fate each: folded"
        want = {k: v.astype(np.float64) for k, v in v0.items()}
        for r in rows:
            for k, d in deltas[r["unit_id"]].items():
                want[k] += d.astype(np.float64) / (1 + r["offered_step"] - r["base_step"])
        base = take(ps.url(first), "probe2").base_step   # the model a unit is cut from now, written in full
        assert base == after["model_version"]
        served = decode_delta(store.get_blob(store.version(base).blob))
        for k, v in want.items():
            np.testing.assert_allclose(served[k], v, rtol=0, atol=2e-6, err_msg=k)
        assert after["samples"] == sum(r["num_samples"] for r in rows)
        print(f"takeover: the other process leads {took_over:.1f} s after the kill")
        assert took_over < 30, ps.logs()
    finally:
        ps.stop()


@pytest.mark.timeout(300)
def test_a_lone_leader_stalled_past_its_lease_exits_for_its_supervisor(redis_url, tmp_path):
    """A leader paused longer than ``--leader-ttl`` (a host far busier than its cores) finds its lock expired when it
    runs again and exits with ``LOST_EXIT`` even when no other process took the lock (it cannot know that nobody
    wrote meanwhile): its supervisor (deploy/systemd, ``Restart=always``) starts it again, and it leads again."""
    from coordinator.cluster import LOST_EXIT

    ps, first = Processes.two(tmp_path, redis_url)
    try:
        ps.procs[1 - first].kill()
        ps.procs[1 - first].wait(10)
        ps.procs[1 - first] = None        # the leader is alone
        ps.procs[first].send_signal(signal.SIGSTOP)
        time.sleep(5)                     # > --leader-ttl 3
        ps.procs[first].send_signal(signal.SIGCONT)
        assert ps.procs[first].wait(30) == LOST_EXIT, ps.logs()
        assert "lost the leader lock" in ps.logs()
        ps.start(first)                   # as the supervisor does
        assert ps.leader() == first
    finally:
        ps.stop()


def test_the_shipped_redis_conf_keeps_every_write_through_kill_9_of_redis(tmp_path):
    """deploy/redis.conf (append-only file fsynced on every write): what the store wrote before
    redis-server was killed with kill -9 is all there once it restarts on the same directory."""
    import redis

    port = free_port()

    def start() -> subprocess.Popen:
        proc = subprocess.Popen([REDIS, str(ROOT / "deploy" / "redis.conf"), "--port", str(port), "--dir",
                                 str(tmp_path), "--supervised", "no"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT)
        deadline = time.time() + 10
        while True:
            try:
                redis.Redis(port=port).ping()
                return proc
            except redis.ConnectionError:
                assert proc.poll() is None and time.time() < deadline, "redis-server did not start"
                time.sleep(0.05)

    proc = start()
    try:
        url = f"redis://127.0.0.1:{port}/0"
        store = RedisStore(url, "job", tmp_path / "blobs")
        assert store.r.config_get("appendfsync") == {"appendfsync": "always"}
        seqs = []
        for i in range(20):
            lease(store, f"u{i}", [f"s{i}"])
            seqs.append(add(store, f"u{i}"))
        store.commit_version(Version(1, "", 100, 10, 1.0), seqs[:10], None, [(seqs[10], "too_stale")])
        store.close()
        proc.kill()
        proc.wait(10)
        proc = start()
        again = RedisStore(url, "job", tmp_path / "blobs")
        rows = again.ledger()
        assert [r["unit_id"] for r in rows] == [f"u{i}" for i in range(20)]
        assert again.result_totals() == {"accepted": 20, "samples": 200, "applied": 10, "dropped": 1}
        assert len(again.pending_results()) == 9 and again.latest_version().step == 1
        assert set(again.unit_statuses().values()) == {"done"}
        again.close()
    finally:
        proc.kill()
        proc.wait(10)


def leading_job(redis_url: str, tmp_path: Path):
    """A ``ClusterJob`` on tiny data whose process holds the leader lock, and the lock."""
    from coordinator.cluster import cluster_job
    from coordinator.config import CoordinatorConfig
    from coordinator.leader import LeaderLock
    from tests.helpers.tiny_cifar import tiny_cifar10

    cfg = CoordinatorConfig(state=tmp_path / "state", model="cnn", shard_size=64, epochs=4.0, codec="fp32",
                            local_steps=2, batch_size=32, replication="off")
    lock = LeaderLock(redis_url, "ct:cifar10:leader", 5.0)
    assert lock.try_acquire()
    lock.keep(lambda: None)
    job = cluster_job(cfg, redis_url, tmp_path / "blobs", lock)
    job.open(tiny_cifar10(n_train=256, n_test=64))
    return job, lock


def test_the_leader_folds_what_other_processes_logged(redis_url, tmp_path):
    """``ClusterJob.take_remote``: a result another process appended goes to the inbox and is folded once
    (the worker's record counts it); one from a worker quarantined since is dropped (``quarantined``)."""
    import asyncio
    import dataclasses

    from coordinator.trust import Record

    job, lock = leading_job(redis_url, tmp_path)
    other = RedisStore(redis_url, "cifar10", tmp_path / "blobs")
    zeros = {k: np.zeros_like(v) for k, v in job.state.items()}
    taken = []
    for worker in ("w1", "wq"):
        u = job.next_unit(UnitRequest(worker_id=worker, backend="python"))
        seq = other.append_result(u.unit_id, worker, u.base_step, 0, u.batch_size, 2.3, 2.2, 1.0,
                                  other.put_blob(fp32(zeros)))
        taken.append(seq)
    job.trust.put(dataclasses.replace(job.trust.get("wq") or Record("wq"), quarantined=True))
    assert job.store.take_remote() == taken
    for row in job.store.result_rows(taken):
        job.take_remote(row, decode_delta(job.store.get_blob(row["delta_blob"])))
    asyncio.run(job.settle())
    fates = {r["worker_id"]: (r["applied_step"], r["dropped"]) for r in job.store.ledger()}
    assert fates == {"w1": (1, None), "wq": (None, "quarantined")}
    assert job.trust.get("w1").results == 1 and job.workers["w1"].units == 1 and job.step == 1
    lock.release()


def test_a_unit_given_back_to_another_process_goes_back_in_line_once(redis_url, tmp_path):
    """``RedisStore.give_back`` (a process that does not lead, handed a unit back or told it failed): moved as the
    leader's ``give_up`` moves it, once, only while it is out without a result, and listed; the leader puts its
    shards back in line and takes it off the list in one script (``UnitFactory.put_back``), unless a second copy
    covers them; until then it counts as out."""
    job, lock = leading_job(redis_url, tmp_path)
    job.store.write_behind()   # (as the leader's service: the units it issues are kept)
    other = RedisStore(redis_url, "cifar10", tmp_path / "blobs")
    u1, u2, u3 = (job.next_unit(UnitRequest(worker_id=w, backend="python")) for w in ("w1", "w2", "w3"))
    out = job.store.leased_samples()
    assert job.store.unit(u3.unit_id)["status"] == "leased"   # (a read: the inserts put off are written first)
    seq = other.append_result(u3.unit_id, "w3", 0, 0, u3.batch_size, 2.3, 2.2, 1.0, "a" * 64)
    assert job.store.take_remote(block_s=0.1) == [seq]
    assert other.give_back(u1.unit_id, "returned") and other.give_back(u2.unit_id, "failed")
    assert not other.give_back(u1.unit_id, "returned"), "once"
    assert not other.give_back(u3.unit_id, "returned"), "a unit with a result: the leader decides"
    t0 = time.time()
    assert job.store.take_remote(block_s=5.0) == [] and time.time() - t0 < 2.0, "woken, not timed out"
    given = job.store.given_back()
    assert given == [u1.unit_id, u2.unit_id] and job.store.leased_samples() == out, "out until put back"
    assert {other.unit(u)["status"] for u in given} == {"returned", "failed"}
    assert other.unit_counts() == {"returned": 1, "failed": 1, "done": 1}
    shards = job.store.unit(u1.unit_id)["shard_ids"] + job.store.unit(u2.unit_id)["shard_ids"]
    assert set(shards) <= set(job.store.leased_shards()) and not set(shards) & job.factory.retrying()
    with job.store.transaction():
        job.factory.put_back(job.store.units(given, kept=True))
        job.store.put_back(given)
    gone = sum(job.store.unit(u)["samples"] for u in given)
    assert job.store.given_back() == [] and gone > 0 and job.store.leased_samples() == out - gone
    assert set(shards) <= job.factory.retrying() and set(shards) <= set(job.store.get_meta("queue")["retry"])
    assert other.unit_counts() == {"returned": 1, "failed": 1, "done": 1}, "moved once"
    lock.release()


@pytest.mark.timeout(300)
def test_a_hand_back_is_answered_by_the_process_it_reaches(redis_url, tmp_path):
    """A hand-back sent to a process that does not lead is answered there (with checks on too: it logs no result),
    and the leader puts the unit's shards back in line; one the worker's lease does not cover goes to the
    leader, which refuses it."""
    from tests.helpers.tiny_cifar import write_official_archive

    ps = Processes(tmp_path, redis_url, write_official_archive(tmp_path / "data", n_train=256, n_test=50))
    try:
        for i in (0, 1):
            ps.start(i, "--replication", "adaptive")   # (results checked: every one goes to the leader)
        first = ps.leader()
        other = 1 - first
        store = RedisStore(redis_url, "cifar10", tmp_path / "state" / "blobs")
        unit = take(ps.url(other), "w1")
        body = pack_result(UnitResult(unit_id=unit.unit_id, lease=unit.lease, worker_id="w1",
                                      base_version=unit.model_version, delta=b"", loss_before=0.0, loss_after=0.0,
                                      num_samples=0, compute_seconds=0.0, error="returned: the tab was closed"))
        forged = pack_result(UnitResult(unit_id=unit.unit_id, lease=unit.lease, worker_id="w2",
                                        base_version=unit.model_version, delta=b"", loss_before=0.0, loss_after=0.0,
                                        num_samples=0, compute_seconds=0.0, error="returned"))
        deadline = time.time() + 10   # (the leader writes a unit's row just after answering: until then it is the
        while store.unit(unit.unit_id) is None and time.time() < deadline:   # leader's to decide, documented)
            time.sleep(0.01)
        code, raw = call(f"{ps.url(other)}/api/v1/units/{unit.unit_id}/result", forged)
        assert code == 403 and json.loads(raw)["error"]["code"] == "lease_invalid", raw
        code, raw = call(f"{ps.url(other)}/api/v1/units/{unit.unit_id}/result", body)
        assert code == 200 and json.loads(raw) == {"accepted": False, "status": "returned"}, raw
        cluster = ps.cluster(other)
        assert cluster["units_given_back"] == 1 and cluster["results_passed_to_leader"] == 1, cluster
        assert store.unit(unit.unit_id)["status"] == "returned"
        deadline = time.time() + 10
        while store.r.llen("ct:cifar10:u:given") and time.time() < deadline:
            time.sleep(0.05)
        assert store.r.llen("ct:cifar10:u:given") == 0, ps.logs()
        assert set(store.unit(unit.unit_id)["shard_ids"]) <= set(store.get_meta("queue")["retry"])
        # on the leader's own port, with checks on, a stranger's result and hand-back go straight to its job (the
        # body read once, in-process): answered alike, nothing taken or passed on by its LocalIntake
        for w, error in (("w3", "returned: the tab was closed"), ("w4", None)):
            unit = take(ps.url(first), w)
            v0 = decode_delta(store.get_blob(unit.model_version))
            body = pack_result(UnitResult(unit_id=unit.unit_id, lease=unit.lease, worker_id=w,
                                          base_version=unit.model_version, delta=b"" if error else fp32(v0),
                                          loss_before=2.3, loss_after=2.2, num_samples=0 if error else unit.batch_size,
                                          compute_seconds=1.0, error=error))
            code, raw = call(f"{ps.url(first)}/api/v1/units/{unit.unit_id}/result", body)
            assert code == 200 and json.loads(raw)["accepted"] == (error is None), raw
        leader = ps.cluster(first)
        assert leader["leader"] and (leader["results_taken"], leader["results_passed_to_leader"],
                                     leader["units_given_back"]) == (0, 0, 0), leader
    finally:
        ps.stop()


@pytest.mark.timeout(300)
def test_a_too_stale_result_is_refused_by_the_process_it_reaches(redis_url, tmp_path):
    """A result refused as too stale (a refusal that ends its unit) is answered by the process it reaches, as the
    leader would answer it: the unit moved to ``stale``, its shards put back in line by the leader, the refusal
    counted; the job's accepted results are the others'."""
    ps, first = Processes.two(tmp_path, redis_url, "--max-staleness", "0")
    try:
        other = 1 - first
        store = RedisStore(redis_url, "cifar10", tmp_path / "state" / "blobs")
        old, fresh = take(ps.url(other), "w-old"), take(ps.url(other), "w-fresh")
        v0 = decode_delta(store.get_blob(store.version(0).blob))
        deadline = time.time() + 30   # (the leader writes a unit's row just after answering: until then its results
        while None in (store.unit(old.unit_id), store.unit(fresh.unit_id)) and time.time() < deadline:   # are its own)
            time.sleep(0.01)
        submit(ps.url(other), fresh, "w-fresh", 1, v0)
        while store.latest_version().step < 1 and time.time() < deadline:   # folded: the old unit is a version behind
            time.sleep(0.05)
        body = pack_result(UnitResult(unit_id=old.unit_id, lease=old.lease, worker_id="w-old",
                                      base_version=old.model_version, delta=fp32(v0), loss_before=2.3, loss_after=2.2,
                                      num_samples=old.batch_size, compute_seconds=1.0))
        code, raw = call(f"{ps.url(other)}/api/v1/units/{old.unit_id}/result", body)
        assert code == 409 and json.loads(raw)["error"]["code"] == "too_stale", raw
        cluster = ps.cluster(other)
        assert cluster["results_refused"] == 1 and cluster["results_passed_to_leader"] == 0, cluster
        assert store.unit(old.unit_id)["status"] == "stale" and store.rejections() == {"too_stale": 1}
        while store.r.llen("ct:cifar10:u:given") and time.time() < deadline:
            time.sleep(0.05)
        assert set(store.unit(old.unit_id)["shard_ids"]) <= set(store.get_meta("queue")["retry"]), ps.logs()
        assert ps.status(first)["units_accepted"] == 1
    finally:
        ps.stop()


@pytest.mark.timeout(300)
def test_each_process_serves_its_own_request_metrics_and_the_jobs_state(redis_url, tmp_path):
    """``/metrics`` on each process's port: its own request histogram (under the route templates, though it
    forwards) and memory, and the job's families as the leader reports them; ``--access-log json``: one
    JSON line per request, in the process that answered it."""
    from prometheus_client.parser import text_string_to_metric_families

    from coordinator.observe import REQUEST_SECONDS, request_latency
    from tests.helpers.tiny_cifar import write_official_archive

    data = write_official_archive(tmp_path / "data", n_train=256, n_test=50)
    ps = Processes(tmp_path, redis_url, data)
    try:
        for i in (0, 1):
            ps.start(i, "--access-log", "json")
        first = ps.leader()
        other = 1 - first
        take(ps.url(other), "m1")
        take(ps.url(other), "m2")
        take(ps.url(first), "m3")
        texts = [call(ps.url(i) + "/metrics")[1].decode() for i in (0, 1)]
        families = [{f.name: f for f in text_string_to_metric_families(t)} for t in texts]
        for fams in families:
            assert fams["crowdtrain_units_issued"].samples[0].value == 3, "the job's, the same on each process"
            assert fams["process_resident_memory_bytes"].samples[0].value > 10e6
            assert fams[REQUEST_SECONDS].type == "histogram"
        # worker ids only to a client on this machine, as the leader's /api/status (the process forwards the address)
        assert 'worker="m1"' in texts[other]
        stranger = urllib.request.Request(ps.url(other) + "/metrics", headers={"X-Forwarded-For": "203.0.113.7"})
        with urllib.request.urlopen(stranger, timeout=30) as r:
            public = r.read().decode()
        seen = {f.name: f for f in text_string_to_metric_families(public)}
        assert seen["crowdtrain_units_issued"].samples[0].value == 3
        assert 'worker="m' not in public and 'worker="anon-' in public
        # this process's requests: 2xx the units it handed out (a 503 while the new leader opens the job is
        # retried, as a worker does, and counted as 5xx)
        answered = request_latency([texts[other]])["POST /api/v1/units/next"]
        assert answered["statuses"]["2xx"] == 2 and set(answered["statuses"]) <= {"2xx", "5xx"}, answered
        assert request_latency([texts[first]])["POST /api/v1/units/next"]["statuses"]["2xx"] == 1
        lines = [json.loads(line) for line in (tmp_path / f"coordinator{other}.log").read_text().splitlines()
                 if line.startswith("{")]
        units = [line for line in lines if line["route"] == "/api/v1/units/next"]
        assert len(units) == answered["n"] and all(u["client"] == "127.0.0.1" for u in units), lines
        assert [u["status"] for u in units if u["status"] != 503] == [200, 200], lines
    finally:
        ps.stop()


@pytest.mark.timeout(300)
def test_replicated_checks_with_two_processes(redis_url, tmp_path):
    """``--replication adaptive`` with ``--redis``: a result sent to the process that does not lead goes to the
    leader, which holds it (a new worker's result waits for a replica), hands the replica to another worker
    through either process, and folds the original once the replica agrees (and, since neither new worker vouches,
    the leader's own computation too). A result of the operator's own
    worker (--trusted-tokens), never checked, is taken by the process it reaches."""
    from tests.helpers.fault_worker import body, compute
    from tests.helpers.tiny_cifar import write_official_archive

    data = write_official_archive(tmp_path / "data", n_train=256, n_test=50)
    ps = Processes(tmp_path, redis_url, data)

    def fetch(base: str):
        return lambda blob: call(f"{base}/api/v1/blobs/{blob}", retry_s=30)[1]

    def send(base: str, unit: WorkUnit, worker: str, token: str | None = None) -> dict:
        code, raw = call(f"{base}/api/v1/units/{unit.unit_id}/result", body(compute(unit, fetch(base), worker)),
                         retry_s=30, token=token)
        assert code == 200, raw
        return json.loads(raw)

    own = tmp_path / "trusted-tokens"
    own.write_text("own-token-00001\n")
    try:
        ps.start(0, "--replication", "adaptive", "--trusted-tokens", str(own))
        ps.start(1, "--replication", "adaptive", "--trusted-tokens", str(own))
        other = 1 - ps.leader()
        base = ps.url(other)
        unit = take(base, "w1")
        replica = take(ps.url(1 - other), "w2")   # w1 is new: its unit goes out again at once, from either process
        same = ("base_step", "shard_ids", "local_steps", "batch_size", "seed")
        assert all(getattr(replica, f) == getattr(unit, f) for f in same), "w2 recomputes w1's unit"
        assert send(base, unit, "w1")["accepted"]
        status = ps.status(other)
        assert status["updates_held"] == 1 and status["updates_applied"] == 0, status
        cluster = ps.cluster(other)
        assert cluster["results_taken"] == 0 and cluster["results_passed_to_leader"] == 1, cluster
        # to a client elsewhere (through a proxy on this machine): whether it leads, not the leader's address
        code, raw = call(base + "/api/v1/cluster", headers={"X-Forwarded-For": "203.0.113.7"})
        assert code == 200 and json.loads(raw) == {"leader": False, "job": cluster["job"]}, raw
        assert send(base, replica, "w2")["accepted"]
        deadline = time.time() + 30
        while (status := ps.status(other))["updates_applied"] < 1 and time.time() < deadline:
            time.sleep(0.2)
        assert status["updates_applied"] == 1 and status["updates_held"] == 0, status
        assert status["updates_dropped"] == {"replica": 1}, status
        # two new workers agreeing settle nothing alone (trust.vouches): the leader recomputed the unit
        assert status["replication"]["agreed_unvouched"] == status["replication"]["recomputed"] == 1, status

        mine = take(base, "own", token="own-token-00001")
        assert send(base, mine, "own", token="own-token-00001")["accepted"]
        cluster = ps.cluster(other)
        assert cluster["results_taken"] == 1 and cluster["results_passed_to_leader"] == 2, cluster
        deadline = time.time() + 30
        while (status := ps.status(other))["updates_applied"] < 2 and time.time() < deadline:
            time.sleep(0.2)
        assert status["updates_applied"] == 2 and status["updates_held"] == 0, "folded unchecked"
    finally:
        ps.stop()
