"""The ledger tells the truth: every accepted result is recorded as folded into a version or
dropped with the aggregator's reason, and ``/api/status`` counts exactly those.

Each strategy runs inside a real job behind the real app (pytest-aiohttp on 127.0.0.1, a
real SQLite store), with wrappers built from the config's policies, with workers whose
units overlap so that updates arrive stale.
"""
import asyncio
import contextlib
import json
import threading
from collections import Counter

import numpy as np
import pytest

from contract.codecs import decode_delta, delta_norm, encode_delta, get_codec
from contract.units import WORKER_KEY_HEADER, UnitResult, blob_id, pack_result
from models.local import is_running_stat
from tests.helpers.fault_worker import body, compute
from tests.helpers.protocol import fetch_all, key_of, open_job, post, start_job, take
from tests.helpers.tiny_cifar import tiny_cifar10

WORKERS = ("w1", "w2", "w3")

CASES = {
    # strategy, its params, other config, the drop reason the run must produce (or None)
    "staleness_cap": ("async_sgd", {"staleness": "constant"}, {"on_stale": "drop", "max_staleness": 0}, "stale"),
    "norm_clip": ("async_sgd", {"staleness": "constant"}, {"on_large_norm": "clip", "max_delta_norm": 1e-4}, None),
    "both_wrappers": ("fedbuff", {"buffer_size": 2},
                      {"on_stale": "drop", "max_staleness": 0, "on_large_norm": "clip", "max_delta_norm": 1e-4},
                      "stale"),
    "fedavg_rounds": ("fedavg", {"clients_per_round": 2}, {}, "off_round"),
    "supermask_max_history": ("supermask_max", {"history": 1}, {"model": "supermask_fc"}, "base_unknown"),
}


async def start(aiohttp_client, tmp_path, strategy, params, **config):
    return await start_job(aiohttp_client, tmp_path, strategy=strategy, strategy_params=params, **config)


async def honest(client, unit, worker):
    return compute(unit, await fetch_all(client, unit), worker)


async def still_waiting(request, why: str) -> asyncio.Future:
    """``request`` started, and still unanswered 0.3 s later (``why``): the future to await once let go."""
    waiting = asyncio.ensure_future(request)
    await asyncio.sleep(0.3)
    assert not waiting.done(), why
    return waiting


def hold_up_writes(job) -> threading.Event:
    """Model writes (``Job._written_current``) wait until the returned event is set (10 s at most)."""
    gate, write = threading.Event(), job._written_current

    async def held_up():
        await asyncio.to_thread(gate.wait, 10)
        return await write()

    job._written_current = held_up
    return gate


def hold_up_folds(job) -> tuple[threading.Event, threading.Event]:
    """Folds (``Aggregator.aggregate``, run in a thread) wait until the second returned event is set (60 s at
    most); the first is set once a fold has started."""
    started, gate, fold = threading.Event(), threading.Event(), job.aggregator.aggregate

    def held_up():
        started.set()
        assert gate.wait(60), "the test never released the aggregation"
        return fold()

    job.aggregator.aggregate = held_up
    return started, gate


