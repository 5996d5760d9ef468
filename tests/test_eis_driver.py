"""The EIS driver and the simulated EIS module talking the protocol to each other, tick by tick."""

from __future__ import annotations

import math
import struct
from collections.abc import Callable

import can
import cantools
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.eis_driver import (
    ESTIMATE_LIMIT,
    Conditions,
    EisDriver,
    EisDriverConfig,
    EisTarget,
    Phase,
    SweepSettings,
)
from drivers.sim_eis import DBC_PATH, STATE_ABORTED, STATE_DONE, STATE_MEASURING, SimConditions, SimEis

DB = cantools.database.load_file(str(DBC_PATH))
SWEEP = SweepSettings(f_start_hz=10_000.0, f_stop_hz=0.01, points_per_decade=10)


class Link:
    """Driver and simulated module on a lossless wire; the clock is the module's tick."""

    def __init__(self, sim_kw: dict[str, object] | None = None, **cfg: object) -> None:
        self.to_gw: list[can.Message] = []
        self.sent: list[can.Message] = []
        self.received: list[can.Message] = []
        kw: dict[str, object] = {"speed": 2000.0, "noise": 0.0}
        kw.update(sim_kw or {})
        self.sim = SimEis(self.to_gw.append, **kw)  # type: ignore[arg-type]
        base: dict[str, object] = {"sweep": SWEEP, "stable_window_s": 0.2, "retry_delay_s": 0.2}
        base.update(cfg)
        self.drv = EisDriver(lambda t: Conditions(3.65, 24.0, 0.5), EisDriverConfig(**base))  # type: ignore[arg-type]
        # the wire's faults: a module frame altered or dropped (None) on its way, a gateway frame lost
        self.wire_in: Callable[[can.Message], can.Message | None] = lambda m: m
        self.lost_out: Callable[[can.Message], bool] = lambda m: False

    def run(self, ticks: int, current: float | Callable[[float], float] = 0.0,
            protection: Callable[[float], bool] = lambda t: False,
            until: Callable[[], bool] | None = None) -> None:
        for _ in range(ticks):
            self.sim.tick()
            for m in self.to_gw:
                self.received.append(m)
                arrived = self.wire_in(m)
                if arrived is not None:
                    self.drv.on_frame(arrived, self.sim.now)
            self.to_gw.clear()
            now = self.sim.now
            out = self.drv.tick(now, current(now) if callable(current) else current, protection(now))
            self.sent.extend(out)
            for m in out:
                if not self.lost_out(m):
                    self.sim.receive(m)
            if until is not None and until():
                return

    def sent_named(self, name: str) -> list[dict[str, float]]:
        msg = DB.get_message_by_name(name)
        return [DB.decode_message(m.arbitration_id, m.data, decode_choices=False)
                for m in self.sent if m.arbitration_id == msg.frame_id]


def _check_against_truth(link: Link, rec_target: str = "cell[5]") -> None:
    recs = link.drv.pop_records()
    assert len(recs) == 1
    r = recs[0]
    assert r.target == rec_target and r.n == 61
    expect = SWEEP.grid()
    np.testing.assert_allclose(r.frequency_hz, expect, rtol=1e-6)
    truth = link.sim.true_impedance(0, 5, r.frequency_hz, 24.0, 0.5)  # noise 0, no current: exact but float32
    np.testing.assert_allclose(r.z_re_ohm, truth.real, rtol=1e-6)
    np.testing.assert_allclose(r.z_im_ohm, truth.imag, rtol=1e-6, atol=1e-12)
    assert np.all(r.voltage_v == 3.65) and np.all(r.temperature_c == 24.0) and np.all(r.soc == 0.5)
    np.testing.assert_allclose(r.abs_ohm, np.abs(truth), rtol=1e-6)


def _setup(link: Link) -> None:
    link.sim.set_conditions(0, 5, SimConditions(temperature_c=24.0, soc=0.5))


def _running_sweep(link: Link, steps: int = 60) -> None:
    """cell[5] being measured by a slowed module (still running when the test interferes)."""
    _setup(link)
    link.sim.speed = 50.0
    link.drv.request_sweep("cell[5]")
    link.run(steps)
    assert link.drv.phase is Phase.RUNNING


