"""The gateway daemon's main process: control socket, loops, metrics, systemd notify.

The CAN side (adapters, decoding, protection, contactors, the simulated pack)
runs in the P0 process (gateway/p0.py), forked before anything else starts; this
process reads the process image from shared memory and talks to P0 over pipes.
"""

from __future__ import annotations

import fcntl
import gc
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import can
import numpy as np

from drivers.eis_driver import load_eis_dbc
from gateway import __version__
from gateway.config import Loaded, socket_path, state_dir
from gateway.contactors import CanContactorDriver, ContactorMachine
from gateway.control import ControlError, ControlServer, NotAnswered, arg_bool, arg_int, arg_str
from gateway.decode import Decoder, frame_record
from gateway.estimation import Estimation
from gateway.events import Recorder
from gateway.image import ProcessImage, Quality
from gateway.lane import ProtectionLane
from gateway.limits import LevelOverride, LimitTable, validate, with_overrides
from gateway.loops import LoopStats, run_periodic
from gateway.metrics import serve as serve_metrics
from gateway.notify import Notifier
from gateway.p0 import P0Error, P0Process, P0Unavailable, sim_bus
from gateway.pipeline import TEMPERATURE_FAMILIES
from gateway.protection import Protection
from gateway.safety import PERIOD_S as SAFETY_PERIOD_S
from gateway.safety import SafetyIndicators

if TYPE_CHECKING:
    from cloudlink.link import CloudLink
    from gateway.eis import EisService
    from gateway.opcua_server import OpcuaServer

log = logging.getLogger(__name__)

RATE_PERIOD_S = 1.0
# P0 answers a status every RATE_PERIOD_S; one older than this means P0 does not answer: the gateway is
# unhealthy (no watchdog ping, well within WatchdogSec = 5) and OPC UA shows the states from it Uncertain
P0_STATUS_MAX_AGE_S = 2.5
# the simulated module's SoT calibration child takes about 2 s; one that runs this long is stuck
SIM_CALIBRATION_TIMEOUT_S = 120.0
# what the calibration child runs: it dies with the thread that started it (the event loop's, which lives
# as long as this process), so a SIGKILLed gateway leaves no calibration behind; then gateway.eis's __main__
_CALIBRATION_CHILD = """
import ctypes, os, runpy, signal, sys
parent = int(sys.argv.pop(1))
if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
if os.getppid() != parent:
    sys.exit("the gateway that started this calibration is gone")
runpy.run_module("gateway.eis", run_name="__main__", alter_sys=True)
"""


