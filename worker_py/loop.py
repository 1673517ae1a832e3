"""The worker's loop: a fetch thread fetches the next unit and its blobs while the main thread
trains the current one (``worker_py.runner``), submits the result and reacts to the
coordinator's answer.

By default the next unit is asked for once the current one's result is submitted, so its base
includes that result. With ``prefetch`` it is asked for during the current one, as late as the
last fetch's duration allows (``worker_py.unit.prefetch_due``). While the coordinator is unreachable both threads wait
with exponential backoff, for at most the client's ``max_retry_time``; a URL that is not a
coordinator ends the worker at once (exit status 1). Once ``StopFlag`` is set no more units
are taken; the current one finishes if it completes within the grace period, else it is
handed back (at once after a second signal), as is the prefetched one.
"""
from __future__ import annotations

import dataclasses
import math
import threading
import time
from dataclasses import dataclass
from typing import Union

from contract.errors import ContractError
from contract.units import UnitRequest, UnitResult, WorkUnit, runtime_note
from models import registry
from models.train import describe_device, resolve_device, set_threads
from worker_py.client import Accepted, Client, GaveUp, NoWork, NotCoordinator, Refused, Stopped, backoff_delays
from worker_py.feedback import ErrorFeedback
from worker_py.progress import Progress
from worker_py.runner import Cancelled, Prepared, Runner
from worker_py.stop import StopFlag
from worker_py.unit import HAND_BACK, describe, failed_result, prefetch_due

HAND_BACK_SECONDS = 5.0   # how long a stopping worker tries to reach the coordinator, per unit
JOIN_SECONDS = 5.0        # how long shutdown waits for the prefetch thread
MIN_POLL = 0.05           # shortest wait between two units/next polls, seconds
DROP_CODES = ("lease_expired", "too_stale", "unknown_unit", "lease_invalid", "norm_bound", "too_large")
UPGRADE = "the coordinator speaks another protocol version; upgrade the worker"


@dataclass(frozen=True)
class Finished:
    """The coordinator says the job is over."""


@dataclass(frozen=True)
class Fatal:
    """The worker must stop with an error (another protocol version, an internal bug)."""

    message: str


@dataclass(frozen=True)
class Invalid:
    """A unit that breaks the contract: reported as failed when it names a unit and lease."""

    message: str
    result: UnitResult | None


Item = Union[Prepared, Finished, Fatal, Invalid]


class Prefetcher(threading.Thread):
    """Fetches one unit and its blobs ahead of the main thread, each time ``want()`` is called."""

    def __init__(self, client: Client, runner: Runner, request: UnitRequest, stop: StopFlag,
                 progress: Progress) -> None:
        super().__init__(name="crowdtrain-prefetch", daemon=True)
        self.client, self.runner, self.request, self.stop, self.progress = client, runner, request, stop, progress
        self._cond = threading.Condition()
        self._wanted = False
        self._item: Item | None = None
        self.fetch_seconds = 0.0   # how long the last unit + blobs took to arrive

    def want(self) -> None:
        with self._cond:
            self._wanted = True
            self._cond.notify_all()

    def pending(self) -> bool:
        with self._cond:
            return self._wanted or self._item is not None

    def take(self) -> Item | None:
        """The next item, waiting for it; None when stopping (or the thread ended)."""
        with self._cond:
            while self._item is None and not self.stop.is_set() and self.is_alive():
                self._cond.wait(0.2)
            if self.stop.is_set():
                return None
            item, self._item = self._item, None
            return item

    def leftover(self) -> WorkUnit | None:
        """A leased unit nobody computed (to hand back at shutdown)."""
        with self._cond:
            item, self._item = self._item, None
        return item.unit if isinstance(item, Prepared) else None

    def run(self) -> None:
        try:
            self._loop()
        except Exception as e:   # a bug: report it through the main thread, not as a thread traceback
            with self._cond:
                self._item = Fatal(f"internal error while fetching a unit: {describe(e)}")
                self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._wanted and not self.stop.is_set():
                    self._cond.wait(0.5)
                if self.stop.is_set():
                    return
            t0 = time.monotonic()
            try:
                item = self._fetch()
            except (GaveUp, NotCoordinator) as e:
                item = Fatal(str(e))
            self.fetch_seconds = time.monotonic() - t0
            with self._cond:
                self._wanted = False
                if item is not None:
                    self._item = item
                self._cond.notify_all()
            if item is None or isinstance(item, (Finished, Fatal)):
                return

    def _fetch(self) -> Item | None:
        """Ask until a unit comes (then fetch its blobs), the job is over, or the worker stops."""
        refusals = backoff_delays()
        while not self.stop.is_set():
            try:
                request = dataclasses.replace(self.request, held=self.runner.held())   # what it holds now
                answer = self.client.retry(lambda: self.client.next_unit(request), self.stop.event)
            except Stopped:
                return None
            except Refused as e:
                if e.code == "unsupported_protocol":
                    return Fatal(f"{UPGRADE} ({e.message})")
                if e.code == "worker_key":   # asking again cannot help
                    return Fatal(f"the coordinator holds worker id {self.request.worker_id} for another key "
                                 f"(worker_key): give it the key it was first used with ($CROWDTRAIN_WORKER_KEY "
                                 f"or --key-file), or run with another --worker-id")
                self.progress.say(f"units/next refused: {e}; asking again later")
                if self.stop.event.wait(next(refusals)):
                    return None
                continue
            if isinstance(answer, NoWork):
                if answer.finished:
                    return Finished()
                self.progress.idle(answer.retry_after, answer.reason)
                if self.stop.event.wait(max(answer.retry_after, MIN_POLL)):
                    return None
                continue
            self.progress.idle(None)
            return self._unit(answer)
        return None

    def _unit(self, d: dict) -> Item:
        try:
            unit = WorkUnit.from_json(d)
        except ContractError as e:
            if e.code == "unsupported_protocol":
                return Fatal(f"{UPGRADE} ({e})")
            return Invalid(f"the coordinator sent a unit that breaks the contract: {e}", _invalid_result(d, e,
                           self.request.worker_id))
        return self.runner.prepare(unit, self.stop.event)


