"""The ``crowdtrain worker`` command: a headless worker that computes units for a coordinator.

    crowdtrain worker --coordinator http://host:8080 [--threads N] [--max-units N]
                      [--worker-id ID] [--cache DIR] [--no-progress] [--grace SECONDS]

The main thread takes a prepared unit, trains it (``worker_py.runner``) and submits the
result, while a prefetch thread asks for the next unit and fetches its blobs (depth 1), as
late in the current unit as the last fetch's duration allows.
While the coordinator is unreachable both wait with exponential backoff. On SIGTERM or
Ctrl-C the worker takes no more units, finishes the current one if it completes within the
grace period, else hands it back (as does it the prefetched one), and exits 0.

Exit status: 0 stopped, finished, or ``--max-units`` done; 1 the coordinator speaks another
protocol (upgrade the worker); 2 bad arguments.
"""
from __future__ import annotations

import argparse
import math
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO, Union

from contract.errors import ContractError
from contract.units import UnitRequest, UnitResult, WorkUnit
from worker_py.client import BlobCache, Client, NoWork, Refused, Stopped, backoff_delays

if TYPE_CHECKING:
    from worker_py.runner import Prepared, Runner

PREFIX = "crowdtrain worker: "
GRACE = 10.0              # seconds a stopping worker lets the current unit finish
PLAIN_EVERY = 10.0        # seconds between progress lines when stderr is not a terminal
DRAW_EVERY = 0.2          # seconds between redraws of the terminal status line
HAND_BACK_SECONDS = 5.0   # how long a stopping worker tries to reach the coordinator, per unit
JOIN_SECONDS = 5.0        # how long shutdown waits for the prefetch thread
MIN_POLL = 0.05           # shortest wait between two units/next polls, seconds
DROP_CODES = ("lease_expired", "too_stale", "unknown_unit", "lease_invalid", "norm_bound", "too_large")
UPGRADE = "the coordinator speaks another protocol version; upgrade the worker"


def default_cache() -> Path:
    """``$CROWDTRAIN_CACHE/blobs``, else ``~/.cache/crowdtrain/blobs``."""
    return Path(os.environ.get("CROWDTRAIN_CACHE") or "~/.cache/crowdtrain").expanduser() / "blobs"


