"""The coordinator's HTTP service: ``create_app(config)`` does all the wiring.

Routes (docs/protocol.md): ``POST /api/v1/units/next``, ``GET /api/v1/blobs/<id>``,
``POST /api/v1/units/<unit_id>/result``, ``GET /api/v1/steps/<model>/<batch>`` (a browser
worker's training-step graph, ``coordinator.steps``), ``POST /api/v1/workers/<worker_id>/name``
(a display name, ``coordinator.credit``); for people and monitors: ``GET /``
(the donate page, ``coordinator.web``), ``GET /api/status``, ``GET /metrics``, ``GET /dashboard``,
``GET /leaderboard`` and ``GET /api/v1/credit`` (credit), ``GET /api/v1/donate`` (what a tab downloads); for the operator: ``/api/v1/admin/jobs`` (several jobs
in one process, ``coordinator.jobs``; each job's dashboard at ``/jobs/<job>/dashboard``). Handlers are short: domain errors become 4xx JSON
bodies that name the field, and no traceback ever reaches a client. Unit requests are rate
limited per worker id and per address (429 ``rate_limited``), and with ``--worker-tokens`` the
two worker routes need an operator's token (401 ``unauthorized``): ``coordinator.limits``.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import gzip
import logging
import re
import time
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from contract.codecs import strict_json
from contract.errors import ContractError, Said
from contract.names import NameRequest
from contract.units import ID_RE, WORKER_KEY_HEADER, WORKER_KEY_RE, UnitRequest, is_blob_id
from coordinator import observe
from coordinator.credit import BOARD, LIST_DEFAULT, LIST_MAX, NAME_RATE_PER_MIN, CreditBoard, NamesFull, donate_info, \
    render_page
from coordinator.config import CoordinatorConfig
from coordinator.limits import (RateLimiter, UnitLimits, carries, client_address, gate_tokens, is_loopback,
                                load_tokens, retry_after, trusted_tokens)
from coordinator.intake import Rejection, contract_rejection
from coordinator.job import Job
from coordinator.jobs import Entry, JobError, JobRegistry
from coordinator.keys import ADMIN, ASSETS, CONFIG, EVALS, JOB, JOBS, LIMITS, STEPS, TOKENS, TRUSTED, WARM
from coordinator.model_out import get_model
from coordinator.steps import StepGraphs, StepUnavailable, step_cache_dir
from coordinator.threads import helper_threads
from coordinator.web import ISOLATION, Assets
from models.data import default_cache_dir

log = logging.getLogger("crowdtrain.coordinator")
DASHBOARD = Path(__file__).parent / "dashboard"
IMMUTABLE = "public, max-age=31536000, immutable"
RETRY_AFTER_S = 5
CHECKS_PENDING = ("this worker's results wait for their checks (a new worker's are all checked until it earns "
                  "trust): no new unit until one is decided")
EXPIRE_EVERY_S = 1.0
TRIM_EVERY_S = 10.0             # how often the C heap's free pages go back to the OS (release_memory)
FRESH_BASE_WAIT_S = 2.0        # how long a unit request waits for results already logged to be folded
REQUEST_MAX_BYTES = 64 * 1024   # a UnitRequest is a few hundred bytes
JSON_MAX_DEPTH = 8              # a UnitRequest nests two levels (an object of lists)
BODY_MIN_SECONDS = 10.0         # a body may take this long, plus its size at BODY_MIN_RATE
BODY_MIN_RATE = 64 * 1024       # bytes/s: a slower sender is cut off with a 408 (it holds a connection)
# every server of the coordinator is made with these (run_app, AppRunner): a request's body is taken as sent,
# never inflated by aiohttp's parser (a gzip body of a few KB inflates to GBs before a handler counts a byte,
# and an encoding aiohttp cannot decode was a 400 with a traceback in the log); an encoded body is refused
SERVER_ARGS = {"auto_decompress": False}
BATCH_RE = re.compile(r"[0-9]{1,9}")
VERSION_RE = re.compile(r"final|best|[0-9]{1,15}")
LIMIT_RE = re.compile(r"[0-9]{1,7}")
NAME_LIMITS = web.AppKey("name_limits", RateLimiter)   # name changes per address


class UnparsedRequests(logging.Filter):
    """aiohttp's server answers a request it cannot parse (a bad request line, header or chunk: the client's
    fault) with its own 400 and logs it at ERROR with a traceback, a page of log per hostile request; here it
    becomes one INFO line naming the problem. Errors of the server's own stay as they are."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and 400 <= (exc.code or 0) < 500:
            record.msg, record.args = f"{record.getMessage()}: {exc.code} {type(exc).__name__}: {exc.message}", ()
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def quiet_unparsed_requests() -> None:
    """``UnparsedRequests`` on aiohttp's server logger, once (every app of a process calls it)."""
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, UnparsedRequests) for f in server_log.filters):
        server_log.addFilter(UnparsedRequests())


def error(code: str, status: int, message: str, field: str = "") -> web.Response:
    return web.json_response({"error": {"code": code, "field": field, "message": message}}, status=status)


