"""The Python worker (``crowdtrain worker``) against a small fake coordinator.

The fake (aiohttp.web on 127.0.0.1, in a thread) serves real blobs (a model's fp32 state
container, CTS1 shards of tiny CIFAR look-alikes), hands out units from a list, counts blob
downloads and records the result bodies. The worker runs as a real subprocess.
"""
from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from email.utils import formatdate
from pathlib import Path

import numpy as np
import pytest
import torch
from aiohttp import web

from contract.codecs import decode_delta, encode_delta, get_codec
from contract.errors import ContractError, error_body
from contract.shards import encode_shard
from contract.units import (WORKER_KEY_HEADER, WORKER_KEY_RE, UnitRequest, UnitResult, WorkUnit, blob_id, check_result,
                            unpack_result)
from models import registry
from models.local import delta_spec, state_arrays
from tests.helpers.tiny_cifar import tiny_cifar10
from worker_py.client import (
    BlobCache, Client, GaveUp, NoWork, NotCoordinator, Stopped, Unreachable, backoff_delays, parse_retry_after,
)
from worker_py.progress import Progress
from worker_py.unit import prefetch_due

ROOT = Path(__file__).resolve().parents[1]
HAND_BACK = "returned: worker stopping"


# ----------------------------------------------------------------------------- blobs
def model_blob(name: str) -> bytes:
    torch.manual_seed(0)
    return encode_delta(get_codec("fp32"), state_arrays(registry.build(name)))


@pytest.fixture(scope="module")
def blobs() -> dict[str, bytes]:
    """name -> bytes: two models, two 32-image shards, and a shard with labels out of range."""
    data = tiny_cifar10(n_train=64, n_test=1)
    bad_labels = np.full(8, 200, np.uint8)
    return {"supermask_fc": model_blob("supermask_fc"), "cnn": model_blob("cnn"),
            "s1": encode_shard(data.train_x[:32], data.train_y[:32]),
            "s2": encode_shard(data.train_x[32:], data.train_y[32:]),
            "corrupt": encode_shard(data.train_x[:8], bad_labels)}


def ids(blobs: dict[str, bytes]) -> dict[str, str]:
    return {name: blob_id(data) for name, data in blobs.items()}


def unit(uid: str, model_blob_id: str, shard_ids: list[str], model: str = "supermask_fc", steps: int = 2,
         batch: int = 16, codec: str = "fp32", **hyper: object) -> dict:
    """A WorkUnit JSON dict without lease and deadline (the fake fills those in)."""
    return {"protocol": 1, "job": "job1", "unit_id": uid, "model": model, "model_version": model_blob_id,
            "base_step": 0, "shard_ids": shard_ids, "local_steps": steps, "batch_size": batch,
            "hyper": {"lr": 0.05, **hyper}, "seed": 7, "codec": codec}