def test_classic_sweep_three_frames_per_point() -> None:
    link = Link()
    _setup(link)
    link.drv.request_sweep("cell[5]")
    link.run(400, until=lambda: bool(link.drv._records))
    result_frames = [m for m in link.received if m.arbitration_id == 0x320]
    assert len(result_frames) == 3 * 61 and all(len(m.data) == 8 and not m.is_fd for m in result_frames)
    parts = [DB.decode_message(0x320, m.data, decode_choices=False)["Part"] for m in result_frames]
    assert parts == [0, 1, 2] * 61
    _check_against_truth(link)
    assert link.drv.phase is Phase.IDLE and link.drv.stats.sweeps_completed == 1
    assert link.drv.stats.resend_requests == 0


def test_fd_sweep_five_points_per_frame() -> None:
    link = Link()
    _setup(link)
    link.drv.request_sweep(EisTarget("cell", 5), fd=True)
    link.run(400, until=lambda: bool(link.drv._records))
    fd = [m for m in link.received if m.arbitration_id == 0x321]
    assert fd and all(m.is_fd and len(m.data) == 64 for m in fd)
    counts = [DB.decode_message(0x321, m.data, decode_choices=False)["PointCount"] for m in fd]
    assert sum(counts) == 61 and max(counts) == 5 and len(fd) < 61 / 2
    assert not any(m.arbitration_id == 0x320 for m in link.received)
    _check_against_truth(link)


def test_fd_request_falls_back_to_classic_on_a_classic_module() -> None:
    link = Link(sim_kw={"fd_capable": False})
    _setup(link)
    link.sim.tick()  # no capabilities known yet: the driver asks for FD and is refused
    link.drv.capabilities = None
    link.drv.request_sweep("cell[5]", fd=True)
    link.run(400, until=lambda: bool(link.drv._records))
    reqs = link.sent_named("EIS_SweepRequest")
    assert [r["ResultFormat"] for r in reqs] == [1, 0]
    _check_against_truth(link)


@pytest.mark.parametrize("fd", [False, True])
def test_lost_result_frames_are_asked_for_again(fd: bool) -> None:
    link = Link()
    _setup(link)
    link.sim.drop_result_frames = 4  # the first point, and part of the second (or the first FD frame)
    link.drv.request_sweep("cell[5]", fd=fd)
    link.run(1000, until=lambda: bool(link.drv._records))
    resend = link.sent_named("EIS_ResendRequest")
    assert resend and resend[0]["FirstPoint"] == 0
    assert link.drv.stats.resend_requests >= 1
    _check_against_truth(link)


def test_silent_module_ack_timeout_retries_then_gives_up() -> None:
    link = Link(ack_timeout_s=0.1, ack_repeats=2, max_attempts=3)
    link.sim.silent = True
    h = link.drv.request_sweep("cell[5]")
    link.run(600)
    reqs = link.sent_named("EIS_SweepRequest")
    ids = [int(r["SweepId"]) for r in reqs]
    assert len(reqs) == 3 * 3  # each attempt: the request and 2 repeats with the same SweepId
    assert len(set(ids)) == 3 and ids[0] == ids[1] == ids[2]
    fails = link.drv.pop_failures()
    assert [f.attempt for f in fails] == [1, 2, 3] and [f.final for f in fails] == [False, False, True]
    assert all(f.handle == h and "no answer" in f.reason for f in fails)
    assert link.drv.stats.ack_timeouts == 3 and link.drv.phase is Phase.IDLE and not link.drv.pop_records()


def test_module_that_comes_back_completes_on_retry() -> None:
    link = Link(ack_timeout_s=0.1, ack_repeats=0)
    _setup(link)
    link.sim.silent = True
    link.drv.request_sweep("cell[5]")
    link.run(45)
    assert link.drv.stats.ack_timeouts == 1
    link.sim.silent = False
    link.run(600, until=lambda: bool(link.drv._records))
    _check_against_truth(link)
    assert link.drv.stats.retries == 1


