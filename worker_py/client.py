"""HTTP side of the Python worker: ask for units, fetch blobs through a verified disk cache,
submit results, and retry with exponential backoff while the coordinator is unreachable.

Standard library only (``urllib``), blocking, safe to share between the prefetch thread and
the main thread. Expected conditions never raise a traceback at the user:

- ``Unreachable``: connection refused, timeout, or a ``5xx`` answer; ``Client.retry`` waits
  (0.5 s doubling to 30 s, with jitter) and prints one line when the connection is lost and
  one when it is back; ``GaveUp`` once it has been unreachable for ``max_retry_time``
  seconds (None: forever).
- ``NotCoordinator``: before any crowdtrain answer, a host name that does not resolve or a
  server that is not a coordinator (HTTP 501, an ``/api/`` error without the contract's
  error body, a unit that is not JSON, not HTTP at all); retrying would not help.
- ``Refused``: a ``4xx`` answer with the contract's error body (``code``, ``field``, ``message``).
- ``BlobError``: a blob that is missing or whose sha256 is not its id.

The wire format itself lives in ``contract`` (docs/protocol.md); this module only moves it.
"""
from __future__ import annotations

import datetime
import email.utils
import http.client
import json
import os
import random
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from contract.units import WORKER_KEY_HEADER, UnitRequest, UnitResult, WorkUnit, blob_id, is_blob_id, pack_result

T = TypeVar("T")
USER_AGENT = "crowdtrain-worker/0.1 (python)"
REASON_HEADER = "X-Crowdtrain-Reason"       # on a 204 of units/next: why there is no unit now (text for people)
FINISHED_HEADER = "X-Crowdtrain-Finished"   # on a 204 of units/next: the job is over (proposed)
BACKOFF_START = 0.5                          # seconds before the first retry
BACKOFF_CAP = 30.0                           # longest wait between retries, seconds
DEFAULT_RETRY_AFTER = 5.0                    # a 204 without Retry-After, seconds
MAX_RETRY_AFTER = 300.0                      # longest Retry-After honoured, seconds
REQUEST_TIMEOUT = 30.0                       # per HTTP request (a blob download included), seconds
CLOCK_SLACK = 2.0                            # clock differences below this are ignored (Date has 1 s steps)
MAX_RETRY_TIME = 300.0                       # default: give up after this long unreachable, seconds


class Unreachable(Exception):
    """The coordinator cannot be reached, timed out, or answered 5xx (worth retrying)."""


class NotCoordinator(Exception):
    """The URL leads nowhere a coordinator could be: an unresolvable host name, or a server that
    answers but is not a crowdtrain coordinator. Raised only before the first crowdtrain answer."""


class GaveUp(Exception):
    """The coordinator has been unreachable for longer than the client's ``max_retry_time``."""


class Refused(Exception):
    """A 4xx answer: ``status``, the contract's error ``code``, ``field`` and ``message``."""

    def __init__(self, status: int, code: str, message: str, field: str = "") -> None:
        self.status, self.code, self.field, self.message = status, code, field, message
        super().__init__(f"HTTP {status} {code}: {message}")


class BlobError(Exception):
    """A blob that cannot be used: not found, or its bytes do not hash to its id."""


class Stopped(Exception):
    """A retry loop gave up because the worker is stopping or a deadline passed."""


@dataclass(frozen=True)
class NoWork:
    """A 204 from units/next: wait ``retry_after`` seconds; ``finished`` = the job is over; ``reason``: why, when
    the coordinator says (``X-Crowdtrain-Reason``)."""

    retry_after: float
    finished: bool = False
    reason: str | None = None


@dataclass(frozen=True)
class Accepted:
    """A 200 from a result submission."""

    staleness: int | None
    accepted: bool = True      # false: answered but not taken (a failed unit, or "superseded": another copy won)


def backoff_delays(start: float = BACKOFF_START, cap: float = BACKOFF_CAP,
                   rng: random.Random | None = None):
    """Endless waits for retries: ``start`` doubling up to ``cap``, each jittered to 50..100 %."""
    rng = rng or random.Random()
    delay = start
    while True:
        yield delay * (0.5 + 0.5 * rng.random())
        delay = min(cap, delay * 2)


