"""Gateway side of the EIS module protocol (dbc/bmsgw_eis.dbc, docs/eis-can-protocol.md).

A pure state machine and frame builder: no threads, no asyncio, no clock of its own. The
daemon feeds it every received EIS frame (:meth:`EisDriver.on_frame`, from the bus's receive
thread) and calls :meth:`EisDriver.tick` periodically (every 50-100 ms) with the monotonic
time, the pack current and whether a protection event is active; ``tick`` returns the frames
to send, an abort always first. Completed spectra come out of :meth:`EisDriver.pop_records`
as :class:`estimators.spectrum.EisSpectrum`; sweeps given up come out of
:meth:`EisDriver.pop_failures`. A lock makes ``on_frame`` and ``tick`` safe to call from
different threads; no method blocks or does heavy work, so a sweep never delays protection.

Scheduling: on-demand requests (CLI, OPC UA, cloud) first, in order; otherwise the
configured targets round-robin, one sweep every ``period_s``. A sweep starts only while the
pack current has stayed within ``max_abs_current_a`` and varied by at most
``max_current_spread_a`` for ``stable_window_s``, and no protection event is active; it is
aborted at once on a protection event, an unknown (NaN) current, or a current that moves
more than ``abort_current_delta_a`` from its value at the start. Timeouts: the Ack (the
request is repeated ``ack_repeats`` times with the same SweepId, which the module treats as
a repetition), the Status frames (``status_timeout_s``), the whole sweep (the module's
estimate, at most ``ESTIMATE_LIMIT`` x our own, x ``duration_margin`` + ``duration_slack_s``)
and the result collection after Done (missing points are asked for again up to
``resend_rounds`` times). Answers that contradict the request abort the attempt: a Status
naming another target, an announced number of points other than the grid's, a point
measured half a grid step or more from its grid frequency. A failed attempt is retried
after ``retry_delay_s`` with a new SweepId, up to ``max_attempts`` attempts; errors that
cannot go away by retrying (invalid target, frequency, another grid ...) fail at once.
Every request ends with a record or a final failure, also one a cancel drops.
Aborts are not acknowledged by a timeout: instead, while the module's Status says it settles
or measures and no sweep of ours is running (an abort lost on the way, or a sweep a previous
gateway process left behind), every such Status is answered with another abort (SweepId 0);
SweepIds start at a random value, so a new process's first request is unlikely to repeat one
its predecessor left running.
"""

from __future__ import annotations

import functools
import math
import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, cast

import can
import cantools
import numpy as np

from estimators.spectrum import EisSpectrum, log_grid

DBC_PATH = Path(__file__).resolve().parent.parent / "dbc" / "bmsgw_eis.dbc"


@functools.lru_cache(maxsize=4)
def load_eis_dbc(path: str | Path = DBC_PATH) -> cantools.database.can.Database:
    """The EIS protocol's DBC, parsed once per path (the parsed model is only read)."""
    db = cantools.database.load_file(str(path), strict=True)
    if not isinstance(db, cantools.database.can.Database):
        raise ValueError(f"{path}: not a CAN database")
    return db

STATE_NAMES = {0: "Idle", 1: "Settling", 2: "Measuring", 3: "Done", 4: "Aborted", 5: "Error"}
ERROR_NAMES = {0: "None", 1: "Busy", 2: "InvalidSweepId", 3: "InvalidTarget", 4: "InvalidFrequency",
               5: "InvalidPoints", 6: "InvalidAmplitude", 7: "FdNotSupported", 8: "UnknownSweep",
               9: "DcCurrentTooHigh", 10: "VoltageOutOfRange", 11: "Overload", 12: "Drift", 13: "OverTemperature",
               14: "HardwareFault", 15: "AbortedByGateway", 16: "GatewayLost", 17: "InternalError"}
# errors a retry cannot cure
PERMANENT_ERRORS = frozenset({2, 3, 4, 5, 6, 14})
ABORT_REASONS = {"unspecified": 0, "operator": 1, "protection": 2, "current": 3, "timeout": 4, "shutdown": 5}
ST_SETTLING, ST_MEASURING, ST_DONE, ST_ABORTED, ST_ERROR = 1, 2, 3, 4, 5
ERR_BUSY, ERR_FD_NOT_SUPPORTED = 1, 7
CMD_ABORT, CMD_SWEEP, CMD_RESEND = 0, 1, 2
FD_POINTS = 5
LOG_F_MIN, LOG_F_MAX = -3.0, -3.0 + 0.002 * 4095
AMPLITUDE_MAX_A = 0.005 * 4095
MAX_POINTS = 1023
# the most a module's EstimatedDuration may exceed the gateway's own estimate (see _accepted)
ESTIMATE_LIMIT = 4.0


