"""Protection alarms of the OPC UA server: events, and conditions that operators acknowledge.

Protection events arrive from the Recorder's threads through a lock-free deque and are
published from the server's event loop: LIMIT, DATA and CONTACTOR events drive one
AlarmCondition per check (BatterySystem/Alarms/<Check>, active per element and level,
retained until an operator acknowledges it), the rest are plain BmsEventType events.
ConditionRefresh replays the retained conditions, and the variables under
BatterySystem/Alarms count and list what is active. The conditions outlive a restart of
the server (gateway/opcua_server.py, which builds the rest of the address space and
creates one :class:`Alarms`).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
from asyncua import Server, ua
from asyncua.common import event_objects, events

from gateway.events import Event, Kind, Level
from gateway.limits import CHECKS
from gateway.opcua_nodes import GOOD, ROOT, NodeBatch, VarSpec, camel, data_value, node_id, reference, status_code, utc
from gateway.opcua_security import ROLE_RANK, caller_name, current_request, current_session

if TYPE_CHECKING:
    from gateway.opcua_server import OpcuaStats

log = logging.getLogger(__name__)

SEVERITY = {Level.INFO: 100, Level.MOL: 300, Level.RSL: 600, Level.MSL: 900}
TRIP_SEVERITY = 1000
CONDITION_KINDS = (Kind.LIMIT, Kind.DATA, Kind.CONTACTOR)
YIELD_EVERY = 32  # events emitted between two yields to the event loop
BATCH = 1000  # events per summary update while a backlog drains

Key = tuple[str, str, int | None, Level]  # one element and level of a condition

Writer = Callable[[ua.NodeId, ua.AttributeIds, ua.DataValue], Awaitable[None]]


@dataclass
class _Condition:
    """One alarm condition (one protection check): which elements are active at which level."""

    kind: str
    name: str
    nodeid: ua.NodeId
    browse: str
    active: dict[tuple[int | None, Level], Event] = field(default_factory=dict)
    acked: bool = True
    event_id: bytes = b""
    severity: int = 0
    last_severity: int = 0
    comment: str = ""
    client_user: str = ""
    transition: datetime | None = None
    last: Event | None = None
    last_fields: Any = None  # the last event object sent (for ConditionRefresh)

    @property
    def is_active(self) -> bool:
        return bool(self.active)

    @property
    def retain(self) -> bool:
        return self.is_active or not self.acked


class Alarms:
    """Protection events as OPC UA events, and one acknowledgeable AlarmCondition per check.

    ``on_event`` is the Recorder subscriber; ``run`` publishes what it queued while the server
    serves. ``server()`` and ``write()`` return the running asyncua server and the value writer
    (None while there is none: both come and go with restarts, the conditions stay);
    ``refuse(what)`` counts and logs a refused request. ``stats`` is the server's, shared.
    """

    def __init__(self, stats: OpcuaStats, server: Callable[[], Server | None], write: Callable[[], Writer | None],
                 refuse: Callable[[str], None], max_pending: int = 10_000) -> None:
        self.stats = stats
        self.server = server
        self.write = write
        self.refuse = refuse
        self.max_pending = max_pending
        self.pending: deque[tuple[int, Event]] = deque()
        # when the deque is full, condition events wait here, the latest per element and level only: a clear
        # can never be lost (only other events are dropped)
        self.overflow: dict[Key, tuple[int, Event]] = {}
        self._seq = itertools.count()  # next() is atomic in CPython: the Recorder's threads need no lock
        self._done: dict[Key, int] = {}  # per element and level, the sequence number of the last emitted event
        self._draining = 0  # 1 while a drain runs: its events are out of the queues but not all published yet
        self.conditions: dict[tuple[str, str], _Condition] = {}
        self.ns = 0
        self.root = ua.NodeId()
        self._summary_nodes: dict[str, ua.NodeId] = {}

    def active_count(self) -> int:
        return sum(1 for c in list(self.conditions.values()) if c.is_active)

    # -- the address space --------------------------------------------------------------------------

    def add_folder(self, b: NodeBatch) -> None:
        """The Alarms folder and its summary variables, in the batch that builds the model."""
        b.obj("Alarms", "protection alarms (conditions; acknowledge with the Acknowledge method)", folder=True)
        self._summary_nodes = {
            "ActiveCount": b.var(VarSpec("Alarms.ActiveCount", ua.VariantType.UInt32, description="active conditions")),
            "UnacknowledgedCount": b.var(VarSpec("Alarms.UnacknowledgedCount", ua.VariantType.UInt32,
                                              description="conditions not acknowledged")),
            "Active": b.var(VarSpec("Alarms.Active", ua.VariantType.String, description="active conditions: check, "
                                 "level, element", array=True)),
        }

    async def build(self, server: Server, ns: int, root: ua.NodeId) -> None:
        """Event types, a condition object per check (known ones and any seen before a restart), and
        the Acknowledge and ConditionRefresh methods; ``root`` (in namespace ``ns``) is the event source."""
        self.ns, self.root = ns, root
        props = [("Kind", ua.VariantType.String), ("Check", ua.VariantType.String), ("Level", ua.VariantType.String),
                 ("Element", ua.VariantType.Int32), ("MeasuredValue", ua.VariantType.Double),
                 ("LimitValue", ua.VariantType.Double)]
        self.event_type = await server.create_custom_event_type(ns, "BmsEventType", ua.ObjectIds.BaseEventType, props)
        self.alarm_type = await server.create_custom_event_type(ns, "BmsAlarmType", ua.ObjectIds.AlarmConditionType,
                                                                props)
        self._event_template = await events.get_event_obj_from_type_node(self.event_type)
        self._alarm_template = await events.get_event_obj_from_type_node(self.alarm_type)
        for tmpl in (self._event_template, self._alarm_template):
            for name, vt in props:
                tmpl.add_property(name, None, vt)
        a = self._alarm_template
        a.add_property("NodeId", None, ua.VariantType.NodeId)  # ConditionId
        for name in ("ActiveState/TransitionTime", "AckedState/TransitionTime", "EnabledState/TransitionTime"):
            a.add_property(name, None, ua.VariantType.DateTime)
        known = [(Kind.LIMIT, c) for c in CHECKS] + [(Kind.LIMIT, "cell_deep_discharge")] + \
            [(Kind.DATA, n) for n in ("cell.voltage_bad_data", "module.temperature_bad_data", "pack.current_bad_data",
                                      "stale_data")] + \
            [(Kind.CONTACTOR, n) for n in ("main_positive", "main_negative", "precharge")]
        items = [self._condition_item(kind, name) for kind, name in dict.fromkeys([*known, *self.conditions])]
        for res in await server.iserver.isession.add_nodes([i for i, _ in items]):
            res.StatusCode.check()
        await server.iserver.isession.add_references([reference(self.root, ua.ObjectIds.HasCondition, c.nodeid)
                                                      for _, c in items])
        server.iserver.isession.add_method_callback(node_id(ua.ObjectIds.AcknowledgeableConditionType_Acknowledge),
                                                    self._acknowledge)
        for mid in (ua.ObjectIds.ConditionType_ConditionRefresh, ua.ObjectIds.ConditionType_ConditionRefresh2):
            server.iserver.isession.add_method_callback(node_id(mid), self._condition_refresh)

    def _condition_item(self, kind: str, name: str) -> tuple[ua.AddNodesItem, _Condition]:
        browse = camel(name) if kind != Kind.CONTACTOR else "Contactor" + camel(name)
        b = NodeBatch(self.ns)
        nid = b.obj(f"Alarms.{browse}", f"{kind} condition {name}", typedef=self.alarm_type.nodeid)
        cond = self.conditions.get((kind, name))
        if cond is None:
            cond = self.conditions[(kind, name)] = _Condition(kind, name, nid, browse)
        return b.items[0], cond

    # -- events and conditions ----------------------------------------------------------------------

    def backlog(self) -> int:
        """Events not yet published (queued, or in the batch being published)."""
        return len(self.pending) + len(self.overflow) + self._draining

    def on_event(self, event: Event) -> None:
        """Recorder subscriber: called from protection threads; never blocks."""
        item = (next(self._seq), event)
        key = _key(event)
        if key is not None and key in self.overflow:
            self.overflow[key] = item  # newer than anything queued for this key
        elif len(self.pending) < self.max_pending:
            self.pending.append(item)
        elif key is not None:
            self.overflow[key] = item
        else:
            self.stats.events_dropped += 1

    async def run(self) -> None:
        """Publish the queued events until cancelled (while the server serves)."""
        while True:
            while self.pending or self.overflow:
                await self.drain()
            await anyio.sleep(0.05)

    async def drain(self) -> None:
        """Emit up to BATCH queued events, then what overflowed; yield every few; one summary at the end."""
        when: datetime | None = None
        self._draining = 1
        try:
            batch = [self.pending.popleft() for _ in range(min(BATCH, len(self.pending)))]
            batch += [self.overflow.popitem()[1] for _ in range(len(self.overflow))]
            for k, (seq, ev) in enumerate(batch):
                key = _key(ev)
                if key is not None:
                    if self._done.get(key, -1) > seq:
                        continue  # older than what this element already shows (it overflowed meanwhile)
                    self._done[key] = seq
                try:
                    if await self._emit(ev):
                        when = utc(ev.time)
                except Exception:
                    log.exception("OPC UA event %s not emitted", ev.name)
                if k % YIELD_EVERY == YIELD_EVERY - 1:
                    await anyio.sleep(0)
            if when is not None:
                await self.publish_summary(when)
        finally:
            self._draining = 0

    async def _emit(self, ev: Event) -> bool:
        """Send one event; True when it changed a condition (the summary needs writing)."""
        if ev.kind in CONDITION_KINDS:
            cond = self.conditions.get((ev.kind, ev.name))
            if cond is None:
                cond = await self._new_condition(ev.kind, ev.name)
            key = (ev.index, ev.level)
            was_active = cond.is_active
            if ev.active:
                if key not in cond.active:
                    cond.acked = False
                cond.active[key] = ev
            else:
                cond.active.pop(key, None)
            sev = max((SEVERITY.get(lv, 100) for _, lv in cond.active), default=SEVERITY.get(ev.level, 100))
            cond.last_severity, cond.severity = cond.severity, sev
            if cond.is_active != was_active or cond.transition is None:
                cond.transition = utc(ev.time)
            cond.last = ev
            await self._send_condition(cond, ev.message, utc(ev.time), ev)
            return True
        e: Any = copy.copy(self._event_template)
        e.EventId = uuid.uuid4().bytes
        e.Time = utc(ev.time)
        e.ReceiveTime = datetime.now(UTC)
        e.Message = ua.LocalizedText(ev.message or ev.name)
        e.Severity = TRIP_SEVERITY if ev.kind == Kind.TRIP else SEVERITY.get(ev.level, 100)
        e.SourceNode = self.root
        e.SourceName = ROOT
        _fill_bms(e, ev)
        await self._trigger(e)
        return False

    async def _new_condition(self, kind: str, name: str) -> _Condition:
        item, cond = self._condition_item(kind, name)
        server = self.server()
        if server is not None:
            (res,) = await server.iserver.isession.add_nodes([item])
            if not res.StatusCode.is_good():
                log.warning("condition node %s not added: %s", cond.nodeid, res.StatusCode)
        return cond

    async def _send_condition(self, cond: _Condition, message: str, when: datetime, ev: Event | None) -> None:
        e: Any = copy.copy(self._alarm_template)
        cond.event_id = uuid.uuid4().bytes
        e.EventId = cond.event_id
        e.Time = when
        e.ReceiveTime = datetime.now(UTC)
        e.Message = ua.LocalizedText(message)
        e.Severity = cond.severity
        e.SourceNode = self.root
        e.SourceName = ROOT
        e.ConditionName = cond.browse
        e.ConditionClassId = node_id(ua.ObjectIds.ProcessConditionClassType)
        e.ConditionClassName = ua.LocalizedText("Process")
        e.BranchId = ua.NodeId()
        e.Retain = cond.retain
        e.NodeId = cond.nodeid
        e.EnabledState = ua.LocalizedText("Enabled")
        setattr(e, "EnabledState/Id", True)
        e.Quality = GOOD
        e.LastSeverity = cond.last_severity
        e.Comment = ua.LocalizedText(cond.comment)
        e.ClientUserId = cond.client_user
        e.AckedState = ua.LocalizedText("Acknowledged" if cond.acked else "Unacknowledged")
        setattr(e, "AckedState/Id", cond.acked)
        e.ActiveState = ua.LocalizedText("Active" if cond.is_active else "Inactive")
        setattr(e, "ActiveState/Id", cond.is_active)
        setattr(e, "ActiveState/TransitionTime", cond.transition)
        e.SuppressedOrShelved = False
        e.InputNode = ua.NodeId()
        if ev is not None:
            _fill_bms(e, ev)
        elif cond.last is not None:
            _fill_bms(e, cond.last)
        cond.last_fields = e
        await self._trigger(e)

    async def _trigger(self, e: Any) -> None:
        server = self.server()
        if server is None:
            return
        svc = server.iserver.subscription_service
        for notifier in (node_id(ua.ObjectIds.Server), self.root):
            one = copy.copy(e)
            one.emitting_node = notifier
            for sub in list(svc.subscriptions.values()):
                await sub.monitored_item_srv.trigger_event(one)
        self.stats.events_emitted += 1

    async def publish_summary(self, when: datetime) -> None:
        """Write the Alarms summary variables (counts, active list) with ``when`` as their time."""
        write = self.write()
        if write is None:
            return
        active = [c for c in self.conditions.values() if c.is_active]
        rows = [f"{c.browse} {lv.name} {'' if el is None else el}".strip()
                for c in active for (el, lv) in sorted(c.active, key=lambda k: (-k[1], k[0] or 0))]
        srv = datetime.now(UTC)
        values = {
            "ActiveCount": ua.Variant(len(active), ua.VariantType.UInt32),
            "UnacknowledgedCount": ua.Variant(sum(1 for c in self.conditions.values() if not c.acked),
                                              ua.VariantType.UInt32),
            "Active": ua.Variant(rows, ua.VariantType.String),
        }
        for name, variant in values.items():
            await write(self._summary_nodes[name], ua.AttributeIds.Value, data_value(variant, GOOD, when, srv))

    # -- methods ------------------------------------------------------------------------------------

    async def _acknowledge(self, parent: ua.NodeId, *args: ua.Variant) -> ua.CallMethodResult:
        res = ua.CallMethodResult()
        req = current_request()
        cond = next((c for c in self.conditions.values() if c.nodeid == parent), None)
        if cond is None:
            res.StatusCode = status_code(ua.StatusCodes.BadNodeIdInvalid)
            return res
        if req is None or req.read_only or req.user is None or ROLE_RANK.get(req.user.bms_role, 0) < 1:
            self.refuse(f"Acknowledge {cond.browse} by {caller_name(req)}: needs operator")
            res.StatusCode = status_code(ua.StatusCodes.BadUserAccessDenied)
            return res
        if len(args) != 2:
            res.StatusCode = status_code(ua.StatusCodes.BadArgumentsMissing if len(args) < 2
                                         else ua.StatusCodes.BadTooManyArguments)
            return res
        event_id, comment = args[0].Value, args[1].Value
        if args[0].VariantType != ua.VariantType.ByteString or args[1].VariantType != ua.VariantType.LocalizedText:
            res.StatusCode = status_code(ua.StatusCodes.BadInvalidArgument)
            res.InputArgumentResults = [status_code(ua.StatusCodes.BadTypeMismatch)
                                        if a.VariantType != t else ua.StatusCode()
                                        for a, t in zip(args[:2], (ua.VariantType.ByteString,
                                                                   ua.VariantType.LocalizedText), strict=True)]
            return res
        if bytes(event_id or b"") != cond.event_id:
            res.StatusCode = status_code(ua.StatusCodes.BadEventIdUnknown)
            return res
        if cond.acked:
            res.StatusCode = status_code(ua.StatusCodes.BadConditionBranchAlreadyAcked)
            return res
        cond.acked = True
        cond.comment = (comment.Text if isinstance(comment, ua.LocalizedText) else "") or ""
        cond.client_user = req.user.name or ""
        cond.last_severity = cond.severity
        self.stats.calls += 1
        await self._send_condition(cond, f"{cond.browse} acknowledged by {cond.client_user}"
                                   + (f": {cond.comment}" if cond.comment else ""), datetime.now(UTC), None)
        await self.publish_summary(datetime.now(UTC))
        return res

    async def _condition_refresh(self, parent: ua.NodeId, *args: ua.Variant) -> ua.CallMethodResult:
        res = ua.CallMethodResult()
        server = self.server()
        if server is None or not args:
            res.StatusCode = status_code(ua.StatusCodes.BadArgumentsMissing)
            return res
        if len(args) > 2:
            res.StatusCode = status_code(ua.StatusCodes.BadTooManyArguments)
            return res
        if any(a.VariantType != ua.VariantType.UInt32 or a.is_array for a in args):
            res.StatusCode = status_code(ua.StatusCodes.BadTypeMismatch)
            return res
        sub = server.iserver.subscription_service.subscriptions.get(args[0].Value)
        if sub is None or sub.session_id != current_session():  # only the caller's own subscriptions
            res.StatusCode = status_code(ua.StatusCodes.BadSubscriptionIdInvalid)
            return res
        only = args[1].Value if len(args) > 1 else None
        mis = sub.monitored_item_srv
        for notifier in (node_id(ua.ObjectIds.Server), self.root):
            mids = [m for m in mis._monitored_events.get(notifier, []) if only is None or m == only]
            for start_end in (event_objects.RefreshStartEvent, None, event_objects.RefreshEndEvent):
                batch: list[Any] = []
                if start_end is None:
                    batch = [c.last_fields for c in self.conditions.values() if c.retain and c.last_fields]
                else:
                    marker: Any = start_end(sourcenode=node_id(ua.ObjectIds.Server))
                    marker.EventId = uuid.uuid4().bytes
                    marker.Time = marker.ReceiveTime = datetime.now(UTC)
                    marker.Severity = 100
                    marker.SourceName = "Server"
                    marker.Message = ua.LocalizedText("ConditionRefresh")
                    batch = [marker]
                for e in batch:
                    one = copy.copy(e)
                    one.emitting_node = notifier
                    for mid in mids:
                        await mis.trigger_event(one, mid)
        return res


def _key(ev: Event) -> Key | None:
    """The condition element and level an event sets (None: not a condition event)."""
    return (ev.kind, ev.name, ev.index, ev.level) if ev.kind in CONDITION_KINDS else None


def _fill_bms(e: Any, ev: Event) -> None:
    """The BmsEventType/BmsAlarmType properties of an event object, from the protection event."""
    e.Kind = ev.kind
    e.Check = ev.name
    e.Level = ev.level.name
    e.Element = -1 if ev.index is None else int(ev.index)
    e.MeasuredValue = math.nan if ev.value is None else float(ev.value)
    e.LimitValue = math.nan if ev.limit is None else float(ev.limit)
