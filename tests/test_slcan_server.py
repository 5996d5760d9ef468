"""Tests for drivers.slcan_server against python-can's real ``slcan`` interface."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator

import can
import pytest
import serial
from can.interfaces.slcan import slcanBus

from drivers.slcan_server import (
    SlcanServer,
    decode_frame,
    encode_frame,
)

# Only used to wait for something to arrive, never to assert on speed.
WAIT = 5.0


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def open_bus(server: SlcanServer, listen_only: bool = False) -> slcanBus:
    """Open python-can's slcan bus on the server (no 2 s post-open sleep)."""
    bus = can.Bus(
        interface="slcan",
        channel=server.url,
        bitrate=500000,
        sleep_after_open=0,
        listen_only=listen_only,
    )
    assert isinstance(bus, slcanBus)
    return bus


def recv_frame(bus: slcanBus, timeout: float = WAIT) -> can.Message:
    """Receive the next frame; python-can also returns None for OK replies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = bus.recv(timeout=0.1)
        if msg is not None:
            return msg
    raise AssertionError("no frame received")


def shutdown_quietly(bus: slcanBus) -> None:
    """Shut a bus down even if its server is already gone."""
    with contextlib.suppress(can.CanError):
        bus.shutdown()


def same_frame(a: can.Message, b: can.Message) -> bool:
    """Compare the on-wire fields of two frames."""
    return (
        a.arbitration_id == b.arbitration_id
        and a.is_extended_id == b.is_extended_id
        and a.is_remote_frame == b.is_remote_frame
        and a.is_fd == b.is_fd
        and a.bitrate_switch == b.bitrate_switch
        and a.dlc == b.dlc
        and bytes(a.data) == bytes(b.data)
    )


class RawClient:
    """A bare TCP client speaking SLCAN by hand."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_replies(self, count: int) -> list[bytes]:
        """Read ``count`` replies, each ending in CR or BELL."""
        out: list[bytes] = []
        while len(out) < count:
            cut = min(
                (i for i in (self.buf.find(b"\r"), self.buf.find(b"\a")) if i >= 0),
                default=-1,
            )
            if cut >= 0:
                out.append(self.buf[: cut + 1])
                self.buf = self.buf[cut + 1 :]
                continue
            chunk = self.sock.recv(4096)
            if not chunk:
                raise AssertionError(f"connection closed after {out!r}")
            self.buf += chunk
        return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def received() -> queue.Queue[can.Message]:
    return queue.Queue()


@pytest.fixture
def server(received: queue.Queue[can.Message]) -> Iterator[SlcanServer]:
    srv = SlcanServer(on_frame=received.put)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def bus(server: SlcanServer) -> Iterator[slcanBus]:
    b = open_bus(server)
    assert server.wait_for_open(1)
    yield b
    shutdown_quietly(b)


@pytest.fixture
def raw(server: SlcanServer) -> Iterator[RawClient]:
    client = RawClient(server.port)
    yield client
    client.close()


TO_CLIENT = [
    can.Message(arbitration_id=0x123, is_extended_id=False, data=b"\x01\x02\x03"),
    can.Message(arbitration_id=0x7FF, is_extended_id=False, data=b""),
    can.Message(arbitration_id=0x18FF50E5, is_extended_id=True, data=bytes(range(8))),
    can.Message(
        arbitration_id=0x321, is_extended_id=False, is_remote_frame=True, dlc=4
    ),
    can.Message(
        arbitration_id=0x1ABCDE, is_extended_id=True, is_remote_frame=True, dlc=8
    ),
    can.Message(arbitration_id=0x456, is_extended_id=False, is_fd=True, data=bytes(12)),
    can.Message(
        arbitration_id=0x1F000001,
        is_extended_id=True,
        is_fd=True,
        bitrate_switch=True,
        data=bytes(range(64)),
    ),
    can.Message(
        arbitration_id=0x10,
        is_extended_id=False,
        is_fd=True,
        bitrate_switch=True,
        data=bytes(range(100, 148)),
    ),
    can.Message(arbitration_id=0x11, is_extended_id=True, is_fd=True, data=b"\xaa" * 5),
]


