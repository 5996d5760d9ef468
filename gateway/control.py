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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import SocketStream, TaskStatus

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
StreamHandler = Callable[[dict[str, Any]], AsyncIterator[Any]]
MAX_REQUEST = 64 * 1024


class ControlError(Exception):
    """A request the daemon refused, with the reason for the user."""


class NotRunning(Exception):
    """No daemon answers at the socket path."""


def _claim(path: Path) -> None:
    """Remove a stale socket file, refuse to start when a daemon answers on it."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            path.unlink()
            return
    raise ControlError(f"another gateway is already listening on {path}")


class ControlServer:
    """Serves request handlers and streaming handlers on a Unix socket."""

    def __init__(self, path: Path, handlers: dict[str, Handler], streams: dict[str, StreamHandler]) -> None:
        self.path = path
        self.handlers = handlers
        self.streams = streams
        self.requests = 0
        self.rejected = 0

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        _claim(self.path)
        listener = await anyio.create_unix_listener(self.path)
        os.chmod(self.path, 0o660)
        task_status.started()
        try:
            await listener.serve(self._client)
        finally:
            self.path.unlink(missing_ok=True)
            with anyio.CancelScope(shield=True):
                await listener.aclose()

    async def _client(self, stream: SocketStream) -> None:
        async with stream:
            try:
                line = await _read_line(stream)
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
                try:
                    await _send(stream, {"ok": False, "error": str(exc)})
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    pass
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
                pass  # the client left; nothing to answer


async def _read_line(stream: SocketStream) -> bytes:
    buf = b""
    while b"\n" not in buf:
        chunk = await stream.receive(4096)
        buf += chunk
        if len(buf) > MAX_REQUEST:
            raise ControlError("request too long")
    return buf.split(b"\n", 1)[0]


async def _send(stream: SocketStream, obj: Any) -> None:
    await stream.send(json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n")


def _connect(path: Path, timeout: float) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        s.close()
        raise NotRunning(f"the gateway is not running (nothing listens on {path}); "
                         "start it with 'bmsgw run' or 'systemctl start bmsgw'") from None
    except PermissionError:
        s.close()
        raise NotRunning(f"no permission to use {path}: run as the gateway's user or join its group") from None
    return s


def request(path: Path, cmd: str, args: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
    """Send one request and return its result (ControlError when refused)."""
    with _connect(path, timeout) as s:
        s.sendall(json.dumps({"cmd": cmd, "args": args or {}}).encode() + b"\n")
        with s.makefile("rb") as f:
            line = f.readline()
    if not line:
        raise ControlError("the gateway closed the connection without answering")
    reply = json.loads(line)
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "refused"))
    return reply["result"]


def stream(path: Path, cmd: str, args: dict[str, Any] | None = None) -> Iterator[Any]:
    """Yield the items of a streaming command until the daemon stops sending."""
    with _connect(path, 5.0) as s:
        s.sendall(json.dumps({"cmd": cmd, "args": args or {}}).encode() + b"\n")
        s.settimeout(None)
        with s.makefile("rb") as f:
            for line in f:
                reply = json.loads(line)
                if not reply.get("ok"):
                    raise ControlError(reply.get("error", "refused"))
                yield reply["item"]
