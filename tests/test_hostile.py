"""Hostile input on every route of docs/protocol.md gets a 4xx JSON error naming the problem,
never a 5xx, and never a traceback in the log.

Property-based (hypothesis), against the real app (pytest-aiohttp's ``aiohttp_client``, a real
SQLite store, a job on tiny data): random bytes, deep and huge JSON, wrong types, numbers out
of range, unknown fields, non-UTF-8 text, odd path segments, query strings and headers.
Bounded: a fixed number of examples per route, derandomized (the same examples every run), no
example database written; the whole file runs in a few seconds. Inputs that would start real
work (a browser's step-graph export, a model export) are left out: those routes' valid paths
are tested in their own files.
"""
from __future__ import annotations

import asyncio
import gzip
import json
import logging
import string
from urllib.parse import quote

import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.app import JSON_MAX_DEPTH, REQUEST_MAX_BYTES, SERVER_ARGS, create_app
from coordinator.config import CoordinatorConfig
from coordinator.job import Job
from tests.helpers.tiny_cifar import tiny_cifar10

EXAMPLES = 40
HOSTILE = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MODEL = "cnn"
VALID_REQUEST = {"protocol": 1, "worker_id": "w1", "backend": "python", "codecs": ["fp32"], "models": []}


@pytest.fixture
async def app_client(aiohttp_client, tmp_path, caplog):
    cfg = CoordinatorConfig(state=tmp_path / "state", model=MODEL, shard_size=64, epochs=4.0, eval_every_s=3600.0,
                            codec="fp32")
    job = Job(cfg)
    job.open(tiny_cifar10(n_train=256, n_test=64))
    caplog.set_level(logging.WARNING)
    server = TestServer(create_app(cfg, job))
    await server.start_server(**SERVER_ARGS)   # as the coordinator's servers (aiohttp_client drops server_kwargs)
    client = await aiohttp_client(server)
    yield client, job
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, [f"{r.name}: {r.getMessage()}" for r in errors]


LINE_MAX = 8190   # aiohttp's max_line_size: a longer request line is refused by its parser, before any route


async def check(resp, what) -> None:
    """Below 500; a 4xx is the protocol's JSON error body (code, field, message), no traceback. A request line
    over ``LINE_MAX`` gets aiohttp's own plain 400 (test_a_request_aiohttp_cannot_parse_is_a_400_and_one_log_line)."""
    raw = await resp.read()
    assert resp.status < 500, (what, resp.status, raw[:300])
    if len(resp.request_info.url.raw_path_qs) + len(resp.request_info.method) + 10 > LINE_MAX:
        assert resp.status == 400 and b"Traceback" not in raw, (what, resp.status, raw[:300])
        return
    if resp.status >= 400:
        text = raw.decode()
        assert "Traceback" not in text, what
        error = json.loads(text)["error"]
        assert set(error) == {"code", "field", "message"}, (what, error)
        assert error["code"] and error["message"] and isinstance(error["field"], str), (what, error)


# --- hostile values --------------------------------------------------------------------------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)


def deep(depth: int, kind: str) -> bytes:
    return {"array": b"[" * depth + b"]" * depth, "object": b'{"a":' * depth + b"1" + b"}" * depth,
            "open": b"[" * depth}[kind]


mutated_requests = st.builds(
    lambda field, value, extra: json.dumps({**VALID_REQUEST, **({field: value} if field else {}), **extra}).encode(),
    st.sampled_from(["", *VALID_REQUEST]), json_values,
    st.dictionaries(st.text(min_size=1, max_size=12).filter(lambda k: k not in VALID_REQUEST), json_values,
                    max_size=2))
