"""The simulated pack on a CAN bus: the physics of sim_battery speaking dbc/bmsgw_pack.dbc.

It behaves like the real pack's electronics: the pack control unit sends
current and voltages at 100 Hz and contactor feedback at 10 Hz, each module
unit sends its cell-voltage pages at 10 Hz and temperatures at 1 Hz, contactors
follow the gateway's command frames (with closing delays, precharge of the DC
link and an optional welded contact), balancing follows the balancing command.
Frame rates follow the wall clock; the physics runs ``speed`` times faster.

It runs in its own thread: in process on a python-can ``virtual`` bus for
``bmsgw run --sim``, or in a separate process behind the SLCAN-over-TCP server
(``bmsgw sim serve``) so that the gateway opens a real python-can interface.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Generic, Protocol, TypeVar, cast

import can
import cantools
import numpy as np
from cantools.database.can import Database

from drivers.sim_battery import SimBatteryPack, StorageDayProfile

log = logging.getLogger(__name__)

TICK_S = 0.01
PRECHARGE_TAU_S = 0.25  # DC-link RC through the precharge resistor
CONTACTOR_DELAY_S = 0.03
BALANCING_CURRENT_A = 0.15  # bleed current of a balanced cell (magnitude: bleeding discharges it)
BALANCING_TIMEOUT_S = 3.0
COMMAND_TIMEOUT_S = 0.3  # the PCU opens everything when the gateway's commands stop (its heartbeat)


class ContactorState(IntEnum):
    """Feedback values of CONTACTOR_Feedback (value table of the DBC)."""

    OPEN = 0
    CLOSED = 1
    WELDED = 2
    FAULT = 3


@dataclass
class Contactor:
    """One contactor: the commanded and the actual position."""

    requested: bool = False
    closed: bool = False
    welded: bool = False
    changed_at: float = 0.0

    def update(self, now: float) -> None:
        if self.welded:
            self.closed = True
        elif self.requested != self.closed and now - self.changed_at >= CONTACTOR_DELAY_S:
            self.closed = self.requested

    def command(self, close: bool, now: float) -> None:
        if close != self.requested:
            self.requested = close
            self.changed_at = now

    @property
    def feedback(self) -> ContactorState:
        if self.welded:
            return ContactorState.WELDED
        return ContactorState.CLOSED if self.closed else ContactorState.OPEN


FAULTS = ("cell_drift", "heating", "current_offset", "stuck", "silent", "welded", "precharge_open", "clear")
CONTACTORS = ("main_positive", "main_negative", "precharge")  # the targets of the welded fault, in order


class SimPack:
    """The simulated pack node: call :meth:`tick` every TICK_S of wall time, feed it received frames.

    ``dbc_path``: the pack DBC's path, or the database already parsed from it (the gateway's: a second
    parse in the same process costs ~2 MB; the simulator only reads it).
    """

    def __init__(self, dbc_path: str | Path | Database, send: Callable[[can.Message], object], *, modules: int = 16,
                 cells_per_module: int = 14, sensors_per_module: int = 2, chemistry: str = "NMC",
                 speed: float = 1.0, start_hour: float = 12.0, initial_soc: float = 0.5, ambient_c: float = 25.0,
                 peak_charge_a: float = 30.0, peak_discharge_a: float = 40.0, seed: int = 1,
                 contactors_closed: bool = False) -> None:
        db = dbc_path if isinstance(dbc_path, Database) else cantools.database.load_file(dbc_path)
        assert isinstance(db, Database)
        self.db = db
        self.send = send
        self.speed = speed
        self.pack = SimBatteryPack(modules=modules, cells_per_module=cells_per_module,
                                   sensors_per_module=sensors_per_module, chemistry=chemistry,
                                   initial_soc=initial_soc, ambient_c=ambient_c, seed=seed)
        self.profile = StorageDayProfile(charge_peak_a=peak_charge_a, discharge_peak_a=peak_discharge_a)
        self.sim_time_s = start_hour * 3600.0
        self.contactors = {k: Contactor(closed=contactors_closed, requested=contactors_closed) for k in CONTACTORS}
        self.contactors["precharge"] = Contactor()
        self.silent_modules: set[int] = set()
        self.last_command: float | None = None
        self.wall: Callable[[], float] = time.time  # frame timestamps (tests substitute their clock)
        self.precharge_broken = False
        self.balancing_mask = np.zeros((modules, cells_per_module), dtype=bool)
        self._balancing_until = np.zeros(modules)
        self.tick_count = 0
        self.tick_errors = 0  # ticks that raised (counted, and the node's clock still advanced)
        self.frames_sent = 0
        self.frames_received = 0
        self._alive: dict[str, int] = {}
        self._link_v = self.pack.pack_voltage_v if contactors_closed else 0.0
        self._msg = {m.name: m for m in self.db.messages}
        self._ranges = {m.name: {s.name: (_or(s.minimum, -math.inf), _or(s.maximum, math.inf)) for s in m.signals}
                        for m in self.db.messages}

    # -- inputs -------------------------------------------------------------

    def receive(self, msg: can.Message) -> None:
        """A frame from the bus (contactor and balancing commands)."""
        self.frames_received += 1
        now = self.now
        try:
            if msg.arbitration_id == self._msg["CONTACTOR_Command"].frame_id:
                v = self._decode("CONTACTOR_Command", msg)
                self.last_command = now
                self.contactors["main_positive"].command(bool(v["MainPositiveRequest"]), now)
                self.contactors["main_negative"].command(bool(v["MainNegativeRequest"]), now)
                self.contactors["precharge"].command(bool(v["PrechargeRequest"]), now)
            elif msg.arbitration_id == self._msg["BALANCING_Command"].frame_id:
                v = self._decode("BALANCING_Command", msg)
                m = int(v["BalancingModule"])
                mask = int(v[f"BalancingMask{m:02d}"])
                bits = (mask >> np.arange(self.pack.cells_per_module)) & 1
                self.balancing_mask[m] = bits.astype(bool)
                self._balancing_until[m] = now + BALANCING_TIMEOUT_S
        except (cantools.database.DecodeError, KeyError, ValueError) as exc:
            log.debug("sim: ignoring bad command frame: %s", exc)

    def _decode(self, name: str, msg: can.Message) -> dict[str, float]:
        return cast(dict[str, float], self._msg[name].decode(bytes(msg.data), decode_choices=False))

    def inject(self, fault: str, target: int = 0, value: float = 0.0) -> str:
        """Inject a fault by name (see FAULTS); returns a description.

        :raises ValueError: for an unknown fault or a value outside physics,
        :raises IndexError: for a target out of range (both name the fault).
        """
        try:
            return self._inject(fault, target, value)
        except (IndexError, ValueError) as exc:
            raise type(exc)(f"sim fault {fault}: {exc}") from None

    def _inject(self, fault: str, target: int, value: float) -> str:
        p = self.pack
        if fault == "cell_drift":
            p.inject_cell_drift(target, value or 5.0)
        elif fault == "heating":
            p.inject_module_heating(target, value or 200.0)
        elif fault == "current_offset":
            p.inject_current_offset(value or 2.0)
        elif fault == "stuck":
            p.inject_stuck_cell(target)
        elif fault == "silent":
            if not 0 <= target < p.modules:
                raise IndexError(f"module {target} out of range 0..{p.modules - 1}")
            self.silent_modules.add(target)
            return f"module {target} silent"
        elif fault == "welded":
            if not 0 <= target < len(CONTACTORS):  # a negative index would silently pick one
                raise IndexError(f"contactor {target} out of range 0..{len(CONTACTORS) - 1} ({', '.join(CONTACTORS)})")
            name = CONTACTORS[target]
            self.contactors[name].welded = True
            return f"contactor {name} welded"
        elif fault == "precharge_open":
            self.precharge_broken = True
            return "precharge resistor open: the DC link does not charge"
        elif fault == "clear":
            p.clear_faults()
            self.precharge_broken = False
            self.silent_modules.clear()
            for c in self.contactors.values():
                c.welded = False
            return "faults cleared"
        else:
            raise ValueError(f"unknown fault (known: {', '.join(FAULTS)})")
        return p.active_faults[-1]

    # -- the clock ------------------------------------------------------------

    def tick(self) -> None:
        """Advance one TICK_S of wall time: physics, contactors, frames due now.

        A tick that raises (a frame the bus refuses, say) is counted in ``tick_errors`` and the error
        passes on, but the node's clock advances all the same: its timeouts must not freeze.
        """
        try:
            self._tick()
        except Exception:
            self.tick_errors += 1
            raise
        finally:
            self.tick_count += 1

    def _tick(self) -> None:
        now = self.now
        if self.last_command is not None and now - self.last_command > COMMAND_TIMEOUT_S:
            for c in self.contactors.values():
                c.command(False, now)
        for c in self.contactors.values():
            c.update(now)
        self._step_physics()
        k = self.tick_count
        self._send_pack_measurement()
        if k % 10 == 0:
            self._send("CONTACTOR_Feedback", {
                "MainPositiveState": self.contactors["main_positive"].feedback,
                "MainNegativeState": self.contactors["main_negative"].feedback,
                "PrechargeState": self.contactors["precharge"].feedback})
        # spread the module traffic over the 10 ticks of each 100 ms
        for m in range(k % 10, self.pack.modules, 10):
            if m not in self.silent_modules:
                self._send_cell_voltages(m)
                self._send_module_status(m)
                if k % 100 < 10:
                    self._send_temperatures(m)
        if k % 100 == 50:
            meas = self._meas
            self._send("PACK_Temperatures", {"AmbientTemperature": meas.ambient_temp_c,
                                              "CoolantInletTemperature": meas.ambient_temp_c,
                                              "CoolantOutletTemperature": meas.pack_temp_c})

    @property
    def now(self) -> float:
        """The node's own clock (s of wall time since start), so tests can tick it without sleeping."""
        return self.tick_count * TICK_S

    def _step_physics(self) -> None:
        dt = TICK_S * self.speed
        p = self.pack
        c = self.contactors
        current = 0.0
        if c["main_negative"].closed and c["main_positive"].closed:
            v = p.cell_voltages_v
            current = self.profile.derated_current_at(self.sim_time_s, float(v.max()), float(v.min()), p.chemistry)
        active = self._balancing_until > self.now
        # passive balancing burns charge in a resistor: negative, as currents > 0 charge the cell
        p.set_balancing_currents(np.where(self.balancing_mask & active[:, None], -BALANCING_CURRENT_A, 0.0).ravel())
        p.step(dt, current)
        self.sim_time_s += dt
        # DC link: follows the pack through main+, charges through the precharge resistor, else bleeds off
        target = p.pack_voltage_v if c["main_negative"].closed else 0.0
        if c["main_negative"].closed and c["main_positive"].closed:
            self._link_v = target
        else:
            precharging = c["precharge"].closed and c["main_negative"].closed and not self.precharge_broken
            tau = PRECHARGE_TAU_S if precharging else 5.0
            if self.precharge_broken:
                target = 0.0
            self._link_v += (target - self._link_v) * (1 - np.exp(-TICK_S / tau))
        p.dc_link_voltage_v = self._link_v
        self._meas = p.measure()

    def _send(self, name: str, values: dict[str, float]) -> None:
        msg = self._msg[name]
        if "AliveCounter" in self._ranges[name]:
            count = self._alive[name] = (self._alive.get(name, -1) + 1) % 16
            values["AliveCounter"] = count
        # real electronics saturate at the ends of a field's range (noise around 0 V, > 8.191 V)
        lo_hi = self._ranges[name]
        clipped = {k: min(max(v, lo_hi[k][0]), lo_hi[k][1]) for k, v in values.items()}
        data = msg.encode(clipped, strict=False)
        self.send(can.Message(arbitration_id=msg.frame_id, data=data, is_extended_id=False, timestamp=self.wall()))
        self.frames_sent += 1

    def _send_pack_measurement(self) -> None:
        meas = self._meas
        self._send("PACK_Measurement", {"PackCurrent": meas.pack_current_a, "PackVoltage": meas.pack_voltage_v,
                                        "LinkVoltage": meas.dc_link_voltage_v, "CurrentValid": 1, "VoltageValid": 1})

    def _send_cell_voltages(self, m: int) -> None:
        n = self.pack.cells_per_module
        cells = self._meas.cell_voltages_v[m * n:(m + 1) * n]
        for page in range(-(-n // 4)):
            values: dict[str, float] = {"Page": page}
            for c in range(page * 4, min(page * 4 + 4, n)):
                values[f"Cell{c:02d}_Voltage"] = float(cells[c])
                values[f"Cell{c:02d}_Invalid"] = 0
            self._send(f"MMU{m:02d}_CellVoltages", values)

    def _send_temperatures(self, m: int) -> None:
        t = self._meas.module_temps_c[m]
        self._send(f"MMU{m:02d}_Temperatures", {
            "Sensor0_Temperature": float(t[0]), "Sensor1_Temperature": float(t[1]) if len(t) > 1 else 0.0,
            "Board_Temperature": float(t.mean()), "Sensor0_Invalid": 0, "Sensor1_Invalid": 0})

    def _send_module_status(self, m: int) -> None:
        n = self.pack.cells_per_module
        mask = int((self.balancing_mask[m] << np.arange(n)).sum()) if self._balancing_until[m] > self.now else 0
        volts = float(self._meas.cell_voltages_v[m * n:(m + 1) * n].sum())
        self._send(f"MMU{m:02d}_Status", {"BalancingActive": mask, "ModuleVoltage": volts,
                                          "MmuState": 1, "MmuFault": 0})


def _or(x: float | None, default: float) -> float:
    return default if x is None else float(x)


class Ticking(Protocol):
    """A simulated node advanced one TICK_S per call."""

    def tick(self) -> None: ...


T = TypeVar("T", bound=Ticking)


class FramePump:
    """Hands the frames waiting on a bus to listeners; the simulator's own thread calls it once per tick.

    What can.Notifier does, without a thread of its own that wakes for every frame and five times a
    second (and whose CPU time counted as the gateway's). The simulated nodes keep their own clock in
    ticks, so a frame is handled at the start of the tick after it arrived: at most one tick later
    than a notifier thread would have, and with the same time stamp on the node's clock.
    """

    def __init__(self, bus: can.BusABC, listeners: list[Callable[[can.Message], object]]) -> None:
        self.bus = bus
        self.listeners = listeners
        self.stopped = False

    def add_listener(self, listener: Callable[[can.Message], object]) -> None:
        self.listeners.append(listener)

    def stop(self) -> None:
        self.stopped = True

    def __call__(self) -> None:
        recv = self.bus.recv
        while not self.stopped and (msg := recv(0)) is not None:
            for listener in self.listeners:
                listener(msg)


class SimRunner(Generic[T]):
    """Runs a simulated node (the pack, the EIS module) in its own thread at TICK_S of wall time per tick.

    ``pump``, when given, delivers the frames received since the last tick before each tick.
    """

    def __init__(self, sim: T, name: str = "sim-pack", pump: Callable[[], None] | None = None) -> None:
        self.sim = sim
        self.pump = pump
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.late_ticks = 0
        # CPU time of this thread, all of it (ticks, frames in, sleeping and waking): what the simulator
        # costs, not the gateway
        self.cpu_s = 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)

    def _run(self) -> None:
        next_t = time.monotonic()
        cpu0 = time.thread_time()
        while not self._stop.is_set():
            if self.pump is not None:
                try:
                    self.pump()
                except Exception:
                    log.exception("simulated node: a received frame failed")
            try:
                self.sim.tick()
            except Exception:
                log.exception("simulated pack tick failed")
            self.cpu_s = time.thread_time() - cpu0
            next_t += TICK_S
            delay = next_t - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            elif delay < -1.0:  # far behind (machine suspended): resynchronise instead of bursting
                self.late_ticks += 1
                next_t = time.monotonic()


def virtual_bus_sim(channel: str, dbc_path: str | Path | Database,
                    **kwargs: object) -> tuple[SimRunner[SimPack], FramePump, can.BusABC]:
    """A simulated pack on python-can's in-process virtual bus ``channel``.

    The pump delivers the frames on that bus to the pack (and to what else is added as a listener)
    from the pack's thread, before each tick.
    """
    bus = can.Bus(interface="virtual", channel=channel, receive_own_messages=False)
    sim = SimPack(dbc_path, bus.send, **kwargs)  # type: ignore[arg-type]
    pump = FramePump(bus, [sim.receive])
    return SimRunner(sim, pump=pump), pump, bus