@web.middleware
async def errors_as_json(request: web.Request, handler):
    """Rejections become their 4xx body; anything unexpected a 500 without a traceback."""
    try:
        return await handler(request)
    except Rejection as r:
        return web.json_response(r.body(), status=r.status)
    except JobError as e:
        return error(e.code, e.status, str(e), e.field)
    except web.HTTPException as e:
        if e.status >= 400 and (request.path.startswith(("/api/", "/jobs/")) or request.path == "/metrics"):
            code = "too_large" if e.status == 413 else "http"
            return error(code, e.status, f"{request.method} {request.path}: {e.reason}")
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return error("internal", 500, "internal error; see the coordinator's log")


@web.middleware
async def worker_tokens(request: web.Request, handler):
    """With ``--worker-tokens``: a unit request or a result without a known bearer token is refused."""
    tokens = request.app[TOKENS]
    if (tokens and request.method == "POST" and request.path.startswith("/api/v1/units/")
            and not carries(request.headers.get("Authorization"), tokens)):
        return error("unauthorized", 401, "Authorization: expected 'Bearer <token>' with a worker token this "
                     "coordinator's operator issued", "Authorization")
    return await handler(request)


# ---------------------------------------------------------------------------- input
def body_seconds(size: int) -> float:
    """How long a body of ``size`` bytes may take to arrive."""
    return BODY_MIN_SECONDS + size / BODY_MIN_RATE


def slow_sender(seconds: float, got: int) -> Rejection:
    return Rejection("timeout", 408, f"body: expected it within {seconds:.0f} s, got {got} bytes by then", "body")


def encoded(request: web.Request) -> Rejection | None:
    """A 415 for a body that says it is compressed: workers and tabs send bodies as they are, and the servers
    do not inflate them (``SERVER_ARGS``)."""
    coding = request.headers.get("Content-Encoding", "").strip().lower()
    if coding in ("", "identity"):
        return None
    return Rejection("unsupported_encoding", 415, f"Content-Encoding: expected none (a body as it is), got "
                     f"{coding[:40]!r}", "Content-Encoding")


async def read_body(request: web.Request) -> bytes:
    """The whole body (its Content-Length already checked), or a 408 ``Rejection`` for a slow sender, a 415
    for an encoded one."""
    if (refused := encoded(request)) is not None:
        raise refused
    if not request.body_exists:   # aiohttp's one shared empty stream: its iter_chunks() ends only the first
        return b""                # time, then yields (b"", True) forever without awaiting (the loop spun)
    seconds = body_seconds(request.content_length or 0)
    chunks = []
    try:
        async with asyncio.timeout(seconds):   # the chunks joined once (request.read() copies twice, and
            async for chunk, _ in request.content.iter_chunks():   # iter_any joins what is buffered)
                chunks.append(chunk)
            return b"".join(chunks)
    except TimeoutError:
        raise slow_sender(seconds, request.content.total_bytes) from None


async def read_json(request: web.Request, field: str) -> object:
    """The body as strict JSON (UTF-8, no duplicate keys, no NaN, at most ``JSON_MAX_DEPTH`` deep,
    at most ``REQUEST_MAX_BYTES``); a ``Rejection`` naming ``field`` otherwise."""
    if (refused := encoded(request)) is not None:
        raise refused
    too_large = f"body: expected at most {REQUEST_MAX_BYTES} bytes, got "
    if request.content_length is not None and request.content_length > REQUEST_MAX_BYTES:
        raise Rejection("too_large", 413, too_large + str(request.content_length), "body")
    raw = bytearray()
    seconds = body_seconds(REQUEST_MAX_BYTES)
    try:
        async with asyncio.timeout(seconds):
            async for chunk in request.content.iter_chunked(1 << 14):
                raw += chunk
                if len(raw) > REQUEST_MAX_BYTES:
                    raise Rejection("too_large", 413, too_large + "more", "body")
    except TimeoutError:
        raise slow_sender(seconds, len(raw)) from None
    try:
        value = strict_json(bytes(raw), field)
        if json_depth(value) > JSON_MAX_DEPTH:
            raise ContractError(field, f"JSON nested at most {JSON_MAX_DEPTH} levels deep", Said("deeper JSON"))
    except ContractError as e:
        raise contract_rejection(e) from None
    return value


