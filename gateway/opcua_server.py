"""The OPC UA server for inverters, EMS and SCADA (asyncua), fed from the process image.

docs/opcua.md describes the address space, the security model and how to run
the interoperability check; this module is the implementation:

* **Start-up off the event loop.** asyncua builds its standard address space
  and we build ours (thousands of nodes) in a worker thread with a private
  event loop; only the listening socket and the publishing tasks live in the
  daemon's loop, so neither the control socket nor any other task waits
  (protection runs in its own threads anyway).
* **Honest values.** Image-backed variables are written only when their slot
  has a new sample (new ``seq``) or their quality changed, at most at the
  configured rate, with SourceTimestamp = the sample's receive time and a
  status from the image's quality.  An unchanged sample is never re-stamped.
* **Fast write path.** Values go straight into asyncua's address space and its
  monitored items (:class:`_FastWriter`: what ``Server.write_attribute_value``
  does, without its per-item waste), in batches, never through
  ``Node.write_value`` and the attribute service.  Our DataValues are immutable
  once made, so they opt out of the deep copy asyncua makes for every monitored
  item (``__deepcopy__``).
* **Alarms.** Protection events, and the AlarmConditions operators
  acknowledge, are gateway/opcua_alarms.py (fed from the Recorder's threads
  through a lock-free deque); the server makes one :class:`Alarms`, keeps it
  across restarts and runs its event loop while it serves.
* **Security.** Who may connect and what they may do is
  gateway/opcua_security.py (users, certificates, a ruleset per secure channel
  that records the caller); here are the checks per operation: our own
  attribute service for writes, and role checks in every method.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.abc
import numpy as np
from asyncua import Node, Server, ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.address_space import AttributeService
from asyncua.server.monitored_item_service import MonitoredItemService

from gateway import __version__
from gateway.events import Event, Kind, Level, Recorder
from gateway.image import ProcessImage, Quality
from gateway.limits import CHECKS, HardwareLimits, _bounds
from gateway.loops import LoopStats
from gateway.opcua_alarms import Alarms
from gateway.opcua_config import OpcuaSection, user_certificates
from gateway.opcua_nodes import (
    GOOD,
    NEVER,
    ROOT,
    STATUSES,
    WAITING,
    NodeBatch,
    SharedDataValue,
    VarSpec,
    camel,
    data_value,
    guess_unit,
    node_id,
    reference,
    status_code,
    utc,
)
from gateway.opcua_security import (
    ROLE_RANK,
    OpcuaIdentity,
    SecuredInternalServer,
    SecuredServer,
    TrustList,
    Users,
    caller_name,
    current_request,
    ensure_server_certificate,
    load_certificates,
)
from gateway.pipeline import Layout

log = logging.getLogger(__name__)

NAMESPACE_URI = "urn:bmsgw:opcua:BatterySystem"
PRODUCT_URI = "urn:bmsgw"
AUDIT_ARG_CHARS = 256  # of each method argument in an audit event

MethodHandler = Callable[..., tuple[bool, str]]
LimitsProvider = Callable[[], Mapping[str, Any]]
DiagnosticsProvider = Callable[[], Mapping[str, Any]]
EstimatesProvider = Callable[[], Mapping[str, Any]]
SettingWriter = Callable[[str, Any], tuple[bool, str]]


class _FastWriter:
    """Writes our values into asyncua's address space and hands them to its monitored items.

    It does what ``AddressSpace.write_attribute_value`` and asyncua's
    ``MonitoredItemService.datachange_callback`` do, item for item (same change test,
    same deadband filter, same queueing), minus two costs that are pure waste for values
    we make ourselves: the type check (we write the node's own type) and a default
    ``MonitoredItemNotification()`` built and then overwritten for every monitored item
    (about 6 us each, more than the rest of the delivery). Anything it does not
    recognise (another asyncua version, a value setter, a foreign callback) goes through
    asyncua's own path, which ``inline = False`` also forces.
    """

    def __init__(self, aspace: Any) -> None:
        self.aspace = aspace
        self.inline = all(hasattr(MonitoredItemService, a) for a in
                          ("datachange_callback", "_is_data_changed", "_is_deadband_exceeded"))
        self.fallbacks = 0

    async def __call__(self, nodeid: ua.NodeId, attr: ua.AttributeIds, dv: ua.DataValue) -> None:
        node = self.aspace.get(nodeid)
        attval = node.attributes.get(attr) if node is not None else None
        if not self.inline or attval is None or attval.value_setter is not None:
            await self.aspace.write_attribute_value(nodeid, attr, dv)
            return
        attval.value = dv
        attval.value_callback = None
        if not attval.datachange_callbacks:
            return
        for handle, callback in list(attval.datachange_callbacks.items()):
            mis: Any = getattr(callback, "__self__", None)
            mdata = None
            if getattr(callback, "__func__", None) is _MIS_DATACHANGE:
                mid = getattr(mis, "_monitored_datachange", {}).get(handle)
                mdata = getattr(mis, "_monitored_items", {}).get(mid) if mid is not None else None
            if mdata is None or not hasattr(getattr(mdata, "mvalue", None), "current_dvalue"):
                self.fallbacks += 1
                await callback(handle, dv)
                continue
            if mdata.mode == ua.MonitoringMode.Disabled:
                continue
            values = mdata.mvalue
            old = values.current_dvalue
            values.old_dvalue, values.current_dvalue = old, dv  # set_current_datavalue without the deep copy
            flt = mdata.filter
            if flt:
                changed = mis._is_data_changed(values, flt.Trigger) and mis._is_deadband_exceeded(values, flt)
            else:  # the default trigger, StatusValue: our status codes are shared objects, so test identity first
                changed = old is None or (old.StatusCode is not dv.StatusCode and old.StatusCode != dv.StatusCode) \
                    or old.Value != dv.Value
            if changed:
                await mis.isub.enqueue_datachange_event(
                    mid, ua.MonitoredItemNotification(ClientHandle=mdata.client_handle, Value=dv), mdata.queue_size)


_MIS_DATACHANGE = getattr(MonitoredItemService, "datachange_callback", None)


# -- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SettingSpec:
    """A variable under ``BatterySystem/Settings`` that an engineer may write.

    The server answers BadOutOfRange outside [low, high] and BadTypeMismatch for another
    type before calling the writer; the writer (``write_setting(name, value)``) validates
    against the hardware limits and applies, or refuses (BadOutOfRange).
    """

    name: str  # browse path below Settings, "." between folders, e.g. "Limits.CellVoltageHigh.RSL"
    low: float = -math.inf
    high: float = math.inf
    unit: str | None = None
    description: str = ""
    kind: Literal["double", "boolean", "int32"] = "double"
    initial: float | bool | None = None
    limit: tuple[str, str] | None = None  # mirrors limits()[check][level] (level "" for a plain number)


def limit_settings(limits: Mapping[str, Any], hardware: HardwareLimits) -> list[SettingSpec]:
    """One engineer setting per limit level (MOL/RSL/MSL of every check), bounded by the hardware limits."""
    bounds = _bounds(hardware)
    out = []
    for check, (_direction, unit, _group) in CHECKS.items():
        levels = limits.get(check)
        if not isinstance(levels, Mapping):
            continue
        lo, hi = bounds[check]
        for level in ("mol", "rsl", "msl"):
            out.append(SettingSpec(f"Limits.{camel(check)}.{level.upper()}", lo, hi, unit,
                                   f"{check} {level.upper()} threshold (engineer; within the hardware limits)",
                                   initial=float(levels[level]), limit=(check, level)))
    if "deep_discharge_v" in limits:
        out.append(SettingSpec("Limits.DeepDischargeVoltage", hardware.cell_voltage_min, hardware.cell_voltage_max,
                               "V", "deep-discharge threshold (latched below it)",
                               initial=float(limits["deep_discharge_v"]), limit=("deep_discharge_v", "")))
    return out


# -- client writes ----------------------------------------------------------------------------


_ADMIN = User(role=UserRole.Admin)


class _AttributeService(AttributeService):
    """Client writes: only Settings variables, only engineers on a secured channel, typed and in range."""

    def __init__(self, owner: OpcuaServer, base: AttributeService) -> None:
        super().__init__(base._aspace)
        self.owner = owner

    async def write(self, params: ua.WriteParameters, user: User = _ADMIN) -> list[ua.StatusCode]:
        if user.role == UserRole.Admin:  # the server's own internal session
            return await super().write(params, user)
        return [await self.owner._client_write(wv, user) for wv in params.NodesToWrite]


# -- address-space description -------------------------------------------------------------


KIND_DOUBLE, KIND_BOOL, KIND_INT = 0, 1, 2
_KIND_VT = (ua.VariantType.Double, ua.VariantType.Boolean, ua.VariantType.Int32)

# image families: (browse name, kind, unit, description)
FAMILY_NODES: dict[str, tuple[str, int, str | None, str]] = {
    "cell.voltage": ("Voltage", KIND_DOUBLE, "V", "cell voltage"),
    "cell.temperature": ("Temperature", KIND_DOUBLE, "degC", "cell temperature (sensor)"),
    "cell.balancing": ("Balancing", KIND_BOOL, None, "balancing of this cell is active"),
    "module.temperature": ("Temperature", KIND_DOUBLE, "degC", "module temperature sensor"),
    "module.board_temperature": ("BoardTemperature", KIND_DOUBLE, "degC", "module electronics temperature"),
    "module.voltage": ("Voltage", KIND_DOUBLE, "V", "module voltage (measured by the module)"),
    "module.state": ("State", KIND_INT, None, "module state code (see the pack's CAN protocol)"),
    "module.fault": ("Fault", KIND_INT, None, "module fault code (0: none)"),
    "string.current": ("Current", KIND_DOUBLE, "A", "string current (positive: charging)"),
    "string.voltage": ("Voltage", KIND_DOUBLE, "V", "string voltage"),
}

# estimator/provider keys: key -> (path below BatterySystem, variant type, unit, description)
PACK_ESTIMATES: dict[str, tuple[str, ua.VariantType, str | None, str]] = {
    "pack.soc": ("Pack.SoC", ua.VariantType.Double, "%", "state of charge (EKF over the cells)"),
    "pack.soe": ("Pack.SoE", ua.VariantType.Double, "%", "state of energy"),
    "pack.soh": ("Pack.SoH", ua.VariantType.Double, "%", "state of health (capacity), from the cloud"),
    "pack.charge_current_limit": ("Pack.ChargeCurrentLimit", ua.VariantType.Double, "A",
                                  "charge current the battery accepts now (SoF)"),
    "pack.discharge_current_limit": ("Pack.DischargeCurrentLimit", ua.VariantType.Double, "A",
                                     "discharge current the battery delivers now (SoF)"),
    "pack.charge_voltage_limit": ("Pack.ChargeVoltageLimit", ua.VariantType.Double, "V", "highest pack voltage"),
    "pack.discharge_voltage_limit": ("Pack.DischargeVoltageLimit", ua.VariantType.Double, "V",
                                     "lowest pack voltage"),
    "pack.contactor_state": ("Pack.ContactorState", ua.VariantType.String, None,
                             "contactor state machine: STANDBY, PRECHARGE, CLOSED, OPENING, ERROR"),
    "pack.bms_state": ("Pack.BmsState", ua.VariantType.String, None, "gateway state: normal, derate, error"),
    "pack.ah_charged": ("Pack.SoHInputs.ChargeThroughput", ua.VariantType.Double, "Ah", "charge throughput"),
    "pack.ah_discharged": ("Pack.SoHInputs.DischargeThroughput", ua.VariantType.Double, "Ah",
                           "discharge throughput"),
    "pack.kwh_charged": ("Pack.SoHInputs.EnergyCharged", ua.VariantType.Double, "kWh", "energy charged"),
    "pack.kwh_discharged": ("Pack.SoHInputs.EnergyDischarged", ua.VariantType.Double, "kWh", "energy discharged"),
    "pack.equivalent_full_cycles": ("Pack.SoHInputs.EquivalentFullCycles", ua.VariantType.Double, None,
                                    "number of full equivalent cycles"),
    "pack.deep_discharge_events": ("Pack.SoHInputs.DeepDischargeEvents", ua.VariantType.Double, None,
                                   "deep-discharge events"),
    "pack.hours_above_temperature": ("Pack.SoHInputs.TimeAboveTemperature", ua.VariantType.Double, "h",
                                     "time spent above the high-temperature threshold"),
    "pack.hours_below_temperature": ("Pack.SoHInputs.TimeBelowTemperature", ua.VariantType.Double, "h",
                                     "time spent below the low-temperature threshold"),
    "eis.time": ("EIS.MeasuredAt", ua.VariantType.DateTime, None, "when the last spectrum was measured"),
    "eis.target": ("EIS.Target", ua.VariantType.String, None, "what the last spectrum measured (cell/module)"),
    "eis.kk_valid": ("EIS.KramersKronigValid", ua.VariantType.Boolean, None,
                     "the last spectrum passed the lin-KK test"),
    "eis.frequency_hz": ("EIS.Frequency", ua.VariantType.Double, "Hz", "frequencies of the last spectrum"),
    "eis.z_re_ohm": ("EIS.ZReal", ua.VariantType.Double, "ohm", "real part of the impedance"),
    "eis.z_im_ohm": ("EIS.ZImag", ua.VariantType.Double, "ohm", "imaginary part of the impedance"),
    "eis.magnitude_ohm": ("EIS.Magnitude", ua.VariantType.Double, "ohm", "|Z|"),
    "eis.phase_deg": ("EIS.Phase", ua.VariantType.Double, "deg", "phase of Z"),
    "eis.voltage_v": ("EIS.CellVoltage", ua.VariantType.Double, "V", "cell voltage at each point"),
    "eis.fit.time": ("EIS.Fit.FittedAt", ua.VariantType.DateTime, None, "when the ECM parameters were fitted"),
    "eis.fit.ocv_v": ("EIS.Fit.Ocv", ua.VariantType.Double, "V", "open-circuit voltage"),
    **{f"eis.fit.r{k}_ohm": (f"EIS.Fit.R{k}", ua.VariantType.Double, "ohm", f"ECM resistance R{k}") for k in range(5)},
    **{f"eis.fit.c{k}_f": (f"EIS.Fit.C{k}", ua.VariantType.Double, "F", f"ECM capacitance C{k}") for k in range(1, 5)},
    "eis.fit.rel_sd": ("EIS.Fit.RelativeUncertainty", ua.VariantType.Double, None,
                       "1-sigma relative uncertainty of R0, R1..R4, C1..C4 left by the spectrum's noise"),
}
EIS_ARRAYS = frozenset(k for k in PACK_ESTIMATES if k.startswith("eis.") and k.endswith(("_hz", "_ohm", "_deg", "_v"))
                       and not k.startswith("eis.fit.")) | {"eis.fit.rel_sd"}
CELL_ESTIMATES: dict[str, tuple[str, str, str]] = {
    "cell.soc": ("SoC", "%", "cell state of charge (EKF)"),
    "cell.sot": ("SoT", "degC", "cell temperature from its impedance (EIS), at the time of the sweep"),
}
# image families without per-cell nodes: SoT reaches the cells as the estimate cell.sot (with the sweep's
# time) and the last fit shows under EIS.Fit; per-target fits and per-cell safety details stay in the image
# (bmsgw signals, eis show, the cloud); Pack.SafetyLevel has a node
NO_NODES = frozenset({*(f"{k}.{n}" for k in ("cell", "module") for n in ("sot", "eis_r", "eis_c")),
                      "cell.safety_level", "cell.safety_reason", "cell.plating"})


# -- push groups -------------------------------------------------------------------------------


class _ImageGroup:
    """Image-backed variables written at one rate: per node, the last pushed sample and quality."""

    def __init__(self, name: str, period_s: float) -> None:
        self.name = name
        self.period_s = period_s
        self.nodeids: list[ua.NodeId] = []
        self.index: list[int] = []
        self.kinds: list[int] = []

    def add(self, nodeid: ua.NodeId, index: int, kind: int) -> None:
        self.nodeids.append(nodeid)
        self.index.append(index)
        self.kinds.append(kind)

    def freeze(self, image: ProcessImage) -> None:
        n = len(self.index)
        self.idx = np.asarray(self.index, dtype=np.intp)
        self.slots = image.slots(self.idx) if n else np.zeros(0, dtype=np.intp)
        self.kind = np.asarray(self.kinds, dtype=np.int8)
        cycle = np.array([image.period(int(s)) for s in self.slots], dtype=np.float64)
        self.wait = np.where(np.isfinite(cycle), np.minimum(cycle, self.period_s), 0.0)
        self.last_seq = np.zeros(n, dtype=np.uint64)
        self.last_q = np.full(n, -1, dtype=np.int8)
        self.last_push = np.full(n, -np.inf)


@dataclass
class _Aggregate:
    """A value computed from image families (min/max cell voltage, power): pushed when an input changes."""

    nodeid: ua.NodeId
    compute: Callable[[float], tuple[float, int, float]]  # now -> (value, quality, measurement time)
    inputs: np.ndarray  # slots
    last_seq: int = -1
    last_q: int = -1
    last_value: float = math.nan
    last_push: float = -math.inf


@dataclass
class OpcuaStats:
    updates: int = 0
    updates_per_s: float = 0.0
    events_emitted: int = 0
    events_dropped: int = 0
    writes_refused: int = 0
    writes_accepted: int = 0
    calls: int = 0
    calls_refused: int = 0
    last_refusal: str = ""
    start_s: float = 0.0
    starts: int = 0
    last_error: str = ""


class OpcuaServer:
    """The OPC UA server of one gateway: address space from the layout, values from the image.

    ``methods``: ``{"ResetError": f(clear_deep_discharge: bool), "StartEisSweep": f(target: str),
    "RequestBalancing": f(enable: bool)}``, each returning ``(accepted, reason)``; they run in a
    worker thread. ``limits()`` returns the MOL/RSL/MSL table (``LimitTable.as_dict()``),
    ``diagnostics()`` a nested dict of loop/bus/cloud statistics, ``estimates()`` the
    estimator outputs (keys in docs/opcua.md); these three run in the event loop and must be
    cheap. ``write_setting(name, value)`` validates and applies an engineer write of one of
    ``settings`` and returns ``(accepted, reason)``; it runs in a worker thread.
    """

    def __init__(self, section: OpcuaSection, image: ProcessImage, layout: Layout, recorder: Recorder,
                 state_dir: Path | str, methods: Mapping[str, MethodHandler] | None = None,
                 limits: LimitsProvider | None = None, diagnostics: DiagnosticsProvider | None = None,
                 write_setting: SettingWriter | None = None, *, settings: Sequence[SettingSpec] = (),
                 estimates: EstimatesProvider | None = None, gateway_id: str = "bmsgw", site: str = "site",
                 max_pending_events: int = 10_000) -> None:
        self.section = section
        self.image = image
        self.layout = layout
        self.recorder = recorder
        self.state_dir = Path(state_dir)
        self.methods = dict(methods or {})
        self.limits = limits
        self.diagnostics = diagnostics
        self.write_setting = write_setting
        self.settings = list(settings)
        self.estimates = estimates
        self.gateway_id = gateway_id
        self.site = site
        self.application_uri = section.application_uri or f"urn:bmsgw:{gateway_id}"
        self.url = section.endpoint
        self.stats = OpcuaStats()
        self.loop = LoopStats("opcua-push", section.scan_ms / 1000.0, "P3")
        self.server: Server | None = None
        self.certificate_file: Path | None = None
        self._ready: anyio.Event | None = None
        self.alarms = Alarms(self.stats, lambda: self.server, lambda: self._write, self._refuse, max_pending_events)
        recorder.subscribers.append(self.alarms.on_event)
        quiet = logging.getLogger("asyncua")  # logs every request at INFO: thousands of lines a minute
        if quiet.level == logging.NOTSET:
            quiet.setLevel(logging.WARNING)
        self._write = None  # type: Callable[..., Any] | None
        self.writer: _FastWriter | None = None
        self._settings_by_node: dict[ua.NodeId, SettingSpec] = {}
        self._diag_nodes: dict[str, tuple[ua.NodeId, ua.VariantType, Any]] = {}
        self._limit_nodes: dict[tuple[str, str], tuple[ua.NodeId, Any]] = {}
        self._est_nodes: dict[str, tuple[ua.NodeId, ua.VariantType, Any]] = {}
        self._cell_est: dict[str, tuple[list[ua.NodeId], np.ndarray]] = {}
        self._updates_mark = (0, time.monotonic())
        self._groups: list[_ImageGroup] = []
        self._aggregates: list[_Aggregate] = []
        self._last_estimates = -math.inf
        self._est_last: dict[str, Any] = {}
        self._est_time: dict[str, float] = {}
        self._est_status: dict[str, ua.StatusCode] = {}  # the last status written per estimate key
        self._method_nodes: dict[ua.NodeId, tuple[str, tuple[ua.VariantType, ...]]] = {}
        self._made_objs: set[str] = set()
        self.ns = 0
        self.root = ua.NodeId()
        self._trust: TrustList | None = None
        self._users: Users | None = None
        self._method_lock: anyio.Lock | None = None
        self._frozen = False

    # -- public -------------------------------------------------------------------------------

    @property
    def ready(self) -> anyio.Event:
        """Set once the server listens (run() signals task_status at once and builds in the background)."""
        if self._ready is None:
            self._ready = anyio.Event()
        return self._ready

    def status(self) -> dict[str, Any]:
        """Counters for `bmsgw status` and the Gateway/OpcUa diagnostics folder."""
        s = self.stats
        iserver = self.server.iserver if self.server is not None else None
        subs = iserver.subscription_service.subscriptions if iserver is not None else {}
        items = sum(len(sub.monitored_item_srv._monitored_items) for sub in subs.values())
        return {
            "endpoint": self.url, "listening": self._ready is not None and self._ready.is_set(),
            "subscriptions": len(subs), "monitored_items": items, "updates": s.updates,
            "updates_per_s": round(s.updates_per_s, 1), "events_emitted": s.events_emitted,
            "events_dropped": s.events_dropped, "events_pending": self.alarms.backlog(),
            "writes_accepted": s.writes_accepted, "writes_refused": s.writes_refused, "calls": s.calls,
            "calls_refused": s.calls_refused, "logins_refused": self._users.refused if self._users else 0,
            "logins_throttled": self._users.throttled if self._users else 0,
            "certificates_refused": self._trust.rejected if self._trust else 0, "last_refusal": s.last_refusal,
            "start_s": round(s.start_s, 3), "starts": s.starts, "last_error": s.last_error,
            "active_alarms": self.alarms.active_count(),
            "push_loop": self.loop.summary(),
        }

    async def run(self, *, task_status: anyio.abc.TaskStatus[OpcuaServer] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled. ``task_status.started`` is signalled at once: building the address
        space never holds up the caller (``await server.ready.wait()`` for the listening socket).
        A failed start (port taken, broken certificate) is logged and retried with back-off: the
        gateway keeps protecting and publishing elsewhere."""
        self.ready  # noqa: B018 - created in this event loop
        task_status.started(self)
        backoff = 2.0
        while True:
            try:
                await self._serve()
                return
            except anyio.get_cancelled_exc_class():
                raise
            except Exception as exc:  # a P3 component: log, expose, retry; never take the daemon down
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("OPC UA server failed; retrying in %.0f s", backoff)
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, 60.0)

    async def push_once(self, force: bool = False) -> int:
        """One scan of the image, aggregates and estimates; ``force`` ignores the rates (benchmarks).
        Returns how many values were written into the address space."""
        now = time.monotonic()
        n = 0
        for group in self._groups:
            n += await self._push_group(group, now, force)
        n += await self._push_aggregates(now, force)
        if force or now - self._last_estimates >= 0.98 / self.section.pack_rate_hz:
            self._last_estimates = now
            n += await self._push_estimates(now, force)
        self.stats.updates += n
        return n

    # -- serving ----------------------------------------------------------------------------------

    async def _serve(self) -> None:
        t0 = time.monotonic()
        self.stats.starts += 1
        limits0 = dict(self.limits()) if self.limits is not None else {}
        gc_enabled = gc.isenabled()
        # asyncua's standard address space and ours are some 600,000 objects without a single
        # reference cycle to collect; with the collector running, every full collection during the
        # build stopped every thread of the process for 50-200 ms (and doubled the build time).
        # The collector pauses while we build, and what was built is frozen once the server listens.
        gc.disable()
        try:
            server = await anyio.to_thread.run_sync(self._build_in_thread, limits0, abandon_on_cancel=True)
            self.server = server
            await server.start()
            # the address space stays for the daemon's lifetime: keep its objects out of every collection
            gc.freeze()
            self._frozen = True
        except BaseException:
            if self.server is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    try:
                        await self.server.stop()
                    except Exception:  # stopping a half-started server must not hide the first error
                        log.debug("OPC UA server stop failed", exc_info=True)
                self.server = None
            raise
        finally:
            if gc_enabled:
                gc.enable()
        try:
            self.writer = _FastWriter(server.iserver.aspace)
            self._write = self.writer
            await self.alarms.publish_summary(datetime.now(UTC))
            self.stats.start_s = time.monotonic() - t0
            self.stats.last_error = ""
            log.info("OPC UA server listening on %s (%d variables, ready in %.2f s)", self.url,
                     sum(len(g.nodeids) for g in self._groups), self.stats.start_s)
            self.ready.set()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._push_loop)
                tg.start_soon(self.alarms.run)
                tg.start_soon(self._slow_loop)
        finally:
            self._write = None
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                try:
                    await server.stop()
                except Exception:  # stopping a half-started server must not hide the first error
                    log.debug("OPC UA server stop failed", exc_info=True)
            self.server = None
            if self._frozen:  # the old address space may be collected now
                gc.unfreeze()
                self._frozen = False
            if self._ready is not None and self._ready.is_set():
                self._ready = None  # a restart gets a fresh event

    def _build_in_thread(self, limits0: dict[str, Any]) -> Server:
        return asyncio.run(self._build(limits0))

    async def _build(self, limits0: dict[str, Any]) -> Server:
        """Everything that takes CPU time before the socket opens (runs in a worker thread)."""
        sec = self.section
        host = socket.gethostname()
        names = [host, *sec.cert_hostnames]
        if sec.host not in ("0.0.0.0", "::", ""):
            names.append(sec.host)
        key_file, cert_file = ensure_server_certificate(self.state_dir / "opcua", self.application_uri, names,
                                                        sec.cert_days, f"bmsgw {self.gateway_id}")
        self.certificate_file = cert_file
        self._users = Users(sec, user_certificates(sec.user))  # refuses a certificate two users share
        self._trust = TrustList(load_certificates(sec.trusted_client_certs), sec.accept_any_client_cert)
        iserver = SecuredInternalServer(self._users, sec, self._trust)
        server = SecuredServer(iserver, sec.allow_none_readonly, self._trust)
        await server.init()
        server.set_endpoint(self.url)
        server.set_server_name(f"bmsgw {self.gateway_id}")
        server.product_uri = PRODUCT_URI
        server.manufacturer_name = "bmsgw"
        await server.set_application_uri(self.application_uri)
        await server.set_build_info(PRODUCT_URI, "bmsgw", "bmsgw", __version__, "0", datetime.now(UTC))
        await server.load_certificate(str(cert_file))
        await server.load_private_key(str(key_file))
        policies = [getattr(ua.SecurityPolicyType, p) for p in sec.security]
        if sec.allow_none_readonly:
            policies.append(ua.SecurityPolicyType.NoSecurity)
        server.set_security_policy(policies)
        tokens: list[type] = [ua.UserNameIdentityToken, ua.X509IdentityToken]
        if sec.anonymous:
            tokens.append(ua.AnonymousIdentityToken)
        server.set_identity_tokens(tokens)
        server.set_certificate_validator(self._trust)
        iserver.max_connections = sec.max_connections
        iserver.max_monitored_item_queue_size = sec.max_queue_size
        iserver.attribute_service = _AttributeService(self, iserver.attribute_service)
        await self._build_model(server, limits0)
        return server

    # -- the information model ----------------------------------------------------------------

    async def _build_model(self, server: Server, limits0: dict[str, Any]) -> None:
        sec, img, lay = self.section, self.image, self.layout
        # a restart builds a new address space: forget the nodes of the old one (alarm states are kept)
        for table in (self._diag_nodes, self._limit_nodes, self._est_nodes, self._cell_est, self._settings_by_node,
                      self._est_last, self._est_time, self._est_status, self._method_nodes):
            table.clear()
        self._last_estimates = -math.inf
        self.ns = ns = await server.register_namespace(NAMESPACE_URI)
        b = NodeBatch(ns)
        pack_ms, cell_ms = 1000.0 / sec.pack_rate_hz, 1000.0 / sec.cell_rate_hz
        ranges = _eu_ranges(limits0, lay)
        root = b.obj("", "the battery: pack, strings, modules, cells, limits, alarms, estimators, EIS, gateway",
                     notifier=True, parent=node_id(ua.ObjectIds.ObjectsFolder))
        self.root = root
        # identification
        b.obj("Identification", "who and what this gateway and battery are")
        ident: list[tuple[str, ua.VariantType, Any, str]] = [
            ("GatewayId", ua.VariantType.String, self.gateway_id, "gateway id (config gateway.id)"),
            ("Site", ua.VariantType.String, self.site, "site name"),
            ("SoftwareVersion", ua.VariantType.String, __version__, "bmsgw version"),
            ("Strings", ua.VariantType.UInt32, lay.strings, "strings in parallel"),
            ("ModulesPerString", ua.VariantType.UInt32, lay.modules_per_string, "modules in series per string"),
            ("CellsPerModule", ua.VariantType.UInt32, lay.cells_per_module, "cells in series per module"),
            ("SensorsPerModule", ua.VariantType.UInt32, lay.sensors_per_module, "temperature sensors per module"),
            ("Cells", ua.VariantType.UInt32, lay.cells, "cells in the battery"),
        ]
        static: list[tuple[ua.NodeId, ua.Variant]] = []
        for name, vt, value, desc in ident:
            nid = b.var(VarSpec(f"Identification.{name}", vt, description=desc))
            static.append((nid, ua.Variant(value, vt)))
        # pack, scalars of the image, aggregates
        b.obj("Pack", "pack-level measurements, estimates and limits")
        groups = {"pack": _ImageGroup("pack", 1.0 / sec.pack_rate_hz), "cells": _ImageGroup("cells", 1.0 / sec.cell_rate_hz)}
        made_objs = {"Pack", "Identification"}
        self._made_objs = made_objs

        def ensure_obj(path: str, description: str = "") -> None:
            parts = path.split(".")
            for k in range(1, len(parts) + 1):
                p = ".".join(parts[:k])
                if p not in made_objs:
                    made_objs.add(p)
                    b.obj(p, description if k == len(parts) else "")

        for name, index in img.scalars.items():
            if img.slot_of[index] < 0:
                continue
            parts = name.split(".")
            path = ".".join(["Pack" if parts[0] == "pack" else camel(parts[0]), *(camel(p) for p in parts[1:])])
            ensure_obj(path.rpartition(".")[0])
            unit = guess_unit(parts[-1])
            rng = ranges.get(name) or (ranges.get(f"*{unit}") if unit else None)
            nid = b.var(VarSpec(path, ua.VariantType.Double, unit, f"{name} (from the signal map)", rng,
                             sampling_ms=pack_ms))
            groups["pack"].add(nid, index, KIND_DOUBLE)
        self._aggregates = self._aggregate_vars(b, ranges, pack_ms)
        for key, (path, vt, unit, desc) in PACK_ESTIMATES.items():
            ensure_obj(path.rpartition(".")[0])
            arr = key in EIS_ARRAYS
            nid = b.var(VarSpec(path, vt, unit, desc, ranges.get(key), array=arr, sampling_ms=pack_ms))
            self._est_nodes[key] = (nid, vt, None)
        # strings, modules, cells
        b.obj("Strings", "strings of modules in series", folder=True)
        per_cell: dict[str, list[ua.NodeId]] = {k: [] for k in CELL_ESTIMATES}
        fams = img.families
        for s in range(lay.strings):
            sp = f"Strings.String{s}"
            b.obj(sp, f"string {s}")
            self._family_vars(b, groups, "string", s, sp, ranges, pack_ms, (s,))
            b.obj(f"{sp}.Modules", "modules of this string", folder=True)
            for ml in range(lay.modules_per_string):
                m = s * lay.modules_per_string + ml
                mp = f"{sp}.Modules.Module{m}"
                b.obj(mp, f"module {m}")
                self._family_vars(b, groups, "module", m, mp, ranges, cell_ms, (m,))
                b.obj(f"{mp}.Cells", "cells of this module", folder=True)
                for cl in range(lay.cells_per_module):
                    c = m * lay.cells_per_module + cl
                    cp = f"{mp}.Cells.Cell{c}"
                    b.obj(cp, f"cell {c}")
                    self._family_vars(b, groups, "cell", c, cp, ranges, cell_ms, (c,))
                    for key, (leaf, unit, desc) in CELL_ESTIMATES.items():
                        per_cell[key].append(b.var(VarSpec(f"{cp}.{leaf}", ua.VariantType.Double, unit, desc,
                                                        ranges.get(key), sampling_ms=cell_ms)))
        for key, nodes in per_cell.items():
            self._cell_est[key] = (nodes, np.full(len(nodes), np.nan))
        del fams
        # limits (read-only), settings (engineer)
        b.obj("Limits", "protection limits in force: MOL (info), RSL (warning, derate), MSL (trip); read-only",
              folder=True)
        made_objs.add("Limits")
        for check, levels in limits0.items():
            unit = CHECKS.get(check, ("high", guess_unit(check) or "", ""))[1] or None
            if isinstance(levels, Mapping):
                cp = f"Limits.{camel(check)}"
                b.obj(cp, f"{check} ({CHECKS[check][0] if check in CHECKS else ''} limit)")
                made_objs.add(cp)
                for level in ("mol", "rsl", "msl"):
                    if level in levels:
                        nid = b.var(VarSpec(f"{cp}.{level.upper()}", ua.VariantType.Double, unit,
                                         f"{check} {level.upper()}"))
                        self._limit_nodes[(check, level)] = (nid, None)
            elif isinstance(levels, int | float):
                leaf = "DeepDischargeVoltage" if check == "deep_discharge_v" else camel(check)
                nid = b.var(VarSpec(f"Limits.{leaf}", ua.VariantType.Double, guess_unit(check) or
                                 ("V" if check.endswith("_v") else None), check))
                self._limit_nodes[(check, "")] = (nid, None)
        b.obj("Settings", "settings an engineer may write, inside the hardware limits", folder=True)
        made_objs.add("Settings")
        for spec in self.settings:
            ensure_obj(f"Settings.{spec.name}".rpartition(".")[0])
            vt = {"double": ua.VariantType.Double, "boolean": ua.VariantType.Boolean,
                  "int32": ua.VariantType.Int32}[spec.kind]
            rng = (spec.low, spec.high) if spec.kind != "boolean" else None
            nid = b.var(VarSpec(f"Settings.{spec.name}", vt, spec.unit, spec.description, rng, writable=True))
            self._settings_by_node[nid] = spec
            if spec.initial is not None:
                static.append((nid, ua.Variant(_coerce(spec.initial, vt), vt)))
        self.alarms.add_folder(b)
        # estimators, EIS, gateway
        b.obj("Estimators", "estimator outputs without a fixed place (provider keys estimators.*)", folder=True)
        made_objs.update({"Estimators", "Settings", "Limits", "Alarms"})
        b.obj("Gateway", "gateway diagnostics: loops, buses, cloud link, OPC UA", folder=True)
        b.obj("Gateway.Diagnostics", "live statistics (refreshed every slow_period_s)", folder=True)
        made_objs.update({"Gateway", "Gateway.Diagnostics"})
        iserver = server.iserver
        results = await iserver.isession.add_nodes(b.items)
        for item, res in zip(b.items, results, strict=True):
            if not res.StatusCode.is_good():
                raise RuntimeError(f"OPC UA model: cannot add {item.RequestedNewNodeId}: {res.StatusCode}")
        aspace = iserver.aspace
        srv = datetime.now(UTC)
        for nid, v in b.vars:
            empty = ua.Variant([], v.vtype) if v.array else ua.Variant()
            await aspace.write_attribute_value(nid, ua.AttributeIds.Value, data_value(empty, WAITING, None, srv))
        for nid, variant in static:
            await aspace.write_attribute_value(nid, ua.AttributeIds.Value, data_value(variant, GOOD, srv, srv))
        for g in groups.values():
            g.freeze(img)
        self._groups = [groups["pack"], groups["cells"]]
        # references that make the model discoverable for event clients
        await iserver.isession.add_references([reference(ua.ObjectIds.Server, ua.ObjectIds.HasNotifier, root),
                                               reference(ua.ObjectIds.Server, ua.ObjectIds.HasEventSource, root)])
        await self.alarms.build(server, ns, root)
        await self._build_methods(server)

    def _family_vars(self, b: NodeBatch, groups: dict[str, _ImageGroup], prefix: str, element: int, path: str,
                     ranges: dict[str, tuple[float, float]], sampling_ms: float, index: tuple[int, ...]) -> None:
        img = self.image
        for fam_name, fam in img.families.items():
            head, _, tail = fam_name.partition(".")
            if head != prefix or fam_name in NO_NODES:
                continue
            name, kind, unit, desc = FAMILY_NODES.get(fam_name, (camel(tail), KIND_DOUBLE, guess_unit(tail), fam_name))
            extra = fam.shape[1:]
            for rest in np.ndindex(*extra) if extra else [()]:
                full = (*index, *rest)
                if len(full) != len(fam.shape) or any(i >= n for i, n in zip(full, fam.shape, strict=True)):
                    continue
                flat = fam.element(full)
                if img.slot_of[flat] < 0:
                    continue  # not bound by the signal map: no node (docs/opcua.md)
                leaf = name + "".join(str(i) for i in rest)
                vt = _KIND_VT[kind]
                nid = b.var(VarSpec(f"{path}.{leaf}", vt, unit if vt == ua.VariantType.Double else None,
                                 f"{desc} ({fam.element_name(flat)})", ranges.get(fam_name), sampling_ms=sampling_ms))
                (groups["pack"] if prefix == "string" else groups["cells"]).add(nid, flat, kind)

    def _aggregate_vars(self, b: NodeBatch, ranges: dict[str, tuple[float, float]], ms: float) -> list[_Aggregate]:
        img = self.image
        out: list[_Aggregate] = []

        def bound(family: str) -> np.ndarray:
            if family not in img.families:
                return np.zeros(0, dtype=np.intp)
            idx = np.arange(img.span(family).start, img.span(family).stop)
            return idx[img.slot_of[idx] >= 0]

        def extreme(idx: np.ndarray, op: str) -> Callable[[float], tuple[float, int, float]]:
            def compute(now: float) -> tuple[float, int, float]:
                s = img.snapshot(idx, now)  # not value then quality: a frame between them would pair two frames
                q, values = s.quality, s.value
                received = s.seq > 0
                good = q == Quality.GOOD
                usable = received & (q != Quality.INVALID) & ~np.isnan(values)
                use = good if good.any() else usable
                if not use.any():
                    t = s.timestamp[received]
                    return math.nan, (Quality.INVALID if received.any() else NEVER), \
                        float(t.max()) if t.size else math.nan
                v = values[use]
                value = float(v.min() if op == "min" else v.max() if op == "max" else v.max() - v.min())
                status = Quality.GOOD if good.all() else Quality.STALE  # Uncertain: some inputs are not good
                return value, int(status), float(s.timestamp[use].max())
            return compute

        cells_v = bound("cell.voltage")
        temps = bound("cell.temperature")
        if not temps.size:
            temps = bound("module.temperature")
        specs: list[tuple[str, np.ndarray, str, str | None, str, str]] = [
            ("MinCellVoltage", cells_v, "min", "V", "cell.voltage", "lowest cell voltage (of the good ones)"),
            ("MaxCellVoltage", cells_v, "max", "V", "cell.voltage", "highest cell voltage (of the good ones)"),
            ("CellVoltageSpread", cells_v, "spread", "V", "", "highest minus lowest cell voltage"),
            ("MinTemperature", temps, "min", "degC", "cell.temperature", "lowest cell/module temperature"),
            ("MaxTemperature", temps, "max", "degC", "cell.temperature", "highest cell/module temperature"),
        ]
        for name, idx, op, unit, rng, desc in specs:
            if idx.size:
                nid = b.var(VarSpec(f"Pack.{name}", ua.VariantType.Double, unit,
                                 desc + "; Uncertain when some inputs are not good", ranges.get(rng), sampling_ms=ms))
                out.append(_Aggregate(nid, extreme(idx, op), np.unique(img.slots(idx))))
        if "pack.voltage" in img.scalars and "pack.current" in img.scalars:
            iv, ic = img.index("pack.voltage"), img.index("pack.current")
            if img.slot_of[iv] >= 0 and img.slot_of[ic] >= 0:
                pair = np.array([iv, ic], dtype=np.intp)
                slots = img.slots(pair)

                def power(now: float) -> tuple[float, int, float]:
                    s = img.snapshot(pair, now)
                    t = s.timestamp
                    tt = float(t.max()) if np.isfinite(t).any() else math.nan
                    worst = int(s.quality.max())
                    if worst == Quality.STALE and not (s.seq > 0).all():
                        worst = NEVER
                    return float(s.value[0] * s.value[1]), worst, tt
                nid = b.var(VarSpec("Pack.Power", ua.VariantType.Double, "W", "pack voltage x pack current "
                                 "(positive: charging)", ranges.get("pack.power"), sampling_ms=ms))
                out.append(_Aggregate(nid, power, np.unique(slots)))
        return out

    async def _build_methods(self, server: Server) -> None:
        root = server.get_node(self.root)
        out = [_argument("Accepted", ua.ObjectIds.Boolean, "true when the request was accepted"),
               _argument("Reason", ua.ObjectIds.String, "what was done, or why it was refused")]
        specs = [
            ("ResetError", [_argument("ClearDeepDischarge", ua.ObjectIds.Boolean,
                                      "also clear a latched deep discharge")], (ua.VariantType.Boolean,),
             "leave ERROR when every cause is gone (same rules as `bmsgw reset`)"),
            ("StartEisSweep", [_argument("Target", ua.ObjectIds.String, "what to measure: cell[N] or module[N]")],
             (ua.VariantType.String,), "start an impedance sweep (needs low, stable current)"),
            ("RequestBalancing", [_argument("Enable", ua.ObjectIds.Boolean, "true: start, false: stop")],
             (ua.VariantType.Boolean,), "start or stop active balancing"),
        ]
        for name, inargs, types, _desc in specs:
            node = await root.add_method(node_id(f"{ROOT}.{name}", self.ns), ua.QualifiedName(name, self.ns),
                                         self._make_method(name), inargs, out)
            self._method_nodes[node.nodeid] = (name, types)

    # -- pushing values ------------------------------------------------------------------------

    async def _push_loop(self) -> None:
        loop = self.loop
        period = loop.period_s
        due = time.monotonic()
        while True:
            start = time.monotonic()
            loop.late_s.append(max(0.0, start - due))
            try:
                await self.push_once()
            except Exception as exc:  # counted, never fatal
                loop.errors += 1
                loop.last_error = f"{type(exc).__name__}: {exc}"
                log.debug("OPC UA push failed", exc_info=True)
            end = time.monotonic()
            loop.busy_s.append(end - start)
            loop.runs += 1
            due += period
            if end > due:
                loop.overruns += 1
                due = end
            await anyio.sleep(max(0.0, due - time.monotonic()))

    async def _push_group(self, g: _ImageGroup, now: float, force: bool) -> int:
        if not g.nodeids or self._write is None:
            return 0
        img = self.image
        # value, status, source time and frame count in one read: a value read after quality() could be the
        # next frame's, published under this frame's status
        snap = img.snapshot(g.idx, now)
        seq = snap.seq
        q = np.where((seq == 0) & (snap.quality == Quality.STALE), NEVER, snap.quality).astype(np.int8)
        changed_q = q != g.last_q
        new = seq != g.last_seq
        if force:
            due = new | changed_q
        else:
            # rate limit per node; once the window is open, wait (at most one cycle of the source) for a
            # sample measured after it opened, so a push follows a measurement within one scan instead of
            # publishing a sample that sat out the window
            opened = g.last_push + g.period_s * 0.98
            due = (new & (now >= opened) & ((img.rx_mono[g.slots] >= opened) | (now >= opened + g.wait))) \
                | changed_q
        sel = np.flatnonzero(due)
        if not sel.size:
            return 0
        values = snap.value[sel].tolist()
        times = snap.timestamp[sel].tolist()
        qs = q[sel].tolist()
        kinds = g.kind[sel].tolist()
        srv = datetime.now(UTC)
        stamps: dict[float, datetime] = {}
        write = self._write
        nodeids = g.nodeids
        value_attr = ua.AttributeIds.Value
        for k, (i, v, t, qq, kind) in enumerate(zip(sel.tolist(), values, times, qs, kinds, strict=True)):
            src = stamps.get(t)
            if src is None and t == t:  # not NaN
                src = stamps[t] = utc(t)
            await write(nodeids[i], value_attr, _image_dv(kind, v, qq, src, srv))
            if k % 512 == 511:
                await anyio.sleep(0)
        g.last_seq[sel] = seq[sel]
        g.last_q[sel] = q[sel]
        g.last_push[sel] = now
        return int(sel.size)

    async def _push_aggregates(self, now: float, force: bool) -> int:
        if self._write is None:
            return 0
        n = 0
        period = 1.0 / self.section.pack_rate_hz
        srv = None
        for a in self._aggregates:
            seq = int(self.image.seq[a.inputs].sum())
            if not force and now - a.last_push < period * 0.98:
                continue
            value, q, t = a.compute(now)
            if seq == a.last_seq and q == a.last_q and _same(a.last_value, value):
                continue  # an input's quality change alone can change the value (min of the good cells)
            srv = srv or datetime.now(UTC)
            src = utc(t) if t == t and q != NEVER else None
            await self._write(a.nodeid, ua.AttributeIds.Value, _image_dv(KIND_DOUBLE, value, q, src, srv))
            a.last_seq, a.last_q, a.last_value, a.last_push = seq, q, value, now
            n += 1
        return n

    async def _push_estimates(self, now: float, force: bool) -> int:
        if self.estimates is None or self._write is None:
            return 0
        data = self.estimates()
        if not data:
            return 0
        t_all = data.get("time")
        t_all = float(t_all) if isinstance(t_all, int | float) else None
        stale = data.get("stale") or ()
        srv = datetime.now(UTC)
        wall = time.time()
        n = 0
        for key, value in data.items():
            if key in ("time", "stale"):
                continue
            stamp, per_key = t_all, False
            if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int | float):
                value, stamp, per_key = value[0], float(value[1]), True
            if key in self._cell_est:
                n += await self._push_cell_estimate(key, value, stamp if stamp is not None else wall, srv, now, force)
                continue
            entry = self._est_nodes.get(key)
            if entry is None:
                entry = await self._add_estimator_node(key, value)
                if entry is None:
                    continue
            nid, vt, _ = entry
            try:
                variant = _variant(value, vt, key in EIS_ARRAYS)
            except (TypeError, ValueError, OverflowError):
                continue
            bad = vt == ua.VariantType.Double and not variant.is_array and not math.isfinite(variant.Value)
            status = STATUSES[Quality.INVALID] if bad else STATUSES[Quality.STALE] if key in stale else GOOD
            # numbers: a new estimate (new time) is a new sample; states (text, flags): written when they
            # change; an unchanged sample is never written again with a new timestamp (a new status alone
            # keeps the sample's own time)
            timed = per_key or vt == ua.VariantType.Double
            if _same(self._est_last.get(key, _MISSING), variant.Value) and \
                    (not timed or stamp is None or self._est_time.get(key) == stamp):
                if self._est_status.get(key) is status:
                    continue
                stamp = self._est_time.get(key, stamp)
            self._est_last[key] = variant.Value
            self._est_status[key] = status
            if stamp is None:
                stamp = wall
            self._est_time[key] = stamp
            await self._write(nid, ua.AttributeIds.Value,
                              data_value(ua.Variant() if bad else variant, status, utc(stamp), srv))
            n += 1
        return n

    async def _push_cell_estimate(self, key: str, value: Any, t: float, srv: datetime, now: float,
                                  force: bool) -> int:
        nodes, last = self._cell_est[key]
        try:
            arr = np.asarray(value, dtype=np.float64).ravel()
        except (TypeError, ValueError):
            return 0
        if arr.size != len(nodes) or self._write is None:
            return 0
        last_t = self._est_time.get(key, -math.inf)
        if not force and now - self._est_time.get(key + "@mono", -math.inf) < 0.98 / self.section.cell_rate_hz:
            return 0
        changed = ~((arr == last) | (np.isnan(arr) & np.isnan(last)))
        if t != last_t:
            changed |= np.isfinite(arr) | np.isfinite(last)  # a new estimate: new timestamps for every cell
        sel = np.flatnonzero(changed)
        if not sel.size:
            return 0
        src = utc(t)
        for k, (i, v) in enumerate(zip(sel.tolist(), arr[sel].tolist(), strict=True)):
            ok = math.isfinite(v)
            await self._write(nodes[i], ua.AttributeIds.Value,
                              data_value(ua.Variant(v, ua.VariantType.Double) if ok else ua.Variant(),
                                  GOOD if ok else STATUSES[Quality.INVALID], src, srv))
            if k % 512 == 511:
                await anyio.sleep(0)
        last[sel] = arr[sel]
        self._est_time[key] = t
        self._est_time[key + "@mono"] = now
        return int(sel.size)

    async def _add_estimator_node(self, key: str, value: Any) -> tuple[ua.NodeId, ua.VariantType, Any] | None:
        """A node for an ``estimators.*`` key the first time the provider returns it."""
        if not key.startswith("estimators.") or self.server is None:
            return None
        vt = ua.VariantType.Boolean if isinstance(value, bool) else ua.VariantType.String if isinstance(value, str) \
            else ua.VariantType.Double
        parts = [camel(p) for p in key.split(".")[1:]]
        path = ".".join(["Estimators", *parts])
        b = NodeBatch(self.ns)
        for k in range(2, len(parts) + 1):
            p = ".".join(["Estimators", *parts[: k - 1]])
            if p not in self._made_objs:
                self._made_objs.add(p)
                b.obj(p)
        nid = b.var(VarSpec(path, vt, guess_unit(key.split(".")[-1]) if vt == ua.VariantType.Double else None, key))
        for res in await self.server.iserver.isession.add_nodes(b.items):
            if not res.StatusCode.is_good():
                return None
        self._est_nodes[key] = (nid, vt, None)
        return self._est_nodes[key]

    # -- slow loop: limits, diagnostics, summary -----------------------------------------------------

    async def _slow_loop(self) -> None:
        while True:
            try:
                await self._refresh_limits()
                await self._refresh_diagnostics()
            except Exception:  # counted in the push loop's stats; never fatal
                self.loop.errors += 1
                log.debug("OPC UA slow refresh failed", exc_info=True)
            await anyio.sleep(self.section.slow_period_s)

    async def _refresh_limits(self) -> None:
        if self.limits is None or self._write is None:
            return
        table = self.limits()
        srv = datetime.now(UTC)
        for (check, level), (nid, last) in list(self._limit_nodes.items()):
            entry = table.get(check)
            value = entry.get(level) if level and isinstance(entry, Mapping) else entry if not level else None
            if not isinstance(value, int | float) or value == last:
                continue
            await self._write(nid, ua.AttributeIds.Value, data_value(ua.Variant(float(value), ua.VariantType.Double),
                                                                     GOOD, srv, srv))
            self._limit_nodes[(check, level)] = (nid, value)
            self.stats.updates += 1
        for nid, spec in self._settings_by_node.items():
            if spec.limit is None:
                continue
            check, level = spec.limit
            entry = table.get(check)
            value = entry.get(level) if level and isinstance(entry, Mapping) else entry if not level else None
            if isinstance(value, int | float):
                key = f"setting:{spec.name}"
                if self._est_last.get(key) != value:
                    self._est_last[key] = value
                    await self._write(nid, ua.AttributeIds.Value,
                                      data_value(ua.Variant(float(value), ua.VariantType.Double), GOOD, srv, srv))

    async def _refresh_diagnostics(self) -> None:
        if self.server is None or self._write is None:
            return
        now = time.monotonic()
        count, mark = self._updates_mark
        if now > mark:
            self.stats.updates_per_s = (self.stats.updates - count) / (now - mark)
        self._updates_mark = (self.stats.updates, now)
        tree: dict[str, Any] = {"OpcUa": self.status()}
        if self.diagnostics is not None:
            tree.update(self.diagnostics())
        leaves = list(_flatten(tree))
        new = [(p, v) for p, v in leaves if p not in self._diag_nodes]
        if new:
            b = NodeBatch(self.ns)
            for path, value in new:
                parts = path.split(".")
                for k in range(1, len(parts)):
                    p = "Gateway.Diagnostics." + ".".join(parts[:k])
                    if p not in self._made_objs:
                        self._made_objs.add(p)
                        b.obj(p, folder=False)
                vt = _diag_type(value)
                nid = b.var(VarSpec("Gateway.Diagnostics." + path, vt, array=vt == ua.VariantType.Double and
                                 isinstance(value, list), description=path))
                self._diag_nodes[path] = (nid, vt, _MISSING)
            for res in await self.server.iserver.isession.add_nodes(b.items):
                if not res.StatusCode.is_good():
                    log.debug("diagnostics node not added: %s", res.StatusCode)
        srv = datetime.now(UTC)
        for path, value in leaves:
            nid, vt, last = self._diag_nodes[path]
            try:
                variant = _variant(value, vt, isinstance(value, list) and vt == ua.VariantType.Double)
            except (TypeError, ValueError, OverflowError):
                variant = ua.Variant(json.dumps(value, default=str), ua.VariantType.String) \
                    if vt == ua.VariantType.String else ua.Variant()
            if _same(last, variant.Value):
                continue
            self._diag_nodes[path] = (nid, vt, variant.Value)
            await self._write(nid, ua.AttributeIds.Value, data_value(variant, GOOD, srv, srv))

    # -- methods and writes ------------------------------------------------------------------------

    def _make_method(self, name: str) -> Callable[..., Any]:
        async def call(parent: ua.NodeId, *args: ua.Variant) -> ua.CallMethodResult:
            return await self._call(name, parent, args)
        return call

    async def _call(self, name: str, parent: ua.NodeId, args: Sequence[ua.Variant]) -> ua.CallMethodResult:
        res = ua.CallMethodResult()
        req = current_request()
        types = next(t for n, t in self._method_nodes.values() if n == name)
        if parent != self.root:
            res.StatusCode = status_code(ua.StatusCodes.BadMethodInvalid)
            return res
        if req is None or req.read_only or req.user is None or ROLE_RANK.get(req.user.bms_role, 0) < 1:
            self._refuse(f"{name} by {caller_name(req)}: needs operator")
            self.stats.calls_refused += 1
            res.StatusCode = status_code(ua.StatusCodes.BadUserAccessDenied)
            return res
        if len(args) < len(types):
            res.StatusCode = status_code(ua.StatusCodes.BadArgumentsMissing)
            return res
        if len(args) > len(types):
            res.StatusCode = status_code(ua.StatusCodes.BadTooManyArguments)
            return res
        checks = [ua.StatusCode() if a.VariantType == t and not a.is_array else
                  status_code(ua.StatusCodes.BadTypeMismatch) for a, t in zip(args, types, strict=True)]
        if any(not c.is_good() for c in checks):
            res.StatusCode = status_code(ua.StatusCodes.BadInvalidArgument)
            res.InputArgumentResults = checks
            return res
        handler = self.methods.get(name)
        values = [a.Value for a in args]
        if handler is None:
            ok, reason = False, f"{name} is not available on this gateway"
        else:
            async with self._serial():
                try:
                    ok, reason = await anyio.to_thread.run_sync(lambda: handler(*values))
                except Exception as exc:
                    log.exception("OPC UA method %s failed", name)
                    ok, reason = False, f"failed: {type(exc).__name__}: {exc}"
        self.stats.calls += 1
        if not ok:
            self.stats.calls_refused += 1
        user = req.user.name
        shown = ", ".join(str(v)[:AUDIT_ARG_CHARS] for v in values)  # the client chooses their length
        self.recorder(Event(Kind.INFO, f"opcua_{name}", Level.INFO, False,
                            message=f"OPC UA {name}({shown}) by {user}: "
                                    f"{'accepted' if ok else 'refused'}: {reason}"))
        res.OutputArguments = [ua.Variant(bool(ok), ua.VariantType.Boolean), ua.Variant(str(reason),
                                                                                        ua.VariantType.String)]
        return res

    async def _client_write(self, wv: ua.WriteValue, user: User) -> ua.StatusCode:
        req = current_request()
        who = caller_name(req)
        spec = self._settings_by_node.get(wv.NodeId)
        if spec is None or wv.AttributeId != ua.AttributeIds.Value:
            if self.server is None or wv.NodeId not in self.server.iserver.aspace:
                return status_code(ua.StatusCodes.BadNodeIdUnknown)
            self._refuse(f"write {wv.NodeId.to_string()} by {who}: not writable")
            return status_code(ua.StatusCodes.BadNotWritable)
        role = user.bms_role if isinstance(user, OpcuaIdentity) else "viewer"
        if req is None or req.read_only or ROLE_RANK.get(role, 0) < ROLE_RANK["engineer"]:
            self._refuse(f"write {spec.name} by {who}: needs engineer on a secured channel")
            return status_code(ua.StatusCodes.BadUserAccessDenied)
        if wv.IndexRange:
            return status_code(ua.StatusCodes.BadIndexRangeInvalid)
        variant = wv.Value.Value if wv.Value is not None else None
        vt = {"double": ua.VariantType.Double, "boolean": ua.VariantType.Boolean,
              "int32": ua.VariantType.Int32}[spec.kind]
        if variant is None or variant.VariantType != vt or variant.is_array:
            self._refuse(f"write {spec.name} by {who}: type {variant.VariantType.name if variant else None}, "
                         f"needs {vt.name}")
            return status_code(ua.StatusCodes.BadTypeMismatch)
        value = variant.Value
        if spec.kind != "boolean" and (not math.isfinite(float(value)) or not spec.low <= float(value) <= spec.high):
            self._refuse(f"write {spec.name}={value} by {who}: outside [{spec.low}, {spec.high}]")
            return status_code(ua.StatusCodes.BadOutOfRange)
        if self.write_setting is None:
            ok, reason = False, "settings are read-only on this gateway"
        else:
            writer = self.write_setting
            async with self._serial():
                try:
                    ok, reason = await anyio.to_thread.run_sync(lambda: writer(spec.name, value))
                except Exception as exc:
                    log.exception("OPC UA setting %s failed", spec.name)
                    ok, reason = False, f"failed: {type(exc).__name__}: {exc}"
        self.recorder(Event(Kind.INFO, "opcua_write", Level.INFO, False,
                            message=f"OPC UA write {spec.name}={value} by {who}: "
                                    f"{'accepted' if ok else 'refused'}: {reason}"))
        if not ok:
            self._refuse(f"write {spec.name}={value} by {who}: {reason}")
            return status_code(ua.StatusCodes.BadOutOfRange)
        self.stats.writes_accepted += 1
        now = datetime.now(UTC)
        if self._write is not None:
            await self._write(wv.NodeId, ua.AttributeIds.Value, data_value(ua.Variant(value, vt), GOOD, now, now))
        if spec.limit is not None:
            self._est_last[f"setting:{spec.name}"] = value
        return ua.StatusCode()

    def _serial(self) -> anyio.Lock:
        """Methods and setting writes run one at a time (in a worker thread each)."""
        if self._method_lock is None:
            self._method_lock = anyio.Lock()
        return self._method_lock

    def _refuse(self, what: str) -> None:
        if what.startswith("write"):
            self.stats.writes_refused += 1
        self.stats.last_refusal = what
        log.info("OPC UA refused: %s", what)