def _invalid_result(d: dict, e: ContractError, worker_id: str) -> UnitResult | None:
    """A failed result for a malformed unit, if it names a unit, lease and base version."""
    try:
        return failed_result(d, worker_id, f"invalid unit: {e}")
    except (ContractError, AttributeError):
        return None


class Worker:
    """Takes units, computes, submits, reacts to the answers; ``run()`` gives the exit status."""

    def __init__(self, client: Client, runner: Runner, request: UnitRequest, stop: StopFlag,
                 progress: Progress, max_units: int | None = None, prefetch: bool = False) -> None:
        self.client, self.runner, self.request = client, runner, request
        self.stop, self.progress, self.max_units = stop, progress, max_units
        self.prefetch = prefetch
        self.fatal = False
        self.fetcher: Prefetcher | None = None
        self._unit_started = 0.0

    def _need_more(self, in_flight: int) -> bool:
        return self.max_units is None or self.progress.done + in_flight < self.max_units

    def run(self) -> int:
        fetcher = self.fetcher = Prefetcher(self.client, self.runner, self.request, self.stop, self.progress)
        fetcher.start()
        fetcher.want()
        try:
            while not self.stop.is_set() and not self.fatal:
                item = fetcher.take()
                if item is None:
                    break
                if isinstance(item, Finished):
                    self.progress.say("the coordinator says the job is finished; exiting")
                    break
                if isinstance(item, Fatal):
                    self.progress.say(item.message)
                    return 1
                if isinstance(item, Invalid):
                    self.progress.say(item.message)
                    if item.result is not None:
                        self._submit(item.result)
                elif isinstance(item, Prepared):
                    self._process(item)
                if self.max_units is not None and self.progress.done >= self.max_units:
                    break
                if self._need_more(in_flight=0) and not fetcher.pending():
                    fetcher.want()
        finally:
            self.stop.event.set()   # ends the prefetch thread
            fetcher.join(JOIN_SECONDS)
            unit = fetcher.leftover()
            if unit is not None:
                self._hand_back(unit, "prefetched, not started")
        return 1 if self.fatal else 0

    def _process(self, item: Prepared) -> None:
        unit = item.unit
        if item.stopped:
            self._hand_back(unit, "not started")
            return
        if time.time() >= self.client.local_time(unit.deadline):
            self.progress.say(f"unit {unit.unit_id}: its lease expired before it started; dropped")
            self.progress.dropped += 1
            return
        try:
            result = self.runner.compute(item, should_stop=self.stop.abandon,
                                         on_step=lambda i, n: self._on_step(unit.unit_id, i, n))
        except Cancelled:
            self._hand_back(unit, "stopping now" if self.stop.forced else "unfinished after the grace period")
            return
        if result.error is not None:
            self.progress.say(f"unit {unit.unit_id} failed: {result.error}")
        self._submit(result, self.client.local_time(unit.deadline))

    def _on_step(self, unit_id: str, step: int, total: int) -> None:
        """Called as step ``step`` of ``total`` starts: maybe time to ask for the next unit."""
        self.progress.step(unit_id, step, total)
        now = time.monotonic()
        if step == 1:
            self._unit_started = now
        if not self.prefetch:
            return
        due = prefetch_due(step, total, now - self._unit_started, self.fetcher.fetch_seconds)
        if due and self._need_more(in_flight=1) and not self.fetcher.pending():
            self.fetcher.want()

    def _send(self, result: UnitResult, deadline: float) -> Accepted:
        """Submit, retrying while unreachable until ``deadline`` (or briefly, once stopping)."""
        def call() -> Accepted:
            return self.client.submit(result)

        if not self.stop.is_set():
            try:
                return self.client.retry(call, self.stop.event, until=deadline)
            except Stopped:
                if not self.stop.is_set():
                    raise
        return self.client.retry(call, None, until=min(deadline, time.time() + HAND_BACK_SECONDS))

    def _submit(self, result: UnitResult, deadline: float = math.inf) -> None:
        uid = result.unit_id
        try:
            answer = self._send(result, deadline)
        except Stopped:
            self.progress.say(f"unit {uid}: could not reach the coordinator before the deadline; dropped")
            self.progress.record(result, accepted=False)
            self.runner.settled(uid, False)
            return
        except GaveUp as e:
            self.progress.say(f"unit {uid} not delivered; {e}")
            self.progress.record(result, accepted=False)
            self.runner.settled(uid, False)
            self.fatal = True
            return
        except Refused as e:
            self._refused(result, e)
            return
        self.progress.record(result, accepted=True)
        # folded or held for folding: its residual is kept; a failed unit's answer, or "superseded" (the
        # other copy of a tail unit came first), leaves the previous residual
        self.runner.settled(uid, result.error is None and answer.accepted)

    def _refused(self, result: UnitResult, e: Refused) -> None:
        """React to a 4xx on submit, per the error codes of docs/protocol.md."""
        uid, why = result.unit_id, f"{e.code or f'HTTP {e.status}'}: {e.message}".rstrip(": ")
        if e.code == "duplicate":
            self.progress.say(f"unit {uid}: already done (duplicate)")
            self.progress.record(result, accepted=True)
            self.runner.settled(uid, result.error is None)   # an earlier try of this very result was accepted
            return
        if e.code == "unsupported_protocol":
            self.progress.say(f"{UPGRADE} ({e.message})")
            self.fatal = True
        elif e.code in DROP_CODES:
            self.progress.say(f"unit {uid} dropped by the coordinator ({why})")
        elif e.code == "invalid":
            self.progress.say(f"unit {uid}: the coordinator rejected the result as invalid, a bug ({e.message})")
        else:
            self.progress.say(f"unit {uid} refused ({why})")
        self.progress.record(result, accepted=False)
        self.runner.settled(uid, False)

    def _hand_back(self, unit: WorkUnit, why: str) -> None:
        """Give a leased unit back: a result with ``error="returned: worker stopping"``."""
        result = failed_result(unit, self.request.worker_id, HAND_BACK)
        try:
            self.client.retry(lambda: self.client.submit(result), None,
                              until=min(self.client.local_time(unit.deadline), time.time() + HAND_BACK_SECONDS))
        except (Stopped, GaveUp):
            self.progress.say(f"could not hand back unit {unit.unit_id} (coordinator unreachable); "
                              "its lease will expire")
            return
        except Refused as e:
            self.progress.say(f"hand-back of unit {unit.unit_id} refused ({e.code or e.status}); nothing to do")
            return
        self.progress.returned += 1
        self.progress.say(f"handed back unit {unit.unit_id} ({why})")