# ----------------------------------------------------------------------------- progress
class Progress:
    """Counters and what the user sees: message lines, and a status line (a ``\\r``-updated
    line on a terminal, a plain line every ``PLAIN_EVERY`` seconds otherwise)."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None, every: float = PLAIN_EVERY) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.every = every
        self.done = self.failed = self.dropped = self.returned = 0
        self.samples, self.seconds, self.last_loss = 0, 0.0, math.nan
        self._lock = threading.RLock()   # re-entrant: a signal handler may print mid-line
        self._line = ""
        self._last_plain = -math.inf
        self._last_draw = -math.inf
        self._idle = False
        self._unit = ""                  # "unit <id> step i/n" while training

    def say(self, text: str) -> None:
        """Print one message line (always, even with --no-progress)."""
        with self._lock:
            if self._line:
                self.stream.write("\r\x1b[K")
            self.stream.write(PREFIX + text + "\n")
            if self._line:
                self.stream.write(self._line)
            self.stream.flush()

    def summary(self) -> str:
        rate = self.samples / self.seconds if self.seconds > 0 else 0.0
        loss = "-" if math.isnan(self.last_loss) else f"{self.last_loss:.4f}"
        extra = "".join(f", {n} {what}" for n, what in ((self.failed, "failed"), (self.dropped, "dropped"),
                                                         (self.returned, "handed back")) if n)
        return f"{self.done} units done{extra}, {rate:.0f} samples/s, last loss {loss}"

    def _render(self) -> str:
        if self._unit:
            return f"{self.summary()} | {self._unit}"
        return f"{self.summary()} | waiting for work" if self._idle else self.summary()

    def _draw(self, force: bool = False) -> None:
        """Redraw the terminal status line (at most every ``DRAW_EVERY`` s unless forced)."""
        now = time.monotonic()
        if not self.tty or (not force and now - self._last_draw < DRAW_EVERY):
            return
        width = max(20, shutil.get_terminal_size().columns - 1)
        with self._lock:
            self._line, self._last_draw = self._render()[:width], now
            self.stream.write("\r" + self._line + "\x1b[K")
            self.stream.flush()

    def record(self, result: UnitResult, accepted: bool) -> None:
        """Count a submitted result and show the new totals."""
        if result.error is not None:
            self.failed += 1
        elif accepted:
            self.done += 1
            self.samples += result.num_samples
            self.seconds += result.compute_seconds
            self.last_loss = result.loss_after
        else:
            self.dropped += 1
        self._unit = ""
        if self.tty:
            self._draw(force=True)
        elif self.enabled and time.monotonic() - self._last_plain >= self.every:
            self._last_plain = time.monotonic()
            self.say(self.summary())

    def step(self, unit_id: str, step: int, total: int) -> None:
        """Training progress of the current unit (terminal only)."""
        self._unit = f"unit {unit_id} step {step}/{total}"
        self._draw(force=step == 1)

    def idle(self, retry_after: float | None) -> None:
        """No work right now (``retry_after`` seconds to the next poll), said once per idle
        streak; ``None``: work came, the streak is over."""
        was, self._idle = self._idle, retry_after is not None
        if retry_after is None or was:
            return
        if self.tty:
            self._draw(force=True)
        elif self.enabled:
            self.say(f"no work right now; asking again every {retry_after:g} s")

    def close(self) -> None:
        with self._lock:
            if self._line:
                self.stream.write("\n")
                self.stream.flush()
                self._line = ""


# ----------------------------------------------------------------------------- stopping
class StopFlag:
    """Set by SIGTERM/SIGINT: take no more units; ``abandon()`` turns true once the grace
    period is over (at once on a second signal), and the current unit is handed back."""

    def __init__(self, grace: float = GRACE) -> None:
        self.event = threading.Event()
        self.grace = grace
        self._abandon_at = math.inf

    def request(self) -> bool:
        """Ask to stop; True the first time."""
        first = not self.event.is_set()
        self._abandon_at = time.monotonic() + self.grace if first else time.monotonic()
        self.event.set()
        return first

    def is_set(self) -> bool:
        return self.event.is_set()

    def abandon(self) -> bool:
        return self.event.is_set() and time.monotonic() >= self._abandon_at


# ----------------------------------------------------------------------------- prefetching
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


Item = Union["Prepared", Finished, Fatal, Invalid]


class Prefetcher(threading.Thread):
    """Fetches one unit and its blobs ahead of the main thread, each time ``want()`` is called."""

    def __init__(self, client: Client, runner: "Runner", request: UnitRequest, stop: StopFlag,
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
        from worker_py.runner import Prepared

        with self._cond:
            item, self._item = self._item, None
        return item.unit if isinstance(item, Prepared) else None

    def run(self) -> None:
        from worker_py.unit import describe

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
            item = self._fetch()
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
                answer = self.client.retry(lambda: self.client.next_unit(self.request), self.stop.event)
            except Stopped:
                return None
            except Refused as e:
                if e.code == "unsupported_protocol":
                    return Fatal(f"{UPGRADE} ({e.message})")
                self.progress.say(f"units/next refused: {e}; asking again later")
                if self.stop.event.wait(next(refusals)):
                    return None
                continue
            if isinstance(answer, NoWork):
                if answer.finished:
                    return Finished()
                self.progress.idle(answer.retry_after)
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
        return UnitResult(unit_id=d.get("unit_id"), lease=d.get("lease"), worker_id=worker_id,
                          base_version=d.get("model_version"), delta=b"", loss_before=0.0, loss_after=0.0,
                          num_samples=0, compute_seconds=0.0, error=f"invalid unit: {e}"[:2000])
    except (ContractError, AttributeError):
        return None


# ----------------------------------------------------------------------------- the loop
class Worker:
    """Takes units, computes, submits, reacts to the answers; ``run()`` gives the exit status."""

    def __init__(self, client: Client, runner: "Runner", request: UnitRequest, stop: StopFlag,
                 progress: Progress, max_units: int | None = None) -> None:
        self.client, self.runner, self.request = client, runner, request
        self.stop, self.progress, self.max_units = stop, progress, max_units
        self.fatal = False
        self.fetcher: Prefetcher | None = None
        self._unit_started = 0.0

    def _need_more(self, in_flight: int) -> bool:
        return self.max_units is None or self.progress.done + in_flight < self.max_units

    def run(self) -> int:
        from worker_py.runner import Prepared

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

    def _process(self, item: "Prepared") -> None:
        from worker_py.runner import Cancelled

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
            self._hand_back(unit, "unfinished after the grace period")
            return
        if result.error is not None:
            self.progress.say(f"unit {unit.unit_id} failed: {result.error}")
        self._submit(result, self.client.local_time(unit.deadline))

    def _on_step(self, unit_id: str, step: int, total: int) -> None:
        """Called as step ``step`` of ``total`` starts: maybe time to ask for the next unit."""
        from worker_py.unit import prefetch_due

        self.progress.step(unit_id, step, total)
        now = time.monotonic()
        if step == 1:
            self._unit_started = now
        due = prefetch_due(step, total, now - self._unit_started, self.fetcher.fetch_seconds)
        if due and self._need_more(in_flight=1) and not self.fetcher.pending():
            self.fetcher.want()

    def _send(self, result: UnitResult, deadline: float) -> None:
        """Submit, retrying while unreachable until ``deadline`` (or briefly, once stopping)."""
        def call() -> object:
            return self.client.submit(result)

        if not self.stop.is_set():
            try:
                self.client.retry(call, self.stop.event, until=deadline)
                return
            except Stopped:
                if not self.stop.is_set():
                    raise
        self.client.retry(call, None, until=min(deadline, time.time() + HAND_BACK_SECONDS))

    def _submit(self, result: UnitResult, deadline: float = math.inf) -> None:
        uid = result.unit_id
        try:
            self._send(result, deadline)
        except Stopped:
            self.progress.say(f"unit {uid}: could not reach the coordinator before the deadline; dropped")
            self.progress.record(result, accepted=False)
            return
        except Refused as e:
            self._refused(result, e)
            return
        self.progress.record(result, accepted=True)

    def _refused(self, result: UnitResult, e: Refused) -> None:
        """React to a 4xx on submit, per the error codes of docs/protocol.md."""
        uid, why = result.unit_id, f"{e.code or f'HTTP {e.status}'}: {e.message}".rstrip(": ")
        if e.code == "duplicate":
            self.progress.say(f"unit {uid}: already done (duplicate)")
            self.progress.record(result, accepted=True)
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

    def _hand_back(self, unit: WorkUnit, why: str) -> None:
        """Give a leased unit back: a result with ``error="returned: worker stopping"``."""
        from worker_py.unit import HAND_BACK, failed_result

        result = failed_result(unit, self.request.worker_id, HAND_BACK)
        try:
            self.client.retry(lambda: self.client.submit(result), None,
                              until=min(self.client.local_time(unit.deadline), time.time() + HAND_BACK_SECONDS))
        except Stopped:
            self.progress.say(f"could not hand back unit {unit.unit_id} (coordinator unreachable); "
                              "its lease will expire")
            return
        except Refused as e:
            self.progress.say(f"hand-back of unit {unit.unit_id} refused ({e.code or e.status}); nothing to do")
            return
        self.progress.returned += 1
        self.progress.say(f"handed back unit {unit.unit_id} ({why})")


# ----------------------------------------------------------------------------- command line
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (0 <= value < math.inf):
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Compute work units for a crowdtrain coordinator.")
    p.add_argument("--coordinator", required=True, metavar="URL", help="coordinator base URL, http(s)://host:port")
    p.add_argument("--threads", type=_positive_int, metavar="N", help="torch threads (default: all cores)")
    p.add_argument("--max-units", type=_positive_int, metavar="N", help="exit after N accepted units")
    p.add_argument("--worker-id", metavar="ID", help="worker id (default: random, stable for this process)")
    p.add_argument("--cache", type=Path, metavar="DIR",
                   help="blob cache folder (default: $CROWDTRAIN_CACHE/blobs or ~/.cache/crowdtrain/blobs)")
    p.add_argument("--no-progress", action="store_true", help="no progress line (messages only)")
    p.add_argument("--grace", type=_seconds, default=GRACE, metavar="SECONDS",
                   help=f"on SIGTERM/Ctrl-C, let the current unit finish for this long (default {GRACE:g})")
    return p


def _install_signals(stop: StopFlag, progress: Progress) -> dict[int, object]:
    """SIGINT and SIGTERM set ``stop``; returns the previous handlers."""
    def handler(signum: int, frame: object) -> None:
        if stop.request():
            progress.say(f"stopping ({signal.Signals(signum).name}): no new units; the current one may finish "
                         f"within {stop.grace:g} s, else it is handed back (Ctrl-C again: hand back now)")
        else:
            progress.say("stopping now: handing the current unit back")

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    return previous


def run(args: argparse.Namespace, prog: str = "crowdtrain worker") -> int:
    """Check the arguments, then work until done or stopped; returns the exit status."""
    worker_id = args.worker_id or f"py-{secrets.token_hex(8)}"
    try:
        UnitRequest(worker_id=worker_id, backend="python")
    except ContractError as e:
        print(f"{prog}: --worker-id: expected {e.expected}, got {worker_id!r}", file=sys.stderr)
        return 2
    progress = Progress(enabled=not args.no_progress)
    cache = args.cache.expanduser() if args.cache else default_cache()
    try:
        client = Client(args.coordinator, cache=BlobCache(cache), log=progress.say)
    except ValueError as e:
        print(f"{prog}: --coordinator: {e}", file=sys.stderr)
        return 2
    stop = StopFlag(args.grace)
    previous = _install_signals(stop, progress) if threading.current_thread() is threading.main_thread() else {}
    try:
        from models import registry   # torch: imported once the signals are ours
        from models.train import set_threads
        from worker_py.runner import Runner

        request = UnitRequest(worker_id=worker_id, backend="python", models=tuple(registry.MODELS))
        threads = set_threads(args.threads)
        progress.say(f"worker {worker_id} for {client.base_url}: {threads} threads, blob cache {cache}")
        code = Worker(client, Runner(client, worker_id), request, stop, progress, args.max_units).run()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        progress.close()
    progress.say(f"{'stopped' if code == 0 else 'exiting'}: {progress.summary()}, "
                 f"{client.blob_gets} blob downloads")
    return code


def cli(argv: list[str], prog: str = "crowdtrain worker", command: str = "worker") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        return run(args, prog)
    except KeyboardInterrupt:   # Ctrl-C before the handlers are installed
        print(f"{prog}: interrupted", file=sys.stderr)
        return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