# -- helpers ---------------------------------------------------------------------------------------

_MISSING = object()


def _image_dv(kind: int, v: float, q: int, src: datetime | None, srv: datetime) -> SharedDataValue:
    if q >= Quality.INVALID:  # Bad: the value must not be used (asyncua would null it anyway)
        return data_value(ua.Variant(), STATUSES[q], src if q == Quality.INVALID else None, srv)
    if kind == KIND_DOUBLE:
        variant = ua.Variant(v, ua.VariantType.Double)
    elif kind == KIND_BOOL:
        variant = ua.Variant(v != 0.0, ua.VariantType.Boolean)
    elif -2147483648.0 <= v <= 2147483647.0:
        variant = ua.Variant(int(v), ua.VariantType.Int32)
    else:
        return data_value(ua.Variant(), STATUSES[Quality.INVALID], src, srv)
    return data_value(variant, STATUSES[q], src, srv)


def _coerce(value: Any, vt: ua.VariantType) -> Any:
    if vt == ua.VariantType.Boolean:
        return bool(value)
    if vt == ua.VariantType.Int32:
        return int(value)
    return float(value)


def _variant(value: Any, vt: ua.VariantType, array: bool) -> ua.Variant:
    if array:
        return ua.Variant([float(x) for x in np.asarray(value, dtype=np.float64).ravel()], vt)
    if vt == ua.VariantType.String:
        return ua.Variant(value if isinstance(value, str) else json.dumps(value, default=str), vt)
    if vt == ua.VariantType.DateTime:
        return ua.Variant(utc(float(value)), vt)
    if vt == ua.VariantType.Boolean:
        return ua.Variant(bool(value), vt)
    return ua.Variant(float(value), vt)