raw_json_texts = st.sampled_from([
    b'{"protocol": NaN, "worker_id": "w1", "backend": "python"}',
    b'{"protocol": 1, "protocol": 1, "worker_id": "w1", "backend": "python"}',
    b'{"protocol": 1e400, "worker_id": "w1", "backend": "python"}',
    b'{"protocol": 1, "worker_id": "\xff\xfe", "backend": "python"}',
    b'{"protocol": 1, "worker_id": "\\ud800", "backend": "python"}',
    b'{"protocol": ' + b"9" * 5000 + b', "worker_id": "w1", "backend": "python"}',
    b"", b"null", b"[]", b'"a string"', b"1", b"\xef\xbb\xbf{}",
])
json_bodies = st.one_of(
    st.binary(max_size=256),
    st.builds(deep, st.integers(JSON_MAX_DEPTH + 1, 200_000), st.sampled_from(["array", "object", "open"])),
    st.builds(lambda n: json.dumps({**VALID_REQUEST, "models": ["m"] * n}).encode(),
              st.integers(REQUEST_MAX_BYTES // 4, REQUEST_MAX_BYTES // 2)),
    mutated_requests, raw_json_texts, json_values.map(lambda v: json.dumps(v).encode()),
)
headers = st.dictionaries(st.sampled_from(["Content-Type", "Accept", "If-None-Match", "Accept-Encoding", "X-Odd"]),
                          st.text(alphabet=string.printable.strip(), max_size=40), max_size=3)
segments = st.one_of(st.text(max_size=80), st.sampled_from(["..", ".", "%", "a" * 5000, "0" * 64, "²", "٣"]))
path_part = segments.map(lambda s: quote(s, safe=""))


# --- the routes of docs/protocol.md ---------------------------------------------------------------
@HOSTILE
@given(body=json_bodies, extra=headers)
async def test_units_next(app_client, body, extra):
    client, _ = app_client
    await check(await client.post("/api/v1/units/next", data=body, headers=extra), body[:80])


async def test_units_next_named_cases(app_client):
    client, _ = app_client
    resp = await client.post("/api/v1/units/next", data=deep(30_000, "array"))   # issue 11's two examples
    assert resp.status == 400 and (await resp.json())["error"]["field"] == "request"
    resp = await client.post("/api/v1/units/next", data=bytes(range(128, 256)))
    assert resp.status == 400 and "UTF-8" in (await resp.json())["error"]["message"]
    resp = await client.post("/api/v1/units/next", data=deep(JSON_MAX_DEPTH + 1, "array"))
    assert resp.status == 400 and "nested" in (await resp.json())["error"]["message"]
    resp = await client.post("/api/v1/units/next", data=b" " * (REQUEST_MAX_BYTES + 1))
    assert resp.status == 413 and (await resp.json())["error"]["code"] == "too_large"

    async def chunked():          # no Content-Length: still capped while reading
        for _ in range(REQUEST_MAX_BYTES // 4096 + 2):
            yield b" " * 4096
    resp = await client.post("/api/v1/units/next", data=chunked())
    assert resp.status == 413 and (await resp.json())["error"]["code"] == "too_large"
    for computes in ("browser", ["gpu"], [1], ["browser"] * 3, {"browser": 1}, [None]):   # an optional field
        resp = await client.post("/api/v1/units/next", json={**VALID_REQUEST, "computes": computes})
        assert resp.status == 400 and (await resp.json())["error"]["field"] == "request.computes", computes
    resp = await client.post("/api/v1/units/next", json={**VALID_REQUEST, "computes": ["browser"]})
    assert resp.status in (200, 204)
    resp = await client.post("/api/v1/units/next", json=VALID_REQUEST)      # still serving
    assert resp.status == 200


def framed(meta: bytes, declared: int | None = None, tail: bytes = b"") -> bytes:
    length = len(meta) if declared is None else declared
    return b"CTR1" + length.to_bytes(4, "little") + meta + b"\0" * (-len(meta) % 4) + tail


@pytest.fixture
async def issued(app_client):
    """A unit this coordinator issued, and the metadata of an honest-looking result for it."""
    client, _ = app_client
    unit = await (await client.post("/api/v1/units/next", json=VALID_REQUEST)).json()
    meta = {"protocol": 1, "unit_id": unit["unit_id"], "lease": unit["lease"], "worker_id": "w1",
            "base_version": unit["model_version"], "loss_before": 1.0, "loss_after": 1.0, "num_samples": 1,
            "compute_seconds": 1.0}
    return unit, meta


@HOSTILE
@given(data=st.data())
async def test_unit_result(app_client, issued, data):
    client, _ = app_client
    unit, meta = issued
    body = data.draw(st.one_of(
        st.binary(max_size=256),
        st.builds(framed, json_bodies, st.one_of(st.none(), st.integers(0, 2**32 - 1)), st.binary(max_size=64)),
        st.builds(lambda field, value: framed(json.dumps({**meta, field: value}).encode(), tail=b"CTD1"),
                  st.sampled_from(list(meta)), json_values),
        st.builds(lambda extra: framed(json.dumps({**meta, **extra}).encode()),
                  st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k not in meta), json_values,
                                  min_size=1, max_size=2)),
    ), label="body")
    unit_id = data.draw(st.one_of(path_part, st.just(unit["unit_id"])), label="unit_id")
    resp = await client.post(f"/api/v1/units/{unit_id}/result", data=body,
                             headers={"Content-Type": "application/octet-stream"})
    await check(resp, (unit_id, body[:80]))


async def test_unit_result_without_content_length(app_client, issued):
    client, _ = app_client
    unit, _ = issued

    async def chunked():
        yield b"CTR1"
    resp = await client.post(f"/api/v1/units/{unit['unit_id']}/result", data=chunked())
    assert resp.status == 413 and (await resp.json())["error"]["code"] == "too_large"


@pytest.mark.timeout(60, method="thread")
async def test_empty_results_are_refused_each_time_and_the_loop_goes_on(app_client, issued):
    """A body of 0 bytes, sent again and again: aiohttp gives every such request one shared empty stream, whose
    ``iter_chunks`` ends only the first time; from the second on it yielded ``(b"", True)`` forever without
    awaiting, and the event loop spun in ``read_body`` (100% CPU, memory growing by a list item a turn) with
    every other request stuck behind it: one worker could stop the coordinator with two empty POSTs."""
    client, _ = app_client
    unit, _ = issued
    for _ in range(3):
        resp = await client.post(f"/api/v1/units/{unit['unit_id']}/result", data=b"",
                                 headers={"Content-Type": "application/octet-stream"})
        await check(resp, "empty body")
        assert resp.status == 400, resp.status
    assert (await client.get("/api/status")).status == 200


async def test_an_encoded_body_is_refused_not_inflated(app_client, issued):
    """A body sent with Content-Encoding is a 415 naming the header on every route that reads one: not inflated
    (a result of 10 KB of gzip inflates to 10 MB, past the Content-Length that was checked), and an encoding
    aiohttp cannot decode (br) is no 400 from its parser with a traceback in the log (the fixture checks)."""
    client, _ = app_client
    unit, _ = issued
    bomb = gzip.compress(b"CTR1" + bytes(10 << 20))
    assert len(bomb) < 20_000
    routes = (f"/api/v1/units/{unit['unit_id']}/result", "/api/v1/units/next", "/api/v1/workers/w1/name")
    for route in routes:
        for coding, body in (("gzip", bomb), ("br", b"garbage"), ("deflate", b"garbage"), ("x-odd", b"{}")):
            resp = await client.post(route, data=body, headers={"Content-Encoding": coding,
                                                                 "Content-Type": "application/octet-stream"})
            await check(resp, (route, coding))
            error = (await resp.json())["error"]
            assert resp.status == 415 and error["code"] == "unsupported_encoding", (route, coding, error)
            assert error["field"] == "Content-Encoding" and repr(coding) in error["message"], error
    resp = await client.post("/api/v1/units/next", json=VALID_REQUEST, headers={"Content-Encoding": "identity"})
    assert resp.status == 200


async def test_a_request_aiohttp_cannot_parse_is_a_400_and_one_log_line(app_client, caplog):
    """Not HTTP, a NUL in the request line, a header line past aiohttp's limit, a bad chunk: aiohttp answers 400
    itself; its log says so in one INFO line, not an ERROR with a traceback (the fixture fails on those)."""
    client, _ = app_client
    caplog.set_level(logging.INFO, logger="aiohttp.server")
    bad = [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40),   # TLS to a plain HTTP port
           b"GET /api/\x00status HTTP/1.1\r\nHost: x\r\n\r\n",
           b"GET /api/status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
           b"POST /api/v1/units/next HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"]
    for raw in bad:
        reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
        writer.write(raw)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(4096), 10)
        writer.close()
        assert answer.split(b" ", 2)[1] == b"400", (raw[:40], answer[:80])
    lines = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert len(lines) >= len(bad) - 1 and all(r.levelno == logging.INFO and not r.exc_info for r in lines), \
        [(r.levelname, r.getMessage()[:80]) for r in lines]


