"""The control socket: newline-delimited JSON over a Unix socket, for the `bmsgw` CLI.

Request: one line ``{"cmd": NAME, "args": {...}}``.  Reply: one line
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``; a streaming
command (candump) sends ``{"ok": true, "item": ...}`` lines until the client
goes away.  The socket is mode 0660 so the gateway's group can use it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
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


def claim(path: Path) -> None:
    """Make ``path`` ready to listen on: its folder exists, a stale socket file is removed.

    ControlError (with the reason) when the path cannot be a socket or a daemon answers on it.
    """
    if len(os.fsencode(path)) > SOCKET_PATH_MAX:
        raise ControlError(f"control socket path {path} is too long for a Unix socket "
                           f"(at most {SOCKET_PATH_MAX} bytes): choose a shorter gateway.control_socket")
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(path))
            except OSError:
                path.unlink()
                return
    except OSError as exc:
        raise ControlError(f"control socket {path}: {exc.strerror or exc}") from None
    raise ControlError(f"another gateway is already listening on {path}")


class ControlServer:
    """Serves request handlers and streaming handlers on a Unix socket."""

    def __init__(self, path: Path, handlers: dict[str, Handler], streams: dict[str, StreamHandler]) -> None:
        self.path = path
        self.handlers = handlers
        self.streams = streams
        self.requests = 0
        self.rejected = 0
        self.errors = 0  # requests that failed inside the daemon (a bug: logged with its traceback)
        self.clients = 0

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        claim(self.path)
        listener = await anyio.create_unix_listener(self.path)
        os.chmod(self.path, 0o660)
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
                req = json.loads(line)
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
            except (ControlError, ValueError, KeyError, TypeError) as exc:
                self.rejected += 1
                await _answer_error(stream, str(exc))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
                pass  # the client left or stopped reading: nothing to answer
            except Exception as exc:  # one request must never end the daemon
                self.errors += 1
                log.exception("control request failed")
                await _answer_error(stream, f"internal error: {type(exc).__name__}: {exc}")


async def _answer_error(stream: SocketStream, message: str) -> None:
    try:
        await _send(stream, {"ok": False, "error": message})
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
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "refused"))
    return reply["result"]


def stream(path: Path, cmd: str, args: dict[str, Any] | None = None) -> Iterator[Any]:
    """Yield the items of a streaming command until the caller stops (ConnectionLost when the daemon goes away)."""
    for reply in _replies(path, cmd, args, None):
        if not reply.get("ok"):
            raise ControlError(reply.get("error", "refused"))
        yield reply["item"]
