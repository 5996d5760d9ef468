"""The contactor state machine: INIT -> STANDBY -> PRECHARGE -> NORMAL, OPEN_REQUESTED, ERROR.

ERROR is latched: it is left only when every cause is gone AND a reset is
requested, and it is kept in the state directory so that a restart (a crash, the
watchdog) does not leave it either; a deep discharge is latched there too.
Feedback is supervised (a contactor that does not follow its command within the
feedback timeout, reports itself welded, or whose feedback stops arriving, is a
fault), precharge closes only on valid measurements and is bounded in time and
retries, and an oscillation guard refuses rapid re-close requests.

Lock order: protection's lock before ours (a trip arrives from a receive thread
that holds it), so nothing here asks protection anything while holding ours.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from gateway.events import Event, Kind, Level
from gateway.image import ProcessImage, Quality

log = logging.getLogger(__name__)

CONTACTORS = ("main_positive", "main_negative", "precharge")
GOOD = Quality.GOOD
FB_OPEN, FB_CLOSED, FB_WELDED, FB_FAULT = 0, 1, 2, 3
FB_VALUES = frozenset({FB_OPEN, FB_CLOSED, FB_WELDED, FB_FAULT})  # any other feedback value is invalid


class State(Enum):
    INIT = "INIT"
    STANDBY = "STANDBY"
    PRECHARGE = "PRECHARGE"
    NORMAL = "NORMAL"
    OPEN_REQUESTED = "OPEN_REQUESTED"
    ERROR = "ERROR"


class ContactorDriver(Protocol):
    """Whatever moves the contactors: CAN command frames, or GPIO lines on the edge box."""

    def command(self, main_positive: bool, main_negative: bool, precharge: bool) -> bool:
        """Command all three; True when the command went out."""
        ...


@dataclass(frozen=True)
class ContactorSettings:
    """Precharge, feedback supervision and oscillation guard."""

    auto_close: bool = False  # close (precharge) by itself once data are good and no fault is active
    precharge_max_voltage_diff_v: float = 10.0
    precharge_max_current_a: float = 2.0
    precharge_timeout_s: float = 3.0
    precharge_retries: int = 2
    precharge_retry_delay_s: float = 2.0
    feedback_timeout_s: float = 0.5
    open_current_a: float = 5.0  # an operator open waits for the current to fall below this...
    open_timeout_s: float = 2.0  # ...for at most this long
    min_close_interval_s: float = 10.0
    max_closes_per_hour: int = 20
    command_period_s: float = 0.1

    def check(self) -> None:
        for name in ("precharge_max_voltage_diff_v", "precharge_timeout_s", "feedback_timeout_s", "command_period_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0")
        if self.precharge_retries < 0:
            raise ValueError("precharge_retries: must be >= 0")
        if self.open_current_a < 0:  # |I| below a negative current never holds: every open would time out
            raise ValueError("open_current_a: must be >= 0")
        if self.min_close_interval_s < 0:
            raise ValueError("min_close_interval_s: must be >= 0")
        if self.max_closes_per_hour < 1:
            raise ValueError("max_closes_per_hour: must be >= 1")


class LatchFile:
    """A latch kept on disk (written atomically and fsynced) so that restarts keep it.

    The first ``set`` wins until ``clear``. When the file cannot be written (a read-only or
    full SD card) the latch is still held, in memory, and its record says so.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._unsaved: dict[str, Any] | None = None

    def read(self) -> dict[str, Any] | None:
        if self._unsaved is not None:
            return self._unsaved
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # unreadable: stay safe, treat as latched
            return {"note": f"latch file unreadable: {exc}"}
        if not isinstance(data, dict):  # not a record we wrote (null included): latched as well
            return {"note": f"latch file holds {type(data).__name__}, not a record"}
        return data

    def set(self, record: dict[str, Any]) -> None:
        if self.read() is not None:
            return
        record = {**record, "time": time.time()}
        try:
            self._write(record)
        except OSError as exc:
            log.error("latch %s not saved (%s): held in memory until a restart", self.path, exc)
            self._unsaved = {**record, "note": f"not saved ({exc}): a restart would lose it"}

    def _write(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def clear(self) -> None:
        self._unsaved = None
        self.path.unlink(missing_ok=True)


class DeepDischargeLatch(LatchFile):
    """The cell that went below ``deep_discharge_v`` (cleared only by an explicit reset)."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir / "deep_discharge.json")

    def latch(self, cell: int, value: float) -> None:
        self.set({"cell": cell, "value": value})


class ContactorMachine:
    """Drives the contactors from protection state, feedback and requests. Call tick() every 10 ms."""

    def __init__(self, image: ProcessImage, driver: ContactorDriver, settings: ContactorSettings,
                 state_dir: Path, on_event: Callable[[Event], None],
                 trip_causes: Callable[[], list[str]]) -> None:
        self.image = image
        self.driver = driver
        self.settings = settings
        self.latch = DeepDischargeLatch(state_dir)
        self.error_latch = LatchFile(state_dir / "error.json")
        self.on_event = on_event
        self.trip_causes = trip_causes
        #: why whatever supervises the machine cannot be trusted now (the lane sets it: late or failing tick);
        #: each cause refuses a reset like an active MSL condition
        self.health_causes: Callable[[], list[str]] = lambda: []
        self.lock = threading.RLock()
        self.clock: Callable[[], float] = time.monotonic  # tests drive their own clock
        self.state = State.INIT
        self.since = self.clock()
        self.commanded = dict.fromkeys(CONTACTORS, False)
        self.commanded_at = dict.fromkeys(CONTACTORS, 0.0)
        self.error_causes: list[str] = []
        self.close_requested = settings.auto_close
        self.attempt = 0
        self.step = ""
        self.closes: deque[float] = deque()
        self.last_sent = 0.0
        self.trips = 0
        # every trip() call counts, in ERROR too: reset() refuses when one came in while it asked for causes
        self.trip_generation = 0
        self._last_trip_cause = ""
        self.feedback_faults: dict[str, str] = {}
        self._fb_invalid_since: dict[str, float] = {}  # contactor -> when its feedback left 0..3
        self._said_missing = False
        self._fb_index = {c: image.index(f"contactor.{c}") for c in CONTACTORS if f"contactor.{c}" in image.scalars}
        before = self.error_latch.read()
        self._error_saved = before is not None
        latched = self.latch.read()
        if latched is not None:
            self._enter(State.ERROR, self.clock(), f"deep discharge latched (cell {latched.get('cell')})")
        elif before is not None:
            causes = before.get("causes")
            self.error_causes = [str(c) for c in causes] if isinstance(causes, list) and causes else \
                [f"unknown ({before.get('note', 'no causes recorded')})"]
            self._enter(State.ERROR, self.clock(), f"ERROR before the restart: {'; '.join(self.error_causes)}")

    # -- outputs ---------------------------------------------------------------------

    def _set(self, now: float, **wanted: bool) -> None:
        changed = False
        for name, closed in wanted.items():
            if self.commanded[name] != closed:
                self.commanded[name] = closed
                self.commanded_at[name] = now
                changed = True
        if changed:
            self._send(now)

    def _send(self, now: float) -> None:
        c = self.commanded
        self.driver.command(c["main_positive"], c["main_negative"], c["precharge"])
        self.last_sent = now

    def _enter(self, state: State, now: float, reason: str) -> None:
        old = self.state
        self.state = state
        self.since = now
        level = Level.MSL if state is State.ERROR else Level.INFO
        self.on_event(Event(Kind.STATE, "contactors", level, True, message=f"{old.value} -> {state.value}: {reason}"))

    # -- inputs ----------------------------------------------------------------------

    def trip(self, cause: str, now: float | None = None) -> bool:
        """Open everything at once and latch ERROR; True when this trip left a non-ERROR state."""
        now = self.clock() if now is None else now
        with self.lock:
            # always send: the command goes out even if we believe the contactors are open already
            # (but several elements tripping together in ERROR need not repeat it within 10 ms)
            if self.state is not State.ERROR or any(self.commanded.values()) or now - self.last_sent > 0.01:
                for name in CONTACTORS:
                    self.commanded[name] = False
                    self.commanded_at[name] = now
                self._send(now)
            if cause not in self.error_causes:
                self.error_causes.append(cause)
            self.trip_generation += 1
            self._last_trip_cause = cause
            if self.state is State.ERROR:
                return False
            self.trips += 1
            self._enter(State.ERROR, now, cause)
            return True

    def request_close(self, now: float | None = None) -> tuple[bool, str]:
        """Operator (or auto_close) asks for the contactors to close."""
        now = self.clock() if now is None else now
        with self.lock:
            if self.state is State.ERROR:
                return False, "in ERROR: reset first"
            if self.state in (State.PRECHARGE, State.NORMAL):
                return True, f"already {self.state.value}"
            refused = self._guard(now)
            if refused:
                return False, refused
            self.close_requested = True
            return True, "close requested"

    def request_open(self, now: float | None = None) -> tuple[bool, str]:
        now = self.clock() if now is None else now
        with self.lock:
            self.close_requested = False
            if self.state in (State.NORMAL, State.PRECHARGE):
                self._enter(State.OPEN_REQUESTED, now, "open requested")
            return True, "open requested"

    def reset(self, clear_deep_discharge: bool = False, now: float | None = None) -> tuple[bool, str]:
        """Leave ERROR when every cause is gone; says which cause remains otherwise."""
        now = self.clock() if now is None else now
        # the causes are asked before taking our lock (the lock order above), so a trip can land between
        # the question and the lock: its generation tells, and refuses this reset
        generation = self.trip_generation
        causes = self.trip_causes() + self.health_causes()
        with self.lock:
            if self.state is not State.ERROR:
                return False, f"not in ERROR (state {self.state.value})"
            remaining = causes + [f"contactor {c}: {r}" for c, r in self.feedback_faults.items()]
            if self.trip_generation != generation:
                remaining.append(f"tripped again during the reset ({self._last_trip_cause}): reset again")
            latched = self.latch.read()
            if latched is not None and not clear_deep_discharge:
                remaining.append("deep discharge latched: check the cells, then reset with --clear-deep-discharge")
            if remaining:
                reason = "; ".join(remaining)
                self.on_event(Event(Kind.RESET, "reset", Level.INFO, False, message=f"refused: {reason}"))
                return False, reason
            if latched is not None:
                self.latch.clear()
            self.error_latch.clear()
            self._error_saved = False
            self.error_causes.clear()
            self.close_requested = self.settings.auto_close
            self.attempt = 0
            self.on_event(Event(Kind.RESET, "reset", Level.INFO, True, message="accepted"))
            self._enter(State.STANDBY, now, "reset")
            return True, "reset: STANDBY"

    def _guard(self, now: float) -> str:
        s = self.settings
        while self.closes and now - self.closes[0] > 3600:
            self.closes.popleft()
        if self.closes and now - self.closes[-1] < s.min_close_interval_s:
            return f"oscillation guard: last close {now - self.closes[-1]:.1f} s ago (min {s.min_close_interval_s} s)"
        if len(self.closes) >= s.max_closes_per_hour:
            return f"oscillation guard: {len(self.closes)} closes in the last hour (max {s.max_closes_per_hour})"
        return ""

    # -- the tick --------------------------------------------------------------------

    def _feedback(self, now: float) -> None:
        """Compare feedback with commands: a mismatch beyond the timeout, a weld, or feedback that
        stops arriving (neither of the others could be seen then) is a fault until it follows again."""
        for name, i in self._fb_index.items():
            fault, follows = self._feedback_fault(name, i, now)
            if fault and self.feedback_faults.get(name) != fault:
                self.feedback_faults[name] = fault
                self.on_event(Event(Kind.CONTACTOR, name, Level.MSL, True, message=f"contactor {name} {fault}"))
                self.trip(f"contactor {name} {fault}", now)
            elif follows and name in self.feedback_faults:
                del self.feedback_faults[name]
                self.on_event(Event(Kind.CONTACTOR, name, Level.MSL, False, message=f"contactor {name} follows again"))

    def _feedback_fault(self, name: str, i: int, now: float) -> tuple[str, bool]:
        """(fault or "", whether the feedback matches the command) of one contactor."""
        quality = self.image.quality_of(i, now)
        if quality != GOOD:  # while all are commanded open, STANDBY only refuses to close
            self._fb_invalid_since.pop(name, None)
            return (f"feedback {quality.name.lower()}" if any(self.commanded.values()) else ""), False
        raw = self.image.w_value[i]
        if raw not in FB_VALUES:  # none of the four states: as unusable as an invalid flag, once it persists
            since = self._fb_invalid_since.setdefault(name, now)
            if any(self.commanded.values()) and now - since > self.settings.feedback_timeout_s:
                return f"feedback invalid (value {raw:g})", False
            return "", False
        self._fb_invalid_since.pop(name, None)
        fb = int(raw)
        want = self.commanded[name]
        late = now - self.commanded_at[name] > self.settings.feedback_timeout_s
        if fb == FB_WELDED or (fb == FB_CLOSED and not want and late):
            return "welded (closed while commanded open)", False
        if fb == FB_FAULT:
            return "reports a fault", False
        if fb == FB_OPEN and want and late:
            return "did not close", False
        return "", fb == (FB_CLOSED if want else FB_OPEN)

    def tick(self, now: float, data_ready: bool) -> None:
        """Advance the machine; resend the command every command_period_s (a heartbeat for the PCU).

        ``data_ready``: every measurement protection watches is valid and no MSL condition is active.
        """
        with self.lock:
            self._feedback(now)
            st, s = self.state, self.settings
            if st is State.ERROR and not self._error_saved:
                # here, not in trip(): a receive thread must not wait for the disk (the contactors are open)
                self.error_latch.set({"causes": list(self.error_causes)})
                self._error_saved = True
            if st is State.INIT:
                if data_ready:
                    self._enter(State.STANDBY, now, "measurements valid")
            elif st is State.STANDBY:
                self._set(now, main_positive=False, main_negative=False, precharge=False)
                if self.close_requested and data_ready and self._feedback_present(now):
                    refused = self._guard(now)
                    if not refused:
                        self.closes.append(now)
                        self.attempt = 1
                        self._start_precharge(now)
            elif st is State.PRECHARGE:
                self._precharge(now)
            elif st is State.NORMAL:
                self._set(now, main_positive=True, main_negative=True, precharge=False)
            elif st is State.OPEN_REQUESTED:
                # only a good reading shows the current is low: an invalid or stale 0 A may hide a real
                # current, so the open then waits out open_timeout_s as for a high one (bounded: it never traps)
                reading = self.image.read("pack.current", now)
                current = abs(reading.value)
                known = reading.quality == GOOD
                if (known and current < s.open_current_a) or now - self.since > s.open_timeout_s:
                    self._set(now, main_positive=False, main_negative=False, precharge=False)
                    self._enter(State.STANDBY, now, f"opened at {current:.1f} A" if known else
                                f"opened after {s.open_timeout_s:g} s, current unknown ({reading.quality.name.lower()})")
            if now - self.last_sent >= s.command_period_s:
                self._send(now)

    def _feedback_present(self, now: float) -> bool:
        """Every contactor's feedback is valid (else closing waits, and says why once)."""
        missing = [n for n, i in self._fb_index.items()
                   if self.image.quality_of(i, now) != GOOD or self.image.w_value[i] not in FB_VALUES]
        if missing and not self._said_missing:
            self.on_event(Event(Kind.STATE, "contactors", Level.RSL, True,
                                message=f"not closing: no valid feedback from {', '.join(missing)}"))
        self._said_missing = bool(missing)
        return not missing

    def _start_precharge(self, now: float) -> None:
        self.step = "precharging"
        self._enter(State.PRECHARGE, now, f"attempt {self.attempt}")
        self._set(now, main_positive=False, main_negative=True, precharge=True)

    def _precharge(self, now: float) -> None:
        s = self.settings
        elapsed = now - self.since
        if self.step == "waiting":
            if elapsed >= s.precharge_retry_delay_s:
                self._start_precharge(now)
            return
        if self.step == "closing":  # _feedback trips if main+ does not close within the feedback timeout
            fb = self.image.read("contactor.main_positive", now) if "main_positive" in self._fb_index else None
            if fb is None or (fb.quality == GOOD and int(fb.value) == FB_CLOSED):
                self._set(now, main_positive=True, main_negative=True, precharge=False)
                self._enter(State.NORMAL, now, "precharge complete")
            return
        pack, link, cur = (self.image.read(n, now) for n in ("pack.voltage", "pack.link_voltage", "pack.current"))
        invalid = [r.name for r in (pack, link, cur) if r.quality != GOOD]
        diff, current = abs(pack.value - link.value), abs(cur.value)
        if not invalid and diff < s.precharge_max_voltage_diff_v and current < s.precharge_max_current_a:
            self.step = "closing"
            self._set(now, main_positive=True, main_negative=True, precharge=True)
        elif elapsed > s.precharge_timeout_s:
            self._set(now, main_positive=False, main_negative=False, precharge=False)
            reason = (f"precharge timed out ({', '.join(invalid)} not valid)" if invalid else
                      f"precharge timed out (link differs by {diff:.1f} V, current {current:.1f} A)")
            if self.attempt > s.precharge_retries:
                self.trip(f"precharge failed after {self.attempt} attempts: {reason}", now)
                return
            self.attempt += 1
            self.step = "waiting"
            self.since = now
            self.on_event(Event(Kind.STATE, "precharge", Level.RSL, True, message=f"{reason}; retrying"))

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {"state": self.state.value, "since_s": round(self.clock() - self.since, 1),
                    "commanded": dict(self.commanded), "error_causes": list(self.error_causes),
                    "feedback_faults": dict(self.feedback_faults), "precharge_attempt": self.attempt,
                    "close_requested": self.close_requested, "trips": self.trips,
                    "deep_discharge_latched": self.latch.read(), "error_latched": self.error_latch.read()}


class CanContactorDriver:
    """Contactor commands as frames (CONTACTOR_Command of our pack DBC), with a rolling alive counter."""

    def __init__(self, send: Callable[[dict[str, int]], bool]) -> None:
        self.send = send
        self.counter = 0
        self.sent = 0
        self.failed = 0

    def command(self, main_positive: bool, main_negative: bool, precharge: bool) -> bool:
        self.counter = (self.counter + 1) % 16
        ok = self.send({"MainPositiveRequest": int(main_positive), "MainNegativeRequest": int(main_negative),
                        "PrechargeRequest": int(precharge), "AliveCounter": self.counter})
        if ok:
            self.sent += 1
        else:
            self.failed += 1
        return ok
