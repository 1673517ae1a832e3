"""A bounded load test (bench/load.py, smaller): 200 concurrent protocol clients against a real
coordinator process on 127.0.0.1 for 20 s (resnet_fast, top-k deltas), each holding a unit 2 s and
handing it back, or (one unit in five, at random) answering it with a real result, and naming the
base of its last unit as held, as a warm worker does (so units carry version deltas).

Asserts what an operator relies on under load: no errors (no 5xx, no refused or timed-out
connection, no unexpected 4xx), every route's p99 under a generous bound for a shared 2-core
machine (the issue's targets, measured with 1,000 clients, are in docs/results.md), results
accepted, and the coordinator's memory growing by less than a bound after warm-up. Needs the
real CIFAR-10 (CROWDTRAIN_DATA).
"""
from __future__ import annotations

import os

import pytest

from bench.load import run_load

pytestmark = pytest.mark.timeout(300)

# Generous bounds for a shared 2-core machine (the bench's target is 50 ms for units/next). A result
# waits for its update to be folded and the new version published, so its bound is wider: CI measured
# its p99 at 1,013 ms once (stop 23) while units/next stayed under 1 s; the pathologies these guard
# against were 8-28 s (docs/results.md, "load").
P99_BOUND_MS = {"units/next": 1000, "hand_back": 1000, "result": 2500,
                "units/next after own result": 1000, "units/next other": 1000}   # units/next, split in two
RSS_GROWTH_MB = 80       # from 5 s of load on (start-up work done before the clients start), over 15 s: a gross leak


@pytest.mark.skipif(not os.environ.get("CROWDTRAIN_DATA"),
                    reason="set CROWDTRAIN_DATA to the folder or archive of CIFAR-10 (e.g. ../shared/data)")
def test_200_clients_no_errors_bounded_latency_and_memory(tmp_path):
    r = run_load(clients_n=200, duration=20, hold=2.0, model="resnet_fast", limit_train=2000, results_every=5,
                 warmup=5.0, sample_s=1.0, extra=["--codec", "topk", "--browser-graph", "on-demand"],
                 workdir=tmp_path, held=True)   # protocol clients only: no browser graph (a cold cache exported it)
    assert r["errors"] == 0, r["error_examples"]
    # warm clients: some units carry a version delta (one is made at a time; the others get the version as fp16,
    # where each request waiting for its own delta queued them for 20-30 s at 1,000 clients: docs/results.md)
    assert r["units_with_version_delta"] >= 20, r["units_with_version_delta"]
    assert not r["coordinator_log_errors"], r["coordinator_log_errors"]
    routes = r["routes"]
    assert routes["units/next"]["all"]["n"] >= 500, routes["units/next"]
    assert routes["hand_back"]["all"]["n"] >= 200 and routes["result"]["all"]["n"] >= 50, routes
    assert r["accepted"] + sum(r["refused"].values()) == routes["result"]["all"]["n"], "accepted or refused by design"
    assert r["units"]["units_accepted"] == r["accepted"]
    # the coordinator's own histogram (/metrics) saw each of these requests under its route template
    server = r["server"]
    assert server["POST /api/v1/units/next"]["n"] == routes["units/next"]["all"]["n"], server
    assert routes["units/next after own result"]["all"]["n"] + routes["units/next other"]["all"]["n"] == \
        routes["units/next"]["all"]["n"] and routes["units/next after own result"]["all"]["n"] >= r["accepted"] - 200
    assert server["POST /api/v1/units/{unit_id}/result"]["n"] == (routes["result"]["all"]["n"]
                                                                   + routes["hand_back"]["all"]["n"]), server
    assert r["loop_lag"]["n"] >= 500, r["loop_lag"]   # the event loop's 20-ms ticks over the run, from /metrics
    for route, v in routes.items():
        assert set(v["statuses"]) <= {"200", "204", "409"}, (route, v["statuses"])   # 409: too stale, by design
        assert v["all"]["p99_ms"] < P99_BOUND_MS[route], (route, v["all"])
    growth = r["rss_summary"]["growth_after_warmup"]
    assert growth is not None and growth < RSS_GROWTH_MB, r["rss_mb"]


@pytest.mark.skipif(not os.environ.get("CROWDTRAIN_DATA"),
                    reason="set CROWDTRAIN_DATA to the folder or archive of CIFAR-10 (e.g. ../shared/data)")
def test_100_clients_through_caddy_to_two_redis_processes(tmp_path):
    """The deployment's path under load (bench/load.py --caddy --redis 2): Debian's Caddy with the project's
    Caddyfile (TLS from its internal CA, least_conn, health checks) in front of two Redis-backed processes;
    no errors, every request answered through Caddy as the protocol allows, results accepted and folded."""
    from tests.helpers.redis_server import REDIS
    from tests.test_deploy import CADDY

    if REDIS is None or CADDY is None:
        pytest.skip("needs redis-server and caddy (bash deploy/setup.sh --test installs Debian's)")
    r = run_load(clients_n=100, duration=15, hold=1.0, model="resnet_fast", limit_train=2000, results_every=3,
                 warmup=5.0, sample_s=1.0, extra=["--codec", "topk", "--browser-graph", "on-demand"],
                 workdir=tmp_path, redis=2, caddy=True)
    assert r["errors"] == 0, r["error_examples"]
    assert not r["coordinator_log_errors"], r["coordinator_log_errors"]
    routes = r["routes"]
    assert routes["result"]["all"]["n"] >= 30 and r["accepted"] >= 20, routes
    for route, v in routes.items():
        assert set(v["statuses"]) <= {"200", "204", "409"}, (route, v["statuses"])
    server = r["server"]   # both processes' histograms: every unit request reached one of them through Caddy
    assert server["POST /api/v1/units/next"]["n"] >= routes["units/next"]["all"]["n"], server
    assert r["units"]["units_accepted"] == r["accepted"] and r["units"]["updates_applied"] >= 1, r["units"]


def test_leased_view_in_memory_matches_the_table(tmp_path):
    """What is out on a lease is kept in memory (asked on every unit request, 1,000 rows a time under
    load): after issuing, expiring, superseding, finishing, handing back and a rolled-back transaction
    it says what the units table says."""
    import json

    from coordinator.store import Store

    store = Store(tmp_path)

    def from_table() -> tuple[list[str], int]:
        rows = store.db.execute("SELECT shard_ids, samples, replica_of FROM units WHERE status = 'leased'").fetchall()
        return sorted({s for r in rows for s in json.loads(r[0])}), sum(n for _, n, r in rows if r is None)

    def check() -> None:
        assert (sorted(store.leased_shards()), store.leased_samples()) == from_table()

    for i in range(8):
        store.insert_unit(f"u{i}", f"w{i % 3}", [f"s{i % 4}", f"s{(i + 1) % 4}"], 0, 0.1, i, 100.0 + i, 10 + i)
        check()
    store.insert_unit("r0", "w9", ["s0", "s1"], 0, 0.1, 0, 500.0, 10, replica_of="u0")
    check()
    store.expire_leases(101.5)                       # u0, u1
    check()
    store.supersede("u2")
    check()
    store.add_result("u3", "w0", 0, 0, 13, 2.3, 2.2, 1.0, "b" * 64)
    check()
    store.set_unit_status("u4", "returned", only_if=None)
    check()
    try:
        with store.transaction():
            store.insert_unit("x", "w1", ["s3"], 0, 0.1, 1, 900.0, 5)
            raise RuntimeError("rolled back")
    except RuntimeError:
        pass
    check()
    assert "x" not in {u for (u,) in store.db.execute("SELECT unit_id FROM units")}
    store.close()