# ----------------------------------------------------------------------------- the fake coordinator
class FakeCoordinator:
    """Serves ``blobs`` (by sha256), issues ``units`` in order, records every result.

    ``down_first``: answer units/next with 503 that many times; ``replies``: (status, code) to
    answer the first submissions with; ``finish``: say the job is over once the units run out;
    ``clock``: seconds the fake's clock (Date header, deadlines) is ahead of the real one; ``key``: a unit
    request without this worker key is refused ``403 worker_key``, as by a coordinator that holds the id for it.
    """

    def __init__(self, blobs: list[bytes], units: list[dict], port: int = 0, down_first: int = 0,
                 replies: list[tuple[int, str]] = (), finish: bool = False, clock: float = 0.0,
                 reason: str | None = None, key: str | None = None) -> None:
        self.blobs = {blob_id(b): b for b in blobs}
        self.key = key
        self.units, self.port, self.down_first = list(units), port, down_first
        self.replies, self.finish, self.clock, self.reason = list(replies), finish, clock, reason
        self.blob_gets: Counter[str] = Counter()
        self.requests: list[UnitRequest] = []
        self.keys: list[str | None] = []   # each unit request's worker key (WORKER_KEY_HEADER)
        self.issued: dict[str, dict] = {}
        self.results: list[UnitResult] = []
        self.accepted: set[str] = set()
        self.events: list[str] = []      # "next" and "result <unit_id>", in the order they came in
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def next_unit(self, request: web.Request) -> web.Response:
        self.requests.append(UnitRequest.from_json(await request.json()))
        self.keys.append(request.headers.get(WORKER_KEY_HEADER))
        self.events.append("next")
        if self.key is not None and self.keys[-1] != self.key:
            return web.json_response({"error": {"code": "worker_key", "field": "worker_id",
                                                "message": "this worker id is bound to another key (fake)"}},
                                     status=403)
        if self.down_first > 0:
            self.down_first -= 1
            return web.Response(status=503, text="starting up")
        if not self.units:
            headers = {"Retry-After": "0.2", **({"X-Crowdtrain-Finished": "true"} if self.finish else {}),
                       **({"X-Crowdtrain-Reason": self.reason} if self.reason else {})}
            return web.Response(status=204, headers=headers)
        now = time.time() + self.clock
        d = {"lease": "lease-" + os.urandom(4).hex(), "deadline": now + 600, **self.units.pop(0)}
        self.issued[d["unit_id"]] = d
        return web.json_response(d, headers={"Date": formatdate(now, usegmt=True)})

    async def blob(self, request: web.Request) -> web.Response:
        bid = request.match_info["bid"]
        self.blob_gets[bid] += 1
        if bid not in self.blobs:
            return web.json_response({"error": {"code": "unknown_blob", "field": "", "message": "no such blob"}},
                                     status=404)
        return web.Response(body=self.blobs[bid], content_type="application/octet-stream",
                            headers={"ETag": f'"{bid}"'})

    async def result(self, request: web.Request) -> web.Response:
        try:
            result = unpack_result(await request.read())
            issued = self.issued[request.match_info["uid"]]
            try:
                unit = WorkUnit.from_json(issued)
            except ContractError:   # a malformed unit can only come back as a failure
                assert result.error and (result.unit_id, result.lease) == (issued["unit_id"], issued["lease"])
            else:
                check_result(unit, result)
        except ContractError as e:
            return web.json_response(error_body(e), status=400)
        self.results.append(result)
        self.events.append(f"result {result.unit_id}")
        if self.replies:
            status, code = self.replies.pop(0)
            return web.json_response({"error": {"code": code, "field": "", "message": f"{code} (fake)"}},
                                     status=status)
        if result.unit_id in self.accepted:
            return web.json_response({"error": {"code": "duplicate", "field": "", "message": "again"}}, status=409)
        self.accepted.add(result.unit_id)
        return web.json_response({"accepted": True, "staleness": 0})

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/api/v1/units/next", self.next_unit)
        app.router.add_get("/api/v1/blobs/{bid}", self.blob)
        app.router.add_post("/api/v1/units/{uid}/result", self.result)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def start(self) -> "FakeCoordinator":
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(url: str, cache: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "crowdtrain", "worker", "--coordinator", url, "--cache", str(cache),
           "--threads", "1", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the worker did not exit in {timeout} s:\n{err}")
    return proc.returncode, out + err


def wait_for(cond, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.05)


def check_delta(result: UnitResult, model: str) -> None:
    """The delta decodes against the model's spec, is finite and not all zero."""
    assert result.error is None
    delta = decode_delta(result.delta, delta_spec(registry.build(model)))
    assert all(np.isfinite(v).all() for v in delta.values())
    assert any(np.abs(v).max() > 0 for v in delta.values())
    assert result.num_samples > 0 and result.loss_before > 0 and result.compute_seconds > 0


# ----------------------------------------------------------------------------- tests
def test_worker_computes_units_and_downloads_each_blob_once(blobs, tmp_path):
    b = ids(blobs)
    units = [unit("u1", b["supermask_fc"], [b["s1"]]),
             unit("u2", b["supermask_fc"], [b["s1"], b["s2"]], codec="int8", momentum=0.5, crop_pad=2),
             unit("u3", b["cnn"], [b["s2"]], model="cnn", codec="topk:0.1")]
    fake = FakeCoordinator(list(blobs.values()), units).start()
    try:
        code, log = finish(start_worker(fake.url, tmp_path / "cache", "--max-units", "3", "--worker-id", "w-1"))
        assert code == 0, log
        assert [r.unit_id for r in fake.results] == ["u1", "u2", "u3"], log
        for r, model in zip(fake.results, ["supermask_fc", "supermask_fc", "cnn"]):
            check_delta(r, model)
            assert r.worker_id == "w-1"
        assert decode_delta(fake.results[1].delta)  # int8 container
        assert fake.blob_gets == Counter({b["supermask_fc"]: 1, b["s1"]: 1, b["s2"]: 1, b["cnn"]: 1}), log
        assert all(r.backend == "python" and r.worker_id == "w-1" and r.runtime == "cpu" for r in fake.requests)
        # a given --worker-id without $CROWDTRAIN_WORKER_KEY: a key made on its first run and kept in the cache
        stored = (tmp_path / "cache" / "keys" / "w-1.key")
        assert len(set(fake.keys)) == 1 and fake.keys[0] == stored.read_text().strip(), fake.keys
        assert WORKER_KEY_RE.fullmatch(fake.keys[0]) and stored.stat().st_mode & 0o777 == 0o600
        assert "3 units done" in log and "Traceback" not in log

        # A second worker on the same cache: nothing to download, except a blob corrupted on disk.
        cached = BlobCache(tmp_path / "cache")
        assert cached.get(b["s1"]) == blobs["s1"]
        cached.path(b["s2"]).write_bytes(b"garbage")
        fake.units = [unit("u4", b["supermask_fc"], [b["s1"], b["s2"]])]
        fake.blob_gets.clear()
        fake.keys.clear()
        code, log = finish(start_worker(fake.url, tmp_path / "cache", "--max-units", "1", "--no-progress"))
        assert code == 0, log
        check_delta(fake.results[-1], "supermask_fc")
        assert fake.blob_gets == Counter({b["s2"]: 1}), log
        # a random id comes with a random key, the same in each of its requests, never the other worker's
        assert len(set(fake.keys)) == 1 and WORKER_KEY_RE.fullmatch(fake.keys[0]), fake.keys
    finally:
        fake.stop()


def test_sigterm_mid_unit_hands_back_the_unit(blobs, tmp_path):
    b = ids(blobs)
    units = [unit(f"long{i}", b["supermask_fc"], [b["s1"]], steps=100_000) for i in (1, 2)]
    fake = FakeCoordinator(list(blobs.values()), units).start()
    try:
        proc = start_worker(fake.url, tmp_path / "cache", "--grace", "0.5")
        wait_for(lambda: len(fake.issued) == 1, timeout=120)
        time.sleep(1.0)
        assert list(fake.issued) == ["long1"], "the next unit is asked for only near the end of this one"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code, log = finish(proc)
        assert code == 0, log
        assert time.monotonic() - t0 < 15, log
        assert [r.unit_id for r in fake.results] == ["long1"], log
        assert all(r.error == HAND_BACK and r.delta == b"" for r in fake.results)
        assert "handed back unit long1" in log and "Traceback" not in log
    finally:
        fake.stop()


@pytest.mark.parametrize("step, total, elapsed, fetch, due", [
    (1, 1, 0.0, 0.0, True),       # a one-step unit: ask at once
    (5, 5, 4.0, 0.0, True),       # the last step
    (1, 10, 0.0, 100.0, False),   # no step timed yet
    (2, 10, 1.0, 0.01, False),    # 9 s left, fetches take 10 ms: wait
    (6, 10, 5.0, 3.0, True),      # 5 s left, a fetch takes 3 s: ask now (5 <= 2 * 3)
    (3, 10, 2.0, 3.0, False),     # 8 s left: too early
])
def test_the_next_unit_is_asked_for_as_late_as_the_fetch_time_allows(step, total, elapsed, fetch, due):
    assert prefetch_due(step, total, elapsed, fetch) is due


@pytest.mark.parametrize("prefetch", [False, True])
def test_the_next_unit_is_asked_for_after_the_result_unless_prefetching(blobs, tmp_path, prefetch):
    b = ids(blobs)
    units = [unit(f"u{i}", b["supermask_fc"], [b["s1"]], steps=40) for i in (1, 2, 3)]
    fake = FakeCoordinator(list(blobs.values()), units).start()
    try:
        extra = ("--prefetch",) if prefetch else ()
        code, log = finish(start_worker(fake.url, tmp_path / "cache", "--max-units", "3", "--no-progress", *extra))
        assert code == 0, log
        if prefetch:   # the second unit is asked for while the first one trains
            assert fake.events.index("next", 1) < fake.events.index("result u1"), fake.events
        else:          # so that its base can include the first one's result
            assert fake.events == ["next", "result u1", "next", "result u2", "next", "result u3"], fake.events
    finally:
        fake.stop()


def test_worker_waits_for_a_coordinator_that_comes_up_late_and_exits_when_the_job_is_finished(blobs, tmp_path):
    b = ids(blobs)
    port = free_port()
    proc = start_worker(f"http://127.0.0.1:{port}", tmp_path / "cache")
    fake = FakeCoordinator(list(blobs.values()), [unit("u1", b["supermask_fc"], [b["s1"]])], port=port,
                           finish=True)
    try:
        seen: list[str] = []   # start the coordinator only once the worker has found it missing
        while not any("cannot reach" in line for line in seen):
            assert proc.poll() is None, "".join(seen)
            seen.append(proc.stderr.readline())
        fake.start()
        code, log = finish(proc)
        log = "".join(seen) + log
        assert code == 0, log
        assert [r.unit_id for r in fake.results] == ["u1"]
        check_delta(fake.results[0], "supermask_fc")
        assert log.count("cannot reach") == 1 and log.count("connected to") == 1, log
        assert "job is finished" in log and "Traceback" not in log
    finally:
        fake.stop()


def test_failing_units_are_reported_and_the_worker_carries_on(blobs, tmp_path):
    b = ids(blobs)
    units = [unit("bad-shard", b["supermask_fc"], [b["s1"], b["corrupt"]]),
             unit("bad-model", b["supermask_fc"], [b["s1"]], model="no_such_model"),
             unit("diverges", b["supermask_fc"], [b["s1"]], steps=3, lr=1e30),
             unit("bad-hyper", b["supermask_fc"], [b["s1"]], momentum=2.0),
             unit("good", b["supermask_fc"], [b["s2"]])]
    fake = FakeCoordinator(list(blobs.values()), units, down_first=2).start()
    try:
        code, log = finish(start_worker(fake.url, tmp_path / "cache", "--max-units", "1"))
        assert code == 0, log
        by_id = {r.unit_id: r for r in fake.results}
        assert list(by_id) == ["bad-shard", "bad-model", "diverges", "bad-hyper", "good"], log
        for uid in ("bad-shard", "bad-model", "diverges", "bad-hyper"):
            assert by_id[uid].error and by_id[uid].delta == b"" and by_id[uid].num_samples == 0
        assert "shard.labels" in by_id["bad-shard"].error
        assert "no_such_model" in by_id["bad-model"].error
        assert "unit.hyper.momentum" in by_id["bad-hyper"].error
        check_delta(by_id["good"], "supermask_fc")
        assert "failed" in log and "Traceback" not in log
        assert log.count("cannot reach") == 1 and "HTTP 503" in log, log
    finally:
        fake.stop()


def test_submit_refusals_drop_the_unit_or_count_it_done(blobs, tmp_path):
    b = ids(blobs)
    units = [unit(f"u{i}", b["supermask_fc"], [b["s1"]]) for i in range(1, 4)]
    replies = [(410, "lease_expired"), (409, "too_stale"), (409, "duplicate")]
    fake = FakeCoordinator(list(blobs.values()), units, replies=replies).start()
    try:
        code, log = finish(start_worker(fake.url, tmp_path / "cache", "--max-units", "1", "--no-progress"))
        assert code == 0, log
        assert [r.unit_id for r in fake.results] == ["u1", "u2", "u3"], log
        assert "lease_expired" in log and "too_stale" in log and "already done" in log
        assert "Traceback" not in log
    finally:
        fake.stop()


def test_unsupported_protocol_on_submit_exits_nonzero(blobs, tmp_path):
    b = ids(blobs)
    units = [unit(f"u{i}", b["supermask_fc"], [b["s1"]]) for i in (1, 2)]
    fake = FakeCoordinator(list(blobs.values()), units, replies=[(400, "unsupported_protocol")]).start()
    try:
        code, log = finish(start_worker(fake.url, tmp_path / "cache", "--no-progress"))
        assert code == 1, log
        assert "upgrade the worker" in log and "Traceback" not in log
        assert fake.results[0].unit_id == "u1"
        assert [r.error for r in fake.results[1:]] in ([], [HAND_BACK]), "the prefetched unit is handed back"
    finally:
        fake.stop()


def test_workers_of_one_id_starting_at_once_share_one_whole_key(tmp_path, monkeypatch):
    """Two workers started at once with one --worker-id make its key file together: each reads the one key that
    was linked in whole (never an empty, half-written file: writing is slowed here so that the others look while
    it is under way), mode 600, and no draft is left behind."""
    import os
    import stat
    import time
    from concurrent.futures import ThreadPoolExecutor

    from worker_py.main import stored_key

    fdopen = os.fdopen

    def slow_fdopen(*args, **kwargs):
        time.sleep(0.02)
        return fdopen(*args, **kwargs)

    monkeypatch.setattr(os, "fdopen", slow_fdopen)
    for round_ in range(5):
        path = tmp_path / f"r{round_}" / "w.key"
        with ThreadPoolExecutor(8) as pool:
            keys = list(pool.map(lambda _: stored_key(path), range(8)))
        assert len(set(keys)) == 1 and len(keys[0]) >= 22, keys
        assert path.read_text() == keys[0] + "\n" and stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert [p.name for p in path.parent.iterdir()] == ["w.key"], "no draft left"
    assert stored_key(path) == keys[0], "kept"


def test_a_given_id_keeps_its_key_and_stops_when_refused_it(blobs, tmp_path):
    """A --worker-id's key outlives the process (its key file); a coordinator that holds the id for another key
    (403 worker_key) stops the worker at once with a message that says what to do, instead of asking for ever."""
    from worker_py.main import cli

    b = ids(blobs)
    key_file = tmp_path / "w-7.key"
    assert cli(["--coordinator", "http://127.0.0.1:9", "--key-file", str(key_file)]) == 2, "a key file needs an id"
    assert not key_file.exists()
    fake = FakeCoordinator(list(blobs.values()), [unit("u1", b["supermask_fc"], [b["s1"]])]).start()
    try:
        code, log = finish(start_worker(fake.url, tmp_path / "cache", "--max-units", "1", "--no-progress",
                                        "--worker-id", "w-7", "--key-file", str(key_file)))
        assert code == 0, log
        first = key_file.read_text().strip()
        assert set(fake.keys) == {first}, fake.keys
        # the restarted worker sends the same key; the coordinator, bound to it, serves it
        fake.key, fake.units = first, [unit("u2", b["supermask_fc"], [b["s1"]])]
        code, log = finish(start_worker(fake.url, tmp_path / "cache", "--max-units", "1", "--no-progress",
                                        "--worker-id", "w-7", "--key-file", str(key_file)))
        assert code == 0 and [r.unit_id for r in fake.results] == ["u1", "u2"], log
        # another key for that id ($CROWDTRAIN_WORKER_KEY wins over the file): refused, and the worker stops
        fake.units = [unit("u3", b["supermask_fc"], [b["s1"]])]
        asks = len(fake.keys)
        proc = subprocess.Popen([sys.executable, "-m", "crowdtrain", "worker", "--coordinator", fake.url, "--cache",
                                 str(tmp_path / "cache"), "--threads", "1", "--no-progress", "--worker-id", "w-7",
                                 "--key-file", str(key_file)], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "CROWDTRAIN_WORKER_KEY": "another-key-" + "x" * 16})
        code, log = finish(proc)
        assert code == 1, log
        assert "holds worker id w-7 for another key" in log and "--key-file" in log and "Traceback" not in log
        assert len(fake.keys) == asks + 1, "one request, not a retry loop"
        assert "another-key" not in log, "the key is never printed"
    finally:
        fake.stop()