def _same(a: Any, b: Any) -> bool:
    if a is _MISSING:
        return False
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b)
    except Exception:
        return False


def _diag_type(value: Any) -> ua.VariantType:
    if isinstance(value, bool):
        return ua.VariantType.Boolean
    if isinstance(value, int | float):
        return ua.VariantType.Double
    if isinstance(value, list) and value and all(isinstance(x, int | float) and not isinstance(x, bool) for x in value):
        return ua.VariantType.Double
    return ua.VariantType.String


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    """Leaves of a diagnostics dict as ("Buses.Pack.FramesPerS", value); lists of named dicts by name."""
    for key, value in tree.items():
        path = f"{prefix}{camel(str(key))}"
        if isinstance(value, Mapping):
            yield from _flatten(value, path + ".")
        elif isinstance(value, list | tuple) and value and all(isinstance(x, Mapping) for x in value):
            for k, item in enumerate(value):
                label = item.get("name", k)
                yield from _flatten({kk: vv for kk, vv in item.items() if kk != "name"},
                                    f"{path}.{camel(str(label))}.")
        elif value is None:
            continue
        else:
            yield path, list(value) if isinstance(value, tuple) else value


def _argument(name: str, datatype: int, description: str) -> ua.Argument:
    arg = ua.Argument()
    arg.Name = name
    arg.DataType = node_id(datatype)
    arg.ValueRank = -1
    arg.Description = ua.LocalizedText(description)
    return arg


