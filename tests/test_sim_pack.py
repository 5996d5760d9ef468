"""The simulated pack speaking our DBC, decoded through the real pipeline (no sleeping: ticks are driven)."""

from __future__ import annotations

import math
from pathlib import Path

import can
import cantools
import numpy as np
import pytest

from drivers.sim_pack import BALANCING_CURRENT_A, TICK_S, ContactorState, FramePump, SimPack
from gateway.config import load_config
from gateway.image import Quality

ROOT = Path(__file__).resolve().parents[1]
DBC = str(ROOT / "dbc" / "bmsgw_pack.dbc")


class Rig:
    """A SimPack wired straight into a fresh process image."""

    def __init__(self, **kwargs: object) -> None:
        loaded = load_config(ROOT / "gateway" / "configs" / "sim.toml")
        self.image = loaded.image
        self.ingest = loaded.ingests["pack"]
        self.t = 0.0
        self.ingest.clock = lambda: self.t
        kwargs.setdefault("contactors_closed", True)
        self.sim = SimPack(DBC, self._deliver, **kwargs)  # type: ignore[arg-type]
        self.db = cantools.database.load_file(DBC)
        self.results: list[int] = []

    def _deliver(self, msg: can.Message) -> None:
        self.results.append(self.ingest.on_frame(msg))

    def run(self, seconds: float) -> None:
        for _ in range(round(seconds / TICK_S)):
            self.sim.tick()
            self.t += TICK_S

    def command(self, name: str, values: dict[str, int]) -> None:
        m = self.db.get_message_by_name(name)
        self.sim.receive(can.Message(arbitration_id=m.frame_id, data=m.encode(values), is_extended_id=False))

    def value(self, name: str) -> float:
        return self.image.read(name, self.t).value


def test_every_frame_decodes_and_every_signal_is_good() -> None:
    rig = Rig()
    rig.run(1.5)
    assert all(r >= 0 for r in rig.results), "every simulated frame decodes and refreshes a slot"
    names = rig.image.select("cell[*].voltage") + rig.image.select("module[*].temperature[*]") + ["pack.current"]
    idx = [rig.image.index(n) for n in names]
    assert (rig.image.quality(idx, rig.t) == Quality.GOOD).all()
    # 100 Hz pack, 4 pages x 16 modules at 10 Hz, status at 10 Hz, temperatures at 1 Hz, feedback at 10 Hz
    per_s = len(rig.results) / 1.5
    assert 850 < per_s < 1000


@pytest.mark.parametrize("chemistry", ["NMC", "LFP"])
def test_cell_voltage_falls_under_discharge_and_rises_under_charge(chemistry: str) -> None:
    evening = Rig(chemistry=chemistry, start_hour=19.0, speed=50.0, initial_soc=0.7)
    evening.run(0.2)
    v0 = evening.image.array("cell.voltage").copy()
    evening.run(5.0)  # 250 s of simulated discharge
    assert evening.value("pack.current") < -10
    assert (evening.image.array("cell.voltage") < v0).mean() > 0.9

    noon = Rig(chemistry=chemistry, start_hour=12.0, speed=50.0, initial_soc=0.3)
    noon.run(0.2)
    v0 = noon.image.array("cell.voltage").copy()
    noon.run(5.0)
    assert noon.value("pack.current") > 10
    assert (noon.image.array("cell.voltage") > v0).mean() > 0.9


def test_temperature_rises_with_current_not_at_rest() -> None:
    busy = Rig(start_hour=19.0, speed=500.0, initial_soc=0.9)
    idle = Rig(start_hour=2.0, speed=500.0, initial_soc=0.9)
    for rig in (busy, idle):
        rig.run(1.0)
    t_busy0 = busy.image.array("module.temperature").mean()
    t_idle0 = idle.image.array("module.temperature").mean()
    for rig in (busy, idle):
        rig.run(6.0)  # ~50 min simulated
    assert busy.image.array("module.temperature").mean() > t_busy0 + 0.3
    assert abs(idle.image.array("module.temperature").mean() - t_idle0) < 0.3


def test_contactors_follow_commands_and_current_stops_when_open() -> None:
    rig = Rig(start_hour=12.0)
    rig.run(0.3)
    assert rig.value("contactor.main_positive") == ContactorState.CLOSED
    assert abs(rig.value("pack.current")) > 1
    rig.command("CONTACTOR_Command", {"MainPositiveRequest": 0, "MainNegativeRequest": 0, "PrechargeRequest": 0,
                                      "AliveCounter": 0})
    rig.run(0.3)
    assert rig.value("contactor.main_positive") == ContactorState.OPEN
    assert abs(rig.value("pack.current")) < 0.5  # sensor noise only


