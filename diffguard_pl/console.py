"""What a person sees of a job's phases: one line when a phase starts and ends (with its duration), and for
long phases a progress line (count, rate, time left) redrawn on a terminal or printed every few seconds in a
log file. Only rank 0 of a multi-process run speaks.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional, TextIO


def duration(seconds: float) -> str:
    """``2 h 05 min``, ``3 min 07 s``, ``42 s``, ``0.4 s``."""
    if seconds < 10:
        return f"{max(seconds, 0):.1f} s"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


def is_rank_zero() -> bool:
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


class Phase:
    """``with Phase("fitting KNN / ViM") as phase: ... phase.advance(n)``: prints the phase's start, its progress
    (with ``total``) and ``... done in <duration>`` at the end, to ``stream`` (stderr by default)."""

    def __init__(self, name: str, total: Optional[int] = None, unit: str = "images",
                 stream: Optional[TextIO] = None, every_seconds: float = 5.0):
        self.name, self.total, self.unit = name, total, unit
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = 0.25 if self.tty else every_seconds
        self.done, self.started, self.seconds = 0, 0.0, 0.0
        self.note = ""
        self._last = 0.0
        self.quiet = not is_rank_zero()

    def __enter__(self) -> "Phase":
        self.started = self._last = time.perf_counter()
        self._write(f"{self.name}" + (f": {self.total:,} {self.unit}" if self.total else "") + " ...\n")
        return self

    def advance(self, count: int) -> None:
        self.done += count
        now = time.perf_counter()
        if now - self._last < self.every:
            return
        self._last = now
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = f", {duration((self.total - self.done) / rate)} left" if self.total and rate > 0 else ""
        of = f"/{self.total:,}" if self.total else ""
        line = f"  {self.done:,}{of} {self.unit}, {rate:,.0f} {self.unit}/s{left}"
        self._write(("\r\033[K" + line) if self.tty else line + "\n")

    def __exit__(self, kind, value, traceback) -> None:
        self.seconds = time.perf_counter() - self.started
        if kind is None:
            clear = "\r\033[K" if self.tty and self.done else ""
            self._write(f"{clear}{self.name}: done in {duration(self.seconds)}{self.note}\n")

    def _write(self, text: str) -> None:
        if not self.quiet:
            self.stream.write(text)
            self.stream.flush()