def _eu_ranges(limits: Mapping[str, Any], layout: Layout) -> dict[str, tuple[float, float]]:
    """EURange of the analog items: the MSL window of the limit table (normal operation stays inside)."""
    def msl(check: str) -> float | None:
        entry = limits.get(check)
        v = entry.get("msl") if isinstance(entry, Mapping) else None
        return float(v) if isinstance(v, int | float) else None

    out: dict[str, tuple[float, float]] = {"cell.soc": (0.0, 100.0), "pack.soc": (0.0, 100.0),
                                           "pack.soe": (0.0, 100.0), "pack.soh": (0.0, 100.0)}
    vlo, vhi = msl("cell_voltage_low"), msl("cell_voltage_high")
    if vlo is not None and vhi is not None:
        out["cell.voltage"] = (vlo, vhi)
        out["module.voltage"] = (vlo * layout.cells_per_module, vhi * layout.cells_per_module)
        per_string = layout.modules_per_string * layout.cells_per_module
        out["pack.voltage"] = out["pack.link_voltage"] = out["string.voltage"] = (vlo * per_string, vhi * per_string)
        out["*V"] = out["pack.voltage"]
        out["pack.charge_voltage_limit"] = out["pack.discharge_voltage_limit"] = out["pack.voltage"]
    tlo = [x for x in (msl("cell_temperature_low_charge"), msl("cell_temperature_low_discharge")) if x is not None]
    thi = [x for x in (msl("cell_temperature_high_charge"), msl("cell_temperature_high_discharge")) if x is not None]
    if tlo and thi:
        out["cell.temperature"] = out["module.temperature"] = out["cell.sot"] = (min(tlo), max(thi))
        out["*degC"] = out["cell.temperature"]
    ich, idis = msl("pack_current_charge"), msl("pack_current_discharge")
    if ich is not None and idis is not None:
        out["pack.current"] = out["string.current"] = out["*A"] = (-idis, ich)
        out["pack.charge_current_limit"] = (0.0, ich)
        out["pack.discharge_current_limit"] = (0.0, idis)
        if "pack.voltage" in out:
            vmax = out["pack.voltage"][1]
            out["pack.power"] = (-idis * vmax, ich * vmax)
    return out


__all__ = ["NAMESPACE_URI", "OpcuaServer", "OpcuaStats", "SettingSpec", "Node", "limit_settings"]
