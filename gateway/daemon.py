"""The gateway daemon: buses, process image, loops and the control socket in one task group."""

from __future__ import annotations

import gc
import logging
import math
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from typing import Any

import anyio
import can
import numpy as np

from drivers.canbus import CanAdapter
from drivers.sim_pack import SimRunner, virtual_bus_sim
from gateway import __version__
from gateway.config import Loaded, socket_path, state_dir
from gateway.contactors import CanContactorDriver, ContactorMachine, DeepDischargeLatch
from gateway.control import ControlError, ControlServer
from gateway.decode import Decoder, frame_record
from gateway.events import Recorder
from gateway.image import Quality
from gateway.lane import ProtectionLane
from gateway.loops import LoopStats, run_periodic
from gateway.metrics import serve as serve_metrics
from gateway.notify import Notifier
from gateway.protection import Protection
from gateway.schema import ConfigError

log = logging.getLogger(__name__)

RATE_PERIOD_S = 1.0
CANDUMP_QUEUE = 10_000


class FrameTap:
    """Collects frames from a receive thread for a live candump without ever blocking it."""

    def __init__(self, bus: str) -> None:
        self.bus = bus
        self.frames: deque[can.Message] = deque()
        self.dropped = 0

    def __call__(self, msg: can.Message) -> None:
        if len(self.frames) >= CANDUMP_QUEUE:
            self.dropped += 1
        else:
            self.frames.append(msg)