def computes_tabs() -> bool:
    """Whether this worker can compute a replica of a browser tab's unit as the tab does (onnxruntime)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def work(client: Client, worker_id: str, stop: StopFlag, progress: Progress, threads: int | None = None,
         max_units: int | None = None, prefetch: bool = False, error_feedback: bool = True,
         device: str | None = "cpu") -> int:
    """Set torch's threads (``None``: all cores), then take, compute and submit units until the
    job is finished, ``max_units`` are accepted or ``stop`` is set; returns the exit status.
    ``prefetch`` asks for the next unit before the current one is submitted: no idle fetch, but
    every unit's base then lacks this worker's previous result (one version staler). ``error_feedback``:
    keep what a lossy upload codec drops and add it to the next unit's delta (``worker_py.feedback``),
    for the units the coordinator allows it. ``device``: where units train (``models.train.resolve_device``:
    auto, cpu, cuda, cuda:N); a device torch cannot use exits 2 with the reason."""
    threads = set_threads(threads)
    try:
        where = resolve_device(device)
    except ValueError as e:
        progress.say(f"error: {e}")
        return 2
    request = UnitRequest(worker_id=worker_id, backend="python", models=tuple(registry.MODELS),
                          error_feedback=error_feedback, computes=("browser",) if computes_tabs() else (),
                          runtime=where.type, runtime_note=runtime_note(describe_device(where)) if where.type == "cuda"
                          else None)
    cache = client.cache.root if client.cache is not None else "none"
    progress.say(f"worker {worker_id} for {client.base_url}: {describe_device(where)}, {threads} threads, "
                 f"blob cache {cache}")
    runner = Runner(client, worker_id, feedback=ErrorFeedback() if error_feedback else None, device=where)
    return Worker(client, runner, request, stop, progress, max_units, prefetch).run()