@HOSTILE
@given(blob=st.one_of(path_part, st.sampled_from(["f" * 64, "F" * 64, "f" * 63])), extra=headers)
async def test_blobs(app_client, blob, extra):
    client, _ = app_client
    await check(await client.get(f"/api/v1/blobs/{blob}", headers=extra), blob)


BATCHES = st.one_of(path_part, st.integers(-(10**20), 10**20).map(str),
                    st.sampled_from(["0", "²", "٣", "1e3", "0x10", "%201", "1.0", "9" * 5000]))


@HOSTILE
@given(model=st.one_of(path_part, st.just(MODEL)), batch=BATCHES)
async def test_steps(app_client, model, batch):
    client, job = app_client
    # (a 5000-digit batch is not read by int() here either: Python refuses strings of more than 4,300 digits)
    if model == MODEL and batch.isascii() and batch.isdigit() and len(batch) < 10 \
            and 1 <= int(batch) <= job.recipe.batch_size:
        return                          # a real export: tests/test_browser.py
    await check(await client.get(f"/api/v1/steps/{model}/{batch}"), (model, batch))


async def test_steps_named_cases(app_client):
    client, _ = app_client
    for batch in ("²", "9" * 5000):     # str.isdigit() is true for both; int() of either raised (a 500)
        resp = await client.get(f"/api/v1/steps/{MODEL}/{quote(batch)}")
        assert resp.status == 400 and (await resp.json())["error"]["field"] == "batch"


