"""Periodic progress lines with rate and ETA for long batch jobs (embedding, index building,
classification): plain lines, because these jobs mostly run in logs (``ray job submit``), not terminals."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from xmodal.train.metrics import format_duration


class ProgressLog:
    """``update(n)`` after each piece of work; a line is printed at most every ``every_s`` seconds."""

    def __init__(
        self,
        what: str,
        total: int,
        unit: str = "particles",
        every_s: float = 5.0,
        stream: TextIO | None = None,
    ):
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = self._last = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def rate(self) -> float:
        return self.done / max(self.elapsed, 1e-9)

    def line(self) -> str:
        rate = self.rate()
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = format_duration(eta) if eta != float("inf") else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"[xmodal] {self.what}: {self.done:,}/{self.total:,} {self.unit} ({pct:.0f}%), "
            f"{rate:,.0f} {self.unit}/s, ETA {eta_text}"
        )

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            print(self.line(), file=self.stream, flush=True)