@pytest.mark.parametrize("case", sorted(CASES))
async def test_ledger_matches_what_the_model_folded(aiohttp_client, tmp_path, case):
    strategy, params, config, reason = CASES[case]
    client, job = await start(aiohttp_client, tmp_path, strategy, params, **config)
    v0 = {k: v.copy() for k, v in job.state.items()}
    deltas = {}
    held = [(w, await take(client, w)) for w in WORKERS]      # three units cut from one version
    for _ in range(10):
        worker, unit = held.pop(0)
        result = await honest(client, unit, worker)
        deltas[unit.unit_id] = decode_delta(result.delta)
        status, got = await post(client, unit, body(result))
        assert status == 200 and got["accepted"], got
        await job.settle()                                    # fold now, so the next results are stale
        unit = await take(client, worker)
        if unit is not None:
            held.append((worker, unit))
    await job.settle()

    rows = {r["unit_id"]: r for r in job.store.results()}
    applied = [r for r in rows.values() if r["applied_step"] is not None]
    dropped = [r for r in rows.values() if r["dropped"] is not None]
    pending = [r for r in rows.values() if r["applied_step"] is None and r["dropped"] is None]
    assert not [r for r in applied if r["dropped"] is not None], "a result both applied and dropped"
    assert len(pending) == job.aggregator.buffered, "results neither applied nor dropped are the strategy's buffer"
    if reason is not None:
        assert any(r["dropped"] == reason for r in dropped), (reason, Counter(r["dropped"] for r in dropped))
    else:
        assert not dropped

    s = await (await client.get("/api/status")).json()
    assert s["updates_applied"] == len(applied)
    assert s["updates_dropped"] == dict(Counter(r["dropped"] for r in dropped))
    assert s["updates_pending"] == len(pending)
    assert s["samples"] == sum(r["num_samples"] for r in applied) == job.store.latest_version().samples
    versions_updates = job.store.db.execute("SELECT COALESCE(SUM(updates), 0) FROM versions").fetchone()[0]
    assert versions_updates == len(applied)
    metrics = await (await client.get("/metrics")).text()
    assert f"crowdtrain_updates_applied_total {len(applied)}" in metrics

    if strategy == "async_sgd" and "max_delta_norm" not in config:
        # Downpour with constant staleness weight and server_lr 1 adds every folded delta as it is:
        # the model is version 0 plus exactly the deltas the ledger calls applied.
        for name, start_value in v0.items():
            if is_running_stat(name):
                continue
            expected = start_value + sum(deltas[r["unit_id"]][name] for r in applied)
            np.testing.assert_allclose(job.state[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)
    if config.get("on_large_norm") == "clip":
        described = job.strategy.describe()
        while "clipped" not in described:
            described = described["inner"]
        offered = [u for u, r in rows.items() if r["dropped"] != "stale"]   # past the staleness cap
        above = [u for u in offered if delta_norm(deltas[u]) > config["max_delta_norm"]]
        assert len(above) >= len(offered) // 2, "the test's bound clips most deltas"
        assert described["clipped"] == len(above), "every delta above the bound was clipped"


async def test_a_stale_result_is_rebased_on_its_bases_kept_statistics(aiohttp_client, tmp_path):
    """A stale delta's running statistics are rebased on its base version's: for a version folded here, from the
    statistics kept at its fold (``Job._stats``, equal to the version as written), without decoding the version
    (which the event loop did for every stale result)."""
    client, job = await start(aiohttp_client, tmp_path, "async_sgd", {}, model="resnet_fast",
                              version_download="fp32")   # bases as written, no fp16 copy to wait for
    first, third = await take(client, "w1"), await take(client, "w3")
    status, _ = await post(client, first, body(await honest(client, first, "w1")))
    assert status == 200
    await job.settle()
    await job.publish()   # version 1 written: the next unit is cut from it
    second = await take(client, "w2")
    assert second.base_step == 1 == job.step and 1 in job._stats
    written = decode_delta(job.store.get_blob(second.model_version))
    kept = job._stats[1]
    assert kept and set(kept) == {n for n in written if is_running_stat(n)}
    for name, value in kept.items():
        np.testing.assert_array_equal(value, written[name], err_msg=name)
    status, _ = await post(client, third, body(await honest(client, third, "w3")))
    assert status == 200
    await job.settle()
    status, got = await post(client, second, body(await honest(client, second, "w2")))   # 1 version stale
    assert status == 200 and got["accepted"]
    await job.settle()
    assert job.step == 3 and job.store.result_totals()["applied"] == 3
    assert set(job._states) == {0}, "version 1 was not decoded to rebase w2's result (0, not folded here, was: w3's)"


async def test_a_submission_is_answered_while_an_aggregation_runs(aiohttp_client, tmp_path):
    client, job = await start(aiohttp_client, tmp_path, "async_sgd", {})
    started, gate = hold_up_folds(job)
    try:
        first, second = await take(client, "w1"), await take(client, "w2")
        results = [await honest(client, first, "w1"), await honest(client, second, "w2")]
        status, got = await post(client, first, body(results[0]))
        assert status == 200 and got["accepted"]
        for _ in range(200):                                  # the aggregation task has picked it up
            if started.is_set():
                break
            await asyncio.sleep(0.05)
        assert started.is_set(), "no aggregation started after an accepted result"
        status, got = await asyncio.wait_for(post(client, second, body(results[1])), timeout=10)
        assert status == 200 and got["accepted"] and got["model_version"] == 0
        assert job.step == 0 and not gate.is_set(), "the answer came while the aggregation was still running"
    finally:
        gate.set()
    await job.settle()
    assert job.step >= 1 and job.store.result_totals()["applied"] == 2


async def test_the_tail_is_handed_out_twice_and_applied_once(aiohttp_client, tmp_path):
    """Once the budget is committed, an idle worker gets a second copy of the oldest unit another
    worker holds; the first result wins and the other is recorded as dropped ("superseded")."""
    client, job = await start(aiohttp_client, tmp_path, "async_sgd", {}, epochs=1.0)   # 4 shards of 64
    slow = [await take(client, "slow") for _ in range(4)]
    assert all(slow) and await take(client, "slow") is None, "the slow worker holds the whole budget"
    copy = await take(client, "idle")
    assert copy is not None and copy.unit_id != slow[0].unit_id and copy.shard_ids == slow[0].shard_ids
    second = await take(client, "idle")
    assert second is not None and second.shard_ids == slow[1].shard_ids, "the next oldest, not the same twice"

    status, got = await post(client, copy, body(await honest(client, copy, "idle")))
    assert status == 200 and got["accepted"], got
    status, got = await post(client, slow[0], body(await honest(client, slow[0], "slow")))
    assert status == 200 and got == {"accepted": False, "status": "superseded"}, got
    await job.settle()
    rows = {r["unit_id"]: r for r in job.store.results()}
    assert rows[copy.unit_id]["applied_step"] is not None and rows[copy.unit_id]["dropped"] is None
    assert rows[slow[0].unit_id]["dropped"] == "superseded" and rows[slow[0].unit_id]["applied_step"] is None
    s = await (await client.get("/api/status")).json()
    assert s["updates_applied"] == 1 and s["updates_dropped"] == {"superseded": 1} and s["samples"] == 64

    # the slow worker's second unit delivers first this time; the idle worker's copy is the one dropped
    status, got = await post(client, slow[1], body(await honest(client, slow[1], "slow")))
    assert status == 200 and got["accepted"], got
    status, got = await post(client, second, body(await honest(client, second, "idle")))
    assert status == 200 and got["status"] == "superseded", got
    for unit in slow[2:]:
        status, got = await post(client, unit, body(await honest(client, unit, "slow")))
        assert status == 200 and got["accepted"], got
    await job.settle()
    s = await (await client.get("/api/status")).json()
    assert s["finished"] and s["samples"] == s["budget_samples"] == 256
    assert s["updates_applied"] == 4 and s["updates_dropped"] == {"superseded": 2}


class Killed(Exception):
    """The process dies here (what ``kill -9`` would do at this point)."""


async def test_a_job_stopped_after_its_last_folds_commit_and_before_it_was_marked_finished_finishes_when_back(
        aiohttp_client, tmp_path):
    """The fold that spends the budget is committed, then the final model is written, then the job is marked
    finished: a coordinator killed during that write came back with the budget spent, nothing left to fold
    and the job never finished (CI, 2026-12-05, tests/test_e2e.py's kill -9). Opened again, its first settle
    finishes it, with the model the log replays written durably."""
    client, job = await start(aiohttp_client, tmp_path, "async_sgd", {}, epochs=1.0,   # 4 shards of 64
                              persist_every_versions=1000, persist_every_s=1e9)
    units = [await take(client, "w") for _ in range(4)]

    async def killed() -> None:
        raise Killed()
    job.persist = killed
    for unit in units:
        status, got = await post(client, unit, body(await honest(client, unit, "w")))
        assert status == 200 and got["accepted"], got
    for _ in range(40):   # (the app's own aggregation loop may fold them first, and be the one killed)
        with contextlib.suppress(Killed):
            await job.settle()
        if job.samples >= job.budget:
            break
        await asyncio.sleep(0.05)
    assert job.samples == job.budget == 256 and not job.finished and job.persisted_step == 0
    model = {k: v.copy() for k, v in job.state.items()}

    again = open_job(job.config, tiny_cifar10(n_train=256, n_test=64))
    try:
        assert again.step == job.step and not again.finished and again.persisted_step == 0
        await again.settle()
        assert again.finished and again.store.get_meta("finished") and again.persisted_step == again.step
        written = decode_delta(again.store.get_blob(again.store.version(again.step).blob))
        for name, value in model.items():
            np.testing.assert_array_equal(written[name], value, err_msg=name)
    finally:
        again.close()


def test_the_same_blob_stored_from_many_threads_at_once(tmp_path):
    """Results are logged concurrently (decoding and storing run in threads): identical bytes
    written by several threads at once end up as one intact blob."""
    from concurrent.futures import ThreadPoolExecutor

    from coordinator.store import Store

    store = Store(tmp_path)
    data = bytes(range(256)) * 4096
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda _: store.put_blob(data), range(64)))
    assert len(set(ids)) == 1 and store.get_blob(ids[0]) == data
    assert [p.name for p in (tmp_path / "blobs").iterdir()] == [ids[0]], "no temporary files left"
    store.close()


