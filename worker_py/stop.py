"""Stopping on SIGTERM or Ctrl-C: the flag the loop polls, and the signal handlers that set it.

Torch-free, so the command line installs the handlers before it imports the training code.
"""
from __future__ import annotations

import math
import signal
import threading
import time
from typing import Callable

GRACE = 10.0              # seconds a stopping worker lets the current unit finish


class StopFlag:
    """Set by SIGTERM/SIGINT: take no more units; ``abandon()`` turns true once the grace
    period is over (at once on a second signal: ``forced``), and the current unit is handed back."""

    def __init__(self, grace: float = GRACE) -> None:
        self.event = threading.Event()
        self.grace = grace
        self.forced = False
        self._abandon_at = math.inf

    def request(self) -> bool:
        """Ask to stop; True the first time. A second request means: stop now."""
        first = not self.event.is_set()
        self.forced = self.forced or not first
        self._abandon_at = time.monotonic() + self.grace if first else time.monotonic()
        self.event.set()
        return first

    def is_set(self) -> bool:
        return self.event.is_set()

    def abandon(self) -> bool:
        return self.event.is_set() and time.monotonic() >= self._abandon_at


def install_signals(stop: StopFlag, say: Callable[[str], None]) -> dict[int, object]:
    """SIGINT and SIGTERM set ``stop`` (and ``say`` so); returns the previous handlers."""
    def handler(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if stop.request():
            say(f"stopping ({name}): no new units; the current one may finish within {stop.grace:g} s, "
                f"else it is handed back (a second Ctrl-C or SIGTERM: hand it back now)")
        else:
            say(f"stopping now ({name} again): a unit in hand is handed back at once")

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    return previous