def _reason(e: BaseException) -> str:
    """A short, one-line reason for a network failure."""
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        e = e.reason if isinstance(e.reason, BaseException) else Exception(str(e.reason))
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, TimeoutError):
        return "timed out"
    text = str(e) or type(e).__name__
    return text.splitlines()[0][:120]


def parse_retry_after(value: str | None, default: float = DEFAULT_RETRY_AFTER) -> float:
    """Seconds from a ``Retry-After`` header (delta-seconds only), clamped to 0..MAX_RETRY_AFTER."""
    try:
        seconds = float(value) if value is not None else default
    except ValueError:
        seconds = default
    return min(max(seconds, 0.0), MAX_RETRY_AFTER) if seconds == seconds else default


class BlobCache:
    """Content-addressed files ``root/<id[:2]>/<id>``; reads are verified, writes are atomic.

    Several workers may share one cache: a write goes to a temporary file in the same folder
    and is moved into place with ``os.replace``, so a reader sees a whole blob or none.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()

    def path(self, bid: str) -> Path:
        if not is_blob_id(bid):
            raise BlobError(f"blob id {bid[:80]!r}: expected 64 lowercase hex characters")
        return self.root / bid[:2] / bid

    def get(self, bid: str) -> bytes | None:
        """The cached bytes of ``bid``, or None (missing, unreadable, or corrupt: then removed)."""
        path = self.path(bid)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if blob_id(data) != bid:
            self.discard(bid)
            return None
        return data

    def put(self, bid: str, data: bytes) -> bool:
        """Store ``data`` under ``bid`` atomically; False (and no file) if the disk refuses."""
        path = self.path(bid)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{bid[:8]}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError:
            return False
        return True

    def discard(self, bid: str) -> None:
        try:
            self.path(bid).unlink(missing_ok=True)
        except OSError:
            pass


class Client:
    """The coordinator's HTTP API (docs/protocol.md, endpoints) for one worker.

    ``log`` prints one line (connection lost / back); ``cache`` is the disk cache of blobs
    (None: no disk cache); ``max_retry_time``: seconds ``retry`` keeps trying an unreachable
    coordinator before it raises ``GaveUp`` (None: forever). ``blob_gets`` counts blob
    downloads, for tests and the summary.
    """

    def __init__(self, base_url: str, cache: BlobCache | None = None,
                 log: Callable[[str], None] = print, timeout: float = REQUEST_TIMEOUT,
                 max_retry_time: float | None = MAX_RETRY_TIME, token: str | None = None,
                 worker_key: str | None = None) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"coordinator URL: expected http(s)://host[:port], got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.token = token   # an operator-issued worker token (a closed deployment's --worker-tokens)
        self.worker_key = worker_key   # this worker's secret, which its id is bound to (contract.units.WORKER_KEY_HEADER)
        self.cache = cache
        self.log = log
        self.timeout = timeout
        self.max_retry_time = max_retry_time
        self.blob_gets = 0
        self._lock = threading.Lock()
        self._down: str | None = None   # the reason while the coordinator is unreachable
        self._down_since = 0.0          # time.monotonic() when it became unreachable
        self._ever_up = False
        self._cache_warned = False
        self.skew = 0.0                 # seconds the local clock is ahead of the coordinator's

    # ------------------------------------------------------------------ raw HTTP
    def _request(self, method: str, path: str, body: bytes | None = None,
                 content_type: str | None = None) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) of a 2xx/3xx answer; ``Refused`` on 4xx, ``Unreachable`` otherwise."""
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json, application/octet-stream"}
        if content_type:
            headers["Content-Type"] = content_type
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.worker_key and (path == "/api/v1/units/next" or path.endswith("/name")):   # (the routes that need it)
            headers[WORKER_KEY_HEADER] = self.worker_key
        req = urllib.request.Request(self.base_url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                status, data = resp.status, resp.read()
                head = {k.lower(): v for k, v in resp.headers.items()}
        except urllib.error.HTTPError as e:
            data = _read_quietly(e)
            if e.code == 501 or (400 <= e.code < 500 and e.code not in (408, 429) and not _is_error_body(data)):
                self._not_coordinator(f"it answered {path} with HTTP {e.code} {e.reason}, not as a coordinator does")
            if e.code >= 500 or e.code in (408, 429):
                raise Unreachable(f"HTTP {e.code} from {path}") from None
            self._mark_up()
            raise _refused(e.code, data) from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, socket.gaierror):
                host = urllib.parse.urlsplit(self.base_url).hostname
                self._not_coordinator(f"the host name {host!r} does not resolve ({e.reason.strerror or e.reason})",
                                      plain=True)
            raise Unreachable(_reason(e)) from None
        except http.client.HTTPException as e:   # the other end does not speak HTTP
            self._not_coordinator(f"it does not answer in HTTP ({type(e).__name__})")
            raise Unreachable(_reason(e)) from None
        except (OSError, ValueError) as e:
            raise Unreachable(_reason(e)) from None
        self._mark_up()
        self._note_clock(head.get("date"))
        return status, head, data

    def _note_clock(self, date: str | None) -> None:
        """Track how far the local clock is from the coordinator's (its ``Date`` header)."""
        try:
            when = email.utils.parsedate_to_datetime(date)
        except (TypeError, ValueError):
            return
        if when.tzinfo is None:   # "-0000": UTC, by RFC 5322
            when = when.replace(tzinfo=datetime.timezone.utc)
        self.skew = time.time() - when.timestamp()

    def local_time(self, coordinator_time: float) -> float:
        """A coordinator timestamp (a unit's ``deadline``) on the local clock."""
        return coordinator_time + (self.skew if abs(self.skew) > CLOCK_SLACK else 0.0)

    def _not_coordinator(self, why: str, plain: bool = False) -> None:
        """Raise ``NotCoordinator`` unless a coordinator has answered before (then it is a
        passing fault, e.g. a proxy's page while the coordinator restarts: retried)."""
        if not self._ever_up:
            raise NotCoordinator(f"{self.base_url}: {why}" if plain else
                                 f"{self.base_url} is not a crowdtrain coordinator: {why}")

    def _mark_down(self, reason: str) -> None:
        with self._lock:
            first, self._down = self._down is None, reason
            if first:
                self._down_since = time.monotonic()
        if first:
            verb = "lost the connection to" if self._ever_up else "cannot reach"
            self.log(f"{verb} {self.base_url} ({reason}); retrying with backoff")

    def _mark_up(self) -> None:
        with self._lock:
            was_down, self._down, self._ever_up = self._down is not None, None, True
        if was_down:
            self.log(f"connected to {self.base_url}")

    def retry(self, call: Callable[[], T], stop: threading.Event | None = None,
              until: float | None = None) -> T:
        """``call()`` until it does not raise ``Unreachable``; ``Stopped`` once ``stop`` is set
        or the wall clock passes ``until`` (unix seconds); ``GaveUp`` once the coordinator has
        been unreachable for ``max_retry_time`` seconds."""
        delays = backoff_delays()
        while True:
            try:
                return call()
            except Unreachable as e:
                self._mark_down(str(e))
                down_for = time.monotonic() - self._down_since
                if self.max_retry_time is not None and down_for >= self.max_retry_time:
                    raise GaveUp(f"gave up: {self.base_url} unreachable for {down_for:.0f} s ({e}); "
                                 f"--max-retry-time {self.max_retry_time:g} (--forever: never give up)") from None
                wait = next(delays)
                if self.max_retry_time is not None:
                    wait = min(wait, max(0.05, self.max_retry_time - down_for))
                if until is not None and time.time() + wait > until:
                    raise Stopped(f"gave up: {e}") from None
                if stop is None:
                    time.sleep(wait)
                elif stop.wait(wait):
                    raise Stopped("stopping") from None

    # ------------------------------------------------------------------ endpoints
    def next_unit(self, request: UnitRequest) -> WorkUnit | NoWork | dict:
        """``POST /api/v1/units/next``: a ``WorkUnit``, ``NoWork``, or (a unit that breaks the
        contract) the raw JSON dict, so the caller can still report it as failed."""
        body = json.dumps(request.to_json()).encode("utf-8")
        status, head, data = self._request("POST", "/api/v1/units/next", body, "application/json")
        if status == 204 or not data:
            return NoWork(parse_retry_after(head.get("retry-after")), _says_finished(head, data),
                          head.get(REASON_HEADER.lower()) or None)
        try:
            d = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            self._not_coordinator(f"it answered units/next with HTTP {status} and no JSON")
            raise Refused(status, "invalid", "units/next: expected a WorkUnit JSON object") from None
        if isinstance(d, dict) and d.get("finished") is True and "unit_id" not in d:
            return NoWork(parse_retry_after(head.get("retry-after")), True)
        return d

    def step_manifest(self, model: str, batch_size: int) -> dict:
        """``GET /api/v1/steps/<model>/<batch>``: the browser step graph's manifest (coordinator/steps.py);
        ``Unreachable`` while the coordinator is still building it (503), so ``retry`` waits for it."""
        path = f"/api/v1/steps/{urllib.parse.quote(model, safe='')}/{int(batch_size)}"
        _, _, data = self._request("GET", path)
        try:
            manifest = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise Refused(200, "invalid", f"{path}: expected a step manifest") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("graph"), str):
            raise Refused(200, "invalid", f"{path}: expected a step manifest with a graph blob")
        return manifest

    def fetch_blob(self, bid: str, attempts: int = 2) -> bytes:
        """The blob ``bid`` from the disk cache, else downloaded, verified and cached.

        Raises ``BlobError`` (missing, or the bytes never hash to ``bid``), ``Unreachable``.
        """
        if self.cache is not None:
            data = self.cache.get(bid)
            if data is not None:
                return data
        elif not is_blob_id(bid):
            raise BlobError(f"blob id {bid[:80]!r}: expected 64 lowercase hex characters")
        for _ in range(attempts):
            try:
                _, _, data = self._request("GET", f"/api/v1/blobs/{bid}")
            except Refused as e:
                raise BlobError(f"blob {bid[:12]}: {e.message or e.code} (HTTP {e.status})") from None
            with self._lock:
                self.blob_gets += 1
            if blob_id(data) == bid:
                if self.cache is not None and not self.cache.put(bid, data) and not self._cache_warned:
                    self._cache_warned = True
                    self.log(f"cannot write the blob cache {self.cache.root}; blobs are kept in memory only")
                return data
        raise BlobError(f"blob {bid[:12]}: downloaded bytes hash to {blob_id(data)[:12]}, not to the blob id")

    def submit(self, result: UnitResult) -> Accepted:
        """``POST /api/v1/units/<unit_id>/result``; ``Refused`` carries the coordinator's code."""
        path = f"/api/v1/units/{urllib.parse.quote(result.unit_id, safe='')}/result"
        _, _, data = self._request("POST", path, pack_result(result), "application/octet-stream")
        try:
            answer = json.loads(data.decode("utf-8"))
            staleness, accepted = answer.get("staleness"), answer.get("accepted", True)
        except (UnicodeDecodeError, ValueError, AttributeError):
            staleness, accepted = None, True
        return Accepted(staleness if type(staleness) is int else None, accepted is not False)