def json_depth(value: object) -> int:
    """Nesting depth of parsed JSON (a scalar is 0, ``[1]`` is 1), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


# ---------------------------------------------------------------------------- work
async def next_unit(request: web.Request) -> web.Response:
    """A unit from the first active job, least recently served first, that cuts one for this worker
    (``JobRegistry.candidates``); with one job, that job's unit or its 204."""
    registry = request.app[JOBS]
    job = registry.first.job
    raw = await read_json(request, "request")
    try:
        unit_request = UnitRequest.from_json(raw)
    except ContractError as e:
        raise contract_rejection(e) from None
    address = client_address(request.remote, request.headers.get("X-Forwarded-For"))
    wait = request.app[LIMITS].wait(address, unit_request.worker_id)
    if wait > 0:
        job.store.count_rejection("rate_limited")
        cfg = job.config
        limits = " and ".join(f"{n:g} a minute per {what}" for n, what in ((cfg.unit_rate_worker, "worker"),
                                                                          (cfg.unit_rate_address, "address")) if n)
        limited = error("rate_limited", 429, f"request: expected at most {limits} unit requests; retry in "
                        f"{retry_after(wait)} s", "request")
        limited.headers["Retry-After"] = retry_after(wait)
        return limited
    key = worker_key(request)
    refused = key_refusal(registry, unit_request.worker_id, key)
    if refused is not None:
        return refused
    reason, own = None, trusted(request)
    for entry in registry.candidates():
        if entry.removed:   # removed while an earlier candidate was asked
            continue
        why = browser_wait(entry) if unit_request.backend == "browser" else None
        if why is not None:
            reason = reason or why
            continue
        with entry.using() as job:
            await fresh_base(job, unit_request.worker_id)
            # the unit's base model is written (off the event loop) before the unit names it
            base = await job.publish(unit_request.worker_id)
            # and a version delta to it from what the worker holds, or its fp16 copy (or an older base's)
            base, asked = await job.prepare_download(unit_request, base)
            # answered without waiting for the unit's row to be durable (an fdatasync): kill -9 loses no
            # written row, and a power loss only the units issued in its last moments, whose results are
            # then refused as unknown_unit; an accepted result's own fdatasync covers its unit's row
            # (SQLite commits in order)
            unit = job.next_unit(asked, address, base, trusted=own, key=key)
            if unit is None and job.awaits_checks(unit_request.worker_id, own):
                reason = reason or CHECKS_PENDING
        if unit is not None:
            entry.served = time.monotonic()
            return web.Response(text=unit.wire, content_type="application/json")   # the JSON it keeps
    if reason is not None:
        return web.Response(status=204, headers={"Retry-After": str(RETRY_AFTER_S), "X-Crowdtrain-Reason": reason})
    headers = {"Retry-After": str(RETRY_AFTER_S)}
    if registry.finished():   # every job's budget is spent (a paused job that is not keeps workers waiting)
        headers["X-Crowdtrain-Finished"] = "true"
    return web.Response(status=204, headers=headers)


async def fresh_base(job: Job, worker_id: str | None = None) -> None:
    """Before a unit is cut, fold the results already logged and due (the asker's own last one),
    waiting at most ``FRESH_BASE_WAIT_S``: a unit whose base lacks its worker's previous result
    arrives one version staler, which costs accuracy at equal samples (bench/parity_lab.py: 8.8
    points with 2 workers). A worker with no result waiting to be folded (it handed its unit back,
    or its result is in) does not wait: under a stream of other workers' results, every request
    would otherwise wait for a fold (bench/load.py); nor does any worker while the job is crowded
    (``Job.crowded``: so many units out that one more missing result costs little). The fold is
    shielded: a request that stops waiting does not cut it short."""
    if not (job.work.is_set() or job.lock.locked()):
        return
    if worker_id is not None and (not job.awaits_fold(worker_id) or job.crowded()):
        return
    try:
        await asyncio.wait_for(asyncio.shield(job.settle()), FRESH_BASE_WAIT_S)
    except asyncio.TimeoutError:
        pass
    except Exception as e:   # the aggregation task retries it; the unit is cut from what is folded
        log.warning("folding before a unit request failed: %s", e)


def browser_wait(entry: Entry) -> str | None:
    """Why a browser gets no unit of this job now (None: it may have one): browser units are handed
    out only once the step graph of the job's batch size is built, and never if it cannot be."""
    if entry.steps is None:
        return "the coordinator is preparing the browser's training graph"
    try:
        ready = entry.steps.manifest(entry.job.recipe.batch_size) is not None
    except StepUnavailable as e:
        return f"browser workers cannot train {entry.job.config.model!r}: {e}"
    return None if ready else "the coordinator is preparing the browser's training graph"


async def step_manifest(request: web.Request) -> web.Response:
    """A step graph of a job's model (the job with that model and the largest batch, the first job first)."""
    model, raw = request.match_info["model"], request.match_info["batch"]
    entries = [e for e in request.app[JOBS].entries.values() if e.steps is not None]
    with_model = [e for e in entries if e.job.config.model == model]
    if not with_model:
        models = sorted({e.job.config.model for e in entries})
        wanted = f"this job's model {models[0]!r}" if len(models) == 1 else f"one of this coordinator's models {models}"
        return error("unknown_model", 404, f"model: expected {wanted}, got {model!r}", "model")
    entry = max(with_model, key=lambda e: e.job.recipe.batch_size)
    job = entry.job
    batch = int(raw) if BATCH_RE.fullmatch(raw) else 0
    if not 1 <= batch <= job.recipe.batch_size:
        return error("invalid", 400, f"batch: expected an integer in [1, {job.recipe.batch_size}], got {raw!r}",
                     "batch")
    try:
        manifest = entry.steps.manifest(batch)
    except StepUnavailable as e:
        return error("no_browser_step", 501, f"model {model!r} cannot be trained in a browser: {e}", "model")
    if manifest is None:
        busy = error("building", 503, f"the step graph for {model!r} at batch {batch} is being built; retry", "batch")
        busy.headers["Retry-After"] = "2"
        return busy
    return web.json_response(manifest, headers={"Cache-Control": "no-cache"})


