"""Periodic loops that measure their own period, jitter and overruns."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import numpy as np


@dataclass
class LoopStats:
    """Timing of one periodic loop: lateness of each start and duration of each run."""

    name: str
    period_s: float
    lane: str
    runs: int = 0
    overruns: int = 0  # runs that did not finish before the next was due
    errors: int = 0
    last_error: str = ""
    late_s: deque[float] = field(default_factory=lambda: deque(maxlen=1000))
    busy_s: deque[float] = field(default_factory=lambda: deque(maxlen=1000))

    def summary(self) -> dict[str, Any]:
        late = np.asarray(self.late_s) * 1e3
        busy = np.asarray(self.busy_s) * 1e3
        def pct(a: np.ndarray, q: float) -> float:
            return round(float(np.percentile(a, q)), 3) if a.size else 0.0
        return {"name": self.name, "lane": self.lane, "period_ms": self.period_s * 1e3, "runs": self.runs,
                "overruns": self.overruns, "errors": self.errors, "last_error": self.last_error, "jitter_p50_ms": pct(late, 50),
                "jitter_p99_ms": pct(late, 99), "jitter_max_ms": round(float(late.max()), 3) if late.size else 0.0,
                "busy_p99_ms": pct(busy, 99)}


async def run_periodic(stats: LoopStats, body: Callable[[], Awaitable[None] | None]) -> None:
    """Call ``body`` every ``stats.period_s`` until cancelled; a failing body is counted, not fatal."""
    period = stats.period_s
    due = time.monotonic()
    while True:
        start = time.monotonic()
        stats.late_s.append(max(0.0, start - due))
        try:
            result = body()
            if result is not None:
                await result
        except Exception as exc:  # a loop must outlive one bad cycle; the error is exposed in stats
            stats.errors += 1
            stats.last_error = f"{type(exc).__name__}: {exc}"
        end = time.monotonic()
        stats.busy_s.append(end - start)
        stats.runs += 1
        due += period
        if end > due:
            stats.overruns += 1
            due = end  # skip the missed cycles instead of running them back to back
        await anyio.sleep(max(0.0, due - time.monotonic()))