QUERY_VALUES = st.one_of(st.text(max_size=30), st.integers(-(10**30), 10**30).map(str),
                         st.sampled_from(["²", "1" * 40, "9" * 5000, "final ", "BEST", "-1", "1.5"]))


def exports(fmt: str | None, version: str | None) -> bool:
    """Would this request start a real export of a version that exists (version 0 is the only one)?"""
    return fmt in (None, "onnx", "pt") and (version in (None, "", "final", "best") or (
        version.isascii() and version.isdigit() and not version.strip("0")))


@HOSTILE
@given(fmt=st.one_of(st.none(), QUERY_VALUES, st.sampled_from(["onnx", "pt"])),
       version=st.one_of(st.none(), QUERY_VALUES),
       extra=st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=8), max_size=2))
async def test_model(app_client, fmt, version, extra):
    client, _ = app_client
    if exports(fmt, version):
        return                          # a real export: tests/test_model_out.py
    query = {**extra, **({"format": fmt} if fmt is not None else {}),
             **({"version": version} if version is not None else {})}
    await check(await client.get("/api/v1/model", params=query), query)


async def test_model_named_cases(app_client):
    client, _ = app_client
    for version in ("1" * 40, "²"):     # SQLite cannot hold the first; int() cannot read the second
        resp = await client.get("/api/v1/model", params={"version": version})
        assert resp.status == 400 and (await resp.json())["error"]["field"] == "version"


@HOSTILE
@given(path=st.sampled_from(["/api/status", "/metrics"]),
       query=st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3), extra=headers,
       body=st.one_of(st.none(), st.binary(max_size=64)))
async def test_status_and_metrics(app_client, path, query, extra, body):
    client, _ = app_client
    resp = await client.get(path, params=query, headers=extra)
    await check(resp, query)
    assert resp.status == 200
    if body is not None:                # the wrong method: a 405 in the same JSON form
        resp = await client.post(path, data=body, headers=extra)
        await check(resp, body)
        assert resp.status == 405


