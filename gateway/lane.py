"""The P0 protection lane: checks in the receive threads, a 10 ms supervision thread, deadlines.

Per-sample checks run in each bus's receive thread right after the frame is
decoded, so a violating frame is judged before the thread reads the next one,
and the trip command leaves from that same thread. A supervision thread ticks
every 10 ms for what has no sample to wait for: staleness, the aggregate
checks, the contactor state machine and its command frames (which the PCU also
takes as the gateway's heartbeat), flight records, and its own lateness:
repeated lateness is itself a fault that opens the contactors.

Neither thread waits for the event loop. docs/design.md explains the choice of
mechanism (threads, a short GIL switch interval, a frozen GC heap) and the
measurements behind it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import can

from gateway.contactors import ContactorMachine
from gateway.events import Event, Kind, Level, Recorder
from gateway.flightrec import FrameRing, freeze
from gateway.image import Quality
from gateway.ingest import Ingest
from gateway.loops import LoopStats
from gateway.protection import Protection

log = logging.getLogger(__name__)


# A stalled or late lane must force the safe state within protection's reaction time: the field's
# norm is "a few hundred ms" (the default 3 x 50 ms is 150 ms; the PCU's own timeout is 300 ms).
MAX_STALL_MS = 500.0
# The flight ring is allocated in full at start-up, per bus: 8 + 4 + 1 bytes plus the payload width
# (8, or 64 with CAN FD) per frame. 500,000 frames are 10 MiB (classic) or 37 MiB (FD) per bus, on a
# 1 GB edge box; they hold 24 s of the fastest 1 Mbit/s bus (about 21,000 empty frames/s) or 55 s of
# the saturated reference bus (about 9,000 frames/s).
MAX_RING_FRAMES = 500_000


@dataclass(frozen=True)
class LaneSettings:
    """Timing of the protection lane."""

    tick_ms: float = 10.0
    deadline_ms: float = 50.0  # a tick later than this is a missed deadline
    max_missed: int = 3  # consecutive missed deadlines that force the safe state
    flight_before_s: float = 10.0
    flight_after_s: float = 10.0
    flight_max_frames_per_s: int = 2000

    def check(self) -> None:
        if not 1 <= self.tick_ms <= 100:
            raise ValueError("tick_ms: must be 1..100")
        if self.deadline_ms <= self.tick_ms:
            raise ValueError("deadline_ms: must be longer than tick_ms")
        if self.max_missed < 1:
            raise ValueError("max_missed: must be >= 1")
        # the safe state must follow missed deadlines within protection's reaction time ("a few hundred
        # ms" is the field's norm): more than MAX_STALL_MS of missed ticks would let a stalled lane run on
        if self.max_missed * self.deadline_ms > MAX_STALL_MS:
            raise ValueError(f"max_missed: {self.max_missed} missed deadlines of {self.deadline_ms:g} ms leave the "
                             f"contactors closed for {self.max_missed * self.deadline_ms:g} ms with a stalled lane; "
                             f"max_missed x deadline_ms must be <= {MAX_STALL_MS} ms")
        for key in ("flight_before_s", "flight_after_s"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: must be >= 0")
        if self.flight_max_frames_per_s < 1:
            # the frame ring is sized from it: an empty ring fails on every frame of the receive path
            raise ValueError("flight_max_frames_per_s: must be >= 1")
        frames = self.flight_max_frames_per_s * (self.flight_before_s + self.flight_after_s + 1.0)
        if frames > MAX_RING_FRAMES:
            raise ValueError(f"flight_max_frames_per_s: x (flight_before_s + flight_after_s + 1 s) is {frames:.0f} "
                             f"frames per bus; the flight ring holds at most {MAX_RING_FRAMES} (it is allocated at "
                             f"start-up: {MAX_RING_FRAMES * 77 // 2**20} MiB per CAN FD bus)")


@dataclass
class _PendingRecord:
    event: int
    wall: float
    due: float


@dataclass
class LaneStats:
    ticks: int = 0
    missed_deadlines: int = 0
    consecutive_missed: int = 0
    max_late_ms: float = 0.0
    forced_safe_state: int = 0
    consecutive_errors: int = 0
    samples_checked: int = 0
    flight_records: int = 0
    last_trip: dict[str, Any] = field(default_factory=dict)


class ProtectionLane:
    """Wires protection and the contactor machine into the receive threads and a tick thread."""

    def __init__(self, protection: Protection, machine: ContactorMachine, recorder: Recorder,
                 settings: LaneSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.protection = protection
        self.machine = machine
        self.recorder = recorder
        self.settings = settings
        self.clock = clock
        self.wall: Callable[[], float] = time.time  # the adapters' timestamp domain, for flight records
        machine.clock = clock
        self.stats = LaneStats()
        self.loop = LoopStats("protection", settings.tick_ms / 1000.0, "P0")
        self.rings: dict[str, FrameRing] = {}
        self._pending: list[_PendingRecord] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stalled = threading.Event()  # tests and the watchdog check set/see this
        self._ever_ready = False
        self._last_tick = clock()
        protection.on_trip = self.trip
        protection.on_event = recorder
        machine.health_causes = self.health_causes  # a reset must not trust a late or failing lane

    # -- receive path ---------------------------------------------------------------------

    def sink(self, bus: str, ingest: Ingest, fd: bool) -> Callable[[can.Message], None]:
        """The receive thread's per-frame function for one bus: record, decode, check."""
        s = self.settings
        ring = FrameRing(int(s.flight_max_frames_per_s * (s.flight_before_s + s.flight_after_s + 1)), 64 if fd else 8)
        self.rings[bus] = ring
        on_frame, on_sample, append, stats = ingest.on_frame, self.protection.on_sample, ring.append, self.stats

        def also(slot: int) -> None:
            on_sample(slot)
            stats.samples_checked += 1

        # the other slots a multiplexed frame refreshes (its top level besides its page, or on a bad page)
        ingest.on_also = also

        def frame(msg: can.Message) -> None:
            append(msg)
            slot = on_frame(msg)
            if slot >= 0:
                on_sample(slot)
                stats.samples_checked += 1

        return frame

    def trip(self, event: Event) -> None:
        """An MSL condition: open the contactors now, then arrange the flight record."""
        first = self.machine.trip(event.message or event.name)
        if not first:
            return  # already open and latched: the condition is in the error causes
        wall = self.wall()
        self.stats.last_trip = {"event": event.id, "name": event.name, "message": event.message, "time": wall}
        self._pending.append(_PendingRecord(event.id, wall, self.clock() + self.settings.flight_after_s))
        self.recorder(Event(Kind.TRIP, event.name, Level.MSL, True, event.index, event.value, event.limit,
                            f"trip: {event.message}"))

    # -- supervision thread ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="protection-tick", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)

    @property
    def healthy(self) -> bool:
        """The tick runs and keeps its deadline (systemd's watchdog is fed only while this holds)."""
        return not self._tick_causes()

    def health_causes(self) -> list[str]:
        """Why the lane cannot be trusted to protect now (each one refuses a reset); empty when it can.

        A reset accepted while the tick is late or failing would close the contactors under a lane that
        has already shown it cannot keep its deadline.
        """
        out = self._tick_causes()
        if not self._ever_ready:
            out.append("measurements not all valid yet: protection has not seen every watched signal good")
        return out

    def _tick_causes(self) -> list[str]:
        """Late, failing or not running: what makes the lane unhealthy."""
        st, out = self.stats, []
        if st.consecutive_missed:
            out.append(f"protection lane late: {st.consecutive_missed} missed deadlines in a row")
        if st.consecutive_errors:
            out.append(f"protection tick failing: {st.consecutive_errors} times in a row ({self.loop.last_error})")
        age = self.clock() - self._last_tick if st.ticks else 0.0
        if age >= self.settings.deadline_ms / 1000.0 * 2:
            out.append(f"protection tick not running: last one {age * 1000:.0f} ms ago")
        return out

    def _run(self) -> None:
        period = self.settings.tick_ms / 1000.0
        due = self.clock()
        self._last_tick = due
        previous = due - period
        while not self._stop.is_set():
            while self.stalled.is_set() and not self._stop.is_set():  # fault injection for tests
                time.sleep(0.01)
            start = self.clock()
            # late against the previous tick's start: a tick whose own work overran is late too
            self._guarded_tick(start, previous + period)
            previous = start
            end = self.clock()
            self.loop.busy_s.append(end - start)
            due += period
            if end > due:  # no catch-up tick: it would run at once and reset the count of late ticks
                self.loop.overruns += 1
                due = end + period
            # a plain sleep: less CPU per wake-up than Event.wait's lock juggling (14 vs 21 us measured);
            # stop() waits at most one period
            delay = due - self.clock()
            if delay > 0:
                time.sleep(min(delay, period))

    def _guarded_tick(self, now: float, due: float) -> None:
        """A tick that cannot kill the lane; one that fails max_missed times in a row forces the safe state."""
        st = self.stats
        try:
            self.tick(now, due)
        except Exception as exc:
            log.exception("protection tick failed")
            self.loop.errors += 1
            self.loop.last_error = f"{type(exc).__name__}: {exc}"
            st.consecutive_errors += 1
            # >=, not ==: every failing tick from the max_missed-th on trips again (a reset in between must
            # not leave a lane that keeps failing with closed contactors)
            if st.consecutive_errors >= self.settings.max_missed:
                if st.consecutive_errors == self.settings.max_missed:
                    st.forced_safe_state += 1
                self.trip(Event(Kind.DEADLINE, "protection_tick", Level.MSL, True,
                                message=f"protection tick failed {st.consecutive_errors} times in a row: {exc!r}"))
        else:
            st.consecutive_errors = 0

    def tick(self, now: float, due: float | None = None) -> None:
        """One supervision step (the thread calls this; tests may call it with their own clock)."""
        st = self.stats
        late = max(0.0, now - (now if due is None else due))
        self.loop.late_s.append(late)
        self.loop.runs += 1
        st.ticks += 1
        self._last_tick = now
        st.max_late_ms = max(st.max_late_ms, late * 1000)
        deadline, limit = self.settings.deadline_ms, self.settings.max_missed
        if late * 1000 > deadline:
            # a tick k deadlines late missed k of them (at least one): one long stall is as bad as k late
            # ticks in a row, so max_missed x deadline_ms bounds a stall too (the config's promise)
            missed = max(1, int(late * 1000 // deadline))
            before = st.consecutive_missed
            st.missed_deadlines += missed
            st.consecutive_missed += missed
            self.recorder(Event(Kind.DEADLINE, "protection_tick", Level.RSL, True, value=late * 1000,
                                limit=deadline, message=f"protection tick {late * 1000:.1f} ms late"))
            # >=, not ==: a lane still late after a reset trips again on its next late tick
            if st.consecutive_missed >= limit:
                if before < limit:
                    st.forced_safe_state += 1
                self.trip(Event(Kind.DEADLINE, "protection_tick", Level.MSL, True, value=late * 1000, limit=deadline,
                                message=f"protection lane late: {st.consecutive_missed} missed deadlines in a row "
                                        f"(this tick {late * 1000:.0f} ms late)"))
        else:
            st.consecutive_missed = 0
        self.protection.tick(now)
        self.machine.tick(now, self._data_ready(now))
        self._flight_records(now)

    def _data_ready(self, now: float) -> bool:
        if not self._ever_ready:
            q = self.protection.image.quality(self.protection.watched, now)
            self._ever_ready = bool((q == Quality.GOOD).all())
        return self._ever_ready and not self.protection.tripping()

    def _flight_records(self, now: float) -> None:
        if not self._pending:
            return
        s = self.settings
        for p in [p for p in self._pending if p.due <= now]:
            self._pending.remove(p)
            for bus, ring in self.rings.items():
                self.recorder.add_flight_record(freeze(ring, bus, p.event, p.wall, s.flight_before_s, s.flight_after_s))
                self.stats.flight_records += 1

    def status(self) -> dict[str, Any]:
        st = self.stats
        return {"ticks": st.ticks, "missed_deadlines": st.missed_deadlines, "max_late_ms": round(st.max_late_ms, 3),
                "forced_safe_state": st.forced_safe_state, "samples_checked": st.samples_checked,
                "flight_records": st.flight_records, "last_trip": st.last_trip, "healthy": self.healthy,
                "derate": self.protection.derate()}