async def get_blob(request: web.Request) -> web.Response:
    blob_id = request.match_info["blob_id"]
    path = request.app[JOBS].blob_path(blob_id) if is_blob_id(blob_id) else None
    if path is None:
        return error("unknown_blob", 404, f"blob: expected the id of a model version or data shard, got {blob_id!r}",
                     "blob")
    headers = {"ETag": f'"{blob_id}"', "Cache-Control": IMMUTABLE}
    if request.headers.get("If-None-Match") in (f'"{blob_id}"', blob_id):
        return web.Response(status=304, headers=headers)
    try:
        body = await asyncio.to_thread(path.read_bytes)
    except FileNotFoundError:
        return error("unknown_blob", 404, f"blob {blob_id} is no longer kept", "blob")
    if gzip_for_browser(request) and is_step_graph(request.app, blob_id):
        body = await gzipped_graph(blob_id, body)
        headers.update({"Content-Encoding": "gzip", "Vary": "Accept-Encoding"})
    return web.Response(body=body, headers=headers, content_type="application/octet-stream")


_GZIPPED: dict[str, bytes] = {}   # step graph blob id -> its gzip bytes (a few per job)


def gzip_for_browser(request: web.Request) -> bool:
    """A browser's fetch (fetch metadata, or at least a Referer: Chromium sends Sec-Fetch-* only to
    secure origins and localhost) that accepts gzip: it decodes the body before the tab checks the
    blob's hash. Other clients get blobs as stored, whatever they accept, so the bytes they save
    hash to the blob's id."""
    headers = request.headers
    return "gzip" in headers.get("Accept-Encoding", "") and ("Sec-Fetch-Mode" in headers or "Referer" in headers)


def is_step_graph(app: web.Application, blob_id: str) -> bool:
    """A step graph blob (ONNX: names and shapes, no weights) shrinks about 12x with gzip; model
    versions and shards hardly shrink, so they are sent as stored."""
    return any(e.manifest is not None and blob_id in (e.manifest["graph"], e.manifest["webgpu"]["graph"])
               for job in app[JOBS].entries.values() if job.steps is not None for e in job.steps.entries.values())


async def gzipped_graph(blob_id: str, body: bytes) -> bytes:
    """The gzip bytes of a step graph, compressed once (in a thread) and kept."""
    if blob_id not in _GZIPPED:
        packed = await asyncio.to_thread(lambda: gzip.compress(body, 6, mtime=0))
        while len(_GZIPPED) >= 8:
            _GZIPPED.pop(next(iter(_GZIPPED)))
        _GZIPPED[blob_id] = packed
    return _GZIPPED[blob_id]


async def submit_result(request: web.Request) -> web.Response:
    with request.app[JOBS].entry_of_unit(request.match_info["unit_id"]).using() as job:
        return await take_result(request, job)


async def take_result(request: web.Request, job: Job) -> web.Response:
    if request.content_length is None or request.content_length > job.max_body:
        job.store.count_rejection("too_large")
        size = "no Content-Length" if request.content_length is None else f"{request.content_length} bytes"
        return error("too_large", 413, f"body: expected a Content-Length of at most {job.max_body} bytes, got {size}",
                     "body")
    body = await read_body(request)
    return web.json_response(await job.submit(request.match_info["unit_id"], body, trusted=trusted(request)))


def trusted(request: web.Request) -> bool:
    """Whether the request carries a token of the operator's own workers (``--trusted-tokens``)."""
    return carries(request.headers.get("Authorization"), request.app[TRUSTED])


def worker_key(request: web.Request) -> str | None:
    """The request's worker key (``WORKER_KEY_HEADER``), None without one; a malformed one is a 400 (which does
    not repeat the key: it is a secret)."""
    key = request.headers.get(WORKER_KEY_HEADER)
    if key is not None and not WORKER_KEY_RE.fullmatch(key):
        raise JobError("invalid", 400, f"{WORKER_KEY_HEADER}: expected 22 to 128 characters of A-Z a-z 0-9 _ - "
                       f"(base64url), got {len(key)} characters", WORKER_KEY_HEADER)
    return key


def key_refusal(registry: JobRegistry, worker_id: str, key: str | None) -> web.Response | None:
    """The answer to a request for ``worker_id`` carrying ``key`` (``worker_key``) that is not the key the id is
    bound to in one of the jobs (``TrustBook.key_matches``; counted as that job's ``worker_key`` refusal); else
    None: it may act as the id, and an unbound id that comes with a key is bound to it now, before any await (two
    first requests cannot both)."""
    for entry in registry.entries.values():
        if not entry.job.trust.key_matches(worker_id, key):
            entry.job.store.count_rejection("worker_key")
            return error("worker_key", 403, f"{WORKER_KEY_HEADER}: expected the key worker id {worker_id!r} was first "
                         "seen with (an id is bound to the key of its first request that carried one); a worker "
                         "without it needs an id of its own", WORKER_KEY_HEADER)
    if key is not None:   # bound now, in the first job (a job that serves it binds it too: TrustBook.seen)
        registry.first.job.trust.bind(worker_id, key)
    return None


