"""The control socket in-process: bad requests, idle and surplus clients never end the server."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from gateway import control
from gateway.control import ConnectionLost, ControlError, ControlServer, NotRunning, claim, request, stream


async def _echo(args: dict[str, Any]) -> Any:
    return args


async def _boom(args: dict[str, Any]) -> Any:
    return int(args["recent"])  # 1e400: OverflowError, which no handler expects


async def _hang(args: dict[str, Any]) -> None:
    await anyio.sleep(60)


async def _ticks(args: dict[str, Any]) -> AsyncIterator[int]:
    for i in range(int(args.get("n", 3))):
        yield i


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ControlServer]:
    server = ControlServer(tmp_path / "c.sock", {"echo": _echo, "boom": _boom, "hang": _hang}, {"ticks": _ticks})
    with anyio.from_thread.start_blocking_portal() as portal:
        future, _ = portal.start_task(server.serve)
        yield server
        future.cancel()


def raw(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(data)
        return s.makefile("rb").readline()


def test_unexpected_errors_are_answered_and_the_server_goes_on(served: ControlServer) -> None:
    reply = json.loads(raw(served.path, b'{"cmd": "boom", "args": {"recent": 1e400}}\n'))
    assert not reply["ok"] and "OverflowError" in reply["error"]
    deep = b'{"cmd": "echo", "args": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    assert not json.loads(raw(served.path, deep[:60_000] + b"\n"))["ok"]  # too deep for the decoder
    assert request(served.path, "echo", {"a": 1}) == {"a": 1}
    assert served.errors == 2


def test_idle_and_surplus_clients_are_dropped(served: ControlServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "REQUEST_TIMEOUT_S", 0.3)
    monkeypatch.setattr(control, "MAX_CLIENTS", 4)
    idle = [socket.socket(socket.AF_UNIX) for _ in range(6)]
    try:
        for s in idle:
            s.connect(str(served.path))
            s.settimeout(10)
        # the server closes the two beyond MAX_CLIENTS at once and the other four after the timeout
        assert all(s.recv(1) == b"" for s in idle)
    finally:
        for s in idle:
            s.close()
    assert served.rejected >= 2
    assert request(served.path, "echo", {"b": 2}) == {"b": 2}


def test_streams_and_lost_connections(served: ControlServer) -> None:
    got = stream(served.path, "ticks", {"n": 3})
    assert [next(got) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ConnectionLost):  # the daemon ended the stream: the caller is told, not left waiting
        next(got)
    with pytest.raises(ConnectionLost, match="did not answer"):
        request(served.path, "hang", timeout=0.3)
    with pytest.raises(ControlError, match="unknown command"):
        request(served.path, "nope")


def test_socket_paths_that_cannot_work_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="too long"):
        claim(tmp_path / ("x" * 120) / "c.sock")
    (tmp_path / "file").write_text("")
    with pytest.raises(ControlError, match="control socket"):
        claim(tmp_path / "file" / "c.sock")
    with pytest.raises(NotRunning):
        request(tmp_path / "file" / "c.sock", "status")


def test_candump_tells_how_many_frames_its_reader_missed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    frame = {"bus": "pack", "timestamp": 1.0, "id": 0x123, "extended": False, "fd": False, "error": False,
             "remote": False, "data": "01"}

    async def candump(args: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        yield frame
        yield {"bus": "pack", "dropped": 7}
        yield frame

    server = ControlServer(tmp_path / "c.sock", {}, {"candump": candump})
    with anyio.from_thread.start_blocking_portal() as portal:
        future, _ = portal.start_task(server.serve)
        assert main(["candump", "--socket", str(server.path), "--count", "2"]) == 0
        out, err = capsys.readouterr()
        assert out.count("123  [1]  01") == 2  # the dropped record does not count as a frame
        assert "DROPCOUNT: 7 frames on pack not shown" in err
        assert main(["candump", "--socket", str(server.path), "--count", "2", "--json"]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert lines == [frame, {"bus": "pack", "dropped": 7}, frame]
        future.cancel()
