"""CAN adapters on python-can's virtual bus: frames, error counters, FD, 29-bit IDs, reconnect, a failing sink."""

from __future__ import annotations

import logging
import threading
from typing import Any

import can
import pytest

from drivers.canbus import CAN_ERR_BUSOFF, CAN_ERR_CRTL, AdapterSettings, CanAdapter
from tests.procs import wait_for


def _adapter(channel: str, sink: Any, **kw: Any) -> CanAdapter:
    return CanAdapter(AdapterSettings("t", "virtual", channel, reconnect_min_s=0.01, reconnect_max_s=0.05, **kw), sink)


def test_frames_fd_and_extended_reach_the_sink_with_their_timestamps() -> None:
    got: list[can.Message] = []
    a = _adapter("canbus-t1", got.append, fd=True)
    a.start()
    wait_for(lambda: a.stats.state == "up", what="bus up")
    with can.Bus(interface="virtual", channel="canbus-t1", fd=True) as peer:
        sent = [
            can.Message(arbitration_id=0x123, data=b"\x01\x02", is_extended_id=False, timestamp=1000.5),
            can.Message(arbitration_id=0x1ABCDEF0, data=bytes(range(8)), is_extended_id=True, timestamp=1001.0),
            can.Message(arbitration_id=0x456, data=bytes(range(64)), is_fd=True, bitrate_switch=True, timestamp=1002.0),
        ]
        for m in sent:
            peer.send(m)
        wait_for(lambda: len(got) == 3, what="three frames")
    a.stop()
    for s, g in zip(sent, got, strict=True):
        assert (g.arbitration_id, g.is_extended_id, g.is_fd, bytes(g.data)) == \
            (s.arbitration_id, s.is_extended_id, s.is_fd, bytes(s.data))
    assert a.stats.frames == 3 and a.stats.state == "stopped"


def test_error_frames_are_counted_and_classified_not_decoded() -> None:
    got: list[can.Message] = []
    a = _adapter("canbus-t2", got.append)
    a.start()
    wait_for(lambda: a.stats.state == "up", what="bus up")
    with can.Bus(interface="virtual", channel="canbus-t2") as peer:
        peer.send(can.Message(arbitration_id=CAN_ERR_BUSOFF, is_error_frame=True, data=bytes(8)))
        peer.send(can.Message(arbitration_id=CAN_ERR_CRTL, is_error_frame=True, data=bytes([0, 0x01, 0, 0, 0, 0, 0, 0])))
        peer.send(can.Message(arbitration_id=0x100, data=bytes(8)))
        wait_for(lambda: a.stats.frames == 3, what="three frames")
    a.stop()
    assert a.stats.error_frames == 2 and a.stats.bus_off == 1 and a.stats.rx_overflow == 1
    assert [m.arbitration_id for m in got] == [0x100]


def test_adapter_that_cannot_open_is_retried_with_backoff_until_it_appears() -> None:
    attempts: list[dict[str, Any]] = []
    appear = threading.Event()

    def open_bus(**kw: Any) -> can.BusABC:
        attempts.append(kw)
        if not appear.is_set():
            raise can.CanInitializationError("no such device")
        return can.Bus(interface="virtual", channel="canbus-t3")

    a = CanAdapter(AdapterSettings("t", "socketcan", "can9", reconnect_min_s=0.01, reconnect_max_s=0.04),
                   lambda m: None, open_bus=open_bus)
    a.start()
    wait_for(lambda: len(attempts) >= 4, what="retries")
    assert a.stats.state == "down" and "no such device" in a.stats.last_error
    appear.set()
    wait_for(lambda: a.stats.state == "up", what="bus up once the adapter exists")
    a.stop()
    assert attempts[0] == {"interface": "socketcan", "channel": "can9"}  # socketcan takes its bitrate from ip link
    assert a.stats.failures >= 4 and a.stats.opens == 1


def test_send_counts_success_and_refusal() -> None:
    a = _adapter("canbus-t4", lambda m: None)
    assert not a.send(can.Message(arbitration_id=1))  # not open yet
    a.start()
    wait_for(lambda: a.stats.state == "up", what="bus up")
    with can.Bus(interface="virtual", channel="canbus-t4") as peer:
        assert a.send(can.Message(arbitration_id=0x110, data=b"\x07"))
        msg = peer.recv(2.0)
    a.stop()
    assert msg is not None and msg.arbitration_id == 0x110
    assert a.stats.tx_frames == 1 and a.stats.tx_errors == 1


def test_bus_kwargs_per_interface() -> None:
    assert AdapterSettings("x", "pcan", "PCAN_USBBUS1", bitrate=250_000, fd=True, data_bitrate=2_000_000).bus_kwargs() \
        == {"interface": "pcan", "channel": "PCAN_USBBUS1", "bitrate": 250_000, "fd": True, "data_bitrate": 2_000_000}
    assert AdapterSettings("x", "slcan", "socket://127.0.0.1:1", options={"ttyBaudrate": 115200}).bus_kwargs() == \
        {"interface": "slcan", "channel": "socket://127.0.0.1:1", "bitrate": 500_000, "ttyBaudrate": 115200}


def test_a_sink_that_raises_loses_that_frame_only(caplog: pytest.LogCaptureFixture) -> None:
    """The receive thread outlives a failing sink: a dead thread would leave protection blind."""
    got: list[int] = []

    def sink(msg: can.Message) -> None:
        if msg.arbitration_id == 0x101:
            raise OSError(30, "Read-only file system")  # as a latch write on a failing SD card
        got.append(msg.arbitration_id)

    caplog.set_level(logging.ERROR, logger="drivers.canbus")
    a = _adapter("canbus-t5", sink)
    a.start()
    wait_for(lambda: a.stats.state == "up", what="bus up")
    with can.Bus(interface="virtual", channel="canbus-t5") as peer:
        for fid in (0x100, 0x101, 0x102, 0x103):
            peer.send(can.Message(arbitration_id=fid, data=bytes(8)))
        # a dead thread ends the wait at once instead of after the timeout
        wait_for(lambda: len(got) == 3 or not a.alive, what="the frames after the failing one")
    alive = a.alive
    a.stop()
    assert alive and got == [0x100, 0x102, 0x103]
    assert a.stats.sink_errors == 1 and a.stats.frames == 4
    assert "Read-only file system" in a.stats.last_error
    [rec] = [r for r in caplog.records if r.name == "drivers.canbus" and r.levelno == logging.ERROR]
    assert rec.exc_info is not None and "0x101" in rec.getMessage()  # the traceback, and which frame


def test_a_sink_that_always_raises_is_counted_but_logged_rarely(caplog: pytest.LogCaptureFixture) -> None:
    """Thousands of frames/s through a broken sink must not flood the journal (or cost the thread its time)."""

    def sink(msg: can.Message) -> None:
        raise ValueError("broken decoder")

    caplog.set_level(logging.ERROR, logger="drivers.canbus")
    a = _adapter("canbus-t6", sink)
    a.start()
    wait_for(lambda: a.stats.state == "up", what="bus up")
    with can.Bus(interface="virtual", channel="canbus-t6") as peer:
        for i in range(200):
            peer.send(can.Message(arbitration_id=0x100 + i % 8, data=bytes(8)))
        wait_for(lambda: a.stats.frames == 200 or not a.alive, what="200 frames")
    alive = a.alive
    a.stop()
    assert alive and a.stats.sink_errors == 200
    logged = [r for r in caplog.records if r.name == "drivers.canbus" and r.levelno == logging.ERROR]
    assert len(logged) == 1, [r.getMessage() for r in logged]  # well within one log interval
