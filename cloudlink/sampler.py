"""What goes into batches: the process image sampled per signal class, and records from the recorder.

Samplers run on the event loop: one task per signal class copies the selected
values and their qualities out of the image (a numpy gather, tens of
microseconds) into a preallocated block; a full block becomes a Telemetry batch.
Events and flight records arrive from protection's threads through
``Recorder.subscribers``: the subscriber only appends to a deque (no
conversion, no lock, no wait), and the link's record loop drains it.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anyio
import numpy as np
import numpy.typing as npt

from cloudlink.batch import Telemetry
from cloudlink.config import SignalClass
from gateway.events import Event, FlightRecord
from gateway.image import ProcessImage
from gateway.loops import LoopStats


def resolve_signals(image: ProcessImage, patterns: Sequence[str], taken: set[str] | None = None) -> list[str]:
    """Canonical names matching the patterns, in image order, bound to a source, not taken by an earlier class."""
    taken = taken if taken is not None else set()
    seen: set[str] = set()
    out: list[str] = []
    for pat in patterns:
        for name in image.select(pat) if any(c in pat for c in "*?[") and not _is_plain(image, pat) else [pat]:
            try:
                i = image.index(name)
            except (KeyError, ValueError):
                continue
            if name in seen or name in taken or image.slot_of[i] < 0:  # unbound: never has a value
                continue
            seen.add(name)
            out.append(name)
    order = {n: image.index(n) for n in out}
    out.sort(key=order.__getitem__)
    taken.update(out)
    return out


def _is_plain(image: ProcessImage, name: str) -> bool:
    try:
        image.index(name)
        return True
    except (KeyError, ValueError):
        return False


class ClassSampler:
    """Samples one signal class of the image into telemetry blocks."""

    def __init__(self, image: ProcessImage, cls: SignalClass, names: list[str]) -> None:
        self.image = image
        self.cls = cls
        self.name = cls.name
        self.signals = names
        self.idx = np.array([image.index(n) for n in names], dtype=np.intp)
        self.rate_hz = cls.rate_hz
        self.batch_s = cls.batch_s
        self.stats = LoopStats(f"cloud-sample-{cls.name}", 1.0 / cls.rate_hz, "P3")
        self.samples = 0  # values taken since start
        self.missed = 0  # ticks skipped because the loop was late by more than a period
        self._lock = threading.Lock()
        self._rate_changed: anyio.Event | None = None  # created by run(); set_rate wakes it
        self._alloc()

    def _alloc(self) -> None:
        cap = max(2, math.ceil(self.batch_s * self.rate_hz) + 1)
        n = len(self.signals)
        self._values: npt.NDArray[np.float64] = np.empty((cap, n), dtype=np.float64)
        self._quality: npt.NDArray[np.int8] = np.empty((cap, n), dtype=np.int8)
        self._t: npt.NDArray[np.int64] = np.empty(cap, dtype=np.int64)
        self._n = 0
        self._opened = time.monotonic()

    def sample(self, mono: float | None = None, wall_ms: int | None = None) -> None:
        """Take one row now."""
        mono = time.monotonic() if mono is None else mono
        with self._lock:
            if self._n == 0:
                self._opened = mono
            i = self._n
            # one read: a value then a separate quality() could pair a frame's value with the next one's flag
            snap = self.image.snapshot(self.idx, mono)
            self._values[i], self._quality[i] = snap.value, snap.quality
            self._t[i] = int(time.time() * 1000) if wall_ms is None else wall_ms
            self._n += 1
            self.samples += len(self.idx)

    def due(self, mono: float) -> bool:
        return self._n >= len(self._t) or (self._n > 0 and mono - self._opened >= self.batch_s - 0.5 / self.rate_hz)

    def take(self) -> Telemetry | None:
        """The rows taken so far as one block (None when empty); the sampler starts a new block."""
        with self._lock:
            n = self._n
            if n == 0:
                return None
            tel = Telemetry(self.signals, self._t[:n].copy(), self._values[:n].copy(), self._quality[:n].copy(),
                            self.rate_hz)
            self._n = 0
            return tel

    def set_rate(self, rate_hz: float) -> Telemetry | None:
        """Change the rate at once (call on the event loop); returns the block taken at the old rate (emit it first)."""
        with self._lock:
            n = self._n
            tel = None
            if n:
                tel = Telemetry(self.signals, self._t[:n].copy(), self._values[:n].copy(),
                                self._quality[:n].copy(), self.rate_hz)
            self.rate_hz = rate_hz
            self.stats.period_s = 1.0 / rate_hz
            self._alloc()
        if self._rate_changed is not None:  # run() may be asleep for up to a whole old period (1000 s at 0.001 Hz)
            self._rate_changed.set()
        return tel

    async def run(self, emit: Callable[[str, Telemetry], None]) -> None:
        """Sample at the class's rate until cancelled; full blocks go to ``emit`` (which must not block)."""
        self._rate_changed = anyio.Event()
        due = last = time.monotonic()
        while True:
            now = time.monotonic()
            if now < due:
                with anyio.move_on_after(due - now):
                    await self._rate_changed.wait()
                if self._rate_changed.is_set():  # the next sample is one new period after the last (or now)
                    self._rate_changed = anyio.Event()
                    due = max(last + 1.0 / self.rate_hz, time.monotonic())
                    continue
                now = time.monotonic()
            last = now
            self.stats.late_s.append(max(0.0, now - due))
            try:
                self.sample(now)
                if self.due(now):
                    tel = self.take()
                    if tel is not None:
                        emit(self.name, tel)
            except Exception as exc:  # a sampler must outlive one bad cycle; exposed in stats
                self.stats.errors += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
            end = time.monotonic()
            self.stats.busy_s.append(end - now)
            self.stats.runs += 1
            period = 1.0 / self.rate_hz
            due += period
            if end - due > period:  # more than a period late: skip the missed ticks, count them
                skipped = int((end - due) / period)
                self.missed += skipped
                self.stats.overruns += 1
                due += skipped * period


class Intake:
    """Records handed over by other threads: events, flight records, EIS records (thread-safe, non-blocking)."""

    def __init__(self, max_pending: int = 100_000) -> None:
        self.max_pending = max_pending
        self.events: deque[Event] = deque()
        self.flights: deque[FlightRecord] = deque()
        self.eis: deque[dict[str, Any]] = deque()
        self.overflow = 0  # records refused because nothing drained the queues

    def on_event(self, event: Event) -> None:
        """Recorder subscriber (called from protection's threads): an append, nothing else."""
        if len(self.events) >= self.max_pending:
            self.overflow += 1
            return
        self.events.append(event)

    def on_flight_record(self, record: FlightRecord) -> None:
        if len(self.flights) >= 64:
            self.overflow += 1
            return
        self.flights.append(record)

    def submit_eis(self, record: Mapping[str, Any]) -> None:
        if len(self.eis) >= 10_000:
            self.overflow += 1
            return
        self.eis.append(dict(record))

    def pending(self) -> int:
        return len(self.events) + len(self.flights) + len(self.eis)

    def drain_events(self) -> list[dict[str, Any]]:
        out = []
        while self.events:
            out.append(self.events.popleft().as_dict())
        return out

    def drain_flights(self) -> list[FlightRecord]:
        out = []
        while self.flights:
            out.append(self.flights.popleft())
        return out

    def drain_eis(self) -> list[dict[str, Any]]:
        out = []
        while self.eis:
            out.append(self.eis.popleft())
        return out
