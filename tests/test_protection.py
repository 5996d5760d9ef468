"""Protection scenarios against the simulated pack, on a driven clock (no sleeping, no timing flakiness).

The rig is the daemon's own assembly (config -> image -> protection -> contactor machine -> lane)
with the simulated pack's frames fed through the lane's receive-path sink and the gateway's
contactor frames fed back to the simulated pack, 10 ms per step.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import can
import pytest

from drivers.sim_pack import TICK_S, SimPack
from gateway.config import load_config
from gateway.contactors import State
from gateway.daemon import make_lane
from gateway.events import Event, Kind, Level, Recorder
from gateway.limits import Levels
from gateway.schema import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DBC = str(ROOT / "dbc" / "bmsgw_pack.dbc")
CELL = 30  # module 2, page 0: its voltages arrive every 100 ms


def config(tmp: Path, extra: str = "") -> Path:
    text = (ROOT / "gateway/configs/sim.toml").read_text()
    text = text.replace('[gateway]\n', f'[gateway]\nstate_dir = "{tmp / "state"}"\n')
    path = tmp / "bmsgw.toml"
    path.write_text(text + extra)
    return path


class Rig:
    """Simulated pack <-> gateway lane, stepped 10 ms at a time."""

    def __init__(self, tmp: Path, extra: str = "", **sim: Any) -> None:
        self.loaded = load_config(config(tmp, extra))
        self.t = 0.0
        ingest = self.loaded.ingests["pack"]
        ingest.clock = lambda: self.t
        self.recorder = Recorder()
        self.trips: list[tuple[float, Event]] = []
        self.lane = make_lane(self.loaded, self.recorder, self._to_pack)
        self.lane.clock = self.lane.machine.clock = lambda: self.t
        self.lane.wall = lambda: 1.7e9 + self.t
        self.sink = self.lane.sink("pack", ingest, False)
        self.frames_to_pack = 0
        self.sim = SimPack(DBC, self._to_gateway, **sim)
        self.sim.wall = lambda: 1.7e9 + self.t
        self.image = self.loaded.image
        self.cell_samples: list[tuple[float, float]] = []
        self.recorder.subscribers.append(self._event)
        self._inject: dict[int, Any] = {}

    def _event(self, ev: Event) -> None:
        if ev.kind == Kind.TRIP:
            self.trips.append((self.t, ev))

    def _to_pack(self, msg: can.Message) -> bool:
        self.frames_to_pack += 1
        self.sim.receive(msg)
        return True

    def _to_gateway(self, msg: can.Message) -> None:
        edit = self._inject.get(msg.arbitration_id)
        if edit is not None:
            msg = edit(msg)
        self.sink(msg)
        if msg.arbitration_id == 0x200 + CELL // 14 and msg.data[0] & 0x0F == (CELL % 14) // 4:
            self.cell_samples.append((self.t, self.image.read(f"cell[{CELL}].voltage", self.t).value))

    def run(self, seconds: float) -> None:
        for _ in range(round(seconds / TICK_S)):
            self.t += TICK_S
            self.sim.tick()
            self.lane.tick(self.t, self.t)

    def run_until(self, cond: Any, limit_s: float, what: str) -> float:
        for _ in range(round(limit_s / TICK_S)):
            if cond():
                return self.t
            self.run(TICK_S)
        raise AssertionError(f"not within {limit_s} s: {what}")

    @property
    def state(self) -> State:
        return self.lane.machine.state

    def to_normal(self) -> None:
        self.run_until(lambda: self.state is State.NORMAL, 10, "NORMAL after precharge")

    def edit_cells(self, module: int, fn: Any) -> None:
        """Rewrite the cell-voltage frames of one module before the gateway sees them."""
        db = self.sim.db
        msg_def = db.get_message_by_frame_id(0x200 + module)

        def edit(msg: can.Message) -> can.Message:
            values = msg_def.decode(bytes(msg.data), decode_choices=False)
            fn(values, self.t)
            return can.Message(arbitration_id=msg.arbitration_id, data=msg_def.encode(values, strict=False),
                               timestamp=msg.timestamp, is_extended_id=False)

        self._inject[0x200 + module] = edit


def test_startup_precharges_and_closes(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.to_normal()
    events = [e.message for e in rig.recorder.recent(20) if e.kind == Kind.STATE]
    assert events[:3] == ["INIT -> STANDBY: measurements valid", "STANDBY -> PRECHARGE: attempt 1",
                          "PRECHARGE -> NORMAL: precharge complete"]
    rig.run(0.1)  # the contactors take 30 ms to move
    assert rig.sim.contactors["main_positive"].closed and not rig.sim.contactors["precharge"].closed
    rig.run(1.0)
    assert abs(rig.image.read("pack.current", rig.t).value) > 1  # the PV charge flows


# a drifting cell also widens the spread; these tests are about the cell's own limit
WIDE_SPREAD = "\n[protection.limits.cell_voltage_spread]\nmol = 0.6\nrsl = 0.8\nmsl = 1.0\n"


def test_cell_drifting_over_msl_trips_within_debounce_and_not_earlier(tmp_path: Path) -> None:
    rig = Rig(tmp_path, WIDE_SPREAD)
    rig.to_normal()
    rig.sim.inject("cell_drift", CELL, 100.0)  # +100 mV/s: MSL 4.20 V is crossed a few seconds later
    rig.run_until(lambda: rig.trips, 20, "a trip")
    msl = rig.loaded.config.limit_table().cell_voltage_high.msl
    over = [t for t, v in rig.cell_samples if v > msl]
    trip_t, trip = rig.trips[0]
    assert trip.name == "cell_voltage_high" and trip.index == CELL
    # 200 ms debounce = 2 samples of a 100 ms page: the trip comes with the 2nd sample over MSL
    assert len(over) == 2 and trip_t == over[1]
    assert rig.state is State.ERROR
    assert not any(c.requested for c in rig.sim.contactors.values())  # the open command reached the pack
    levels = [e.level for e in rig.recorder.recent(200) if e.kind == Kind.LIMIT and e.name == "cell_voltage_high"]
    assert levels[:3] == [Level.MOL, Level.RSL, Level.MSL]


def test_flickering_fault_still_trips(tmp_path: Path) -> None:
    rig = Rig(tmp_path, WIDE_SPREAD)
    rig.to_normal()
    n = {"k": 0}

    def flicker(values: dict[str, float], t: float) -> None:
        if values["Page"] == (CELL % 14) // 4:
            n["k"] += 1
            if n["k"] % 2:  # every other sample over MSL: a counter that reset on each good sample never trips
                values[f"Cell{CELL % 14:02d}_Voltage"] = 4.3

    rig.edit_cells(CELL // 14, flicker)
    rig.run_until(lambda: rig.trips, 5, "a trip from a flickering cell")
    assert rig.trips[0][1].name == "cell_voltage_high"
    assert 4 <= n["k"] <= 6  # up 2 / down 1 against a need of 4: over, ok, over, ok, over


def test_silent_module_trips_as_missing_data(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.to_normal()
    rig.sim.inject("silent", 7)
    t0 = rig.t
    rig.run_until(lambda: rig.trips, 3, "a trip")
    t, ev = rig.trips[0]
    assert ev.kind == Kind.TRIP and ev.name == "stale_data" and "stopped arriving" in ev.message
    # stale after 3 x 100 ms, then the 100 ms data debounce
    assert 0.3 < t - t0 <= 0.5
    assert rig.state is State.ERROR


@pytest.mark.parametrize("fault", ["invalid_flag", "nan_like_out_of_range"])
def test_bad_values_trip_as_bad_data(tmp_path: Path, fault: str) -> None:
    rig = Rig(tmp_path)
    rig.to_normal()

    def bad(values: dict[str, float], t: float) -> None:
        if values["Page"] == (CELL % 14) // 4:
            if fault == "invalid_flag":
                values[f"Cell{CELL % 14:02d}_Invalid"] = 1
            else:
                values[f"Cell{CELL % 14:02d}_Voltage"] = 8.0  # beyond any cell: a sensor or wiring fault

    rig.edit_cells(CELL // 14, bad)
    rig.run_until(lambda: rig.trips, 2, "a trip")
    assert rig.trips[0][1].name == "cell.voltage_bad_data"
    assert not any(e.name == "cell_voltage_high" for e in rig.recorder.recent(200))  # not mistaken for OV


def trip_on_a_drifting_cell(rig: Rig) -> None:
    """From NORMAL, one cell drifts over its high MSL until the lane trips."""
    rig.to_normal()
    rig.sim.inject("cell_drift", CELL, 300.0)
    rig.run_until(lambda: rig.trips, 10, "a trip")


def test_reset_refused_while_the_cause_persists_then_accepted(tmp_path: Path) -> None:
    rig = Rig(tmp_path, WIDE_SPREAD)
    trip_on_a_drifting_cell(rig)
    rig.run(0.5)
    ok, reason = rig.lane.machine.reset()
    assert not ok and "cell_voltage_high" in reason
    rig.sim.inject("clear")
    rig.run(1.5)  # counters decay on the good samples that follow
    ok, reason = rig.lane.machine.reset()
    assert ok, reason
    assert rig.state is State.STANDBY
    rig.run_until(lambda: rig.state is State.NORMAL, 20, "closing again after the oscillation guard")


def test_welded_contactor_is_detected_and_blocks_reset(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.to_normal()
    rig.sim.inject("welded", 0)  # main positive
    rig.lane.machine.request_open()
    rig.run(1.0)
    assert rig.state is State.ERROR
    assert "welded" in rig.lane.machine.feedback_faults["main_positive"]
    ok, reason = rig.lane.machine.reset()
    assert not ok and "welded" in reason


def test_precharge_fails_after_the_allowed_retries(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.sim.inject("precharge_open")
    s = rig.loaded.config.protection.contactors
    rig.run_until(lambda: rig.state is State.ERROR, 30, "ERROR after failed precharges")
    attempts = [e for e in rig.recorder.recent(200) if e.kind == Kind.STATE and "-> PRECHARGE" in e.message]
    assert len(attempts) == s.precharge_retries + 1
    assert f"precharge failed after {s.precharge_retries + 1} attempts" in rig.lane.machine.error_causes[0]
    assert not rig.sim.contactors["main_positive"].closed


def test_deep_discharge_latch_survives_a_restart(tmp_path: Path) -> None:
    rig = Rig(tmp_path, start_hour=19.0)
    rig.to_normal()
    rig.sim.inject("cell_drift", CELL, -2000.0)  # the cell collapses below 2.5 V
    rig.run_until(lambda: rig.lane.machine.latch.read() is not None, 10, "deep-discharge latch")
    assert rig.state is State.ERROR
    rig.sim.inject("clear")

    again = Rig(tmp_path)  # a restart: same state directory, fresh process state
    assert again.state is State.ERROR
    again.run(2.0)
    ok, reason = again.lane.machine.reset()
    assert not ok and "deep discharge latched" in reason
    ok, reason = again.lane.machine.reset(clear_deep_discharge=True)
    assert ok, reason
    assert again.lane.machine.latch.read() is None


def test_repeatedly_late_lane_forces_the_safe_state(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.to_normal()
    late = rig.loaded.config.protection.lane.deadline_ms / 1000.0 * 2
    for _ in range(rig.loaded.config.protection.lane.max_missed):
        rig.t += late
        rig.lane.tick(rig.t, rig.t - late)
    assert rig.state is State.ERROR
    assert rig.lane.stats.forced_safe_state == 1 and rig.trips[0][1].name == "protection_tick"


def test_error_latch_survives_a_restart(tmp_path: Path) -> None:
    """A crash or watchdog restart is not a reset: ERROR comes back, and auto_close must not close."""
    rig = Rig(tmp_path, WIDE_SPREAD)
    trip_on_a_drifting_cell(rig)
    rig.run(0.1)
    again = Rig(tmp_path, WIDE_SPREAD)
    assert again.state is State.ERROR and "cell_voltage_high" in again.lane.machine.error_causes[0]
    again.run(3.0)
    assert again.state is State.ERROR and not again.sim.contactors["main_positive"].closed
    ok, reason = again.lane.machine.reset()
    assert ok, reason
    assert Rig(tmp_path, WIDE_SPREAD).state is State.INIT  # the accepted reset removed the latch


@pytest.mark.parametrize(("name", "content", "cause"), [
    ("deep_discharge.json", "null", "deep discharge latched"),
    ("deep_discharge.json", "[1, 2]", "deep discharge latched"),
    ("error.json", "[1, 2]", "unknown (latch file holds list, not a record)"),
    ("error.json", '{"causes": "weld"}', "unknown (no causes recorded)"),
])
def test_a_latch_file_that_is_not_a_record_counts_as_latched(tmp_path: Path, name: str, content: str,
                                                              cause: str) -> None:
    """A damaged latch must never close the contactors, nor crash P0 on start-up."""
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / name).write_text(content)
    rig = Rig(tmp_path)
    assert rig.state is State.ERROR
    rig.run(3.0)
    assert rig.state is State.ERROR and not rig.sim.contactors["main_positive"].closed
    causes = list(rig.lane.machine.error_causes)
    ok, reason = rig.lane.machine.reset()
    assert cause in (reason if name == "deep_discharge.json" else causes[0])


def test_the_machine_never_asks_protection_while_holding_its_lock(tmp_path: Path) -> None:
    """A trip takes protection's lock, then the machine's: the other order (reset, tick) would deadlock."""
    rig = Rig(tmp_path, WIDE_SPREAD)
    machine, asked_holding = rig.lane.machine, []
    causes = machine.trip_causes

    def watched_causes() -> list[str]:
        asked_holding.append(machine.lock._is_owned())  # type: ignore[attr-defined]
        return causes()

    machine.trip_causes = watched_causes
    trip_on_a_drifting_cell(rig)
    machine.reset()
    rig.sim.inject("clear")
    rig.run(1.5)
    assert machine.reset()[0]
    rig.run(1.0)
    assert asked_holding and not any(asked_holding)


def test_weld_fault_clears_when_the_contactor_opens_again(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.to_normal()
    rig.sim.inject("welded", 0)
    rig.lane.machine.request_open()
    rig.run(1.0)
    assert "welded" in rig.lane.machine.feedback_faults["main_positive"]
    rig.sim.inject("clear")  # repaired: the feedback says open, as commanded
    rig.run(1.0)
    assert rig.lane.machine.feedback_faults == {}
    ok, reason = rig.lane.machine.reset()
    assert ok, reason


def test_precharge_closes_only_on_valid_voltages(tmp_path: Path) -> None:
    """The PCU flags its voltages invalid (and the link does not charge): precharge must not close on them."""
    rig = Rig(tmp_path)
    rig.sim.inject("precharge_open")
    pcu = rig.sim.db.get_message_by_frame_id(0x100)

    def invalid(msg: can.Message) -> can.Message:
        v = pcu.decode(bytes(msg.data), decode_choices=False)
        v["VoltageValid"], v["LinkVoltage"] = 0, v["PackVoltage"]  # a plausible number in an invalid field
        return can.Message(arbitration_id=0x100, data=pcu.encode(v, strict=False), timestamp=msg.timestamp,
                           is_extended_id=False)

    rig._inject[0x100] = invalid
    rig.run_until(lambda: rig.state is State.ERROR, 30, "ERROR after failed precharges")
    assert not any("-> NORMAL" in e.message for e in rig.recorder.recent(200))
    assert "not valid" in rig.lane.machine.error_causes[0]


CONTACTOR_FEEDBACK = 0x111


def test_lost_contactor_feedback_opens_and_missing_feedback_blocks_closing(tmp_path: Path) -> None:
    def without_feedback(rig: Rig) -> None:
        sink = rig.sink
        rig.sink = lambda msg: None if msg.arbitration_id == CONTACTOR_FEEDBACK else sink(msg)

    rig = Rig(tmp_path)
    rig.to_normal()
    without_feedback(rig)
    rig.run(2.0)
    assert rig.state is State.ERROR
    assert rig.lane.machine.feedback_faults["main_positive"] == "feedback stale"
    ok, reason = rig.lane.machine.reset()
    assert not ok and "feedback stale" in reason

    (tmp_path / "fresh").mkdir()
    rig = Rig(tmp_path / "fresh")  # feedback that never arrives: stays open, says why, no trip
    without_feedback(rig)
    rig.run(5.0)
    assert rig.state is State.STANDBY and not rig.trips
    assert any("not closing: no valid feedback" in (e.message or "") for e in rig.recorder.recent(200))


def test_a_lane_that_wakes_late_every_time_forces_the_safe_state(tmp_path: Path, monkeypatch: Any) -> None:
    """Each wake-up 70 ms late (deadline 50 ms): the tick after the late one must not count as on time."""
    rig = Rig(tmp_path)
    rig.to_normal()
    lane, wakeups = rig.lane, []

    def late_sleep(delay: float) -> None:
        for _ in range(round((delay + 0.07) / TICK_S)):
            rig.t += TICK_S
            rig.sim.tick()
        wakeups.append(rig.t)
        if len(wakeups) == 20:
            lane._stop.set()

    monkeypatch.setattr("gateway.lane.time.sleep", late_sleep)
    lane._run()
    assert lane.stats.forced_safe_state == 1 and rig.trips[0][1].name == "protection_tick"
    assert rig.state is State.ERROR


def test_a_tick_that_keeps_failing_forces_the_safe_state(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.to_normal()

    def broken(now: float) -> None:
        raise RuntimeError("a bug in one tick")

    rig.lane.protection.tick = broken  # type: ignore[method-assign]
    for _ in range(rig.loaded.config.protection.lane.max_missed):
        rig.t += TICK_S
        rig.lane._guarded_tick(rig.t, rig.t)
        assert not rig.lane.healthy
    assert rig.state is State.ERROR and rig.lane.loop.errors == 3
    assert "failed 3 times in a row" in rig.trips[0][1].message


def test_trip_freezes_a_flight_record_around_it(tmp_path: Path) -> None:
    rig = Rig(tmp_path, extra=WIDE_SPREAD + "\n[protection.lane]\nflight_before_s = 1.0\nflight_after_s = 0.5\n")
    records: list[Any] = []
    rig.recorder.record_subscribers.append(records.append)
    rig.to_normal()
    rig.sim.inject("cell_drift", CELL, 500.0)
    rig.run_until(lambda: rig.trips, 10, "a trip")
    rig.run(0.6)
    assert len(records) == 1
    rec = records[0]
    trip_wall = rig.lane.stats.last_trip["time"]
    assert rec.timestamp.min() >= trip_wall - 1.0 - 1e-6 and rec.timestamp.max() <= trip_wall + 0.5 + 1e-6
    assert 1000 < len(rec.timestamp) < 1600  # ~930 frames/s over 1.5 s
    assert (rec.frame_id == 0x100).sum() > 100  # the 100 Hz pack frames are all there


@pytest.mark.parametrize(("extra", "key"), [
    ("\n[protection.limits.cell_voltage_high]\nrsl = 4.25\n", "protection.limits.cell_voltage_high"),
    ("\n[protection.limits.cell_voltage_high]\nmsl = 4.30\n", "protection.limits.cell_voltage_high"),
    ("\n[protection.limits.cell_voltage_low]\nmol = 2.9\nrsl = 3.0\n", "protection.limits.cell_voltage_low"),
    ("\n[protection.limits.cell_volt_high]\nmsl = 4.1\n", "protection.limits.cell_volt_high"),
    ("\n[hardware_limits]\ncell_voltage_max = 4.1\n", "protection.limits.cell_voltage_high"),
    ("\n[protection.limits.cell_voltage_spread]\nmsl = 2.0\n", "protection.limits.cell_voltage_spread"),
])
def test_limit_tables_out_of_order_or_beyond_hardware_are_rejected(tmp_path: Path, extra: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(config(tmp_path, extra))
    assert info.value.key == key, str(info.value)


def test_presets_and_overrides(tmp_path: Path) -> None:
    cfg = load_config(config(tmp_path, "\n[protection]\npreset = \"LFP\"\n[protection.limits.cell_voltage_high]\n"
                                      "msl = 3.62\n")).config
    t = cfg.limit_table()
    assert (t.cell_voltage_high.mol, t.cell_voltage_high.rsl, t.cell_voltage_high.msl) == (3.55, 3.60, 3.62)
    assert t.cell_voltage_low.msl == 2.5


def test_shortcuts_give_the_events_of_the_exhaustive_evaluation(tmp_path: Path) -> None:
    """Skipping samples that change no counter and ticks where nothing can be stale changes nothing:
    the same disturbances give the same events, in the same order, as stepping every counter every time."""
    for d in ("fast", "exhaustive"):
        (tmp_path / d).mkdir()
    spread = "\n[protection.limits.cell_voltage_spread]\nmol = 0.15\nrsl = 0.25\nmsl = 0.5\n"
    rigs = [Rig(tmp_path / "fast", spread), Rig(tmp_path / "exhaustive", spread)]
    rigs[1].lane.protection.exhaustive = True
    logs: list[list[tuple[Any, ...]]] = [[], []]
    for rig, log in zip(rigs, logs, strict=True):
        rig.recorder.subscribers.append(lambda e, log=log, rig=rig: log.append(
            (round(rig.t, 2), e.kind, e.name, e.level, e.active, e.index, e.value, e.limit, e.message)))
        drop = {"current": False}

        def sink(msg: can.Message, inner: Any = rig.sink, drop: dict[str, bool] = drop) -> None:
            if not (drop["current"] and msg.arbitration_id == 0x100):
                inner(msg)

        rig.sink = sink
        n = {"k": 0}

        def hover(values: dict[str, float], t: float, n: dict[str, int] = n) -> None:
            # cell 30 hovers around MOL and RSL, once invalid, once implausible
            if values["Page"] == (CELL % 14) // 4:
                n["k"] += 1
                key = f"Cell{CELL % 14:02d}_Voltage"
                values[key] = (4.12, 4.16, 4.19, 4.19, 4.16, 4.05, 4.05, 4.05, 4.05, 4.05)[n["k"] % 10]
                if n["k"] == 20:
                    values[key.replace("Voltage", "Invalid")] = 1
                if n["k"] == 30:
                    values[key] = 8.0

        steps: list[tuple[float, Any]] = [
            (0.5, lambda r: r.edit_cells(CELL // 14, hover)),
            (1.5, lambda r, d=drop: d.update(current=True)),  # the 100 Hz current stops for 50 ms: stale, then back
            (1.55, lambda r, d=drop: d.update(current=False)),
            (2.0, lambda r: r.sim.inject("heating", 3, 400.0)),
            (3.0, lambda r: r.lane.protection.set_limits(
                replace(r.lane.protection.limits, cell_voltage_high=Levels(4.0, 4.18, 4.2)))),
            (4.0, lambda r, d=drop: d.update(current=True)),  # for 200 ms: stale data, a trip
            (4.2, lambda r, d=drop: d.update(current=False)),
            (4.5, lambda r: r.sim.inject("current_offset", 0, 3.0)),
            (5.0, lambda r: r.sim.inject("silent", 9)),
        ]
        rig.to_normal()
        start = rig.t
        states = []
        for _ in range(700):
            while steps and rig.t - start >= steps[0][0]:
                steps.pop(0)[1](rig)
            rig.run(TICK_S)
            p = rig.lane.protection
            aggregates = tuple(tuple(p.checks[c].count[j][0] for j in range(3))
                               for c in ("cell_voltage_spread", "cell_temperature_spread", "pack_voltage_mismatch"))
            states.append((rig.state, tuple(p.trip_causes()), p.tripping(), p.derate(), len(p.active()), aggregates))
        log.append(("states", tuple(states)))
    assert logs[0] == logs[1]
    seen = {(e[2], e[3], e[4]) for e in logs[0][:-1]}
    # the scenario went through the interesting paths: levels up and down, bad and stale data, a trip
    assert {("cell_voltage_high", Level.MOL, True), ("cell_voltage_high", Level.MOL, False),
            ("cell_voltage_high", Level.RSL, True), ("cell.voltage_bad_data", Level.MSL, True),
            ("stale_data", Level.MSL, True), ("stale_data", Level.MSL, False),
            ("cell_voltage_spread", Level.MOL, True), ("cell_voltage_spread", Level.RSL, True)} <= seen
    assert any(e[1] == Kind.TRIP for e in logs[0][:-1])
