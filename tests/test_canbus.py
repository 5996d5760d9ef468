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


class _RecordedWaits(threading.Event):
    """The adapter's stop event, recording the backoff delays instead of sleeping them; stops it after ``n``."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.delays: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.delays.append(float(timeout or 0.0))
        if len(self.delays) >= self.n:
            self.set()
        return self.is_set()


class _ScriptedBus:
    """A bus that opens fine and then plays ``script`` on recv: a Message, an exception to raise, or None."""

    def __init__(self, script: list[Any]) -> None:
        self.script = list(script)

    def recv(self, timeout: float | None = None) -> can.Message | None:
        item = self.script.pop(0) if self.script else can.CanOperationError("Network is down")
        if isinstance(item, BaseException):
            raise item
        return item  # type: ignore[no-any-return]

    def shutdown(self) -> None:
        pass


def _scripted_adapter(script: list[Any], waits: _RecordedWaits, sink: Any = None, max_opens: int = 20,
                      ) -> tuple[CanAdapter, list[int]]:
    opens: list[int] = []

    def open_bus(**kw: Any) -> _ScriptedBus:
        opens.append(1)
        if len(opens) > max_opens:  # without backoff the adapter would spin here: end the test instead
            waits.set()
        return _ScriptedBus(script)

    a = CanAdapter(AdapterSettings("t", "socketcan", "can9", reconnect_min_s=0.5, reconnect_max_s=4.0),
                   sink or (lambda m: None), open_bus=open_bus)  # type: ignore[arg-type]
    a._stop = waits
    return a, opens


@pytest.mark.parametrize(("script", "expected"), [
    ([], [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]),  # opens, fails on the first recv: the delay doubles up to the maximum
    ([can.Message(arbitration_id=0x100)], [0.5] * 6),  # delivered a frame each time: a healthy session, start over
], ids=["fails-at-once", "delivers-then-fails"])
def test_a_bus_that_fails_after_opening_is_reopened_after_the_backoff_delay(script: list[Any],
                                                                          expected: list[float]) -> None:
    waits = _RecordedWaits(len(expected))
    a, opens = _scripted_adapter(script, waits)
    a.start()
    wait_for(lambda: not a.alive, what="the adapter to stop after the recorded delays")
    a.stop()
    assert len(waits.delays) == len(expected), f"{len(opens)} opens but only {len(waits.delays)} waits"
    for got, want in zip(waits.delays, expected, strict=True):
        assert 0.8 * want <= got <= 1.2 * want, waits.delays  # jittered
    assert len(opens) == a.stats.opens == a.stats.failures == len(expected)
    assert "Network is down" in a.stats.last_error


def test_malformed_frames_from_the_adapter_are_counted_and_skipped() -> None:
    """python-can's slcan raises ValueError/IndexError on one garbled line; that must not cost the connection."""
    got: list[int] = []
    script = [can.Message(arbitration_id=1), ValueError("invalid literal for int() with base 16: '10G'"),
              can.Message(arbitration_id=2), IndexError("string index out of range"),
              UnicodeDecodeError("ascii", b"\xff", 0, 1, "ordinal not in range"), None, can.Message(arbitration_id=3)]
    waits = _RecordedWaits(1)
    a, opens = _scripted_adapter(script, waits, lambda m: got.append(m.arbitration_id))
    a.start()
    wait_for(lambda: not a.alive, what="the scripted session to end")
    a.stop()
    assert got == [1, 2, 3]
    assert a.stats.bad_frames == 3 and a.stats.frames == 3
    assert len(opens) == a.stats.opens == 1 and a.stats.failures == 1  # the one failure: the script's end


def test_a_stream_of_malformed_frames_reopens_the_adapter() -> None:
    """An adapter whose stream is out of step (every line garbled) is reopened, with backoff."""
    waits = _RecordedWaits(2)
    a, opens = _scripted_adapter([ValueError("garbled")] * 250, waits)
    a.start()
    wait_for(lambda: not a.alive, what="two reopen delays")
    a.stop()
    assert a.stats.bad_frames == 200 and a.stats.failures == 2 and len(opens) == 2
    assert "100 bad frames in a row" in a.stats.last_error


def test_a_garbled_slcan_line_costs_one_frame_not_the_connection() -> None:
    """The real python-can slcan interface over loopback TCP: 1 good frame, 1 bad ID digit, 20 good frames."""
    import socket

    burst = b"t1008" + b"00" * 8 + b"\r" + b"t10G8" + b"00" * 8 + b"\r" + (b"t1008" + b"11" * 8 + b"\r") * 20
    conns: list[socket.socket] = []
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            conns.append(c)
            buf = b""
            while b"O\r" not in buf:  # acknowledge the set-up commands up to "open"
                d = c.recv(100)
                if not d:
                    break
                buf += d
                c.sendall(b"\r" * d.count(b"\r"))
            if len(conns) == 1:
                c.sendall(burst)

    threading.Thread(target=serve, daemon=True).start()
    got: list[can.Message] = []
    a = CanAdapter(AdapterSettings("t", "slcan", f"socket://127.0.0.1:{srv.getsockname()[1]}",
                                   options={"sleep_after_open": 0}), got.append)
    a.start()
    wait_for(lambda: len(got) >= 21 or a.stats.failures, what="21 frames")
    a.stop()
    srv.close()
    for c in conns:
        c.close()
    assert len(got) == 21 and a.stats.bad_frames == 1
    assert (a.stats.failures, a.stats.opens, len(conns)) == (0, 1, 1)
