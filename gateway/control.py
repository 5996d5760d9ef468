"""The control socket: newline-delimited JSON over a Unix socket, for the `bmsgw` CLI.

Request: one line ``{"cmd": NAME, "args": {...}}``.  Reply: one line
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``; a streaming
command (candump) sends ``{"ok": true, "item": ...}`` lines until the client
goes away.  The socket is mode 0660 so the gateway's group can use it.
A refusal the daemon could not decide because a part of it did not answer in time
carries ``"not_answered": true``: the client raises :class:`NotAnswered` (exit 1), not
:class:`ControlError` (exit 4, "refused").
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import SocketListener, SocketStream, TaskStatus

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
StreamHandler = Callable[[dict[str, Any]], AsyncIterator[Any]]
MAX_REQUEST = 64 * 1024
MAX_CLIENTS = 64  # at once; the socket is for a few technicians and scripts, not a crowd
REQUEST_TIMEOUT_S = 5.0  # a client that connects and does not send its request in time is dropped
SEND_TIMEOUT_S = 10.0  # ... and one that stops reading its replies
ACCEPT_RETRY_S = 0.5  # accept failed (out of file descriptors): try again after this
SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL


async def accept_retrying(listener: SocketListener, what: str) -> SocketStream:
    """The next connection; a failed accept (out of file descriptors and the like) is logged and retried."""
    while True:
        try:
            return await listener.accept()
        except anyio.BrokenResourceError as exc:  # the listener itself is fine
            log.warning("%s: accept failed (%s): retrying", what, exc.__cause__ or exc)
            await anyio.sleep(ACCEPT_RETRY_S)


class ControlError(Exception):
    """A request the daemon refused, with the reason for the user."""


class NotRunning(Exception):
    """No daemon answers at the socket path."""


class ConnectionLost(Exception):
    """The daemon went away before it finished answering."""


class NotAnswered(ConnectionLost):
    """The daemon could not answer in time (its P0 process hangs or is gone): not a refusal.

    Raised by request handlers in the daemon and, from the reply's ``not_answered`` flag, by
    :func:`request` and :func:`stream` in the client (the CLI's exit code 1, like any answer that never came).
    """


CLAIM_LOCK_S = 5.0  # two gateways claiming the same path at once: the second waits at most this long for the first


def claim(path: Path) -> socket.socket:
    """Take ``path`` as this daemon's control socket: bound and listening (mode 0660) when this returns.

    Its folder is created; a stale socket file (nothing answers on it) is replaced; anything that is
    not a socket is never touched. Bind and listen happen here, before the daemon forks P0 and opens
    a bus, so a second gateway on the same path is refused before it does anything (the check and the
    replacement of a stale file are done under a lock on the folder: of two at once, exactly one wins).
    ControlError (with the reason) when the path cannot be a socket, holds something else, or a daemon
    answers on it.
    """
    if len(os.fsencode(path)) > SOCKET_PATH_MAX:
        raise ControlError(f"control socket path {path} is too long for a Unix socket "
                           f"(at most {SOCKET_PATH_MAX} bytes): choose a shorter gateway.control_socket")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    except OSError as exc:
        raise ControlError(f"control socket {path}: {exc.strerror or exc}") from None
    try:
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        folder = -1  # a folder we may not read: no lock, the bind below still refuses a live socket
    try:
        if folder >= 0:
            _lock(folder, path)
        return _bind(path)
    finally:
        if folder >= 0:
            os.close(folder)  # releases the lock


def _lock(folder: int, path: Path) -> None:
    end = time.monotonic() + CLAIM_LOCK_S
    while True:
        try:
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > end:
                raise ControlError(f"control socket {path}: its folder stays locked by another process") from None
            time.sleep(0.01)


def _bind(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(str(path))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            _remove_stale(path)
            sock.bind(str(path))
        os.chmod(path, 0o660)
        sock.listen(MAX_CLIENTS)
    except ControlError:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        raise ControlError(f"control socket {path}: {exc.strerror or exc}") from None
    return sock


def _remove_stale(path: Path) -> None:
    """Remove the socket file at ``path`` if no daemon answers on it; ControlError for anything else."""
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        # a mistyped gateway.control_socket naming the config, the buffer, ...: never delete it
        raise ControlError(f"control socket {path} exists and is not a socket: refusing to replace it "
                           "(check gateway.control_socket)")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # left behind by a daemon that was killed
            return
        except OSError as exc:  # a full backlog (a live daemon), no permission ...: not ours to remove
            raise ControlError(f"control socket {path}: {exc.strerror or exc}") from None
    raise ControlError(f"another gateway is already listening on {path}")


class ControlServer:
    """Serves request handlers and streaming handlers on a Unix socket."""

    def __init__(self, path: Path, handlers: dict[str, Handler], streams: dict[str, StreamHandler]) -> None:
        self.path = path
        self.handlers = handlers
        self.streams = streams
        self.requests = 0
        self.rejected = 0  # bad requests: malformed, wrong argument types, refused by a handler
        self.errors = 0  # requests that failed inside the daemon (a bug: logged with its traceback)
        self.unanswered = 0  # requests a part of the daemon (P0) did not answer in time
        self.clients = 0
        self._sock: socket.socket | None = None

    def claim(self) -> None:
        """Bind and listen on the path now (see :func:`claim`); :meth:`serve` then accepts on it."""
        if self._sock is None:
            self._sock = claim(self.path)

    def fileno(self) -> int | None:
        """The claimed listening socket's descriptor (a forked child closes it), None before the claim."""
        return None if self._sock is None else self._sock.fileno()

    def release(self) -> None:
        """Give up a claim that was never served (the daemon ends before serving): close and remove the socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self.path.unlink(missing_ok=True)

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self.claim()
        assert self._sock is not None
        sock, self._sock = self._sock, None
        try:
            listener = await SocketListener.from_socket(sock)
        except BaseException:
            sock.close()
            self.path.unlink(missing_ok=True)
            raise
        task_status.started()
        try:
            async with anyio.create_task_group() as tg:
                while True:
                    stream = await accept_retrying(listener, "control socket")
                    if self.clients >= MAX_CLIENTS:
                        self.rejected += 1
                        await stream.aclose()
                        continue
                    self.clients += 1
                    tg.start_soon(self._client, stream)
        finally:
            self.path.unlink(missing_ok=True)
            with anyio.CancelScope(shield=True):
                await listener.aclose()

    async def _client(self, stream: SocketStream) -> None:
        try:
            await self._serve_client(stream)
        finally:
            self.clients -= 1

    async def _serve_client(self, stream: SocketStream) -> None:
        async with stream:
            try:
                line = await _read_line(stream)
                if line is None:
                    return  # connected and sent nothing in time: dropped
                try:
                    req = json.loads(line)
                except RecursionError:
                    raise ControlError("request nested too deeply") from None
                if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                    raise ControlError("request must be a JSON object with a 'cmd' string")
                args = req.get("args") or {}
                if not isinstance(args, dict):
                    raise ControlError("'args' must be an object")
                self.requests += 1
                cmd = req["cmd"]
                if cmd in self.streams:
                    async for item in self.streams[cmd](args):
                        await _send(stream, {"ok": True, "item": item})
                    return
                if cmd not in self.handlers:
                    raise ControlError(f"unknown command '{cmd}' (known: {', '.join(sorted([*self.handlers, *self.streams]))})")
                await _send(stream, {"ok": True, "result": await self.handlers[cmd](args)})
            except NotAnswered as exc:
                self.unanswered += 1
                await _answer_error(stream, str(exc), not_answered=True)
            except (ControlError, ValueError, KeyError, TypeError, OverflowError) as exc:
                # the request's own fault: a malformed line, arguments of the wrong type or out of range
                self.rejected += 1
                await _answer_error(stream, str(exc))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
                pass  # the client left or stopped reading: nothing to answer
            except Exception as exc:  # one request must never end the daemon
                self.errors += 1
                log.exception("control request failed")
                await _answer_error(stream, f"internal error: {type(exc).__name__}: {exc}")


async def _answer_error(stream: SocketStream, message: str, not_answered: bool = False) -> None:
    reply: dict[str, Any] = {"ok": False, "error": message}
    if not_answered:
        reply["not_answered"] = True
    try:
        await _send(stream, reply)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass


async def _read_line(stream: SocketStream) -> bytes | None:
    """The request line; None when the client sends none within REQUEST_TIMEOUT_S."""
    buf = b""
    with anyio.move_on_after(REQUEST_TIMEOUT_S):
        while b"\n" not in buf:
            buf += await stream.receive(4096)
            if len(buf) > MAX_REQUEST:
                raise ControlError("request too long")
        return buf.split(b"\n", 1)[0]
    return None


async def _send(stream: SocketStream, obj: Any) -> None:
    """One reply line; a client that does not take it within SEND_TIMEOUT_S counts as gone."""
    try:
        with anyio.fail_after(SEND_TIMEOUT_S):
            await stream.send(json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n")
    except TimeoutError:
        raise anyio.BrokenResourceError("the client stopped reading") from None


def _connect(path: Path, timeout: float) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
    except PermissionError:
        s.close()
        raise NotRunning(f"no permission to use {path}: run as the gateway's user or join its group") from None
    except TimeoutError:
        s.close()
        raise ConnectionLost(f"the gateway at {path} did not accept the connection within {timeout:g} s") from None
    except OSError as exc:  # not there, refused, not a directory, path too long ...
        s.close()
        raise NotRunning(f"the gateway is not running (nothing listens on {path}: {exc.strerror or exc}); "
                         "start it with 'bmsgw run' or 'systemctl start bmsgw'") from None
    return s


def _replies(path: Path, cmd: str, args: dict[str, Any] | None,
             timeout: float | None) -> Generator[dict[str, Any], None, None]:
    """The daemon's reply lines to one request; ConnectionLost when it goes away or times out mid-way."""
    with _connect(path, 5.0) as s:
        try:
            s.sendall(json.dumps({"cmd": cmd, "args": args or {}}).encode() + b"\n")
            s.settimeout(timeout)
            with s.makefile("rb") as f:
                for line in f:
                    yield json.loads(line)
        except TimeoutError:
            raise ConnectionLost(f"the gateway did not answer '{cmd}' within {timeout:g} s") from None
        except OSError as exc:
            raise ConnectionLost(f"the connection to the gateway broke: {exc.strerror or exc}") from None
    raise ConnectionLost("the gateway closed the connection before it finished answering (did it stop?)")


def request(path: Path, cmd: str, args: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
    """Send one request and return its result (ControlError when refused, ConnectionLost when not answered)."""
    replies = _replies(path, cmd, args, timeout)
    try:
        reply = next(replies)
    finally:
        replies.close()
    _raise_for(reply)
    return reply["result"]


def stream(path: Path, cmd: str, args: dict[str, Any] | None = None) -> Iterator[Any]:
    """Yield the items of a streaming command until the caller stops (ConnectionLost when the daemon goes away)."""
    for reply in _replies(path, cmd, args, None):
        _raise_for(reply)
        yield reply["item"]


def _raise_for(reply: dict[str, Any]) -> None:
    """NotAnswered or ControlError for a reply that is not ok."""
    if reply.get("ok"):
        return
    if reply.get("not_answered"):
        raise NotAnswered(reply.get("error", "the gateway did not answer in time"))
    raise ControlError(reply.get("error", "refused"))


def arg_bool(args: dict[str, Any], name: str, default: bool = False) -> bool:
    """A true/false request argument: JSON true or false (absent or null: ``default``), anything else refused.

    Never ``bool(value)``: the string "false" is truthy, and a reset must not clear a latch on it.
    """
    value = args.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ControlError(f"'{name}' must be true or false, not {json.dumps(value, default=str)[:40]}")
    return value


def arg_int(args: dict[str, Any], name: str, default: int | None = None, lo: int | None = None,
            hi: int | None = None) -> int | None:
    """An integer request argument within ``lo..hi`` (absent or null: ``default``); floats, strings and
    booleans are refused, not converted."""
    value = args.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise ControlError(f"'{name}' must be an integer, not {json.dumps(value, default=str)[:40]}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ControlError(f"'{name}' must be {'' if lo is None else lo}..{'' if hi is None else hi}, not {value}")
    return value


def arg_str(args: dict[str, Any], name: str) -> str | None:
    """A string request argument (absent or null: None); anything else refused."""
    value = args.get(name)
    if value is not None and not isinstance(value, str):
        raise ControlError(f"'{name}' must be a string, not {json.dumps(value, default=str)[:40]}")
    return value