def test_the_store_remembers_its_blobs_and_versions_and_forgets_what_goes(tmp_path):
    """``Store.blob_path`` and ``Store.version`` answer from memory what the store wrote or read (a unit request
    asked for both several times), and forget a blob it deletes, a blob deleted behind its back once read, and
    the versions of a commit that rolled back; ``delete_blobs`` deletes many at once."""
    from coordinator.store import Store, Version

    store = Store(tmp_path)
    blob = store.put_blob(b"x" * 100)
    assert store.blob_path(blob) is not None and store.get_blob(blob) == b"x" * 100
    store.delete_blob(blob)
    assert store.blob_path(blob) is None and not (tmp_path / "blobs" / blob).exists()
    other = store.put_blob(b"y" * 100)
    (tmp_path / "blobs" / other).unlink()   # not by the store
    with pytest.raises(KeyError):
        store.get_blob(other)
    assert store.blob_path(other) is None
    store.commit_version(Version(1, "", 10, 1, 0.0), [], None)
    assert store.version(1).blob == ""
    store.set_version_blob(1, blob)
    assert store.version(1).blob == blob
    with pytest.raises(RuntimeError), store.transaction():
        store.commit_version(Version(2, "", 20, 2, 0.0), [], None)
        assert store.version(2) is not None
        raise RuntimeError("the commit fails")
    assert store.version(2) is None
    # many at once (a persist's): the delta log's in one commit, the files returned to unlink, durable first
    with store.transaction():
        small = [store.put_small_result(bytes([i]) * 64) for i in range(3)]
    large = store.put_result_blob(b"z" * 100)
    files = store.delete_blobs([*small, large, "not a blob id"])
    assert [f.name for f in files] == [large] and files[0].exists()
    for blob in small:
        with pytest.raises(KeyError):
            store.get_blob(blob)
    store.unlink_blobs(files)
    assert not files[0].exists() and store.blob_path(large) is None
    store.close()


