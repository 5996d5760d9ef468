"""Building blocks of our OPC UA address space: node ids, statuses, engineering units,
immutable DataValues, and the batch that adds the nodes of one build step in one call.

gateway/opcua_server.py builds the BatterySystem model with them and
gateway/opcua_alarms.py its Alarms folder.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from asyncua import ua

ROOT = "BatterySystem"


def node_id(identifier: int | str, namespace: int = 0) -> ua.NodeId:
    """A NodeId (asyncua's constructor is loosely typed)."""
    return ua.NodeId(cast(Any, identifier), cast(Any, namespace))


def status_code(code: int) -> ua.StatusCode:
    """A StatusCode from one of ``ua.StatusCodes``."""
    return ua.StatusCode(cast(Any, code))


# -- statuses ---------------------------------------------------------------------------------

NEVER = 3  # our fourth quality: stale because never received (no measurement time to show)
STATUSES = (
    status_code(ua.StatusCodes.Good),
    status_code(ua.StatusCodes.UncertainLastUsableValue),
    status_code(ua.StatusCodes.BadSensorFailure),
    status_code(ua.StatusCodes.BadWaitingForInitialData),
)
GOOD = STATUSES[0]
WAITING = STATUSES[NEVER]

# -- engineering units (UNECE codes, OPC UA Part 8) -------------------------------------------

UNECE_URI = "http://www.opcfoundation.org/UA/units/un/cefact"
UNITS: dict[str, tuple[str, str, str]] = {
    "V": ("VLT", "V", "volt"),
    "A": ("AMP", "A", "ampere"),
    "W": ("WTT", "W", "watt"),
    "degC": ("CEL", "°C", "degree Celsius"),
    "%": ("P1", "%", "percent"),
    "ohm": ("OHM", "Ω", "ohm"),
    "F": ("FAR", "F", "farad"),
    "Hz": ("HTZ", "Hz", "hertz"),
    "deg": ("DD", "°", "degree (angle)"),
    "Ah": ("AMH", "A·h", "ampere hour"),
    "kWh": ("KWH", "kW·h", "kilowatt hour"),
    "h": ("HUR", "h", "hour"),
    "ms": ("C26", "ms", "millisecond"),
    "s": ("SEC", "s", "second"),
}


def unit_id(code: str) -> int:
    """UnitId of a UNECE common code as OPC UA Part 8 defines it (one byte per character)."""
    n = 0
    for ch in code:
        n = (n << 8) | ord(ch)
    return n


def eu_information(unit: str) -> ua.EUInformation:
    """The EngineeringUnits property value of one of our unit names (keys of UNITS)."""
    code, display, description = UNITS[unit]
    return ua.EUInformation(NamespaceUri=UNECE_URI, UnitId=unit_id(code), DisplayName=ua.LocalizedText(display),
                            Description=ua.LocalizedText(description))


def camel(name: str) -> str:
    """``cell_voltage_high`` -> ``CellVoltageHigh``; ``module.temperature_bad_data`` -> ``ModuleTemperatureBadData``."""
    parts = [p for p in re.split(r"[^A-Za-z0-9]+", name) if p]
    out = "".join(p[:1].upper() + p[1:] for p in parts)
    return out if out and not out[0].isdigit() else f"N{out}"


def guess_unit(name: str) -> str | None:
    """The unit a signal's name implies (voltage: V, ...), or None."""
    n = name.lower()
    for key, unit in (("voltage", "V"), ("current", "A"), ("temperature", "degC"), ("power", "W"),
                      ("resistance", "ohm")):
        if key in n:
            return unit
    if re.search(r"(^|_)(soc|soh|soe)$", n):
        return "%"
    return None


# -- DataValues that asyncua need not copy ---------------------------------------------------


class SharedDataValue(ua.DataValue):
    """A DataValue that is never changed after it is made, so one instance can be shared.

    asyncua deep-copies every written DataValue once per monitored item "to prevent
    referencing the inner value"; ours are never mutated (asyncua itself only ever
    replaces them), so the copy is skipped: the biggest cost of an update with several
    subscribers.
    """

    __slots__ = ()

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedDataValue:
        return self


def data_value(value: ua.Variant, status: ua.StatusCode, source: datetime | None,
               server: datetime | None) -> SharedDataValue:
    """A DataValue that monitored items share instead of copying."""
    return SharedDataValue(value, status, cast(Any, source), cast(Any, server))


def utc(t: float) -> datetime:
    """A UNIX time as an aware UTC datetime (OPC UA timestamps)."""
    return datetime.fromtimestamp(t, UTC)


DATATYPES = {
    ua.VariantType.Double: ua.ObjectIds.Double, ua.VariantType.Boolean: ua.ObjectIds.Boolean,
    ua.VariantType.Int32: ua.ObjectIds.Int32, ua.VariantType.UInt32: ua.ObjectIds.UInt32,
    ua.VariantType.String: ua.ObjectIds.String, ua.VariantType.DateTime: ua.ObjectIds.DateTime,
    ua.VariantType.Int64: ua.ObjectIds.Int64,
}


@dataclass
class VarSpec:
    """A variable to add: where, its type, unit and range, and whether clients may write it."""

    path: str
    vtype: ua.VariantType
    unit: str | None = None
    description: str = ""
    eu_range: tuple[float, float] | None = None
    writable: bool = False
    array: bool = False
    sampling_ms: float = 0.0


class NodeBatch:
    """AddNodesItems of one build step (parents before children)."""

    def __init__(self, ns: int) -> None:
        self.ns = ns
        self.items: list[ua.AddNodesItem] = []
        self.vars: list[tuple[ua.NodeId, VarSpec]] = []

    def nodeid(self, path: str) -> ua.NodeId:
        return node_id(f"{ROOT}.{path}" if path else ROOT, self.ns)

    def obj(self, path: str, description: str = "", folder: bool = False, notifier: bool = False,
            typedef: ua.NodeId | None = None, parent: ua.NodeId | None = None) -> ua.NodeId:
        name = path.rsplit(".", 1)[-1] or ROOT
        item = ua.AddNodesItem()
        item.RequestedNewNodeId = self.nodeid(path)
        item.BrowseName = ua.QualifiedName(name, self.ns)
        item.NodeClass = ua.NodeClass.Object
        item.ParentNodeId = parent if parent is not None else self.nodeid(path.rpartition(".")[0])
        item.ReferenceTypeId = node_id(ua.ObjectIds.Organizes if folder or parent is not None
                                     else ua.ObjectIds.HasComponent)
        item.TypeDefinition = typedef or node_id(ua.ObjectIds.FolderType if folder else ua.ObjectIds.BaseObjectType)
        attrs = ua.ObjectAttributes()
        attrs.DisplayName = ua.LocalizedText(name)
        attrs.Description = ua.LocalizedText(description or name)
        attrs.EventNotifier = 1 if notifier else 0
        attrs.WriteMask = attrs.UserWriteMask = 0
        item.NodeAttributes = attrs
        self.items.append(item)
        return item.RequestedNewNodeId

    def var(self, v: VarSpec) -> ua.NodeId:
        name = v.path.rsplit(".", 1)[-1]
        nid = self.nodeid(v.path)
        item = ua.AddNodesItem()
        item.RequestedNewNodeId = nid
        item.BrowseName = ua.QualifiedName(name, self.ns)
        item.NodeClass = ua.NodeClass.Variable
        item.ParentNodeId = self.nodeid(v.path.rpartition(".")[0])
        item.ReferenceTypeId = node_id(ua.ObjectIds.HasComponent)
        analog = v.vtype == ua.VariantType.Double and (v.unit is not None or v.eu_range is not None)
        item.TypeDefinition = node_id(ua.ObjectIds.AnalogItemType if analog else ua.ObjectIds.BaseDataVariableType)
        attrs = ua.VariableAttributes()
        attrs.DisplayName = ua.LocalizedText(name)
        attrs.Description = ua.LocalizedText(v.description or name)
        attrs.DataType = node_id(DATATYPES[v.vtype])
        attrs.ValueRank = 1 if v.array else -1
        attrs.ArrayDimensions = [0] if v.array else []
        attrs.Value = ua.Variant([] if v.array else None, v.vtype if v.array else ua.VariantType.Null)
        access = ua.AccessLevel.CurrentRead.mask | (ua.AccessLevel.CurrentWrite.mask if v.writable else 0)
        attrs.AccessLevel = attrs.UserAccessLevel = access
        attrs.MinimumSamplingInterval = v.sampling_ms
        attrs.Historizing = False
        attrs.WriteMask = attrs.UserWriteMask = 0
        item.NodeAttributes = attrs
        self.items.append(item)
        if v.unit is not None:
            self._property(nid, v.path + ".EngineeringUnits", ua.ObjectIds.EUInformation,
                           ua.Variant(eu_information(v.unit), ua.VariantType.ExtensionObject))
        if analog:
            lo, hi = v.eu_range or (-math.inf, math.inf)
            self._property(nid, v.path + ".EURange", ua.ObjectIds.Range,
                           ua.Variant(ua.Range(Low=lo, High=hi), ua.VariantType.ExtensionObject))
        self.vars.append((nid, v))
        return nid

    def _property(self, parent: ua.NodeId, path: str, datatype: int, value: ua.Variant) -> None:
        name = path.rsplit(".", 1)[-1]
        item = ua.AddNodesItem()
        item.RequestedNewNodeId = self.nodeid(path)
        item.BrowseName = ua.QualifiedName(name, 0)
        item.NodeClass = ua.NodeClass.Variable
        item.ParentNodeId = parent
        item.ReferenceTypeId = node_id(ua.ObjectIds.HasProperty)
        item.TypeDefinition = node_id(ua.ObjectIds.PropertyType)
        attrs = ua.VariableAttributes()
        attrs.DisplayName = ua.LocalizedText(name)
        attrs.Description = ua.LocalizedText(name)
        attrs.DataType = node_id(datatype)
        attrs.ValueRank = -1
        attrs.Value = value
        attrs.AccessLevel = attrs.UserAccessLevel = ua.AccessLevel.CurrentRead.mask
        item.NodeAttributes = attrs
        self.items.append(item)


def reference(source: Any, reftype: int, target: ua.NodeId) -> ua.AddReferencesItem:
    """A forward reference of type ``reftype`` from ``source`` (a NodeId or a standard node's number)."""
    ref = ua.AddReferencesItem()
    ref.SourceNodeId = source if isinstance(source, ua.NodeId) else node_id(source)
    ref.ReferenceTypeId = node_id(reftype)
    ref.IsForward = True
    ref.TargetNodeId = target
    ref.TargetNodeClass = ua.NodeClass.Object
    return ref