async def model_file(request: web.Request) -> web.StreamResponse:
    """``GET /api/v1/model[?job=NAME]`` (``coordinator.model_out``), once ``version`` is one it can look up."""
    version = request.query.get("version")
    if version and not VERSION_RE.fullmatch(version):
        return error("invalid", 400, f"version: expected a version number, 'final' or 'best', got {version[:40]!r}",
                     "version")
    name = request.query.get("job")   # another job's model (coordinator.jobs); the first job's by default
    return await get_model(request, None if name is None else request.app[JOBS].get(name).job)


# ---------------------------------------------------------------------------- visibility
async def status(request: web.Request) -> web.Response:
    """``/api/status`` (the first job; ``?job=NAME`` another) and ``/jobs/<job>/api/status`` (its dashboard's)."""
    registry = request.app[JOBS]
    name = request.match_info.get("job", request.query.get("job"))
    entry = registry.first if name is None else registry.get(name)
    body = entry.job.status().to_json()
    body["jobs"] = [e.describe(public=True) for e in registry.entries.values()]
    body["donate_url"] = str(request.url.origin()) + "/"
    body["browser_graph"] = entry.steps.state(entry.job.recipe.batch_size) if entry.steps is not None else "not started"
    body["request_latency"] = request.app[observe.OBSERVER].work_latency()   # this process's, since it started
    if not is_loopback(client_address(request.remote, request.headers.get("X-Forwarded-For"))):
        anonymous(body, request.app[BOARD].names.tag)
    return web.json_response(body)


def anonymous(body: dict, tag) -> None:
    """A status as anyone but the operator on this machine sees it: each worker id replaced by its anonymous tag
    (the leaderboard's). An id is its worker's identity, the bearer of its trust and its name
    (``POST /api/v1/workers/<id>/name``): published, a stranger could claim a trusted worker's id that is not
    bound to a key (``key_refusal``). A worker's runtime note is left out too: its free text is the operator's to
    read, not a billboard."""
    for key in ("workers", "trust"):
        for row in body.get(key) or ():
            row["worker_id"] = tag(row["worker_id"])
    for row in body.get("workers") or ():
        row["runtime_note"] = None   # (a worker's own words: the operator's to read)


async def prometheus(request: web.Request) -> web.Response:
    """``GET /metrics``: the job's state, this process's memory and request latencies (``coordinator.observe``);
    worker ids, as in ``/api/status``, only to a client on this machine."""
    view = None
    if not is_loopback(client_address(request.remote, request.headers.get("X-Forwarded-For"))):
        view = functools.partial(anonymous, tag=request.app[BOARD].names.tag)
    return request.app[observe.OBSERVER].exposition(request.headers.get("Accept"),
                                                    request.headers.get("Accept-Encoding"), view)


async def dashboard(request: web.Request) -> web.FileResponse:
    """The dashboard page (the first job's at ``/dashboard``, a job's at ``/jobs/<job>/dashboard``: the page
    reads the ``api/status`` next to its own path)."""
    if "job" in request.match_info:
        request.app[JOBS].get(request.match_info["job"])
    return web.FileResponse(DASHBOARD / "index.html", headers={"Cache-Control": "no-cache"})


async def index(request: web.Request) -> web.Response:
    """The donate page: opening it (and pressing Start) makes this tab a worker."""
    return web.Response(text=request.app[ASSETS].page(), content_type="text/html",
                        headers={"Cache-Control": "no-cache", **ISOLATION})


async def static(request: web.Request) -> web.StreamResponse:
    return await request.app[ASSETS].serve(request)


# ---------------------------------------------------------------------------- credit (coordinator.credit)
async def credit(request: web.Request) -> web.Response:
    """``GET /api/v1/credit[?worker=ID][&limit=N]``: the ranking (names and anonymous tags, never
    worker ids), totals, and with ``worker`` that worker's own row as ``me``."""
    worker, limit = request.query.get("worker"), request.query.get("limit")
    if worker is not None and not ID_RE.fullmatch(worker):
        return error("invalid", 400, f"worker: expected a worker id matching {ID_RE.pattern}, got {worker[:40]!r}",
                     "worker")
    if limit is not None and not (LIMIT_RE.fullmatch(limit) and 1 <= int(limit) <= LIST_MAX):
        return error("invalid", 400, f"limit: expected an integer in [1, {LIST_MAX}], got {limit[:40]!r}", "limit")
    body = request.app[BOARD].answer(worker, int(limit) if limit else LIST_DEFAULT)
    return web.json_response(body, headers={"Cache-Control": "no-cache"})