def test_a_units_insert_and_a_hand_backs_move_are_put_off_and_run_in_order_before_any_other_statement(tmp_path):
    """With ``write_behind`` (the HTTP service's stores) a unit's insert and a hand-back's move leave the caller
    without a statement: the writer thread runs them; any other statement, of any thread, runs them first (a
    result's commit finds its unit's row); a closed store has run them all."""
    import sqlite3

    from coordinator.store import Store

    store = Store(tmp_path)
    store.write_behind()
    raw = sqlite3.connect(tmp_path / "state.db")
    assert store.leased_count() == 0   # (the units out, read once: from now on kept in memory)
    with store.db.later_lock:   # the writer thread cannot run them meanwhile (nor any statement: none is made)
        store.insert_unit("u1", "w1", ["s1", "s2"], 0, 0.1, 7, 100.0, 64, queue={"epoch": 1})
        assert store.unit_and_result("u1") == (store._out["u1"], False) and store.leased_count() == 1
        store.set_unit_status("u1", "returned", only_if=None, read=store.unit("u1"))
        assert len(store.db.later) == 2 and store.leased_count() == 0, "both put off"
        assert raw.execute("SELECT COUNT(*) FROM units").fetchone()[0] == 0, "nothing in the table yet"
    assert store.unit_counts() == {"returned": 1}, "a read runs them first (or waits for the writer)"
    assert raw.execute("SELECT status FROM units WHERE unit_id = 'u1'").fetchone() == ("returned",)
    assert json.loads(raw.execute("SELECT value FROM meta WHERE key = 'queue'").fetchone()[0]) == {"epoch": 1}
    # the writer never woken: a transaction's BEGIN runs what was put off before it, in order
    store._writer.wake = lambda: None
    store.insert_unit("u2", "w2", ["s3"], 0, 0.1, 8, 100.0, 32)
    assert len(store.db.later) == 1
    seq = store.add_result("u2", "w2", 0, 0, 32, 1.0, 0.5, 1.0, "")
    assert seq is not None and store.unit("u2")["status"] == "done" and not store.db.later
    with store.transaction():   # inside a transaction nothing is put off: it commits (or rolls back) with it
        store.insert_unit("u3", "w3", ["s4"], 0, 0.1, 9, 100.0, 32)
        assert not store.db.later
    store.insert_unit("u4", "w4", ["s5"], 0, 0.1, 10, 100.0, 32)
    store.close()
    assert raw.execute("SELECT unit_id, status FROM units ORDER BY unit_id").fetchall() == [
        ("u1", "returned"), ("u2", "done"), ("u3", "leased"), ("u4", "leased")], "close ran the last one"
    raw.close()


async def test_a_unit_asked_for_after_a_result_starts_from_a_model_with_it(aiohttp_client, tmp_path, monkeypatch):
    """The next unit's base includes the asker's last result (one version fresher: bench/parity_lab.py),
    and a request waits for that fold at most ``FRESH_BASE_WAIT_S``."""
    import coordinator.app as app_module

    client, job = await start(aiohttp_client, tmp_path, "async_sgd", {})
    first = await take(client, "w1")
    status, got = await post(client, first, body(await honest(client, first, "w1")))
    assert status == 200 and got["accepted"]
    second = await take(client, "w1")          # nobody called settle: the request folded it
    assert (first.base_step, second.base_step, job.step) == (0, 1, 1)

    monkeypatch.setattr(app_module, "FRESH_BASE_WAIT_S", 0.3)
    _, gate = hold_up_folds(job)
    try:
        status, got = await post(client, second, body(await honest(client, second, "w1")))
        assert status == 200 and got["accepted"]
        t0 = asyncio.get_running_loop().time()
        third = await asyncio.wait_for(take(client, "w1"), timeout=10)
        waited = asyncio.get_running_loop().time() - t0
        assert third.base_step == 1 and 0.25 <= waited < 5, waited   # cut from what was folded, not held up
    finally:
        gate.set()
    await job.settle()
    assert job.step == 2 and job.store.result_totals()["applied"] == 2


async def test_a_unit_leaves_without_an_fdatasync_and_a_results_answer_covers_its_units_row(aiohttp_client, tmp_path):
    """``units/next`` and a hand-back answer without waiting for the WAL's fdatasync (a power loss costs only
    the units of its last moments: their results are refused as ``unknown_unit``; a unit handed back is out on
    its lease again); an accepted result's answer waits for one, and that one covers every commit before it,
    the unit rows included (SQLite commits in order)."""
    client, job = await start(aiohttp_client, tmp_path, "async_sgd", {})
    await take(client, "w0")   # the first request writes version 0's blob and the job's rows
    await job.store.sync()
    syncs = job.store.syncs
    units = [await take(client, w) for w in WORKERS]
    back = units[2]
    status, got = await post(client, back, pack_result(UnitResult(
        unit_id=back.unit_id, lease=back.lease, worker_id="w3", base_version=back.model_version, delta=b"",
        loss_before=0.0, loss_after=0.0, num_samples=0, compute_seconds=1.0, error="returned: the donor paused")))
    assert status == 200 and got == {"accepted": False, "status": "returned"}, got
    assert job.store.unit(back.unit_id)["status"] == "returned"
    assert job.store.syncs == syncs and job.store.dirty, "three units out, one back, their rows written, no fdatasync"
    issued = job.store.db.total_changes
    status, got = await post(client, units[0], body(await honest(client, units[0], "w1")))
    assert status == 200 and got["accepted"]
    assert job.store.syncs > syncs and job.store._durable >= issued, "the answer waited for a covering fdatasync"


