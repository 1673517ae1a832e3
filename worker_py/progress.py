"""What the person running a worker sees: message lines, and a status line with the counters.

On a terminal the status line is redrawn in place (``\\r``); otherwise a plain line is
printed every ``PLAIN_EVERY`` seconds. ``--no-progress`` keeps the message lines only.
"""
from __future__ import annotations

import math
import shutil
import sys
import threading
import time
from typing import TextIO

from contract.units import UnitResult

PREFIX = "crowdtrain worker: "
PLAIN_EVERY = 10.0        # seconds between progress lines when stderr is not a terminal
DRAW_EVERY = 0.2          # seconds between redraws of the terminal status line


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
        self._reason: str | None = None
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

    def idle(self, retry_after: float | None, reason: str | None = None) -> None:
        """No work right now (``retry_after`` seconds to the next poll; ``reason``: why, if the coordinator
        said), said once per idle streak, and again when the reason changes; ``None``: work came, the
        streak is over."""
        was, self._idle = self._idle, retry_after is not None
        said, self._reason = self._reason, reason if retry_after is not None else None
        if retry_after is None or (was and reason == said):
            return
        if self.tty and reason is None:
            self._draw(force=True)
        elif self.enabled:
            self.say(f"no work right now{f' ({reason})' if reason else ''}; asking again every {retry_after:g} s")

    def close(self) -> None:
        with self._lock:
            if self._line:
                self.stream.write("\n")
                self.stream.flush()
                self._line = ""