async def set_name(request: web.Request) -> web.Response:
    """``POST /api/v1/workers/<worker_id>/name`` with ``{"protocol": 1, "name": "..." | null}``: the id in
    the path is the bearer of identity (a tab's id lives only in its localStorage), with its key once bound."""
    worker_id = request.match_info["worker_id"]
    tokens = request.app[TOKENS]
    if tokens and not carries(request.headers.get("Authorization"), tokens):
        return error("unauthorized", 401, "Authorization: expected 'Bearer <token>' with a worker token this "
                     "coordinator's operator issued", "Authorization")
    address = client_address(request.remote, request.headers.get("X-Forwarded-For"))
    wait = 0.0 if not address or is_loopback(address) else request.app[NAME_LIMITS].wait(address)
    if wait > 0:
        limited = error("rate_limited", 429, f"request: expected at most {NAME_RATE_PER_MIN} name changes a minute "
                        f"per address; retry in {retry_after(wait)} s", "request")
        limited.headers["Retry-After"] = retry_after(wait)
        return limited
    if not ID_RE.fullmatch(worker_id):
        return error("invalid", 400, f"worker_id: expected an id matching {ID_RE.pattern}, got {worker_id[:40]!r}",
                     "worker_id")
    refused = key_refusal(request.app[JOBS], worker_id, worker_key(request))
    if refused is not None:
        return refused
    raw = await read_json(request, "name_request")
    try:
        name = NameRequest.from_json(raw).name
    except ContractError as e:
        raise contract_rejection(e) from None
    board = request.app[BOARD]
    try:
        board.names.set(worker_id, name)
    except NamesFull as e:
        return error("names_full", 409, f"name: {e}; this worker id can take part without one", "name")
    return web.json_response({"name": name, "tag": board.names.tag(worker_id)})


async def leaderboard(request: web.Request) -> web.Response:
    """The public leaderboard, rendered here (every name HTML-escaped; no script on the page)."""
    job = request.app[JOB]
    text = render_page(request.app[BOARD].answer(), job.config.job, job.config.model)
    return web.Response(text=text, content_type="text/html", headers={
        "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"})


async def donate(request: web.Request) -> web.Response:
    """``GET /api/v1/donate``: what a tab downloads and computes (the donate page shows it before Start), and
    whether only invited volunteers may work (``invited_only``: the operator's worker tokens are on)."""
    body = donate_info(request.app[JOB], request.app[ASSETS], request.app.get(STEPS))
    body["invited_only"] = bool(request.app[TOKENS])   # --worker-tokens: a tab needs a link with a token
    return web.json_response(body, headers={"Cache-Control": "no-cache"})


# ---------------------------------------------------------------------------- background work
_LIBC = None


def libc():
    """glibc's handle (None elsewhere: musl, macOS), for ``release_memory`` and ``reuse_large_buffers``."""
    global _LIBC
    if _LIBC is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else False
        except OSError:
            _LIBC = False
    return _LIBC or None


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters
LARGE_BUFFERS = 256 << 20   # buffers up to this size come from (and go back to) the heap, not mmap


def reuse_large_buffers() -> None:
    """Let glibc reuse freed buffers of up to ``LARGE_BUFFERS`` bytes instead of mapping fresh pages for
    each. By default a buffer above 32 MiB (a 10M-parameter model's fp32 delta: a result body, its
    decoded copy, each fold's new model) is mmapped and unmapped every time, and touching fresh pages
    cost about 0.75 ms a MB on this machine's VM: 30 ms for each such buffer, more than copying it
    (docs/results.md, "Large buffers reused, fp16 decoded by torch's cast"). ``release_memory`` hands the
    free pages back every ``TRIM_EVERY_S``."""
    lib = libc()
    if lib is not None:
        lib.mallopt(M_MMAP_THRESHOLD, LARGE_BUFFERS)
        lib.mallopt(M_TRIM_THRESHOLD, LARGE_BUFFERS)


def release_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc's ``malloc_trim``; nothing elsewhere). The
    request path allocates and frees many short-lived buffers in several threads, and glibc keeps what
    they freed: under load the RSS crept up by about 2 MB/s while the Python heap stayed flat."""
    lib = libc()
    if lib is not None:
        lib.malloc_trim(0)


async def expire_loop(job: Job) -> None:
    """Lease expiry every second; a WAL checkpoint and a trim of the C heap when due, in threads."""
    trimmed = time.monotonic()
    while True:
        await asyncio.sleep(EXPIRE_EVERY_S)
        try:
            job.expire_leases()
            await asyncio.to_thread(job.store.checkpoint)   # off the event loop
            if time.monotonic() - trimmed >= TRIM_EVERY_S:
                trimmed = time.monotonic()
                await asyncio.to_thread(release_memory)
        except Exception:
            log.exception("lease expiry failed")


async def aggregate_loop(job: Job) -> None:
    """The one place a job's updates are folded in: woken by each accepted result, off the request path."""
    while True:
        await job.work.wait()
        job.work.clear()
        try:
            await job.settle()
        except Exception:
            log.exception("aggregation failed")
            await asyncio.sleep(EXPIRE_EVERY_S)


async def finish_on_cancel(work):
    """Await ``work`` (a thread that reads the store); when cancelled (shutdown), let it finish first:
    the store must not close under a thread that is using it."""
    future = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise


EVAL_SHARE = 0.1   # evaluations take at most this share of the time (of one core) between them


def eval_pause(every_s: float, took_s: float) -> float:
    """Seconds to wait after an evaluation that took ``took_s``: ``every_s``, or longer so that evaluating
    takes at most ``EVAL_SHARE`` of the time. The evaluator shares the machine with whatever else runs there
    (local workers on the same cores: a 10 s evaluation of the whole test split every 30 s took a tenth of
    two cores' time from a 2-worker job, docs/results.md)."""
    return max(every_s, took_s * (1 - EVAL_SHARE) / EVAL_SHARE)


