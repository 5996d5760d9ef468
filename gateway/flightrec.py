"""Flight recorder: the last seconds of raw frames of a bus, frozen around a trip.

The receive thread appends every frame into fixed ring buffers (no allocation
per frame); after a trip the window from ``before_s`` ahead of it to
``after_s`` after it is copied out as a FlightRecord for the cloud.
"""

from __future__ import annotations

import math
from array import array

import can
import numpy as np

from gateway.events import FlightRecord


class FrameRing:
    """A fixed-size ring of frames: timestamp, ID (bit 31 = 29-bit), length, payload."""

    def __init__(self, capacity: int, width: int = 8) -> None:
        self.capacity = capacity
        self.width = width
        self.ts = array("d", [math.nan]) * capacity
        self.ids = array("I", [0]) * capacity
        self.lens = array("B", [0]) * capacity
        self.data = bytearray(capacity * width)
        self.count = 0  # frames ever appended

    def append(self, msg: can.Message) -> None:
        i = self.count % self.capacity
        self.ts[i] = msg.timestamp
        self.ids[i] = msg.arbitration_id | (0x80000000 if msg.is_extended_id else 0)
        d = msg.data
        n = min(len(d), self.width)
        self.lens[i] = n
        o = i * self.width
        self.data[o:o + n] = d[:n]
        self.count += 1

    def window(self, t0: float, t1: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Copies of the frames with t0 <= timestamp <= t1, oldest first."""
        n = min(self.count, self.capacity)
        start = self.count - n
        order = (np.arange(start, self.count) % self.capacity).astype(np.intp)
        ts = np.frombuffer(self.ts, dtype=np.float64)[order]
        keep = order[(ts >= t0) & (ts <= t1)]
        data = np.frombuffer(self.data, dtype=np.uint8).reshape(self.capacity, self.width)
        return (np.frombuffer(self.ts, dtype=np.float64)[keep].copy(),
                np.frombuffer(self.ids, dtype=np.uint32)[keep].copy(),
                np.frombuffer(self.lens, dtype=np.uint8)[keep].copy(), data[keep].copy())


def freeze(ring: FrameRing, bus: str, trip_event: int, trip_time: float, before_s: float,
           after_s: float) -> FlightRecord:
    """The flight record of one bus around a trip."""
    ts, ids, lens, data = ring.window(trip_time - before_s, trip_time + after_s)
    return FlightRecord(trip_event, bus, ts, ids, lens, data, before_s, after_s)