def _read_quietly(e: urllib.error.HTTPError) -> bytes:
    try:
        return e.read()
    except OSError:
        return b""


def _refused(status: int, body: bytes) -> Refused:
    """A ``Refused`` from a 4xx body ``{"error": {"code", "field", "message"}}`` (or anything else)."""
    try:
        err = json.loads(body.decode("utf-8"))["error"]
        return Refused(status, str(err.get("code", "")), str(err.get("message", ""))[:500],
                       str(err.get("field", "")))
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        text = body.decode("utf-8", "replace").strip().splitlines()
        return Refused(status, "", (text[0] if text else "")[:200])


def _is_error_body(body: bytes) -> bool:
    """The contract's 4xx body, ``{"error": {"code": ...}}``: every ``/api/`` error of a coordinator."""
    try:
        err = json.loads(body.decode("utf-8"))["error"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        return False
    return isinstance(err, dict) and "code" in err


def _says_finished(head: dict[str, str], body: bytes) -> bool:
    """A 204 says the job is over: header ``X-Crowdtrain-Finished: true`` (or a JSON body
    ``{"finished": true}`` where a server sends one)."""
    if head.get(FINISHED_HEADER.lower(), "").strip().lower() in ("1", "true", "yes"):
        return True
    try:
        return json.loads(body.decode("utf-8")).get("finished") is True
    except (UnicodeDecodeError, ValueError, AttributeError):
        return False