def test_lost_status_mid_sweep_aborts_and_retries() -> None:
    link = Link(status_timeout_s=0.3)
    _running_sweep(link, 100)
    link.sim.silent = True
    link.run(60)
    assert link.drv.stats.status_timeouts == 1
    assert link.sent_named("EIS_Abort")[-1]["AbortReason"] == 4
    link.sim.silent = False
    link.sim.speed = 2000.0
    link.run(3000, until=lambda: bool(link.drv._records))
    _check_against_truth(link)


def test_module_error_is_retried_and_reported() -> None:
    link = Link()
    _setup(link)
    link.sim.fail_next = 11  # Overload half-way through the first sweep
    link.drv.request_sweep("cell[5]")
    link.run(1000, until=lambda: bool(link.drv._records))
    fails = link.drv.pop_failures()
    assert len(fails) == 1 and "Overload" in fails[0].reason and not fails[0].final
    _check_against_truth(link)


def test_permanent_error_is_not_retried() -> None:
    link = Link()
    link.drv.request_sweep("cell[500]")  # the module has 224 cells
    link.run(200)
    fails = link.drv.pop_failures()
    assert len(fails) == 1 and fails[0].final and "InvalidTarget" in fails[0].reason
    assert len(link.sent_named("EIS_SweepRequest")) == 1


def test_protection_event_aborts_first_and_retries_when_clear() -> None:
    link = Link()
    _running_sweep(link)
    t_trip = link.sim.now
    out = link.drv.tick(t_trip, 0.0, True)
    assert out and out[0].arbitration_id == 0x300
    abort = DB.decode_message(0x300, out[0].data, decode_choices=False)
    assert abort["SweepId"] == 0 and abort["AbortReason"] == 2
    for m in out:
        link.sim.receive(m)
    assert link.sim.state == STATE_ABORTED
    # while the event lasts nothing starts; after it, a stable current again, then the retry
    link.run(100, protection=lambda t: t < t_trip + 0.5)
    link.sim.speed = 2000.0
    link.run(2000, until=lambda: bool(link.drv._records))
    _check_against_truth(link)
    assert "protection" in link.drv.pop_failures()[0].reason


def test_current_change_aborts_and_unstable_current_blocks_the_start() -> None:
    link = Link(stable_window_s=1.0)
    _setup(link)
    link.sim.speed = 50.0
    link.drv.request_sweep("cell[5]")
    def wobble(t: float) -> float:
        return 0.8 * (int(t * 10) % 2)  # 0 / 0.8 A: a spread above 0.5 A

    link.run(300, current=wobble)
    assert not link.sent_named("EIS_SweepRequest")
    link.run(200, current=0.3)  # steady and small: starts after the 1 s window
    assert len(link.sent_named("EIS_SweepRequest")) == 1 and link.drv.phase is Phase.RUNNING
    link.run(5, current=5.0)
    aborts = link.sent_named("EIS_Abort")
    assert len(aborts) == 1 and aborts[0]["AbortReason"] == 3 and aborts[0]["SweepId"] != 0
    assert link.sim.state == STATE_ABORTED
    assert "current" in link.drv.pop_failures()[0].reason


def test_busy_module_is_cleared_then_measured() -> None:
    link = Link(stable_window_s=0.0)
    _setup(link)
    # a long sweep started by someone else just before our request, whose Status has not reached us
    # yet (once it has, the gateway aborts it before asking): about 9 s on this clock
    req = DB.encode_message("EIS_SweepRequest", {"SweepId": 200, "TargetType": 0, "TargetIndex": 9,
                                                 "StartFreqLog10": 3, "StopFreqLog10": -3, "PointsPerDecade": 20,
                                                 "ExcitationAmplitude": 0, "ResultFormat": 0})
    link.sim.receive(can.Message(arbitration_id=0x301, data=req, is_extended_id=False))
    link.to_gw.clear()
    link.drv.request_sweep("cell[5]")
    out = link.drv.tick(link.sim.now, 0.0, False)
    assert [m.arbitration_id for m in out] == [0x301]
    link.sent.extend(out)
    for m in out:
        link.sim.receive(m)
    link.run(2000, until=lambda: bool(link.drv._records))
    assert "busy" in link.drv.pop_failures()[0].reason
    aborts = link.sent_named("EIS_Abort")
    assert aborts and aborts[0]["SweepId"] == 0
    _check_against_truth(link)