def quantize_log_f(f_hz: float) -> float:
    """log10 of a frequency as the request codes it (12 bits, 0.002 decade, from 1 mHz), the
    same arithmetic as a DBC decoder: raw * 0.002 + (-3)."""
    raw = min(max(round((math.log10(f_hz) - LOG_F_MIN) / 0.002), 0), 4095)
    return raw * 0.002 + LOG_F_MIN


@dataclass(frozen=True)
class EisTarget:
    """What a sweep measures: ``cell`` (index over the whole string) or ``module``."""

    kind: str
    index: int

    def __post_init__(self) -> None:
        if self.kind not in ("cell", "module"):
            raise ValueError(f"target kind must be 'cell' or 'module', not {self.kind!r}")
        if not 0 <= self.index <= 1023:
            raise ValueError(f"target index {self.index} outside 0..1023")

    @property
    def name(self) -> str:
        """The canonical signal name: ``cell[17]``, ``module[3]``."""
        return f"{self.kind}[{self.index}]"

    @property
    def type_code(self) -> int:
        return 0 if self.kind == "cell" else 1

    @classmethod
    def parse(cls, text: str) -> EisTarget:
        m = re.fullmatch(r"\s*(cell|module)\s*\[\s*(\d+)\s*\]\s*", text)
        if not m:
            raise ValueError(f"target {text!r} is not cell[N] or module[N]")
        return cls(m.group(1), int(m.group(2)))


@dataclass(frozen=True)
class Conditions:
    """Cell (or module) state at measurement time, from the process image (NaN = unknown)."""

    voltage_v: float = math.nan
    temperature_c: float = math.nan
    soc: float = math.nan


@dataclass(frozen=True)
class SweepSettings:
    """One sweep's parameters. ``amplitude_a = 0`` lets the module choose."""

    f_start_hz: float = 10_000.0
    f_stop_hz: float = 0.01
    points_per_decade: int = 10
    amplitude_a: float = 0.0
    fd: bool = False

    def validate(self, caps: Capabilities | None = None) -> None:
        for f in (self.f_start_hz, self.f_stop_hz):
            if not (f > 0 and LOG_F_MIN - 1e-9 <= math.log10(f) <= LOG_F_MAX + 1e-9):
                raise ValueError(f"frequency {f} Hz outside 1 mHz .. {10**LOG_F_MAX:.0f} Hz")
        if not 1 <= self.points_per_decade <= 63:
            raise ValueError("points_per_decade must be 1..63")
        if not 0 <= self.amplitude_a <= AMPLITUDE_MAX_A:
            raise ValueError(f"amplitude must be 0..{AMPLITUDE_MAX_A} A")
        n = self.points
        if n > MAX_POINTS:
            raise ValueError(f"{n} points, at most {MAX_POINTS}")
        if caps is not None:
            # the module compares the request's codes with the codes it advertised (both on the
            # 0.002 decade grid): so must we, or a frequency a fraction of a code beyond its
            # limit passes here and is refused there
            lo, hi = sorted(quantize_log_f(f) for f in (self.f_start_hz, self.f_stop_hz))
            if lo < math.log10(caps.min_freq_hz) - 1e-9 or hi > math.log10(caps.max_freq_hz) + 1e-9:
                raise ValueError(f"the module measures {caps.min_freq_hz:g} .. {caps.max_freq_hz:g} Hz")
            if self.amplitude_a > caps.max_amplitude_a + 1e-9:
                raise ValueError(f"the module's largest amplitude is {caps.max_amplitude_a} A")
            if n > caps.max_points:
                raise ValueError(f"{n} points, the module takes at most {caps.max_points}")

    def grid(self) -> np.ndarray[Any, np.dtype[np.float64]]:
        """The frequencies the module will measure: the protocol's grid from the log10 values
        as coded in the request (0.002 decade steps), exactly as the module decodes them."""
        return log_grid(10.0 ** quantize_log_f(self.f_start_hz), 10.0 ** quantize_log_f(self.f_stop_hz),
                        self.points_per_decade)

    @property
    def points(self) -> int:
        return int(self.grid().size)

    def estimated_duration_s(self, periods: float = 2.0, min_point_s: float = 0.2, settle_s: float = 5.0,
                             settle_periods: float = 1.0) -> float:
        """The measurement the protocol recommends (docs/eis-can-protocol.md, section 7): DC settling
        before the first point, then per point one period to settle and at least 2 periods and 0.2 s
        of integration."""
        f = self.grid()
        return settle_s + float((settle_periods / f + np.maximum(periods / f, min_point_s)).sum())


@dataclass(frozen=True)
class Capabilities:
    """From EIS_Capabilities."""

    protocol_version: int
    min_freq_hz: float
    max_freq_hz: float
    max_amplitude_a: float
    max_points: int
    fd_capable: bool
    module_targets: bool