class Gateway:
    """Everything the daemon runs, built from a validated config."""

    def __init__(self, loaded: Loaded, simulate: bool = False) -> None:
        self.loaded = loaded
        cfg = loaded.config
        self.image, self.ingests = loaded.image, loaded.ingests
        self.decoders = {s.bus: Decoder(s.messages) for s in loaded.sources}
        self.recorder = Recorder()
        self.adapters: dict[str, CanAdapter] = {}
        self.lane: ProtectionLane | None = None
        sinks: dict[str, Callable[[can.Message], object]] = {b.name: self.ingests[b.name].on_frame for b in cfg.bus}
        if cfg.protection.enabled:
            bus = cfg.contactor_bus()
            self.lane = make_lane(loaded, self.recorder, lambda msg: self.adapters[bus].send(msg))
            sinks = {b.name: self.lane.sink(b.name, self.ingests[b.name], b.fd) for b in cfg.bus}
        self.adapters.update({b.name: CanAdapter(b, sinks[b.name]) for b in cfg.bus})
        self.started_mono = time.monotonic()
        self.started_wall = time.time()
        self.notifier = Notifier()
        self.loops = [LoopStats("bus-rates", RATE_PERIOD_S, "P3"),
                      LoopStats("watchdog", self.notifier.watchdog_s / 3 if self.notifier.watchdog_s else 5.0, "P3")]
        self.rates: dict[str, float] = {b: 0.0 for b in self.adapters}
        self._last_frames = {b: 0 for b in self.adapters}
        self.sim: SimRunner | None = None
        self._sim_parts: tuple[Any, ...] = ()
        if simulate:
            self._make_sim()
        self.control = ControlServer(socket_path(cfg), {
            "status": self.cmd_status, "signals": self.cmd_signals, "sim.fault": self.cmd_sim_fault,
            "version": self.cmd_version, "alarms": self.cmd_alarms, "reset": self.cmd_reset,
            "contactors": self.cmd_contactors,
        }, {"candump": self.stream_candump})

    def _make_sim(self) -> None:
        cfg = self.loaded.config
        sim = cfg.sim
        if sim is None:
            raise ConfigError(self.loaded.path, "sim", "--sim needs a [sim] section in the config")
        bus = next(b for b in cfg.bus if b.name == sim.bus)
        if bus.interface != "virtual":
            raise ConfigError(self.loaded.path, "sim.bus",
                              f"--sim runs the simulated pack on a 'virtual' bus; bus '{bus.name}' is '{bus.interface}'")
        dbc = self.loaded.dbcs[bus.name][0].path
        runner, notifier, vbus = virtual_bus_sim(
            bus.channel, str(dbc), modules=cfg.site.modules, cells_per_module=cfg.site.cells_per_module,
            sensors_per_module=cfg.site.sensors_per_module, chemistry=cfg.site.chemistry, speed=sim.speed,
            start_hour=sim.start_hour, initial_soc=sim.initial_soc, ambient_c=sim.ambient_c,
            peak_charge_a=sim.peak_charge_a, peak_discharge_a=sim.peak_discharge_a, seed=sim.seed)
        self.sim = runner
        self._sim_parts = (notifier, vbus)

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT; every thread and task is stopped on the way out."""
        # the P0 lane's threads must get the GIL within a fraction of a millisecond, and a
        # full collection must not walk the start-up heap (docs/design.md has the measurements)
        sys.setswitchinterval(self.loaded.config.protection.switch_interval_ms / 1000.0)
        gc.collect()
        gc.freeze()
        for adapter in self.adapters.values():
            adapter.start()
        if self.lane is not None:
            self.lane.start()
        if self.sim is not None:
            self.sim.start()
        metrics = None
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(self.control.serve)
                if self.loaded.config.metrics.enabled:
                    metrics = serve_metrics(self.loaded.config.metrics, self.status_snapshot)
                tg.start_soon(run_periodic, self.loops[0], self._update_rates)
                tg.start_soon(run_periodic, self.loops[1], self._feed_watchdog)
                tg.start_soon(self._wait_for_signal, tg.cancel_scope)
                log.info("bmsgw %s running: %d buses, %d signals, control socket %s", __version__,
                         len(self.adapters), self.image.size, self.control.path)
                self.notifier.send(READY=1, STATUS=self._status_line())
        finally:
            self.notifier.send(STOPPING=1)
            if metrics is not None:
                metrics.shutdown()
            self.stop()

    def stop(self) -> None:
        if self.sim is not None:
            self.sim.stop()
            notifier, vbus = self._sim_parts
            notifier.stop()
            vbus.shutdown()
            self.sim = None
        if self.lane is not None:
            self.lane.stop()
        for adapter in self.adapters.values():
            adapter.stop()

    async def _wait_for_signal(self, scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("%s received, shutting down", signal.Signals(signum).name)
                scope.cancel()
                return

    @property
    def healthy(self) -> bool:
        """What the watchdog is fed on: the protection lane keeps its deadline (or, without
        protection, every receive thread is alive)."""
        if self.lane is not None:
            return self.lane.healthy
        return all(a.alive for a in self.adapters.values())

    def _status_line(self) -> str:
        state = self.lane.machine.state.value if self.lane is not None else "protection off"
        rate = sum(self.rates.values())
        return f"contactors {state}, {rate:.0f} frames/s" + ("" if self.healthy else ", PROTECTION LANE UNHEALTHY")

    def _feed_watchdog(self) -> None:
        # a stalled lane gets no WATCHDOG=1, so systemd restarts the gateway (the PCU has opened
        # the contactors already: its command heartbeat stopped with the lane)
        if self.healthy:
            self.notifier.send(WATCHDOG=1, STATUS=self._status_line())
        else:
            self.notifier.send(STATUS=self._status_line())

    def _update_rates(self) -> None:
        for name, adapter in self.adapters.items():
            frames = adapter.stats.frames
            self.rates[name] = (frames - self._last_frames[name]) / RATE_PERIOD_S
            self._last_frames[name] = frames

    # -- control commands ------------------------------------------------------

    async def cmd_version(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"version": __version__, "config": str(self.loaded.path)}

    async def cmd_status(self, args: dict[str, Any]) -> dict[str, Any]:
        """Pack summary, buses, decode problems, loops and uptime."""
        return self.status_snapshot()

    def status_snapshot(self) -> dict[str, Any]:
        """The status the CLI, the metrics endpoint and the notify STATUS line are made from."""
        return {
            "version": __version__,
            "gateway": self.loaded.config.gateway.id,
            "uptime_s": round(time.monotonic() - self.started_mono, 1),
            "pack": pack_summary(self),
            "buses": [self._bus_status(name) for name in self.adapters],
            "loops": [s.summary() for s in self._all_loops()],
            "healthy": self.healthy,
            "protection": None if self.lane is None else {
                **self.lane.status(), "contactors": self.lane.machine.status(),
                "active_alarms": len(self.lane.protection.active())},
            "simulator": None if self.sim is None else {
                "sim_time_h": round(self.sim.sim.sim_time_s / 3600.0 % 24, 3),
                "faults": list(self.sim.sim.pack.active_faults) + [f"module {m} silent" for m in sorted(self.sim.sim.silent_modules)],
            },
        }

    def _all_loops(self) -> list[LoopStats]:
        return ([self.lane.loop] if self.lane is not None else []) + self.loops

    def _lane(self) -> ProtectionLane:
        if self.lane is None:
            raise ControlError("protection is disabled in the config (protection.enabled = false)")
        return self.lane

    async def cmd_alarms(self, args: dict[str, Any]) -> dict[str, Any]:
        """Active conditions and recent events."""
        lane = self._lane()
        n = int(args.get("recent", 50))
        return {"active": lane.protection.active(), "contactors": lane.machine.status(),
                "recent": [e.as_dict() for e in self.recorder.recent(n)]}

    async def cmd_reset(self, args: dict[str, Any]) -> dict[str, Any]:
        """Request leaving ERROR; refused with the causes that remain."""
        ok, reason = self._lane().machine.reset(bool(args.get("clear_deep_discharge")))
        if not ok:
            raise ControlError(reason)
        return {"ok": ok, "reason": reason}

    async def cmd_contactors(self, args: dict[str, Any]) -> dict[str, Any]:
        """Contactor state, or an open/close request."""
        machine = self._lane().machine
        action = args.get("action")
        if action in ("open", "close"):
            ok, reason = machine.request_open() if action == "open" else machine.request_close()
            if not ok:
                raise ControlError(reason)
        elif action:
            raise ControlError(f"unknown action '{action}' (open or close)")
        fb = {c: self.image.read(f"contactor.{c}").value if f"contactor.{c}" in self.image.scalars else None
              for c in ("main_positive", "main_negative", "precharge")}
        return {**machine.status(), "feedback": fb}

    def _bus_status(self, name: str) -> dict[str, Any]:
        a, ing = self.adapters[name], self.ingests[name]
        return {"name": name, "interface": a.settings.interface, "channel": a.settings.channel,
                "frames_per_s": self.rates[name], **asdict(a.stats),
                "decode_errors": ing.counters.total(),
                "unknown_ids": {f"0x{k & 0x1FFFFFFF:X}": v for k, v in sorted(ing.counters.unknown.items())[:50]}}

    async def cmd_signals(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        """Every signal matching a glob with value, quality, age and timestamp."""
        pattern = str(args.get("glob") or "*")
        img = self.image
        now = time.monotonic()
        names = img.select(pattern)
        if not names:
            raise ControlError(f"no signal matches '{pattern}'")
        idx = np.array([img.index(n) for n in names], dtype=np.intp)
        q = img.quality(idx, now)
        slots = img.slots(idx)
        ages = now - img.rx_mono[slots]
        return [{"name": n, "value": _num(img.value[i]), "quality": Quality(int(qq)).name.lower(),
                 "age_s": _num(a), "timestamp": _num(img.rx_time[s])}
                for n, i, qq, a, s in zip(names, idx, q, ages, slots, strict=True)]

    async def cmd_sim_fault(self, args: dict[str, Any]) -> str:
        if self.sim is None:
            raise ControlError("the gateway is not running the simulator (start it with --sim)")
        if args.get("fault") == "stall_lane":
            # rehearse a hung protection lane: the watchdog stops, the PCU's heartbeat stops
            self._lane().stalled.set()
            return "protection lane stalled (clear with 'sim fault clear')"
        if args.get("fault") == "clear" and self.lane is not None:
            self.lane.stalled.clear()
        try:
            return self.sim.sim.inject(str(args.get("fault", "")), int(args.get("target", 0)), float(args.get("value", 0.0)))
        except (IndexError, ValueError) as exc:
            raise ControlError(str(exc)) from None

    async def stream_candump(self, args: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Live frames of one or all buses, decoded on request."""
        wanted = args.get("bus")
        if wanted and wanted not in self.adapters:
            raise ControlError(f"no bus '{wanted}' (buses: {', '.join(self.adapters)})")
        decode = bool(args.get("decode"))
        taps = [FrameTap(n) for n in self.adapters if not wanted or n == wanted]
        for t in taps:
            self.adapters[t.bus].taps.append(t)
        try:
            while True:
                await anyio.sleep(0.05)
                for t in taps:
                    while t.frames:
                        yield frame_record(t.frames.popleft(), t.bus, self.decoders[t.bus] if decode else None)
        finally:
            for t in taps:
                self.adapters[t.bus].taps.remove(t)