@pytest.mark.parametrize("lag_max", [4, 0])
async def test_only_a_worker_whose_result_is_in_the_newest_version_waits_for_its_write(aiohttp_client, tmp_path,
                                                                                         monkeypatch, lag_max):
    """A unit request starts the write of the newest version, but a worker with no result in it gets a unit
    cut from the last version written at once (under a stream of results every request would otherwise
    wait for a write), unless that one is more than PUBLISH_LAG_MAX folds behind; the worker whose own
    result the newest holds waits for it, and gets it."""
    import coordinator.job as job_module

    monkeypatch.setattr(job_module, "PUBLISH_LAG_MAX", lag_max)
    client, job = await start(aiohttp_client, tmp_path, "async_sgd", {})
    u1, u2 = await take(client, "w1"), await take(client, "w2")
    assert u1.base_step == u2.base_step == 0
    status, got = await post(client, u1, body(await honest(client, u1, "w1")))
    assert status == 200 and got["accepted"]
    await job.settle()
    assert (await take(client, "w1")).base_step == 1, "its own result is in version 1"
    status, got = await post(client, u2, body(await honest(client, u2, "w2")))
    assert status == 200 and got["accepted"]
    await job.settle()
    assert job.step == 2 and not job.store.version(2).blob
    gate = hold_up_writes(job)   # version 2's write takes its time
    if lag_max == 0:   # one fold behind is too far: everyone waits for the write
        waiting = await still_waiting(take(client, "w3"), "version 2 is not written yet")
        gate.set()
        assert (await asyncio.wait_for(waiting, timeout=10)).base_step == 2
        return
    try:
        others = [await asyncio.wait_for(take(client, w), timeout=5) for w in ("w3", "w1")]
        assert [u.base_step for u in others] == [1, 1], "no result of theirs in version 2: the last one written"
        own = await still_waiting(take(client, "w2"), "w2's own result is in version 2: it waits for the write")
    finally:
        gate.set()
    assert (await asyncio.wait_for(own, timeout=10)).base_step == 2
    assert job.store.version(2).blob
    assert (await take(client, "w3")).base_step == 2, "once written, the newest version for everyone"


async def test_in_a_crowded_job_no_request_waits_for_its_own_result(aiohttp_client, tmp_path, monkeypatch):
    """With ``OWN_RESULT_CROWD`` units out, a worker whose last result is logged but not folded, or folded into
    a version not yet written, gets a unit at once from what is written: one missing result adds little to
    the staleness of a unit among so many, while those waits were the slowest unit requests (bench/load.py).
    Below it, the same request waits (the test above and the one before it)."""
    import coordinator.app as app_module
    import coordinator.job as job_module

    monkeypatch.setattr(job_module, "OWN_RESULT_CROWD", 4)
    monkeypatch.setattr(app_module, "FRESH_BASE_WAIT_S", 5.0)
    client, job = await start(aiohttp_client, tmp_path, "async_sgd", {})
    units = {w: await take(client, w) for w in ("w1", "w2", "w3", "w4", "w5")}
    assert job.store.leased_count() == 5 and job.crowded()
    status, got = await post(client, units["w1"], body(await honest(client, units["w1"], "w1")))
    assert status == 200 and got["accepted"]
    await job.settle()
    assert job.step == 1 and not job.store.version(1).blob
    gate = hold_up_writes(job)   # version 1's write takes its time
    try:
        t0 = asyncio.get_running_loop().time()
        second = await asyncio.wait_for(take(client, "w1"), timeout=4)
        assert second.base_step == 0, "its own result is in version 1, not written yet: the last one written"
        assert asyncio.get_running_loop().time() - t0 < 2
    finally:
        gate.set()
    _, gate2 = hold_up_folds(job)
    try:
        status, got = await post(client, units["w2"], body(await honest(client, units["w2"], "w2")))
        assert status == 200 and got["accepted"] and job.awaits_fold("w2")
        t0 = asyncio.get_running_loop().time()
        later = await asyncio.wait_for(take(client, "w2"), timeout=4)   # FRESH_BASE_WAIT_S is 5 s
        assert asyncio.get_running_loop().time() - t0 < 2 and later.base_step <= 1, "not held up by its fold"
    finally:
        gate2.set()
    await job.settle()
    assert job.step == 2 and job.store.result_totals()["applied"] == 2


async def test_a_crowded_job_makes_a_written_versions_fp16_copy_at_once(aiohttp_client, tmp_path, monkeypatch):
    """With ``OWN_RESULT_CROWD`` units out, a version's write starts its fp16 copy (from the arrays in memory, the
    same bytes as from the version read back), before any request asks for it; below it, a write does not."""
    import coordinator.job as job_module
    from coordinator.factory import Base

    monkeypatch.setattr(job_module, "OWN_RESULT_CROWD", 4)
    client, job = await start(aiohttp_client, tmp_path, "async_sgd", {})
    units = {w: await take(client, w) for w in ("w1", "w2", "w3")}
    status, _ = await post(client, units["w1"], body(await honest(client, units["w1"], "w1")))
    assert status == 200 and not job.crowded()
    await job.settle()
    quiet = await job.publish()
    await asyncio.sleep(0.2)
    assert quiet.step == 1 and quiet.blob not in job.factory.half, "not crowded: no copy until a request wants one"
    units.update({w: await take(client, w) for w in ("w4", "w5", "w6")})
    assert job.store.leased_count() == 5 and job.crowded()   # and still once w2's result is in
    status, _ = await post(client, units["w2"], body(await honest(client, units["w2"], "w2")))
    assert status == 200
    await job.settle()
    crowded = await job.publish()
    assert crowded.step == 2
    if crowded.blob in job._halving:   # the copy started with the write (and may be made already)
        await job._halving[crowded.blob]
    assert crowded.blob in job.factory.half, "the copy was made with no request for it"
    copy = job.factory.half[crowded.blob]["blob"]
    again = job.factory.make_half(Base(crowded.step, crowded.blob))   # from the version read back
    assert copy == again, "the same fp16 bytes either way (a blob's id is its hash)"


