"""What an operator watches of one coordinator process: ``/metrics`` and the access log.

- ``Observer``: one ``prometheus_client`` registry per app (never the global default registry, so
  several apps in one process do not collide) holding the job's collector
  (``coordinator.metrics.JobCollector``), this process's memory and CPU (``ProcessCollector``:
  ``process_resident_memory_bytes`` and others, on Linux) and Python's garbage collector, and the
  request histogram ``crowdtrain_http_request_duration_seconds{route, method, status}``, and how late the
  event loop runs a timer (``crowdtrain_event_loop_lag_seconds``, ``watch_loop``): what every request
  waits behind when a callback or a thread holding the GIL keeps the loop from the others.
- ``middleware``: times every request once (from the handler's start to its response, body not
  yet sent) and uses that one measurement for the histogram and the access log line.
- Labels stay bounded whatever clients send: ``route`` is the matched route's template
  (``/api/v1/units/{unit_id}/result``, never the raw path; ``unmatched`` for a 404 or 405 the router
  answers), ``method`` one of ``METHODS`` or ``other``, ``status`` the class (``2xx`` .. ``5xx``).
- The access log (``--access-log json``): one JSON object a line on the logger ``crowdtrain.access``
  with ``time`` (UTC, ms), ``method``, ``route``, ``status``, ``duration_ms``, ``bytes`` (the body's
  size; null for a file streamed from disk) and ``client`` (``coordinator.limits.client_address``:
  the last X-Forwarded-For entry when the peer is a local proxy). The raw path is not logged: a
  worker id in a path (``/api/v1/workers/{worker_id}/name``) is the bearer of that identity.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from typing import Any, TextIO

from aiohttp import web
from prometheus_client import GCCollector, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import CollectorRegistry

from coordinator.limits import client_address
from coordinator.metrics import JobCollector

ACCESS_LOG = logging.getLogger("crowdtrain.access")
ACCESS_LOG_MODES = ("off", "json")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
UNMATCHED = "unmatched"
CLIENT_CLOSED = 499   # the client went away before its answer (nginx's code), in the histogram's 4xx
# Seconds: the load test's target is a p99 of units/next under 50 ms; results and blobs take longer,
# and a loaded machine's p99 was 0.6-2 s (bench/load.py). A quantile read from the buckets is
# interpolated inside one, so it is only as fine as they are.
BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 5.0,
           10.0, 30.0)
REQUEST_SECONDS = "crowdtrain_http_request_duration_seconds"
LOOP_LAG_SECONDS = "crowdtrain_event_loop_lag_seconds"
LOOP_TICK_S = 0.02   # the watch's timer: 50 wake-ups a second, each a few microseconds of the loop
FROZEN_OBJECTS = "crowdtrain_gc_frozen_objects"
FREEZE_WAIT_S = 600.0   # ``freeze_when``: the longest the start-up work is waited for before freezing anyway
# The protocol's two busy routes (results and hand-backs share one): the load test's and the dashboard's.
WORK_ROUTES = ("POST /api/v1/units/next", "POST /api/v1/units/{unit_id}/result")


def route_of(request: web.Request) -> str:
    """The template of the route ``request`` matched, or ``unmatched``."""
    resource = getattr(request.match_info.route, "resource", None)
    if resource is None:
        return UNMATCHED
    if isinstance(resource, web.StaticResource):
        return resource.canonical.rstrip("/") + "/{filename}"
    return resource.canonical


def method_of(request: web.Request) -> str:
    return request.method if request.method in METHODS else "other"


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status <= 599 else "other"


class Observer:
    """One app's registry: the job's families (``status`` returns a ``/api/status`` dict, or None when
    there is none to read), process memory, and the request histogram; and whether to log requests."""

    def __init__(self, status: Callable[[], Mapping[str, Any] | None] | None, access_log: str = "off"):
        if access_log not in ACCESS_LOG_MODES:
            raise ValueError(f"access_log: expected one of {', '.join(ACCESS_LOG_MODES)}, got {access_log!r}")
        self.registry = CollectorRegistry(auto_describe=False)
        self._status, self._view = status, None
        if status is not None:
            self.registry.register(JobCollector(self._job_status))
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.registry.register(_Frozen())
        self.requests = Histogram(REQUEST_SECONDS, "Seconds from a request's arrival at its handler to its response "
                                  "(the body not yet sent), by route template, method and status class.",
                                  ("route", "method", "status"), buckets=BUCKETS, registry=self.registry)
        self.loop_lag = Histogram(LOOP_LAG_SECONDS, f"Seconds a {LOOP_TICK_S:g}-s timer of the event loop fired late: "
                                  "how long the loop was kept from its callbacks (a long one, or the GIL).",
                                  buckets=BUCKETS, registry=self.registry)
        self.access_log = access_log == "json"

    async def watch_loop(self, tick: float = LOOP_TICK_S) -> None:
        """Observe, until cancelled, how late each ``tick``-second sleep of the event loop wakes."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(tick)
            self.loop_lag.observe(max(0.0, loop.time() - started - tick))

    def record(self, request: web.Request, status: int, seconds: float, size: int | None) -> None:
        route, method = route_of(request), method_of(request)
        self.requests.labels(route, method, status_class(status)).observe(seconds)
        if self.access_log and ACCESS_LOG.isEnabledFor(logging.INFO):
            ACCESS_LOG.info(access_line(request, route, method, status, seconds, size))

    def work_latency(self) -> dict[str, dict[str, Any]]:
        """``latency`` of this process's ``WORK_ROUTES`` since it started (``/api/status``, the dashboard)."""
        return {k: v for k, v in latency(self.requests.collect()).items() if k in WORK_ROUTES}

    def _job_status(self) -> Mapping[str, Any] | None:
        status = self._status()
        if status is not None and self._view is not None:
            self._view(status)
        return status

    def exposition(self, accept: str | None, accept_encoding: str | None = None,
                   view: Callable[[dict], None] | None = None) -> web.Response:
        """``/metrics``: the registry in the format the scraper asked for (``Accept``; text 0.0.4 by default).
        ``view``: what this scraper may see of the job's status, made of it in place first (``app.anonymous``:
        worker ids replaced by their tags for anyone but the operator on this machine)."""
        encode, content_type = choose_encoder(accept or "")
        self._view = view   # (read by the collector during encode, which does not await: no other scrape meanwhile)
        try:
            body = encode(self.registry)
        finally:
            self._view = None
        response = web.Response(body=body, headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
        if gzip_accepted(accept_encoding or ""):
            response.enable_compression(web.ContentCoding.gzip)
        return response


def access_line(request: web.Request, route: str, method: str, status: int, seconds: float,
                size: int | None) -> str:
    """One request as a JSON object on one line."""
    now = datetime.now(timezone.utc)
    return json.dumps({"time": now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z",
                       "method": method, "route": route, "status": status,
                       "duration_ms": round(seconds * 1e3, 3), "bytes": size,
                       "client": client_address(request.remote, request.headers.get("X-Forwarded-For"))},
                      separators=(",", ":"))


def body_size(response: web.StreamResponse) -> int | None:
    """The response body's size in bytes: what was sent of a streamed answer, a ``Response``'s body;
    None for a file (``FileResponse`` reads its size only when it sends)."""
    if response.prepared:
        return response.body_length
    return response.content_length


OBSERVER = web.AppKey("observer", Observer)


class _Frozen:
    """``crowdtrain_gc_frozen_objects``: the objects ``freeze_when`` left out of the cycle collector's passes."""

    def collect(self):
        yield GaugeMetricFamily(FROZEN_OBJECTS, "Objects kept out of the garbage collector's passes since the "
                                "start-up work (gc.freeze): 0 until then.", value=gc.get_freeze_count())


async def freeze_when(ready: Callable[[], bool], poll_s: float = 1.0, wait_s: float = FREEZE_WAIT_S) -> None:
    """Once ``ready()`` (the process's start-up work is done), or after ``wait_s``: collect once, then leave
    every object alive now out of the cycle collector's passes (``gc.freeze``). A coordinator holds ~200,000
    objects from its imports and start-up (torch, numpy, onnx) for as long as it runs; each full collection
    walked them all, 88-94 ms with the event loop stopped, every minute or two under bench/load.py's load.
    Objects made later are collected as before (the frozen ones are still freed by their reference counts;
    only a cycle among them would stay)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while not ready() and loop.time() < deadline:
        await asyncio.sleep(poll_s)
    gc.collect()
    gc.freeze()


async def watching_loop(app: web.Application):
    """A ``cleanup_ctx``: the app's observer watches the event loop while the app runs."""
    watch = asyncio.ensure_future(app[OBSERVER].watch_loop())
    yield
    watch.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watch


@web.middleware
async def middleware(request: web.Request, handler):
    """Time the request once; record it in the histogram and, when on, the access log."""
    started, status, size = time.perf_counter(), 500, None
    try:
        response = await handler(request)
        status, size = response.status, body_size(response)
        return response
    except web.HTTPException as e:   # the router's 404/405 and aiohttp's own refusals
        status, size = e.status, body_size(e)
        raise
    except asyncio.CancelledError:
        status = CLIENT_CLOSED
        raise
    finally:
        request.app[OBSERVER].record(request, status, time.perf_counter() - started, size)


def log_access_to(stream: TextIO = sys.stderr) -> None:
    """Send ``crowdtrain.access`` records, as they are (one JSON object a line), to ``stream``, apart from
    the other logs (whose lines carry a time and a level); idempotent."""
    if not any(getattr(h, "crowdtrain_access", False) for h in ACCESS_LOG.handlers):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.crowdtrain_access = True
        ACCESS_LOG.addHandler(handler)
    ACCESS_LOG.setLevel(logging.INFO)
    ACCESS_LOG.propagate = False


# ---------------------------------------------------------------------------- reading the histogram back
def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The ``q`` quantile of a histogram's cumulative ``(upper bound, count)`` buckets (ending with +Inf),
    interpolated linearly inside the bucket it falls in, as Prometheus' ``histogram_quantile`` does (in the
    +Inf bucket: the highest finite bound). None for an empty histogram."""
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = bound, count
    return lower


def loop_lag(expositions: list[str]) -> dict[str, Any] | None:
    """The event loop's lag (``LOOP_LAG_SECONDS``) in the ``/metrics`` texts of one or more processes, summed:
    ticks and p50/p95/p99 in ms (``summary``); None where no process exposes it."""
    from prometheus_client.parser import text_string_to_metric_families

    by_bound: dict[float, float] = {}
    for text in expositions:
        for family in text_string_to_metric_families(text):
            if family.name == LOOP_LAG_SECONDS:
                for sample in family.samples:
                    if sample.name == LOOP_LAG_SECONDS + "_bucket":
                        le = float(sample.labels["le"])
                        by_bound[le] = by_bound.get(le, 0.0) + sample.value
    return summary(by_bound) if by_bound else None


def summary(by_bound: dict[float, float]) -> dict[str, Any]:
    """Observations and p50/p95/p99 in ms (interpolated in the buckets) of one histogram's cumulative
    counts by upper bound."""
    cumulative = sorted(by_bound.items())
    row: dict[str, Any] = {"n": int(cumulative[-1][1])}
    for q in (0.50, 0.95, 0.99):
        value = quantile(cumulative, q)
        row[f"p{round(q * 100)}_ms"] = None if value is None else 1e3 * value
    return row


def request_latency(expositions: list[str]) -> dict[str, dict[str, Any]]:
    """``latency`` of the ``/metrics`` texts of one or more processes, their histograms summed."""
    from prometheus_client.parser import text_string_to_metric_families

    return latency(family for text in expositions for family in text_string_to_metric_families(text))


def latency(families: Iterable[Metric]) -> dict[str, dict[str, Any]]:
    """``METHOD route`` -> requests, p50/p95/p99 in ms (interpolated in the buckets) and requests by
    status class, from the request histogram's families (several: summed)."""
    buckets: dict[str, dict[float, float]] = {}
    statuses: dict[str, dict[str, float]] = {}
    for family in families:
        if family.name != REQUEST_SECONDS:
            continue
        for sample in family.samples:
            key = f"{sample.labels.get('method')} {sample.labels.get('route')}"
            if sample.name == REQUEST_SECONDS + "_bucket":
                le = float(sample.labels["le"])
                buckets.setdefault(key, {})[le] = buckets.get(key, {}).get(le, 0.0) + sample.value
            elif sample.name == REQUEST_SECONDS + "_count":
                s = statuses.setdefault(key, {})
                s[sample.labels["status"]] = s.get(sample.labels["status"], 0.0) + sample.value
    out = {}
    for key, by_bound in sorted(buckets.items()):
        row = summary(by_bound)
        row["statuses"] = {k: int(v) for k, v in sorted(statuses.get(key, {}).items())}
        out[key] = row
    return out
