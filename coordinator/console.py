"""What the person running ``crowdtrain run`` sees: message lines and a live progress line.

On a terminal the progress line is redrawn in place (``\\r``) under the messages; otherwise a
plain progress line is printed every ``every`` seconds. Messages (the local workers' lines
included) are printed whole, above the progress line. Thread-safe: the workers' output is
read by threads.
"""
from __future__ import annotations

import math
import shutil
import sys
import threading
import time
from typing import TextIO

PLAIN_EVERY_S = 30.0      # seconds between progress lines when stderr is not a terminal
DRAW_EVERY_S = 0.5        # seconds between redraws of the terminal progress line


def duration(seconds: float) -> str:
    """``45 s``, ``12m 05s``, ``2h 03m``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def last_eval(status: dict) -> dict | None:
    history = status.get("accuracy_history") or []
    return history[-1] if history else None


def progress_text(status: dict) -> str:
    """One line from ``/api/status``: samples of the budget, ETA, test accuracy, samples/s, workers (the
    most useful first: a narrow terminal cuts the end)."""
    samples, budget = status["samples"], status["budget_samples"]
    pct = 100 * samples / budget if budget else 0.0
    ev = last_eval(status)
    acc = f"test acc {100 * ev['test_acc']:.1f}% (v{ev['version']})" if ev else "test acc -"
    rate = status["samples_per_second"]
    if status["finished"]:
        eta = "finished"
    elif rate > 0:
        eta = f"ETA {duration((budget - samples) / rate)}"
    else:
        eta = "ETA -"
    workers = status["workers_online"]
    return (f"{samples:,}/{budget:,} samples ({pct:.0f}%), {eta}, {acc}, {rate:,.0f} samples/s, "
            f"{workers} worker{'' if workers == 1 else 's'}")


class Console:
    """Message lines and the progress line on ``stream`` (stderr)."""

    def __init__(self, stream: TextIO | None = None, every: float = PLAIN_EVERY_S,
                 prefix: str = "crowdtrain: ") -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every, self.prefix = every, prefix
        self._lock = threading.RLock()
        self._line = ""
        self._last = -math.inf

    def say(self, text: str) -> None:
        """One message line (above the progress line on a terminal)."""
        with self._lock:
            if self._line:
                self.stream.write("\r\x1b[K")
            self.stream.write(text + "\n")
            if self._line:
                self.stream.write(self._line)
            self.stream.flush()

    def progress(self, text: str, force: bool = False) -> None:
        """The progress line: redrawn on a terminal, else printed every ``every`` seconds (or when forced)."""
        now = time.monotonic()
        with self._lock:
            if self.tty:
                if not force and now - self._last < DRAW_EVERY_S:
                    return
                width = max(20, shutil.get_terminal_size().columns - 1)
                self._line = text[:width]
                self.stream.write("\r" + self._line + "\x1b[K")
                self.stream.flush()
            elif force or now - self._last >= self.every:
                self.stream.write(f"{self.prefix}{text}\n")
                self.stream.flush()
            else:
                return
            self._last = now

    def clear(self) -> None:
        """End the progress line (before a summary)."""
        with self._lock:
            if self._line:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
                self._line = ""