async def test_only_a_worker_whose_result_is_in_the_newest_version_waits_for_its_fp16_copy(aiohttp_client, tmp_path):
    """A worker that holds no version gets the newest one as fp16, a copy made once per version in a thread.
    While that copy is being made, a worker with no result in the version gets a unit cut from the last
    version whose copy is made, at once; the worker whose own result the version holds waits for it."""
    client, job = await start(aiohttp_client, tmp_path, "async_sgd", {})
    u1, u2 = await take(client, "w1"), await take(client, "w2")
    for worker, unit in (("w1", u1), ("w2", u2)):
        status, got = await post(client, unit, body(await honest(client, unit, worker)))
        assert status == 200 and got["accepted"]
        await job.settle()
        if worker == "w1":
            assert (await take(client, "w1")).base_step == 1, "its own result is in version 1 (copy made)"
    assert job.step == 2
    await job.publish()   # version 2 written; its fp16 copy not made yet
    gate, make_half = threading.Event(), job.factory.make_half

    def held_up(base, state=None):
        gate.wait(10)
        return make_half(base, state)

    job.factory.make_half = held_up
    try:
        other = await asyncio.wait_for(take(client, "w3"), timeout=5)
        assert other.base_step == 1 and other.model_version == job.factory.half[job.store.version(1).blob]["blob"]
        own = await still_waiting(take(client, "w2"), "w2's own result is in version 2: it waits for its copy")
    finally:
        gate.set()
    assert (await asyncio.wait_for(own, timeout=10)).base_step == 2
    assert (await take(client, "w3")).base_step == 2, "once its copy is made, the newest version for everyone"


async def test_a_version_delta_is_made_for_one_request_at_a_time_the_others_get_the_whole_version(aiohttp_client,
                                                                                                   tmp_path,
                                                                                                   monkeypatch):
    """Warm workers name the version they hold, and a unit carries a version delta from it, made per held and new
    version in a thread (50-65 ms of a core for resnet_fast): while one is being made, another
    request that would need its own is answered with the whole version as fp16 (bench/load.py --held)."""
    import coordinator.job as job_module
    from contract.units import WorkUnit

    monkeypatch.setattr(job_module, "PUBLISH_LAG_MAX", 0)   # the newest version for everyone, not the last copied
    client, job = await start(aiohttp_client, tmp_path, "async_sgd", {})

    async def ask(worker, held):
        resp = await client.post("/api/v1/units/next", json={"protocol": 1, "worker_id": worker, "backend": "python",
                                                             "held": [held]}, headers={WORKER_KEY_HEADER: key_of(worker)})
        assert resp.status == 200, await resp.text()
        return WorkUnit.from_json(await resp.json())

    first = {w: await take(client, w) for w in ("w1", "w2", "w3")}   # all from version 0 (its fp16 copy)
    status, got = await post(client, first["w1"], body(await honest(client, first["w1"], "w1")))
    assert status == 200 and got["accepted"]
    await job.settle()
    assert job.step == 1
    await job.publish()
    gate, make_pair = threading.Event(), job.factory.make_pair

    def held_up(held, base):
        gate.wait(10)
        return make_pair(held, base)

    job.factory.make_pair = held_up
    try:
        waiting = await still_waiting(ask("w2", first["w2"].model_version), "the version delta for w2 is being made")
        other = await asyncio.wait_for(ask("w3", first["w3"].model_version), timeout=5)
        assert other.base_step == 1 and other.base_delta is None
        assert other.model_version == job.factory.half[job.store.version(1).blob]["blob"], "the whole version, fp16"
    finally:
        gate.set()
    unit = await asyncio.wait_for(waiting, timeout=10)
    assert unit.base_step == 1 and unit.base_delta is not None and unit.base_delta["from"] == first["w2"].model_version


async def test_one_model_write_at_a_time_and_the_versions_folded_meanwhile_are_skipped(aiohttp_client, tmp_path):
    """Under a stream of folds the newest version's write is not repeated for every version: while one write
    is in flight, the versions folded meanwhile are not written one by one; when it ends, one write of the
    newest serves every request that waits for a newer one. Each worker whose own result was folded gets a
    base that holds it."""
    client, job = await start(aiohttp_client, tmp_path, "async_sgd", {})
    workers = ("w1", "w2", "w3", "w4")
    units = {w: await take(client, w) for w in workers}
    assert {u.base_step for u in units.values()} == {0}
    gate, writes = threading.Event(), []

    async def held_up():   # as Job._written_current (the version as it is now), each write held up by the gate
        step, state = job.step, job.state
        writes.append(step)
        await asyncio.to_thread(gate.wait, 10)
        return step, await asyncio.to_thread(job.store.put_blob, encode_delta(get_codec("fp32"), state))

    job._written_current = held_up
    waiting = {}
    try:
        for w in workers:
            status, got = await post(client, units[w], body(await honest(client, units[w], w)))
            assert status == 200 and got["accepted"]
            await job.settle()
            waiting[w] = (job.step, asyncio.ensure_future(take(client, w)))   # its own result is in job.step
            await asyncio.sleep(0.2)
            assert not waiting[w][1].done(), "its own result is in a version not yet written: it waits"
    finally:
        gate.set()
    got = {w: await asyncio.wait_for(f, timeout=10) for w, (_, f) in waiting.items()}
    assert job.step == 4
    assert all(got[w].base_step >= own for w, (own, _) in waiting.items()), "a base that holds its own result"
    assert writes == [1, 4], "the write in flight (version 1), then one of the newest (4); 2 and 3 skipped"
    assert not job.store.version(2).blob and not job.store.version(3).blob
    assert [got[w].base_step for w in workers] == [1, 4, 4, 4]