class Gateway:
    """Everything the daemon runs, built from a validated config."""

    def __init__(self, loaded: Loaded, simulate: bool = False) -> None:
        """ConfigError when ``simulate`` and the config cannot run the simulator (before any bus is opened)."""
        if simulate:
            sim_bus(loaded)
        self.loaded = loaded
        self.simulate = simulate
        self.image = loaded.image
        eis_bus = loaded.config.eis_bus() if loaded.config.eis.enabled else None
        # candump decodes the EIS module's frames too (they are not in the bus's own DBCs)
        self.decoders = {s.bus: Decoder([*s.messages, *(load_eis_dbc().messages if s.bus == eis_bus else ())])
                         for s in loaded.sources}
        self.recorder = Recorder()
        self.p0: P0Process | None = None
        self.started_mono = time.monotonic()
        self.notifier = Notifier()
        self.loops = [LoopStats("bus-rates", RATE_PERIOD_S, "P3"),
                      LoopStats("watchdog", self.notifier.watchdog_s / 3 if self.notifier.watchdog_s else 5.0, "P3")]
        self.rates: dict[str, float] = {b.name: 0.0 for b in loaded.config.bus}
        cfg = loaded.config
        est = cfg.estimators
        self.estimation: Estimation | None = None
        self.safety: SafetyIndicators | None = None
        if est.enabled:
            self.estimation = Estimation(est, cfg.site.chemistry, self.image, cfg.site.cells_per_module,
                                         state_dir(cfg), cfg.limit_table().deep_discharge_v, cfg.hardware())
            self.loops += [LoopStats("limits", est.limits_period_ms / 1000.0, "P1"),
                           LoopStats("soc", est.soc_period_ms / 1000.0, "P2"),
                           LoopStats("persist", est.persist_s, "P3"),
                           LoopStats("balancing", 1.0, "P1"),
                           LoopStats("safety", SAFETY_PERIOD_S, "P2")]
            self.safety = SafetyIndicators(self.image, cfg.site, self.estimation.inputs,
                                           self.estimation.plating)
        self._bleeding = False
        self._scope: anyio.CancelScope | None = None  # the running task group's, once it runs
        self._stopping = False  # shutdown began: P0 is stopped on purpose
        self._p0_lost = False  # P0 ended without being asked: the daemon exits 1
        self._last_frames: dict[str, tuple[float, int]] = {}
        self._p0_status: dict[str, Any] = {}
        self._p0_status_mono = -math.inf  # monotonic time of the last status P0 answered
        self._cloud_status: dict[str, Any] | None = None  # refreshed on the loop
        self.limits = cfg.limit_table()  # the table in force in P0 (remote changes update it)
        # OPC UA writes and cloud changes run in worker threads: one read-modify-write at a time
        self.limits_lock = threading.Lock()
        # created after the fork (start_northbound): the P0 process never carries asyncua or MQTT
        self.cloud: CloudLink | None = None
        self.opcua: OpcuaServer | None = None
        self.eis: EisService | None = None
        self.control = ControlServer(socket_path(loaded.config), {
            "status": self.cmd_status, "signals": self.cmd_signals, "sim.fault": self.cmd_sim_fault,
            "version": self.cmd_version, "alarms": self.cmd_alarms, "reset": self.cmd_reset,
            "contactors": self.cmd_contactors, "cloud.status": self.cmd_cloud_status, "balance": self.cmd_balance,
            "eis.sweep": self.cmd_eis_sweep, "eis.status": self.cmd_eis_status, "eis.show": self.cmd_eis_show,
            "eis.cancel": self.cmd_eis_cancel,
        }, {"candump": self.stream_candump})

    def _cloud_handlers(self) -> dict[str, Any]:
        """What cloud commands may do: the same functions the CLI uses, nothing else."""
        h: dict[str, Any] = {}
        if self.loaded.config.protection.enabled:
            h["reset_error"] = self._remote_reset
            h["set_protection_limits"] = LimitsStage(self)
        if self.estimation is not None:
            h["set_ecm_parameters"] = EcmStage(self.estimation)
            h["set_estimator_settings"] = SettingsStage(self.estimation)
            h["request_balancing"] = self._remote_balancing
        if self.loaded.config.eis.enabled:
            h["start_eis_sweep"] = self._remote_eis_sweep
        return h

    def _opcua_reset(self, clear_deep_discharge: bool) -> tuple[bool, str]:
        assert self.p0 is not None
        if not isinstance(clear_deep_discharge, bool):  # the method's argument is a Boolean: anything else is refused
            return False, "ClearDeepDischarge must be a Boolean"
        try:
            res = self.p0.call("reset", {"clear_deep_discharge": clear_deep_discharge})
        except P0Error as exc:
            return False, str(exc)
        return True, str(res.get("reason", "reset"))

    def _opcua_write_setting(self, name: str, value: Any) -> tuple[bool, str]:
        """An engineer's write of Limits.<Check>.<LEVEL> or Limits.DeepDischargeVoltage: never beyond the hardware."""
        with self.limits_lock:
            return self._write_limit(name, value)

    def _write_limit(self, name: str, value: Any) -> tuple[bool, str]:
        parts = name.split(".")
        check = next((c for c in self.limits.as_dict() if len(parts) > 1 and c.replace("_", "").lower() == parts[1].lower()),
                     None)
        try:
            if name == "Limits.DeepDischargeVoltage":
                new = with_overrides(self.limits, {}, float(value))
            elif len(parts) == 3 and check is not None and parts[2].lower() in ("mol", "rsl", "msl"):
                new = with_overrides(self.limits, {check: LevelOverride(**{parts[2].lower(): float(value)})})
            else:
                return False, f"{name}: not a setting of this gateway"
        except ValueError as exc:
            return False, str(exc)
        problems = validate(new, self.loaded.config.hardware())
        if problems:
            return False, problems[0]
        assert self.p0 is not None
        try:
            reason = self.p0.call("set_limits", {"table": new})
        except P0Error as exc:
            return False, str(exc)
        self.limits = new
        return True, str(reason)

    def _opcua_diagnostics(self) -> dict[str, Any]:
        st = self._p0_status
        own = getattr(self.opcua, "loop", None)
        return {"loops": st.get("loops", []) + [s.summary() for s in self.loops if s is not own],
                "buses": [{"frames_per_s": self.rates.get(b["name"], 0.0), **b} for b in st.get("buses", [])],
                "healthy": self.healthy, "uptime_s": round(time.monotonic() - self.started_mono, 1),
                "protection": st.get("protection"), "cloud": self._cloud_status}

    def _opcua_estimates(self) -> dict[str, Any]:
        prot = self._p0_status.get("protection") or {}
        state = (prot.get("contactors") or {}).get("state")
        out: dict[str, Any] = {} if self.eis is None else self.eis.estimates()
        if state:
            out["pack.contactor_state"] = str(state)
            out["pack.bms_state"] = "error" if state == "ERROR" else "derate" if self._derate() else "normal"
            if self._p0_status_age() > P0_STATUS_MAX_AGE_S:  # P0 hangs: the last known states
                out["stale"] = {"pack.contactor_state", "pack.bms_state"}
        e = self.estimation
        if e is not None and e.initialised:
            pack = e.ekf.pack()
            out.update({"pack.soc": pack.soc * 100.0, "pack.soe": pack.soe * 100.0, "cell.soc": e.ekf.soc * 100.0})
            if e.limits is not None:
                out.update({"pack.charge_current_limit": e.limits.charge_current_a,
                            "pack.discharge_current_limit": e.limits.discharge_current_a,
                            "pack.charge_voltage_limit": e.limits.charge_voltage_v,
                            "pack.discharge_voltage_limit": e.limits.discharge_voltage_v})
            pp = e.passport.summary()
            out.update({"pack.ah_charged": pp["charge_ah"], "pack.ah_discharged": pp["discharge_ah"],
                        "pack.kwh_charged": pp["energy_in_wh"] / 1000.0, "pack.kwh_discharged": pp["energy_out_wh"] / 1000.0,
                        "pack.equivalent_full_cycles": pp["full_equivalent_cycles"],
                        "pack.deep_discharge_events": pp["deep_discharge_events"]})
        return out

    def _eis_sweep(self, target: str, **overrides: Any) -> tuple[bool, str]:
        """One on-demand sweep (CLI, OPC UA); the cloud's several at once are :meth:`_remote_eis_sweep`."""
        if self.eis is None:
            return False, "this gateway has no EIS module (eis.enabled = false)"
        ok, reason, _handle = self.eis.request(target, **overrides)
        return ok, reason

    def _remote_eis_sweep(self, args: dict[str, Any]) -> tuple[bool, str]:
        targets = [f"cell[{i}]" for i in args["cells"] or []] + [f"module[{i}]" for i in args["modules"] or []]
        overrides = {"f_start_hz": args["f_max_hz"], "f_stop_hz": args["f_min_hz"],
                     "points_per_decade": args["points_per_decade"], "amplitude_a": args["amplitude_a"] or 0.0}
        if self.eis is None:
            return False, "this gateway has no EIS module (eis.enabled = false)"
        handles: list[int] = []
        for target in targets:
            ok, reason, handle = self.eis.request(target, **overrides)
            if not ok:
                # all or nothing: "rejected" must not leave part of the command queued (the queue
                # holds fewer requests than the cloud may name targets)
                for h in handles:
                    self.eis.cancel(h)
                return False, f"{target}: {reason}; none of the {len(targets)} sweeps was queued"
            handles.append(handle)
        return True, f"{len(targets)} sweeps queued"

    def _remote_balancing(self, args: dict[str, Any]) -> tuple[bool, str]:
        if args.get("cells") and len(args["cells"]) != self.image.families["cell.voltage"].size:
            return False, "this gateway balances the whole string: send no 'cells' (it picks the cells above the band)"
        return self._balancing(True, args.get("max_duration_s"), args.get("stop_spread_v"))

    async def _remote_reset(self, args: dict[str, Any]) -> tuple[bool, str]:
        try:
            res = await self._p0("reset", {"clear_deep_discharge": arg_bool(args, "clear_deep_discharge")})
        except (ControlError, NotAnswered) as exc:
            return False, str(exc)
        return True, str(res["reason"])

    def start_northbound(self) -> None:
        """Create the cloud link, the EIS coordinator and the OPC UA server (in the main process, after the fork)."""
        cfg = self.loaded.config
        loaded = self.loaded
        if cfg.cloud.enabled:
            from cloudlink.link import CloudLink, catalogue_from_sources, dbc_hash

            self.cloud = CloudLink(cfg.cloud, self.image, self.recorder, self._cloud_handlers(), state_dir(cfg),
                                   cfg.gateway.id, cfg.gateway.site, catalogue=catalogue_from_sources(loaded.sources),
                                   dbc_hash=dbc_hash(d.path for ds in loaded.dbcs.values() for d in ds),
                                   hardware_limits=cfg.hardware(), current_limits=lambda: self.limits)
            self.loops += self.cloud.loops
        if cfg.eis.enabled:
            self._start_eis()
        if cfg.opcua.enabled:
            from gateway.opcua_server import OpcuaServer, limit_settings

            prot = cfg.protection.enabled
            self.opcua = OpcuaServer(
                cfg.opcua, self.image, cfg.site, self.recorder, state_dir(cfg),
                methods={"ResetError": self._opcua_reset, "RequestBalancing": self._balancing,
                         "StartEisSweep": self._eis_sweep},
                limits=lambda: self.limits.as_dict(),
                diagnostics=self._opcua_diagnostics,
                write_setting=self._opcua_write_setting if prot else None,
                settings=limit_settings(self.limits.as_dict(), cfg.hardware()) if prot else (),
                estimates=self._opcua_estimates,
                gateway_id=cfg.gateway.id, site=cfg.gateway.site)
            self.loops.append(self.opcua.loop)

    def _start_eis(self) -> None:
        from gateway.eis import TICK_S, EisService, load_calibration

        cfg = self.loaded.config
        p0 = self.p0
        assert p0 is not None
        est = self.estimation
        self.eis = EisService(
            cfg.eis, cfg.site, self.image, self.recorder, send=lambda frames: p0.call("eis_send", {"frames": frames}),
            soc=lambda: est.ekf.soc if est is not None and est.initialised else None,
            record=None if self.cloud is None else self.cloud.submit_eis,
            calibration=load_calibration(Path(cfg.eis.sot_calibration)) if cfg.eis.sot_calibration else None)
        p0.on_eis_frame = self.eis.on_frame
        self.loops.append(LoopStats("eis", TICK_S, "P2"))

    async def _simulated_eis_calibration(self) -> None:
        """--sim without a calibration file: calibrate SoT on the simulated module, as its maker's lab would.

        The calibration runs in a child process (``python -m gateway.eis``: the ~8 MB its spectra take go
        back to the system with it), bounded by SIM_CALIBRATION_TIMEOUT_S, killed when the daemon stops
        and when the daemon dies (PR_SET_PDEATHSIG).
        """
        from gateway.eis import load_calibration

        eis = self.eis
        cfg = self.loaded.config
        if eis is None or eis.calibration is not None or not self.simulate:
            return
        e = cfg.eis
        cache = state_dir(cfg) / (f"sot_calibration_sim_{cfg.site.chemistry.lower()}_"
                                  f"{e.f_start_hz:g}-{e.f_stop_hz:g}-{e.points_per_decade}.json")
        chemistry, sweep = cfg.site.chemistry, cfg.eis.sweep()
        try:
            try:
                cal = load_calibration(cache)
            except ValueError:  # none yet (or unreadable): make it
                cal = None
            if cal is None or cal.chemistry != chemistry:
                with anyio.fail_after(SIM_CALIBRATION_TIMEOUT_S):
                    # run_process kills the child when this task is cancelled (shutdown) or times out
                    await anyio.run_process([sys.executable, "-c", _CALIBRATION_CHILD, str(os.getpid()), chemistry,
                                             str(sweep.f_start_hz), str(sweep.f_stop_hz),
                                             str(sweep.points_per_decade), str(cache)])
                cal = load_calibration(cache)
            eis.calibration = cal
        except TimeoutError:
            log.warning("no SoT: the simulated module's calibration took longer than %.0f s", SIM_CALIBRATION_TIMEOUT_S)
            return
        except subprocess.CalledProcessError as exc:
            why = (exc.stderr or b"").decode(errors="replace").strip().splitlines()
            log.warning("no SoT: the simulated module's calibration failed (exit code %s%s)", exc.returncode,
                        f": {why[-1]}" if why else "")
            return
        except (OSError, ValueError) as exc:
            log.warning("no SoT: the simulated module's calibration failed (%s)", exc)
            return
        log.info("SoT calibration of the simulated %s module: %s (cross-validated %.2f degC)", cfg.site.chemistry,
                 eis.calibration.feature.label(), eis.calibration.cv_rmse_c)

    async def _eis_step(self) -> None:
        assert self.eis is not None
        prot = self._p0_status.get("protection") or {}
        active = bool(prot.get("active_alarms")) or (prot.get("contactors") or {}).get("state") == "ERROR"
        await self.eis.step(active)

    def claim(self) -> None:
        """Refuse to run beside another gateway with the same state directory or control socket.

        Called before P0 opens any bus. The lock file stays locked while this process or P0 lives
        (P0 inherits it), so a gateway whose P0 still drives the contactors is never joined.
        """
        folder = state_dir(self.loaded.config)
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / "bmsgw.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ControlError(f"another gateway is running with the state directory {folder}") from None
        self._lock_fd = fd
        # bound and listening from here on: a second gateway with another state directory but this socket
        # is refused here too, before it forks P0 (ControlServer.serve accepts on this socket)
        self.control.claim()

    def start_p0(self) -> P0Process:
        """Fork the P0 process: before any thread or event loop of this process exists."""
        listener = self.control.fileno()
        self.p0 = P0Process(self.loaded, self.simulate, self.recorder,
                            close_in_child=() if listener is None else (listener,))
        return self.p0

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT/SIGHUP or until the P0 process dies; everything is stopped on the way out.

        On a signal P0 stops first (the contactors open), then the rest (the cloud link's final flush,
        which then holds P0's stop events, the estimator state); SystemExit(1) when P0 ended by itself.
        """
        p0 = self.p0 or self.start_p0()
        self.start_northbound()
        gc.collect()
        gc.freeze()  # the start-up heap (asyncua's address space included) stays out of every collection
        try:
            await self._refresh()
            async with anyio.create_task_group() as tg:
                self._scope = tg.cancel_scope
                await tg.start(self.control.serve)
                if self.loaded.config.metrics.enabled:
                    await tg.start(serve_metrics, self.loaded.config.metrics, self.status_snapshot)
                tg.start_soon(run_periodic, self.loops[0], self._refresh)
                tg.start_soon(run_periodic, self.loops[1], self._feed_watchdog)
                if self.estimation is not None:
                    e = self.estimation
                    tg.start_soon(run_periodic, self.loops[2], lambda: e.step_limits(self._derate()))
                    tg.start_soon(run_periodic, self.loops[3], e.step_soc)
                    tg.start_soon(run_periodic, self.loops[4], lambda: anyio.to_thread.run_sync(e.persist))
                    tg.start_soon(run_periodic, self.loops[5], self._balance_step)
                    tg.start_soon(run_periodic, self.loops[6], self._safety_step)
                if self.cloud is not None:
                    tg.start_soon(self.cloud.run)
                if self.eis is not None:
                    tg.start_soon(run_periodic, next(s for s in self.loops if s.name == "eis"), self._eis_step)
                    tg.start_soon(self._simulated_eis_calibration)
                if self.opcua is not None:
                    await tg.start(self.opcua.run)  # returns at once: the address space is built in a thread
                tg.start_soon(self._wait_for_signal, tg.cancel_scope)
                log.info("bmsgw %s running: %d buses, %d signals, P0 process %d, control socket %s", __version__,
                         len(self.rates), self.image.size, p0.pid, self.control.path)
                self.notifier.send(READY=1, STATUS=self._status_line())
        finally:
            self._stopping = True
            self.notifier.send(STOPPING=1)
            with anyio.CancelScope(shield=True):
                # P0 stops first on a signal (_wait_for_signal); here when anything else ended the group
                await anyio.to_thread.run_sync(p0.stop)
            if self.estimation is not None:
                self.estimation.persist()
            self.control.release()  # claimed, but the group ended before serving (the socket file goes)
        if self._p0_lost:
            raise SystemExit(f"the P0 process ended unexpectedly (exit code {p0.exit_code}): the gateway stops")
        if p0.exit_code not in (0, None):
            raise SystemExit(f"the P0 process failed (exit code {p0.exit_code})")

    async def _wait_for_signal(self, scope: anyio.CancelScope) -> None:
        # SIGHUP: the SSH session of a foreground `bmsgw run` dropped; a clean stop, as for SIGTERM
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("%s received, shutting down", signal.Signals(signum).name)
                self._stopping = True
                self.notifier.send(STOPPING=1)
                assert self.p0 is not None
                # the contactors open before anything else stops (README); the trip's events reach the
                # recorder (and the cloud link's queue) before the group's cancellation makes it flush
                await anyio.to_thread.run_sync(self.p0.stop)
                if self.p0.exit_code == 0:
                    log.info("P0 stopped: contactors opened; stopping the rest")
                else:
                    log.warning("P0 ended with exit code %s while stopping; stopping the rest", self.p0.exit_code)
                scope.cancel()
                return

    async def _p0(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """A P0 request for a handler: ControlError when P0 refuses it, NotAnswered when P0 does not
        answer in time or is gone (the CLI's exit 1, not "refused")."""
        assert self.p0 is not None
        try:
            return await anyio.to_thread.run_sync(self.p0.call, cmd, args)
        except P0Unavailable as exc:
            raise NotAnswered(str(exc)) from None
        except P0Error as exc:
            raise ControlError(str(exc)) from None

    async def _refresh(self) -> None:
        """Poll P0's counters once a second: bus rates, health; a dead P0 ends the daemon."""
        assert self.p0 is not None
        if self.cloud is not None:
            self._cloud_status = self.cloud.status()
        if not self.p0.alive:
            if self._stopping:
                return  # stopped on purpose (shutdown)
            if not self._p0_lost:
                log.critical("the P0 process exited (code %s): stopping", self.p0.exit_code)
            self._p0_lost = True
            if self._scope is None:  # before the task group runs: nothing else to stop
                raise SystemExit(f"the P0 process ended unexpectedly (exit code {self.p0.exit_code})")
            # not SystemExit in here: the task group would end in an ExceptionGroup traceback; run() exits 1
            self._scope.cancel()
            return
        try:
            st = await anyio.to_thread.run_sync(self.p0.call, "status", None, 2.0)
        except P0Error as exc:
            log.error("%s", exc)
            self._p0_status = {**self._p0_status, "healthy": False}
            return
        now = time.monotonic()
        self._p0_status_mono = now
        for b in st["buses"]:
            then, frames = self._last_frames.get(b["name"], (now - RATE_PERIOD_S, b["frames"]))
            if now - then >= RATE_PERIOD_S / 2:  # status requests in between do not shorten the window
                self.rates[b["name"]] = (b["frames"] - frames) / (now - then)
                self._last_frames[b["name"]] = (now, b["frames"])
        self._p0_status = st

    async def _safety_step(self) -> None:
        """Safety levels and the plating indicator (the active conditions only asked for when there are some)."""
        prot = self._p0_status.get("protection") or {}
        alarms: list[dict[str, Any]] = []
        if prot.get("active_alarms"):
            try:
                alarms = (await self._p0("alarms"))["active"]
            except (ControlError, NotAnswered) as exc:
                log.warning("safety levels: %s", exc)
        assert self.safety is not None
        self.safety.step(self.limits, alarms)

    async def _balance_step(self) -> None:
        """Balancing decisions once a second; masks go out while bleeding, and once more (zeros) when it stops."""
        assert self.estimation is not None
        prot = self._p0_status.get("protection") or {}
        alarm = bool(prot.get("active_alarms")) or (prot.get("contactors") or {}).get("state") == "ERROR"
        d = self.estimation.step_balancing(alarm)
        if d.bleeding or self._bleeding:
            cpm = self.loaded.config.site.cells_per_module
            masks = [int(sum(1 << k for k in range(cpm) if d.bleed[m * cpm + k]))
                     for m in range(self.loaded.config.site.modules)]
            try:
                await self._p0("balancing", {"masks": masks})
            except (ControlError, NotAnswered) as exc:
                log.warning("balancing: %s", exc)
        self._bleeding = bool(d.bleeding)

    def _balancing(self, start: bool, time_budget_s: float | None = None,
                   stop_spread_v: float | None = None) -> tuple[bool, str]:
        """The one entry point for balancing requests: CLI, OPC UA and the cloud (which may set the
        run's time budget and stop spread)."""
        if self.estimation is None:
            return False, "balancing needs the estimators (estimators.enabled = true)"
        if start:
            try:
                self.estimation.balancer.request(time_budget_s, stop_spread_v)
            except ValueError as exc:
                return False, str(exc)
            return True, (f"balancing requested: starts at rest once the spread exceeds "
                          f"{self.estimation.section.balancing_start_spread_v * 1000:.0f} mV")
        self.estimation.balancer.cancel()
        return True, "balancing cancelled"

    async def cmd_balance(self, args: dict[str, Any]) -> dict[str, Any]:
        """Request or cancel balancing; its status and progress."""
        action = arg_str(args, "action")
        if action in ("start", "stop"):
            ok, reason = self._balancing(action == "start")
            if not ok:
                raise ControlError(reason)
        elif action:
            raise ControlError(f"unknown action '{action}' (start or stop)")
        if self.estimation is None:
            raise ControlError("balancing needs the estimators (estimators.enabled = true)")
        return self.estimation.balancing_status()

    def _derate(self) -> bool:
        prot = self._p0_status.get("protection")
        return bool(prot and prot.get("derate"))

    def _p0_status_age(self) -> float:
        """Seconds since P0 last answered a status (inf before the first)."""
        return time.monotonic() - self._p0_status_mono

    def health_problem(self) -> str:
        """Why the gateway is unhealthy ("" when it is not): P0 gone, silent (a hung P0 leaves its last
        status behind), an adapter down or a late protection lane."""
        if self.p0 is None or self.p0.exit_code is not None:
            return "the CAN/protection process (P0) is not running"
        age = self._p0_status_age()
        if age > P0_STATUS_MAX_AGE_S:
            return ("the CAN/protection process (P0) does not answer"
                    + (f": what is shown is {age:.0f} s old" if math.isfinite(age) else ""))
        if not self._p0_status.get("healthy"):
            return "a CAN adapter is down or the protection lane misses its deadline"
        return ""

    @property
    def healthy(self) -> bool:
        """What the watchdog is fed on."""
        return not self.health_problem()

    def _status_line(self) -> str:
        prot = self._p0_status.get("protection")
        state = prot["contactors"]["state"] if prot else "protection off"
        rate = sum(self.rates.values())
        problem = self.health_problem()
        return f"contactors {state}, {rate:.0f} frames/s" + (f", UNHEALTHY: {problem}" if problem else "")

    async def _feed_watchdog(self) -> None:
        # a stalled lane gets no WATCHDOG=1, so systemd restarts the gateway (the PCU has opened
        # the contactors already: its command heartbeat stopped with the lane)
        if self.loops[1].period_s < RATE_PERIOD_S:
            await self._refresh()
        if self.healthy:
            self.notifier.send(WATCHDOG=1, STATUS=self._status_line())
        else:
            self.notifier.send(STATUS=self._status_line())

    # -- control commands ------------------------------------------------------

    async def cmd_version(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"version": __version__, "config": str(self.loaded.path)}

    async def cmd_status(self, args: dict[str, Any]) -> dict[str, Any]:
        """Pack summary, buses, decode problems, loops and uptime."""
        await self._refresh()
        return self.status_snapshot()

    def status_snapshot(self) -> dict[str, Any]:
        """The status the CLI, the metrics endpoint and the notify STATUS line are made from."""
        st = self._p0_status
        return {
            "version": __version__,
            "gateway": self.loaded.config.gateway.id,
            "uptime_s": round(time.monotonic() - self.started_mono, 1),
            "pack": pack_summary(self),
            "buses": [{"frames_per_s": self.rates.get(b["name"], 0.0), **b} for b in st.get("buses", [])],
            "loops": st.get("loops", []) + [s.summary() for s in self.loops],
            "healthy": self.healthy,
            "health_problem": self.health_problem(),
            "p0_answering": self._p0_status_age() <= P0_STATUS_MAX_AGE_S,
            "events_dropped": st.get("events_dropped", {}),
            "protection": st.get("protection"),
            "simulator": st.get("simulator"),
            "estimates": None if self.estimation is None else self.estimation.snapshot(),
            "cloud": self._cloud_status,
            "opcua": None if self.opcua is None else self.opcua.status(),
            "eis": None if self.eis is None else self.eis.status(),
            "extra_metrics": self._extra_metrics(),
        }

    def _extra_metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.opcua is not None:
            o = self.opcua.status()
            out |= {"opcua_listening": float(o["listening"]), "opcua_subscriptions": float(o["subscriptions"]),
                    "opcua_monitored_items": float(o["monitored_items"]),
                    "opcua_refused_requests": float(o["writes_refused"] + o["calls_refused"] + o["logins_refused"])}
        c = self._cloud_status
        if not c:
            return out
        b = c["buffer"]
        return out | {"cloud_connected": float(c["connection"]["state"] == "connected"),
                "cloud_buffer_bytes": float(b["total_bytes"]), "cloud_buffer_rows": float(sum(b["rows"].values())),
                "cloud_oldest_unsent_age_seconds": float(b["oldest_unsent_age_s"] or 0.0),
                "cloud_lost_samples": float(sum(v.get("samples", 0) for v in c["losses"].values()))}

    async def cmd_alarms(self, args: dict[str, Any]) -> dict[str, Any]:
        """Active conditions and recent events."""
        n = arg_int(args, "recent", 50, 0, 100_000)
        assert n is not None
        res = await self._p0("alarms")
        return {**res, "recent": [e.as_dict() for e in self.recorder.recent(n)]}

    async def cmd_reset(self, args: dict[str, Any]) -> dict[str, Any]:
        """Request leaving ERROR; refused with the causes that remain."""
        # only JSON true clears the latch: "false", 1 or "yes" are refused, never taken as true
        return dict(await self._p0("reset", {"clear_deep_discharge": arg_bool(args, "clear_deep_discharge")}))

    async def cmd_contactors(self, args: dict[str, Any]) -> dict[str, Any]:
        """Contactor state, or an open/close request."""
        res = await self._p0("contactors", {"action": arg_str(args, "action")})
        fb = {c: self.image.read(f"contactor.{c}").value if f"contactor.{c}" in self.image.scalars else None
              for c in ("main_positive", "main_negative", "precharge")}
        return {**res, "feedback": fb}

    async def cmd_cloud_status(self, args: dict[str, Any]) -> dict[str, Any]:
        """Connection, buffer per class, oldest unsent age, drain estimate, last ack, losses."""
        if self.cloud is None:
            raise ControlError("the cloud link is disabled (cloud.enabled = false)")
        return self.cloud.status()

    def _eis(self) -> EisService:
        if self.eis is None:
            raise ControlError("this gateway has no EIS module (eis.enabled = false in the config)")
        return self.eis

    async def cmd_eis_sweep(self, args: dict[str, Any]) -> dict[str, Any]:
        """Queue an on-demand sweep of one target; its handle, to follow with eis.status."""
        settings = args.get("settings") or {}
        if not isinstance(settings, dict):
            raise ControlError("'settings' must be an object")
        unknown = set(settings) - {"f_start_hz", "f_stop_hz", "points_per_decade"}
        if unknown:
            raise ControlError(f"unknown sweep settings: {', '.join(sorted(unknown))}")
        for key, value in settings.items():
            number = int if key == "points_per_decade" else int | float
            if not isinstance(value, number) or isinstance(value, bool):
                raise ControlError(f"settings.{key} must be a number, not {value!r:.40}")
        ok, reason, handle = self._eis().request(arg_str(args, "target") or "", **settings)
        if not ok:
            raise ControlError(reason)
        return {"handle": handle, "reason": reason}

    async def cmd_eis_status(self, args: dict[str, Any]) -> dict[str, Any]:
        """What the module and the driver do; with a handle, how that sweep ended."""
        return self._eis().status(arg_int(args, "handle"))

    async def cmd_eis_cancel(self, args: dict[str, Any]) -> dict[str, Any]:
        """Abort the running sweep and drop the queue (or only the sweep ``handle``)."""
        return {"cancelled": self._eis().cancel(arg_int(args, "handle"))}

    async def cmd_eis_show(self, args: dict[str, Any]) -> Any:
        """The last result of a target (spectrum, verdict, SoT, fit), or one line per target."""
        eis = self._eis()
        target = arg_str(args, "target")
        if arg_bool(args, "all"):
            return eis.targets()
        try:
            return eis.show(target or None)
        except (KeyError, ValueError) as exc:
            raise ControlError(str(exc.args[0]) if exc.args else str(exc)) from None

    async def cmd_sim_fault(self, args: dict[str, Any]) -> str:
        return str(await self._p0("sim_fault", args))

    async def cmd_signals(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        """Every signal matching a glob with value, quality, age and timestamp."""
        pattern = arg_str(args, "glob") or "*"
        img = self.image
        names = img.select(pattern)
        if not names:
            raise ControlError(f"no signal matches '{pattern}'")
        # the time right before the snapshot (not before the glob's matching), and never a negative age:
        # a frame P0 stores between this clock read and the snapshot is newer than "now"
        s = img.snapshot(np.array([img.index(n) for n in names], dtype=np.intp), time.monotonic())
        return [{"name": n, "value": _num(v), "quality": Quality(int(q)).name.lower(), "age_s": _num(max(a, 0.0)),
                 "timestamp": _num(t)} for n, v, q, a, t in zip(names, s.value, s.quality, s.age_s, s.timestamp,
                                                                 strict=True)]

    async def stream_candump(self, args: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Live frames of one or all buses, decoded on request; ``{"bus", "dropped"}`` items count the
        frames the tap lost because this reader fell behind."""
        bus, decode = arg_str(args, "bus"), arg_bool(args, "decode")
        tap = await self._p0("tap_open", {"bus": bus})
        try:
            while True:
                await anyio.sleep(0.05)
                got = await self._p0("tap_read", {"id": tap})
                for bus, lost in got["dropped"].items():
                    yield {"bus": bus, "dropped": lost}
                for bus, msg in got["frames"]:
                    yield frame_record(msg, bus, self.decoders[bus] if decode else None)
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await self._p0("tap_close", {"id": tap})
                except (ControlError, NotAnswered):
                    pass


class LimitsStage:
    """A remote protection-limit change: snapshot, apply in P0, health-check, roll back."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def snapshot(self) -> LimitTable:
        return self.gw.limits

    async def apply(self, args: dict[str, Any]) -> tuple[bool, str]:
        return await anyio.to_thread.run_sync(self._set, args["table"])

    async def health(self) -> tuple[bool, str]:
        assert self.gw.p0 is not None
        try:
            st = await anyio.to_thread.run_sync(self.gw.p0.call, "status")
        except P0Error as exc:
            return False, str(exc)
        return bool(st["healthy"]), "protection lane healthy" if st["healthy"] else "protection lane unhealthy"

    async def restore(self, snapshot: LimitTable) -> None:
        ok, reason = await anyio.to_thread.run_sync(self._set, snapshot)
        if not ok:
            raise P0Error(f"restoring the limits failed: {reason}")

    def _set(self, table: LimitTable) -> tuple[bool, str]:
        """P0 calls block: these run in a worker thread, never in the event loop."""
        assert self.gw.p0 is not None
        with self.gw.limits_lock:
            try:
                reason = self.gw.p0.call("set_limits", {"table": table})
            except P0Error as exc:
                return False, str(exc)
            self.gw.limits = table
            return True, str(reason)


class EcmStage:
    """A remote ECM parameter update (the cloud's R0, R1..R4, C1..C4 for some cells), with rollback."""

    def __init__(self, est: Estimation) -> None:
        self.est = est

    def snapshot(self) -> Any:
        return self.est.ekf.params.copy()

    def apply(self, args: dict[str, Any]) -> tuple[bool, str]:
        """Apply the checked ``set_ecm_parameters`` args (cloudlink.commands.check_ecm) cell by cell.

        No ``cells``: every cell. The operating point of the fit is ``ocv_v`` when given, else the OCV of
        ``soc``, else of SoC 0.5 (docs/cloud-format.md); 0.0 is a value like any other.
        """
        given = args.get("cells")
        cells = range(self.est.n_cells) if given is None else given
        ocv_v, soc = args.get("ocv_v"), args.get("soc")
        voltage = ocv_v if ocv_v is not None else float(self.est.cell.ocv.ocv(0.5 if soc is None else soc))
        for cell in cells:
            update = {"cell": cell, "r0_ohm": args["r0_ohm"], "voltage_v": voltage,
                      **{f"r{k}_ohm": r for k, r in enumerate(args["r_ohm"], 1)},
                      **{f"c{k}_f": c for k, c in enumerate(args["c_f"], 1)}}
            if args.get("temperature_c") is not None:
                update["temperature_c"] = args["temperature_c"]
            ok, reason = self.est.update_ecm(update)
            if not ok:
                return False, f"cell {cell}: {reason}"
        return True, f"ECM parameters of {len(cells)} cells applied"

    def health(self) -> tuple[bool, str]:
        ok = bool(np.isfinite(self.est.ekf.soc).all())
        return ok, "estimator healthy" if ok else "estimator diverged"

    def restore(self, snapshot: Any) -> None:
        self.est.ekf.set_params(snapshot)
        self.est.params = snapshot


class SettingsStage:
    """A remote change of tunable estimator settings, with rollback."""

    def __init__(self, est: Estimation) -> None:
        self.est = est

    def snapshot(self) -> Any:
        return self.est.section

    def apply(self, args: dict[str, Any]) -> tuple[bool, str]:
        return self.est.apply_settings(args["settings"])

    def health(self) -> tuple[bool, str]:
        lim = self.est.limits
        ok = lim is None or (np.isfinite(lim.charge_current_a) and np.isfinite(lim.discharge_current_a))
        return bool(ok), "limits finite" if ok else "limits not finite"

    def restore(self, snapshot: Any) -> None:
        self.est._use(snapshot)


def make_lane(loaded: Loaded, recorder: Recorder, send: Callable[[can.Message], bool]) -> ProtectionLane:
    """Protection, contactor machine and lane of a validated config; ``send`` puts a frame on the contactor bus."""
    cfg = loaded.config
    p = cfg.protection
    bus = cfg.contactor_bus()
    message = next(m for s in loaded.sources if s.bus == bus for m in s.messages if m.name == p.contactor_message)

    def command(values: dict[str, int]) -> bool:
        return send(can.Message(arbitration_id=message.frame_id, data=message.encode(values),
                                is_extended_id=message.is_extended_frame))

    protection = Protection(loaded.image, cfg.limit_table(), p.debounce, p.plausible,
                            p.charge_threshold_a, p.lane.tick_ms / 1000.0)
    machine = ContactorMachine(loaded.image, CanContactorDriver(command), p.contactors, state_dir(cfg), recorder,
                               protection.trip_causes)
    protection.on_deep_discharge = machine.latch.latch
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
    s = img.snapshot(img.span("cell.voltage"), now)
    out["cell_voltage"] = extremes(s.value, s.quality == Quality.GOOD)
    out["temperature"] = temperature_extremes(img, now)
    return out


def temperature_extremes(img: ProcessImage, now: float) -> dict[str, Any]:
    """:func:`extremes` over every bound temperature, module sensors and per-cell alike; ``min_at`` and
    ``max_at`` name the signal (``module[3].temperature[1]``, ``cell[17].temperature``)."""
    spans = [img.span(f) for f in TEMPERATURE_FAMILIES]
    idx = np.concatenate([np.arange(sp.start, sp.stop)[img.slot_of[sp] >= 0] for sp in spans])  # what is bound
    s = img.snapshot(idx, now)
    out = extremes(s.value, s.quality == Quality.GOOD)
    if out["min"] is not None:
        out["min_at"], out["max_at"] = (img.name_of(int(idx[out[f"{k}_index"]])) for k in ("min", "max"))
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