# -- python-can client <-> server -----------------------------------------------


def test_version_and_serial_queries(bus: slcanBus) -> None:
    assert bus.get_version(timeout=WAIT) == (10, 13)
    assert bus.get_serial_number(timeout=WAIT) == "BMSG"


@pytest.mark.parametrize("msg", TO_CLIENT, ids=lambda m: encode_frame(m)[:10])
def test_client_receives_frames(
    server: SlcanServer, bus: slcanBus, msg: can.Message
) -> None:
    assert server.send(msg) == 1
    got = recv_frame(bus)
    assert same_frame(got, msg), (got, msg)
    assert server.stats.frames_tx == 1


def test_client_receives_frames_in_order(server: SlcanServer, bus: slcanBus) -> None:
    for msg in TO_CLIENT:
        server.send(msg)
    for msg in TO_CLIENT:
        assert same_frame(recv_frame(bus), msg)


def test_fd_payload_is_padded_to_next_fd_length(
    server: SlcanServer, bus: slcanBus
) -> None:
    msg = can.Message(
        arbitration_id=0x55, is_extended_id=False, is_fd=True, data=b"\x01" * 10
    )
    server.send(msg)
    got = recv_frame(bus)
    assert got.dlc == 12
    assert bytes(got.data) == b"\x01" * 10 + b"\0\0"


def test_server_receives_client_frames(
    server: SlcanServer, bus: slcanBus, received: queue.Queue[can.Message]
) -> None:
    frames = [m for m in TO_CLIENT]
    before = time.time()
    for msg in frames:
        bus.send(msg)
    for msg in frames:
        got = received.get(timeout=WAIT)
        assert same_frame(got, msg), (got, msg)
        assert got.channel == server.url
        assert got.timestamp >= before
    assert server.stats.frames_rx == len(frames)
    assert server.stats.bad_lines == 0


def test_server_pads_unpadded_fd_payload_from_python_can(
    bus: slcanBus, received: queue.Queue[can.Message]
) -> None:
    # python-can's slcanBus.send writes a 10-byte FD payload with DLC code 9
    # (12 bytes) without padding; a controller would send zeros.
    bus.send(
        can.Message(
            arbitration_id=0x99, is_extended_id=False, is_fd=True, data=b"\x07" * 10
        )
    )
    got = received.get(timeout=WAIT)
    assert got.dlc == 12
    assert bytes(got.data) == b"\x07" * 10 + b"\0\0"


def test_listen_only_client_cannot_transmit(
    server: SlcanServer, received: queue.Queue[can.Message]
) -> None:
    bus = open_bus(server, listen_only=True)
    try:
        assert server.wait_for_open(1)
        bus.send(can.Message(arbitration_id=0x1, is_extended_id=False, data=b"\x01"))
        assert wait_until(lambda: server.stats.dropped == 1)
        assert received.empty()
        # ...but it still hears the bus.
        server.send(TO_CLIENT[0])
        assert same_frame(recv_frame(bus), TO_CLIENT[0])
    finally:
        shutdown_quietly(bus)


def test_multiple_clients_each_get_every_frame(
    server: SlcanServer, received: queue.Queue[can.Message]
) -> None:
    buses = [open_bus(server) for _ in range(3)]
    try:
        assert server.wait_for_open(3)
        assert server.stats.clients == 3
        assert server.send(TO_CLIENT[2]) == 3
        for b in buses:
            assert same_frame(recv_frame(b), TO_CLIENT[2])
        for i, b in enumerate(buses):
            b.send(can.Message(arbitration_id=i, is_extended_id=False, data=bytes([i])))
        ids = sorted(received.get(timeout=WAIT).arbitration_id for _ in buses)
        assert ids == [0, 1, 2]
    finally:
        for b in buses:
            shutdown_quietly(b)
    assert wait_until(lambda: server.stats.clients == 0)