def test_periodic_round_robin_and_on_demand_first() -> None:
    targets = (EisTarget("cell", 0), EisTarget("cell", 1), EisTarget("module", 2))
    link = Link(periodic_targets=targets, period_s=1.0,
                sweep=SweepSettings(f_start_hz=1000.0, f_stop_hz=10.0, points_per_decade=5))
    link.drv.request_sweep("cell[7]")
    seen: list[str] = []
    for _ in range(8):
        link.run(400, until=lambda: bool(link.drv._records))
        seen += [r.target for r in link.drv.pop_records()]
    assert seen[:5] == ["cell[7]", "cell[0]", "cell[1]", "module[2]", "cell[0]"]
    starts = [link.sim.now]  # the periodic ones are at least period_s apart: count them over a time span
    assert link.drv.stats.sweeps_started == len(seen) and starts


def test_cancel_aborts_the_running_sweep() -> None:
    link = Link()
    _setup(link)
    link.sim.speed = 50.0
    h = link.drv.request_sweep("cell[5]")
    link.run(50)
    assert link.drv.cancel(h)
    link.run(5)
    assert link.sim.state == STATE_ABORTED and link.sent_named("EIS_Abort")[0]["AbortReason"] == 1
    assert link.drv.pop_failures()[0].final
    link.run(100)
    assert len(link.sent_named("EIS_SweepRequest")) == 1


def test_requests_are_validated() -> None:
    link = Link()
    with pytest.raises(ValueError):
        link.drv.request_sweep("cell[5]", points_per_decade=0)
    with pytest.raises(ValueError):
        link.drv.request_sweep("pack[0]")
    with pytest.raises(ValueError):
        link.drv.request_sweep("cell[5]", f_start_hz=1e6)
    link.run(10)  # capabilities arrive: 1 mHz .. 20 kHz, 10 A, 512 points
    with pytest.raises(ValueError):
        link.drv.request_sweep("cell[5]", amplitude_a=15.0)
    with pytest.raises(ValueError):
        link.drv.request_sweep("cell[5]", f_start_hz=1e5)


def test_sweep_under_current_gives_a_drifted_record_and_module_done() -> None:
    """A DC current the driver tolerates (below max_abs_current_a) still drifts the lowest points."""
    link = Link(max_abs_current_a=5.0, max_current_spread_a=1.0)
    link.sim.set_conditions(0, 5, SimConditions(temperature_c=24.0, soc=0.5, current_a=4.0))
    link.drv.request_sweep("cell[5]")
    link.run(400, current=4.0, until=lambda: bool(link.drv._records))
    assert link.sim.state == STATE_DONE
    r = link.drv.pop_records()[0]
    truth = link.sim.true_impedance(0, 5, r.frequency_hz, 24.0, 0.5)
    dev = np.abs(r.z - truth) / np.abs(truth)
    assert dev[-1] > 0.02 and dev[0] < 1e-5  # 10 mHz drifted, 10 kHz not
    assert r.pack_current_a == 4.0


def _point_frame(m: can.Message) -> tuple[int, int] | None:
    """(PointIndex, Part) of a classic result frame, None for any other frame."""
    if m.arbitration_id != 0x320:
        return None
    v = DB.decode_message(0x320, m.data, decode_choices=False)
    return int(v["PointIndex"]), int(v["Part"])


def _with_float(m: can.Message, value: float) -> can.Message:
    """The classic result frame with its float32 (bytes 4-7) replaced."""
    data = bytearray(m.data)
    data[4:8] = struct.pack("<f", value)
    return can.Message(arbitration_id=m.arbitration_id, data=bytes(data), is_extended_id=False)


