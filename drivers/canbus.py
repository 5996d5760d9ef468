"""CAN adapters: any python-can interface, a receive thread, reconnect with backoff.

The receive thread hands each frame straight to a sink (the decoder) without
passing through the event loop, so frames are decoded in arrival order with
their adapter/kernel timestamps, whatever the loop is busy with.  When the
adapter disappears (USB unplugged, TCP peer gone, interface down) the thread
closes it, counts the failure and reopens it with exponential backoff and
jitter: the delay doubles after every failure, also when the bus opened but
failed at once, and starts over only after a session that delivered a frame or
stayed up ``reconnect_max_s``.  A malformed frame from the adapter (a garbled
SLCAN line) is counted in ``bad_frames`` and skipped.  An exception from the
sink (or a tap) costs only its frame: it is counted and logged, and the thread
goes on with the next frame.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import can

log = logging.getLogger(__name__)

# SocketCAN error-frame classes (linux/can/error.h), carried in the ID of error frames
CAN_ERR_CRTL = 0x00000004
CAN_ERR_BUSOFF = 0x00000040
CAN_ERR_CRTL_RX_OVERFLOW = 0x01
CAN_ERR_CRTL_TX_OVERFLOW = 0x02

# a sink failing on every frame logs once per interval (with the count of the rest), not per frame
SINK_LOG_INTERVAL_S = 10.0
# this many unparsable frames in a row mean the adapter's stream is out of step: reopen it
MAX_BAD_FRAMES_IN_A_ROW = 100

Sink = Callable[[can.Message], object]


def socket_address(channel: str) -> tuple[str, int] | str:
    """Host and port of a pyserial ``socket://HOST:PORT`` channel, or why it has none.

    Parsed as pyserial does (urlsplit), so ``socket://[::1]:PORT`` -- the form
    SlcanServer.url gives for IPv6 -- is host ``::1``.
    """
    parts = urlsplit(channel)
    try:
        port = parts.port
    except ValueError:  # not a number, or beyond 65535
        port = -1
    if not parts.hostname:
        return "no host"
    if port is None:
        return "no port"
    if not 0 < port <= 0xFFFF:
        return "bad port (a number 1..65535)"
    return parts.hostname, port


@dataclass(frozen=True)
class AdapterSettings:
    """How to open one bus with python-can."""

    name: str
    interface: str
    channel: str
    bitrate: int = 500_000
    fd: bool = False
    data_bitrate: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0

    def bus_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"interface": self.interface, "channel": self.channel}
        # socketcan and virtual take their bitrate from the system / ignore it
        if self.interface not in ("socketcan", "virtual"):
            kw["bitrate"] = self.bitrate
        if self.fd:
            kw["fd"] = True
            if self.data_bitrate and self.interface not in ("socketcan", "virtual"):
                kw["data_bitrate"] = self.data_bitrate
        kw.update(self.options)
        return kw


@dataclass
class AdapterStats:
    """Counters of one adapter (monotonic; rates are derived by the reader)."""

    state: str = "starting"  # starting, up, down, stopped
    frames: int = 0
    error_frames: int = 0
    bus_off: int = 0
    rx_overflow: int = 0
    tx_overflow: int = 0
    tx_frames: int = 0
    tx_errors: int = 0
    opens: int = 0
    failures: int = 0
    sink_errors: int = 0  # frames whose sink or tap raised (the frame is lost, reception goes on)
    bad_frames: int = 0  # frames the adapter's driver could not parse (skipped, reception goes on)
    last_error: str = ""


class CanAdapter:
    """One CAN bus: opens it, runs the receive thread, sends, reconnects."""

    def __init__(self, settings: AdapterSettings, sink: Sink,
                 open_bus: Callable[..., can.BusABC] = can.Bus) -> None:
        self.settings = settings
        self.sink = sink
        self.stats = AdapterStats()
        self.taps: list[Sink] = []  # extra observers (live candump); must not block
        self._open_bus = open_bus
        self._bus: can.BusABC | None = None
        self._tx_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sink_log_at = -math.inf  # monotonic time of the last logged sink error
        self._sink_unlogged = 0  # sink errors since then

    def start(self) -> None:
        """Start the receive thread (it opens the bus)."""
        self._thread = threading.Thread(target=self._run, name=f"can-rx-{self.settings.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread and close the bus."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._close()
        self.stats.state = "stopped"

    @property
    def alive(self) -> bool:
        """The receive thread runs (it may be waiting to reopen the adapter)."""
        return self._thread is not None and self._thread.is_alive()

    def send(self, msg: can.Message) -> bool:
        """Send a frame; False (and counted) when the bus is down or refuses it."""
        bus = self._bus
        if bus is None:
            self.stats.tx_errors += 1
            return False
        try:
            with self._tx_lock:
                bus.send(msg, timeout=0.05)
        except (can.CanError, OSError, ValueError) as exc:
            self.stats.tx_errors += 1
            self.stats.last_error = f"send: {exc}"
            return False
        self.stats.tx_frames += 1
        return True

    def _open(self) -> bool:
        try:
            self._bus = self._open_bus(**self.settings.bus_kwargs())
        except Exception as exc:  # python-can raises many types for a missing adapter
            self._fail(f"open: {exc}")
            return False
        self.stats.opens += 1
        self.stats.state = "up"
        log.info("bus %s up (%s %s)", self.settings.name, self.settings.interface, self.settings.channel)
        return True

    def _close(self) -> None:
        bus, self._bus = self._bus, None
        if bus is not None:
            try:
                bus.shutdown()
            except Exception as exc:  # closing a dead adapter may fail; nothing to do about it
                log.debug("bus %s shutdown: %s", self.settings.name, exc)

    def _fail(self, reason: str) -> None:
        self.stats.failures += 1
        self.stats.last_error = reason
        if self.stats.state != "down":
            log.warning("bus %s down: %s", self.settings.name, reason)
        self.stats.state = "down"

    def _run(self) -> None:
        s = self.settings
        delay = s.reconnect_min_s
        while not self._stop.is_set():
            if self._open():
                opened, frames = time.monotonic(), self.stats.frames
                self._receive()
                # only a healthy session starts the backoff over: a bus that opens and fails at
                # once (interface down, peer closing) would otherwise be reopened in a tight loop
                if self.stats.frames > frames or time.monotonic() - opened >= s.reconnect_max_s:
                    delay = s.reconnect_min_s
            # jitter keeps several gateways from hammering a shared resource in step
            if self._stop.wait(delay * random.uniform(0.8, 1.2)):
                break
            delay = min(delay * 2, s.reconnect_max_s)

    def _receive(self) -> None:
        bus = self._bus
        assert bus is not None
        recv, sink, stats, stop, taps = bus.recv, self.sink, self.stats, self._stop, self.taps
        bad_in_a_row = 0
        while not stop.is_set():
            try:
                msg = recv(0.2)
            except (ValueError, IndexError) as exc:
                # python-can's text protocols (slcan) raise these on one garbled line; the adapter is fine
                stats.bad_frames += 1
                stats.last_error = f"receive: bad frame: {type(exc).__name__}: {exc}"
                bad_in_a_row += 1
                if bad_in_a_row < MAX_BAD_FRAMES_IN_A_ROW:
                    continue
                self._fail(f"receive: {bad_in_a_row} bad frames in a row, last: {exc}")
                self._close()
                return
            except Exception as exc:  # CanOperationError, OSError, ...: adapter gone, reopen from _run
                self._fail(f"receive: {exc}")
                self._close()
                return
            if msg is None:
                continue
            bad_in_a_row = 0
            stats.frames += 1
            if msg.is_error_frame:
                self._error_frame(msg)
                continue
            # a raising sink must not end the thread: every later frame would go undecoded and unprotected
            try:
                sink(msg)
            except Exception as exc:
                self._sink_failed("sink", msg, exc)
            if taps:
                for tap in taps:
                    try:
                        tap(msg)
                    except Exception as exc:
                        self._sink_failed("tap", msg, exc)

    def _sink_failed(self, what: str, msg: can.Message, exc: Exception) -> None:
        """Count a frame the sink or a tap raised on; log it with its traceback, rate-limited."""
        s = self.stats
        s.sink_errors += 1
        s.last_error = f"{what}: {type(exc).__name__}: {exc}"
        now = time.monotonic()
        if now - self._sink_log_at < SINK_LOG_INTERVAL_S:
            self._sink_unlogged += 1
            return
        unlogged, self._sink_unlogged, self._sink_log_at = self._sink_unlogged, 0, now
        log.error("bus %s: the %s raised on frame 0x%X; frame dropped, receiving goes on "
                  "(errors so far: %d, unreported since the last report: %d; one report per %.0f s at most)",
                  self.settings.name, what, msg.arbitration_id, s.sink_errors, unlogged, SINK_LOG_INTERVAL_S,
                  exc_info=exc)

    def _error_frame(self, msg: can.Message) -> None:
        s = self.stats
        s.error_frames += 1
        cls = msg.arbitration_id
        if cls & CAN_ERR_BUSOFF:
            s.bus_off += 1
        if cls & CAN_ERR_CRTL and len(msg.data) > 1:
            s.rx_overflow += bool(msg.data[1] & CAN_ERR_CRTL_RX_OVERFLOW)
            s.tx_overflow += bool(msg.data[1] & CAN_ERR_CRTL_TX_OVERFLOW)
        for tap in self.taps:
            try:
                tap(msg)
            except Exception as exc:
                self._sink_failed("tap", msg, exc)
