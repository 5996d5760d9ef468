"""Faults of the hard-deadline protection core that once went unnoticed, each on a driven clock.

Most scenarios run the daemon's own assembly against the simulated pack (the Rig of
tests/test_protection.py); the contactor machine's corner cases run against a hand-written process
image and a few lines standing in for the pack control unit.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import can
import pytest

from gateway.config import load_config
from gateway.contactors import CONTACTORS, ContactorMachine, ContactorSettings, State
from gateway.events import Event, Kind
from gateway.image import ProcessImage
from gateway.schema import ConfigError
from tests.test_protection import CELL, DBC, ROOT, TICK_S, WIDE_SPREAD, Rig, config

PACK_MEASUREMENT = 0x100


def late_ticks(rig: Rig, seconds: float, late_s: float) -> None:
    """Lane ticks every 10 ms, each ``late_s`` after it was due (a lane that keeps waking up late)."""
    for _ in range(round(seconds / TICK_S)):
        rig.t += TICK_S
        rig.sim.tick()
        rig.lane.tick(rig.t, rig.t - late_s)


# -- P5: a source that stops arriving is a fault whatever its last frame said ---------------------------


@pytest.mark.parametrize("invalid_frames", [1, 3, 9])
def test_a_current_flagged_invalid_then_silent_trips_as_stopped(tmp_path: Path, invalid_frames: int) -> None:
    """The PCU flags its current invalid for a few frames (fewer than the bad-data debounce), then falls silent."""
    rig = Rig(tmp_path)
    rig.to_normal()
    meas = rig.sim.db.get_message_by_frame_id(PACK_MEASUREMENT)
    sink, sent = rig.sink, [0]

    def pcu(msg: can.Message) -> None:
        if msg.arbitration_id == PACK_MEASUREMENT:
            if sent[0] == invalid_frames:
                return  # silent from here on
            sent[0] += 1
            values = meas.decode(bytes(msg.data), decode_choices=False)
            values["CurrentValid"] = 0
            msg = can.Message(arbitration_id=PACK_MEASUREMENT, data=meas.encode(values, strict=False),
                              timestamp=msg.timestamp, is_extended_id=False)
        sink(msg)

    rig.sink = pcu
    start = rig.t
    rig.run_until(lambda: rig.trips, 1.0, "a trip on the silent current")
    trip = rig.trips[0][1]
    assert trip.name == "stale_data" and "pack.current: stopped arriving" in (trip.message or "")
    assert rig.state is State.ERROR and not rig.trips[0][0] - start > 0.3  # 3 x 10 ms + 100 ms debounce, and margin


# -- P1: a lane still late after its trip ---------------------------------------------------------------


def test_reset_is_refused_while_the_lane_is_still_late(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.to_normal()
    late_ticks(rig, 0.05, 0.07)  # every tick 70 ms late (deadline 50 ms)
    assert rig.state is State.ERROR and rig.trips[0][1].name == "protection_tick"
    ok, reason = rig.lane.machine.reset()
    assert not ok and "protection lane late" in reason
    rig.run(0.5)  # on time again: the lane's health comes back, the trip's cause with it
    ok, reason = rig.lane.machine.reset()
    assert ok, reason


def test_a_lane_late_again_after_a_reset_trips_again(tmp_path: Path) -> None:
    """Trip on every late tick from the max_missed-th on, not only on the max_missed-th."""
    rig = Rig(tmp_path)
    rig.to_normal()
    machine = rig.lane.machine
    late_ticks(rig, 0.05, 0.07)
    assert rig.state is State.ERROR
    machine.health_causes = lambda: []  # a reset that slipped through anyway (the point here is the re-trip)
    ok, reason = machine.reset()
    assert ok, reason
    late_ticks(rig, 0.02, 0.07)
    assert rig.state is State.ERROR and len(rig.trips) == 2
    assert rig.lane.stats.forced_safe_state == 1  # one late episode, however many trips it takes


def test_a_tick_failing_again_after_a_reset_trips_again(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.to_normal()
    lane, machine = rig.lane, rig.lane.machine
    real_tick = lane.protection.tick

    def broken(now: float) -> None:
        raise RuntimeError("a bug in every tick")

    lane.protection.tick = broken  # type: ignore[method-assign]
    for _ in range(rig.loaded.config.protection.lane.max_missed):
        rig.t += TICK_S
        lane._guarded_tick(rig.t, rig.t)
    assert rig.state is State.ERROR
    ok, reason = machine.reset()
    assert not ok and "protection tick failing" in reason
    machine.health_causes = lambda: []
    ok, reason = machine.reset()
    assert ok, reason
    rig.t += TICK_S
    lane._guarded_tick(rig.t, rig.t)
    assert rig.state is State.ERROR and len(rig.trips) == 2
    lane.protection.tick = real_tick  # type: ignore[method-assign]


# -- P2: one long stall ------------------------------------------------------------------------------------


def test_one_tick_later_than_max_missed_deadlines_forces_the_safe_state(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.to_normal()
    s = rig.loaded.config.protection.lane
    bound = s.max_missed * s.deadline_ms / 1000.0
    rig.t += bound
    rig.lane.tick(rig.t, rig.t - bound + 0.001)  # just under: max_missed - 1 deadlines missed, no trip
    assert rig.state is State.NORMAL and rig.lane.stats.consecutive_missed == s.max_missed - 1
    rig.run(0.1)
    rig.t += 1.5
    rig.lane.tick(rig.t, rig.t - 1.5)
    assert rig.state is State.ERROR and rig.trips[0][1].name == "protection_tick"
    assert rig.lane.stats.forced_safe_state == 1 and rig.lane.stats.consecutive_missed > 2 * s.max_missed


def test_a_stalled_lane_thread_forces_the_safe_state_when_it_runs_again(tmp_path: Path, monkeypatch: Any) -> None:
    """`sim fault stall_lane` for 1.5 s, with a PCU that would not open by itself."""
    monkeypatch.setattr("drivers.sim_pack.COMMAND_TIMEOUT_S", 1e9)
    rig = Rig(tmp_path)
    rig.to_normal()
    lane, sleeps = rig.lane, []

    def sleep(delay: float) -> None:  # the pack's time passes 10 ms per sleep of the lane thread
        rig.t += TICK_S
        rig.sim.tick()
        sleeps.append(rig.t)
        if len(sleeps) == 50:
            lane.stalled.set()
        elif len(sleeps) == 200:
            lane.stalled.clear()
        elif len(sleeps) == 260:
            lane._stop.set()

    monkeypatch.setattr("gateway.lane.time.sleep", sleep)
    lane._run()
    assert rig.state is State.ERROR and rig.trips[0][1].name == "protection_tick"
    assert not rig.sim.contactors["main_positive"].closed


# -- P3: per-cell temperatures ----------------------------------------------------------------------------


def _pack_map(tmp: Path, edit: Any) -> None:
    """The shipped map, edited, next to the config (found before the shipped one)."""
    text = (ROOT / "dbc/maps/bmsgw_pack.toml").read_text()
    (tmp / "bmsgw_pack.toml").write_text(edit(text))


PER_CELL = ("to = 'module[{m}].temperature[{k}]'", "to = 'cell[{m*14 + k}].temperature'")


def test_a_map_of_per_cell_temperatures_is_protected(tmp_path: Path) -> None:
    _pack_map(tmp_path, lambda t: t.replace(*PER_CELL))
    rig = Rig(tmp_path, WIDE_SPREAD)
    assert rig.lane.protection.sensors.size == 32
    rig.to_normal()
    t_msg = rig.sim.db.get_message_by_frame_id(0x240)

    def hot(msg: can.Message) -> can.Message:
        values = t_msg.decode(bytes(msg.data), decode_choices=False)
        values["Sensor0_Temperature"] = 90.0
        return can.Message(arbitration_id=msg.arbitration_id, data=t_msg.encode(values, strict=False),
                           timestamp=msg.timestamp, is_extended_id=False)

    rig._inject[0x240 + 2] = hot  # module 2's sensor 0: cell 28
    rig.run_until(lambda: rig.trips, 5.0, "a temperature trip")
    trip = rig.trips[0][1]
    assert trip.name.startswith("cell_temperature_high") and trip.index == 28


def test_a_per_cell_temperature_that_stops_arriving_trips(tmp_path: Path) -> None:
    _pack_map(tmp_path, lambda t: t.replace(*PER_CELL))
    rig = Rig(tmp_path, WIDE_SPREAD)
    rig.to_normal()
    rig._inject[0x240 + 3] = lambda msg: can.Message(arbitration_id=0x7FF, data=msg.data, is_extended_id=False)
    rig.run_until(lambda: rig.trips, 5.0, "a stale-data trip")
    trip = rig.trips[0][1]
    assert trip.name == "stale_data" and "cell[42].temperature" in (trip.message or "")


def test_config_check_refuses_protection_without_any_temperature(tmp_path: Path) -> None:
    def drop(text: str) -> str:
        head, _, rest = text.partition("message = 'MMU(?P<m>\\d+)_Temperatures'")
        assert rest, "the shipped map changed: update this test"
        return head.rsplit("[[signal]]", 1)[0] + rest.split("\n\n", 1)[1]

    _pack_map(tmp_path, drop)
    with pytest.raises(ConfigError, match="protection needs temperatures"):
        load_config(config(tmp_path))
    # a read-only gateway may have no temperatures
    load_config(config(tmp_path, "\n[protection]\nenabled = false\n"))


# -- P4: the top level of a multiplexed frame ------------------------------------------------------------------


def test_the_top_level_current_of_a_multiplexed_frame_is_checked(tmp_path: Path) -> None:
    """PACK_Measurement gains a page selector with a mapped flag: pack.current (top level) is still checked."""
    dbc = Path(DBC).read_text()
    old = ' SG_ AliveCounter : 60|4@1+ (1,0) [0|15] "" GW\n\nBO_ 257'
    assert old in dbc, "the shipped DBC changed: update this test"
    dbc = dbc.replace(old, ' SG_ AliveCounter : 60|4@1+ (1,0) [0|15] "" GW\n SG_ MeasPage M : 58|1@1+ (1,0) [0|1] "" GW\n'
                           ' SG_ AuxFlag m0 : 59|1@1+ (1,0) [0|1] "" GW\n\nBO_ 257', 1)
    (tmp_path / "bmsgw_pack.dbc").write_text(dbc)
    _pack_map(tmp_path, lambda t: t + "\n[[signal]]\nmessage = 'PACK_Measurement'\nsignal = 'AuxFlag'\n"
                                      "to = 'pack.aux_flag'\n")
    rig = Rig(tmp_path)
    rig.to_normal()
    meas = rig.sim.db.get_message_by_frame_id(PACK_MEASUREMENT)

    def over(msg: can.Message) -> can.Message:
        values = meas.decode(bytes(msg.data), decode_choices=False)
        values["PackCurrent"] = 150.0
        return can.Message(arbitration_id=PACK_MEASUREMENT, data=meas.encode(values, strict=False),
                           timestamp=msg.timestamp, is_extended_id=False)

    rig._inject[PACK_MEASUREMENT] = over
    rig.run_until(lambda: rig.trips, 1.0, "a current trip")
    assert rig.trips[0][1].name == "pack_current_charge"


# -- P6: a trip while a reset asks for the causes ------------------------------------------------------------


def test_a_trip_during_a_reset_is_not_swallowed(tmp_path: Path) -> None:
    rig = Rig(tmp_path, WIDE_SPREAD)
    rig.to_normal()
    machine, prot = rig.lane.machine, rig.lane.protection
    machine.trip("operator test trip")  # ERROR without a protection cause: a reset would be accepted
    rig.run(0.5)
    ask = machine.trip_causes
    high = prot.checks["cell_voltage_high"]

    def causes_then_a_trip() -> list[str]:
        causes = ask()
        # a receive thread's trip lands right here: after the answer, before reset takes the machine's lock
        with prot.lock:
            for _ in range(high.need[CELL] // 2):
                high.step(CELL, 3, 4.4, CELL, prot)
        return causes

    machine.trip_causes = causes_then_a_trip
    ok, reason = machine.reset()
    assert not ok and "tripped again during the reset" in reason and "cell_voltage_high" in reason
    assert machine.state is State.ERROR and any("cell_voltage_high" in c for c in machine.error_causes)


# -- deep discharge: the latch's disk write outside protection's lock ---------------------------------------------


def test_the_deep_discharge_latch_is_written_outside_protections_lock(tmp_path: Path) -> None:
    rig = Rig(tmp_path, start_hour=19.0)
    rig.to_normal()
    prot, latch = rig.lane.protection, rig.lane.machine.latch.latch
    lock_free: list[bool] = []

    def latch_probe(cell: int, value: float) -> None:
        def other_thread() -> None:  # the tick thread or another bus's receive thread
            got = prot.lock.acquire(blocking=False)
            lock_free.append(got)
            if got:
                prot.lock.release()

        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        latch(cell, value)

    prot.on_deep_discharge = latch_probe
    rig.sim.inject("cell_drift", CELL, -2000.0)
    rig.run_until(lambda: rig.lane.machine.latch.read() is not None, 10, "deep-discharge latch")
    latched = rig.lane.machine.latch.read()
    assert lock_free == [True] and latched is not None and latched["cell"] == CELL
    assert rig.state is State.ERROR


# -- the contactor machine against a hand-written image --------------------------------------------------------------


class Pcu:
    """Pack values and contactor feedback written into the image 10 ms at a time; feedback follows the commands."""

    def __init__(self, tmp: Path, **settings: Any) -> None:
        img = ProcessImage({}, ["pack.current", "pack.voltage", "pack.link_voltage",
                                *(f"contactor.{c}" for c in CONTACTORS)])
        self.pack_slot = img.add_slot("pack", 0.01)
        self.fb_slot = img.add_slot("feedback", 0.1)
        for name in ("pack.current", "pack.voltage", "pack.link_voltage"):
            img.bind(img.index(name), self.pack_slot)
        for c in CONTACTORS:
            img.bind(img.index(f"contactor.{c}"), self.fb_slot)
        img.freeze()
        self.image = img
        self.t = 0.0
        self.current = 0.0
        self.current_valid = True
        self.pack_silent = False
        self.feedback_override: dict[str, float] = {}
        self.events: list[Event] = []
        self.machine = ContactorMachine(img, self, ContactorSettings(auto_close=True, **settings), tmp,
                                        self.events.append, lambda: [])
        self.machine.clock = lambda: self.t
        self.closed = dict.fromkeys(CONTACTORS, False)

    def command(self, main_positive: bool, main_negative: bool, precharge: bool) -> bool:
        self.closed = {"main_positive": main_positive, "main_negative": main_negative, "precharge": precharge}
        return True

    def step(self) -> None:
        self.t += TICK_S
        img = self.image
        if not self.pack_silent:
            for name, value in (("pack.current", self.current), ("pack.voltage", 800.0), ("pack.link_voltage", 800.0)):
                img.w_value[img.index(name)] = value
            img.w_valid[img.index("pack.current")] = 1 if self.current_valid else 0
            img.w_rx_mono[self.pack_slot] = self.t
            img.w_seq[self.pack_slot] += 1
        if round(self.t / TICK_S) % 10 == 0:  # feedback at 100 ms
            for c in CONTACTORS:
                img.w_value[img.index(f"contactor.{c}")] = self.feedback_override.get(c, float(self.closed[c]))
            img.w_rx_mono[self.fb_slot] = self.t
            img.w_seq[self.fb_slot] += 1
        self.machine.tick(self.t, True)

    def run(self, seconds: float) -> None:
        for _ in range(round(seconds / TICK_S)):
            self.step()

    def to_normal(self) -> None:
        for _ in range(500):
            if self.machine.state is State.NORMAL:
                return
            self.step()
        raise AssertionError(f"not NORMAL: {self.machine.state}")


def test_pcu_stand_in_reaches_normal_and_opens_on_request(tmp_path: Path) -> None:
    pcu = Pcu(tmp_path)
    pcu.to_normal()
    pcu.current = 1.0
    pcu.machine.request_open()
    pcu.run(0.05)
    assert pcu.machine.state is State.STANDBY and not any(pcu.closed.values())


@pytest.mark.parametrize("value", [4.0, 7.0, 1.5])
def test_contactor_feedback_outside_its_four_states_is_a_fault(tmp_path: Path, value: float) -> None:
    pcu = Pcu(tmp_path)
    pcu.to_normal()
    pcu.run(0.5)
    pcu.feedback_override["main_positive"] = value
    timeout = pcu.machine.settings.feedback_timeout_s
    pcu.run(timeout / 2)
    assert pcu.machine.state is State.NORMAL  # debounced like a mismatch: not on one frame
    pcu.run(timeout)
    assert pcu.machine.state is State.ERROR and not any(pcu.closed.values())
    assert pcu.machine.feedback_faults["main_positive"] == f"feedback invalid (value {value:g})"
    ok, reason = pcu.machine.reset()
    assert not ok and "feedback invalid" in reason
    del pcu.feedback_override["main_positive"]
    pcu.run(0.3)
    ok, reason = pcu.machine.reset()
    assert ok, reason


def test_feedback_outside_its_states_keeps_standby_from_closing(tmp_path: Path) -> None:
    pcu = Pcu(tmp_path)
    pcu.feedback_override["precharge"] = 9.0
    pcu.run(2.0)
    assert pcu.machine.state is State.STANDBY and not any(pcu.closed.values())
    del pcu.feedback_override["precharge"]
    pcu.to_normal()


@pytest.mark.parametrize("unknown", ["invalid", "stale"])
def test_an_operator_open_waits_when_the_current_is_unknown(tmp_path: Path, unknown: str) -> None:
    """A 0 A that is not a good reading may hide a real current: the open waits out open_timeout_s."""
    pcu = Pcu(tmp_path)
    pcu.to_normal()
    pcu.current = 0.0
    if unknown == "invalid":
        pcu.current_valid = False
    else:
        pcu.pack_silent = True
    pcu.run(0.1)
    pcu.machine.request_open()
    s = pcu.machine.settings
    pcu.run(s.open_timeout_s / 2)
    assert pcu.machine.state is State.OPEN_REQUESTED and pcu.closed["main_positive"]
    pcu.run(s.open_timeout_s)
    assert pcu.machine.state is State.STANDBY and not any(pcu.closed.values())
    assert any(f"current unknown ({unknown})" in (e.message or "") for e in pcu.events if e.kind == Kind.STATE)


def test_a_trip_during_an_open_request_with_unknown_current_opens_at_once(tmp_path: Path) -> None:
    pcu = Pcu(tmp_path)
    pcu.to_normal()
    pcu.current_valid = False
    pcu.machine.request_open()
    pcu.run(0.05)
    assert pcu.machine.state is State.OPEN_REQUESTED
    pcu.machine.trip("pack.current_bad_data")
    assert pcu.machine.state is State.ERROR and not any(pcu.closed.values())