def test_a_lost_protection_abort_is_repeated_until_the_module_stops() -> None:
    """An abort that never reached the module (bus or P0 refused it) must not leave the module
    exciting the cell: it goes out again, once per Status that still says Measuring."""
    link = Link()
    _running_sweep(link)
    link.lost_out = lambda m: m.arbitration_id == 0x300  # every abort lost for a while
    seen = len(link.received)
    link.run(10, protection=lambda t: True)
    assert link.sim.state == STATE_MEASURING and link.drv.phase is not Phase.RUNNING
    statuses = [m for m in link.received[seen:] if m.arbitration_id == 0x310]
    aborts = [a for a in link.sent_named("EIS_Abort") if a["AbortReason"] == 2]
    assert 2 <= len(aborts) <= 1 + len(statuses)  # repeated, but no more often than the Status comes
    assert all(a["SweepId"] == 0 for a in aborts)
    link.lost_out = lambda m: False
    link.run(10, protection=lambda t: True, until=lambda: link.sim.state == STATE_ABORTED)
    assert link.sim.state == STATE_ABORTED
    n = len(link.sent_named("EIS_Abort"))
    link.run(30, protection=lambda t: True)  # the Status says Aborted: nothing more to repeat
    assert len(link.sent_named("EIS_Abort")) == n


@pytest.mark.parametrize(("bad", "part"), [("nan", 1), ("inf", 1), ("-inf", 2)])
def test_a_point_with_a_non_finite_impedance_is_asked_for_again(bad: str, part: int) -> None:
    link = Link()
    _setup(link)

    def spoil(m: can.Message) -> can.Message:
        pp = _point_frame(m)
        return _with_float(m, float(bad)) if pp == (10, part) and link.drv.phase is Phase.RUNNING else m

    link.wire_in = spoil
    link.drv.request_sweep("cell[5]")
    link.run(1000, until=lambda: bool(link.drv._records))
    resend = link.sent_named("EIS_ResendRequest")
    assert resend and resend[0]["FirstPoint"] == 10 and resend[0]["PointCount"] == 1
    _check_against_truth(link)


def test_a_point_asked_for_again_gets_its_neighbours_conditions() -> None:
    """A resent point arrives after the sweep (the pack may be charging by then): the conditions of
    that moment are not those of its measurement."""
    link = Link()
    _setup(link)
    link.drv.conditions = lambda t: Conditions(4.1 if link.drv.phase is Phase.COLLECTING else 3.65, 24.0, 0.5)

    def lose_point_10(m: can.Message) -> can.Message | None:
        pp = _point_frame(m)
        return None if pp is not None and pp[0] == 10 and link.drv.phase is Phase.RUNNING else m

    link.wire_in = lose_point_10
    link.drv.request_sweep("cell[5]")
    link.run(1000, until=lambda: bool(link.drv._records))
    assert link.sent_named("EIS_ResendRequest")[0]["FirstPoint"] == 10
    _check_against_truth(link)  # every point at 3.65 V


def test_the_first_request_after_a_restart_does_not_take_over_the_previous_sweep() -> None:
    """A module without the heartbeat watch still measures the previous gateway process's sweep;
    the new process's first request may carry the same SweepId, target and format, which the
    module would take as a repetition: the module's Status gives it away, and it is aborted."""
    link = Link()
    _setup(link)
    old = DB.encode_message("EIS_SweepRequest", {"SweepId": link.drv._next_sweep_id, "TargetType": 0,
                                                 "TargetIndex": 5, "StartFreqLog10": 3, "StopFreqLog10": -3,
                                                 "PointsPerDecade": 20, "ExcitationAmplitude": 0, "ResultFormat": 0})
    link.sim.receive(can.Message(arbitration_id=0x301, data=old, is_extended_id=False))
    link.drv.request_sweep("cell[5]")
    link.run(2000, until=lambda: bool(link.drv._records))
    sent = [m.arbitration_id for m in link.sent]
    assert sent.index(0x300) < sent.index(0x301)  # the old sweep is aborted before the first request
    assert link.sent_named("EIS_Abort")[0]["SweepId"] == 0
    _check_against_truth(link)  # the new sweep's 61 points, not the old one's 121


def _rewritten(name: str, m: can.Message, **values: float) -> can.Message:
    """A module frame with some of its signals replaced."""
    msg = DB.get_message_by_name(name)
    v = DB.decode_message(m.arbitration_id, m.data, decode_choices=False)
    return can.Message(arbitration_id=m.arbitration_id, data=msg.encode({**v, **values}), is_extended_id=False)


