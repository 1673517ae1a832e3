"""``/metrics`` through prometheus_client, the request histogram per route template, process memory,
and the JSON access log (coordinator/observe.py), over real HTTP on 127.0.0.1 (pytest-aiohttp)."""
from __future__ import annotations

import json
import logging
import math

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from coordinator.app import ROUTES
from coordinator.config import CoordinatorConfig, OptionError
from coordinator.observe import ACCESS_LOG, REQUEST_SECONDS, Observer, quantile, request_latency, status_class
from tests.test_coordinator import client_for, take_unit

RESULT_ROUTE = "/api/v1/units/{unit_id}/result"


serve = client_for   # a job on tiny data behind the real app (tests/test_coordinator.py's fixture)


async def scrape(client, **headers) -> tuple[dict, str]:
    resp = await client.get("/metrics", headers=headers)
    assert resp.status == 200
    text = await resp.text()
    return {f.name: f for f in text_string_to_metric_families(text)}, resp.headers["Content-Type"]


def request_series(families: dict) -> list[dict[str, str]]:
    """The label sets of the request histogram's ``_count`` samples."""
    return [s.labels for s in families[REQUEST_SECONDS].samples if s.name == REQUEST_SECONDS + "_count"]


def count_of(families: dict, route: str, method: str, status: str) -> float:
    matches = [s.value for s in families[REQUEST_SECONDS].samples if s.name == REQUEST_SECONDS + "_count"
               and s.labels == {"route": route, "method": method, "status": status}]
    assert len(matches) <= 1
    return matches[0] if matches else 0.0


async def test_metrics_parse_with_the_job_process_memory_and_content_type(serve):
    client, job = await serve()
    await take_unit(client)
    families, content_type = await scrape(client)
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    # the job's families under today's names (prometheus_client's parser strips a counter's _total)
    issued = families["crowdtrain_units_issued"]
    assert issued.type == "counter" and issued.samples[0].name == "crowdtrain_units_issued_total"
    assert issued.samples[0].value == 1
    assert families["crowdtrain_info"].samples[0].labels == {"job": job.config.job, "model": "cnn",
                                                             "strategy": "async_sgd"}
    assert families["crowdtrain_staleness"].type == "histogram"
    rss = families["process_resident_memory_bytes"].samples[0].value
    assert 10e6 < rss < 64e9, rss
    assert families[REQUEST_SECONDS].type == "histogram"
    assert count_of(families, "/api/v1/units/next", "POST", "2xx") == 1