def make_lane(loaded: Loaded, recorder: Recorder, send: Callable[[can.Message], bool]) -> ProtectionLane:
    """Protection, contactor machine and lane of a validated config; ``send`` puts a frame on the contactor bus."""
    cfg = loaded.config
    p = cfg.protection
    bus = cfg.contactor_bus()
    message = next(m for s in loaded.sources if s.bus == bus for m in s.messages if m.name == p.contactor_message)

    def command(values: dict[str, int]) -> bool:
        return send(can.Message(arbitration_id=message.frame_id, data=message.encode(values),
                                is_extended_id=message.is_extended_frame))

    protection = Protection(loaded.image, cfg.limit_table(), p.debounce, p.plausible, recorder, recorder,
                            p.charge_threshold_a, p.lane.tick_ms / 1000.0)
    machine = ContactorMachine(loaded.image, CanContactorDriver(command), p.contactors,
                               DeepDischargeLatch(state_dir(cfg)), recorder, protection.trip_causes)
    protection.on_deep_discharge = machine.latch.set
    return ProtectionLane(protection, machine, recorder, p.lane)


def _num(x: float) -> float | None:
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


def pack_summary(gw: Gateway) -> dict[str, Any]:
    """Pack V/I/P and min/max cell voltage and temperature with their indices."""
    img = gw.image
    now = time.monotonic()
    out: dict[str, Any] = {}
    for key, name in (("voltage_v", "pack.voltage"), ("current_a", "pack.current")):
        if name in img.scalars:
            r = img.read(name, now)
            out[key] = _num(r.value)
            out[key.split("_")[0] + "_quality"] = r.quality.name.lower()
    if out.get("voltage_v") is not None and out.get("current_a") is not None:
        out["power_w"] = round(out["voltage_v"] * out["current_a"], 1)
    for key, family in (("cell_voltage", "cell.voltage"), ("temperature", "module.temperature")):
        values = img.array(family).ravel()
        good = img.family_quality(family, now).ravel() == Quality.GOOD
        out[key] = extremes(values, good)
        if family == "module.temperature" and out[key]["min"] is not None:
            per = max(1, img.families[family].shape[1])
            for k in ("min", "max"):
                out[key][f"{k}_module"] = out[key][f"{k}_index"] // per
    return out


def extremes(values: np.ndarray, good: np.ndarray) -> dict[str, Any]:
    """Min/max over the good values with their indices, and how many are not good."""
    n_bad = int((~good).sum())
    if not good.any():
        return {"min": None, "max": None, "min_index": None, "max_index": None, "not_good": n_bad}
    masked_lo = np.where(good, values, np.inf)
    masked_hi = np.where(good, values, -np.inf)
    lo, hi = int(masked_lo.argmin()), int(masked_hi.argmax())
    return {"min": float(values[lo]), "max": float(values[hi]), "min_index": lo, "max_index": hi,
            "spread": float(values[hi] - values[lo]), "not_good": n_bad}