@dataclass(frozen=True)
class EisDriverConfig:
    """Scheduling, stability and timeout settings (see the module docstring)."""

    sweep: SweepSettings = SweepSettings()
    periodic_targets: tuple[EisTarget, ...] = ()
    period_s: float = 3600.0
    max_abs_current_a: float = 2.0
    max_current_spread_a: float = 0.5
    stable_window_s: float = 30.0
    abort_current_delta_a: float = 1.0
    ack_timeout_s: float = 0.5
    ack_repeats: int = 2
    status_timeout_s: float = 3.0
    duration_margin: float = 1.5
    duration_slack_s: float = 30.0
    result_timeout_s: float = 2.0
    resend_rounds: int = 3
    max_attempts: int = 3
    retry_delay_s: float = 10.0
    queue_limit: int = 64
    max_records: int = 16

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.ack_repeats < 0 or self.resend_rounds < 0:
            raise ValueError("max_attempts >= 1, ack_repeats >= 0, resend_rounds >= 0")
        for name in ("period_s", "stable_window_s", "ack_timeout_s", "status_timeout_s", "result_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        self.sweep.validate()


@dataclass(frozen=True)
class SweepFailure:
    """A sweep attempt that failed; ``final`` when no retry follows."""

    handle: int
    target: EisTarget
    reason: str
    attempt: int
    final: bool
    at: float


@dataclass
class EisDriverStats:
    frames_in: int = 0
    bad_frames: int = 0
    foreign_frames: int = 0  # results/acks of another SweepId
    frames_out: int = 0
    sweeps_started: int = 0
    sweeps_completed: int = 0
    aborts: int = 0
    ack_timeouts: int = 0
    status_timeouts: int = 0
    sweep_timeouts: int = 0
    module_errors: int = 0
    resend_requests: int = 0
    retries: int = 0
    failures: int = 0


class Phase(Enum):
    IDLE = "idle"
    REQUESTING = "requesting"  # request sent, waiting for the Ack
    RUNNING = "running"  # accepted, points arriving
    COLLECTING = "collecting"  # module Done, asking for missing points
    BACKOFF = "backoff"  # waiting before the next attempt


@dataclass
class _Request:
    handle: int
    target: EisTarget
    settings: SweepSettings
    on_demand: bool
    attempts: int = 0
    not_before: float = 0.0


@dataclass
class _Point:
    frequency: float = math.nan
    z_re: float = math.nan
    z_im: float = math.nan
    flags: int = 0
    parts: int = 0  # bit mask of the classic parts received (0b111 = complete)
    arrived: float = math.nan
    conditions: Conditions | None = None


@dataclass
class _Active:
    req: _Request
    sweep_id: int
    frame: can.Message
    sent_at: float
    log_f: np.ndarray[Any, np.dtype[np.float64]]  # log10 of the requested grid
    repeats: int = 0
    started_wall: float = 0.0
    started_at: float = 0.0
    current_ref: float = 0.0
    points_total: int = 0
    deadline: float = math.inf
    last_status: float = 0.0
    module_points_done: int = 0
    points: dict[int, _Point] = field(default_factory=dict)
    collect_deadline: float = math.inf
    resend_rounds: int = 0


class EisDriver:
    """The EIS module driver (see the module docstring).

    ``conditions(target)`` returns the target's voltage, temperature and SoC now (read from
    the process image); it is called once per received point and must be cheap and
    non-blocking. ``wall_clock`` gives record timestamps (default ``time.time``).
    """

    def __init__(self, conditions: Callable[[EisTarget], Conditions], config: EisDriverConfig | None = None, *,
                 dbc_path: str | Path = DBC_PATH, wall_clock: Callable[[], float] = time.time) -> None:
        db = load_eis_dbc(dbc_path)
        self._msg = {m.name: m for m in db.messages}
        self._id = {m.frame_id: m for m in db.messages}
        self.conditions = conditions
        self.config = config or EisDriverConfig()
        self.wall_clock = wall_clock
        self.stats = EisDriverStats()
        self.capabilities: Capabilities | None = None
        self.module_state: int | None = None
        self.module_error: int = 0
        self.module_sweep_id: int = 0
        self.last_failure: SweepFailure | None = None
        self._lock = threading.RLock()
        self._queue: deque[_Request] = deque()
        self._retry: _Request | None = None
        self._active: _Active | None = None
        self._phase = Phase.IDLE
        self._backoff_until = 0.0
        self._pending: list[can.Message] = []
        self._records: deque[EisSpectrum] = deque(maxlen=self.config.max_records)
        # room for a cancel of a full queue: every dropped request leaves its failure here
        self._failures: deque[SweepFailure] = deque(maxlen=self.config.queue_limit + 64)
        self._sweep_handles: dict[int, int] = {}  # SweepId -> handle of its last attempt
        self._next_handle = 1
        # a new process must not reuse the SweepId its predecessor may have left running (the
        # module would take the request as a repetition of that sweep and keep measuring it)
        self._next_sweep_id = random.randrange(1, 256)
        self._rr = 0
        self._next_periodic = 0.0
        self._now = 0.0
        self._hist: deque[tuple[float, float]] = deque()
        self._stable_since: float | None = None
        self._clear_busy = False
        self._stray_abort_due = False

    # -- requests --------------------------------------------------------------------------

    def request_sweep(self, target: EisTarget | str, settings: SweepSettings | None = None, **overrides: Any) -> int:
        """Queue an on-demand sweep; returns its handle. ``overrides`` change fields of the
        configured :class:`SweepSettings` (``f_start_hz=1000``, ``fd=True``, ...).
        ValueError when the target or settings are invalid or the queue is full."""
        tgt = EisTarget.parse(target) if isinstance(target, str) else target
        s = replace(settings or self.config.sweep, **overrides)
        with self._lock:
            s.validate(self.capabilities)
            if s.fd and self.capabilities is not None and not self.capabilities.fd_capable:
                s = replace(s, fd=False)
            if len(self._queue) >= self.config.queue_limit:
                raise ValueError("EIS request queue is full")
            h = self._next_handle
            self._next_handle += 1
            self._queue.append(_Request(h, tgt, s, True))
            return h

    def cancel(self, handle: int | None = None) -> bool:
        """Drop a queued request, or abort the running sweep (``handle`` None: the running one,
        and everything queued). True when something was cancelled."""
        with self._lock:
            dropped = [r for r in (*self._queue, self._retry) if r is not None and handle in (None, r.handle)]
            for r in dropped:
                if r is self._retry:
                    self._retry = None
                else:
                    self._queue.remove(r)
                # whoever waits for this request's outcome (`bmsgw eis sweep`) must learn it ended
                self._report(r, "cancelled by operator", final=True)
            a = self._active
            if a is not None and (handle is None or a.req.handle == handle) \
                    and self._phase in (Phase.REQUESTING, Phase.RUNNING, Phase.COLLECTING):
                self._abort(a, "cancelled by operator", retry=False, code="operator")
                return True
            return bool(dropped)

    # -- outputs ----------------------------------------------------------------------------

    def pop_records(self) -> list[EisSpectrum]:
        with self._lock:
            out = list(self._records)
            self._records.clear()
            return out

    def pop_failures(self) -> list[SweepFailure]:
        with self._lock:
            out = list(self._failures)
            self._failures.clear()
            return out

    @property
    def phase(self) -> Phase:
        return self._phase

    def handle_of(self, sweep_id: int) -> int | None:
        """The request handle a SweepId (of a record) belongs to."""
        with self._lock:
            return self._sweep_handles.get(sweep_id)

    def stage(self, handle: int) -> str | None:
        """Where a request is: "queued", "retry" (an attempt failed, the next one waits), "running",
        "measured" or "failed" (its record or final failure not popped yet); None when the driver
        no longer holds it (popped, or never issued)."""
        with self._lock:
            a = self._active
            if a is not None and a.req.handle == handle:
                return "running"
            if any(r.handle == handle for r in self._queue):
                return "queued"
            if self._retry is not None and self._retry.handle == handle:
                return "retry"
            if any(self._sweep_handles.get(r.sweep_id) == handle for r in self._records):
                return "measured"
            if any(f.handle == handle for f in self._failures):
                return "failed"
            return None

    def status(self) -> dict[str, Any]:
        """A snapshot for the CLI / OPC UA: what runs, progress, module state, queue."""
        with self._lock:
            a = self._active
            busy = a is not None and self._phase in (Phase.REQUESTING, Phase.RUNNING, Phase.COLLECTING)
            received = sum(1 for p in a.points.values() if self._complete(p, a)) if a else 0
            return {
                "phase": self._phase.value,
                "target": a.req.target.name if busy and a else None,
                "handle": a.req.handle if busy and a else None,
                "sweep_id": a.sweep_id if busy and a else None,
                "attempt": a.req.attempts if busy and a else None,
                "points_received": received if busy else 0,
                "points_total": a.points_total if busy and a else 0,
                "module_state": STATE_NAMES.get(self.module_state, str(self.module_state))
                if self.module_state is not None else None,
                "module_error": ERROR_NAMES.get(self.module_error, str(self.module_error)),
                "queued": [r.target.name for r in self._queue],
                "current_stable": self._stable(self._now),
                "last_failure": (self.last_failure.target.name + ": " + self.last_failure.reason)
                if self.last_failure else None,
                "capabilities": self.capabilities.__dict__ if self.capabilities else None,
            }

    # -- frames in --------------------------------------------------------------------------

    def on_frame(self, msg: can.Message, now: float | None = None) -> None:
        """A frame from the bus (any ID; frames that are not EIS answers are ignored).
        ``now``: monotonic time of arrival, default the time of the last :meth:`tick`."""
        if msg.is_extended_id or msg.is_error_frame or msg.is_remote_frame:
            return
        m = self._id.get(msg.arbitration_id)
        if m is None or m.senders != ["EIS"]:
            return
        with self._lock:
            t = self._now if now is None else now
            self.stats.frames_in += 1
            data = bytes(msg.data)
            if len(data) < m.length:
                self.stats.bad_frames += 1
                return
            try:
                v = cast(dict[str, Any], m.decode(data[:m.length], decode_choices=False))
            except (cantools.database.DecodeError, ValueError, KeyError, IndexError):
                self.stats.bad_frames += 1
                return
            handler = {"EIS_Ack": self._on_ack, "EIS_Status": self._on_status, "EIS_Capabilities": self._on_caps,
                       "EIS_ResultPoint": self._on_point, "EIS_ResultPointsFD": self._on_points_fd}[m.name]
            handler(v, t)

    def _on_caps(self, v: dict[str, Any], now: float) -> None:
        self.capabilities = Capabilities(
            protocol_version=int(v["ProtocolVersion"]), min_freq_hz=10.0 ** float(v["MinFreqLog10"]),
            max_freq_hz=10.0 ** float(v["MaxFreqLog10"]), max_amplitude_a=float(v["MaxAmplitude"]),
            max_points=int(v["MaxPoints"]), fd_capable=bool(v["FdCapable"]), module_targets=bool(v["ModuleTargets"]))

    def _on_ack(self, v: dict[str, Any], now: float) -> None:
        a = self._active
        sid, cmd, result = int(v["SweepId"]), int(v["Command"]), int(v["Result"])
        if a is None or sid != a.sweep_id:
            self.stats.foreign_frames += 1
            return
        if cmd == CMD_SWEEP and result == 0 and self._phase in (Phase.REQUESTING, Phase.RUNNING):
            # in RUNNING the module's first Status came first (both go out "at once"): its
            # estimate and point count still hold
            self._accepted(a, now, int(v["PointsTotal"]), float(v["EstimatedDuration"]))
        elif cmd == CMD_SWEEP and self._phase == Phase.REQUESTING:
            if result == ERR_BUSY:
                self._clear_busy = True  # something else runs (e.g. before a gateway restart): abort it first
                self._fail(a, "module busy", retry=True)
            elif result == ERR_FD_NOT_SUPPORTED and a.req.settings.fd:
                a.req.settings = replace(a.req.settings, fd=False)
                self._fail(a, "module cannot send CAN FD results; retrying with classic frames", retry=True,
                           count=False)
            else:
                self.stats.module_errors += 1
                self._fail(a, f"rejected: {ERROR_NAMES.get(result, result)}", retry=result not in PERMANENT_ERRORS)
        elif cmd == CMD_RESEND and result != 0 and self._phase == Phase.COLLECTING:
            self._fail(a, f"resend refused: {ERROR_NAMES.get(result, result)}", retry=True)

    def _accepted(self, a: _Active, now: float, points: int, est_s: float) -> None:
        """The module runs our sweep (Ack, or a Status when the Ack is late or lost)."""
        if points != a.points_total:  # another grid than the protocol's: its points would be misfiled
            self._abort(a, f"the module announces {points} points, the request has {a.points_total}", retry=False)
            return
        self._phase = Phase.RUNNING
        own = a.req.settings.estimated_duration_s()
        # a module may integrate longer than the recommended minimum, but not for ever: an
        # estimate of up to 65535 s would let a module that hangs in Measuring keep the target
        # excited and the EIS path blocked for a day before the sweep timeout ends it
        est = min(est_s, ESTIMATE_LIMIT * own) if est_s > 0 else own
        a.deadline = now + est * self.config.duration_margin + self.config.duration_slack_s
        a.last_status = now

    def _on_status(self, v: dict[str, Any], now: float) -> None:
        state, sid, err = int(v["State"]), int(v["SweepId"]), int(v["ErrorCode"])
        self.module_state, self.module_error, self.module_sweep_id = state, err, sid
        if self._module_unsupervised():
            self._stray_abort_due = True  # one abort per such Status: at most the Status rate
        a = self._active
        if a is None or sid != a.sweep_id or self._phase not in (Phase.REQUESTING, Phase.RUNNING, Phase.COLLECTING):
            return
        target = int(v["TargetType"]), int(v["TargetIndex"])
        if target != (a.req.target.type_code, a.req.target.index):  # its points would be filed as ours
            self._abort(a, f"the module measures target type {target[0]} index {target[1]}, not {a.req.target.name}",
                        retry=True)
            return
        a.last_status = now
        a.module_points_done = int(v["PointsDone"])
        if self._phase == Phase.REQUESTING and state in (ST_SETTLING, ST_MEASURING, ST_DONE):
            self._accepted(a, now, int(v["PointsTotal"]), 0.0)  # the Ack is late or lost; the status says it runs
            if self._active is not a:
                return
        if state == ST_DONE and self._phase == Phase.RUNNING:
            self._phase = Phase.COLLECTING
            a.collect_deadline = now + self.config.result_timeout_s
            self._check_complete(a, now)
        elif state == ST_ERROR and self._phase in (Phase.REQUESTING, Phase.RUNNING):
            self.stats.module_errors += 1
            self._fail(a, f"module error: {ERROR_NAMES.get(err, err)}", retry=err not in PERMANENT_ERRORS)
        elif state == ST_ABORTED and self._phase in (Phase.REQUESTING, Phase.RUNNING):
            self._fail(a, f"aborted by the module: {ERROR_NAMES.get(err, err)}", retry=True)

    def _module_unsupervised(self) -> bool:
        """The module's last Status says it excites a target, but no sweep of ours runs: an abort
        was lost, or a previous gateway process left it running."""
        return self.module_state in (ST_SETTLING, ST_MEASURING) and \
            (self._active is None or self._phase not in (Phase.REQUESTING, Phase.RUNNING))

    def _point(self, a: _Active, k: int, now: float) -> _Point | None:
        if not 0 <= k < max(a.points_total, 1) or k > MAX_POINTS:
            self.stats.bad_frames += 1
            return None
        p = a.points.get(k)
        if p is None:
            # a point first seen after Done was asked for again: it was measured earlier, under
            # other conditions than now; _build_record gives it those of its neighbours
            cond = None if self._phase == Phase.COLLECTING else self._conditions(a)
            p = a.points[k] = _Point(arrived=now, conditions=cond)
        return p

    def _conditions(self, a: _Active) -> Conditions | None:
        try:
            return self.conditions(a.req.target)
        except Exception:  # a broken callback must not stop the protocol
            return None

    def _on_point(self, v: dict[str, Any], now: float) -> None:
        a = self._active
        if a is None or int(v["SweepId"]) != a.sweep_id or self._phase not in (Phase.RUNNING, Phase.COLLECTING):
            self.stats.foreign_frames += 1
            return
        p = self._point(a, int(v["PointIndex"]), now)
        if p is None:
            return
        part = int(v["Part"])
        if part == 0:
            p.frequency, p.flags = float(v["Frequency"]), int(v["PointFlags"])
            if not self._on_grid(a, int(v["PointIndex"]), p.frequency):
                return
        elif part == 1:
            p.z_re = float(v["ZReal"])
        else:
            p.z_im = float(v["ZImag"])
        p.parts |= 1 << part
        if self._phase == Phase.COLLECTING:
            self._check_complete(a, now)

    def _on_points_fd(self, v: dict[str, Any], now: float) -> None:
        a = self._active
        if a is None or int(v["SweepId"]) != a.sweep_id or self._phase not in (Phase.RUNNING, Phase.COLLECTING):
            self.stats.foreign_frames += 1
            return
        first, count = int(v["FirstPoint"]), int(v["PointCount"])
        if not 1 <= count <= FD_POINTS:
            self.stats.bad_frames += 1
            return
        for slot in range(count):
            p = self._point(a, first + slot, now)
            if p is None:
                return
            p.frequency = float(v[f"Point{slot}_Frequency"])
            p.z_re = float(v[f"Point{slot}_ZReal"])
            p.z_im = float(v[f"Point{slot}_ZImag"])
            p.flags = int(v[f"Point{slot}_Flags"])
            p.parts = 0b111
            if not self._on_grid(a, first + slot, p.frequency):
                return
        if self._phase == Phase.COLLECTING:
            self._check_complete(a, now)

    def _on_grid(self, a: _Active, k: int, f: float) -> bool:
        """Point k measured near its requested frequency, or the attempt fails. Strictly within half
        a grid step (in log f): neighbours can never meet, so a record's frequencies are distinct
        and in sweep order. A non-finite frequency is left to :meth:`_complete` (asked for again)."""
        if not (math.isfinite(f) and f > 0) or abs(math.log10(f) - a.log_f[k]) < 0.5 / a.req.settings.points_per_decade:
            return True
        self._abort(a, f"point {k} measured at {f:.6g} Hz, requested {10.0 ** a.log_f[k]:.6g} Hz", retry=True)
        return False

    @staticmethod
    def _complete(p: _Point, a: _Active) -> bool:
        # the protocol forbids NaN/inf in results; one such value would spoil the whole analysis
        return (p.parts == 0b111 and math.isfinite(p.frequency) and p.frequency > 0
                and math.isfinite(p.z_re) and math.isfinite(p.z_im))

    def _missing(self, a: _Active) -> list[int]:
        return [k for k in range(a.points_total) if k not in a.points or not self._complete(a.points[k], a)]

    def _check_complete(self, a: _Active, now: float) -> None:
        if self._missing(a):
            return
        self._records.append(self._build_record(a, now))
        self.stats.sweeps_completed += 1
        self._active = None
        self._phase = Phase.IDLE

    def _build_record(self, a: _Active, now: float) -> EisSpectrum:
        ks = list(range(a.points_total))
        pts = [a.points[k] for k in ks]
        cond = [p.conditions for p in pts]

        def col(name: str) -> np.ndarray[Any, np.dtype[np.float64]]:
            vals = np.asarray([getattr(c, name) if c is not None else math.nan for c in cond], dtype=np.float64)
            ok = np.isfinite(vals)
            if ok.any() and not ok.all():  # points asked for again: conditions of their neighbours
                idx = np.arange(vals.size)
                vals = np.interp(idx, idx[ok], vals[ok])
            return vals

        return EisSpectrum(
            frequency_hz=np.asarray([p.frequency for p in pts]), z_re_ohm=np.asarray([p.z_re for p in pts]),
            z_im_ohm=np.asarray([p.z_im for p in pts]), voltage_v=col("voltage_v"),
            temperature_c=col("temperature_c"), soc=col("soc"), flags=np.asarray([p.flags for p in pts]),
            timestamp=a.started_wall, target=a.req.target.name, sweep_id=a.sweep_id,
            duration_s=now - a.started_at, pack_current_a=a.current_ref)

    # -- the clock --------------------------------------------------------------------------

    def tick(self, now: float, pack_current_a: float, protection_event_active: bool) -> list[can.Message]:
        """Advance the state machine; returns the frames to send now (an abort first)."""
        with self._lock:
            self._now = now
            out: list[can.Message] = []
            cfg = self.config
            ok_current = math.isfinite(pack_current_a)
            if not ok_current or protection_event_active:
                self._hist.clear()
                self._stable_since = None
            else:
                if self._stable_since is None:
                    self._stable_since = now
                self._hist.append((now, pack_current_a))
                while self._hist and self._hist[0][0] < now - cfg.stable_window_s:
                    self._hist.popleft()
            a = self._active
            measuring = a is not None and self._phase in (Phase.REQUESTING, Phase.RUNNING)
            if a is not None and measuring:
                reason = None
                if protection_event_active:
                    reason = "protection"
                elif not ok_current:
                    reason = "current"
                elif (abs(pack_current_a - a.current_ref) > cfg.abort_current_delta_a
                      or abs(pack_current_a) > cfg.max_abs_current_a + cfg.abort_current_delta_a):
                    reason = "current"
                if reason is not None:
                    # a protection abort stops whatever the module is doing (SweepId 0)
                    out.append(self._abort_frame(0 if reason == "protection" else a.sweep_id, reason))
                    self.stats.aborts += 1
                    self._fail(a, "aborted: protection event" if reason == "protection"
                               else "aborted: pack current changed", retry=True)
            out.extend(self._pending)
            self._pending.clear()
            a = self._active
            if a is not None:
                out.extend(self._timeouts(a, now))
            out.extend(self._stray_abort(protection_event_active))
            if self._phase == Phase.BACKOFF and now >= self._backoff_until:
                self._phase = Phase.IDLE
            if self._phase == Phase.IDLE and not protection_event_active:
                out.extend(self._maybe_start(now, pack_current_a))
            self.stats.frames_out += len(out)
            return out

    def _timeouts(self, a: _Active, now: float) -> list[can.Message]:
        cfg = self.config
        out: list[can.Message] = []
        if self._phase == Phase.REQUESTING and now - a.sent_at > cfg.ack_timeout_s:
            if a.repeats < cfg.ack_repeats:
                a.repeats += 1
                a.sent_at = now
                out.append(a.frame)
            else:
                self.stats.ack_timeouts += 1
                out.append(self._abort_frame(a.sweep_id, "timeout"))
                self._fail(a, "no answer from the EIS module", retry=True)
        elif self._phase == Phase.RUNNING:
            if now - a.last_status > cfg.status_timeout_s:
                self.stats.status_timeouts += 1
                out.append(self._abort_frame(a.sweep_id, "timeout"))
                self._fail(a, "EIS module status lost", retry=True)
            elif now > a.deadline:
                self.stats.sweep_timeouts += 1
                out.append(self._abort_frame(a.sweep_id, "timeout"))
                self._fail(a, "sweep took too long", retry=True)
        elif self._phase == Phase.COLLECTING and now > a.collect_deadline:
            missing = self._missing(a)
            if not missing:
                self._check_complete(a, now)
            elif a.resend_rounds < cfg.resend_rounds:
                a.resend_rounds += 1
                a.collect_deadline = now + cfg.result_timeout_s
                for first, count in _runs(missing):
                    out.append(self._frame("EIS_ResendRequest", {"SweepId": a.sweep_id, "FirstPoint": first,
                                                                 "PointCount": count}))
                    self.stats.resend_requests += 1
            else:
                self._fail(a, f"{len(missing)} points missing after {cfg.resend_rounds} resend requests", retry=True)
        return out

    def _stray_abort(self, protection_event_active: bool) -> list[can.Message]:
        """Abort a sweep the module runs without us, once per Status that reports it: an abort
        that did not reach the module is otherwise never repeated, and the cell stays excited."""
        due, self._stray_abort_due = self._stray_abort_due, False
        if not due or not self._module_unsupervised():
            return []
        self.stats.aborts += 1
        self._clear_busy = False  # this abort clears the module for the next request too
        return [self._abort_frame(0, "protection" if protection_event_active else "unspecified")]

    def _stable(self, now: float) -> bool:
        cfg = self.config
        if self._stable_since is None or now - self._stable_since < cfg.stable_window_s or not self._hist:
            return False
        vals = [i for _, i in self._hist]
        return max(abs(v) for v in vals) <= cfg.max_abs_current_a and max(vals) - min(vals) <= cfg.max_current_spread_a

    def _maybe_start(self, now: float, current: float) -> list[can.Message]:
        cfg = self.config
        req: _Request | None = None
        if self._retry is not None and now >= self._retry.not_before:
            req = self._retry
        elif self._retry is None and self._queue:
            req = self._queue[0]
        elif self._retry is None and cfg.periodic_targets and now >= self._next_periodic:
            tgt = cfg.periodic_targets[self._rr % len(cfg.periodic_targets)]
            req = _Request(0, tgt, cfg.sweep, False)
        if req is None or not self._stable(now):
            return []
        out: list[can.Message] = []
        if self._clear_busy:
            out.append(self._abort_frame(0, "unspecified"))
            self._clear_busy = False
        if req is self._retry:
            self._retry = None
            self.stats.retries += 1
        elif self._queue and req is self._queue[0]:
            self._queue.popleft()
        else:
            self._rr += 1
            self._next_periodic = now + cfg.period_s
            req.handle = self._next_handle
            self._next_handle += 1
        req.attempts += 1
        sid = self._next_sweep_id
        self._next_sweep_id = sid % 255 + 1
        s = req.settings
        self._sweep_handles[sid] = req.handle
        frame = self._frame("EIS_SweepRequest", {
            "SweepId": sid, "TargetType": req.target.type_code, "TargetIndex": req.target.index,
            "StartFreqLog10": quantize_log_f(s.f_start_hz), "StopFreqLog10": quantize_log_f(s.f_stop_hz),
            "PointsPerDecade": s.points_per_decade, "ExcitationAmplitude": s.amplitude_a,
            "ResultFormat": 1 if s.fd else 0})
        grid = s.grid()
        self._active = _Active(req, sid, frame, now, np.log10(grid), started_wall=self.wall_clock(), started_at=now,
                               current_ref=current, points_total=grid.size)
        self._phase = Phase.REQUESTING
        self.stats.sweeps_started += 1
        out.append(frame)
        return out

    def _fail(self, a: _Active, reason: str, *, retry: bool, count: bool = True) -> None:
        """End the active attempt; schedule a retry or give up."""
        req = a.req
        if not count:
            req.attempts -= 1
        final = not retry or req.attempts >= self.config.max_attempts
        self._report(req, reason, final)
        self._active = None
        self._phase = Phase.BACKOFF
        self._backoff_until = self._now + (0.0 if not count else self.config.retry_delay_s)
        if not final:
            req.not_before = self._backoff_until
            self._retry = req
        elif not req.on_demand:
            self._next_periodic = self._now + self.config.period_s

    def _abort(self, a: _Active, reason: str, *, retry: bool, code: str = "unspecified") -> None:
        """Stop the module's sweep (on the next tick) and fail the attempt."""
        self._pending.append(self._abort_frame(a.sweep_id, code))
        self.stats.aborts += 1
        self._fail(a, reason, retry=retry)

    def _report(self, req: _Request, reason: str, final: bool) -> None:
        f = SweepFailure(req.handle, req.target, reason, req.attempts, final, self._now)
        self.last_failure = f
        self._failures.append(f)
        self.stats.failures += 1

    # -- frames out -------------------------------------------------------------------------

    def _abort_frame(self, sweep_id: int, reason: str) -> can.Message:
        return self._frame("EIS_Abort", {"SweepId": sweep_id, "AbortReason": ABORT_REASONS[reason]})

    def _frame(self, name: str, values: dict[str, float]) -> can.Message:
        m = self._msg[name]
        data = m.encode(values, scaling=True, strict=True)
        return can.Message(arbitration_id=m.frame_id, data=data, is_extended_id=False, is_fd=False)


def _runs(idx: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of sorted indices as (first, count)."""
    out: list[tuple[int, int]] = []
    for k in idx:
        if out and out[-1][0] + out[-1][1] == k and out[-1][1] < MAX_POINTS:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((k, 1))
    return out