def test_precharge_brings_the_link_up_to_the_pack() -> None:
    rig = Rig(contactors_closed=False)
    rig.run(0.3)
    assert rig.value("pack.link_voltage") < 5
    for _ in range(20):  # the gateway repeats its command every 100 ms
        rig.command("CONTACTOR_Command", {"MainPositiveRequest": 0, "MainNegativeRequest": 1, "PrechargeRequest": 1,
                                          "AliveCounter": 0})
        rig.run(0.1)
    assert rig.value("pack.link_voltage") > 0.95 * rig.value("pack.voltage")


def test_pcu_opens_everything_when_the_gateway_commands_stop() -> None:
    rig = Rig()
    rig.command("CONTACTOR_Command", {"MainPositiveRequest": 1, "MainNegativeRequest": 1, "PrechargeRequest": 0,
                                      "AliveCounter": 0})
    rig.run(0.2)
    assert rig.value("contactor.main_positive") == ContactorState.CLOSED
    rig.run(0.3)  # no further command: the gateway is gone
    assert rig.value("contactor.main_positive") == ContactorState.OPEN


def test_welded_contactor_reports_welded_and_stays_closed() -> None:
    rig = Rig()
    rig.sim.inject("welded", 0)
    rig.command("CONTACTOR_Command", {"MainPositiveRequest": 0, "MainNegativeRequest": 1, "PrechargeRequest": 0,
                                      "AliveCounter": 0})
    rig.run(0.3)
    assert rig.value("contactor.main_positive") == ContactorState.WELDED


def test_silent_module_goes_stale_and_others_stay_good() -> None:
    rig = Rig()
    rig.run(0.5)
    rig.sim.inject("silent", 3)
    rig.run(0.5)  # > 3 cycles of 100 ms
    q = rig.image.family_quality("cell.voltage", rig.t)
    assert (q[3 * 14:4 * 14] == Quality.STALE).all()
    assert (np.delete(q, np.s_[3 * 14:4 * 14]) == Quality.GOOD).all()
    rig.sim.inject("clear")
    rig.run(0.3)
    assert (rig.image.family_quality("cell.voltage", rig.t) == Quality.GOOD).all()


def test_drifting_and_stuck_cells_and_current_offset() -> None:
    rig = Rig(start_hour=2.0)  # night: rest, so only the faults move values
    rig.run(0.5)
    before = rig.image.array("cell.voltage").copy()
    rig.sim.inject("cell_drift", 5, 20.0)  # 20 mV/s
    rig.sim.inject("current_offset", value=3.0)
    rig.run(2.0)
    after = rig.image.array("cell.voltage")
    assert after[5] - before[5] > 0.03
    assert abs(rig.value("pack.current") - 3.0) < 0.3


def test_balancing_command_bleeds_and_is_reported_then_times_out() -> None:
    rig = Rig(start_hour=2.0)
    rig.run(0.2)
    rig.command("BALANCING_Command", {"BalancingModule": 2, "BalancingMask02": 0b101})
    rig.run(0.3)
    bal = rig.image.array("cell.balancing")
    assert bal[2 * 14] == 1 and bal[2 * 14 + 1] == 0 and bal[2 * 14 + 2] == 1
    assert bal.sum() == 2
    rig.run(3.5)  # no refresh: the module unit stops on its own
    assert rig.image.array("cell.balancing").sum() == 0


def test_balancing_bleeds_the_selected_cell_at_the_balancing_current() -> None:
    rig = Rig(start_hour=2.0, speed=200.0)  # night: the pack rests, only the bleed moves charge
    soc0 = rig.sim.pack.soc
    cell = 2 * 14
    for _ in range(10):  # refreshed every second, as the gateway does
        rig.command("BALANCING_Command", {"BalancingModule": 2, "BalancingMask02": 0b1})
        rig.run(1.0)
    assert rig.sim.pack.current_a == 0.0
    moved = rig.sim.pack.soc - soc0
    bled_s = 10.0 * 200.0
    assert moved[cell] == pytest.approx(-BALANCING_CURRENT_A * bled_s / 3600 / rig.sim.pack.capacity_ah[cell],
                                        rel=1e-9)
    assert (np.delete(moved, cell) == 0.0).all()