def timed_cpu(fn):
    """``(fn(), seconds)``: the CPU time the calling thread spent in ``fn``, capped by its wall time. An
    evaluation's cost is what it computed, not how long it waited for a core: measured on the wall clock, one
    slowed by other work on the machine (405 s beside a test suite where 30 s is usual, docs/results.md)
    held every later evaluation of that job back 9 x as long. With ``--threads`` above one, torch's own
    threads share the work and this thread's time is about the evaluation's wall time on an idle machine."""
    wall, cpu = time.perf_counter(), time.thread_time()
    out = fn()
    return out, min(time.thread_time() - cpu, time.perf_counter() - wall)


async def eval_loop(job: Job, seen: dict) -> None:
    """Evaluate the newest version every ``eval_every_s`` when it changed (off the request path), at most
    ``EVAL_SHARE`` of the time (``eval_pause`` of its CPU time, ``timed_cpu``) from the second evaluation on
    (the first runs while local workers start and pays one-off costs: 52 s against ~30 s for the next ones in a
    2-worker run, docs/results.md, so its share would hold the next back 470 s); the final version as soon as the job
    finishes."""
    while True:
        took = 0.0
        if job.step != seen.get("version"):
            step = job.step
            try:
                row, cost = await finish_on_cancel(asyncio.to_thread(timed_cpu, job.evaluate_current))
                job.record_eval(row)
                log.info("version %d: test accuracy %.2f%% after %d samples", row["version"], 100 * row["test_acc"],
                         row["samples"])
                took = cost if "version" in seen else 0.0
            except Exception:
                log.exception("evaluation of version %d failed", step)
            seen["version"] = step   # never evaluate the same version in a loop
        until = time.monotonic() + eval_pause(job.config.eval_every_s, took)
        while True:
            await asyncio.sleep(1.0 if job.finished else max(0.0, min(1.0, until - time.monotonic())))
            if job.finished or time.monotonic() >= until:
                break


def start_entry(app: web.Application, entry: Entry) -> None:
    """A job's background tasks (lease expiry, aggregation, evaluation) and its browser step graphs."""
    job = entry.job
    job.store.write_behind()   # a unit's insert and a hand-back's move off the event loop
    entry.steps = StepGraphs(job, step_cache_dir())
    entry.tasks = [asyncio.create_task(expire_loop(job)), asyncio.create_task(aggregate_loop(job)),
                   asyncio.create_task(eval_loop(job, entry.evals))]
    job.work.set()   # fold whatever the replay left due
    # the first tab should not wait for the export (--browser-graph on-demand: it does, and a coordinator
    # that no tab visits never exports)
    if app[WARM] and app[CONFIG].browser_graph == "at-start" and entry.steps.unavailable is None:
        entry.steps.manifest(job.recipe.batch_size)


async def stop_entry(entry: Entry) -> None:
    """Stop a job's tasks, then close it (its last version written)."""
    for task in entry.tasks:
        task.cancel()
    await asyncio.gather(*entry.tasks, return_exceptions=True)
    if entry.steps is not None:
        await entry.steps.close()
    entry.job.close()


async def job_ctx(app: web.Application):
    """Open the first job (data, store, replay) and bring back the registry's others before serving;
    stop the tasks and close every job on shutdown."""
    registry = app[JOBS]
    first = registry.first
    if first.job.store is None:
        await asyncio.to_thread(first.job.open)
    registry.start, registry.stop = (lambda entry: start_entry(app, entry)), stop_entry
    start_entry(app, first)
    app[STEPS] = first.steps
    await registry.restore()
    tasks = [asyncio.create_task(asyncio.to_thread(app[ASSETS].prepare))] if app[WARM] else []
    if app[WARM]:   # a real process (not a test's app): its start-up objects out of the collector's way, once
        batch = first.job.recipe.batch_size
        tasks.append(asyncio.create_task(observe.freeze_when(
            lambda: all(t.done() for t in tasks[:1]) and first.steps.state(batch) != "building"
            and bool(first.job.store.evals()))))
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for entry in list(registry.entries.values())[1:]:
        await stop_entry(entry)
    app[BOARD].close()
    await stop_entry(first)


# ---------------------------------------------------------------------------- the operator (coordinator.jobs)
def admin_registry(request: web.Request) -> JobRegistry:
    """The registry, for a request with an operator token (compared in constant time); a ``JobError`` (404: the
    admin API is off; 401: no such token) otherwise."""
    registry, tokens = request.app[JOBS], request.app[ADMIN]
    if not tokens or not registry.several:
        why = ("this coordinator keeps its job in Redis (--redis), which runs one job" if not registry.several else
               "start the coordinator with --admin-token-file FILE")
        raise JobError("admin_off", 404, f"the admin API is off: {why}", "")
    if not carries(request.headers.get("Authorization"), tokens):
        raise JobError("unauthorized", 401, "Authorization: expected 'Bearer <token>' with an operator token of "
                       "this coordinator's --admin-token-file", "Authorization")
    return registry


async def list_jobs(request: web.Request) -> web.Response:
    return web.json_response({"jobs": admin_registry(request).listing()}, headers={"Cache-Control": "no-cache"})


ADD_KEYS = ("job", "options")