def test_concurrent_send_keeps_lines_intact(server: SlcanServer, bus: slcanBus) -> None:
    def blast(base: int) -> None:
        for i in range(50):
            server.send(
                can.Message(arbitration_id=base + i, is_extended_id=True, data=bytes(8))
            )

    threads = [threading.Thread(target=blast, args=(n * 0x100,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = {recv_frame(bus).arbitration_id for _ in range(200)}
    assert ids == {n * 0x100 + i for n in range(4) for i in range(50)}


def test_callback_exception_does_not_kill_server() -> None:
    def boom(msg: can.Message) -> None:
        raise RuntimeError("callback bug")

    with SlcanServer(on_frame=boom) as srv:
        bus = open_bus(srv)
        try:
            bus.send(TO_CLIENT[0])
            assert wait_until(lambda: srv.stats.callback_errors == 1)
            assert bus.get_version(timeout=WAIT) == (10, 13)
        finally:
            shutdown_quietly(bus)


# -- raw protocol ------------------------------------------------------------------


def test_command_replies(raw: RawClient) -> None:
    raw.send(b"C\rS6\rY2\rs031C\rZ0\rO\rF\rV\rv\rN\rM00000000\rm FFFFFFFF\r\r")
    assert raw.read_replies(13) == [
        b"\r", b"\r", b"\r", b"\r", b"\r", b"\r",
        b"F00\r", b"V1013\r", b"v1013\r", b"NBMSG\r",
        b"\r", b"\r", b"\r",
    ]  # fmt: skip


def test_state_errors_answer_bell(raw: RawClient, server: SlcanServer) -> None:
    # Configuration needs a closed channel, frames and F an open one.
    raw.send(b"F\rt1230\rO\rO\rS6\rZ1\rL\rC\rS6\r")
    assert raw.read_replies(9) == [
        b"\a", b"\a", b"\r", b"\a", b"\a", b"\a", b"\a", b"\r", b"\r",
    ]  # fmt: skip
    assert server.stats.bad_lines == 0
    assert server.stats.dropped == 1


@pytest.mark.parametrize(
    "line",
    [
        b"t12\r",  # truncated id
        b"tXYZ1AA\r",  # non-hex id
        b"t1239" + b"00" * 9 + b"\r",  # classic DLC 9
        b"t1232AA\r",  # data shorter than DLC
        b"t1232AABB12\r",  # junk that is not a timestamp
        b"t8001AA\r",  # standard id > 0x7FF
        b"T200000001AA\r",  # extended id > 0x1FFFFFFF
        b"d123F\x00\r",  # non-hex payload
        b"\xff\xfe\r",  # not ASCII
        b"q\r",  # unknown command
        b"S\r",  # missing argument
        b"Oxx\r",  # unexpected argument
    ],
)
def test_malformed_line_is_counted_and_server_continues(
    raw: RawClient, server: SlcanServer, received: queue.Queue[can.Message], line: bytes
) -> None:
    raw.send(b"O\r" + line + b"t1232AABB\r")
    assert raw.read_replies(3) == [b"\r", b"\a", b"z\r"]
    assert server.stats.bad_lines == 1
    assert received.get(timeout=WAIT).data == b"\xaa\xbb"


def test_overlong_line_is_discarded(raw: RawClient, server: SlcanServer) -> None:
    raw.send(b"O\r" + b"t" * 2000)
    assert raw.read_replies(2) == [b"\r", b"\a"]
    raw.send(b"ttt\rV\r")  # the rest of the runaway line, then a real command
    assert raw.read_replies(1) == [b"V1013\r"]
    assert server.stats.bad_lines == 1


def test_partial_and_batched_lines(
    raw: RawClient, server: SlcanServer, received: queue.Queue[can.Message]
) -> None:
    raw.send(b"O\rV\rT18FF50E5")  # two full lines and half of a third
    assert raw.read_replies(2) == [b"\r", b"V1013\r"]
    time.sleep(0.05)  # make it likely the halves arrive in separate reads
    raw.send(b"2BE")
    time.sleep(0.05)
    raw.send(b"EF\r\nt0010\r")  # CR LF is tolerated
    assert raw.read_replies(2) == [b"Z\r", b"z\r"]
    first, second = received.get(timeout=WAIT), received.get(timeout=WAIT)
    assert (first.arbitration_id, first.is_extended_id, first.data) == (
        0x18FF50E5,
        True,
        b"\xbe\xef",
    )
    assert (second.arbitration_id, second.dlc) == (0x001, 0)
    assert server.stats.bad_lines == 0


@pytest.mark.parametrize("stamp", [b"1A2B", b"0001E240"])
def test_trailing_timestamp_is_tolerated(
    raw: RawClient, received: queue.Queue[can.Message], stamp: bytes
) -> None:
    raw.send(b"O\rt1232AABB" + stamp + b"\rr1234" + stamp + b"\r")
    assert raw.read_replies(3) == [b"\r", b"z\r", b"z\r"]
    assert received.get(timeout=WAIT).data == b"\xaa\xbb"
    assert received.get(timeout=WAIT).is_remote_frame


def test_frames_to_closed_client_are_dropped(
    raw: RawClient, server: SlcanServer
) -> None:
    assert wait_until(lambda: server.stats.clients == 1)
    assert server.send(TO_CLIENT[0]) == 0
    assert server.stats.dropped == 1
    raw.send(b"O\r")
    assert raw.read_replies(1) == [b"\r"]
    assert server.send(TO_CLIENT[0]) == 1
    assert raw.read_replies(1) == [b"t1233010203\r"]
    raw.send(b"C\r")
    assert raw.read_replies(1) == [b"\r"]
    assert server.send(TO_CLIENT[0]) == 0
    assert server.stats.dropped == 2
    assert server.stats.frames_tx == 1


def test_timestamps_appended_when_enabled(raw: RawClient, server: SlcanServer) -> None:
    raw.send(b"Z1\rO\r")
    assert raw.read_replies(2) == [b"\r", b"\r"]
    server.send(TO_CLIENT[0])
    (line,) = raw.read_replies(1)
    assert line.startswith(b"t1233010203") and len(line) == len(b"t1233010203") + 5
    assert 0 <= int(line[-5:-1], 16) < 60000


def test_abrupt_client_disconnect(server: SlcanServer, bus: slcanBus) -> None:
    raw = RawClient(server.port)
    raw.send(b"O\rt12")
    assert server.wait_for_open(2)
    raw.close()
    assert wait_until(lambda: server.stats.clients == 1)
    assert server.send(TO_CLIENT[0]) == 1
    assert same_frame(recv_frame(bus), TO_CLIENT[0])


# -- stop / restart ------------------------------------------------------------------


def test_stop_drops_client_and_restart_on_same_port_works(
    received: queue.Queue[can.Message],
) -> None:
    srv = SlcanServer(on_frame=received.put)
    port = srv.start()
    bus = open_bus(srv)
    assert srv.wait_for_open(1)
    srv.stop()
    # What python-can does when the TCP peer goes away: pyserial's socket://
    # handler raises SerialException("socket disconnected") on EOF and
    # slcanBus wraps it in CanOperationError.
    with pytest.raises(can.CanOperationError) as info:
        for _ in range(100):
            bus.recv(timeout=0.05)
    assert isinstance(info.value.__cause__, serial.SerialException)
    assert "socket disconnected" in str(info.value.__cause__)
    shutdown_quietly(bus)

    # A new server on the same port, then the same instance restarted.
    for srv2 in (SlcanServer(port=port, on_frame=received.put), srv):
        assert srv2.start() == port
        try:
            bus = open_bus(srv2)
            try:
                assert srv2.wait_for_open(1)
                assert bus.get_version(timeout=WAIT) == (10, 13)
                srv2.send(TO_CLIENT[2])
                assert same_frame(recv_frame(bus), TO_CLIENT[2])
                bus.send(TO_CLIENT[0])
                assert same_frame(received.get(timeout=WAIT), TO_CLIENT[0])
            finally:
                shutdown_quietly(bus)
        finally:
            srv2.stop()


def test_connect_to_stopped_server_fails() -> None:
    srv = SlcanServer()
    srv.start()
    srv.stop()
    with pytest.raises(can.CanInitializationError):
        open_bus(srv)


def test_stop_is_idempotent_and_start_twice_refused() -> None:
    srv = SlcanServer()
    srv.stop()
    with srv:
        assert srv.running
        with pytest.raises(RuntimeError):
            srv.start()
    assert not srv.running
    srv.stop()


# -- configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    ["0.0.0.0", "192.168.1.10", "10.0.0.1", "::", "2001:db8::1", "example.com", ""],
)
def test_non_loopback_host_refused(host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        SlcanServer(host=host)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_loopback_hosts_accepted(host: str) -> None:
    srv = SlcanServer(host=host)
    try:
        srv.start()
    except OSError as exc:  # e.g. no IPv6 in the container
        pytest.skip(f"cannot bind {host}: {exc}")
    try:
        bus = open_bus(srv)
        assert bus.get_version(timeout=WAIT) == (10, 13)
        shutdown_quietly(bus)
    finally:
        srv.stop()


# -- encoding ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("msg", "line"),
    [
        (TO_CLIENT[0], "t1233010203"),
        (TO_CLIENT[1], "t7FF0"),
        (TO_CLIENT[2], "T18FF50E580001020304050607"),
        (TO_CLIENT[3], "r3214"),
        (TO_CLIENT[4], "R001ABCDE8"),
        (TO_CLIENT[5], "d4569" + "00" * 12),
        (TO_CLIENT[8], "D000000115AAAAAAAAAA"),
    ],
)
def test_encode_decode(msg: can.Message, line: str) -> None:
    assert encode_frame(msg) == line
    assert same_frame(decode_frame(line), msg)


@pytest.mark.parametrize("msg", TO_CLIENT, ids=lambda m: encode_frame(m)[:10])
def test_roundtrip(msg: can.Message) -> None:
    assert same_frame(decode_frame(encode_frame(msg)), msg)


@pytest.mark.parametrize(
    "msg",
    [
        can.Message(is_error_frame=True),
        can.Message(arbitration_id=0x800, is_extended_id=False),
        can.Message(arbitration_id=0x20000000, is_extended_id=True),
        can.Message(is_fd=True, is_remote_frame=True, is_extended_id=False),
        can.Message(is_fd=True, data=bytes(65)),
        can.Message(is_extended_id=False, data=bytes(9)),
    ],
)
def test_encode_rejects_unrepresentable(msg: can.Message) -> None:
    with pytest.raises(ValueError):
        encode_frame(msg)


def test_stop_from_callback_does_not_deadlock() -> None:
    holder: list[SlcanServer] = []
    stopped = threading.Event()

    def stop_now(msg: can.Message) -> None:
        holder[0].stop()
        stopped.set()

    srv = SlcanServer(on_frame=stop_now)
    holder.append(srv)
    srv.start()
    raw = RawClient(srv.port)
    try:
        raw.send(b"O\rt0010\r")
        assert stopped.wait(WAIT)
        assert wait_until(lambda: not srv.running)
        assert srv.start() > 0  # the old thread has released everything
        srv.stop()
    finally:
        raw.close()


# -- clients that do not read ----------------------------------------------------------

# More than the kernel buffers of one loopback connection hold (with autotuning, a few MiB),
# so a server that waited for a non-reading client would have to wait here.
BACKLOG = 6 << 20


def numbered(i: int) -> can.Message:
    """A 64-byte FD frame carrying its sequence number (a 134-character line)."""
    return can.Message(arbitration_id=i % 0x800, is_extended_id=False, is_fd=True, data=i.to_bytes(4, "big") * 16)


class LineReader:
    """A client that opens the channel and reads every line it is sent, in a thread of its own."""

    def __init__(self, port: int, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(WAIT)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(b"O\r")
        self.data = bytearray()
        self.closed = False

    def start(self) -> LineReader:
        threading.Thread(target=self.read_all, daemon=True).start()
        return self

    def read_all(self, until_lines: int | None = None) -> None:
        """Read until EOF (or, when given, until ``until_lines`` lines have arrived)."""
        while until_lines is None or self.data.count(b"\r") < until_lines:
            try:
                chunk = self.sock.recv(1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                self.closed = True
                return
            self.data += chunk

    def lines(self) -> list[bytes]:
        return bytes(self.data).split(b"\r")[:-1]

    def close(self) -> None:
        self.sock.close()


def test_a_client_that_does_not_read_frames_is_buffered_and_not_waited_for() -> None:
    # the non-reader is behind by BACKLOG bytes but below max_pending: it keeps its connection
    # and, once it reads again, gets every frame in order; the reading client got them all meanwhile
    with SlcanServer(max_pending=4 * BACKLOG) as srv:
        good = LineReader(srv.port).start()
        lazy = LineReader(srv.port, rcvbuf=4096)  # opens its channel, then does not read
        assert srv.wait_for_open(2)
        n = BACKLOG // len(encode_frame(numbered(0)))
        for i in range(n):
            assert srv.send(numbered(i)) == 2
        expected = [b""] + [encode_frame(numbered(i)).encode() for i in range(n)]  # b"": the reply to O
        lazy.read_all(until_lines=n + 1)
        assert lazy.lines() == expected
        assert wait_until(lambda: len(good.lines()) == n + 1)
        assert good.lines() == expected
        st = srv.stats
        assert (st.clients, st.slow_clients_dropped, st.frames_tx, st.dropped) == (2, 0, 2 * n, 0)
        lazy.close()
        good.close()


def test_a_client_that_does_not_read_its_replies_does_not_hold_up_the_others() -> None:
    got: list[can.Message] = []
    with SlcanServer(on_frame=got.append, max_pending=4 * BACKLOG) as srv:
        lazy = LineReader(srv.port, rcvbuf=4096)
        good = RawClient(srv.port)
        good.send(b"O\r")
        assert good.read_replies(1) == [b"\r"]
        assert srv.wait_for_open(2)
        queries = BACKLOG // len(b"V1013\r")

        def flood() -> None:  # queries whose replies the client leaves unread
            with contextlib.suppress(OSError):
                for _ in range(queries // 2048):
                    lazy.sock.sendall(b"V\r" * 2048)

        flooder = threading.Thread(target=flood)
        flooder.start()
        frames = 200
        for i in range(frames):  # the gateway's commands: each answered while the flood goes on
            good.send(encode_frame(numbered(i)).encode() + b"\r")
            assert good.read_replies(1) == [b"z\r"]
        flooder.join()
        assert [bytes(m.data) for m in got] == [bytes(numbered(i).data) for i in range(frames)]
        sent = queries // 2048 * 2048
        lazy.read_all(until_lines=sent + 1)
        assert lazy.lines() == [b""] + [b"V1013"] * sent
        assert (srv.stats.clients, srv.stats.slow_clients_dropped) == (2, 0)
        lazy.close()
        good.close()


@pytest.mark.parametrize("backlog_of", ["frames", "replies"])
def test_a_client_whose_backlog_passes_max_pending_is_dropped_and_counted(backlog_of: str) -> None:
    got: list[can.Message] = []
    with SlcanServer(on_frame=got.append, max_pending=64 * 1024) as srv:
        good = LineReader(srv.port).start()
        lazy = LineReader(srv.port, rcvbuf=4096)
        assert srv.wait_for_open(2)
        n = 0
        while srv.stats.slow_clients_dropped == 0 and n < BACKLOG:  # bounded: fails below, never hangs
            n += 1
            if backlog_of == "frames":
                assert srv.send(numbered(n)) >= 1
            else:
                with contextlib.suppress(OSError):  # the server may hang up while we write
                    lazy.sock.sendall(b"V\r" * 256)
                srv.send(numbered(n))
        assert srv.stats.slow_clients_dropped == 1
        assert wait_until(lambda: srv.stats.clients == 1)
        for i in range(n + 1, n + 101):  # the reading client goes on as if nothing happened
            assert srv.send(numbered(i)) == 1
        assert wait_until(lambda: len(good.lines()) == n + 101)
        assert good.lines() == [b""] + [encode_frame(numbered(i)).encode() for i in range(1, n + 101)]
        lazy.read_all()  # what it had been sent, then the end of the connection
        assert lazy.closed
        assert srv.stats.slow_clients_dropped == 1 and srv.stats.connections == 2
        lazy.close()
        good.close()
