"""The P0 process: CAN adapters, decoding, protection and the contactors, isolated from the rest.

The daemon forks this process before it starts any thread or event loop. The
child owns every CAN bus: its receive threads decode into the process image,
which lives in shared memory (so the main process reads the same values without
copies), run the per-sample protection checks and send the trip command; its
supervision thread runs the 10 ms tick. Nothing the main process does (OPC UA,
the cloud link, big encodes, estimators, its garbage collector) shares a GIL or
a heap with this lane. docs/design.md has the measurements behind this choice.

The two processes talk over two pipes: requests from the main process (status,
reset, contactor requests, candump taps, simulator faults) with replies, and a
one-way stream of events and flight records from the lane, sent by a thread of
its own so that a slow reader never blocks protection.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from typing import Any

import can
import numpy as np

from drivers.canbus import CanAdapter
from drivers.sim_eis import SimConditions, SimEis
from drivers.sim_pack import SimPack, SimRunner, virtual_bus_sim
from gateway.config import BusSection, Config, Loaded
from gateway.eis import module_frame_ids
from gateway.events import Event, FlightRecord, Kind, Recorder
from gateway.lane import ProtectionLane
from gateway.limits import LimitTable, validate
from gateway.schema import ConfigError

log = logging.getLogger(__name__)

TAP_QUEUE = 10_000
EVENT_QUEUE = 100_000


class P0Error(Exception):
    """The P0 process refused a request (the reason is for the user) or does not answer."""


class P0Unavailable(P0Error):
    """The P0 process did not answer in time or is gone: nothing was decided (not a refusal)."""


class Outbox:
    """P0's one-way stream of events, flight records and EIS frames to the main process.

    Bounded, so the lane never waits for a busy main process; what does not fit is
    counted by kind (P0 status and metrics), and once the stream catches up the
    main process's recorder gets one event saying how much was lost.
    """

    def __init__(self, size: int) -> None:
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(size)
        self.dropped: dict[str, int] = {}
        self._reported = 0
        self._gone = False  # the main process went away: nothing more can be sent

    def publish(self, kind: str, item: Any) -> None:
        try:
            self._queue.put_nowait((kind, item))
        except queue.Full:
            self.dropped[kind] = self.dropped.get(kind, 0) + 1

    def forward(self, conn: Connection) -> None:
        """Send until the main process goes away (run in a thread of its own)."""
        while True:
            item = self._queue.get()
            try:
                conn.send(item)
                if self._queue.empty():
                    self._report_loss(conn)
            except (OSError, EOFError):
                self._gone = True
                return
            finally:
                self._queue.task_done()

    def drain(self, timeout: float) -> bool:
        """Wait until everything published so far is sent (P0 is about to exit: the stop's trip events
        must reach the main process); False when that took longer than ``timeout``."""
        end = time.monotonic() + timeout
        while self._queue.unfinished_tasks and not self._gone:
            if time.monotonic() > end:
                return False
            time.sleep(0.005)
        return True

    def _report_loss(self, conn: Connection) -> None:
        total = sum(self.dropped.values())
        if total == self._reported:
            return
        lost = ", ".join(f"{n} {kind}" for kind, n in sorted(self.dropped.items()))
        log.warning("the main process did not keep up with P0's events: %d lost so far (%s)", total, lost)
        conn.send(("event", Event(Kind.INFO, "p0_events_dropped", value=float(total),
                                  message=f"P0 dropped what the main process could not take in time: {lost}")))
        self._reported = total


class FrameTap:
    """Collects frames from a receive thread for a live candump without ever blocking it."""

    def __init__(self, bus: str) -> None:
        self.bus = bus
        self.frames: deque[can.Message] = deque()
        self.dropped = 0  # only the receive thread writes it; readers keep their own mark
        self._reported = 0
        self.last_read = time.monotonic()

    def __call__(self, msg: can.Message) -> None:
        if len(self.frames) >= TAP_QUEUE:
            self.dropped += 1
        else:
            self.frames.append(msg)

    def take(self) -> tuple[list[can.Message], int]:
        """The frames queued since the last take, and how many were dropped since then."""
        self.last_read = time.monotonic()
        frames = [self.frames.popleft() for _ in range(len(self.frames))]
        total = self.dropped
        lost, self._reported = total - self._reported, total
        return frames, lost


class P0Core:
    """Everything of the CAN side: adapters, the protection lane, the simulated pack, taps."""

    def __init__(self, loaded: Loaded, simulate: bool, outbox: Outbox) -> None:
        from gateway.daemon import make_lane

        self.loaded = loaded
        self.outbox = outbox
        publish = outbox.publish
        cfg = loaded.config
        self.recorder = Recorder()
        self.recorder.subscribers.append(lambda e: publish("event", e))
        self.recorder.record_subscribers.append(lambda r: publish("record", r))
        self.adapters: dict[str, CanAdapter] = {}
        self.lane: ProtectionLane | None = None
        sinks: dict[str, Callable[[can.Message], object]] = {b.name: loaded.ingests[b.name].on_frame for b in cfg.bus}
        if cfg.protection.enabled:
            bus = cfg.contactor_bus()
            self.lane = make_lane(loaded, self.recorder, lambda msg: self.adapters[bus].send(msg))
            sinks = {b.name: self.lane.sink(b.name, loaded.ingests[b.name], b.fd) for b in cfg.bus}
        if cfg.eis.enabled:
            bus = cfg.eis_bus()
            sinks[bus] = _divert(sinks[bus], module_frame_ids(), lambda msg: publish("eis", msg))
        self.adapters.update({b.name: CanAdapter(b, sinks[b.name]) for b in cfg.bus})
        self.sim: SimRunner[SimPack] | None = None
        self._sim_parts: tuple[Any, ...] = ()
        if simulate:
            self._make_sim()
        self.taps: dict[int, FrameTap] = {}
        self._tap_ids = itertools.count(1)

    def _make_sim(self) -> None:
        cfg = self.loaded.config
        bus = sim_bus(self.loaded)
        sim = cfg.sim
        assert sim is not None
        dbc = self.loaded.dbcs[bus.name][0].path
        runner, notifier, vbus = virtual_bus_sim(
            bus.channel, str(dbc), modules=cfg.site.modules, cells_per_module=cfg.site.cells_per_module,
            sensors_per_module=cfg.site.sensors_per_module, chemistry=cfg.site.chemistry, speed=sim.speed,
            start_hour=sim.start_hour, initial_soc=sim.initial_soc, ambient_c=sim.ambient_c,
            peak_charge_a=sim.peak_charge_a, peak_discharge_a=sim.peak_discharge_a, seed=sim.seed)
        self.sim = runner
        self._sim_parts = (notifier, vbus)
        if cfg.eis.enabled:
            # the module shares the pack's bus connection: one more listener, not one more copy of every frame
            eis = _sim_eis(vbus.send, runner.sim, cfg)
            notifier.add_listener(eis.sim.receive)
            self._sim_parts += (eis,)

    def _sim_runners(self) -> list[SimRunner[Any]]:
        return [p for p in (self.sim, *self._sim_parts) if isinstance(p, SimRunner)]

    def start(self) -> None:
        for adapter in self.adapters.values():
            adapter.start()
        if self.lane is not None:
            self.lane.start()
        for runner in self._sim_runners():
            runner.start()

    def stop(self) -> None:
        """Open the contactors (a gateway that stops supervising must not leave them closed), then stop."""
        if self.lane is not None:
            self.lane.machine.trip("gateway stopping")
            self.lane.stop()
        for runner in self._sim_runners():
            runner.stop()
        for part in self._sim_parts:
            if isinstance(part, can.Notifier):
                part.stop()
            elif isinstance(part, can.BusABC):
                part.shutdown()
        self.sim, self._sim_parts = None, ()
        for adapter in self.adapters.values():
            adapter.stop()

    # -- requests from the main process ----------------------------------------------------

    def handle(self, cmd: str, args: dict[str, Any]) -> Any:
        fn = getattr(self, f"req_{cmd}", None)
        if fn is None:
            raise P0Error(f"unknown P0 request '{cmd}'")
        return fn(args)

    def _lane(self) -> ProtectionLane:
        if self.lane is None:
            raise P0Error("protection is disabled in the config (protection.enabled = false)")
        return self.lane

    def req_status(self, args: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "buses": [{"name": n, "interface": a.settings.interface, "channel": a.settings.channel, "alive": a.alive,
                       **asdict(a.stats), "decode_errors": self.loaded.ingests[n].counters.total(),
                       "remote_frames": sum(self.loaded.ingests[n].counters.remote.values()),
                       "unknown_ids": {f"0x{k & 0x1FFFFFFF:X}": v for k, v in
                                       sorted(self.loaded.ingests[n].counters.unknown.items())[:50]}}
                      for n, a in self.adapters.items()],
            "protection": None, "loops": [], "healthy": all(a.alive for a in self.adapters.values()),
            "simulator": None, "events_dropped": dict(self.outbox.dropped),
        }
        if self.lane is not None:
            out["protection"] = {**self.lane.status(), "contactors": self.lane.machine.status(),
                                 "active_alarms": len(self.lane.protection.active())}
            out["loops"] = [self.lane.loop.summary()]
            out["healthy"] = self.lane.healthy
        if self.sim is not None:
            sim = self.sim.sim
            out["simulator"] = {"sim_time_h": round(sim.sim_time_s / 3600.0 % 24, 3),
                                "cpu_s": sum(r.cpu_s for r in self._sim_runners()), "tick_errors": sim.tick_errors,
                                "faults": list(sim.pack.active_faults) +
                                [f"module {m} silent" for m in sorted(sim.silent_modules)]}
        return out

    def req_alarms(self, args: dict[str, Any]) -> dict[str, Any]:
        lane = self._lane()
        return {"active": lane.protection.active(), "contactors": lane.machine.status()}

    def req_reset(self, args: dict[str, Any]) -> dict[str, Any]:
        clear = args.get("clear_deep_discharge", False)
        if not isinstance(clear, bool):  # never bool(): "false" would clear the deep-discharge latch
            raise P0Error(f"'clear_deep_discharge' must be true or false, not {clear!r:.40}")
        ok, reason = self._lane().machine.reset(clear)
        if not ok:
            raise P0Error(reason)
        return {"ok": ok, "reason": reason}

    def req_contactors(self, args: dict[str, Any]) -> dict[str, Any]:
        machine = self._lane().machine
        action = args.get("action")
        if action in ("open", "close"):
            ok, reason = machine.request_open() if action == "open" else machine.request_close()
            if not ok:
                raise P0Error(reason)
        elif action:
            raise P0Error(f"unknown action '{action}' (open or close)")
        return machine.status()

    def req_limits(self, args: dict[str, Any]) -> LimitTable:
        return self._lane().protection.limits

    def req_set_limits(self, args: dict[str, Any]) -> str:
        """Remote limit changes: checked again here against the fixed hardware limits, never wider."""
        table = args["table"]
        if not isinstance(table, LimitTable):
            raise P0Error("set_limits needs a LimitTable")
        problems = validate(table, self.loaded.config.hardware())
        if problems:
            raise P0Error("; ".join(problems))
        self._lane().protection.set_limits(table)
        return "limits applied"

    def req_balancing(self, args: dict[str, Any]) -> int:
        """Send the balancing masks (one frame per module, the module units stop on their own after 3 s)."""
        bus = self.loaded.config.contactor_bus()
        msg = next((m for s in self.loaded.sources if s.bus == bus for m in s.messages if m.name == "BALANCING_Command"),
                   None)
        if msg is None:
            raise P0Error(f"bus '{bus}' has no BALANCING_Command in its DBC: this pack cannot balance on command")
        sent = 0
        for module, mask in enumerate(args["masks"]):
            signal = f"BalancingMask{module:02d}"
            if not any(s.name == signal for s in msg.signals):
                continue
            data = msg.encode({"BalancingModule": module, signal: int(mask)})
            sent += self.adapters[bus].send(can.Message(arbitration_id=msg.frame_id, data=data,
                                                        is_extended_id=msg.is_extended_frame))
        return sent

    def req_eis_send(self, args: dict[str, Any]) -> int:
        """Frames of the EIS coordinator (main process) onto the module's bus."""
        bus = self.loaded.config.eis_bus()
        return sum(bool(self.adapters[bus].send(msg)) for msg in args["frames"])

    def req_sim_fault(self, args: dict[str, Any]) -> str:
        if self.sim is None:
            raise P0Error("the gateway is not running the simulator (start it with --sim)")
        fault, target, value = args.get("fault", ""), args.get("target", 0), args.get("value", 0.0)
        if not isinstance(fault, str):
            raise P0Error(f"'fault' must be a string, not {fault!r:.40}")
        if not isinstance(target, int) or isinstance(target, bool):
            raise P0Error(f"'target' must be an integer index, not {target!r:.40}")
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise P0Error(f"'value' must be a number, not {value!r:.40}")
        if fault == "stall_lane":
            # rehearse a hung protection lane: the watchdog stops, the PCU's heartbeat stops
            self._lane().stalled.set()
            return "protection lane stalled (clear with 'sim fault clear')"
        if fault == "clear" and self.lane is not None:
            self.lane.stalled.clear()
        try:
            return self.sim.sim.inject(fault, target, float(value))
        except (IndexError, ValueError, OverflowError) as exc:
            raise P0Error(str(exc)) from None

    def req_tap_open(self, args: dict[str, Any]) -> int:
        wanted = args.get("bus")
        if wanted is not None and not isinstance(wanted, str):
            raise P0Error(f"'bus' must be a bus name, not {wanted!r:.40}")
        if wanted and wanted not in self.adapters:
            raise P0Error(f"no bus '{wanted}' (buses: {', '.join(self.adapters)})")
        tap_id = next(self._tap_ids)
        for name in [wanted] if wanted else list(self.adapters):
            tap = FrameTap(name)
            self.taps[tap_id * 100 + len(self.taps)] = tap
            self.adapters[name].taps.append(tap)
        return tap_id

    def req_tap_read(self, args: dict[str, Any]) -> dict[str, Any]:
        frames: list[tuple[str, can.Message]] = []
        dropped: dict[str, int] = {}
        for _key, tap in self._taps_of(int(args["id"])):
            got, lost = tap.take()
            frames += [(tap.bus, m) for m in got]
            if lost:
                dropped[tap.bus] = lost
        self._reap_taps()
        return {"frames": frames, "dropped": dropped}

    def req_tap_close(self, args: dict[str, Any]) -> None:
        for key, tap in self._taps_of(int(args["id"])):
            self._drop_tap(key, tap)

    def _taps_of(self, tap_id: int) -> list[tuple[int, FrameTap]]:
        return [(k, t) for k, t in self.taps.items() if k // 100 == tap_id]

    def _drop_tap(self, key: int, tap: FrameTap) -> None:
        with contextlib.suppress(ValueError):
            self.adapters[tap.bus].taps.remove(tap)
        self.taps.pop(key, None)

    def _reap_taps(self) -> None:
        # a candump client that vanished without closing its tap
        for key, tap in list(self.taps.items()):
            if time.monotonic() - tap.last_read > 10:
                self._drop_tap(key, tap)


def _divert(sink: Callable[[can.Message], object], ids: frozenset[int],
            other: Callable[[can.Message], object]) -> Callable[[can.Message], object]:
    """A bus sink that hands the EIS module's frames to ``other`` and everything else to ``sink``."""

    def divert(msg: can.Message) -> object:
        if msg.arbitration_id in ids and not msg.is_extended_id:
            return other(msg)
        return sink(msg)

    return divert


def _sim_eis(send: Callable[[can.Message], object], pack: SimPack, cfg: Config) -> SimRunner[SimEis]:
    """The simulated EIS module, measuring the simulated pack's true cells."""
    site = cfg.site
    assert cfg.sim is not None

    def conditions(target_type: int, index: int) -> SimConditions:
        b = pack.pack
        temps, socs = b.cell_temps_c.ravel(), b.soc.ravel()
        cells = slice(index, index + 1) if target_type == 0 else \
            slice(index * site.cells_per_module, (index + 1) * site.cells_per_module)
        return SimConditions(float(np.mean(temps[cells])), float(np.mean(socs[cells])), b.current_a)

    node = SimEis(send, chemistry=site.chemistry, cells=site.cells, modules=site.modules,
                  cells_per_module=site.cells_per_module, conditions=conditions, speed=cfg.sim.eis_speed,
                  seed=cfg.sim.seed)
    return SimRunner(node, "sim-eis")


def enter_realtime(priority: int) -> tuple[bool, str]:
    """Put this process under SCHED_FIFO (threads started later inherit it): (done as configured, what happened).

    Called in P0 before it starts a thread. Without the privilege (the unit's LimitRTPRIO, or
    CAP_SYS_NICE) P0 keeps normal scheduling and says how to grant it: protection still runs,
    with the latency of a shared CPU (docs/design.md).
    """
    if priority <= 0:
        return True, "P0 under normal scheduling (protection.realtime_priority = 0)"
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except OSError as exc:  # EPERM without the privilege
        return False, (f"P0 could not take real-time priority {priority} ({exc.strerror or exc}): it runs under "
                       f"normal scheduling; allow it with LimitRTPRIO={priority} in the unit, or set "
                       f"protection.realtime_priority = 0")
    return True, f"P0 under SCHED_FIFO priority {priority}"


def sim_bus(loaded: Loaded) -> BusSection:
    """The bus ``--sim`` runs the simulated pack on; ConfigError when this config cannot run it.

    Checked before the daemon claims its socket and forks P0 (a bad config: exit 2, no bus opened),
    and again in P0.
    """
    cfg = loaded.config
    sim = cfg.sim
    if sim is None:
        raise ConfigError(loaded.path, "sim", "--sim needs a [sim] section in the config")
    bus = next(b for b in cfg.bus if b.name == sim.bus)
    if bus.interface != "virtual":
        raise ConfigError(loaded.path, "sim.bus",
                          f"--sim runs the simulated pack on a 'virtual' bus; bus '{bus.name}' is '{bus.interface}'")
    return bus


def _child(loaded: Loaded, simulate: bool, rpc: Connection, events: Connection) -> None:
    """The P0 process's main function (after fork); exits the process when done."""
    # the main process decides when to stop: Ctrl-C and a dropped SSH session (SIGHUP to the terminal's
    # process group) reach it as well, and it stops P0 (contactors open first); dying here would skip the trip
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    outbox = Outbox(EVENT_QUEUE)
    code = 0
    core: P0Core | None = None
    forwarding = False
    try:
        sys.setswitchinterval(loaded.config.protection.switch_interval_ms / 1000.0)
        ok, how = enter_realtime(loaded.config.protection.realtime_priority)
        log.log(logging.INFO if ok else logging.WARNING, "%s", how)
        core = P0Core(loaded, simulate, outbox)
        gc.collect()
        gc.freeze()  # start-up objects are never garbage: keep them out of every collection
        threading.Thread(target=outbox.forward, args=(events,), name="p0-events", daemon=True).start()
        forwarding = True
        core.start()
        _serve_requests(core, rpc, stopping)
    except Exception:
        log.exception("P0 process failed")
        code = 1
    finally:
        # whatever ended the loop (stop, main process gone, a failure), the contactors open
        if core is not None:
            try:
                core.stop()
            except Exception:
                log.exception("P0 stop failed")
                code = 1
        # the trip's events go to the main process (its recorder, the cloud buffer) before this process ends
        if forwarding and not outbox.drain(2.0):
            log.warning("P0 stopped before the main process took all of its events")
        for h in logging.getLogger().handlers:
            h.flush()
        os._exit(code)


def _serve_requests(core: P0Core, rpc: Connection, stopping: threading.Event) -> None:
    """Answer the main process until it says stop or goes away (an answer it cannot take: gone)."""
    parent = os.getppid()
    while not stopping.is_set():
        if os.getppid() != parent:
            log.error("the gateway's main process is gone: stopping the CAN side")
            return
        try:
            if not rpc.poll(0.2):
                continue
            req_id, cmd, args, deadline = rpc.recv()
            if cmd == "stop":
                rpc.send((req_id, True, None))
                return
            try:
                if time.monotonic() > deadline:  # its caller gave up: a late open/close or limit change is not wanted
                    raise P0Error(f"'{cmd}' withdrawn: it waited beyond its caller's timeout")
                reply = (req_id, True, core.handle(cmd, args))
            except (P0Error, ConfigError) as exc:
                reply = (req_id, False, str(exc))
            except Exception as exc:  # a bug in one request must not take protection down
                log.exception("P0 request %s failed", cmd)
                reply = (req_id, False, f"internal error: {exc}")
            rpc.send(reply)
        except (EOFError, OSError):
            log.error("the gateway's main process is gone (its pipe closed): stopping the CAN side")
            return


class RpcClient:
    """Requests over a pipe, one at a time, each bounded by its timeout (the wait for its turn included).

    Without the bound, callers queue behind a P0 that hangs and each waits for all
    those before it: a status request would take the sum of their timeouts. Each
    request carries its deadline, and P0 drops the ones it reads too late, so a
    timeout means "not done", never "done later".
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def call(self, cmd: str, args: dict[str, Any] | None, timeout: float) -> Any:
        """Send one request and wait for its reply; P0Error when refused, late or gone."""
        end = time.monotonic() + timeout
        late = P0Unavailable(f"the P0 process did not answer '{cmd}' within {timeout} s")
        if not self._lock.acquire(timeout=timeout):
            raise late
        try:
            req_id = next(self._ids)
            try:
                self._conn.send((req_id, cmd, args or {}, end))  # one CLOCK_MONOTONIC for both processes
            except (OSError, ValueError) as exc:
                raise P0Unavailable(f"the P0 process is gone ({exc})") from None
            while True:
                left = end - time.monotonic()
                try:
                    if left <= 0 or not self._conn.poll(left):
                        raise late
                    got_id, ok, result = self._conn.recv()
                except (EOFError, OSError) as exc:
                    raise P0Unavailable(f"the P0 process is gone ({exc or 'pipe closed'})") from None
                if got_id == req_id:
                    break  # older replies (after a timeout) are dropped
        finally:
            self._lock.release()
        if not ok:
            raise P0Error(result)
        return result

    def close(self) -> None:
        self._conn.close()


class P0Process:
    """The main process's handle on the P0 process: fork, requests, events, liveness."""

    def __init__(self, loaded: Loaded, simulate: bool, recorder: Recorder, close_in_child: tuple[int, ...] = ()) -> None:
        """Fork P0; ``close_in_child``: descriptors of the main process P0 must not keep (the control socket)."""
        rpc_here, rpc_there = Pipe(duplex=True)
        ev_here, ev_there = Pipe(duplex=False)
        self.pid = os.fork()
        if self.pid == 0:
            rpc_here.close()
            ev_here.close()
            for fd in close_in_child:
                with contextlib.suppress(OSError):
                    os.close(fd)
            _child(loaded, simulate, rpc_there, ev_there)
        rpc_there.close()
        ev_there.close()
        # on a 2-core box everything competes for the CPU: the scheduler should prefer P0
        # (raising P0's priority needs privileges; lowering our own does not)
        os.nice(loaded.config.protection.main_process_nice)
        self._rpc = RpcClient(rpc_here)
        self._events = ev_here
        self.recorder = recorder
        self.on_eis_frame: Callable[[can.Message], None] | None = None  # the EIS coordinator's, once it exists
        self.exit_code: int | None = None
        self._reap_lock = threading.Lock()  # alive is asked from the event loop and from stop() in a thread
        self._reader = threading.Thread(target=self._read_events, name="p0-events-in", daemon=True)
        self._reader.start()

    def _read_events(self) -> None:
        while True:
            try:
                kind, item = ev = self._events.recv()
            except (EOFError, OSError):
                return
            if kind == "event" and isinstance(item, Event):
                self.recorder(item)
            elif kind == "record" and isinstance(item, FlightRecord):
                self.recorder.add_flight_record(item)
            elif kind == "eis" and isinstance(item, can.Message):
                if self.on_eis_frame is not None:
                    self.on_eis_frame(item)
            else:
                log.warning("unexpected message from P0: %r", ev[:1])

    @property
    def alive(self) -> bool:
        with self._reap_lock:
            if self.exit_code is not None:
                return False
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == 0:
                return True
            self.exit_code = os.waitstatus_to_exitcode(status)
            return False

    def call(self, cmd: str, args: dict[str, Any] | None = None, timeout: float = 3.0) -> Any:
        """A request to the P0 process; P0Error when refused or when it does not answer in time."""
        return self._rpc.call(cmd, args, timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the P0 process to open the contactors and stop; kill it if it does not."""
        if self.alive:
            with contextlib.suppress(P0Error):
                self.call("stop", timeout=2.0)
            end = time.monotonic() + timeout
            while self.alive and time.monotonic() < end:
                time.sleep(0.05)
            if self.alive:
                log.error("P0 process did not stop: killing it")
                os.kill(self.pid, signal.SIGKILL)
                while self.alive:
                    time.sleep(0.01)
        # P0 has ended: what it sent last (the trip's events) is still in the pipe; the reader
        # hands it to the recorder and ends at the pipe's end
        self._reader.join(5.0)
        self._rpc.close()
        self._events.close()
