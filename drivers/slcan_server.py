"""A loopback TCP server that behaves like an SLCAN (Lawicel) USB-CAN adapter.

There is no SocketCAN (not even ``vcan``) on our build and test machines, so CAN
traffic between processes is carried as SLCAN ASCII lines over loopback TCP.
The gateway opens the server with python-can's own ``slcan`` interface::

    can.Bus(interface="slcan", channel=server.url, bitrate=500000, sleep_after_open=0)

so the code path under test is the same one used with a real adapter
(pyserial resolves ``socket://host:port`` to a TCP connection).

Protocol summary (every command and reply ends with ``\\r``; an error reply is
a single BELL ``\\a``):

=============  ==================================================  ============
command        meaning                                             reply
=============  ==================================================  ============
``O`` / ``L``  open channel (normal / listen-only); must be closed  ``\\r``
``C``          close channel                                       ``\\r``
``Sn``         nominal bitrate code 0..9; must be closed           ``\\r``
``Yn``         CAN FD data bitrate n Mbit/s; must be closed        ``\\r``
``sxxyy``      BTR0/BTR1 registers; must be closed                 ``\\r``
``Zn``         timestamps off/on; must be closed                   ``\\r``
``V`` / ``v``  hardware/software version                           ``Vhhss\\r``
``N``          serial number                                       ``Nxxxx\\r``
``F``          status flags; must be open                          ``F00\\r``
``t r d b``    send standard-id frame; must be open, not ``L``     ``z\\r``
``T R D B``    send extended-id frame; must be open, not ``L``     ``Z\\r``
=============  ==================================================  ============

Frames to the client use the same letters: ``t``/``T`` data, ``r``/``R`` remote,
``d``/``D`` CAN FD, ``b``/``B`` CAN FD with bit-rate switch.  Classic frames
carry a decimal DLC 0..8, CAN FD frames a hex DLC code 0..F (12..64 bytes for
codes 9..F), followed by the data in hex.

Writes to clients never block: what a client's socket does not take is queued
for it and flushed by the server thread.  A client that stops reading is
disconnected once ``max_pending`` bytes are queued for it (counted in
``SlcanStats.slow_clients_dropped``), so it cannot hold up the server thread,
:meth:`SlcanServer.send` or the other clients.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Self

import can

__all__ = [
    "FD_LENGTHS",
    "SlcanServer",
    "SlcanStats",
    "decode_frame",
    "encode_frame",
]

logger = logging.getLogger(__name__)

#: Payload length for each CAN FD DLC code 0..15.
FD_LENGTHS: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64)

_OK = b"\r"
_BELL = b"\a"
_HEX = frozenset("0123456789abcdefABCDEF")
# The longest valid line is an extended FD frame with 64 bytes and an 8-digit
# timestamp (146 chars); anything much longer is a client gone astray.
_MAX_LINE = 512
# Lawicel allows only these letters as "configure something" commands; we
# accept and ignore them because acceptance filters, UART speed, auto-poll and
# auto-start have no meaning on a TCP link.
_BENIGN = frozenset("MmWXUQPA")
_STD_FRAME = frozenset("trdb")
_EXT_FRAME = frozenset("TRDB")
# Kernel send buffer of each client connection.  Pinned because autotuning grows
# it to several MiB for a client that does not read, which would hide that
# client's backlog from ``max_pending`` for minutes of pack traffic.
_SNDBUF = 64 * 1024


def _fd_code(length: int) -> int:
    for code, n in enumerate(FD_LENGTHS):
        if n >= length:
            return code
    raise ValueError(f"CAN FD payload of {length} bytes exceeds 64")


def encode_frame(msg: can.Message) -> str:
    """Return the SLCAN line for ``msg`` without the trailing ``\\r``.

    CAN FD payloads whose length is not a valid FD length are zero-padded to the
    next one, as a controller would put them on the wire.

    :raises ValueError: for error frames, FD remote frames, out-of-range ids or
        lengths.
    """
    if msg.is_error_frame:
        raise ValueError("SLCAN cannot carry error frames")
    ext = msg.is_extended_id
    if ext and not 0 <= msg.arbitration_id <= 0x1FFFFFFF:
        raise ValueError(f"extended id {msg.arbitration_id:#x} out of range")
    if not ext and not 0 <= msg.arbitration_id <= 0x7FF:
        raise ValueError(f"standard id {msg.arbitration_id:#x} out of range")
    can_id = f"{msg.arbitration_id:08X}" if ext else f"{msg.arbitration_id:03X}"
    data = bytes(msg.data or b"")

    if msg.is_fd:
        if msg.is_remote_frame:
            raise ValueError("CAN FD has no remote frames")
        code = _fd_code(max(len(data), msg.dlc))
        letter = ("B" if ext else "b") if msg.bitrate_switch else ("D" if ext else "d")
        payload = data.ljust(FD_LENGTHS[code], b"\0")
        return f"{letter}{can_id}{code:X}{payload.hex().upper()}"

    if not 0 <= msg.dlc <= 8:
        raise ValueError(f"classic CAN DLC {msg.dlc} out of range 0..8")
    if msg.is_remote_frame:
        return f"{'R' if ext else 'r'}{can_id}{msg.dlc:d}"
    if len(data) > msg.dlc:
        raise ValueError(f"{len(data)} data bytes do not fit DLC {msg.dlc}")
    payload = data.ljust(msg.dlc, b"\0")
    return f"{'T' if ext else 't'}{can_id}{msg.dlc:d}{payload.hex().upper()}"


def _is_hex(text: str) -> bool:
    return all(c in _HEX for c in text)


def decode_frame(line: str) -> can.Message:
    """Parse one SLCAN frame line (``t T r R d D b B``, no ``\\r``) into a message.

    A trailing 4- or 8-digit hex timestamp (Lawicel ``Z1`` mode, or firmwares
    with microsecond stamps) is accepted and ignored.  CAN FD lines whose data
    is shorter than the DLC code says are zero-padded, because python-can's
    ``slcanBus.send`` writes FD payloads of e.g. 10 bytes without padding to 12.

    :raises ValueError: if the line is not a well-formed frame.
    """
    if not line:
        raise ValueError("empty line")
    kind = line[0]
    if kind not in _STD_FRAME and kind not in _EXT_FRAME:
        raise ValueError(f"not a frame: {line[:1]!r}")
    ext = kind in _EXT_FRAME
    id_len = 8 if ext else 3
    head = line[1 : 2 + id_len]
    if len(head) != id_len + 1 or not _is_hex(head):
        raise ValueError(f"bad id/DLC in {line!r}")
    can_id = int(head[:id_len], 16)
    if can_id > (0x1FFFFFFF if ext else 0x7FF):
        raise ValueError(f"id {can_id:#x} out of range")
    rest = line[2 + id_len :]
    if not _is_hex(rest):
        raise ValueError(f"non-hex characters in {line!r}")

    fd = kind in "dDbB"
    remote = kind in "rR"
    dlc_char = head[-1]
    if fd:
        length = FD_LENGTHS[int(dlc_char, 16)]
    else:
        if not dlc_char.isdigit() or int(dlc_char) > 8:
            raise ValueError(f"classic DLC {dlc_char!r} out of range 0..8")
        length = int(dlc_char)

    data = b""
    if remote:
        trailer = rest
    elif fd and len(rest) < 2 * length:
        if len(rest) % 2:
            raise ValueError(f"odd number of hex digits in {line!r}")
        data, trailer = bytes.fromhex(rest).ljust(length, b"\0"), ""
    else:
        if len(rest) < 2 * length:
            raise ValueError(f"truncated data in {line!r}")
        data, trailer = bytes.fromhex(rest[: 2 * length]), rest[2 * length :]
    if len(trailer) not in (0, 4, 8):
        raise ValueError(f"unexpected trailing characters in {line!r}")

    return can.Message(
        arbitration_id=can_id,
        is_extended_id=ext,
        is_remote_frame=remote,
        is_fd=fd,
        bitrate_switch=kind in "bB",
        dlc=length,
        data=data,
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        # Host names other than "localhost" are refused rather than resolved:
        # a resolver (or /etc/hosts) could map them to a routable address.
        return False


@dataclass
class SlcanStats:
    """Counters of an :class:`SlcanServer` (a snapshot when read via ``stats``)."""

    #: frame lines queued to clients (one per client and frame)
    frames_tx: int = 0
    #: well-formed frames received from clients and handed to ``on_frame``
    frames_rx: int = 0
    #: malformed or unknown lines from clients (answered with BELL)
    bad_lines: int = 0
    #: frames not delivered: to a client whose channel is not open, or from a
    #: client whose channel is closed or listen-only (answered with BELL)
    dropped: int = 0
    #: clients connected right now
    clients: int = 0
    #: connections accepted since construction
    connections: int = 0
    #: exceptions raised by the ``on_frame`` callback (logged, then ignored)
    callback_errors: int = 0
    #: clients disconnected because they did not read: their unsent data
    #: passed ``max_pending`` bytes
    slow_clients_dropped: int = 0


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    peer: str
    buffer: bytearray = field(default_factory=bytearray)
    is_open: bool = False
    listen_only: bool = False
    timestamps: bool = False
    bitrate_code: str = ""
    data_bitrate_code: str = ""
    btr: str = ""
    #: inside an over-long line; its tail up to the next CR is skipped too
    discarding: bool = False
    #: guards ``pending`` and ``dead``: send() runs in other threads
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    #: bytes the socket has not taken yet, flushed by the server thread
    pending: bytearray = field(default_factory=bytearray)
    #: registered for EVENT_WRITE (only the server thread changes this)
    watching_write: bool = False
    dead: bool = False


class SlcanServer:
    """Loopback TCP server emulating an SLCAN adapter for python-can clients.

    Frames given to :meth:`send` go to every connected client whose channel is
    open; frames the clients transmit are parsed and passed to ``on_frame`` in
    the server thread.  ``start()`` after ``stop()`` rebinds the same port, so
    clients can reconnect to the address they already know.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        on_frame: Callable[[can.Message], None] | None = None,
        *,
        channel: str | None = None,
        hw_version: int = 10,
        sw_version: int = 13,
        serial_number: str = "BMSG",
        max_pending: int = 256 * 1024,
    ) -> None:
        """Configure the server; nothing is bound until :meth:`start`.

        :param host: loopback address to listen on (``127.0.0.0/8``, ``::1`` or
            ``localhost``).
        :param port: TCP port, 0 for an ephemeral one.
        :param on_frame: called with every frame a client transmits.
        :param channel: ``Message.channel`` for received frames; defaults to
            :attr:`url`.
        :param hw_version: two-digit hardware version reported to ``V``.
        :param sw_version: two-digit software version reported to ``V``.
        :param serial_number: serial number reported to ``N``.
        :param max_pending: a client whose unsent data (beyond the kernel's
            buffer) passes this many bytes is disconnected and counted in
            ``slow_clients_dropped``.  Writes never wait for a client, so one
            that stops reading cannot stall the server or the others.
        :raises ValueError: for a non-loopback host or an invalid argument.
        """
        if not _is_loopback(host):
            raise ValueError(f"SlcanServer only binds to loopback, not {host!r}")
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port {port} out of range")
        if not (0 <= hw_version <= 99 and 0 <= sw_version <= 99):
            raise ValueError("versions must be 0..99 (two decimal digits)")
        if not serial_number.isalnum():
            raise ValueError("serial number must be alphanumeric")
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1 byte")
        self._host = "127.0.0.1" if host == "localhost" else host
        self._family = (
            socket.AF_INET6
            if ipaddress.ip_address(self._host).version == 6
            else socket.AF_INET
        )
        self._port = port
        self._on_frame = on_frame
        self._channel = channel
        self._version = f"{hw_version:02d}{sw_version:02d}"
        self._serial = serial_number
        self._max_pending = max_pending

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._clients: list[_Client] = []
        self._stats = SlcanStats()
        self._listener: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------

    @property
    def port(self) -> int:
        """Bound TCP port (the requested one before the first ``start()``)."""
        return self._port

    @property
    def host(self) -> str:
        """Loopback address the server listens on."""
        return self._host

    @property
    def url(self) -> str:
        """pyserial URL for python-can's ``slcan`` channel argument."""
        host = f"[{self._host}]" if self._family == socket.AF_INET6 else self._host
        return f"socket://{host}:{self._port}"

    @property
    def running(self) -> bool:
        """True between ``start()`` and ``stop()``."""
        return self._thread is not None

    @property
    def stats(self) -> SlcanStats:
        """A consistent snapshot of the counters."""
        with self._lock:
            return replace(self._stats)

    def start(self) -> int:
        """Bind, listen and start the server thread; return the bound port.

        :raises RuntimeError: if already running.
        :raises OSError: if the port cannot be bound.
        """
        if self._thread is not None:
            raise RuntimeError("SlcanServer already running")
        listener = socket.socket(self._family, socket.SOCK_STREAM)
        try:
            # Lets a restarted server take its port back while connections it
            # just closed still linger in TIME_WAIT (the reconnect tests rely
            # on this); unlike SO_REUSEPORT it does not allow two listeners.
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self._host, self._port))
            listener.listen()
        except BaseException:
            listener.close()
            raise
        listener.setblocking(False)
        self._port = listener.getsockname()[1]
        self._listener = listener
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        # send() pokes it from other threads and must never block on it; a
        # full pipe means a wake-up is pending anyway.
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping = False
        self._thread = threading.Thread(
            target=self._run, name=f"slcan-server:{self._port}", daemon=True
        )
        self._thread.start()
        logger.debug("SLCAN server listening on %s", self.url)
        return self._port

    def stop(self) -> None:
        """Close the listener and drop every client connection; idempotent."""
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._wake()
        if thread is threading.current_thread():
            # Called from on_frame: the loop ends after this event and _run
            # clears _thread itself; joining here would deadlock.
            return
        thread.join()
        self._thread = None

    def __enter__(self) -> Self:
        """Start the server."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server."""
        self.stop()

    def wait_for_open(self, count: int = 1, timeout: float | None = 5.0) -> bool:
        """Wait until at least ``count`` clients have an open channel.

        python-can returns from ``can.Bus(...)`` as soon as it has *written*
        ``O``; frames sent before the server has read it would be dropped.
        """
        with self._changed:
            return self._changed.wait_for(
                lambda: sum(c.is_open for c in self._clients) >= count, timeout
            )

    # -- sending -----------------------------------------------------------

    def send(self, msg: can.Message) -> int:
        """Queue ``msg`` to every client with an open channel; thread-safe, never blocks.

        :returns: number of clients the frame was queued to.
        :raises ValueError: if ``msg`` cannot be expressed in SLCAN.
        """
        line = encode_frame(msg)
        with self._lock:
            clients = list(self._clients)
        delivered = dropped = 0
        for client in clients:
            if not client.is_open or client.dead:
                dropped += 1
                continue
            out = line
            if client.timestamps:
                # Lawicel timestamps are milliseconds modulo one minute.
                out += f"{int(time.time() * 1000) % 60000:04X}"
            if self._write(client, out.encode("ascii") + _OK):
                delivered += 1
            else:
                dropped += 1
        with self._lock:
            self._stats.frames_tx += delivered
            self._stats.dropped += dropped
        return delivered

    def _write(self, client: _Client, data: bytes) -> bool:
        """Send what the socket takes now, queue the rest; False if the client is gone."""
        with client.write_lock:
            if client.dead:
                return False
            was_idle = not client.pending
            if was_idle:  # nothing queued, so writing directly keeps the order
                try:
                    sent = client.sock.send(data)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError as exc:
                    self._give_up(client, str(exc))
                    return False
                data = data[sent:]
            if len(client.pending) + len(data) > self._max_pending:
                self._give_up(client, f"more than {self._max_pending} bytes unread")
                with self._lock:
                    self._stats.slow_clients_dropped += 1
                return False
            client.pending += data
        if data and was_idle:
            # Only the server thread changes the selector: have it watch for
            # the socket to take more (also from on_frame, for other clients).
            self._wake()
        return True

    def _give_up(self, client: _Client, why: str) -> None:
        # Called with client.write_lock held.  shutdown() rather than close():
        # the selector thread still owns the descriptor; it sees EOF and drops
        # the client.  Half a line may be in the stream: it cannot be resumed.
        logger.info("SLCAN client %s dropped: %s", client.peer, why)
        client.dead = True
        client.pending.clear()
        with contextlib.suppress(OSError):
            client.sock.shutdown(socket.SHUT_RDWR)

    def _wake(self) -> None:
        wake = self._wake_w  # read once: _close_all may clear it meanwhile
        if wake is not None:
            with contextlib.suppress(OSError):
                wake.send(b"x")

    # -- server thread -----------------------------------------------------

    def _run(self) -> None:
        assert self._selector is not None
        try:
            while not self._stopping:
                for key, events in self._selector.select():
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                        # send() queued data for someone (or stop() was called)
                        for client in list(self._clients):
                            self._watch_writes(client)
                    else:
                        self._serve(key.data, events)
        except Exception:
            # Should never happen; log it so a broken server is visible
            # instead of silently no longer answering.
            logger.exception("SLCAN server thread crashed")
        finally:
            self._close_all()
            if self._thread is threading.current_thread():
                self._thread = None

    def _accept(self) -> None:
        assert self._listener is not None and self._selector is not None
        try:
            sock, addr = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            logger.warning("SLCAN accept failed: %s", exc)
            return
        # Non-blocking: a client that stops reading must never stall the
        # server thread or send(); what its socket does not take is queued.
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
        client = _Client(sock=sock, peer=f"{addr[0]}:{addr[1]}")
        self._selector.register(sock, selectors.EVENT_READ, client)
        with self._changed:
            self._clients.append(client)
            self._stats.clients += 1
            self._stats.connections += 1
            self._changed.notify_all()
        logger.debug("SLCAN client %s connected", client.peer)

    def _serve(self, client: _Client, events: int) -> None:
        if client.dead:  # given up by _write: the connection cannot be trusted
            self._drop(client)
            return
        if events & selectors.EVENT_WRITE:
            self._flush(client)
        if events & selectors.EVENT_READ and not client.dead:
            self._readable(client)
        if client.dead:
            self._drop(client)
        else:
            self._watch_writes(client)

    def _flush(self, client: _Client) -> None:
        with client.write_lock:
            if client.dead or not client.pending:
                return
            try:
                sent = client.sock.send(client.pending)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._give_up(client, str(exc))
                return
            del client.pending[:sent]

    def _watch_writes(self, client: _Client) -> None:
        """Have the selector report writability exactly while data is queued."""
        assert self._selector is not None
        with client.write_lock:
            want = bool(client.pending) and not client.dead
            if want == client.watching_write or client.sock.fileno() < 0:
                return
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            with contextlib.suppress(KeyError, ValueError):
                self._selector.modify(client.sock, events, client)
                client.watching_write = want

    def _readable(self, client: _Client) -> None:
        try:
            chunk = client.sock.recv(4096)
        except (BlockingIOError, InterruptedError, TimeoutError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            client.dead = True  # _serve drops it
            return
        client.buffer += chunk
        replies = bytearray()
        while True:
            end = client.buffer.find(b"\r")
            if end < 0:
                break
            raw = bytes(client.buffer[:end])
            del client.buffer[: end + 1]
            if client.discarding:
                client.discarding = False
                continue
            replies += self._handle_line(client, raw)
        if len(client.buffer) > _MAX_LINE:
            client.buffer.clear()
            # One BELL and one count per runaway line, however it is chunked.
            if not client.discarding:
                client.discarding = True
                replies += _BELL
                with self._lock:
                    self._stats.bad_lines += 1
        if replies:
            self._write(client, bytes(replies))

    def _drop(self, client: _Client) -> None:
        assert self._selector is not None
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(client.sock)
        with client.write_lock:
            client.dead = True
            client.pending.clear()
            client.sock.close()
        with self._changed:
            if client in self._clients:
                self._clients.remove(client)
                self._stats.clients -= 1
            self._changed.notify_all()
        logger.debug("SLCAN client %s disconnected", client.peer)

    def _close_all(self) -> None:
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            with contextlib.suppress(OSError):
                client.sock.shutdown(socket.SHUT_RDWR)
            self._drop(client)
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        if self._selector is not None:
            self._selector.close()
        self._listener = self._wake_r = self._wake_w = None
        self._selector = None
        logger.debug("SLCAN server on port %d stopped", self._port)

    # -- protocol ----------------------------------------------------------

    def _bad(self, line: bytes, why: str) -> bytes:
        logger.debug("SLCAN bad line %r: %s", line, why)
        with self._lock:
            self._stats.bad_lines += 1
        return _BELL

    def _set_open(self, client: _Client, is_open: bool, listen_only: bool) -> None:
        with self._changed:
            client.is_open = is_open
            client.listen_only = listen_only
            self._changed.notify_all()

    def _handle_line(self, client: _Client, raw: bytes) -> bytes:
        # Tolerate CR LF line ends from hand-written tools (e.g. netcat).
        raw = raw.lstrip(b"\n")
        try:
            line = raw.decode("ascii")
        except UnicodeDecodeError:
            return self._bad(raw, "not ASCII")
        if not line:
            # python-can sends a bare "\r" for "no data bitrate".
            return _OK
        cmd, arg = line[0], line[1:]

        if cmd in _STD_FRAME or cmd in _EXT_FRAME:
            return self._handle_frame(client, line)
        if cmd in "OL" and not arg:
            if client.is_open:
                return _BELL
            self._set_open(client, True, listen_only=cmd == "L")
            return _OK
        if cmd == "C" and not arg:
            # Lawicel answers BELL when already closed, but python-can sends C
            # before every configuration, and CANable firmware accepts it.
            self._set_open(client, False, listen_only=False)
            return _OK
        if cmd == "S" and len(arg) == 1 and arg.isdigit():
            if client.is_open:
                return _BELL
            client.bitrate_code = arg
            return _OK
        if cmd == "Y" and len(arg) == 1 and arg in "12345678":
            if client.is_open:
                return _BELL
            client.data_bitrate_code = arg
            return _OK
        if cmd == "s" and len(arg) == 4 and _is_hex(arg):
            if client.is_open:
                return _BELL
            client.btr = arg.upper()
            return _OK
        if cmd == "Z" and arg in ("0", "1"):
            if client.is_open:
                return _BELL
            client.timestamps = arg == "1"
            return _OK
        if cmd in "Vv" and not arg:
            return f"{cmd}{self._version}\r".encode("ascii")
        if cmd == "N" and not arg:
            return f"N{self._serial}\r".encode("ascii")
        if cmd == "F" and not arg:
            return b"F00\r" if client.is_open else _BELL
        if cmd in _BENIGN:
            return _OK
        return self._bad(raw, "unknown command")

    def _handle_frame(self, client: _Client, line: str) -> bytes:
        try:
            msg = decode_frame(line)
        except ValueError as exc:
            return self._bad(line.encode("ascii"), str(exc))
        if not client.is_open or client.listen_only:
            with self._lock:
                self._stats.dropped += 1
            return _BELL
        msg.timestamp = time.time()
        msg.channel = self._channel if self._channel is not None else self.url
        with self._lock:
            self._stats.frames_rx += 1
        if self._on_frame is not None:
            try:
                self._on_frame(msg)
            except Exception:
                logger.exception("SLCAN on_frame callback failed")
                with self._lock:
                    self._stats.callback_errors += 1
        return b"Z\r" if msg.is_extended_id else b"z\r"