def test_a_results_delta_has_a_blob_of_its_own(tmp_path):
    """A result's delta is stored under a fresh random id (``put_result_blob``: not hashed); the same
    bytes twice are two blobs, and deleting one leaves the other. Model versions and shards stay
    content-addressed (a worker checks their sha256)."""
    from contract.units import is_blob_id
    from coordinator.store import Store

    store = Store(tmp_path)
    data = bytes(range(256)) * 64
    first, second = store.put_result_blob(data), store.put_result_blob(memoryview(data)[16:])
    assert is_blob_id(first) and is_blob_id(second) and len({first, second, blob_id(data)}) == 3
    assert store.get_blob(first) == data and store.get_blob(second) == data[16:]
    store.delete_blob(first)
    assert store.blob_path(first) is None and store.get_blob(second) == data[16:]
    assert store.put_blob(data) == blob_id(data) and store.get_blob(blob_id(data)) == data
    assert sorted(p.name for p in (tmp_path / "blobs").iterdir()) == sorted([second, blob_id(data)])
    store.close()


async def test_a_delta_with_the_bytes_of_a_model_version_does_not_take_that_version_with_it(aiohttp_client,
                                                                                             tmp_path):
    """A worker that sends the bytes of its unit's base model as its delta (a valid fp32 container of
    the model's tensors): once its result is folded into a persisted version, its delta's blob is
    deleted, and with it, were result blobs named by their content, the base model that a unit still
    leased from that version must download."""
    client, job = await start(aiohttp_client, tmp_path, "async_sgd", {}, on_large_norm="clip",
                              max_delta_norm=1.0, persist_every_versions=1)
    unit, other = await take(client, "w1"), await take(client, "w2")
    assert unit.model_version == other.model_version
    base = await (await client.get(f"/api/v1/blobs/{unit.model_version}")).read()
    result = await honest(client, unit, "w1")
    status, got = await post(client, unit, pack_result(UnitResult(
        unit_id=result.unit_id, lease=result.lease, worker_id=result.worker_id, base_version=result.base_version,
        delta=base, loss_before=2.3, loss_after=2.2, num_samples=result.num_samples, compute_seconds=1.0)))
    assert status == 200 and got["accepted"], got
    await job.settle()
    assert job.step == 1 and job.persisted_step == 1
    assert (await client.get(f"/api/v1/blobs/{other.model_version}")).status == 200, "w2's base is gone"