def _sweep_ack(m: can.Message) -> bool:
    return m.arbitration_id == 0x308 and DB.decode_message(0x308, m.data, decode_choices=False)["Command"] == 1


def test_points_far_from_their_grid_frequency_fail_the_attempt() -> None:
    """A module whose generator is stuck at the first frequency reports it truthfully: 61 points of
    one frequency are no spectrum. Each attempt is aborted at the first such point; nothing is filed."""
    link = Link(max_attempts=2)
    _setup(link)
    top = float(SWEEP.grid()[0])

    def stuck(m: can.Message) -> can.Message:
        pp = _point_frame(m)
        return _with_float(m, top) if pp is not None and pp[1] == 0 else m

    link.wire_in = stuck
    link.drv.request_sweep("cell[5]")
    link.run(1000, until=lambda: link.drv.stats.failures == 2)
    fails = link.drv.pop_failures()
    assert [f.final for f in fails] == [False, True]
    assert all(f.reason.startswith("point 1 measured at 10000 Hz, requested 7943.28 Hz") for f in fails)
    assert not link.drv.pop_records() and link.drv.phase is not Phase.RUNNING
    assert len(link.sent_named("EIS_Abort")) >= 2 and link.sim.state == STATE_ABORTED


def test_a_status_naming_another_target_fails_the_attempt() -> None:
    """A module that measures another cell than requested (its Status carries our SweepId, but
    target 6): its spectrum must not be filed as cell[5]. It is stopped before its first point."""
    link = Link(max_attempts=1)
    _setup(link)
    link.wire_in = lambda m: _rewritten("EIS_Status", m, TargetIndex=6) if m.arbitration_id == 0x310 else m
    link.drv.request_sweep("cell[5]")
    link.run(1000, until=lambda: link.drv.stats.failures > 0)
    link.run(50)
    fails = link.drv.pop_failures()
    assert len(fails) == 1 and fails[0].final and "target type 0 index 6, not cell[5]" in fails[0].reason
    assert not link.drv.pop_records()
    assert link.sim.state == STATE_ABORTED and not link.sim.sweep.results  # type: ignore[union-attr]


def _honest_slow_link(periods: float, **cfg: object) -> Link:
    """A module at real speed that takes ``periods`` periods per point (and tells so in its Ack);
    a sweep timeout without slack, so an estimate too short fails the sweep."""
    link = Link(sim_kw={"speed": 1.0, "periods": periods}, duration_margin=1.2, duration_slack_s=0.0, max_attempts=1,
                **cfg)
    _setup(link)
    return link


def test_an_ack_that_follows_the_first_status_still_sets_the_sweep_timeout() -> None:
    """The module's Status(Settling) and its Ack both go out at once, the Status first: the Ack's
    EstimatedDuration must still be used, not the driver's own (shorter) estimate."""
    link = _honest_slow_link(6.0, sweep=SweepSettings(10_000.0, 1.0, 10))
    held: list[can.Message] = []
    swapped: list[can.Message] = []

    def status_first(m: can.Message) -> can.Message | None:
        if _sweep_ack(m):
            held.append(m)
            return None
        if m.arbitration_id == 0x310 and held:
            link.drv.on_frame(m, link.sim.now)
            swapped.append(held.pop())
            return swapped[-1]
        return m

    link.wire_in = status_first
    link.drv.request_sweep("cell[5]")
    link.run(8000, until=lambda: bool(link.drv._records) or link.drv.stats.failures > 0)
    assert len(swapped) == 1 and link.drv.pop_failures() == []
    assert len(link.drv.pop_records()) == 1


def test_without_an_ack_the_own_estimate_counts_the_settling_period() -> None:
    """The Ack is lost; the Status shows the sweep runs. The driver's own estimate must cover what
    the protocol recommends per point (one period to settle, two to integrate)."""
    link = _honest_slow_link(3.0, sweep=SweepSettings(10_000.0, 0.1, 10))
    link.wire_in = lambda m: None if _sweep_ack(m) else m
    link.drv.request_sweep("cell[5]")
    link.run(20_000, until=lambda: bool(link.drv._records) or link.drv.stats.failures > 0)
    assert link.drv.pop_failures() == []
    assert len(link.drv.pop_records()) == 1