@pytest.mark.parametrize(("fault", "target", "value", "allowed"), [
    ("heating", 0, math.nan, "0..2000 W"),
    ("heating", 0, math.inf, "0..2000 W"),
    ("heating", 0, -2000.0, "0..2000 W"),  # would cool the module towards -160 degC
    ("heating", 0, 1e6, "0..2000 W"),
    ("current_offset", 0, math.inf, "-1000..1000 A"),
    ("current_offset", 0, -math.nan, "-1000..1000 A"),
    ("current_offset", 0, -5000.0, "-1000..1000 A"),
    ("cell_drift", 5, math.nan, "-10000..10000 mV/s"),
    ("cell_drift", 5, -math.inf, "-10000..10000 mV/s"),
])
def test_a_fault_value_outside_physics_is_refused_naming_the_fault_and_the_range(
        fault: str, target: int, value: float, allowed: str) -> None:
    rig = Rig(start_hour=12.0)
    rig.run(0.2)
    with pytest.raises(ValueError, match=f"^sim fault {fault}: .*allowed: .*{allowed}"):
        rig.sim.inject(fault, target, value)
    assert rig.sim.pack.active_faults == ()
    sent = len(rig.results)
    rig.run(1.0)  # the pack goes on as before
    assert len(rig.results) > sent + 800 and all(r >= 0 for r in rig.results)
    assert np.isfinite(rig.sim.pack.module_temps_c).all()


def test_repeated_heating_cannot_add_up_beyond_the_range() -> None:
    rig = Rig()
    rig.sim.inject("heating", 3, 1500.0)
    with pytest.raises(ValueError, match="sim fault heating: .*3000 W.*allowed: .*0..2000 W"):
        rig.sim.inject("heating", 3, 1500.0)
    assert rig.sim.pack.active_faults == ("module 3 extra heat 1500 W",)


@pytest.mark.parametrize(("fault", "target"), [("welded", -1), ("welded", 3), ("silent", -1), ("heating", 16),
                                               ("stuck", -1), ("cell_drift", 224)])
def test_a_fault_target_out_of_range_is_refused(fault: str, target: int) -> None:
    rig = Rig()
    with pytest.raises(IndexError, match=f"^sim fault {fault}: .* out of range 0\\.\\."):
        rig.sim.inject(fault, target, 1.0)
    assert not any(c.welded for c in rig.sim.contactors.values())
    assert not rig.sim.silent_modules and rig.sim.pack.active_faults == ()


def test_a_failing_tick_is_counted_and_the_node_clock_goes_on() -> None:
    down = [True]
    sent: list[can.Message] = []

    def send(msg: can.Message) -> None:  # the bus refuses frames for a while (adapter unplugged)
        if down[0]:
            raise can.CanOperationError("bus down")
        sent.append(msg)

    sim = SimPack(DBC, send, contactors_closed=True)
    cmd = sim.db.get_message_by_name("CONTACTOR_Command")
    sim.receive(can.Message(arbitration_id=cmd.frame_id, data=cmd.encode(
        {"MainPositiveRequest": 1, "MainNegativeRequest": 1, "PrechargeRequest": 0, "AliveCounter": 0})))
    for _ in range(50):
        with pytest.raises(can.CanOperationError):
            sim.tick()
    assert (sim.tick_count, sim.tick_errors, sim.frames_sent) == (50, 50, 0)
    down[0] = False
    sim.tick()
    assert (sim.tick_count, sim.tick_errors) == (51, 50)
    # the PCU's command timeout ran on the node's clock while the bus was down: everything opened
    assert all(not c.closed for c in sim.contactors.values())
    assert sent and sent[0].arbitration_id == sim.db.get_message_by_name("PACK_Measurement").frame_id


def test_a_parsed_database_gives_the_same_frames_as_the_dbc_file() -> None:
    frames: list[list[can.Message]] = [[], []]
    sims = [SimPack(DBC, frames[0].append), SimPack(cantools.database.load_file(DBC), frames[1].append)]
    for _ in range(120):
        for sim in sims:
            sim.tick()
    assert len(frames[0]) > 1000
    assert [(m.arbitration_id, bytes(m.data)) for m in frames[0]] == \
        [(m.arbitration_id, bytes(m.data)) for m in frames[1]]


def test_frame_pump_hands_waiting_frames_to_every_listener_in_order() -> None:
    with can.Bus(interface="virtual", channel="sim-pump", receive_own_messages=False) as node, \
            can.Bus(interface="virtual", channel="sim-pump") as gateway:
        got: list[int] = []
        also: list[int] = []
        pump = FramePump(node, [lambda m: got.append(m.arbitration_id)])
        pump.add_listener(lambda m: also.append(m.arbitration_id))
        pump()  # nothing waiting
        for i in range(5):
            gateway.send(can.Message(arbitration_id=0x100 + i, data=bytes(8)))
        pump()
        assert got == also == [0x100, 0x101, 0x102, 0x103, 0x104]
        pump.stop()
        gateway.send(can.Message(arbitration_id=0x200, data=bytes(8)))
        pump()
        assert got == [0x100, 0x101, 0x102, 0x103, 0x104]