async def add_job(request: web.Request) -> web.Response:
    """``POST /api/v1/admin/jobs`` with ``{"job": NAME, "options": {FIELD: VALUE, ...}}``: 201 once it is open."""
    registry = admin_registry(request)
    raw = await read_json(request, "body")
    if not isinstance(raw, dict):
        raise JobError("invalid", 400, f"body: expected an object with {' and '.join(ADD_KEYS)}, got "
                       f"{type(raw).__name__}", "body")
    for key in raw:
        if key not in ADD_KEYS:
            raise JobError("invalid", 400, f"{key[:40]}: expected only {', '.join(ADD_KEYS)}, got an unknown key",
                           key[:40])
    if "job" not in raw:
        raise JobError("invalid", 400, "job: expected the new job's name, got none", "job")
    entry = await registry.add(raw["job"], raw.get("options", {}))
    return web.json_response({"job": entry.describe()}, status=201)


async def pause_job(request: web.Request) -> web.Response:
    return web.json_response({"job": admin_registry(request).pause(request.match_info["job"]).describe()})


async def resume_job(request: web.Request) -> web.Response:
    return web.json_response({"job": admin_registry(request).resume(request.match_info["job"]).describe()})


async def remove_job(request: web.Request) -> web.Response:
    """``DELETE /api/v1/admin/jobs/<job>[?delete_state=true]``: its state stays on disk unless asked."""
    registry = admin_registry(request)
    delete = request.query.get("delete_state", "false")
    if delete not in ("true", "false"):
        raise JobError("invalid", 400, f"delete_state: expected true or false, got {delete[:40]!r}", "delete_state")
    return web.json_response(await registry.remove(request.match_info["job"], delete_state=delete == "true"))


# Every route but the dashboard's files (DASHBOARD_FILES); coordinator.cluster forwards the same templates.
ROUTES = (
    ("POST", "/api/v1/units/next", next_unit),
    ("GET", "/api/v1/blobs/{blob_id}", get_blob),
    ("POST", "/api/v1/units/{unit_id}/result", submit_result),
    ("GET", "/api/status", status),
    ("GET", "/metrics", prometheus),
    ("GET", "/dashboard", dashboard),
    ("GET", "/jobs/{job}/dashboard", dashboard),
    ("GET", "/jobs/{job}/api/status", status),
    ("GET", "/api/v1/admin/jobs", list_jobs),
    ("POST", "/api/v1/admin/jobs", add_job),
    ("POST", "/api/v1/admin/jobs/{job}/pause", pause_job),
    ("POST", "/api/v1/admin/jobs/{job}/resume", resume_job),
    ("DELETE", "/api/v1/admin/jobs/{job}", remove_job),
    ("GET", "/api/v1/steps/{model}/{batch}", step_manifest),
    ("GET", "/api/v1/model", model_file),
    ("GET", "/", index),
    ("GET", "/api/v1/credit", credit),
    ("POST", "/api/v1/workers/{worker_id}/name", set_name),
    ("GET", "/leaderboard", leaderboard),
    ("GET", "/api/v1/donate", donate),
    ("GET", "/static/{version}/{path:.+}", static),
)
DASHBOARD_FILES = "/dashboard/"   # its route template (the access log, the histogram): /dashboard/{filename}


def create_app(config: CoordinatorConfig, job: Job | None = None, warm: bool = False,
               several: bool = True) -> web.Application:
    """The app for ``job`` (the first of its registry, ``coordinator.jobs``; ``several``: False where the job's
    state is not this process's alone, ``--redis``); ``warm`` builds the browser's step graph and gzips the
    page's assets at start instead of on the first browser's request (servers do; most tests do not need to)."""
    reuse_large_buffers()
    quiet_unparsed_requests()
    job = job or Job(config)
    app = web.Application(middlewares=[observe.middleware, errors_as_json, worker_tokens],
                          client_max_size=job.max_body)
    app[observe.OBSERVER] = observe.Observer(lambda: job.status().to_json() if job.store is not None else None,
                                             config.access_log)
    app[CONFIG], app[JOB] = config, job
    app[JOBS] = JobRegistry(config, job, several)
    app[EVALS] = app[JOBS].first.evals
    app[ADMIN] = (load_tokens(config.admin_token_file, "--admin-token-file") if config.admin_token_file and several
                  else frozenset())
    app[LIMITS] = UnitLimits(config.unit_rate_worker, config.unit_rate_address, time.monotonic)
    app[TRUSTED] = trusted_tokens(config)
    app[TOKENS] = gate_tokens(config, app[TRUSTED])   # the file read once
    app[ASSETS], app[WARM] = Assets(default_cache_dir()), warm
    app[BOARD] = CreditBoard(lambda: job.store)
    app[NAME_LIMITS] = RateLimiter(NAME_RATE_PER_MIN, time.monotonic)
    app.cleanup_ctx.append(helper_threads)   # first: the job's start-up work runs on helpers too
    app.cleanup_ctx.append(job_ctx)
    app.cleanup_ctx.append(observe.watching_loop)
    for method, path, handler in ROUTES:
        if method == "GET":
            app.router.add_get(path, handler)   # and HEAD
        else:
            app.router.add_route(method, path, handler)
    app.router.add_static(DASHBOARD_FILES, DASHBOARD)
    return app