# --- slow senders ----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/api/v1/units/next", "/api/v1/units/0123456789abcdef/result"])
async def test_a_slow_sender_gets_a_408_and_its_connection_back(app_client, monkeypatch, path):
    """A body that trickles in is cut off after BODY_MIN_SECONDS + size / BODY_MIN_RATE with a JSON 408;
    the coordinator does not wait on it forever (a slow-loris holds a connection and a buffer)."""
    import asyncio
    import time

    import coordinator.app as app_module

    monkeypatch.setattr(app_module, "BODY_MIN_SECONDS", 0.5)
    monkeypatch.setattr(app_module, "BODY_MIN_RATE", 10 ** 9)
    client, _ = app_client
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: 5000\r\n\r\n").encode()
    writer.write(head + b"{" + b" " * 10)   # then nothing more
    await writer.drain()
    t0 = time.monotonic()
    answer = await asyncio.wait_for(reader.read(4096), timeout=20)
    waited = time.monotonic() - t0
    writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    assert b" 408 " in status_line, answer[:300]
    error = json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "timeout" and error["field"] == "body" and "within" in error["message"], error
    assert 0.4 <= waited < 10, waited


# --- the admin API (coordinator/jobs.py): hostile bodies, names and tokens -----------------------
ADMIN_TOKEN = "operator-token-0123456789"


@pytest.fixture
async def admin_client(aiohttp_client, tmp_path, caplog):
    from coordinator.keys import JOBS

    tokens = tmp_path / "admin-tokens"
    tokens.write_text(ADMIN_TOKEN + "\n")
    data = tiny_cifar10(n_train=256, n_test=64)
    cfg = CoordinatorConfig(state=tmp_path / "state", model=MODEL, shard_size=64, epochs=4.0, eval_every_s=3600.0,
                            codec="fp32", admin_token_file=tokens)
    job = Job(cfg)
    job.open(data)
    caplog.set_level(logging.WARNING)
    app = create_app(cfg, job)
    app[JOBS].load_data = lambda config: data   # a valid add opens a job on the same tiny data
    client = await aiohttp_client(app)
    yield client
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, [f"{r.name}: {r.getMessage()}" for r in errors]


def _job_options():
    from coordinator.config import FIELDS

    return st.dictionaries(st.one_of(st.sampled_from(sorted(FIELDS)), st.text(max_size=12)), json_values, max_size=3)


add_bodies = st.one_of(
    st.binary(max_size=256), raw_json_texts, json_values.map(lambda v: json.dumps(v).encode()),
    st.builds(deep, st.integers(JSON_MAX_DEPTH + 1, 200_000), st.sampled_from(["array", "object", "open"])),
    st.builds(lambda name, options, extra: json.dumps({"job": name, "options": options, **extra}).encode(),
              st.one_of(st.text(max_size=20), st.sampled_from(["b", "cifar10", "..", "a" * 65]), json_values),
              st.one_of(_job_options(), json_values),
              st.dictionaries(st.sampled_from(["x", "protocol"]), json_values, max_size=1)),
)
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@HOSTILE
@given(data=add_bodies, extra=headers)
async def test_admin_add(admin_client, data, extra):
    resp = await admin_client.post("/api/v1/admin/jobs", data=data, headers={**extra, **ADMIN_AUTH})
    await check(resp, data[:80])


@HOSTILE
@given(method=st.sampled_from(["GET", "POST", "DELETE", "PUT"]), name=path_part,
       action=st.sampled_from(["", "/pause", "/resume", "/other"]),
       query=st.dictionaries(st.sampled_from(["delete_state", "job", "x"]), st.text(max_size=10), max_size=2),
       authorization=st.one_of(st.just(ADMIN_AUTH["Authorization"]), st.text(alphabet=string.printable.strip(),
                                                                            max_size=40)))
async def test_admin_job_routes(admin_client, method, name, action, query, authorization):
    resp = await admin_client.request(method, f"/api/v1/admin/jobs/{name}{action}", params=query,
                                      headers={"Authorization": authorization})
    await check(resp, (method, name, action, query, authorization))
    if authorization != ADMIN_AUTH["Authorization"] and resp.status not in (404, 405):
        assert resp.status == 401   # no token, no answer (a route that does not exist is a 404 or 405 first)


@HOSTILE
@given(name=path_part, query=st.dictionaries(st.sampled_from(["job", "x"]), st.text(max_size=10), max_size=2))
async def test_job_status_and_dashboard(admin_client, name, query):
    for path in (f"/jobs/{name}/api/status", f"/jobs/{name}/dashboard", "/api/status"):
        await check(await admin_client.get(path, params=query), (path, query))
