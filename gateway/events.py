"""Event records and the recorder interface that protection, OPC UA and the cloud link share."""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from time import monotonic
from time import time as wall_clock
from typing import Any, Protocol


class Level(IntEnum):
    """Severity of a limit crossing (foxBMS' three levels) or of another event."""

    INFO = 0
    MOL = 1  # maximum operating limit: information
    RSL = 2  # recommended safety limit: warning, derate
    MSL = 3  # maximum safety limit: trip (contactors open)


class Kind:
    """Event kinds (strings, so consumers in other languages read them as they are)."""

    LIMIT = "limit"  # a limit crossed (or cleared) at a level
    DATA = "data"  # missing, stale, implausible or invalid data
    TRIP = "trip"  # contactors commanded open by protection
    STATE = "state"  # contactor state machine transition
    RESET = "reset"  # reset requested: accepted or refused
    DEADLINE = "deadline"  # the protection lane missed its deadline
    CONTACTOR = "contactor"  # contactor feedback supervision
    INFO = "info"


_ids = itertools.count(1)


@dataclass(frozen=True)
class Event:
    """One event: what happened, where, the value and the limit."""

    kind: str
    name: str  # the check or subject, e.g. "cell_voltage_high", "precharge"
    level: Level = Level.INFO
    active: bool = True  # False: the condition has cleared
    index: int | None = None  # cell / module / sensor index where it applies
    value: float | None = None
    limit: float | None = None
    message: str = ""
    time: float = field(default_factory=wall_clock)  # wall clock, for records
    mono: float = field(default_factory=monotonic)  # for ordering and ages
    id: int = field(default_factory=lambda: next(_ids))

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["level"] = self.level.name
        return d


class EventSink(Protocol):
    """Anything that takes events (the recorder, OPC UA alarms, the cloud link)."""

    def __call__(self, event: Event) -> None: ...


@dataclass
class FlightRecord:
    """Raw frames around a trip: columns of equal length, wall-clock timestamps."""

    trip_event: int
    bus: str
    timestamp: Any  # float64 array
    frame_id: Any  # uint32 array (bit 31 set: 29-bit ID)
    length: Any  # uint8 array
    data: Any  # uint8 array (n, width)
    before_s: float
    after_s: float


class Recorder:
    """Keeps recent events and flight records in memory and fans them out to subscribers.

    Thread-safe: protection publishes from the receive and supervision threads.
    Subscribers must not block (they queue for their own loops).
    """

    def __init__(self, keep_events: int = 2000, keep_records: int = 10) -> None:
        self._lock = threading.Lock()
        self.events: deque[Event] = deque(maxlen=keep_events)
        self.flight_records: deque[FlightRecord] = deque(maxlen=keep_records)
        self.subscribers: list[Callable[[Event], None]] = []
        self.record_subscribers: list[Callable[[FlightRecord], None]] = []

    def __call__(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)
        for sub in self.subscribers:
            sub(event)

    def add_flight_record(self, record: FlightRecord) -> None:
        with self._lock:
            self.flight_records.append(record)
        for sub in self.record_subscribers:
            sub(record)

    def recent(self, n: int = 100) -> list[Event]:
        """The last ``n`` events, oldest first (none for ``n`` <= 0)."""
        with self._lock:
            return list(self.events)[-n:] if n > 0 else []