def test_an_ack_announcing_another_number_of_points_ends_the_sweep() -> None:
    """PointsTotal 3 for a 61-point request: the module computes another grid, so its points would
    be filed under the wrong frequencies; it is stopped and the request given up."""
    link = Link()
    _setup(link)
    link.wire_in = lambda m: _rewritten("EIS_Ack", m, PointsTotal=3) if _sweep_ack(m) else m
    link.drv.request_sweep("cell[5]")
    link.run(400)
    fails = link.drv.pop_failures()
    assert len(fails) == 1 and fails[0].final and "announces 3 points, the request has 61" in fails[0].reason
    assert not link.drv.pop_records() and len(link.sent_named("EIS_SweepRequest")) == 1
    assert link.sim.state == STATE_ABORTED and not link.sim.sweep.results  # type: ignore[union-attr]


def test_an_absurd_estimated_duration_is_capped() -> None:
    """EstimatedDuration 65535 s (18 h) for a sweep the driver estimates at a few seconds: a module
    that then hangs in Settling is aborted after at most ESTIMATE_LIMIT times the driver's own estimate."""
    sweep = SweepSettings(1000.0, 100.0, 5)
    link = Link(sim_kw={"speed": 0.001}, sweep=sweep, duration_margin=1.0, duration_slack_s=0.0, max_attempts=1,
                status_timeout_s=10.0)
    link.wire_in = lambda m: _rewritten("EIS_Ack", m, EstimatedDuration=65535) if _sweep_ack(m) else m
    link.drv.request_sweep("cell[5]")
    link.run(math.ceil((ESTIMATE_LIMIT * sweep.estimated_duration_s() + 1.0) / 0.01))
    fails = link.drv.pop_failures()
    assert [f.reason for f in fails] == ["sweep took too long"]
    assert link.sent_named("EIS_Abort")[0]["AbortReason"] == 4


def test_cancel_reports_every_request_it_drops() -> None:
    """Queued and retry-pending requests that a cancel drops end with a final failure, so whoever
    waits for their outcome (`bmsgw eis sweep`) learns they ended."""
    link = Link()
    _running_sweep(link)
    h1 = link.drv.status()["handle"]
    h2, h3 = link.drv.request_sweep("cell[6]"), link.drv.request_sweep("cell[7]")
    assert link.drv.cancel(h2)
    assert [(f.handle, f.final, f.reason) for f in link.drv.pop_failures()] == [(h2, True, "cancelled by operator")]
    link.run(1, protection=lambda t: True)  # cell[5] aborted: its retry waits
    assert [f.final for f in link.drv.pop_failures()] == [False] and link.drv.stage(h1) == "retry"
    assert link.drv.stage(h3) == "queued" and link.drv.cancel(None)
    fails = link.drv.pop_failures()
    assert sorted((f.handle, f.final, f.reason) for f in fails) == [(h1, True, "cancelled by operator"),
                                                                   (h3, True, "cancelled by operator")]
    assert [link.drv.stage(h) for h in (h1, h2, h3)] == [None, None, None]


@settings(max_examples=30, deadline=None)
@given(max_freq=st.floats(100.0, 100_000.0), codes=st.integers(-2, 2))
def test_driver_and_module_agree_on_the_highest_frequency(max_freq: float, codes: int) -> None:
    """Both sides compare coded frequencies: a request up to the module's advertised code is measured,
    one code beyond it is refused by the driver already (not sent, to be refused for good)."""
    link = Link(sim_kw={"max_freq_hz": max_freq})
    _setup(link)
    link.run(1)
    caps = link.drv.capabilities
    assert caps is not None
    f = 10.0 ** (math.log10(caps.max_freq_hz) + 0.002 * codes)
    try:
        link.drv.request_sweep("cell[5]", f_start_hz=f, f_stop_hz=f / 10.0)
    except ValueError:
        assert codes > 0
        return
    assert codes <= 0
    link.run(400, until=lambda: bool(link.drv._records))
    assert link.drv.pop_failures() == [] and len(link.drv.pop_records()) == 1