def test_worker_never_imports_the_coordinator():
    code = ("import worker_py.main, worker_py.loop, worker_py.runner, worker_py.client, sys; "
            "bad = [m for m in sys.modules if m == 'coordinator' or m.startswith('coordinator.')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


# ----------------------------------------------------------------------------- client pieces
def test_backoff_doubles_to_the_cap_with_jitter():
    delays = backoff_delays()
    got = [next(delays) for _ in range(10)]
    for i, d in enumerate(got):
        top = min(30.0, 0.5 * 2**i)
        assert top / 2 <= d <= top
    assert parse_retry_after("3") == 3 and parse_retry_after("soon") == 5.0 and parse_retry_after("-1") == 0


def test_blob_cache_verifies_and_writes_atomically(tmp_path):
    cache = BlobCache(tmp_path)
    data = b"hello blob"
    bid = blob_id(data)
    assert cache.get(bid) is None
    assert cache.put(bid, data) and cache.get(bid) == data
    assert not list(cache.path(bid).parent.glob("*.tmp")), "no temporary files are left behind"
    cache.path(bid).write_bytes(b"tampered")
    assert cache.get(bid) is None and not cache.path(bid).exists(), "a corrupt entry is dropped"


def test_client_fetches_blobs_reads_deadlines_and_the_finished_signal(blobs, tmp_path):
    b = ids(blobs)
    units = [unit("u1", b["supermask_fc"], [b["s1"]])]
    fake = FakeCoordinator([blobs["s1"]], units, finish=True, clock=-3600).start()
    try:
        client = Client(fake.url, cache=BlobCache(tmp_path), log=lambda line: None)
        bid = b["s1"]
        assert client.fetch_blob(bid) == client.fetch_blob(bid) == blobs["s1"]
        assert fake.blob_gets[bid] == 1 and client.blob_gets == 1
        request = UnitRequest(worker_id="w", backend="python")
        d = client.next_unit(request)
        assert d["deadline"] < time.time(), "the fake's clock is an hour behind"
        assert client.local_time(d["deadline"]) == pytest.approx(time.time() + 600, abs=5)
        assert client.next_unit(request) == NoWork(0.2, finished=True)
    finally:
        fake.stop()


def test_a_worker_says_why_the_coordinator_has_no_unit_for_it(tmp_path):
    """A 204's ``X-Crowdtrain-Reason`` (e.g. a new worker's results waiting for their checks) reaches the
    operator's log, once per idle streak (the reason was dropped before: "no work right now" only)."""
    why = "this worker's results wait for their checks"
    fake = FakeCoordinator([], [], reason=why).start()
    try:
        client = Client(fake.url, cache=BlobCache(tmp_path), log=lambda line: None)
        assert client.next_unit(UnitRequest(worker_id="w", backend="python")) == NoWork(0.2, reason=why)
    finally:
        fake.stop()
    out = io.StringIO()
    progress = Progress(enabled=True, stream=out)
    for _ in range(3):
        progress.idle(0.2, why)
    progress.idle(0.2, None)
    assert out.getvalue().count(why) == 1 and out.getvalue().count("no work right now") == 2


# ----------------------------------------------------------------------------- a URL that is not a coordinator
class NotACoordinator:
    """An HTTP server that is not a coordinator: ``http.server``'s 501 for POST, or an HTML 404 page."""

    def __init__(self, status: int) -> None:
        import http.server

        self.requests = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                outer.requests += 1
                if status == 501:
                    self.send_error(501)
                    return
                body = b"<html><body>Not Found</body></html>"
                self.send_response(status)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("status", [501, 404])
def test_worker_gives_up_at_once_on_a_server_that_is_not_a_coordinator(status, tmp_path):
    server = NotACoordinator(status)
    try:
        code, log = finish(start_worker(server.url, tmp_path / "cache", "--no-progress"))
        assert code == 1, log
        assert f"{server.url} is not a crowdtrain coordinator" in log and f"HTTP {status}" in log, log
        assert server.requests == 1, "no retries"
        assert "Traceback" not in log and "retrying" not in log
    finally:
        server.close()


def test_worker_gives_up_on_an_unreachable_coordinator_after_max_retry_time(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    code, log = finish(start_worker(url, tmp_path / "cache", "--no-progress", "--max-retry-time", "2"))
    assert code == 1, log
    assert "cannot reach" in log and f"gave up: {url} unreachable for 2 s" in log, log
    assert time.monotonic() - t0 < 30 and "Traceback" not in log


def test_client_fails_fast_on_a_host_name_that_does_not_resolve():
    client = Client("http://no-such-host.invalid:8080", log=lambda line: None, timeout=10)
    with pytest.raises(NotCoordinator, match="the host name 'no-such-host.invalid' does not resolve"):
        client.retry(lambda: client.next_unit(UnitRequest(worker_id="w", backend="python")))


def test_client_retries_forever_without_max_retry_time_and_gives_up_with_it():
    calls = []

    def down() -> None:
        calls.append(time.monotonic())
        raise Unreachable("connection refused")

    client = Client("http://127.0.0.1:9", log=lambda line: None, max_retry_time=0.6)
    with pytest.raises(GaveUp, match="unreachable for 1 s"):
        client.retry(down)
    assert len(calls) >= 2 and calls[-1] - calls[0] < 0.6 + 0.5
    forever = Client("http://127.0.0.1:9", log=lambda line: None, max_retry_time=None)
    stop = threading.Event()
    threading.Timer(1.5, stop.set).start()
    with pytest.raises(Stopped):
        forever.retry(down, stop)