async def test_a_scraper_that_accepts_gzip_gets_gzip(serve):
    client, _ = await serve()
    resp = await client.get("/metrics", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    assert resp.headers["Content-Encoding"] == "gzip"
    import gzip
    assert b"crowdtrain_units_issued_total" in gzip.decompress(await resp.read())
    plain = await client.get("/metrics", headers={"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in plain.headers


async def test_openmetrics_is_served_when_asked_for(serve):
    client, _ = await serve()
    resp = await client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    text = await resp.text()
    assert resp.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert text.endswith("# EOF\n")
    names = {f.name for f in parse_openmetrics(text)}
    assert {"crowdtrain_units_issued", "process_resident_memory_bytes", REQUEST_SECONDS} <= names


async def test_a_templated_route_is_counted_under_its_template(serve):
    client, _ = await serve()
    resp = await client.post("/api/v1/units/u-not-a-unit/result", data=b"junk",
                             headers={"Content-Type": "application/octet-stream"})
    assert 400 <= resp.status < 500
    families, _ = await scrape(client)
    assert count_of(families, RESULT_ROUTE, "POST", "4xx") == 1
    assert not any("u-not-a-unit" in v for labels in request_series(families) for v in labels.values())


async def test_route_labels_stay_bounded(serve):
    """50 unit ids, 50 paths nobody routes, odd methods: the series are the templates, not the paths."""
    client, _ = await serve()
    for i in range(50):
        await client.post(f"/api/v1/units/unit-{i:03d}/result", data=b"x",
                          headers={"Content-Type": "application/octet-stream"})
        assert (await client.get(f"/no/such/path/{i}")).status == 404
        await client.get(f"/api/v1/blobs/{i:064x}")
    await client.request("FROB", "/api/status")
    families, _ = await scrape(client)
    series = request_series(families)
    routes = {labels["route"] for labels in series}
    templates = {path.replace("{path:.+}", "{path}") for _, path, _ in ROUTES} | {"/dashboard/{filename}"}
    assert routes <= templates | {"unmatched"}, routes - templates
    assert {RESULT_ROUTE, "/api/v1/blobs/{blob_id}", "unmatched"} <= routes
    assert count_of(families, RESULT_ROUTE, "POST", "4xx") == 50
    assert count_of(families, "unmatched", "GET", "4xx") == 50
    assert count_of(families, "/api/v1/blobs/{blob_id}", "GET", "4xx") == 50
    assert {labels["method"] for labels in series} <= {"GET", "POST", "other"}
    assert len(series) <= 6, series


async def test_access_log_is_one_json_line_per_request(serve, caplog):
    client, _ = await serve(access_log="json")
    caplog.set_level(logging.INFO, logger=ACCESS_LOG.name)
    await take_unit(client, worker="w-log")
    await client.get("/api/v1/blobs/" + "ab" * 32, headers={"X-Forwarded-For": "203.0.113.9, 198.51.100.7"})
    lines = [r.getMessage() for r in caplog.records if r.name == ACCESS_LOG.name]
    assert len(lines) == 2, lines
    unit, blob = (json.loads(line) for line in lines)
    assert set(unit) == {"time", "method", "route", "status", "duration_ms", "bytes", "client"}
    assert unit["method"] == "POST" and unit["route"] == "/api/v1/units/next" and unit["status"] == 200
    assert unit["time"].endswith("Z") and unit["duration_ms"] > 0 and unit["bytes"] > 100
    assert unit["client"] == "127.0.0.1"
    # the peer is loopback (a local proxy): the client is the last address the proxy appended
    assert blob["route"] == "/api/v1/blobs/{blob_id}" and blob["status"] == 404
    assert blob["client"] == "198.51.100.7"


async def test_access_log_is_off_by_default(serve, caplog):
    client, job = await serve()
    assert job.config.access_log == "off"
    caplog.set_level(logging.INFO, logger=ACCESS_LOG.name)
    assert (await client.get("/api/status")).status == 200
    assert [r for r in caplog.records if r.name == ACCESS_LOG.name] == []


def test_access_log_option_is_checked():
    with pytest.raises(OptionError, match="access_log"):
        CoordinatorConfig(state="s", access_log="xml")
    with pytest.raises(ValueError, match="access_log"):
        Observer(None, "yes")


def test_apps_in_one_process_have_their_own_registries():
    first, second = Observer(lambda: {"units_issued": 1}), Observer(lambda: {"units_issued": 2})
    assert first.registry is not second.registry
    assert first.registry.get_sample_value("crowdtrain_units_issued_total") == 1
    assert second.registry.get_sample_value("crowdtrain_units_issued_total") == 2
    assert Observer(None).registry.get_sample_value("crowdtrain_units_issued_total") is None   # no job there


def test_quantile_interpolates_like_prometheus():
    buckets = [(0.01, 50.0), (0.05, 90.0), (0.1, 100.0), (math.inf, 100.0)]
    assert quantile(buckets, 0.5) == pytest.approx(0.01)
    assert quantile(buckets, 0.7) == pytest.approx(0.03)     # 20 of the 40 between 10 and 50 ms
    assert quantile(buckets, 0.99) == pytest.approx(0.095)
    assert quantile([(0.01, 1.0), (math.inf, 10.0)], 0.99) == 0.01   # in +Inf: the highest finite bound
    assert quantile([(0.01, 0.0), (math.inf, 0.0)], 0.5) is None
    assert [status_class(s) for s in (200, 204, 404, 499, 503, 42)] == ["2xx", "2xx", "4xx", "4xx", "5xx", "other"]


async def test_request_latency_sums_processes(serve):
    client, _ = await serve()
    for _ in range(3):
        await take_unit(client, worker="w-sum")
    text = await (await client.get("/metrics")).text()
    one = request_latency([text])["POST /api/v1/units/next"]
    two = request_latency([text, text])["POST /api/v1/units/next"]
    assert one["n"] == 3 and two["n"] == 6 and one["statuses"] == {"2xx": 3}
    assert one["p50_ms"] == two["p50_ms"] and 0 < one["p50_ms"] <= one["p99_ms"]


async def test_api_status_has_this_process_unit_request_latency(serve):
    """What the dashboard shows: units/next p50 / p99 of this process since it started."""
    client, _ = await serve()
    await take_unit(client, worker="w-a")
    await take_unit(client, worker="w-b")
    status = await (await client.get("/api/status")).json()
    latency = status["request_latency"]
    assert set(latency) == {"POST /api/v1/units/next"}, "only the work routes, and only those requested"
    row = latency["POST /api/v1/units/next"]
    assert row["n"] == 2 and row["statuses"] == {"2xx": 2} and 0 < row["p50_ms"] <= row["p99_ms"]


async def test_the_event_loop_lag_is_measured_and_a_blocked_loop_shows(serve):
    """``crowdtrain_event_loop_lag_seconds`` counts the watch's ticks, and a callback that holds the loop
    150 ms shows as one tick at least 0.1 s late (``loop_lag`` reads it back as bench/load.py does)."""
    import asyncio
    import time

    from coordinator.observe import LOOP_LAG_SECONDS, loop_lag

    client, _ = await serve()
    await asyncio.sleep(0.3)
    families, _ = await scrape(client)
    late = {s.labels["le"]: s.value for s in families[LOOP_LAG_SECONDS].samples
            if s.name == LOOP_LAG_SECONDS + "_bucket"}
    assert late["+Inf"] >= 5   # ticks of 20 ms in 0.3 s
    before = late["+Inf"] - late["0.1"]   # ticks 0.1 s late or more
    time.sleep(0.15)   # the loop held
    await asyncio.sleep(0.1)
    resp = await client.get("/metrics")
    text = await resp.text()
    late = {s.labels["le"]: s.value for f in text_string_to_metric_families(text) if f.name == LOOP_LAG_SECONDS
            for s in f.samples if s.name == LOOP_LAG_SECONDS + "_bucket"}
    assert late["+Inf"] - late["0.1"] >= before + 1
    assert loop_lag([text])["n"] == late["+Inf"] and loop_lag(["# nothing\n"]) is None


def test_a_coordinator_process_freezes_its_start_up_objects_once_its_start_up_work_is_done(tmp_path):
    """A real ``crowdtrain coordinator``: once version 0 is evaluated (and the assets prepared) the objects alive
    then are left out of the garbage collector's full passes (``gc.freeze``), and ``/metrics`` says how many."""
    import time
    import urllib.request

    from coordinator.observe import FROZEN_OBJECTS
    from tests.helpers.cluster import Cluster
    from tests.helpers.tiny_cifar import write_official_archive

    data = write_official_archive(tmp_path / "data", n_train=100, n_test=20)
    c = Cluster(tmp_path, "--model", "cnn", "--data", str(data), "--shard-size", "50", "--eval-every", "3600")
    frozen = 0.0
    try:
        c.start_coordinator()
        deadline = time.time() + 90
        while time.time() < deadline and frozen == 0:
            with urllib.request.urlopen(c.url + "/metrics", timeout=10) as r:
                families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
            frozen = families[FROZEN_OBJECTS].samples[0].value
            time.sleep(0.5)
        assert c.status()["accuracy_history"], "frozen after version 0's evaluation"
    finally:
        c.stop()
    assert frozen > 50_000, f"{FROZEN_OBJECTS} = {frozen}: expected the imports' objects (torch alone: ~100,000)"