@pytest.mark.parametrize("refused", [False, True])
def test_a_large_blob_is_written_past_the_page_cache_or_through_it_where_refused(tmp_path, monkeypatch, refused):
    """A result blob or a downloadable blob (a model version) of ``DIRECT_MIN`` bytes or more is written
    with O_DIRECT (its whole 4 KiB blocks, in pieces, from any view of the body; the tail through the page
    cache) and fsynced; where the filesystem refuses O_DIRECT (tmpfs: EINVAL) it is written as before, and
    O_DIRECT is not tried again."""
    import errno
    import os

    from coordinator import store as store_module

    monkeypatch.setitem(store_module._direct, "on", True)
    monkeypatch.setattr(store_module, "DIRECT_PIECE", 3 * store_module.DIRECT_ALIGN)   # several pieces
    opened, synced, real_open, real_fsync = [], [], os.open, os.fsync

    def recording_open(path, flags, *args):
        opened.append(flags)
        if refused and flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(store_module.os, "open", recording_open)
    monkeypatch.setattr(store_module.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    store = store_module.Store(tmp_path)
    data = bytes(range(256)) * (store_module.DIRECT_MIN // 256 + 50) + b"tail"
    body = b"CTR1 metadata" + data
    first = store.put_result_blob(memoryview(body)[13:])   # not 4 KiB aligned, as a delta in its body is
    assert store.get_blob(first) == data and synced
    assert any(f & os.O_DIRECT for f in opened)
    assert store_module._direct["on"] is (not refused)
    opened.clear()
    small = store.put_result_blob(b"CTD1 small")   # below DIRECT_MIN: through the page cache
    assert store.get_blob(small) == b"CTD1 small" and not any(f & os.O_DIRECT for f in opened)
    second = store.put_result_blob(data)
    assert store.get_blob(second) == data and any(f & os.O_DIRECT for f in opened) is (not refused)
    opened.clear()
    version = store.put_blob(data + b"version")   # named by its content, as a worker checks it
    assert store.get_blob(version) == data + b"version" and version == blob_id(data + b"version")
    assert any(f & os.O_DIRECT for f in opened) is (not refused)
    opened.clear()
    shard = store.put_blob(b"a shard")   # below DIRECT_MIN: through the page cache
    assert store.get_blob(shard) == b"a shard" and not any(f & os.O_DIRECT for f in opened)
    assert sorted(p.name for p in (tmp_path / "blobs").iterdir()) == sorted([first, small, second, version, shard])
    store.close()


def test_small_results_deltas_go_to_the_delta_log_synced_before_the_wal_and_segments_go_when_unnamed(
        tmp_path, monkeypatch):
    """A delta below ``SMALL_RESULT_MAX`` bytes is appended to a segment of the delta log with its place in
    ``result_deltas`` (no file of its own): read back from any thread, synced before the WAL whose commit
    names it, deleted with its row; a segment no longer appended to goes once no row names it, and on open
    every segment no row names goes."""
    import os

    from coordinator import store as store_module

    monkeypatch.setattr(store_module, "SEGMENT_BYTES", 2500)   # a new segment every third delta here
    synced: list[str] = []
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(store_module.os, "fdatasync",
                        lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fdatasync(fd))
    store = store_module.Store(tmp_path)
    synced.clear()   # opening syncs the WAL
    datas = [bytes([i]) * 1000 for i in range(7)]
    ids = []
    for data in datas:
        with store.transaction():
            ids.append(store.put_small_result(memoryview(data)))
    assert len(set(ids)) == 7 and list((tmp_path / "blobs").iterdir()) == []
    segments = sorted(int(p.stem) for p in (tmp_path / "deltas").glob("*.log"))
    assert segments == [1, 2, 3], segments
    assert [store.get_blob(i) for i in ids] == datas
    got = {}
    reader = threading.Thread(target=lambda: got.update(data=[store.get_blob(i) for i in ids]))
    reader.start()
    reader.join()
    assert got["data"] == datas, "read back from another thread"

    store.sync_now()
    assert [os.path.basename(p) for p in synced] == ["1.log", "2.log", "3.log", "state.db-wal"], synced
    with store.transaction():
        store.put_small_result(b"late")
    synced.clear()
    store.sync_now()
    assert [os.path.basename(p) for p in synced] == ["3.log", "state.db-wal"], "the segment, then the WAL"

    for i in ids[:3]:   # every delta in segment 1: it goes
        store.delete_blob(i)
    assert sorted(int(p.stem) for p in (tmp_path / "deltas").glob("*.log")) == [2, 3]
    for i in ids[6:]:   # segment 3 is appended to: it stays, empty or not
        store.delete_blob(i)
    assert (tmp_path / "deltas" / "3.log").exists()
    with pytest.raises(KeyError):
        store.get_blob(ids[0])
    assert store.get_blob(ids[3]) == datas[3]
    store.close()

    (tmp_path / "deltas" / "9.log").write_bytes(b"bytes of a commit that never came")
    again = store_module.Store(tmp_path)
    assert [again.get_blob(i) for i in ids[3:6]] == datas[3:6], "read back after reopening"
    assert sorted(int(p.stem) for p in (tmp_path / "deltas").glob("*.log")) == [2, 3], "9.log: no row names it"
    with again.transaction():
        new = again.put_small_result(b"after")
    assert again.get_blob(new) == b"after" and (tmp_path / "deltas" / "4.log").exists(), "a segment of its own"
    again.close()


def test_delete_blobs_returns_an_emptied_segment_to_unlink_and_leaves_it_until_then(tmp_path, monkeypatch):
    """``delete_blobs`` (a persist's deletions, on the event loop) neither syncs nor unlinks: a segment no row
    names any more is among the files it returns, and ``unlink_blobs`` (a thread) makes every commit durable,
    then deletes it."""
    from coordinator import store as store_module

    monkeypatch.setattr(store_module, "SEGMENT_BYTES", 2500)   # a new segment every third delta
    store = store_module.Store(tmp_path)
    ids = []
    for i in range(4):
        with store.transaction():
            ids.append(store.put_small_result(bytes([i]) * 1000))
    first = tmp_path / "deltas" / "1.log"
    syncs = store.syncs
    files = store.delete_blobs(ids[:3])
    assert files == [first] and first.exists() and store.syncs == syncs, (files, store.syncs - syncs)
    assert store.delete_blobs(ids[3:]) == [], "the segment appended to stays"
    store.unlink_blobs(files)
    assert not first.exists() and store.syncs == syncs + 1
    assert (tmp_path / "deltas" / "2.log").exists()
    store.close()


async def test_a_small_results_delta_is_logged_with_its_row_and_goes_once_a_persisted_version_covers_it(
        aiohttp_client, tmp_path):
    """In a job: an accepted result whose delta is below ``SMALL_RESULT_MAX`` bytes has no blob file; its
    delta is in the delta log, read back as sent, until a persisted version folds it in."""
    from coordinator.store import SMALL_RESULT_MAX

    client, job = await start(aiohttp_client, tmp_path, "async_sgd", {}, persist_every_versions=2, codec="topk")
    units = [await take(client, w) for w in ("w1", "w2")]
    results = [await honest(client, u, w) for u, w in zip(units, ("w1", "w2"))]
    assert all(len(r.delta) < SMALL_RESULT_MAX for r in results)
    status, got = await post(client, units[0], body(results[0]))
    assert status == 200 and got["accepted"], got
    row = job.store.db.execute("SELECT delta_blob FROM results").fetchone()
    assert job.store.blob_path(row[0]) is None and job.store.get_blob(row[0]) == bytes(results[0].delta)
    await job.settle()
    assert job.step == 1 and job.persisted_step == 0, "folded, not yet persisted: the delta stays for a replay"
    assert job.store.get_blob(row[0]) == bytes(results[0].delta)
    status, got = await post(client, units[1], body(results[1]))
    assert status == 200 and got["accepted"], got
    await job.settle()
    assert job.persisted_step == 2
    assert job.store.db.execute("SELECT COUNT(*) FROM result_deltas").fetchone()[0] == 0, "both decided and persisted"
    with pytest.raises(KeyError):
        job.store.get_blob(row[0])
