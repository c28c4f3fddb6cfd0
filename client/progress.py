"""The one progress display of the command line (`twostage index build`, `twostage evaluate`): a line on stderr
with done/total, percent, rate and ETA. Standard library only, so that both the server's index build and the
client's commands can use it."""
from __future__ import annotations

import math
import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?:??:??"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class ProgressBar:
    """A one-line progress display on stderr: done/total `unit`, percent, `unit`/s and ETA. On a terminal it
    redraws in place (at most every `min_interval_s`); otherwise it prints a line every 10 s."""

    def __init__(self, total: int, label: str = "indexing", stream: TextIO | None = None,
                 enabled: bool = True, min_interval_s: float = 0.25, unit: str = "docs"):
        self.total = total
        self.label = label
        self.unit = unit
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = min_interval_s if self.tty else 10.0
        self.done = 0
        self.timed = 0  # items that count toward the rate (skipped ones do not)
        self.started = time.monotonic()
        self._last_draw = 0.0

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.timed / elapsed if elapsed > 0 else 0.0

    def advance(self, n: int, timed: bool = True) -> None:
        self.done += n
        if timed:
            self.timed += n
        now = time.monotonic()
        if now - self._last_draw >= self.interval:
            self._draw()
            self._last_draw = now

    def line(self) -> str:
        rate = self.rate()
        remaining = max(self.total - self.done, 0)
        eta = remaining / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (f"{self.label} {self.done}/{self.total} {self.unit} {pct:5.1f}% | {rate:,.1f} {self.unit}/s | "
                f"ETA {_clock(eta)} | elapsed {_clock(time.monotonic() - self.started)}")

    def _draw(self) -> None:
        if not self.enabled:
            return
        self.stream.write(("\r" + self.line() + "\x1b[K") if self.tty else self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw()
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()
